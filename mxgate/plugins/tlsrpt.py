"""Built-in agent: TLS-RPT (RFC 8460).

Sending side
    Every TLS outcome of the delivery path (hook ``mxgate_delivery_on_tls_outcome``) is counted in memory per
    (UTC day, policy domain, policy) with its failure group, and flushed to ``<state_dir>/tlsrpt.sqlite3`` (WAL,
    ``synchronous=NORMAL``) every ``flush_interval`` seconds and at shutdown, on a thread of its own: the hot
    path never touches the disk. A crash (not a stop) can lose at most the last ``flush_interval`` seconds of
    counts; a stop loses nothing.

    After each full UTC day, each policy domain gets one report (JSON per RFC 8460 section 4, gzip, file name per
    5.1), built after a random delay of up to ``send_window_hours`` and sent to every ``rua`` of the one valid
    ``_smtp._tls.<domain>`` TXT record: ``https:`` by POST (``application/tlsrpt+gzip``, retried with
    exponential backoff for up to 24 hours), ``mailto:`` through mxgate's own queue as a DKIM-signed
    ``multipart/report; report-type="tlsrpt"`` with ``TLS-Required: No``. For ``tlsa`` policies, an MX host that
    publishes its own ``_smtp._tls`` record also gets the part of the report about it.

Cluster mode (``[cluster] database``)
    Counts are still written to the node's own ``tlsrpt.sqlite3`` first (durable, whatever the database does),
    then published to PostgreSQL (schema ``tlsrpt``) as this node's running totals per (day, policy): an
    idempotent upsert keyed by node and policy, so a publish repeated after a lost connection counts nothing twice
    and a node that was cut off catches up by publishing again. Reports are built from the sum over all nodes;
    the sending round (schedule, build, send, purge) runs on one node at a time, the holder of a PostgreSQL
    advisory lock, and reports, deliveries and received reports live in the shared database: one report-id per
    domain and day, one copy of each received report, the same ``mxgate tlsrpt show`` on every node.

Receiving side
    Reports addressed to ``receive_mailbox`` (end-of-data hook) or POSTed to the ``receive_listen`` HTTPS
    endpoint are parsed leniently (gzip or plain JSON, zone-less datetimes, empty fields), kept in the same
    database, and counted: ``reporter_failures()`` and ``mxgate tlsrpt received`` show who fails to reach us.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import random
import re
import secrets
import sqlite3
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import dkim
import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mxgate import private_file
from mxgate.core import checks
from mxgate.core.dns import Resolver
from mxgate.core.hookspecs import hookimpl
from mxgate.core.model import Address, Envelope, IncomingMessage, Verdict
from mxgate.core.outcomes import TlsOutcome, TlsRptResult
from mxgate.core.runtime import ROLE_MAIN, Runtime
from mxgate.core.settings import ConfigRegistry, setting
from mxgate.plugins import _tlsrpt_report as rpt
from mxgate.plugins._tlsrpt_report import (
    FailureKey,
    PolicyAggregate,
    PolicyKey,
    ReceivedReport,
    ReportError,
    ReportTooLarge,
    TlsRptRecord,
)

if TYPE_CHECKING:
    from mxgate.core.cluster_db import SharedDb
    from mxgate.core.migrations import MigrationRegistry
    from mxgate.core.queue.store import QueueStore

__all__ = ["DB_NAME", "TlsRptConfig", "TlsRptPlugin", "TlsRptService"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DB_NAME: Final = "tlsrpt.sqlite3"
SCHEMA_VERSION: Final = 2  # 2: report_message
DAY: Final = 86400
GRACE_SECONDS: Final = 600  # after midnight UTC, before a day's report may be built (late outcomes, flushes)
RETRY_FIRST: Final = 300.0  # first retry after 5 minutes, doubling ...
RETRY_MAX: Final = 4 * 3600.0  # ... up to 4 hours apart
RETRY_WINDOW: Final = 24 * 3600.0  # RFC 8460 5.5: retry for up to 24 hours
CATCH_UP_DAYS: Final = 7  # after downtime, days older than this are not reported any more
TICK_SECONDS: Final = 30.0
MAX_DUE_PER_TICK: Final = 200
HTTP_TIMEOUT: Final = 30.0
RECEIVE_HEADER_LIMIT: Final = 16 * 1024
RECEIVE_TIMEOUT: Final = 30.0
TOP_REPORTERS: Final = 20
RATE_CLIENTS: Final = 10_000  # client addresses the HTTPS endpoint's rate limiter remembers (oldest forgotten)
PARSERS: Final = 2  # reports decoded and parsed at the same time (in threads, off the event loop)


def _check_non_negative(value: Any) -> str | None:
    return None if value >= 0 else "expected a number of 0 or more"


def _check_optional_hostname(value: Any) -> str | None:
    return None if not value else checks.check_hostname(value)


@dataclass(frozen=True, slots=True)
class TlsRptConfig:
    enabled: bool = setting(True, desc="Collect TLS outcomes and send reports.")
    organization_name: str = setting("", desc="organization-name in reports we send; default: the submitter.")
    contact_info: str = setting("", desc="contact-info in reports we send (a mailbox or URL); default: the From.")
    submitter: str = setting(
        "", desc="Submitter domain (TLS-Report-Submitter); default: server.hostname.", check=_check_optional_hostname
    )
    mail_from: str = setting(
        "", desc="From and envelope sender of mailed reports; default: tlsrpt-noreply@<submitter>."
    )
    dkim_selector: str = setting("", desc="DKIM selector for mailed reports (publish the key with s=tlsrpt).")
    dkim_domain: str = setting("", desc="DKIM d= domain; default: the submitter.")
    dkim_key_file: str = setting("", desc="RSA private key (PEM) for DKIM; without it no report is mailed.")
    send_window_hours: float = setting(
        4.0,
        desc="Reports go out after a random delay of up to this many hours past midnight UTC.",
        check=_check_non_negative,
    )
    flush_interval: float = setting(
        5.0,
        desc="Seconds between writes of the counts to disk (a crash loses at most this much).",
        check=checks.check_positive,
    )
    retention_days: int = setting(
        30, desc="Days counts, sent reports and received reports are kept.", check=checks.check_positive
    )
    https_ca_file: str = setting("", desc="CA bundle for HTTPS report endpoints; default: the system store.")
    receive_mailbox: str = setting("", desc="Our rua mailbox: reports mailed to it are parsed and kept.")
    receive_deliver: bool = setting(True, desc="Still deliver report mails to receive_mailbox (false: drop them).")
    receive_require_dkim: bool = setting(
        True, desc="Keep mailed reports only with a valid DKIM signature (RFC 8460 5.3)."
    )
    receive_listen: str = setting(
        "", desc='HTTPS endpoint for reports, "host:port"; unset: off.', check=checks.check_optional_hostport
    )
    receive_cert: str = setting("", desc="Certificate chain (PEM) of the HTTPS endpoint.")
    receive_key: str = setting("", desc="Private key (PEM) of the HTTPS endpoint.")
    receive_max_bytes: int = setting(
        1048576,
        desc="Largest report accepted, in bytes, as sent and once decompressed (HTTPS: 413 beyond).",
        check=checks.check_positive,
    )
    receive_max_policies: int = setting(
        100, desc="Most policies in one received report; more: refused (HTTPS: 413).", check=checks.check_positive
    )
    receive_max_failure_details: int = setting(
        1000,
        desc="Most failure-details in one received report, all policies together; more: refused (HTTPS: 413).",
        check=checks.check_positive,
    )
    receive_reports_per_hour: int = setting(
        60,
        desc="POSTs one client address may make to the HTTPS endpoint per hour (in bursts of as many); more: "
        "429 with Retry-After.",
        check=checks.check_positive,
    )
    receive_store_limit: int = setting(
        268435456,
        desc="Size in bytes of the TLS-RPT store (tlsrpt.sqlite3 and its WAL) past which received reports are "
        "refused (HTTPS: 507) until retention makes room; our own counts are still kept.",
        check=checks.check_positive,
    )
    receive_retention_days: int = setting(
        30, desc="Days received reports (their counts) are kept.", check=checks.check_positive
    )


# -- storage ------------------------------------------------------------------------------------------------------

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


class _Db:
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


def _write_counts(
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


def _load_aggregates(conn: Any, day: str, domain: str) -> list[PolicyAggregate]:
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


def _local_totals(
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


def _publish_totals(conn: Any, node: str, totals: Sequence[tuple[tuple[Any, ...], list[tuple[Any, ...]]]]) -> None:
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


def _update_delivery(conn: sqlite3.Connection, params: tuple[Any, ...]) -> None:
    conn.execute(
        "UPDATE delivery SET state = ?, attempts = ?, next_attempt = ?, last_error = ?, done_at = ?"
        " WHERE day = ? AND domain = ? AND scope = ? AND uri = ?",
        params,
    )


def _report_state(conn: sqlite3.Connection, day: str, domain: str) -> tuple[Any, ...] | None:
    row = conn.execute("SELECT state FROM report WHERE day = ? AND domain = ? AND scope = ''", (day, domain)).fetchone()
    return None if row is None else tuple(row)


def _backoff(attempts: int) -> float:
    return float(min(RETRY_MAX, RETRY_FIRST * 2 ** max(0, attempts - 1)))


def _today(now: float) -> str:
    return rpt.utc_day(now)


# -- the service ------------------------------------------------------------------------------------------------

EventFn = Callable[..., Awaitable[None]]


async def _no_event(_kind: str, value: float = 1.0, **labels: str) -> None:
    return None


@dataclass(frozen=True, slots=True)
class SendResult:
    """What one delivery attempt of a report did."""

    uri: str
    method: str  # "https" | "mailto"
    ok: bool
    detail: str = ""


def _load_dkim_key(path: Path) -> bytes:
    """PEM in any form cryptography reads -> the PKCS#1 PEM dkimpy signs with (RSA only). A key file others may
    read is used, with a warning (it is the operator's file)."""
    mode = path.stat().st_mode
    if mode & 0o077:
        log.warning("TLS-RPT: DKIM key %s is group- or world-accessible (mode %04o); chmod 600 it", path, mode & 0o7777)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path}: DKIM key must be RSA (ed25519 signing needs PyNaCl)")
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def dkim_sign(message: bytes, *, selector: str, domain: str, key_pem: bytes) -> bytes:
    """``message`` with a DKIM-Signature prepended (relaxed/relaxed, no ``l=``, the RFC 8460 headers signed)."""
    present = {h.lower() for h in rpt.DKIM_SIGNED_HEADERS if rpt.parse_message_headers(message).get(h) is not None}
    include = [h for h in rpt.DKIM_SIGNED_HEADERS if h.lower() in present]
    sig = dkim.sign(
        message,
        selector.encode("ascii"),
        domain.encode("ascii"),
        key_pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[h.encode("ascii") for h in include],
        tlsrpt=True,
    )
    return bytes(sig) + message


