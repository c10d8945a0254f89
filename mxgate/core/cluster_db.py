"""The cluster's shared PostgreSQL database (:mod:`mxgate.core.cluster`): connections, each on its own thread,
and the schema.

The schema is a list of numbered steps per component (``core`` here, plugins through the hook
``mxgate_lifecycle_register_migrations``), applied by ``mxgate cluster migrate`` under an advisory lock and
recorded in ``mxgate_schema``. A node checks the versions at start: older than its steps is an error (run the
migration); an unreachable database is not (mail does not wait for it; the node works on and retries).

The driver is psycopg 3 (extra ``mxgate[cluster]``), imported only when a cluster is configured. Why psycopg and
not asyncpg: its connections are typed (mypy strict checks every call; asyncpg ships no type information), its
binary wheel brings libpq (nothing to build), and its DB-API shape lets one store code path serve both back ends:
a store hands a job (a function of a connection) to the thread that owns its connection — a SQLite file or a
PostgreSQL session — exactly as the SQLite stores always did, so blocking I/O stays off the event loop and the SQL
is written once (``?`` placeholders are translated for PostgreSQL). Each store owns one connection on its own
thread; a pool (psycopg_pool) would buy nothing for a handful of ordered writers per node, so it is not used.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from mxgate.core.errors import MxgateError, StateError
from mxgate.core.migrations import Migration, MigrationRegistry

if TYPE_CHECKING:
    from mxgate.core.plugins import Dispatcher

log = logging.getLogger(__name__)

T = TypeVar("T")

EXTRA: Final = "mxgate[cluster]"
CORE: Final = "core"


class ClusterUnavailable(MxgateError):
    """The cluster database cannot be reached (or dropped the connection); the caller works on without it."""


def import_psycopg() -> Any:
    """psycopg, or an error that names the extra to install."""
    try:
        import psycopg  # lazy: the optional extra mxgate[cluster], needed only when a cluster is configured
    except ImportError as exc:
        raise MxgateError(f"cluster mode needs the PostgreSQL driver: pip install '{EXTRA}'") from exc
    return psycopg


def safe_url(url: str) -> str:
    """The URL without its password, for messages and ``cluster status``."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


# -- schema steps ----------------------------------------------------------------------------------------------


CORE_STEPS: Final = (
    (
        1,
        "nodes and their heartbeats",
        """
        CREATE TABLE mxgate_node (
            name TEXT PRIMARY KEY,
            hostname TEXT NOT NULL,
            pid INTEGER NOT NULL,
            version TEXT NOT NULL,
            started_at TIMESTAMPTZ NOT NULL,
            heartbeat_at TIMESTAMPTZ NOT NULL
        )
        """,
    ),
    (
        2,
        "AUTH failures of every node",
        """
        CREATE TABLE mxgate_auth_failure (
            source TEXT NOT NULL,
            client TEXT NOT NULL,
            at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX mxgate_auth_failure_at ON mxgate_auth_failure (at);
        CREATE INDEX mxgate_auth_failure_client ON mxgate_auth_failure (client, at)
        """,
    ),
    (
        3,
        "tracking log of every node",
        """
        CREATE TABLE mxgate_tracking (
            node TEXT NOT NULL,
            file_id TEXT NOT NULL,
            pos BIGINT NOT NULL,
            ts DOUBLE PRECISION NOT NULL,
            event TEXT NOT NULL,
            queue_id TEXT,
            message_id TEXT,
            line TEXT NOT NULL,
            PRIMARY KEY (node, file_id, pos)
        );
        CREATE INDEX mxgate_tracking_queue_id ON mxgate_tracking (queue_id);
        CREATE INDEX mxgate_tracking_message_id ON mxgate_tracking (message_id);
        CREATE INDEX mxgate_tracking_ts ON mxgate_tracking (ts)
        """,
    ),
    (
        4,
        "queue summaries of every node",
        """
        ALTER TABLE mxgate_node ADD COLUMN queue TEXT
        """,
    ),
)


def collect_migrations(dispatcher: Dispatcher | None) -> MigrationRegistry:
    """The core's steps and every enabled plugin's."""
    registry = MigrationRegistry()
    for version, description, sql in CORE_STEPS:
        registry.add(CORE, version, description, sql)
    if dispatcher is not None:
        dispatcher.call_sync("mxgate_lifecycle_register_migrations", migrations=registry)
    return registry


# -- one connection on its own thread ---------------------------------------------------------------------------


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What store jobs use of a connection: sqlite3's, or :class:`PgConnection` in front of psycopg's."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Cursor: ...


def _pg_sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class PgConnection:
    """A psycopg connection that speaks the SQL the SQLite stores write: ``?`` placeholders."""

    def __init__(self, conn: Any) -> None:
        self.raw = conn

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Cursor:
        cursor: Cursor = self.raw.execute(_pg_sql(sql), tuple(params))
        return cursor

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]], /) -> None:
        with self.raw.cursor() as cur:
            cur.executemany(_pg_sql(sql), [tuple(r) for r in rows])


