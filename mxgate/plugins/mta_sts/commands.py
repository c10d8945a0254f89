"""``mxgate sts show | refresh | list | record``: the cached policies, a refresh now, the TXT record we publish.

What the cache holds came from the network (a policy host's answer, a TXT record, another node's row): every
human-readable line escapes it before it reaches the terminal; ``--json`` output is JSON with non-ASCII escaped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable

from mxgate import Config, add_config_arg, escape, load_from_args, resolver_from_config
from mxgate.plugins.mta_sts.cache import CACHE_FILE, CachedPolicy, SqlitePolicyStore, iso
from mxgate.plugins.mta_sts.config import norm_domain, section
from mxgate.plugins.mta_sts.engine import NullSink, build_engine
from mxgate.plugins.mta_sts.serve import served_record

__all__ = ["cmd_list", "cmd_record", "cmd_refresh", "cmd_show", "describe", "register_cli"]


def register_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("sts", help="MTA-STS: cached policies, refresh, the TXT record we publish")
    sub = p.add_subparsers(dest="sts_command", metavar="ACTION", required=True)
    q = sub.add_parser("show", help="the cached policy of DOMAIN")
    q.add_argument("domain")
    q.add_argument("--json", action="store_true")
    add_config_arg(q)
    q.set_defaults(func=cmd_show)
    q = sub.add_parser("refresh", help="look up and fetch DOMAIN's policy now and cache it")
    q.add_argument("domain")
    add_config_arg(q)
    q.set_defaults(func=cmd_refresh)
    q = sub.add_parser("list", help="every cached policy")
    q.add_argument("--json", action="store_true")
    add_config_arg(q)
    q.set_defaults(func=cmd_list)
    q = sub.add_parser("record", help="the _mta-sts TXT record to publish for a served DOMAIN")
    q.add_argument("domain")
    add_config_arg(q)
    q.set_defaults(func=cmd_record)


def _load(args: argparse.Namespace) -> Config:
    config, _plugins = load_from_args(args)
    return config


def describe(entry: CachedPolicy, now: float) -> str:
    """A cached policy for a terminal: every text that came from the network escaped."""
    state = "valid" if entry.valid(now) else "EXPIRED"
    lines = [
        f"domain:       {escape(entry.domain)}",
        f"id:           {escape(entry.policy_id or '-')}",
        f"mode:         {escape(entry.policy.mode)}",
        f"max_age:      {entry.policy.max_age}",
        f"mx:           {escape(', '.join(entry.policy.mx) or '-')}",
        f"fetched:      {iso(entry.fetched_at)}",
        f"expires:      {iso(entry.expires_at)} ({state})",
        f"last attempt: {iso(entry.last_attempt_at)}",
        f"failures:     {entry.failures}" + (f" ({escape(entry.last_error)})" if entry.last_error else ""),
    ]
    return "\n".join(lines)


def _with_store(config: Config, action: Callable[[SqlitePolicyStore], int]) -> int:
    store = SqlitePolicyStore(config.state_path / CACHE_FILE)
    try:
        return action(store)
    finally:
        store.close()


def cmd_show(args: argparse.Namespace) -> int:
    config = _load(args)
    domain = norm_domain(args.domain)

    def show(store: SqlitePolicyStore) -> int:
        entry = store.get(domain)
        if entry is None:
            print(f"mxgate: no cached MTA-STS policy for {domain}", file=sys.stderr)
            return 1
        print(json.dumps(entry.to_json(), indent=2) if args.json else describe(entry, time.time()))
        return 0

    return _with_store(config, show)


def cmd_list(args: argparse.Namespace) -> int:
    config = _load(args)

    def show(store: SqlitePolicyStore) -> int:
        entries = store.load_all()
        if args.json:
            print(json.dumps([e.to_json() for e in entries], indent=2))
            return 0
        rows = [
            (escape(e.domain), escape(e.policy_id or "-"), escape(e.policy.mode), iso(e.expires_at), str(e.failures))
            for e in entries
        ]
        head = ("DOMAIN", "ID", "MODE", "EXPIRES", "FAILURES")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        for row in [head, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        return 0

    return _with_store(config, show)


def cmd_refresh(args: argparse.Namespace) -> int:
    config = _load(args)
    domain = norm_domain(args.domain)
    return asyncio.run(_refresh(config, domain))


async def _refresh(config: Config, domain: str) -> int:
    resolver = resolver_from_config(config.dns)
    engine = await build_engine(config, lambda: resolver, clock=time.time, sink=NullSink())
    try:
        result = await engine.refresh(domain, trigger="command", force=True)
        entry = engine.cache.get(domain)
    finally:
        await engine.cache.close()
    if not result.ok:
        print(f"mxgate: {domain}: {result.status}: {escape(result.detail)}", file=sys.stderr)
        return 1
    if entry is not None:
        print(describe(entry, time.time()))
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    config = _load(args)
    conf = section(config)
    domain = norm_domain(args.domain)
    served = next((p for p in conf.serve_policies if norm_domain(p.domain) == domain), None)
    if served is None:
        known = ", ".join(p.domain for p in conf.serve_policies) or "none"
        print(f"mxgate: {domain} is not in plugins.mta_sts.serve_policies (served: {known})", file=sys.stderr)
        return 1
    print(served_record(served))
    return 0
