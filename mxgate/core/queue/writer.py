"""The queue store's single writer thread: group commit.

Every write goes to ONE writer thread that owns its own SQLite connection. The writer takes every job that
is pending (up to a batch limit), runs them in ONE ``BEGIN IMMEDIATE`` transaction, each job inside its own
savepoint, commits, and only then resolves the waiting asyncio futures with ``loop.call_soon_threadsafe``.
A batch that holds a *durable* job (:meth:`~mxgate.core.queue.store.QueueStore.put`, the administrative changes)
commits with ``PRAGMA synchronous=FULL`` (WAL mode: the commit fsyncs the WAL); so ``put`` returns only after
the message is on disk, and concurrent sessions share one fsync. The scheduler's bookkeeping (leases, results)
commits with ``synchronous=NORMAL``: no fsync of its own, but it survives a crash of the process (the WAL is in
the OS's page cache), and the next durable commit fsyncs it too. Only a power failure can undo such a commit,
and that undoes nothing a sender was promised: a lost "delivered" record means one more delivery (at least
once, never lost), a lost lease means nothing (leases are released at start-up).

A job that fails rolls back its own savepoint and gets its exception; the rest of the batch still commits.
If SQLite abandons the whole transaction (disk full can do that) or the commit fails, every job of the batch
fails. No job is ever reported done unless its transaction committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import queue
import secrets
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

from mxgate.core.queue.errors import QueueError, map_error

__all__ = ["MAX_BATCH_BYTES", "MAX_BATCH_JOBS", "Writer"]

T = TypeVar("T")

MAX_BATCH_JOBS: Final = 1_000
MAX_BATCH_BYTES: Final = 64 * 1024 * 1024


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


class Writer:
    """The single writer thread: group commit of every pending job."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._ids = _IdGenerator()
        self._synchronous = "FULL"  # what schema.open_connections set
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
            fatal = map_error(exc)
        if fatal is None:
            for job in batch:
                if savepoints:
                    try:
                        conn.execute("SAVEPOINT job")
                    except sqlite3.Error as exc:
                        fatal = map_error(exc)
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
                        fatal = map_error(exc)
                        break
                    try:
                        conn.execute("ROLLBACK TO job")
                        conn.execute("RELEASE job")
                    except sqlite3.Error as exc2:
                        fatal = map_error(exc2)
                        break
                    outcomes.append((None, map_error(exc)))
                else:
                    if savepoints:
                        try:
                            conn.execute("RELEASE job")
                        except sqlite3.Error as exc:
                            fatal = map_error(exc)
                            break
                    outcomes.append((value, None))
        if fatal is None:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                fatal = map_error(exc)
        if fatal is not None:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        return outcomes, fatal