_DKIM_TAG = re.compile(r"(?:^|;)\s*([a-z]+)\s*=\s*([^;]*)", re.IGNORECASE)


class TlsRptService:
    """Aggregation, scheduling, sending and receiving; everything the plugin and the CLI share. Inject the clock,
    resolver, queue, event sink and random source (tests do)."""

    def __init__(
        self,
        conf: TlsRptConfig,
        *,
        state_dir: Path,
        submitter: str,
        base_dir: Path = Path("."),
        clock: Callable[[], float] = time.time,
        resolver: Resolver | None = None,
        queue: QueueStore | None = None,
        wakeup: Callable[[], None] = lambda: None,
        emit: EventFn = _no_event,
        rng: random.Random | None = None,
        shared: SharedDb | None = None,
    ) -> None:
        self.conf = conf
        self.submitter = submitter.rstrip(".").lower()
        self.base_dir = base_dir
        self.clock = clock
        self.resolver = resolver
        self.queue = queue
        self.wakeup = wakeup
        self.emit = emit
        self.rng = rng or random.SystemRandom()
        # ``local``: this node's own SQLite file, where counts are written first; ``db``: where reports, deliveries
        # and received reports live and reports are built from — the same file alone, PostgreSQL in a cluster
        self.local = _Db(Path(state_dir) / DB_NAME)
        self.shared = shared
        self.db: _Db | SharedDb = shared if shared is not None else self.local
        # (day, domain) pairs to publish to the cluster store; None: every recent day (at start)
        self._dirty: set[tuple[str, str]] | None = None
        self._publish_failed = False
        self._counts: dict[PolicyKey, list[int]] = {}
        self._failures: dict[tuple[PolicyKey, FailureKey], int] = {}
        self._flush_lock = asyncio.Lock()
        self._receive_tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._dkim_key: bytes | None = None
        self._last_purge = 0.0
        # queue ids of the reports we mailed: the sessions delivering them are not counted (RFC 8460 §5.3)
        self._report_messages: set[str] = set()
        self._parsers = asyncio.Semaphore(PARSERS)
        self._rates: dict[str, tuple[float, float]] = {}  # client address -> (tokens, when)

    # -- names -----------------------------------------------------------------------------------------------

    @property
    def organization(self) -> str:
        return self.conf.organization_name or self.submitter

    @property
    def from_addr(self) -> str:
        return self.conf.mail_from or f"tlsrpt-noreply@{self.submitter}"

    @property
    def contact(self) -> str:
        return self.conf.contact_info or self.from_addr

    def path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.base_dir / p

    # -- collection ------------------------------------------------------------------------------------------

    def record(self, outcome: TlsOutcome) -> None:
        """Count one outcome in memory (no I/O: this runs on the delivery path). The session that delivers one of
        our own mailed reports is not counted (RFC 8460 §5.3)."""
        if outcome.queue_id is not None and outcome.queue_id in self._report_messages:
            return
        key, failure = rpt.keys_for_outcome(outcome, at=self.clock())
        if not key.domain:
            return
        counts = self._counts.setdefault(key, [0, 0])
        if failure is None:
            counts[0] += 1
        else:
            counts[1] += 1
            self._failures[(key, failure)] = self._failures.get((key, failure), 0) + 1

    @property
    def pending(self) -> int:
        return sum(a + b for a, b in self._counts.values())

    async def flush(self) -> None:
        """Write the counts gathered so far in one transaction; on failure keep them for the next flush. In a
        cluster, then publish this node's totals of the (day, domain) pairs that changed (see :meth:`publish`)."""
        async with self._flush_lock:
            if self._counts:
                counts, failures = self._counts, self._failures
                self._counts, self._failures = {}, {}
                try:
                    await self.local.write(lambda c: _write_counts(c, counts, failures))
                except Exception:
                    for key, (ok, bad) in counts.items():
                        cur = self._counts.setdefault(key, [0, 0])
                        cur[0] += ok
                        cur[1] += bad
                    for fkey, n in failures.items():
                        self._failures[fkey] = self._failures.get(fkey, 0) + n
                    raise
                if self._dirty is not None:
                    self._dirty.update((key.day, key.domain) for key in counts)
            await self._publish()

    async def _publish(self) -> None:
        """Cluster mode: this node's totals of the changed (day, domain) pairs (at start: of every day still
        reportable) into the shared store. Idempotent (absolute totals keyed by node), so after a failure the same
        pairs are simply published again; until then they wait in the local file, which survives a restart."""
        if self.shared is None or self._dirty == set():
            return
        from mxgate.core.cluster_db import ClusterUnavailable

        changed = None if self._dirty is None else set(self._dirty)
        oldest = rpt.utc_day(self.clock() - (CATCH_UP_DAYS + 1) * DAY)
        totals = await self.local.run(lambda c: _local_totals(c, changed, oldest))
        shared = self.shared
        try:
            await shared.write(lambda c: _publish_totals(c, shared.node, totals))
        except ClusterUnavailable as exc:
            if not self._publish_failed:
                log.warning("TLS-RPT counts kept locally until the cluster database returns", extra={"error": str(exc)})
            self._publish_failed = True
            return
        if self._publish_failed:
            log.info("TLS-RPT counts published to the cluster database again")
        self._publish_failed = False
        self._dirty = set() if changed is None else (self._dirty or set()) - changed

    # -- reading back ----------------------------------------------------------------------------------------

    async def domains(self, day: str) -> list[str]:
        await self.flush()
        rows = await self.db.run(
            lambda c: c.execute("SELECT DISTINCT domain FROM policy WHERE day = ? ORDER BY domain", (day,)).fetchall()
        )
        return [str(r[0]) for r in rows]

    async def aggregates(self, day: str, domain: str) -> list[PolicyAggregate]:
        await self.flush()
        return await self.db.run(lambda c: _load_aggregates(c, day, domain))

    def _report_id(self, day: str, domain: str) -> tuple[str, str]:
        uid = secrets.token_hex(6)
        return f"{day.replace('-', '')}.{domain}.{uid}@{self.submitter}", uid

    def render(self, day: str, policies: Sequence[PolicyAggregate], report_id: str) -> dict[str, Any]:
        return rpt.build_report(
            organization_name=self.organization,
            contact_info=self.contact,
            report_id=report_id,
            day=day,
            policies=policies,
        )

    async def preview(self, day: str, domain: str) -> dict[str, Any] | None:
        """The report for ``domain`` on ``day``: the stored one when it was built already, else built now."""
        stored = await self.db.run(
            lambda c: c.execute(
                "SELECT body FROM report WHERE day = ? AND domain = ? AND scope = '' AND body IS NOT NULL",
                (day, domain),
            ).fetchone()
        )
        if stored is not None:
            doc: dict[str, Any] = rpt.decode_report_bytes(bytes(stored[0]))
            return doc
        aggs = await self.aggregates(day, domain)
        if not aggs:
            return None
        return self.render(day, aggs, f"{day.replace('-', '')}.{domain}.preview@{self.submitter}")

    # -- rua discovery ---------------------------------------------------------------------------------------

    async def lookup_rua(self, domain: str) -> TlsRptRecord | str | None:
        """The one valid record at ``_smtp._tls.<domain>``; ``None`` when there is none (no reporting); a
        string saying why when the lookup failed (retry later: a failure is never "no record")."""
        if self.resolver is None:
            return "no resolver"
        answer = await self.resolver.resolve(f"_smtp._tls.{domain}", "TXT")
        if answer.is_failure:
            return f"{answer.kind}/{answer.status}: {answer.error or 'lookup failed'}"
        if not answer.exists:
            return None
        strings = [tuple(getattr(r, "strings", ())) for r in answer.records]
        return rpt.parse_tlsrpt_record(strings)

    # -- scheduling and building -----------------------------------------------------------------------------

    async def schedule(self, now: float) -> int:
        """Give every (full day, domain) with counts and no report yet a due time: midnight + grace + a random
        delay within the send window. Returns how many were scheduled."""
        await self.flush()
        today = _today(now)
        oldest = rpt.utc_day(now - CATCH_UP_DAYS * DAY)
        window = self.conf.send_window_hours * 3600.0

        def job(conn: Any) -> int:
            rows = conn.execute(
                "SELECT DISTINCT p.day, p.domain FROM policy p WHERE p.day < ? AND p.day >= ? AND NOT EXISTS"
                " (SELECT 1 FROM report r WHERE r.day = p.day AND r.domain = p.domain AND r.scope = '')",
                (today, oldest),
            ).fetchall()
            for day, domain in rows:
                due = rpt.day_bounds(day)[1] + 1 + GRACE_SECONDS + self.rng.uniform(0.0, window)
                conn.execute(
                    "INSERT INTO report (day, domain, scope, state, due_at) VALUES (?, ?, '', 'scheduled', ?)"
                    " ON CONFLICT (day, domain, scope) DO NOTHING",
                    (day, domain, due),
                )
            return len(rows)

        return await self.db.write(job)

    async def build(self, day: str, domain: str, now: float) -> str:
        """Build the day's report for ``domain`` and queue one delivery per rua URI (plus the DANE MX-host
        reports). Returns the report's new state: built | no-rua | empty | scheduled (DNS failed, retry) |
        dns-failed (gave up)."""
        aggs = await self.aggregates(day, domain)
        row = await self.db.run(
            lambda c: c.execute(
                "SELECT state, attempts, first_try FROM report WHERE day = ? AND domain = ? AND scope = ''",
                (day, domain),
            ).fetchone()
        )
        attempts = int(row[1]) + 1 if row else 1
        first_try = float(row[2]) if row and row[2] is not None else now
        if not aggs:
            await self._set_report(day, domain, "", "empty", now, attempts, first_try)
            return "empty"
        found = await self.lookup_rua(domain)
        if isinstance(found, str):
            if now + _backoff(attempts) > first_try + RETRY_WINDOW:
                await self._set_report(day, domain, "", "dns-failed", now, attempts, first_try, error=found)
                return "dns-failed"
            await self._set_report(day, domain, "", "scheduled", now + _backoff(attempts), attempts, first_try, found)
            return "scheduled"
        if found is None or not found.rua:
            await self._set_report(day, domain, "", "no-rua", now, attempts, first_try)
            return "no-rua"
        await self._store_built(day, domain, "", aggs, found, now, attempts, first_try)
        # DANE: the MX host's operator may publish its own _smtp._tls record (RFC 8460 3).
        seen = set(found.rua)
        for mx in sorted({h for a in aggs if a.key.policy_type == "tlsa" for h in a.key.mx_hosts}):
            if mx == domain:
                continue
            mx_found = await self.lookup_rua(mx)
            if not isinstance(mx_found, TlsRptRecord) or not mx_found.rua or set(mx_found.rua) <= seen:
                continue
            part = [a for a in aggs if a.key.policy_type == "tlsa" and mx in a.key.mx_hosts]
            await self._store_built(day, domain, mx, part, mx_found, now, 1, now)
        return "built"

    async def _set_report(
        self,
        day: str,
        domain: str,
        scope: str,
        state: str,
        due: float,
        attempts: int,
        first_try: float,
        error: str | None = None,
    ) -> None:
        await self.db.write(
            lambda c: c.execute(
                "INSERT INTO report (day, domain, scope, state, due_at, attempts, first_try, last_error)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, domain, scope) DO UPDATE SET"
                " state = excluded.state, due_at = excluded.due_at, attempts = excluded.attempts,"
                " first_try = excluded.first_try, last_error = excluded.last_error",
                (day, domain, scope, state, due, attempts, first_try, error),
            )
        )

    async def _store_built(
        self,
        day: str,
        domain: str,
        scope: str,
        aggs: Sequence[PolicyAggregate],
        record: TlsRptRecord,
        now: float,
        attempts: int,
        first_try: float,
    ) -> None:
        report_id, uid = self._report_id(day, scope or domain)
        body = rpt.gzip_report(self.render(day, aggs, report_id))
        filename = rpt.report_filename(self.submitter, domain, day, uid)

        def job(conn: Any) -> None:
            conn.execute(
                "INSERT INTO report (day, domain, scope, state, due_at, attempts, first_try, report_id, filename,"
                " body) VALUES (?, ?, ?, 'built', ?, ?, ?, ?, ?, ?) ON CONFLICT (day, domain, scope) DO UPDATE SET"
                " state = 'built', due_at = excluded.due_at, attempts = excluded.attempts, first_try ="
                " excluded.first_try, report_id = excluded.report_id, filename = excluded.filename,"
                " body = excluded.body, last_error = NULL",
                (day, domain, scope, now, attempts, first_try, report_id, filename, body),
            )
            for uri in record.rua:
                conn.execute(
                    "INSERT INTO delivery (day, domain, scope, uri, state, next_attempt, deadline)"
                    " VALUES (?, ?, ?, ?, 'pending', ?, ?) ON CONFLICT DO NOTHING",
                    (day, domain, scope, uri, now, now + RETRY_WINDOW),
                )

        await self.db.write(job)

    # -- sending ---------------------------------------------------------------------------------------------

    async def tick(self, now: float | None = None) -> None:
        """One round of the background loop: flush, schedule new days, build due reports, send due deliveries,
        purge old data. Bounded: at most ``MAX_DUE_PER_TICK`` reports and deliveries per round."""
        from mxgate.core.cluster_db import ClusterUnavailable

        now = self.clock() if now is None else now
        await self.flush()
        try:
            async with self.db.exclusive("tlsrpt-send") as ours:
                if ours:  # in a cluster, the one node holding the lock runs this round
                    await self._round(now)
        except ClusterUnavailable as exc:  # the next round, on whichever node then holds the lock, goes on
            log.info("TLS-RPT sending round skipped: cluster database unavailable", extra={"error": str(exc)})

    async def _round(self, now: float) -> None:
        await self.schedule(now)
        due = await self.db.run(
            lambda c: c.execute(
                "SELECT day, domain FROM report WHERE scope = '' AND state = 'scheduled' AND due_at <= ?"
                " ORDER BY due_at LIMIT ?",
                (now, MAX_DUE_PER_TICK),
            ).fetchall()
        )
        for day, domain in due:
            await self.build(day, domain, now)
        await self.send_due(now)
        if now - self._last_purge > 3600:
            self._last_purge = now
            await self.purge(now)
            if self.shared is not None:
                await self.purge(now, self.local)

    async def send_due(self, now: float, *, day: str | None = None, domain: str | None = None) -> list[SendResult]:
        """Attempt every pending delivery that is due (or, with ``day``, every pending one of that day)."""
        query = (
            "SELECT d.day, d.domain, d.scope, d.uri, d.attempts, d.deadline, r.report_id, r.filename, r.body"
            " FROM delivery d JOIN report r ON r.day = d.day AND r.domain = d.domain AND r.scope = d.scope"
            " WHERE d.state = 'pending'"
        )
        args: list[Any] = []
        if day is None:
            query += " AND d.next_attempt <= ?"
            args.append(now)
        else:
            query += " AND d.day = ?"
            args.append(day)
        if domain is not None:
            query += " AND d.domain = ?"
            args.append(domain)
        query += " ORDER BY d.next_attempt LIMIT ?"
        args.append(MAX_DUE_PER_TICK)
        rows = await self.db.run(lambda c: c.execute(query, args).fetchall())
        results = []
        for rday, rdomain, scope, uri, attempts, deadline, report_id, filename, body in rows:
            result = await self.deliver(
                uri, domain=rdomain, report_id=report_id, filename=filename, gz=bytes(body), now=now
            )
            results.append(result)
            tries = int(attempts) + 1
            if result.ok:
                state, nxt = "sent", now
            elif now + _backoff(tries) <= float(deadline):
                state, nxt = "pending", now + _backoff(tries)
            else:
                state, nxt = "failed", now
            params = (
                state,
                tries,
                nxt,
                None if state == "sent" else result.detail,
                now if state != "pending" else None,
                rday,
                rdomain,
                scope,
                uri,
            )
            await self.db.write(functools.partial(_update_delivery, params=params))
            label = "ok" if state == "sent" else ("retry" if state == "pending" else "failed")
            await self.emit("tlsrpt_sent", result=label, method=result.method)
            if state == "failed":
                log.warning("TLS report not delivered", extra={"uri": uri, "domain": rdomain, "error": result.detail})
        return results

    async def deliver(
        self, uri: str, *, domain: str, report_id: str, filename: str, gz: bytes, now: float
    ) -> SendResult:
        if uri.lower().startswith("https:"):
            return await self.post_https(uri, gz)
        return await self.send_mail(uri, domain=domain, report_id=report_id, filename=filename, gz=gz, now=now)

    def _https_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(
            cafile=str(self.path(self.conf.https_ca_file)) if self.conf.https_ca_file else None
        )
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    async def post_https(self, uri: str, gz: bytes) -> SendResult:
        """RFC 8460 5.4: POST the gzip report; any 2xx is success. Redirects are not followed."""
        try:
            async with httpx.AsyncClient(
                verify=self._https_context(), timeout=HTTP_TIMEOUT, follow_redirects=False
            ) as client:
                response = await client.post(uri, content=gz, headers={"Content-Type": rpt.MEDIA_TYPE_GZIP})
        except (httpx.HTTPError, ssl.SSLError, OSError) as exc:
            return SendResult(uri, "https", False, f"{type(exc).__name__}: {exc}"[:300])
        if 200 <= response.status_code < 300:
            return SendResult(uri, "https", True, str(response.status_code))
        return SendResult(uri, "https", False, f"HTTP {response.status_code}")

    def dkim_key(self) -> bytes | None:
        if self._dkim_key is None and self.conf.dkim_key_file and self.conf.dkim_selector:
            self._dkim_key = _load_dkim_key(self.path(self.conf.dkim_key_file))
        return self._dkim_key

    async def build_signed_mail(
        self, to_addrs: Sequence[str], *, domain: str, report_id: str, filename: str, gz: bytes, now: float
    ) -> bytes:
        key = await asyncio.to_thread(self.dkim_key)
        if key is None:
            raise ValueError("no DKIM key configured (dkim_selector, dkim_key_file): RFC 8460 reports must be signed")
        message = rpt.build_mail(
            from_addr=self.from_addr,
            to_addrs=to_addrs,
            policy_domain=domain,
            submitter=self.submitter,
            report_id=report_id,
            filename=filename,
            gz=gz,
            now=now,
        )
        selector, dkim_domain = self.conf.dkim_selector, self.conf.dkim_domain or self.submitter
        return await asyncio.to_thread(dkim_sign, message, selector=selector, domain=dkim_domain, key_pem=key)

    async def send_mail(
        self, uri: str, *, domain: str, report_id: str, filename: str, gz: bytes, now: float
    ) -> SendResult:
        """RFC 8460 5.3: a DKIM-signed multipart/report into our own queue (the queue retries delivery)."""
        addrs = TlsRptRecord((uri,)).mailto
        if not addrs:
            return SendResult(uri, "mailto", False, "not a mailto: URI")
        if self.queue is None:
            return SendResult(uri, "mailto", False, "no queue")
        try:
            data = await self.build_signed_mail(
                addrs, domain=domain, report_id=report_id, filename=filename, gz=gz, now=now
            )
            queue_id = await self.queue.put(
                self.from_addr, list(addrs), data, meta=[("origin", "tlsrpt"), ("tls_required", "no")], now=now
            )
        except Exception as exc:  # key missing, queue full...: retried like an HTTP failure
            return SendResult(uri, "mailto", False, f"{type(exc).__name__}: {exc}"[:300])
        self._report_messages.add(queue_id)

        def remember(conn: Any) -> None:
            conn.execute(
                "INSERT INTO report_message (queue_id, queued_at) VALUES (?, ?) ON CONFLICT DO NOTHING", (queue_id, now)
            )

        await self.db.write(remember)
        self.wakeup()
        return SendResult(uri, "mailto", True, "queued")

    async def send_day(self, day: str, *, domain: str | None = None, now: float | None = None) -> list[SendResult]:
        """``mxgate tlsrpt send``: build what is not built yet for ``day`` (ignoring the random delay), then
        attempt every delivery of that day that is not sent yet."""
        now = self.clock() if now is None else now
        if day >= _today(now):
            raise ValueError(f"{day} is not over yet (UTC); reports cover full days")
        await self.flush()
        async with self.db.exclusive("tlsrpt-send") as ours:  # in a cluster, never beside a node's sending round
            if not ours:
                raise ValueError("another node is in its TLS-RPT sending round; try again in a minute")
            return await self._send_day(day, domain, now)

    async def _send_day(self, day: str, domain: str | None, now: float) -> list[SendResult]:
        domains = [domain] if domain else await self.domains(day)
        for d in domains:
            state = await self.db.run(functools.partial(_report_state, day=day, domain=d))
            if state is None or state[0] in ("scheduled", "dns-failed"):
                await self.build(day, d, now)
        # the operator asks explicitly: deliveries that gave up get a fresh 24-hour window
        await self.db.write(
            lambda c: c.execute(
                "UPDATE delivery SET state = 'pending', next_attempt = ?, deadline = ? WHERE day = ? AND state ="
                " 'failed' AND (CAST(? AS TEXT) IS NULL OR domain = ?)",
                (now, now + RETRY_WINDOW, day, domain, domain),
            )
        )
        return await self.send_due(now, day=day, domain=domain)

    async def status(self, day: str) -> list[tuple[str, str, str, str, int, str]]:
        """(domain, scope, uri or report state, delivery state, attempts, last error) for ``day``."""
        rows = await self.db.run(
            lambda c: c.execute(
                "SELECT r.domain, r.scope, COALESCE(d.uri, ''), COALESCE(d.state, r.state),"
                " COALESCE(d.attempts, r.attempts), COALESCE(d.last_error, r.last_error, '') FROM report r"
                " LEFT JOIN delivery d ON d.day = r.day AND d.domain = r.domain AND d.scope = r.scope"
                " WHERE r.day = ? ORDER BY r.domain, r.scope, d.uri",
                (day,),
            ).fetchall()
        )
        return [(str(a), str(b), str(c), str(d), int(e), str(f)) for a, b, c, d, e, f in rows]

    async def purge(self, now: float, db: _Db | SharedDb | None = None) -> None:
        cut_day = rpt.utc_day(now - self.conf.retention_days * DAY)
        received_cut = now - self.conf.receive_retention_days * DAY

        def job(conn: Any) -> None:
            conn.execute("DELETE FROM failure WHERE policy_id IN (SELECT id FROM policy WHERE day < ?)", (cut_day,))
            conn.execute("DELETE FROM policy WHERE day < ?", (cut_day,))
            conn.execute("DELETE FROM delivery WHERE day < ?", (cut_day,))
            conn.execute("DELETE FROM report WHERE day < ?", (cut_day,))
            old = "SELECT id FROM received WHERE received_at < ?"
            conn.execute(f"DELETE FROM received_policy WHERE received_id IN ({old})", (received_cut,))
            conn.execute(f"DELETE FROM received_failure WHERE received_id IN ({old})", (received_cut,))
            conn.execute("DELETE FROM received WHERE received_at < ?", (received_cut,))
            conn.execute("DELETE FROM report_message WHERE queued_at < ?", (now - self.conf.retention_days * DAY,))

        await (db or self.db).write(job)
        await self.load_report_messages()

    async def load_report_messages(self) -> None:
        """The queue ids of our mailed reports still within retention (at start-up: reports queued before)."""
        from mxgate.core.cluster_db import ClusterUnavailable

        try:
            rows = await self.db.run(lambda c: c.execute("SELECT queue_id FROM report_message").fetchall())
        except ClusterUnavailable as exc:  # read again with the next purge; meanwhile this node's own are known
            log.warning("TLS-RPT: report message ids not loaded", extra={"error": str(exc)})
            return
        self._report_messages = {str(r[0]) for r in rows}

    # -- receiving -------------------------------------------------------------------------------------------

    async def store_received(self, report: ReceivedReport, *, method: str, dkim_state: str) -> bool:
        """Keep a parsed report's counts; ``False`` when the same reporter's report id was stored before.

        What an operator asks of received reports is who reports how many failures of which kind against
        which MX: the counts per policy and the failures summed per (policy domain, result type, receiving MX).
        Not the report itself, which was 80 times bigger in the store than uploaded."""
        now = self.clock()
        failures: dict[tuple[str, str, str], int] = {}
        for p in report.policies:
            for f in p.failures:
                key = (p.policy_domain, f.result_type, f.receiving_mx)
                failures[key] = failures.get(key, 0) + f.count

        def job(conn: Any) -> bool:
            row = conn.execute(
                'INSERT INTO received (received_at, method, organization, contact, report_id, start, "end",'
                " dkim, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?, '') ON CONFLICT (organization, report_id) DO NOTHING"
                " RETURNING id",
                (
                    now,
                    method,
                    report.organization,
                    report.contact,
                    report.report_id or f"none-{secrets.token_hex(8)}",
                    report.start,
                    report.end,
                    dkim_state,
                ),
            ).fetchone()
            if row is None:
                return False
            rid = row[0]
            conn.executemany(
                "INSERT INTO received_policy (received_id, policy_type, policy_domain, success, failure)"
                " VALUES (?, ?, ?, ?, ?)",
                [(rid, p.policy_type, p.policy_domain, p.success, p.failure) for p in report.policies],
            )
            conn.executemany(
                "INSERT INTO received_failure (received_id, policy_domain, result_type, receiving_mx,"
                " receiving_ip, count) VALUES (?, ?, ?, ?, '', ?)",
                [(rid, domain, rtype, mx, n) for (domain, rtype, mx), n in failures.items()],
            )
            return True

        return await self.db.write(job)

    def _read_report(self, data: bytes) -> ReceivedReport:
        """Decode (gzip or not), bound and parse: runs in a thread (a big report took 1.75 s of the loop)."""
        conf = self.conf
        document = rpt.decode_report_bytes(data, limit=min(conf.receive_max_bytes, rpt.MAX_REPORT_BYTES))
        rpt.check_report_bounds(
            document, max_policies=conf.receive_max_policies, max_failure_details=conf.receive_max_failure_details
        )
        return rpt.parse_received_report(document)

    async def accept_report(
        self, data: bytes, *, method: str, dkim_state: str = "none"
    ) -> tuple[str, ReceivedReport | None]:
        """Decode, bound, parse leniently (off the event loop), store the counts, count.

        Returns (result, report): result is ok | duplicate | invalid | too_large."""
        try:
            async with self._parsers:
                report = await asyncio.to_thread(self._read_report, data)
        except ReportTooLarge as exc:
            log.info("oversized TLS report refused", extra={"method": method, "error": str(exc)})
            await self.emit("tlsrpt_received", reporter_kind=method, result="too_large")
            return "too_large", None
        except ReportError as exc:
            log.info("unreadable TLS report received", extra={"method": method, "error": str(exc)})
            await self.emit("tlsrpt_received", reporter_kind=method, result="invalid")
            return "invalid", None
        if report.rejected:
            log.info(
                "TLS report policies left out",
                extra={"method": method, "report_id": report.report_id, "rejected": list(report.rejected)},
            )
        stored = await self.store_received(report, method=method, dkim_state=dkim_state)
        await self.emit("tlsrpt_received", reporter_kind=method, result="ok" if stored else "duplicate")
        if stored:
            await self.emit("tlsrpt_received_sessions", value=float(report.success), result="success")
            by_type: dict[str, int] = {}
            for p in report.policies:
                for f in p.failures:
                    rt = f.result_type if f.result_type in set(TlsRptResult) else "other"
                    by_type[rt] = by_type.get(rt, 0) + f.count
                listed = sum(f.count for f in p.failures)
                if p.failure > listed:
                    by_type["unspecified"] = by_type.get("unspecified", 0) + p.failure - listed
            for rt, n in sorted(by_type.items()):
                await self.emit("tlsrpt_received_sessions", value=float(n), result="failure", result_type=rt)
        return ("ok" if stored else "duplicate"), report

    async def reporter_failures(self, *, days: int = 7, top: int = TOP_REPORTERS) -> list[tuple[str, int, int]]:
        """(reporter organization, successful sessions, failed sessions) over the last ``days``, most failures
        first, at most ``top`` rows. Organization names are unbounded: query them, never use them as labels."""
        since = self.clock() - days * DAY
        rows = await self.db.run(
            lambda c: c.execute(
                "SELECT r.organization, SUM(p.success), SUM(p.failure) FROM received r JOIN received_policy p"
                " ON p.received_id = r.id WHERE r.received_at >= ? GROUP BY r.organization"
                " ORDER BY SUM(p.failure) DESC, r.organization LIMIT ?",
                (since, top),
            ).fetchall()
        )
        return [(str(o), int(s or 0), int(f or 0)) for o, s, f in rows]

    async def received_failure_types(self, *, days: int = 7) -> list[tuple[str, str, int]]:
        """(reporter organization, result type, failed sessions) over the last ``days``."""
        since = self.clock() - days * DAY
        rows = await self.db.run(
            lambda c: c.execute(
                "SELECT r.organization, f.result_type, SUM(f.count) FROM received r JOIN received_failure f"
                " ON f.received_id = r.id WHERE r.received_at >= ? GROUP BY r.organization, f.result_type"
                " ORDER BY SUM(f.count) DESC",
                (since,),
            ).fetchall()
        )
        return [(str(o), str(t), int(n or 0)) for o, t, n in rows]

    # mail

    def is_report_recipient(self, rcpts: Iterable[Address]) -> bool:
        box = self.conf.receive_mailbox.lower().removeprefix("mailto:")
        return bool(box) and any(str(r).lower() == box for r in rcpts)

    async def verify_dkim(self, data: bytes) -> str:
        """``pass`` | ``fail`` | ``none`` (no signature) | ``ignored`` (the key lacks ``s=tlsrpt``) |
        ``temperror`` (key lookup failed). The key is fetched with our own resolver (DNSSEC status respected: a
        bogus answer is no key), then dkimpy verifies in its strict TLS-RPT mode (``tlsrpt="strict"``): RFC 8460
        §3 has report signers publish their key with the service type ``tlsrpt``, and we ignore signatures made
        with keys for other services (``s=email``, ``s=*``, no ``s=``), as the RFC lets receivers do."""
        msg = rpt.parse_message_headers(data)
        sigs = msg.get_all("DKIM-Signature") or []
        if not sigs:
            return "none"
        tags = {k.lower(): "".join(v.split()) for k, v in _DKIM_TAG.findall(str(sigs[0]))}
        selector, domain = tags.get("s", ""), tags.get("d", "")
        if not selector or not domain or self.resolver is None:
            return "fail" if self.resolver is not None else "temperror"
        name = f"{selector}._domainkey.{domain}"
        answer = await self.resolver.resolve(name, "TXT")
        if answer.is_failure:
            return "temperror"
        txt = b"".join(b"".join(getattr(r, "strings", ())) for r in answer.records[:1])
        key_tags = {k.lower(): "".join(v.split()) for k, v in _DKIM_TAG.findall(txt.decode("ascii", "replace"))}
        services = key_tags.get("s", "*").lower().split(":")
        if "tlsrpt" not in services:
            log.info("DKIM key without s=tlsrpt: signature ignored", extra={"key": name, "s": key_tags.get("s", "")})
            return "ignored"
        if services != ["tlsrpt"]:
            # RFC 6376 §3.6.1 allows a list ("email:tlsrpt"); dkimpy's strict mode compares the whole tag
            txt = b";".join(
                b" s=tlsrpt" if tag.partition(b"=")[0].strip().lower() == b"s" else tag for tag in txt.split(b";")
            )

        def dnsfunc(_name: bytes, timeout: int = 5) -> bytes:
            return txt

        ok = await asyncio.to_thread(dkim.verify, data, dnsfunc=dnsfunc, tlsrpt="strict")
        return "pass" if ok else "fail"

    async def receive_mail(self, data: bytes) -> str:
        attachment = rpt.extract_report_from_mail(data)
        if attachment is None:
            await self.emit("tlsrpt_received", reporter_kind="mailto", result="invalid")
            return "invalid"
        dkim_state = await self.verify_dkim(data)
        if self.conf.receive_require_dkim and dkim_state != "pass":
            log.info("mailed TLS report ignored: no valid DKIM signature", extra={"dkim": dkim_state})
            await self.emit("tlsrpt_received", reporter_kind="mailto", result="unsigned")
            return "unsigned"
        result, _ = await self.accept_report(attachment, method="mailto", dkim_state=dkim_state)
        return result

    def receive_mail_later(self, data: bytes) -> None:
        """Parse off the SMTP transaction (the client gets its reply at once); awaited at shutdown."""
        task = asyncio.ensure_future(self._receive_guarded(data))
        self._receive_tasks.add(task)
        task.add_done_callback(self._receive_tasks.discard)

    async def _receive_guarded(self, data: bytes) -> None:
        try:
            await self.receive_mail(data)
        except Exception:
            log.exception("failed to process a mailed TLS report")

    # https

    async def start_receiver(self) -> asyncio.Server | None:
        if not self.conf.receive_listen:
            return None
        if not (self.conf.receive_cert and self.conf.receive_key):
            raise ValueError("[plugins.tlsrpt] receive_listen needs receive_cert and receive_key")
        from mxgate.core.tls import server_context

        ctx = server_context(self.path(self.conf.receive_cert), self.path(self.conf.receive_key))
        host, _, port = self.conf.receive_listen.rpartition(":")
        self._server = await asyncio.start_server(
            self._handle_http, host.strip("[]"), int(port), ssl=ctx, limit=RECEIVE_HEADER_LIMIT
        )
        return self._server

    @property
    def receiver_port(self) -> int | None:
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        try:
            async with asyncio.timeout(RECEIVE_TIMEOUT):
                status, text = await self._http_request(reader, client)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
            status, text = 400, "bad request"
        extra = ""
        if status in (429, 507):
            extra = f"Retry-After: {self._retry_after(client) if status == 429 else 3600}\r\n"
        try:
            body = (text + "\r\n").encode()
            writer.write(
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: text/plain\r\n{extra}"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _rate_ok(self, client: str) -> bool:
        """A token bucket per client address: ``receive_reports_per_hour`` POSTs, refilled evenly over the hour."""
        per_hour = float(self.conf.receive_reports_per_hour)
        now = time.monotonic()
        tokens, when = self._rates.pop(client, (per_hour, now))
        tokens = min(per_hour, tokens + (now - when) * per_hour / 3600.0)
        ok = tokens >= 1.0
        self._rates[client] = (tokens - 1.0 if ok else tokens, now)  # (re)inserted last: the newest
        while len(self._rates) > RATE_CLIENTS:
            del self._rates[next(iter(self._rates))]
        return ok

    def _retry_after(self, client: str) -> int:
        tokens, _ = self._rates.get(client, (0.0, 0.0))
        return max(1, int((1.0 - tokens) * 3600.0 / self.conf.receive_reports_per_hour) + 1)

    async def store_size(self) -> int:
        """Bytes of the store: the SQLite file with its WAL, or the cluster store's tables."""
        return await self.db.size()

    async def _http_request(self, reader: asyncio.StreamReader, client: str = "?") -> tuple[int, str]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, "bad request line"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, colon, value = line.partition(":")
                if not colon:
                    return 400, "bad header"
                headers[name.strip().lower()] = value.strip()
        if parts[0] != "POST":
            return 405, "POST reports here"
        if not self._rate_ok(client):
            await self.emit("tlsrpt_received", reporter_kind="https", result="rate_limited")
            return 429, f"too many reports from {client}; at most {self.conf.receive_reports_per_hour} an hour"
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return 411, "Content-Length required"
        length_text = headers.get("content-length", "")
        if not length_text.isdigit():
            return 411, "Content-Length required"
        length = int(length_text)
        if length > self.conf.receive_max_bytes:
            return 413, f"report too large: at most {self.conf.receive_max_bytes} bytes"
        if await self.store_size() >= self.conf.receive_store_limit:
            log.warning(
                "TLS-RPT store full: refusing received reports",
                extra={"limit": self.conf.receive_store_limit, "retention_days": self.conf.receive_retention_days},
            )
            await self.emit("tlsrpt_received", reporter_kind="https", result="store_full")
            return 507, "report store full, try again later"
        data = await reader.readexactly(length)
        result, _ = await self.accept_report(data, method="https")
        if result == "invalid":
            return 400, "not a TLS report"
        if result == "too_large":
            return 413, (
                f"report too large: at most {self.conf.receive_max_bytes} bytes decompressed, "
                f"{self.conf.receive_max_policies} policies and {self.conf.receive_max_failure_details} "
                "failure-details"
            )
        return 200, result

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def run_forever(self) -> None:
        """The background loop: flush every ``flush_interval``, a sending round every ``TICK_SECONDS``."""
        last_tick = 0.0
        while True:
            await asyncio.sleep(self.conf.flush_interval)
            try:
                await self.flush()
                if time.monotonic() - last_tick >= TICK_SECONDS:
                    last_tick = time.monotonic()
                    await self.tick()
            except Exception:
                log.exception("TLS-RPT background round failed")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
            self._server = None
        if self._receive_tasks:
            await asyncio.wait(set(self._receive_tasks), timeout=10.0)
        with contextlib.suppress(Exception):
            await self.flush()
        await self.local.close()
        if self.shared is not None:
            await self.shared.close()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Payload Too Large",
    429: "Too Many Requests",
    507: "Insufficient Storage",
}


