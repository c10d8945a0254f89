"""``mxgate cluster migrate``, ``mxgate cluster status`` and ``mxgate queue list --cluster``: the commands of
cluster mode (:mod:`mxgate.core.cluster`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from mxgate.core.cluster import read_status
from mxgate.core.cluster_db import ClusterUnavailable, collect_migrations, migrate, safe_url
from mxgate.core.commands import add_config_arg, load_from_args
from mxgate.core.config import ClusterConfig
from mxgate.core.errors import MxgateError
from mxgate.core.migrations import MigrationRegistry
from mxgate.core.plugins import Dispatcher


def _load(args: argparse.Namespace) -> tuple[ClusterConfig, MigrationRegistry]:
    config, plugins = load_from_args(args)
    if not config.cluster.database:
        raise MxgateError(f"{config.source}: no cluster configured ([cluster] database is empty)")
    return config.cluster, collect_migrations(Dispatcher(plugins))


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def cmd_migrate(args: argparse.Namespace) -> int:
    conf, migrations = _load(args)
    applied = migrate(conf.database, migrations, connect_timeout=conf.connect_timeout)
    for step in applied:
        print(f"applied {step.component} {step.version}: {step.description}")
    if not applied:
        print(f"{safe_url(conf.database)}: schema up to date")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    conf, migrations = _load(args)
    try:
        status = read_status(conf, migrations)
    except ClusterUnavailable as exc:
        print(f"database  {safe_url(conf.database)}  UNREACHABLE  {exc}")
        return 1
    print(f"database  {safe_url(conf.database)}  PostgreSQL {status.server_version}")
    for component, version in sorted(status.wanted.items()):
        have = status.schema.get(component, 0)
        state = "ok" if have == version else ("MIGRATE" if have < version else "NEWER")
        print(f"schema    {component:12} {have}/{version}  {state}")
    print(f"{'NODE':24}  {'LAST HEARTBEAT':20}  {'AGE':>7}  {'STATE':5}  VERSION")
    for n in status.nodes:
        print(f"{n.name:24}  {_utc(n.heartbeat_at):20}  {n.age:>6.0f}s  {'stale' if n.stale else 'up':5}  {n.version}")
    if status.problem:
        print(f"mxgate: {status.problem}", file=sys.stderr)
        return 1
    return 0


def cmd_queue_list_cluster(args: argparse.Namespace) -> int:
    """``mxgate queue list --cluster``: every node's queue summary as of its last heartbeat."""
    conf, migrations = _load(args)
    status = read_status(conf, migrations)
    if args.json:
        rows = [
            {"node": n.name, "heartbeat_age": round(n.age, 1), "stale": n.stale, "queue": n.queue} for n in status.nodes
        ]
        print(json.dumps(rows, indent=2))
        return 0
    head = ("NODE", "STATE", "MESSAGES", "ACTIVE", "DEFERRED", "HELD", "BYTES", "OLDEST", "AS OF")
    table = []
    for n in status.nodes:
        q = n.queue or {}
        oldest = q.get("oldest_age")
        table.append(
            (
                n.name,
                "stale" if n.stale else "up",
                *(str(q.get(k, "-")) for k in ("messages", "active", "deferred", "held", "bytes")),
                "-" if oldest is None else f"{oldest:.0f}s",
                f"{n.age:.0f}s ago",
            )
        )
    widths = [max(len(row[i]) for row in [head, *table]) for i in range(len(head))]
    for row in [head, *table]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("cluster", help="cluster mode: migrate the shared database, show the nodes")
    sub = p.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    m = sub.add_parser("migrate", help="create or upgrade the shared PostgreSQL schema (every missing step, once)")
    add_config_arg(m)
    m.set_defaults(func=cmd_migrate)
    s = sub.add_parser("status", help="the database, its schema versions and every node's last heartbeat")
    add_config_arg(s)
    s.set_defaults(func=cmd_status)
