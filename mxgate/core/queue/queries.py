"""Reading the queue store: rows into :class:`~mxgate.core.messages.QueuedMessage`, and the read-only queries
behind ``mxgate queue`` and the metrics (:class:`QueueCounts`, attempts, pages, integrity).

Every function takes the connection it runs on; :class:`~mxgate.core.queue.store.QueueStore` runs them on its
reader thread (or, for :func:`load` and friends, inside a write job).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from mxgate.core.messages import NO_OPTIONS, MessageOptions, QueuedMessage, QueuedRecipient, RecipientStatus
from mxgate.core.metadata import NO_META, MessageMeta
from mxgate.core.model import DsnRet
from mxgate.core.queue.errors import MessageNotFoundError
from mxgate.core.queue.schema import RECOUNT_SQL, STATS_COLUMNS, STATUS_COLUMNS

if TYPE_CHECKING:
    import sqlite3

    from mxgate.core.queue.store import RecipientResult

__all__ = ["Attempt", "QueueCounts"]


@dataclass(frozen=True, slots=True)
class Attempt:
    at: float
    recipient: str
    result: str  # "delivered" | "deferred" | "failed"
    reply: str
    mx: str | None
    detail: str | None


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


# -- rows ------------------------------------------------------------------------------------------------


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


def meta_column(meta: MessageMeta) -> str:
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


def load(conn: sqlite3.Connection, ids: Sequence[str]) -> list[QueuedMessage]:
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


def applied(
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


def load_one(conn: sqlite3.Connection, msg_id: str) -> QueuedMessage:
    found = load(conn, [msg_id])
    if not found:
        raise MessageNotFoundError(msg_id)
    return found[0]


def require(conn: sqlite3.Connection, msg_id: str) -> None:
    if conn.execute("SELECT 1 FROM messages WHERE id = ?", (msg_id,)).fetchone() is None:
        raise MessageNotFoundError(msg_id)


# -- queries (QueueStore runs them on its reader thread) --------------------------------------------------


def body(conn: sqlite3.Connection, msg_id: str) -> bytes:
    row = conn.execute("SELECT data FROM bodies WHERE id = ?", (msg_id,)).fetchone()
    if row is None:
        raise MessageNotFoundError(msg_id)
    return bytes(row[0])


def headers(conn: sqlite3.Connection, msg_id: str) -> bytes:
    row = conn.execute("SELECT headers FROM messages WHERE id = ?", (msg_id,)).fetchone()
    if row is None:
        raise MessageNotFoundError(msg_id)
    return bytes(row[0])


def page(conn: sqlite3.Connection, *, limit: int, include_finished: bool, after: str | None) -> list[QueuedMessage]:
    """See :meth:`~mxgate.core.queue.store.QueueStore.list`."""
    terms = ["id > ?"] if after is not None else []
    if not include_finished:
        terms.append("finished_at IS NULL")  # the messages_active index
    where = f"WHERE {' AND '.join(terms)}" if terms else ""
    args: tuple[Any, ...] = ((after,) if after is not None else ()) + (limit,)
    ids = [r[0] for r in conn.execute(f"SELECT id FROM messages {where} ORDER BY id LIMIT ?", args)]
    return load(conn, ids)


def select(
    conn: sqlite3.Connection,
    *,
    sender: str | None,
    recipient: str | None,
    received_before: float | None,
    include_finished: bool,
    limit: int | None,
    after: str | None,
) -> list[str]:
    """See :meth:`~mxgate.core.queue.store.QueueStore.select`."""
    where = [] if include_finished else ["m.finished_at IS NULL"]
    args: list[Any] = []
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
    return [r[0] for r in conn.execute(sql, args)]


def attempts(conn: sqlite3.Connection, msg_id: str) -> list[Attempt]:
    rows = conn.execute(
        "SELECT at, recipient, result, reply, mx, detail FROM attempts WHERE msg_id = ? ORDER BY seq",
        (msg_id,),
    ).fetchall()
    return [Attempt(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]


def counts(conn: sqlite3.Connection, now: float) -> QueueCounts:
    """See :meth:`~mxgate.core.queue.store.QueueStore.counts`."""
    s = conn.execute(f"SELECT {', '.join(STATS_COLUMNS)} FROM queue_stats WHERE id = 0").fetchone()
    leased = conn.execute(
        "SELECT count(*) FROM messages WHERE lease_until > 0 AND lease_until > ? AND finished_at IS NULL",
        (now,),
    ).fetchone()[0]
    oldest = conn.execute("SELECT received_at FROM messages WHERE finished_at IS NULL ORDER BY id LIMIT 1").fetchone()
    per = dict(zip(STATUS_COLUMNS, tuple(s)[5:], strict=True))
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


def recount(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(zip(STATS_COLUMNS, conn.execute(RECOUNT_SQL).fetchone(), strict=True))


def stats_row(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(
        zip(
            STATS_COLUMNS,
            conn.execute(f"SELECT {', '.join(STATS_COLUMNS)} FROM queue_stats WHERE id = 0").fetchone(),
            strict=True,
        )
    )


def integrity_problems(conn: sqlite3.Connection) -> list[str]:
    """SQLite's ``integrity_check`` plus the queue's invariants; ``[]`` means fine."""
    problems = [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall() if str(r[0]).lower() != "ok"]
    checks: list[tuple[str, str]] = [
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
            "SELECT DISTINCT r.msg_id FROM recipients r LEFT JOIN messages m ON m.id = r.msg_id WHERE m.id IS NULL",
        ),
        (
            "attempt without a message",
            "SELECT DISTINCT a.msg_id FROM attempts a LEFT JOIN messages m ON m.id = a.msg_id WHERE m.id IS NULL",
        ),
    ]
    for what, sql in checks:
        for row in conn.execute(sql + " LIMIT 100").fetchall():
            problems.append(f"{row[0]}: {what}")
    kept = conn.execute(f"SELECT {', '.join(STATS_COLUMNS)} FROM queue_stats WHERE id = 0").fetchone()
    counted = conn.execute(RECOUNT_SQL).fetchone()
    if kept is None or tuple(kept) != tuple(counted):
        problems.append(
            f"queue_stats: kept {None if kept is None else tuple(kept)}, counted {tuple(counted)}"
            f" ({', '.join(STATS_COLUMNS)})"
        )
    return problems
