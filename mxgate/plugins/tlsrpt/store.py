"""Where TLS-RPT data lives: this node's SQLite file (``<state_dir>/tlsrpt.sqlite3``) and, in a cluster, the same
tables in PostgreSQL (schema ``tlsrpt``, counts kept per node), with the SQL both share.

The functions below take a DB-API connection (``sqlite3`` or the cluster store's), so every query runs on the
store's own thread and is written once for both.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from mxgate import private_file
from mxgate.plugins.tlsrpt.report import FailureKey, PolicyAggregate, PolicyKey

__all__ = [
    "CLUSTER_SCHEMA",
    "DB_NAME",
    "LocalStore",
    "load_aggregates",
    "local_totals",
    "publish_totals",
    "write_counts",
]

T = TypeVar("T")

DB_NAME: Final = "tlsrpt.sqlite3"
SCHEMA_VERSION: Final = 2  # 2: report_message

_SCHEMA = """
CREATE TABLE IF NOT EXISTS policy (
    id INTEGER PRIMARY KEY,
    day TEXT NOT NULL, domain TEXT NOT NULL, policy_type TEXT NOT NULL,
    policy_strings TEXT NOT NULL, mx_hosts TEXT NOT NULL,
    success INTEGER NOT NULL DEFAULT 0, failure INTEGER NOT NULL DEFAULT 0,
    UNIQUE (day, domain, policy_type, policy_strings, mx_hosts)
);
CREATE TABLE IF NOT EXISTS failure (
    policy_id INTEGER NOT NULL,
    result_type TEXT NOT NULL, sending_ip TEXT NOT NULL, mx_hostname TEXT NOT NULL, mx_helo TEXT NOT NULL,
    receiving_ip TEXT NOT NULL, additional_info TEXT NOT NULL, reason_code TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (policy_id, result_type, sending_ip, mx_hostname, mx_helo, receiving_ip, additional_info,
                 reason_code)
);
CREATE TABLE IF NOT EXISTS report (
    day TEXT NOT NULL, domain TEXT NOT NULL, scope TEXT NOT NULL,
    state TEXT NOT NULL, due_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, first_try REAL,
    report_id TEXT, filename TEXT, body BLOB, last_error TEXT,
    PRIMARY KEY (day, domain, scope)
);
CREATE TABLE IF NOT EXISTS delivery (
    day TEXT NOT NULL, domain TEXT NOT NULL, scope TEXT NOT NULL, uri TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL, deadline REAL NOT NULL,
    last_error TEXT, done_at REAL,
    PRIMARY KEY (day, domain, scope, uri)
);
CREATE INDEX IF NOT EXISTS delivery_due ON delivery (state, next_attempt);
CREATE TABLE IF NOT EXISTS received (
    id INTEGER PRIMARY KEY,
    received_at REAL NOT NULL, method TEXT NOT NULL, organization TEXT NOT NULL, contact TEXT NOT NULL,
    report_id TEXT NOT NULL, start REAL, end REAL, dkim TEXT NOT NULL, raw TEXT NOT NULL,
    UNIQUE (organization, report_id)
);
CREATE TABLE IF NOT EXISTS received_policy (
    received_id INTEGER NOT NULL, policy_type TEXT NOT NULL, policy_domain TEXT NOT NULL,
    success INTEGER NOT NULL, failure INTEGER NOT NULL
);
-- received reports are kept as counts: the raw column stays empty (it held the whole JSON once), failures are
-- summed per (policy domain, result type, receiving MX)
CREATE TABLE IF NOT EXISTS received_failure (
    received_id INTEGER NOT NULL, policy_domain TEXT NOT NULL, result_type TEXT NOT NULL,
    receiving_mx TEXT NOT NULL, receiving_ip TEXT NOT NULL, count INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS report_message (queue_id TEXT PRIMARY KEY, queued_at REAL NOT NULL);
"""


# The cluster store (PostgreSQL, schema "tlsrpt"): the same tables, counts kept per node. Steps are never edited
# once released; the next change is step 2.
CLUSTER_SCHEMA: Final = """
CREATE SCHEMA tlsrpt;
CREATE TABLE tlsrpt.policy (
    id BIGSERIAL PRIMARY KEY, node TEXT NOT NULL,
    day TEXT NOT NULL, domain TEXT NOT NULL, policy_type TEXT NOT NULL,
    policy_strings TEXT NOT NULL, mx_hosts TEXT NOT NULL,
    success BIGINT NOT NULL DEFAULT 0, failure BIGINT NOT NULL DEFAULT 0,
    UNIQUE (node, day, domain, policy_type, policy_strings, mx_hosts)
);
CREATE INDEX policy_day_domain ON tlsrpt.policy (day, domain);
CREATE TABLE tlsrpt.failure (
    policy_id BIGINT NOT NULL REFERENCES tlsrpt.policy (id) ON DELETE CASCADE,
    result_type TEXT NOT NULL, sending_ip TEXT NOT NULL, mx_hostname TEXT NOT NULL, mx_helo TEXT NOT NULL,
    receiving_ip TEXT NOT NULL, additional_info TEXT NOT NULL, reason_code TEXT NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (policy_id, result_type, sending_ip, mx_hostname, mx_helo, receiving_ip, additional_info,
                 reason_code)
);
CREATE TABLE tlsrpt.report (
    day TEXT NOT NULL, domain TEXT NOT NULL, scope TEXT NOT NULL,
    state TEXT NOT NULL, due_at DOUBLE PRECISION NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    first_try DOUBLE PRECISION, report_id TEXT, filename TEXT, body BYTEA, last_error TEXT,
    PRIMARY KEY (day, domain, scope)
);
CREATE TABLE tlsrpt.delivery (
    day TEXT NOT NULL, domain TEXT NOT NULL, scope TEXT NOT NULL, uri TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt DOUBLE PRECISION NOT NULL,
    deadline DOUBLE PRECISION NOT NULL, last_error TEXT, done_at DOUBLE PRECISION,
    PRIMARY KEY (day, domain, scope, uri)
);
CREATE INDEX delivery_due ON tlsrpt.delivery (state, next_attempt);
CREATE TABLE tlsrpt.received (
    id BIGSERIAL PRIMARY KEY,
    received_at DOUBLE PRECISION NOT NULL, method TEXT NOT NULL, organization TEXT NOT NULL, contact TEXT NOT NULL,
    report_id TEXT NOT NULL, start DOUBLE PRECISION, "end" DOUBLE PRECISION, dkim TEXT NOT NULL, raw TEXT NOT NULL,
    UNIQUE (organization, report_id)
);
CREATE TABLE tlsrpt.received_policy (
    received_id BIGINT NOT NULL, policy_type TEXT NOT NULL, policy_domain TEXT NOT NULL,
    success BIGINT NOT NULL, failure BIGINT NOT NULL
);
CREATE TABLE tlsrpt.received_failure (
    received_id BIGINT NOT NULL, policy_domain TEXT NOT NULL, result_type TEXT NOT NULL,
    receiving_mx TEXT NOT NULL, receiving_ip TEXT NOT NULL, count BIGINT NOT NULL
);
CREATE INDEX received_at ON tlsrpt.received (received_at);
CREATE INDEX received_policy_id ON tlsrpt.received_policy (received_id);
CREATE INDEX received_failure_id ON tlsrpt.received_failure (received_id);
CREATE TABLE tlsrpt.report_message (queue_id TEXT PRIMARY KEY, queued_at DOUBLE PRECISION NOT NULL);
"""


class LocalStore:
    """One SQLite connection owned by one thread; every call runs there, in order. A caller that is cancelled
    does not cancel its write (it still commits), so a shutdown can never half-lose a flush."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mxgate-tlsrpt")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    def _open(self) -> sqlite3.Connection:
        private_file(self.path, companions=("-wal", "-shm", "-journal"))  # 0600, whatever the umask
        conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=10000")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: schema version {version} is newer than this mxgate")
        if version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        return conn

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            self._conn = self._open()
        return fn(self._conn)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise RuntimeError("TLS-RPT store is closed")
        future = self._executor.submit(self._call, fn)
        return await asyncio.shield(asyncio.wrap_future(future))

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def tx(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await self.run(tx)

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        """The sending round's lock: one node, so always this one (the cluster store takes an advisory lock)."""
        yield True

    async def size(self) -> int:
        """Bytes of the store on disk, its WAL included."""
        size = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                size += os.stat(f"{self.path}{suffix}").st_size
        return size

    async def close(self) -> None:
        if self._closed:
            return

        def shut() -> None:  # runs after every job submitted before it
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        self._closed = True
        await asyncio.shield(asyncio.wrap_future(self._executor.submit(shut)))
        await asyncio.to_thread(self._executor.shutdown, True)


def _j(values: Sequence[str]) -> str:
    return json.dumps(list(values), separators=(",", ":"))


def write_counts(
    conn: sqlite3.Connection,
    counts: dict[PolicyKey, list[int]],
    failures: dict[tuple[PolicyKey, FailureKey], int],
) -> None:
    ids: dict[PolicyKey, int] = {}
    for key, (ok, bad) in counts.items():
        row = conn.execute(
            "INSERT INTO policy (day, domain, policy_type, policy_strings, mx_hosts, success, failure)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (day, domain, policy_type, policy_strings, mx_hosts)"
            " DO UPDATE SET success = success + excluded.success, failure = failure + excluded.failure"
            " RETURNING id",
            (key.day, key.domain, key.policy_type, _j(key.policy_strings), _j(key.mx_hosts), ok, bad),
        ).fetchone()
        ids[key] = int(row[0])
    for (key, fk), n in failures.items():
        conn.execute(
            "INSERT INTO failure (policy_id, result_type, sending_ip, mx_hostname, mx_helo, receiving_ip,"
            " additional_info, reason_code, count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT DO UPDATE SET count = count + excluded.count",
            (
                ids[key],
                fk.result_type,
                fk.sending_ip,
                fk.mx_hostname,
                fk.mx_helo,
                fk.receiving_ip,
                fk.additional_info,
                fk.reason_code,
                n,
            ),
        )


def load_aggregates(conn: Any, day: str, domain: str) -> list[PolicyAggregate]:
    """The day's policies for ``domain`` with their counts, summed over the rows that hold them (one row per node
    in the cluster store, one row alone in SQLite)."""
    rows = conn.execute(
        "SELECT policy_type, policy_strings, mx_hosts, SUM(success), SUM(failure) FROM policy"
        " WHERE day = ? AND domain = ? GROUP BY policy_type, policy_strings, mx_hosts"
        " ORDER BY policy_type, policy_strings, mx_hosts",
        (day, domain),
    ).fetchall()
    fails = conn.execute(
        "SELECT p.policy_type, p.policy_strings, p.mx_hosts, f.result_type, f.sending_ip, f.mx_hostname, f.mx_helo,"
        " f.receiving_ip, f.additional_info, f.reason_code, SUM(f.count) FROM failure f JOIN policy p"
        " ON p.id = f.policy_id WHERE p.day = ? AND p.domain = ? GROUP BY p.policy_type, p.policy_strings,"
        " p.mx_hosts, f.result_type, f.sending_ip, f.mx_hostname, f.mx_helo, f.receiving_ip, f.additional_info,"
        " f.reason_code ORDER BY 4, 5, 6, 7, 8, 9, 10",
        (day, domain),
    ).fetchall()
    by_policy: dict[tuple[str, str, str], list[tuple[FailureKey, int]]] = {}
    for f in fails:
        by_policy.setdefault((f[0], f[1], f[2]), []).append((FailureKey(*f[3:10]), int(f[10])))
    out = []
    for ptype, pstrings, mx, ok, bad in rows:
        key = PolicyKey(day, domain, ptype, tuple(json.loads(pstrings)), tuple(json.loads(mx)))
        out.append(PolicyAggregate(key, int(ok), int(bad), tuple(by_policy.get((ptype, pstrings, mx), ()))))
    return out


def local_totals(
    conn: sqlite3.Connection, changed: set[tuple[str, str]] | None, oldest: str
) -> list[tuple[tuple[Any, ...], list[tuple[Any, ...]]]]:
    """This node's totals (policy row, its failure rows) of the ``changed`` (day, domain) pairs (None: of every
    day since ``oldest``)."""
    if changed is None:
        policies = conn.execute(
            "SELECT id, day, domain, policy_type, policy_strings, mx_hosts, success, failure FROM policy"
            " WHERE day >= ?",
            (oldest,),
        ).fetchall()
    else:
        policies = []
        for day, domain in sorted(changed):
            policies += conn.execute(
                "SELECT id, day, domain, policy_type, policy_strings, mx_hosts, success, failure FROM policy"
                " WHERE day = ? AND domain = ?",
                (day, domain),
            ).fetchall()
    out = []
    for row in policies:
        fails = conn.execute(
            "SELECT result_type, sending_ip, mx_hostname, mx_helo, receiving_ip, additional_info, reason_code, count"
            " FROM failure WHERE policy_id = ?",
            (row[0],),
        ).fetchall()
        out.append((tuple(row[1:]), [tuple(f) for f in fails]))
    return out


def publish_totals(conn: Any, node: str, totals: Sequence[tuple[tuple[Any, ...], list[tuple[Any, ...]]]]) -> None:
    """This node's totals into the cluster store: absolute values keyed by (node, policy), so repeating a publish
    (after a lost connection, at every start) never counts twice."""
    for policy, fails in totals:
        row = conn.execute(
            "INSERT INTO policy (node, day, domain, policy_type, policy_strings, mx_hosts, success, failure)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node, day, domain, policy_type, policy_strings, mx_hosts)"
            " DO UPDATE SET success = excluded.success, failure = excluded.failure RETURNING id",
            (node, *policy),
        ).fetchone()
        for f in fails:
            conn.execute(
                "INSERT INTO failure (policy_id, result_type, sending_ip, mx_hostname, mx_helo, receiving_ip,"
                " additional_info, reason_code, count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (policy_id,"
                " result_type, sending_ip, mx_hostname, mx_helo, receiving_ip, additional_info, reason_code)"
                " DO UPDATE SET count = excluded.count",
                (row[0], *f),
            )
