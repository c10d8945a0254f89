"""Cluster mode: several gateways behind one set of MX records share state in one PostgreSQL database.

``[cluster] database = "postgresql://..."`` turns it on; ``node`` names this gateway (the host name by default).
Queues stay per node, as in every MTA; what is shared lives in PostgreSQL: the nodes, their heartbeats and queue
summaries, and the AUTH failure limits (here), the tracking log (:mod:`mxgate.core.cluster_tracking`), and what
plugins put there (TLS-RPT counts and reports, the MTA-STS policy cache). Without ``database`` nothing changes:
every store is SQLite under ``state_dir``.

This module is the node: its heartbeat and queue summary, the cluster-wide AUTH failure limiter, the status
``mxgate cluster status`` shows. The database connections and the schema are :mod:`mxgate.core.cluster_db`;
the commands :mod:`mxgate.core.cluster_cli`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from mxgate._version import __version__
from mxgate.core.auth import FailureLimiter
from mxgate.core.cluster_db import (
    CORE,
    ClusterUnavailable,
    PgConnection,
    SharedDb,
    first_line,
    import_psycopg,
    safe_url,
    schema_problem,
    schema_versions,
)
from mxgate.core.config import ClusterConfig
from mxgate.core.errors import StateError
from mxgate.core.migrations import MigrationRegistry

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

STALE_BEATS: Final = 3  # a node whose last heartbeat is older than this many intervals is shown as "stale"


# -- AUTH failures, cluster-wide --------------------------------------------------------------------------------

AUTH_SYNC_INTERVAL: Final = 1.0
AUTH_OUTBOX_LIMIT: Final = 10_000  # failures kept for the database while it is away (the oldest dropped first)
AUTH_REMOTE_LIMIT: Final = 100_000  # client addresses whose failures on other nodes are known here


class ClusterFailureLimiter(FailureLimiter):
    """The AUTH failure limiter (:class:`~mxgate.core.auth.FailureLimiter`) counting every node's failures.

    The receive path stays synchronous and local: a check never waits for the database. Each process records its
    own failures as before and, every ``sync_interval`` seconds, sends them to ``mxgate_auth_failure`` and reads
    the other processes' failures within the window per client address; a client is blocked when its failures
    here, its attempts in progress here and its failures elsewhere reach the limit. So a brute-forcer spread over
    N nodes gets the limit, plus what the nodes let through in one sync interval, not N times the limit. A
    success resets the address everywhere. With the database away each node limits alone."""

    def __init__(
        self,
        db: SharedDb,
        *,
        source: str,
        limit: int = 5,
        window: float = 300.0,
        sync_interval: float = AUTH_SYNC_INTERVAL,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(limit, window)
        self.db = db
        self.source = source
        self.sync_interval = sync_interval
        self.wall_clock = wall_clock
        self._outbox: list[tuple[str, str, float]] = []  # ("fail" | "ok", client, wall time)
        self._remote: dict[str, int] = {}
        self._wake: asyncio.Event | None = None  # set by a failure: it goes out at once, not at the next interval

    def blocked(self, key: str) -> bool:
        q = self._recent(key)
        here = (len(q) if q is not None else 0) + self._pending.get(key, 0)
        return here + self._remote.get(key, 0) >= self.limit

    def failed(self, key: str) -> None:
        super().failed(key)
        self._queue("fail", key)

    def succeeded(self, key: str) -> None:
        super().succeeded(key)
        self._remote.pop(key, None)
        self._queue("ok", key)

    def _queue(self, op: str, key: str) -> None:
        self._outbox.append((op, key, self.wall_clock()))
        if len(self._outbox) > AUTH_OUTBOX_LIMIT:
            del self._outbox[: len(self._outbox) - AUTH_OUTBOX_LIMIT]
        if self._wake is not None:
            self._wake.set()

    async def sync(self) -> bool:
        """Send this process's failures and successes, read the others'; False when the database is away."""
        ops, self._outbox = self._outbox, []
        now = self.wall_clock()
        source, cutoff = self.source, now - self.window

        def job(c: PgConnection) -> list[Any]:
            for op, client, at in ops:
                if op == "fail":
                    c.execute(
                        "INSERT INTO mxgate_auth_failure (source, client, at) VALUES (?, ?, ?)", (source, client, at)
                    )
                else:
                    c.execute("DELETE FROM mxgate_auth_failure WHERE client = ? AND at <= ?", (client, at))
            c.execute("DELETE FROM mxgate_auth_failure WHERE at <= ?", (cutoff,))
            rows: list[Any] = c.execute(
                "SELECT client, COUNT(*) FROM mxgate_auth_failure WHERE at > ? AND source <> ? GROUP BY client"
                " ORDER BY COUNT(*) DESC LIMIT ?",
                (cutoff, source, AUTH_REMOTE_LIMIT),
            ).fetchall()
            return rows

        try:
            rows = await self.db.write(job)
        except ClusterUnavailable:
            self._outbox = ops + self._outbox  # sent when the database returns
            del self._outbox[: max(0, len(self._outbox) - AUTH_OUTBOX_LIMIT)]
            self._remote = {}
            return False
        self._remote = {str(client): int(n) for client, n in rows}
        return True

    async def run_sync(self) -> None:
        """Every ``sync_interval``, and at once after a failure or success here (the other nodes still learn of
        it at their next interval)."""
        self._wake = wake = asyncio.Event()
        while True:
            wake.clear()
            try:
                await self.sync()
            except Exception:
                log.exception("cluster AUTH failure sync failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.sync_interval)
                await asyncio.sleep(self.sync_interval / 10)  # a flood's failures go out in batches

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.sync()
        await self.db.close()


# -- the node --------------------------------------------------------------------------------------------------


class Cluster:
    """This node's view of the cluster: its name, the database, the stores plugins open on it, the heartbeat."""

    def __init__(
        self,
        conf: ClusterConfig,
        migrations: MigrationRegistry,
        *,
        clock: Callable[[], float] = time.time,
        emit: Callable[..., Awaitable[None]] | None = None,
    ):
        self.conf = conf
        self.emit = emit  # report events (``cluster_heartbeat``), the hooks' ``on_event``
        self.node = conf.node
        self.migrations = migrations
        self.clock = clock
        self.started_at = clock()
        self._db = self.database(CORE)
        self.last_beat: float | None = None
        self.reachable = False
        self.auth_limiter: ClusterFailureLimiter | None = None
        # the main process's queue summary, published with every heartbeat (``mxgate queue list --cluster``)
        self.queue_summary: Callable[[], Awaitable[dict[str, Any]]] | None = None

    def database(self, name: str, *, schema: str | None = None) -> SharedDb:
        """A new store connection for component ``name`` (its own session and thread); unqualified table names
        are looked up in ``schema`` first."""
        return SharedDb(
            self.conf.database, name=name, node=self.node, connect_timeout=self.conf.connect_timeout, schema=schema
        )

    async def check_schema(self) -> None:
        """At start: a schema older than this mxgate's steps is a start-up error; an unreachable database only a
        warning (the node works without it and catches up)."""
        try:
            have = await self._db.run(schema_versions)
        except ClusterUnavailable as exc:
            log.warning("cluster database unreachable at start; working without it", extra={"error": str(exc)})
            return
        problem = schema_problem(have, self.migrations.wanted())
        if problem:
            raise StateError(problem)

    async def heartbeat(self) -> bool:
        now = self.clock()
        queue = None
        if self.queue_summary is not None:
            try:
                queue = json.dumps(await self.queue_summary(), separators=(",", ":"))
            except Exception:
                log.exception("queue summary for the cluster failed")

        def beat(c: PgConnection) -> None:
            c.execute(
                "INSERT INTO mxgate_node (name, hostname, pid, version, started_at, heartbeat_at, queue)"
                " VALUES (?, ?, ?, ?, to_timestamp(?), to_timestamp(?), ?) ON CONFLICT (name) DO UPDATE SET"
                " hostname = excluded.hostname, pid = excluded.pid, version = excluded.version,"
                " started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at,"
                " queue = COALESCE(excluded.queue, mxgate_node.queue)",
                (self.node, socket.gethostname(), os.getpid(), __version__, self.started_at, now, queue),
            )

        try:
            await self._db.run(beat)
        except ClusterUnavailable as exc:
            if self.reachable:
                log.warning("cluster database lost; working without it", extra={"error": str(exc)})
            self.reachable = False
            if self.emit is not None:
                await self.emit("cluster_heartbeat", result="failed")
            return False
        if self.emit is not None:
            await self.emit("cluster_heartbeat", result="ok")
        if not self.reachable:
            log.info("cluster database reachable", extra={"node": self.node})
        self.reachable = True
        self.last_beat = now
        return True

    async def run_heartbeat(self) -> None:
        while True:
            try:
                await self.heartbeat()
            except Exception:
                log.exception("cluster heartbeat failed")
            await asyncio.sleep(self.conf.heartbeat_interval)

    def start_auth_limiter(self) -> ClusterFailureLimiter:
        """The cluster-wide AUTH failure limiter of this process (sync task: :meth:`ClusterFailureLimiter.run_sync`)."""
        if self.auth_limiter is None:
            self.auth_limiter = ClusterFailureLimiter(
                self.database("auth"), source=f"{self.node}/{os.getpid()}", sync_interval=self.conf.auth_sync_interval
            )
        return self.auth_limiter

    async def close(self) -> None:
        if self.auth_limiter is not None:
            await self.auth_limiter.close()
        await self._db.close()