class SharedDb:
    """One PostgreSQL session owned by one thread; every call runs there, in order (the SQLite stores' shape).

    A lost connection raises :class:`ClusterUnavailable` and is opened again by the next call. A caller that is
    cancelled does not cancel its transaction (it still commits or rolls back on the thread)."""

    kind: Final = "postgresql"

    def __init__(
        self, url: str, *, name: str, node: str, connect_timeout: float = 5.0, schema: str | None = None
    ) -> None:
        self.url = url
        self.name = name
        self.schema = schema
        self.node = node
        self.connect_timeout = connect_timeout
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"mxgate-pg-{name}")
        self._conn: Any = None
        self._closed = False

    def _open(self) -> Any:
        psycopg = import_psycopg()
        try:
            return psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=max(1, int(self.connect_timeout)),
                application_name=f"mxgate {self.node} {self.name}"[:63],
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
                tcp_user_timeout=int(self.connect_timeout * 4000),
                **({"options": f"-c search_path={self.schema},public"} if self.schema else {}),
            )
        except psycopg.OperationalError as exc:
            raise ClusterUnavailable(f"cluster database {safe_url(self.url)}: {first_line(exc)}") from exc

    def _call(self, fn: Callable[[PgConnection], T], transaction: bool) -> T:
        """``fn`` on this store's connection. A connection that was open before (the server restarted, a
        fail-over happened) and fails is opened again and ``fn`` tried once more on the new one: every job of
        the stores is an idempotent upsert or a read, so a retry never counts twice."""
        psycopg = import_psycopg()
        for attempt in (1, 2):
            reused = self._conn is not None and not self._conn.closed
            if not reused:
                self._conn = self._open()
            try:
                if not transaction:
                    return fn(PgConnection(self._conn))
                with self._conn.transaction():
                    return fn(PgConnection(self._conn))
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None
                if reused and attempt == 1:
                    continue
                raise ClusterUnavailable(f"cluster database {safe_url(self.url)}: {first_line(exc)}") from exc
        raise AssertionError("unreachable")

    def call(self, fn: Callable[[Any], T]) -> T:
        """``fn`` on the caller's thread (a command that runs nothing else); not while the store's thread is used."""
        return self._call(fn, False)

    async def run(self, fn: Callable[[Any], T]) -> T:
        if self._closed:
            raise RuntimeError(f"cluster store {self.name} is closed")
        future = self._executor.submit(self._call, fn, False)
        return await asyncio.shield(asyncio.wrap_future(future))

    async def write(self, fn: Callable[[Any], T]) -> T:
        """``fn`` in one transaction."""
        if self._closed:
            raise RuntimeError(f"cluster store {self.name} is closed")
        future = self._executor.submit(self._call, fn, True)
        return await asyncio.shield(asyncio.wrap_future(future))

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        """Yields True on the one node that holds the advisory lock ``name`` now (False elsewhere); the lock
        goes with the session, so a node that dies or loses the database gives it up at once."""

        def lock(c: PgConnection) -> bool:
            return bool(c.execute("SELECT pg_try_advisory_lock(hashtext(?))", (f"mxgate:{name}",)).fetchone()[0])

        got = await self.run(lock)
        try:
            yield got
        finally:
            if got:
                with contextlib.suppress(Exception):
                    await self.run(lambda c: c.execute("SELECT pg_advisory_unlock(hashtext(?))", (f"mxgate:{name}",)))

    async def size(self) -> int:
        """Bytes of the tables of this store's schema (indexes and TOAST included)."""

        def job(c: PgConnection) -> int:
            row = c.execute(
                "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c JOIN pg_namespace n"
                " ON n.oid = c.relnamespace WHERE n.nspname = ? AND c.relkind = 'r'",
                (self.schema or "public",),
            ).fetchone()
            return int(row[0])

        return await self.run(job)

    async def close(self) -> None:
        if self._closed:
            return

        def shut() -> None:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None

        self._closed = True
        await asyncio.shield(asyncio.wrap_future(self._executor.submit(shut)))
        await asyncio.to_thread(self._executor.shutdown, True)


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# -- schema ----------------------------------------------------------------------------------------------------

_SCHEMA_TABLE = """
CREATE TABLE IF NOT EXISTS mxgate_schema (
    component TEXT NOT NULL,
    version INTEGER NOT NULL,
    description TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)
"""


def schema_versions(c: PgConnection) -> dict[str, int]:
    exists = c.execute("SELECT to_regclass('mxgate_schema') IS NOT NULL").fetchone()[0]
    if not exists:
        return {}
    rows = c.execute("SELECT component, MAX(version) FROM mxgate_schema GROUP BY component").fetchall()
    return {str(r[0]): int(r[1]) for r in rows}


def migrate(url: str, registry: MigrationRegistry, *, connect_timeout: float = 5.0) -> list[Migration]:
    """Apply every missing step, in order, in one transaction under an advisory lock (two nodes or two
    operators running it at once: the second waits and finds nothing to do). Returns the steps applied."""
    psycopg = import_psycopg()
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(connect_timeout)))
    except psycopg.OperationalError as exc:
        raise ClusterUnavailable(f"cluster database {safe_url(url)}: {first_line(exc)}") from exc
    applied: list[Migration] = []
    with conn, conn.transaction():
        c = PgConnection(conn)
        c.execute("SELECT pg_advisory_xact_lock(hashtext('mxgate:migrate'))")
        c.execute(_SCHEMA_TABLE)
        have = schema_versions(c)
        for component, steps in sorted(registry.steps.items()):
            if have.get(component, 0) > steps[-1].version:
                raise StateError(
                    f"cluster database schema of {component} is at version {have[component]}, newer than this "
                    f"mxgate's {steps[-1].version}: upgrade mxgate"
                )
            for step in steps:
                if step.version > have.get(component, 0):
                    conn.execute(step.sql)
                    c.execute(
                        "INSERT INTO mxgate_schema (component, version, description) VALUES (?, ?, ?)",
                        (component, step.version, step.description),
                    )
                    applied.append(step)
    return applied


def schema_problem(have: dict[str, int], wanted: dict[str, int]) -> str | None:
    behind = [f"{c} {have.get(c, 0)} < {v}" for c, v in sorted(wanted.items()) if have.get(c, 0) < v]
    if behind:
        return f"cluster database schema is older than this mxgate ({', '.join(behind)}): run `mxgate cluster migrate`"
    return None
