"""The durable queue store: SQLite in WAL mode, embedded, no server.

Durability and group commit
---------------------------
Every write goes to ONE writer thread that owns its own SQLite connection. The writer takes every job that
is pending (up to a batch limit), runs them in ONE ``BEGIN IMMEDIATE`` transaction, each job inside its own
savepoint, commits, and only then resolves the waiting asyncio futures with ``loop.call_soon_threadsafe``.
A batch that holds a *durable* job (:meth:`QueueStore.put`, the administrative changes) commits with
``PRAGMA synchronous=FULL`` (WAL mode: the commit fsyncs the WAL); so :meth:`QueueStore.put` returns only after
the message is on disk, and concurrent sessions share one fsync. The scheduler's bookkeeping (leases, results)
commits with ``synchronous=NORMAL``: no fsync of its own, but it survives a crash of the process (the WAL is in
the OS's page cache), and the next durable commit fsyncs it too. Only a power failure can undo such a commit,
and that undoes nothing a sender was promised: a lost "delivered" record means one more delivery (at least
once, never lost), a lost lease means nothing (leases are released at start-up). Reads run on a second thread
with its own connection (WAL readers never block the writer). Blocking SQLite work never runs on the event
loop.

A job that fails rolls back its own savepoint and gets its exception; the rest of the batch still commits.
If SQLite abandons the whole transaction (disk full can do that) or the commit fails, every job of the batch
fails. No job is ever reported done unless its transaction committed.

Finished messages (tombstones)
------------------------------
When every recipient of a message is final (delivered or failed) the message is *finished*: its body is
deleted at once, and a tombstone stays behind -- envelope, per-recipient state, attempts, and the message's
header section (kept from ``put()`` for DSNs and ``queue show``). Tombstones are not listed, leased or
counted as queued; :meth:`QueueStore.purge_finished` deletes those finished before a cut-off (the gateway
calls it with its retention time; the store itself never deletes on a timer).

Several processes
-----------------
The CLI can open the same state directory while the gateway runs (WAL, ``busy_timeout``). Only the gateway,
the one scheduler of a state directory, should open with ``release_leases=True`` (the default): on open it
releases the leases left by a previous run, so attempts that were in flight when it stopped become due
again. A second process (the CLI) opens with ``release_leases=False`` and leaves the running gateway's
leases alone.

Errors
------
``sqlite3`` errors never leave this module: disk full (``SQLITE_FULL``, "database or disk is full") becomes
:class:`QueueFullError` (the receive side answers ``452 4.3.1``), everything else :class:`QueueError`.
SQLite's transactions guarantee that a failed write leaves the store as it was.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import copy
import json
import math
import os
import queue
import secrets
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar

from mxgate.core.errors import MxgateError
from mxgate.core.files import SQLITE_COMPANIONS, private_file
from mxgate.core.messages import (
    NO_OPTIONS,
    MessageOptions,
    NewRecipient,
    QueuedMessage,
    QueuedRecipient,
    RecipientStatus,
)
from mxgate.core.metadata import NO_META, MessageMeta, MetaInput
from mxgate.core.model import DsnRet

__all__ = [
    "Attempt",
    "MessageNotFoundError",
    "MessageOptions",
    "NewRecipient",
    "QueueCounts",
    "QueueError",
    "QueueFullError",
    "QueueStore",
    "QueuedMessage",
    "QueuedRecipient",
    "RecipientResult",
    "RecipientStatus",
    "StoreStats",
]

T = TypeVar("T")

DB_NAME: Final = "queue.sqlite3"
# 2: RFC 3461 / RFC 8689 message columns; 3: queue_stats kept by triggers, messages_active/leased,
# recipients_due_new/retry
SCHEMA_VERSION: Final = 3
BUSY_TIMEOUT_MS: Final = 10_000
MAX_BATCH_JOBS: Final = 1_000
MAX_BATCH_BYTES: Final = 64 * 1024 * 1024
MAX_HEADER_BYTES: Final = 64 * 1024
_ID_RETRIES: Final = 5
_SQLITE_FULL: Final = 13


# -- errors ----------------------------------------------------------------------------------------------


class QueueError(MxgateError):
    """The queue store could not do what was asked (I/O error, store closed, corrupt store...)."""


class QueueFullError(QueueError):
    """The disk (or the database's size limit) is full; nothing was written. Answer ``452 4.3.1``."""


class MessageNotFoundError(QueueError, LookupError):
    """No such message (or, for :meth:`QueueStore.body`, its body is gone because it is finished)."""


def _map_error(exc: BaseException) -> BaseException:
    """Turn an sqlite3 error into ours; leave everything else alone."""
    if not isinstance(exc, sqlite3.Error):
        return exc
    code = getattr(exc, "sqlite_errorcode", None)
    if (isinstance(code, int) and code & 0xFF == _SQLITE_FULL) or "database or disk is full" in str(exc):
        err: QueueError = QueueFullError(f"queue store full: {exc}")
    else:
        err = QueueError(f"queue store error: {exc}")
    err.__cause__ = exc
    return err


# -- data model ------------------------------------------------------------------------------------------


_PENDING: Final = (RecipientStatus.QUEUED.value, RecipientStatus.DEFERRED.value)


@dataclass(frozen=True, slots=True)
class Attempt:
    at: float
    recipient: str
    result: str  # "delivered" | "deferred" | "failed"
    reply: str
    mx: str | None
    detail: str | None


class RecipientResult(NamedTuple):
    """One recipient's outcome for :meth:`QueueStore.record_results` (plain 4-tuples work too)."""

    recipient: str
    status: RecipientStatus
    reply: str
    next_attempt: float | None  # required for DEFERRED; ignored for final results


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """A summary of the queue for metrics and ``mxgate queue`` (active = not finished)."""

    messages: int  # active messages
    held: int  # active messages on hold
    leased: int  # active messages with a delivery attempt in flight
    deferred: int  # active messages with at least one deferred recipient
    finished: int  # tombstones not purged yet
    bytes: int  # total size of active messages
    recipients: tuple[tuple[RecipientStatus, int], ...]  # per status, active messages only; every status present
    oldest_age: float | None  # seconds since the oldest active message arrived; None if the queue is empty

    def recipients_in(self, status: RecipientStatus) -> int:
        return dict(self.recipients).get(status, 0)


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counters of this store object (this process) since it was opened."""

    commits: int  # transactions committed by the writer
    fsyncs: int  # commits that fsynced the WAL (those with a durable job)
    puts: int  # messages accepted by put()
    jobs: int  # write jobs that succeeded (puts included)
    failed_jobs: int
    largest_batch: int  # most jobs in one commit


# -- helpers ---------------------------------------------------------------------------------------------

_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class _IdGenerator:
    """Short, sortable, unique ids: 48-bit milliseconds + 32-bit counter seeded at random (ULID-like), base32.

    Monotonic within one generator: ids from the same millisecond increment the counter. Only the writer
    thread calls it, so it needs no lock.
    """

    def __init__(self) -> None:
        self._last_ms = -1
        self._counter = 0

    def next(self, now: float) -> str:
        ms = max(0, int(now * 1000)) & ((1 << 48) - 1)
        if ms <= self._last_ms:
            ms = self._last_ms
            self._counter += 1
            if self._counter >= 1 << 32:
                ms += 1
                self._counter = secrets.randbits(31)
        else:
            self._counter = secrets.randbits(31)  # top bit clear: room to increment
        self._last_ms = ms
        value = (ms << 32) | self._counter
        return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(75, -1, -5))


def _header_section(data: bytes) -> bytes:
    """The header section of a message (up to and including the blank line's first line end), capped."""
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    if ends:
        end = min(ends)
        head = data[: end + (2 if data[end : end + 2] == b"\r\n" else 1)]
    else:
        head = data
    return head[:MAX_HEADER_BYTES]


def _connect(path: Path, *, reader: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        conn.close()
        raise QueueError(f"{path}: cannot switch to WAL mode (got {mode!r})")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    if reader:
        conn.execute("PRAGMA query_only=1")
    return conn


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS messages (
    id           TEXT PRIMARY KEY,
    sender       TEXT NOT NULL,
    received_at  REAL NOT NULL,
    size         INTEGER NOT NULL,
    message_id   TEXT,
    held         INTEGER NOT NULL DEFAULT 0,
    meta         TEXT NOT NULL DEFAULT '[]',
    headers      BLOB NOT NULL DEFAULT x'',
    lease_until  REAL NOT NULL DEFAULT 0,
    finished_at  REAL,
    dsn_ret      TEXT,
    envid        TEXT,
    requiretls   INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bodies (
    id    TEXT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    data  BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS recipients (
    msg_id        TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    idx           INTEGER NOT NULL,
    address       TEXT NOT NULL,
    status        TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    route         TEXT,
    next_attempt  REAL NOT NULL,
    dsn_notify    TEXT,
    orcpt         TEXT,
    PRIMARY KEY (msg_id, idx),
    UNIQUE (msg_id, address)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS recipients_due ON recipients(next_attempt) WHERE status IN ('queued', 'deferred');
CREATE TABLE IF NOT EXISTS attempts (
    seq        INTEGER PRIMARY KEY,
    msg_id     TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    at         REAL NOT NULL,
    recipient  TEXT NOT NULL,
    result     TEXT NOT NULL,
    reply      TEXT NOT NULL,
    mx         TEXT,
    detail     TEXT
);
CREATE INDEX IF NOT EXISTS attempts_msg ON attempts(msg_id);
CREATE INDEX IF NOT EXISTS messages_finished ON messages(finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_active ON messages(id) WHERE finished_at IS NULL;
CREATE INDEX IF NOT EXISTS recipients_due_new ON recipients(next_attempt) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS recipients_due_retry ON recipients(next_attempt) WHERE status = 'deferred';
CREATE INDEX IF NOT EXISTS messages_leased ON messages(lease_until) WHERE lease_until > 0;
CREATE TABLE IF NOT EXISTS queue_stats (
    id             INTEGER PRIMARY KEY CHECK (id = 0),
    messages       INTEGER NOT NULL,
    held           INTEGER NOT NULL,
    bytes          INTEGER NOT NULL,
    finished       INTEGER NOT NULL,
    deferred_msgs  INTEGER NOT NULL,
    queued         INTEGER NOT NULL,
    deferred       INTEGER NOT NULL,
    delivered      INTEGER NOT NULL,
    failed         INTEGER NOT NULL
);
"""

# What QueueStore.counts reports, counted from the rows: a full scan of the queue. Run once when queue_stats is
# created (a new store, or one of schema 1) and by integrity_check; the triggers below keep the row current.
_RECOUNT: Final = """
SELECT
    (SELECT count(*) FROM messages WHERE finished_at IS NULL),
    (SELECT coalesce(sum(held), 0) FROM messages WHERE finished_at IS NULL),
    (SELECT coalesce(sum(size), 0) FROM messages WHERE finished_at IS NULL),
    (SELECT count(*) FROM messages WHERE finished_at IS NOT NULL),
    (SELECT count(DISTINCT r.msg_id) FROM recipients r JOIN messages m ON m.id = r.msg_id
        WHERE m.finished_at IS NULL AND r.status = 'deferred'),
    {per_status}
"""
_STATUS_COLUMNS: Final = ("queued", "deferred", "delivered", "failed")
_RECOUNT_SQL: Final = _RECOUNT.format(
    per_status=",\n    ".join(
        "(SELECT count(*) FROM recipients r JOIN messages m ON m.id = r.msg_id"
        f" WHERE m.finished_at IS NULL AND r.status = '{s}')"
        for s in _STATUS_COLUMNS
    )
)
_STATS_COLUMNS: Final = ("messages", "held", "bytes", "finished", "deferred_msgs", *_STATUS_COLUMNS)


def _status_delta(plus: str | None, minus: str | None) -> str:
    """SET clause: each status column + 1 where it is ``plus`` and - 1 where it is ``minus`` (SQL expressions);
    one assignment per column (SQLite keeps only the last of several)."""
    parts = []
    for c in _STATUS_COLUMNS:
        expr = c + (f" + ({plus} = '{c}')" if plus else "") + (f" - ({minus} = '{c}')" if minus else "")
        parts.append(f"{c} = {expr}")
    return ", ".join(parts)


# The only other deferred recipient of the same message, if any (the row itself excluded).
_OTHER_DEFERRED: Final = (
    "EXISTS (SELECT 1 FROM recipients o WHERE o.msg_id = {r}.msg_id AND o.status = 'deferred' AND o.idx != {r}.idx)"
)
_ACTIVE_PARENT: Final = "EXISTS (SELECT 1 FROM messages m WHERE m.id = {r}.msg_id AND m.finished_at IS NULL)"

# Counting as rows change, so that QueueStore.counts reads one row instead of scanning the queue (it is called
# every few seconds by the metrics while mail moves; a scan cost 0.25 s at 50,000 deferred messages). Recipient
# figures count active messages only, as QueueCounts says. Each trigger touches the message's own rows.
_TRIGGERS: Final = (
    """CREATE TRIGGER IF NOT EXISTS stats_message_insert AFTER INSERT ON messages BEGIN
        UPDATE queue_stats SET
            messages = messages + (new.finished_at IS NULL),
            held = held + (CASE WHEN new.finished_at IS NULL THEN new.held ELSE 0 END),
            bytes = bytes + (CASE WHEN new.finished_at IS NULL THEN new.size ELSE 0 END),
            finished = finished + (new.finished_at IS NOT NULL)
        WHERE id = 0;
    END""",
    """CREATE TRIGGER IF NOT EXISTS stats_message_held AFTER UPDATE OF held ON messages
        WHEN new.finished_at IS NULL AND old.finished_at IS NULL AND new.held != old.held BEGIN
        UPDATE queue_stats SET held = held + new.held - old.held WHERE id = 0;
    END""",
    """CREATE TRIGGER IF NOT EXISTS stats_message_finish AFTER UPDATE OF finished_at ON messages
        WHEN old.finished_at IS NULL AND new.finished_at IS NOT NULL BEGIN
        UPDATE queue_stats SET
            messages = messages - 1, held = held - old.held, bytes = bytes - old.size, finished = finished + 1,
            deferred_msgs = deferred_msgs
                - EXISTS (SELECT 1 FROM recipients r WHERE r.msg_id = new.id AND r.status = 'deferred'),
            """
    + ", ".join(
        f"{c} = {c} - (SELECT count(*) FROM recipients r WHERE r.msg_id = new.id AND r.status = '{c}')"
        for c in _STATUS_COLUMNS
    )
    + """
        WHERE id = 0;
    END""",
    """CREATE TRIGGER IF NOT EXISTS stats_message_delete AFTER DELETE ON messages BEGIN
        UPDATE queue_stats SET
            messages = messages - (old.finished_at IS NULL),
            held = held - (CASE WHEN old.finished_at IS NULL THEN old.held ELSE 0 END),
            bytes = bytes - (CASE WHEN old.finished_at IS NULL THEN old.size ELSE 0 END),
            finished = finished - (old.finished_at IS NOT NULL)
        WHERE id = 0;
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS stats_recipient_insert AFTER INSERT ON recipients
        WHEN {_ACTIVE_PARENT.format(r="new")} BEGIN
        UPDATE queue_stats SET {_status_delta("new.status", None)},
            deferred_msgs = deferred_msgs + (new.status = 'deferred' AND NOT {_OTHER_DEFERRED.format(r="new")})
        WHERE id = 0;
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS stats_recipient_status AFTER UPDATE OF status ON recipients
        WHEN new.status != old.status AND {_ACTIVE_PARENT.format(r="new")} BEGIN
        UPDATE queue_stats SET {_status_delta("new.status", "old.status")},
            deferred_msgs = deferred_msgs
                + (new.status = 'deferred' AND NOT {_OTHER_DEFERRED.format(r="new")})
                - (old.status = 'deferred' AND NOT {_OTHER_DEFERRED.format(r="new")})
        WHERE id = 0;
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS stats_recipient_delete AFTER DELETE ON recipients
        WHEN {_ACTIVE_PARENT.format(r="old")} BEGIN
        UPDATE queue_stats SET {_status_delta(None, "old.status")},
            deferred_msgs = deferred_msgs - (old.status = 'deferred' AND NOT {_OTHER_DEFERRED.format(r="old")})
        WHERE id = 0;
    END""",
)


# Schema changes of an existing store, by the version they lead to (a new store gets _SCHEMA as it is).
_MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    2: (  # RFC 3461 RET/ENVID and RFC 8689 REQUIRETLS as columns
        "ALTER TABLE messages ADD COLUMN dsn_ret TEXT",
        "ALTER TABLE messages ADD COLUMN envid TEXT",
        "ALTER TABLE messages ADD COLUMN requiretls INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE recipients ADD COLUMN dsn_notify TEXT",
        "ALTER TABLE recipients ADD COLUMN orcpt TEXT",
    ),
}


def _recipient_from_row(row: sqlite3.Row) -> QueuedRecipient:
    return QueuedRecipient(
        address=row["address"],
        status=RecipientStatus(row["status"]),
        attempts=row["attempts"],
        last_error=row["last_error"],
        route=row["route"],
        next_attempt=row["next_attempt"],
        dsn_notify=row["dsn_notify"],
        orcpt=row["orcpt"],
    )


def _meta_column(meta: MessageMeta) -> str:
    """The ``meta`` column: a JSON list of ``[key, value]`` string pairs (the format of every schema version)."""
    return json.dumps([list(item) for item in meta.to_pairs()])


def _meta_from_column(text: str) -> MessageMeta:
    return MessageMeta.from_pairs((str(k), str(v)) for k, v in json.loads(text)) if text != "[]" else NO_META


def _message_from_row(row: sqlite3.Row, recipients: tuple[QueuedRecipient, ...]) -> QueuedMessage:
    return QueuedMessage(
        id=row["id"],
        sender=row["sender"],
        recipients=recipients,
        received_at=row["received_at"],
        size=row["size"],
        message_id=row["message_id"],
        held=bool(row["held"]),
        meta=_meta_from_column(row["meta"]),
        leased_until=row["lease_until"],
        finished_at=row["finished_at"],
        options=(
            MessageOptions(DsnRet(row["dsn_ret"]) if row["dsn_ret"] else None, row["envid"], bool(row["requiretls"]))
            if row["dsn_ret"] or row["envid"] or row["requiretls"]
            else NO_OPTIONS
        ),
    )


_MSG_COLS: Final = (
    "id, sender, received_at, size, message_id, held, meta, lease_until, finished_at, dsn_ret, envid, requiretls"
)


def _load(conn: sqlite3.Connection, ids: Sequence[str]) -> list[QueuedMessage]:
    """Messages by id, in the order given (ids that do not exist are skipped)."""
    rows: dict[str, sqlite3.Row] = {}
    rcpts: dict[str, list[QueuedRecipient]] = {}
    for start in range(0, len(ids), 500):
        chunk = list(ids[start : start + 500])
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(f"SELECT {_MSG_COLS} FROM messages WHERE id IN ({marks})", chunk).fetchall():
            rows[row["id"]] = row
        for row in conn.execute(
            f"SELECT * FROM recipients WHERE msg_id IN ({marks}) ORDER BY msg_id, idx", chunk
        ).fetchall():
            rcpts.setdefault(row["msg_id"], []).append(_recipient_from_row(row))
    return [_message_from_row(rows[i], tuple(rcpts.get(i, ()))) for i in ids if i in rows]


def _applied(
    msg: QueuedMessage,
    results: Sequence[RecipientResult],
    routes: Mapping[str, str],
    *,
    finished_at: float | None,
) -> QueuedMessage:
    """``msg`` as :meth:`QueueStore.record_results` leaves it (what a read would give back). Built field by field:
    ``dataclasses.replace`` costs several times more, and this runs for every delivered message."""
    by_rcpt = {r.recipient: r for r in results}
    recipients = []
    for r in msg.recipients:
        res = by_rcpt.get(r.address)
        route = routes.get(r.address, r.route)
        if res is None:
            status, attempts, last_error, next_attempt = r.status, r.attempts, r.last_error, r.next_attempt
        else:
            status, attempts = res.status, r.attempts + 1
            last_error = None if res.status is RecipientStatus.DELIVERED else res.reply
            next_attempt = r.next_attempt
            if res.status is RecipientStatus.DEFERRED and res.next_attempt is not None:
                next_attempt = res.next_attempt
        recipients.append(
            QueuedRecipient(r.address, status, attempts, last_error, route, next_attempt, r.dsn_notify, r.orcpt)
        )
    return QueuedMessage(
        id=msg.id,
        sender=msg.sender,
        recipients=tuple(recipients),
        received_at=msg.received_at,
        size=msg.size,
        message_id=msg.message_id,
        held=msg.held,
        meta=msg.meta,
        leased_until=0.0,
        finished_at=finished_at,
        options=msg.options,
    )


def _load_one(conn: sqlite3.Connection, msg_id: str) -> QueuedMessage:
    found = _load(conn, [msg_id])
    if not found:
        raise MessageNotFoundError(msg_id)
    return found[0]


def _require(conn: sqlite3.Connection, msg_id: str) -> None:
    if conn.execute("SELECT 1 FROM messages WHERE id = ?", (msg_id,)).fetchone() is None:
        raise MessageNotFoundError(msg_id)


# -- the writer ------------------------------------------------------------------------------------------


class _Job:
    __slots__ = ("durable", "fn", "future", "loop", "weight")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        weight: int,
        durable: bool,
    ) -> None:
        self.fn = fn
        self.loop = loop
        self.future = future
        self.weight = weight
        self.durable = durable


def _clone(exc: BaseException) -> BaseException:
    """One exception object per waiting task (a shared one would collect every task's traceback)."""
    twin = copy.copy(exc)
    twin.__cause__ = exc.__cause__
    return twin


def _settle_all(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, exc in items:
        _settle(future, value, exc)


def _settle(future: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if future.done():  # cancelled: the caller went away
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


class _Writer:
    """The single writer thread: group commit of every pending job."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._ids = _IdGenerator()
        self._synchronous = "FULL"  # what _connect set
        self.commits = 0
        self.fsyncs = 0
        self.puts = 0
        self.jobs = 0
        self.failed_jobs = 0
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._run, name="mxgate-queue-writer", daemon=True)
        self._thread.start()

    def next_id(self, now: float) -> str:
        return self._ids.next(now)

    def submit(
        self, fn: Callable[[sqlite3.Connection], T], weight: int = 0, *, durable: bool = True
    ) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:  # never enqueue behind the stop sentinel
            if self._closed:
                future.set_exception(QueueError("queue store is closed"))
            else:
                self._jobs.put(_Job(fn, loop, future, weight, durable))
        return future

    def stop(self) -> None:
        """Finish the jobs already submitted, then end the thread (blocking; call from a worker thread)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._jobs.put(None)
        self._thread.join()
        self._conn.close()

    def _run(self) -> None:
        stop = False
        while not stop:  # ends at the sentinel that stop() enqueues
            first = self._jobs.get()
            if first is None:
                break
            batch = [first]
            weight = first.weight
            while len(batch) < MAX_BATCH_JOBS and weight < MAX_BATCH_BYTES:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
                weight += job.weight
            try:
                self._run_batch(batch)
            except BaseException as exc:  # a bug must not leave callers waiting forever
                self._fail(batch, QueueError(f"queue writer failed: {exc!r}"))

    def _fail(self, batch: list[_Job], error: BaseException) -> None:
        with contextlib.suppress(sqlite3.Error):
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        for job in batch:
            self.failed_jobs += 1
            with contextlib.suppress(RuntimeError):
                job.loop.call_soon_threadsafe(_settle, job.future, None, _clone(error))

    def _run_batch(self, batch: list[_Job]) -> None:
        synchronous = "FULL" if any(job.durable for job in batch) else "NORMAL"
        # Optimistic first: the jobs one after another in one transaction. Only if a job fails is the batch rolled
        # back and run again with a savepoint per job, so that job alone fails (jobs only touch the database).
        outcomes, fatal = self._transaction(batch, synchronous, savepoints=False)
        if outcomes is None:
            outcomes, fatal = self._transaction(batch, synchronous, savepoints=True)
        assert outcomes is not None
        if fatal is not None:
            outcomes = [(None, _clone(fatal)) for _ in batch]
        else:
            self.commits += 1
            self.fsyncs += synchronous == "FULL"
            self.largest_batch = max(self.largest_batch, len(batch))
        settle: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
        for job, (value, error) in zip(batch, outcomes, strict=True):
            if error is None:
                self.jobs += 1
                if job.weight:
                    self.puts += 1
            else:
                self.failed_jobs += 1
            settle.setdefault(job.loop, []).append((job.future, value, error))
        for loop, items in settle.items():  # one wake-up per event loop, not one per job
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                loop.call_soon_threadsafe(_settle_all, items)

    def _transaction(
        self, batch: list[_Job], synchronous: str, *, savepoints: bool
    ) -> tuple[list[tuple[Any, BaseException | None]] | None, BaseException | None]:
        """Run the batch in one transaction and commit. Returns (outcomes, fatal); outcomes None: a job failed
        without savepoints (everything was rolled back; run again with them)."""
        conn = self._conn
        outcomes: list[tuple[Any, BaseException | None]] = []
        fatal: BaseException | None = None
        try:
            if synchronous != self._synchronous:  # a pragma, so set outside the transaction
                conn.execute(f"PRAGMA synchronous={synchronous}")
                self._synchronous = synchronous
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            fatal = _map_error(exc)
        if fatal is None:
            for job in batch:
                if savepoints:
                    try:
                        conn.execute("SAVEPOINT job")
                    except sqlite3.Error as exc:
                        fatal = _map_error(exc)
                        break
                try:
                    value = job.fn(conn)
                except BaseException as exc:  # the job's own failure: undo it, keep the batch
                    if not savepoints:
                        with contextlib.suppress(sqlite3.Error):
                            if conn.in_transaction:
                                conn.execute("ROLLBACK")
                        return None, None
                    if not conn.in_transaction:  # SQLite abandoned the whole transaction (e.g. disk full)
                        fatal = _map_error(exc)
                        break
                    try:
                        conn.execute("ROLLBACK TO job")
                        conn.execute("RELEASE job")
                    except sqlite3.Error as exc2:
                        fatal = _map_error(exc2)
                        break
                    outcomes.append((None, _map_error(exc)))
                else:
                    if savepoints:
                        try:
                            conn.execute("RELEASE job")
                        except sqlite3.Error as exc:
                            fatal = _map_error(exc)
                            break
                    outcomes.append((value, None))
        if fatal is None:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                fatal = _map_error(exc)
        if fatal is not None:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        return outcomes, fatal


# -- the store -------------------------------------------------------------------------------------------


class QueueStore:
    """The durable message queue of one state directory. Open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, path: Path, writer: _Writer, reader: sqlite3.Connection) -> None:
        self.path = path
        self._writer = writer
        self._reader_conn = reader
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mxgate-queue-read")
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------------

    @classmethod
    async def open(cls, state_dir: Path, *, release_leases: bool = True, max_db_bytes: int | None = None) -> QueueStore:
        """Open (creating if needed) ``state_dir/queue.sqlite3``.

        :param release_leases: release every lease left by a previous run, so attempts in flight when it
            stopped are due again. Only the gateway (the one scheduler) should; the CLI passes ``False``.
        :param max_db_bytes: a size limit for the database (SQLite ``max_page_count``); writes beyond it fail
            with :class:`QueueFullError` like a full disk. ``None``: only the disk limits it.
        :raises QueueError: the directory or database is unusable.
        """
        path = Path(state_dir) / DB_NAME
        try:
            writer_conn, reader_conn = await asyncio.to_thread(cls._open_sync, path, max_db_bytes)
        except (sqlite3.Error, OSError) as exc:
            raise QueueError(f"{path}: cannot open queue store: {exc}") from exc
        store = cls(path, _Writer(writer_conn), reader_conn)
        if release_leases:
            try:
                await store._write(lambda c: c.execute("UPDATE messages SET lease_until = 0 WHERE lease_until > 0"))
            except BaseException:
                await store.close()
                raise
        return store

    @staticmethod
    def _open_sync(path: Path, max_db_bytes: int | None) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        private_file(path, companions=SQLITE_COMPANIONS)  # 0600; SQLite gives its WAL and SHM the same mode
        writer = _connect(path, reader=False)
        try:
            version = writer.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise QueueError(f"{path}: schema version {version} is newer than this mxgate ({SCHEMA_VERSION})")
            if version < SCHEMA_VERSION:
                writer.execute("BEGIN IMMEDIATE")
                try:
                    # an existing store gets its column changes first; then _SCHEMA (IF NOT EXISTS throughout)
                    # adds what later versions created: tables and indexes
                    steps = range(version + 1, SCHEMA_VERSION + 1) if version else range(0)
                    for step in steps:
                        for stmt in _MIGRATIONS.get(step, ()):
                            writer.execute(stmt)
                    for stmt in _SCHEMA.split(";"):
                        if stmt.strip():
                            writer.execute(stmt)
                    # counted once from the rows (an older store may hold mail), then kept by the triggers
                    writer.execute(
                        f"INSERT OR IGNORE INTO queue_stats (id, {', '.join(_STATS_COLUMNS)})"
                        f" SELECT 0, * FROM ({_RECOUNT_SQL})"
                    )
                    for stmt in _TRIGGERS:
                        writer.execute(stmt)
                    writer.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    writer.execute("COMMIT")
                except BaseException:
                    writer.execute("ROLLBACK")
                    raise
            if max_db_bytes is not None:
                page_size = int(writer.execute("PRAGMA page_size").fetchone()[0])
                writer.execute(f"PRAGMA max_page_count = {max(1, int(max_db_bytes) // page_size)}")
            reader = _connect(path, reader=True)
        except BaseException:
            writer.close()
            raise
        # The WAL file now exists; make its directory entry (and the database's) durable once.
        _fsync_dir(path.parent)
        return writer, reader

    async def close(self) -> None:
        """Finish pending writes and close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._writer.stop)
        await asyncio.get_running_loop().run_in_executor(self._reader, self._reader_conn.close)
        self._reader.shutdown(wait=True)

    async def __aenter__(self) -> QueueStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def stats(self) -> StoreStats:
        w = self._writer
        return StoreStats(
            commits=w.commits,
            fsyncs=w.fsyncs,
            puts=w.puts,
            jobs=w.jobs,
            failed_jobs=w.failed_jobs,
            largest_batch=w.largest_batch,
        )

    # -- plumbing ----------------------------------------------------------------------------------------

    async def _write(self, fn: Callable[[sqlite3.Connection], T], weight: int = 0, *, durable: bool = True) -> T:
        return await self._writer.submit(fn, weight, durable=durable)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise QueueError("queue store is closed")
        conn = self._reader_conn

        def run() -> T:
            try:
                return fn(conn)
            except sqlite3.Error as exc:
                raise _map_error(exc) from exc

        return await asyncio.get_running_loop().run_in_executor(self._reader, run)

    # -- accept ------------------------------------------------------------------------------------------

    async def put(
        self,
        sender: str,
        recipients: Sequence[str | NewRecipient],
        data: bytes,
        *,
        meta: MetaInput = None,
        message_id: str | None = None,
        now: float,
        options: MessageOptions | None = None,
    ) -> str:
        """Queue a message; returns its id only once message and envelope are fsync'd (group commit).

        Duplicate recipient addresses are queued once. If the caller is cancelled while waiting, the message
        may still be committed (a possible duplicate, never a loss).

        :raises ValueError: no recipients.
        :raises QueueFullError: disk or size limit full; nothing was written.
        """
        msg = await self.put_leased(
            sender, recipients, data, meta=meta, message_id=message_id, now=now, options=options
        )
        return msg.id

    async def put_leased(
        self,
        sender: str,
        recipients: Sequence[str | NewRecipient],
        data: bytes,
        *,
        meta: MetaInput = None,
        message_id: str | None = None,
        now: float,
        lease_seconds: float = 0.0,
        options: MessageOptions | None = None,
    ) -> QueuedMessage:
        """:meth:`put`, returning the queued message; with ``lease_seconds`` it is leased in the same
        transaction, so the scheduler can deliver it from memory at once instead of finding it with
        :meth:`lease_due` and reading it back (the lease is released at start-up if the process dies).

        ``meta``: a :class:`~mxgate.core.metadata.MessageMeta` (or the ``(key, value)`` pairs it is stored as)."""
        options = options or NO_OPTIONS
        rcpts: dict[str, NewRecipient] = {}
        for r in recipients:
            nr = NewRecipient(r) if isinstance(r, str) else r
            rcpts.setdefault(nr.address, nr)
        if not rcpts:
            raise ValueError("a message needs at least one recipient")
        meta_value = MessageMeta.of(meta)
        meta_json = _meta_column(meta_value)
        headers = _header_section(data)
        writer = self._writer
        lease_until = now + lease_seconds if lease_seconds > 0 else 0.0

        def job(conn: sqlite3.Connection) -> str:
            for _ in range(_ID_RETRIES):
                msg_id = writer.next_id(now)
                try:
                    conn.execute(
                        "INSERT INTO messages (id, sender, received_at, size, message_id, meta, headers, lease_until,"
                        " dsn_ret, envid, requiretls) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            msg_id,
                            sender,
                            now,
                            len(data),
                            message_id,
                            meta_json,
                            headers,
                            lease_until,
                            options.dsn_ret.value if options.dsn_ret else None,
                            options.envid,
                            int(options.requiretls),
                        ),
                    )
                    break
                except sqlite3.IntegrityError:
                    continue
            else:
                raise QueueError("could not allocate a unique message id")
            conn.execute("INSERT INTO bodies (id, data) VALUES (?, ?)", (msg_id, data))
            conn.executemany(
                "INSERT INTO recipients (msg_id, idx, address, status, next_attempt, dsn_notify, orcpt)"
                " VALUES (?, ?, ?, 'queued', ?, ?, ?)",
                [(msg_id, i, r.address, now, r.dsn_notify, r.orcpt) for i, r in enumerate(rcpts.values())],
            )
            return msg_id

        msg_id = await self._write(job, weight=max(1, len(data)))
        return QueuedMessage(
            id=msg_id,
            sender=sender,
            recipients=tuple(
                QueuedRecipient(r.address, RecipientStatus.QUEUED, 0, None, None, now, r.dsn_notify, r.orcpt)
                for r in rcpts.values()
            ),
            received_at=now,
            size=len(data),
            message_id=message_id,
            held=False,
            meta=meta_value,
            leased_until=lease_until,
            options=options,
        )

    # -- read --------------------------------------------------------------------------------------------

    async def get(self, msg_id: str) -> QueuedMessage | None:
        """A message (active or finished tombstone), or ``None``."""
        found = await self._read(lambda c: _load(c, [msg_id]))
        return found[0] if found else None

    async def body(self, msg_id: str) -> bytes:
        """The message as received. :raises MessageNotFoundError: unknown, deleted or finished."""

        def run(conn: sqlite3.Connection) -> bytes:
            row = conn.execute("SELECT data FROM bodies WHERE id = ?", (msg_id,)).fetchone()
            if row is None:
                raise MessageNotFoundError(msg_id)
            return bytes(row[0])

        return await self._read(run)

    async def headers(self, msg_id: str) -> bytes:
        """The header section (kept after the message is finished, for DSNs). :raises MessageNotFoundError:"""

        def run(conn: sqlite3.Connection) -> bytes:
            row = conn.execute("SELECT headers FROM messages WHERE id = ?", (msg_id,)).fetchone()
            if row is None:
                raise MessageNotFoundError(msg_id)
            return bytes(row[0])

        return await self._read(run)

    async def list(
        self, *, limit: int = 1000, include_finished: bool = False, after: str | None = None
    ) -> builtins.list[QueuedMessage]:
        """Up to ``limit`` messages in arrival (id) order, after the id ``after`` (the last of the previous page);
        active ones only unless ``include_finished``. One page costs its own rows (an index walk from ``after``),
        whatever the queue holds."""
        terms = ["id > ?"] if after is not None else []
        if not include_finished:
            terms.append("finished_at IS NULL")  # the messages_active index
        where = f"WHERE {' AND '.join(terms)}" if terms else ""
        args: tuple[Any, ...] = ((after,) if after is not None else ()) + (limit,)

        def run(conn: sqlite3.Connection) -> builtins.list[QueuedMessage]:
            ids = [r[0] for r in conn.execute(f"SELECT id FROM messages {where} ORDER BY id LIMIT ?", args)]
            return _load(conn, ids)

        return await self._read(run)

    async def select(
        self,
        *,
        sender: str | None = None,
        recipient: str | None = None,
        received_before: float | None = None,
        include_finished: bool = False,
        limit: int | None = None,
        after: str | None = None,
    ) -> builtins.list[str]:
        """Ids of the messages (arrival order) whose sender is ``sender`` (``""`` the null sender), that have
        ``recipient`` among their recipients (both without case) and were received before ``received_before``;
        active ones only unless ``include_finished``; after the id ``after`` (a page of :meth:`list`). Only ids:
        a queue of any size fits in memory."""
        where = [] if include_finished else ["m.finished_at IS NULL"]
        args: builtins.list[Any] = []
        if after is not None:
            where.append("m.id > ?")
            args.append(after)
        if sender is not None:
            where.append("lower(m.sender) = ?")
            args.append(sender.lower())
        if recipient is not None:
            where.append("EXISTS (SELECT 1 FROM recipients r WHERE r.msg_id = m.id AND lower(r.address) = ?)")
            args.append(recipient.lower())
        if received_before is not None:
            where.append("m.received_at < ?")
            args.append(received_before)
        sql = "SELECT m.id FROM messages m" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY m.id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)

        def run(conn: sqlite3.Connection) -> builtins.list[str]:
            return [r[0] for r in conn.execute(sql, args)]

        return await self._read(run)

    async def get_many(self, msg_ids: builtins.list[str]) -> builtins.list[QueuedMessage]:
        """The messages with these ids that exist, in the order given."""

        return await self._read(lambda c: _load(c, msg_ids))

    async def attempts(self, msg_id: str) -> builtins.list[Attempt]:
        """Every recorded attempt of a message, oldest first."""

        def run(conn: sqlite3.Connection) -> builtins.list[Attempt]:
            rows = conn.execute(
                "SELECT at, recipient, result, reply, mx, detail FROM attempts WHERE msg_id = ? ORDER BY seq",
                (msg_id,),
            ).fetchall()
            return [Attempt(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]

        return await self._read(run)

    async def counts(self, *, now: float) -> QueueCounts:
        """The queue's figures without scanning it: the ``queue_stats`` row (kept by triggers as rows change), the
        leased messages by their index (at most those in flight) and the oldest active message by id (ids begin
        with the time of arrival)."""

        def run(conn: sqlite3.Connection) -> QueueCounts:
            s = conn.execute(f"SELECT {', '.join(_STATS_COLUMNS)} FROM queue_stats WHERE id = 0").fetchone()
            leased = conn.execute(
                "SELECT count(*) FROM messages WHERE lease_until > 0 AND lease_until > ? AND finished_at IS NULL",
                (now,),
            ).fetchone()[0]
            oldest = conn.execute(
                "SELECT received_at FROM messages WHERE finished_at IS NULL ORDER BY id LIMIT 1"
            ).fetchone()
            per = dict(zip(_STATUS_COLUMNS, tuple(s)[5:], strict=True))
            return QueueCounts(
                messages=s["messages"],
                held=s["held"],
                leased=leased,
                deferred=s["deferred_msgs"],
                finished=s["finished"],
                bytes=s["bytes"],
                recipients=tuple((st, int(per.get(st.value, 0))) for st in RecipientStatus),
                oldest_age=None if oldest is None else max(0.0, now - oldest[0]),
            )

        return await self._read(run)

    async def recount(self) -> dict[str, int]:
        """The figures behind :meth:`counts` counted from the rows (a full scan, for checks and tests), next to
        :meth:`stats_row`, what the triggers kept."""
        return await self._read(lambda c: dict(zip(_STATS_COLUMNS, c.execute(_RECOUNT_SQL).fetchone(), strict=True)))

    async def stats_row(self) -> dict[str, int]:
        """The ``queue_stats`` row the triggers keep (see :meth:`recount`)."""
        return await self._read(
            lambda c: dict(
                zip(
                    _STATS_COLUMNS,
                    c.execute(f"SELECT {', '.join(_STATS_COLUMNS)} FROM queue_stats WHERE id = 0").fetchone(),
                    strict=True,
                )
            )
        )

    # -- scheduling --------------------------------------------------------------------------------------

    async def lease_due(
        self, now: float, limit: int, lease_seconds: float, *, retry_limit: int | None = None
    ) -> builtins.list[QueuedMessage]:
        """Lease up to ``limit`` due messages (not held, not leased), most overdue first.

        With ``retry_limit``, at most that many of them are retries (a recipient deferred before): those come
        first, most overdue first, and mail not attempted yet fills the rest, so a backlog that comes due for a
        destination that is down cannot take every slot from new mail.

        A leased message is not returned again until :meth:`record_results` releases it or the lease expires,
        so two schedulers (or a CLI flush and the scheduler) never attempt the same message at once.
        """

        def walk(conn: sqlite3.Connection, status: str, ids: dict[str, None], stop: int) -> None:
            # Walks a due index (recipients_due, or recipients_due_new/_retry for one status) in due order and
            # stops at `stop` messages: the cost is the messages skipped (leased or held ones, at most those in
            # flight plus held) plus `limit`, not the backlog. A message's first row carries its earliest due
            # recipient.
            if len(ids) >= stop:
                return
            for (msg_id,) in conn.execute(
                "SELECT r.msg_id FROM recipients r JOIN messages m ON m.id = r.msg_id"
                f" WHERE r.status {status} AND r.next_attempt <= ?"
                " AND m.held = 0 AND m.lease_until <= ? AND m.finished_at IS NULL"
                " ORDER BY r.next_attempt",
                (now, now),
            ):
                ids[msg_id] = None
                if len(ids) >= stop:
                    break

        def job(conn: sqlite3.Connection) -> builtins.list[QueuedMessage]:
            ids: dict[str, None] = {}
            if limit > 0:
                if retry_limit is None:
                    walk(conn, "IN ('queued', 'deferred')", ids, limit)
                else:
                    walk(conn, "= 'deferred'", ids, min(limit, max(0, retry_limit)))
                    walk(conn, "= 'queued'", ids, limit)
            conn.executemany(
                "UPDATE messages SET lease_until = ? WHERE id = ?", [(now + lease_seconds, i) for i in ids]
            )
            return _load(conn, builtins.list(ids))

        return await self._write(job, durable=False)

    async def record_results(
        self,
        msg_id: str,
        results: Sequence[RecipientResult | tuple[str, RecipientStatus, str, float | None]],
        *,
        now: float,
        mx: str | None = None,
        detail: str | None = None,
        routes: Mapping[str, str] | None = None,
        known: QueuedMessage | None = None,
    ) -> QueuedMessage:
        """Record one delivery attempt's outcome per recipient, append to the attempts log, release the lease.

        ``DEFERRED`` needs a ``next_attempt``; ``DELIVERED``/``FAILED`` are final (a final recipient is never
        changed again). When every recipient is final the message is finished: the body is deleted and a
        tombstone is kept (see the module docs). ``routes`` sets recipients' outbound connectors in the same
        transaction (see :meth:`set_route`). Returns the message as it is now; with ``known`` (the caller's copy,
        e.g. the leased message) that copy with these changes applied, so nothing is read back. Not fsync'd by
        itself (see the module docs): after a power failure the attempt may be made again.

        :raises ValueError: a result for an unknown or final recipient, ``QUEUED`` as a result, or a deferral
            without a time.
        """
        checked = [RecipientResult(*r) for r in results]
        for r in checked:
            if r.status is RecipientStatus.QUEUED:
                raise ValueError(f"{r.recipient}: 'queued' is not a delivery result")
            if r.status is RecipientStatus.DEFERRED and (r.next_attempt is None or not math.isfinite(r.next_attempt)):
                raise ValueError(f"{r.recipient}: a deferral needs a next_attempt time")

        def job(conn: sqlite3.Connection) -> QueuedMessage:
            for rcpt, route in (routes or {}).items():
                conn.execute("UPDATE recipients SET route = ? WHERE msg_id = ? AND address = ?", (route, msg_id, rcpt))
            for r in checked:
                # next_attempt keeps its value for a final result; only a recipient not final yet is updated
                cur = conn.execute(
                    "UPDATE recipients SET status = ?, attempts = attempts + 1, last_error = ?,"
                    " next_attempt = coalesce(?, next_attempt)"
                    " WHERE msg_id = ? AND address = ? AND status IN ('queued', 'deferred')",
                    (
                        r.status.value,
                        None if r.status is RecipientStatus.DELIVERED else r.reply,
                        r.next_attempt if r.status is RecipientStatus.DEFERRED else None,
                        msg_id,
                        r.recipient,
                    ),
                )
                if cur.rowcount == 0:
                    current = _load_one(conn, msg_id).recipient(r.recipient)  # only to say why
                    if current is None:
                        raise ValueError(f"{msg_id}: no recipient {r.recipient!r}")
                    raise ValueError(f"{msg_id}: recipient {r.recipient!r} is already {current.status}")
                conn.execute(
                    "INSERT INTO attempts (msg_id, at, recipient, result, reply, mx, detail)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (msg_id, now, r.recipient, r.status.value, r.reply, mx, detail),
                )
            conn.execute("UPDATE messages SET lease_until = 0 WHERE id = ?", (msg_id,))
            pending = conn.execute(
                "SELECT count(*) FROM recipients WHERE msg_id = ? AND status IN ('queued', 'deferred')",
                (msg_id,),
            ).fetchone()[0]
            if pending == 0:
                conn.execute("UPDATE messages SET finished_at = ? WHERE id = ?", (now, msg_id))
                conn.execute("DELETE FROM bodies WHERE id = ?", (msg_id,))
            if known is None:
                return _load_one(conn, msg_id)
            return _applied(known, checked, routes or {}, finished_at=now if pending == 0 else None)

        return await self._write(job, durable=False)

    async def release_lease(self, msg_id: str) -> None:
        """Give a lease back without recording anything (e.g. the attempt was cancelled at shutdown)."""
        await self._write(
            lambda c: c.execute("UPDATE messages SET lease_until = 0 WHERE id = ?", (msg_id,)), durable=False
        )

    # -- administration ----------------------------------------------------------------------------------

    async def set_route(self, msg_id: str, rcpt: str, route: str | None) -> None:
        """Set one recipient's outbound connector. :raises MessageNotFoundError: no such message/recipient."""

        def job(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE recipients SET route = ? WHERE msg_id = ? AND address = ?", (route, msg_id, rcpt)
            )
            if cur.rowcount == 0:
                raise MessageNotFoundError(f"{msg_id}: {rcpt}")

        await self._write(job)

    async def hold(self, msg_id: str) -> None:
        """Keep a message from delivery until :meth:`release`. :raises MessageNotFoundError:"""
        await self._set_held(msg_id, True)

    async def release(self, msg_id: str) -> None:
        await self._set_held(msg_id, False)

    async def _set_held(self, msg_id: str, held: bool) -> None:
        def job(conn: sqlite3.Connection) -> None:
            _require(conn, msg_id)
            conn.execute("UPDATE messages SET held = ? WHERE id = ?", (int(held), msg_id))

        await self._write(job)

    async def delete(self, msg_id: str) -> bool:
        """Remove a message and everything about it. Returns whether it existed."""

        def job(conn: sqlite3.Connection) -> bool:
            for table, col in (("attempts", "msg_id"), ("recipients", "msg_id"), ("bodies", "id")):
                conn.execute(f"DELETE FROM {table} WHERE {col} = ?", (msg_id,))
            return conn.execute("DELETE FROM messages WHERE id = ?", (msg_id,)).rowcount > 0

        return await self._write(job)

    async def flush(self, msg_id: str | None, *, now: float) -> int:
        """Make the pending recipients of one message (or of all, ``None``) due now; held messages stay held.

        Returns the number of recipients made due.
        """

        def job(conn: sqlite3.Connection) -> int:
            sql = "UPDATE recipients SET next_attempt = ? WHERE status IN ('queued', 'deferred') AND next_attempt > ?"
            args: tuple[Any, ...] = (now, now)
            if msg_id is not None:
                _require(conn, msg_id)
                sql += " AND msg_id = ?"
                args += (msg_id,)
            return int(conn.execute(sql, args).rowcount)

        return await self._write(job)

    async def purge_finished(self, before: float) -> int:
        """Delete the tombstones of messages finished before ``before``. Returns how many."""

        def job(conn: sqlite3.Connection) -> int:
            ids = [r[0] for r in conn.execute("SELECT id FROM messages WHERE finished_at < ?", (before,))]
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for table, col in (("attempts", "msg_id"), ("recipients", "msg_id"), ("bodies", "id")):
                    conn.execute(f"DELETE FROM {table} WHERE {col} IN ({marks})", chunk)
                conn.execute(f"DELETE FROM messages WHERE id IN ({marks})", chunk)
            return len(ids)

        return await self._write(job)

    async def integrity_check(self) -> builtins.list[str]:
        """SQLite's ``integrity_check`` plus the queue's invariants; ``[]`` means fine."""

        def run(conn: sqlite3.Connection) -> builtins.list[str]:
            problems = [
                str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall() if str(r[0]).lower() != "ok"
            ]
            checks: builtins.list[tuple[str, str]] = [
                (
                    "active message without a body",
                    "SELECT m.id FROM messages m LEFT JOIN bodies b ON b.id = m.id"
                    " WHERE m.finished_at IS NULL AND b.id IS NULL",
                ),
                (
                    "body size differs from the recorded size",
                    "SELECT m.id FROM messages m JOIN bodies b ON b.id = m.id WHERE length(b.data) != m.size",
                ),
                (
                    "finished message still has a body",
                    "SELECT m.id FROM messages m JOIN bodies b ON b.id = m.id WHERE m.finished_at IS NOT NULL",
                ),
                (
                    "message without recipients",
                    "SELECT m.id FROM messages m WHERE NOT EXISTS (SELECT 1 FROM recipients r WHERE r.msg_id = m.id)",
                ),
                (
                    "active message whose recipients are all final",
                    "SELECT m.id FROM messages m WHERE m.finished_at IS NULL AND NOT EXISTS"
                    " (SELECT 1 FROM recipients r"
                    " WHERE r.msg_id = m.id AND r.status IN ('queued', 'deferred'))",
                ),
                (
                    "finished message with a pending recipient",
                    "SELECT DISTINCT m.id FROM messages m JOIN recipients r ON r.msg_id = m.id"
                    " WHERE m.finished_at IS NOT NULL AND r.status IN ('queued', 'deferred')",
                ),
                (
                    "recipient with an unknown status",
                    "SELECT msg_id FROM recipients WHERE status NOT IN ('queued', 'deferred', 'delivered', 'failed')",
                ),
                (
                    "body without a message",
                    "SELECT b.id FROM bodies b LEFT JOIN messages m ON m.id = b.id WHERE m.id IS NULL",
                ),
                (
                    "recipient without a message",
                    "SELECT DISTINCT r.msg_id FROM recipients r"
                    " LEFT JOIN messages m ON m.id = r.msg_id WHERE m.id IS NULL",
                ),
                (
                    "attempt without a message",
                    "SELECT DISTINCT a.msg_id FROM attempts a"
                    " LEFT JOIN messages m ON m.id = a.msg_id WHERE m.id IS NULL",
                ),
            ]
            for what, sql in checks:
                for row in conn.execute(sql + " LIMIT 100").fetchall():
                    problems.append(f"{row[0]}: {what}")
            kept = conn.execute(f"SELECT {', '.join(_STATS_COLUMNS)} FROM queue_stats WHERE id = 0").fetchone()
            counted = conn.execute(_RECOUNT_SQL).fetchone()
            if kept is None or tuple(kept) != tuple(counted):
                problems.append(
                    f"queue_stats: kept {None if kept is None else tuple(kept)}, counted {tuple(counted)}"
                    f" ({', '.join(_STATS_COLUMNS)})"
                )
            return problems

        return await self._read(run)