# -- status ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeStatus:
    name: str
    hostname: str
    version: str
    started_at: float
    heartbeat_at: float
    age: float  # seconds since the last heartbeat, by the database's clock
    stale: bool
    queue: dict[str, Any] | None = None  # the node's queue summary as of its last heartbeat


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    server_version: str
    schema: dict[str, int]
    wanted: dict[str, int]
    nodes: tuple[NodeStatus, ...]

    @property
    def problem(self) -> str | None:
        return schema_problem(self.schema, self.wanted)


def read_status(conf: ClusterConfig, migrations: MigrationRegistry) -> ClusterStatus:
    psycopg = import_psycopg()
    try:
        conn = psycopg.connect(conf.database, autocommit=True, connect_timeout=max(1, int(conf.connect_timeout)))
    except psycopg.OperationalError as exc:
        raise ClusterUnavailable(f"cluster database {safe_url(conf.database)}: {first_line(exc)}") from exc
    with conn:
        c = PgConnection(conn)
        version = str(c.execute("SHOW server_version").fetchone()[0])
        schema = schema_versions(c)
        nodes: list[NodeStatus] = []
        if schema.get(CORE, 0) >= 1:
            queue_col = ", queue" if schema.get(CORE, 0) >= 4 else ", NULL"
            rows = c.execute(
                "SELECT name, hostname, version, EXTRACT(EPOCH FROM started_at), EXTRACT(EPOCH FROM heartbeat_at),"
                f" EXTRACT(EPOCH FROM now() - heartbeat_at){queue_col} FROM mxgate_node ORDER BY name"
            ).fetchall()
            for name, host, ver, started, beat, age, queue in rows:
                nodes.append(
                    NodeStatus(
                        str(name),
                        str(host),
                        str(ver),
                        float(started),
                        float(beat),
                        float(age),
                        float(age) > STALE_BEATS * conf.heartbeat_interval,
                        json.loads(queue) if queue else None,
                    )
                )
    return ClusterStatus(version, schema, migrations.wanted(), tuple(nodes))


def queue_summary(counts: Any) -> dict[str, Any]:
    """What a node publishes of its queue (a :class:`~mxgate.core.queue.queries.QueueCounts`)."""
    return {
        "messages": counts.messages,
        "active": counts.leased,
        "deferred": counts.deferred,
        "held": counts.held,
        "bytes": counts.bytes,
        "recipients": {str(status): n for status, n in counts.recipients},
        "oldest_age": counts.oldest_age,
    }