# -- the plugin ---------------------------------------------------------------------------------------------------


class TlsRptPlugin:
    """TLS-RPT (RFC 8460): collects TLS outcomes, sends daily reports, reads the reports others send us."""

    name = "tlsrpt"
    priority = 90

    def __init__(self) -> None:
        self.service: TlsRptService | None = None
        self.runtime: Runtime | None = None

    @hookimpl
    def mxgate_lifecycle_register_config(self, registry: ConfigRegistry) -> None:
        registry.add_section(self.name, TlsRptConfig, owner=self.name)

    @hookimpl
    def mxgate_lifecycle_register_migrations(self, migrations: MigrationRegistry) -> None:
        migrations.add("tlsrpt", 1, "TLS-RPT counts per node, reports, deliveries, received reports", CLUSTER_SCHEMA)

    @hookimpl
    async def mxgate_lifecycle_on_startup(self, runtime: Runtime) -> None:
        conf = runtime.config.plugin_section(self.name, TlsRptConfig)
        self.runtime = runtime
        if not conf.enabled:
            return
        service = TlsRptService(
            conf,
            state_dir=runtime.state_dir,
            submitter=conf.submitter or runtime.config.server.hostname,
            base_dir=Path(runtime.config.base_dir),
            clock=runtime.clock,
            resolver=runtime.resolver,
            queue=runtime.queue,
            wakeup=runtime.wakeup,
            emit=runtime.hooks.on_event,
            shared=runtime.cluster.database("tlsrpt", schema="tlsrpt") if runtime.cluster is not None else None,
        )
        self.service = service
        if runtime.role != ROLE_MAIN:
            return  # a receive worker only takes in mailed reports (receive_on_end_of_data); the store is shared
        if conf.dkim_key_file and conf.dkim_selector:
            await asyncio.to_thread(service.dkim_key)  # a bad key is a start-up error, not a silent gap
        else:
            log.warning("TLS-RPT: no DKIM key configured; reports to mailto: addresses will not be sent")
        await service.load_report_messages()
        await service.start_receiver()
        runtime.tasks.append(asyncio.ensure_future(service.run_forever()))

    @hookimpl
    async def mxgate_lifecycle_on_shutdown(self) -> None:
        if self.service is not None:
            await self.service.close()
            self.service = None

    @hookimpl
    def mxgate_delivery_on_tls_outcome(self, outcome: TlsOutcome) -> None:
        if self.service is not None:
            self.service.record(outcome)

    @hookimpl
    def mxgate_receive_on_end_of_data(self, envelope: Envelope, message: IncomingMessage) -> Verdict | None:
        service = self.service
        if service is not None and service.is_report_recipient(envelope.rcpt_tos):
            service.receive_mail_later(message.data)
        return None

    @hookimpl
    def mxgate_categorizer_resolve_recipient(self, recipient: Address) -> Sequence[Address] | None:
        service = self.service
        if service is not None and not service.conf.receive_deliver and service.is_report_recipient([recipient]):
            return []
        return None

    @hookimpl
    def mxgate_lifecycle_register_commands(self, subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        from mxgate.core.commands import add_config_arg

        p = subparsers.add_parser("tlsrpt", help="TLS-RPT (RFC 8460): show and send reports, list received ones")
        sub = p.add_subparsers(dest="tlsrpt_command", required=True)
        show = sub.add_parser("show", help="print the report that would be sent for a day")
        add_config_arg(show)
        show.add_argument("--date", help="UTC day YYYY-MM-DD (default: yesterday)")
        show.add_argument("--domain", help="policy domain (default: every domain with data)")
        show.set_defaults(func=_cmd_show)
        send = sub.add_parser("send", help="send a day's reports now")
        add_config_arg(send)
        send.add_argument("--date", required=True, help="UTC day YYYY-MM-DD (a full day in the past)")
        send.add_argument("--domain", help="only this policy domain")
        send.set_defaults(func=_cmd_send)
        received = sub.add_parser("received", help="reports others sent us: failures per reporter")
        add_config_arg(received)
        received.add_argument("--days", type=int, default=7, help="look back this many days (default 7)")
        received.set_defaults(func=_cmd_received)


# -- CLI ------------------------------------------------------------------------------------------------------------


def _cli_service(args: argparse.Namespace, *, with_network: bool) -> tuple[TlsRptService, Any]:
    from mxgate.core.commands import load_from_args

    config, _plugins = load_from_args(args)
    conf = config.plugin_section("tlsrpt", TlsRptConfig)
    resolver = None
    if with_network:
        from mxgate.core.dns import resolver_from_config

        resolver = resolver_from_config(config.dns)
    shared = None
    if config.cluster.database:  # the cluster's reports, whichever node asks
        from mxgate.core.cluster_db import SharedDb

        cl = config.cluster
        shared = SharedDb(cl.database, name="tlsrpt", node=cl.node, connect_timeout=cl.connect_timeout, schema="tlsrpt")
    service = TlsRptService(
        conf,
        state_dir=config.state_path,
        submitter=conf.submitter or config.server.hostname,
        base_dir=Path(config.base_dir),
        resolver=resolver,
        shared=shared,
    )
    return service, config


def _day_arg(value: str | None) -> str:
    if value is None:
        return rpt.utc_day(time.time() - DAY)
    import datetime as _dt

    return _dt.date.fromisoformat(value).isoformat()


def _cmd_show(args: argparse.Namespace) -> int:
    service, _config = _cli_service(args, with_network=False)
    day = _day_arg(args.date)

    async def run() -> int:
        try:
            domains = [args.domain.lower().rstrip(".")] if args.domain else await service.domains(day)
            shown = 0
            for domain in domains:
                doc = await service.preview(day, domain)
                if doc is None:
                    continue
                print(f"# {rpt.report_filename(service.submitter, domain, day)}")
                print(json.dumps(doc, indent=2))
                shown += 1
            if not shown:
                print(f"no TLS outcomes recorded for {day}", file=sys.stderr)
            return 0
        finally:
            await service.close()

    return asyncio.run(run())


def _cmd_send(args: argparse.Namespace) -> int:
    service, config = _cli_service(args, with_network=True)
    day = _day_arg(args.date)

    async def run() -> int:
        from mxgate.core.queue.store import QueueStore

        service.queue = await QueueStore.open(config.state_path, release_leases=False)
        only = args.domain.lower().rstrip(".") if args.domain else None
        try:
            await service.send_day(day, domain=only)
            rows = [r for r in await service.status(day) if only is None or r[0] == only]
            if not rows:
                print(f"no TLS outcomes recorded for {day}", file=sys.stderr)
            for domain, scope, uri, state, attempts, error in rows:
                where = f"{domain}" + (f" (MX {scope})" if scope else "")
                print(f"{where}  {uri or '-'}  {state}  attempts={attempts}  {error}".rstrip())
            # exit 1 when something is still owed: a delivery not done, or a record lookup that failed
            return 0 if all(r[3] in ("sent", "no-rua", "empty") for r in rows) else 1
        finally:
            await service.queue.close()
            await service.close()

    try:
        return asyncio.run(run())
    except ValueError as exc:
        print(f"mxgate: {exc}", file=sys.stderr)
        return 2


def _cmd_received(args: argparse.Namespace) -> int:
    service, _config = _cli_service(args, with_network=False)

    async def run() -> int:
        try:
            rows = await service.reporter_failures(days=args.days, top=1000)
            print(f"{'REPORTER':40}  {'SUCCESSFUL':>10}  {'FAILED':>8}")
            for org, ok, bad in rows:
                print(f"{org[:40]:40}  {ok:>10}  {bad:>8}")
            return 0
        finally:
            await service.close()

    return asyncio.run(run())
