"""The queue store's SQLite schema: tables, the ``queue_stats`` triggers, migrations, opening a store.

A new store gets :data:`_SCHEMA` as it is; an existing one of an older ``PRAGMA user_version`` first gets its
column changes (:data:`_MIGRATIONS`), then :data:`_SCHEMA` (``IF NOT EXISTS`` throughout) adds the tables and
indexes later versions created, ``queue_stats`` is counted once from the rows and the triggers keep it current.
:func:`open_connections` does all that in one transaction and returns the writer's and the reader's connections.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Final

from mxgate.core.files import SQLITE_COMPANIONS, private_file
from mxgate.core.queue.errors import QueueError

__all__ = ["BUSY_TIMEOUT_MS", "RECOUNT_SQL", "SCHEMA_VERSION", "STATS_COLUMNS", "STATUS_COLUMNS", "open_connections"]

# 2: RFC 3461 / RFC 8689 message columns; 3: queue_stats kept by triggers, messages_active/leased,
# recipients_due_new/retry
SCHEMA_VERSION: Final = 3
BUSY_TIMEOUT_MS: Final = 10_000


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
STATUS_COLUMNS: Final = ("queued", "deferred", "delivered", "failed")
RECOUNT_SQL: Final = _RECOUNT.format(
    per_status=",\n    ".join(
        "(SELECT count(*) FROM recipients r JOIN messages m ON m.id = r.msg_id"
        f" WHERE m.finished_at IS NULL AND r.status = '{s}')"
        for s in STATUS_COLUMNS
    )
)
STATS_COLUMNS: Final = ("messages", "held", "bytes", "finished", "deferred_msgs", *STATUS_COLUMNS)


def _status_delta(plus: str | None, minus: str | None) -> str:
    """SET clause: each status column + 1 where it is ``plus`` and - 1 where it is ``minus`` (SQL expressions);
    one assignment per column (SQLite keeps only the last of several)."""
    parts = []
    for c in STATUS_COLUMNS:
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
        for c in STATUS_COLUMNS
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


def open_connections(path: Path, max_db_bytes: int | None) -> tuple[sqlite3.Connection, sqlite3.Connection]:
    """Open (creating or migrating) the store at ``path``: the writer's connection and the reader's (blocking;
    call from a worker thread). :raises QueueError: a schema newer than this mxgate."""
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
                    f"INSERT OR IGNORE INTO queue_stats (id, {', '.join(STATS_COLUMNS)})"
                    f" SELECT 0, * FROM ({RECOUNT_SQL})"
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
