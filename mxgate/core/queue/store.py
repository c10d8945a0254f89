"""The durable queue store: SQLite in WAL mode, embedded, no server.

:class:`QueueStore` is the queue's API (accept, lease, record results, administration, reads). Its parts: the schema
and its migrations in :mod:`mxgate.core.queue.schema`, the writer thread with group commit (durability: ``put``
returns once the message is fsync'd) in :mod:`mxgate.core.queue.writer`, the row mapping and the read-only queries
in :mod:`mxgate.core.queue.queries`, the errors in :mod:`mxgate.core.queue.errors`. Reads run on a second thread
with its own connection (WAL readers never block the writer). Blocking SQLite work never runs on the event loop.

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
``sqlite3`` errors never leave the store (:mod:`mxgate.core.queue.errors`): disk full becomes
:class:`QueueFullError` (the receive side answers ``452 4.3.1``), everything else :class:`QueueError`.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import functools
import math
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar

import mxgate.core.queue.queries as queries
from mxgate.core.messages import (
    NO_OPTIONS,
    MessageOptions,
    NewRecipient,
    QueuedMessage,
    QueuedRecipient,
    RecipientStatus,
)
from mxgate.core.metadata import MessageMeta, MetaInput
from mxgate.core.queue.errors import MessageNotFoundError, QueueError, QueueFullError, map_error
from mxgate.core.queue.queries import Attempt, QueueCounts, applied, load, load_one, meta_column, require
from mxgate.core.queue.schema import open_connections
from mxgate.core.queue.writer import Writer

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
MAX_HEADER_BYTES: Final = 64 * 1024
_ID_RETRIES: Final = 5


class RecipientResult(NamedTuple):
    """One recipient's outcome for :meth:`QueueStore.record_results` (plain 4-tuples work too)."""

    recipient: str
    status: RecipientStatus
    reply: str
    next_attempt: float | None  # required for DEFERRED; ignored for final results


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counters of this store object (this process) since it was opened."""

    commits: int  # transactions committed by the writer
    fsyncs: int  # commits that fsynced the WAL (those with a durable job)
    puts: int  # messages accepted by put()
    jobs: int  # write jobs that succeeded (puts included)
    failed_jobs: int
    largest_batch: int  # most jobs in one commit


def _header_section(data: bytes) -> bytes:
    """The header section of a message (up to and including the blank line's first line end), capped."""
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    if ends:
        end = min(ends)
        head = data[: end + (2 if data[end : end + 2] == b"\r\n" else 1)]
    else:
        head = data
    return head[:MAX_HEADER_BYTES]


# -- the store -------------------------------------------------------------------------------------------


class QueueStore:
    """The durable message queue of one state directory. Open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, path: Path, writer: Writer, reader: sqlite3.Connection) -> None:
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
            writer_conn, reader_conn = await asyncio.to_thread(open_connections, path, max_db_bytes)
        except (sqlite3.Error, OSError) as exc:
            raise QueueError(f"{path}: cannot open queue store: {exc}") from exc
        store = cls(path, Writer(writer_conn), reader_conn)
        if release_leases:
            try:
                await store._write(lambda c: c.execute("UPDATE messages SET lease_until = 0 WHERE lease_until > 0"))
            except BaseException:
                await store.close()
                raise
        return store

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
                raise map_error(exc) from exc

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
        meta_json = meta_column(meta_value)
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

    # -- read (the queries are in mxgate.core.queue.queries) ---------------------------------------------------

    async def get(self, msg_id: str) -> QueuedMessage | None:
        """A message (active or finished tombstone), or ``None``."""
        found = await self._read(lambda c: load(c, [msg_id]))
        return found[0] if found else None

    async def body(self, msg_id: str) -> bytes:
        """The message as received. :raises MessageNotFoundError: unknown, deleted or finished."""
        return await self._read(lambda c: queries.body(c, msg_id))

    async def headers(self, msg_id: str) -> bytes:
        """The header section (kept after the message is finished, for DSNs). :raises MessageNotFoundError:"""
        return await self._read(lambda c: queries.headers(c, msg_id))

    async def list(
        self, *, limit: int = 1000, include_finished: bool = False, after: str | None = None
    ) -> builtins.list[QueuedMessage]:
        """Up to ``limit`` messages in arrival (id) order, after the id ``after`` (the last of the previous page);
        active ones only unless ``include_finished``. One page costs its own rows (an index walk from ``after``),
        whatever the queue holds."""
        return await self._read(
            functools.partial(queries.page, limit=limit, include_finished=include_finished, after=after)
        )

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
        return await self._read(
            functools.partial(
                queries.select,
                sender=sender,
                recipient=recipient,
                received_before=received_before,
                include_finished=include_finished,
                limit=limit,
                after=after,
            )
        )

    async def get_many(self, msg_ids: builtins.list[str]) -> builtins.list[QueuedMessage]:
        """The messages with these ids that exist, in the order given."""

        return await self._read(lambda c: load(c, msg_ids))

    async def attempts(self, msg_id: str) -> builtins.list[Attempt]:
        """Every recorded attempt of a message, oldest first."""
        return await self._read(lambda c: queries.attempts(c, msg_id))

    async def counts(self, *, now: float) -> QueueCounts:
        """The queue's figures without scanning it: the ``queue_stats`` row (kept by triggers as rows change), the
        leased messages by their index (at most those in flight) and the oldest active message by id (ids begin
        with the time of arrival)."""
        return await self._read(lambda c: queries.counts(c, now))

    async def recount(self) -> dict[str, int]:
        """The figures behind :meth:`counts` counted from the rows (a full scan, for checks and tests), next to
        :meth:`stats_row`, what the triggers kept."""
        return await self._read(queries.recount)

    async def stats_row(self) -> dict[str, int]:
        """The ``queue_stats`` row the triggers keep (see :meth:`recount`)."""
        return await self._read(queries.stats_row)

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
            return load(conn, builtins.list(ids))

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
                    current = load_one(conn, msg_id).recipient(r.recipient)  # only to say why
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
                return load_one(conn, msg_id)
            return applied(known, checked, routes or {}, finished_at=now if pending == 0 else None)

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
            require(conn, msg_id)
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
                require(conn, msg_id)
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
        return await self._read(queries.integrity_problems)
