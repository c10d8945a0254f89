"""The message-tracking log (Exchange's message tracking): one JSON line per step of a message's life.

Events: RECEIVE, REJECT (receive side); ROUTE, ATTEMPT, DELIVER, DEFER, FAIL, DSN (queue and delivery).
``mxgate trace ID`` prints a message's story in order, by queue id or Message-ID.

The log is rotated by size (``server.tracking_log_max_size``): ``tracking.jsonl`` becomes ``tracking.jsonl.1``,
older files shift up and those beyond ``server.tracking_log_files`` are deleted. Receive workers append to the
same file from other processes: rotation happens under an ``flock`` and each writer reopens the file when the
name points at a new one. ``trace`` reads the files as a stream (twice: the ids first, then their records), so
its memory does not grow with the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO

from mxgate.core.files import open_private
from mxgate.core.textsafe import escape, quote

log = logging.getLogger(__name__)

FILE_NAME = "tracking.jsonl"
LOCK_NAME = "tracking.lock"
DEFAULT_MAX_SIZE = 100 * 1024 * 1024
DEFAULT_FILES = 10


class TrackEvent(StrEnum):
    RECEIVE = "RECEIVE"
    REJECT = "REJECT"
    ROUTE = "ROUTE"
    ATTEMPT = "ATTEMPT"
    DELIVER = "DELIVER"
    DEFER = "DEFER"
    FAIL = "FAIL"
    DSN = "DSN"


@dataclass(frozen=True, slots=True)
class TrackRecord:
    ts: float
    event: str
    queue_id: str | None
    message_id: str | None
    fields: tuple[tuple[str, Any], ...]

    def get(self, name: str, default: Any = None) -> Any:
        return next((v for k, v in self.fields if k == name), default)


class TrackingLog:
    """Appends JSON lines; cheap enough for the hot path. Inside an event loop the lines of one loop iteration
    are written together when the iteration ends (one write for the several events a busy gateway records at
    once); outside one, at once. No fsync: the queue store, not this log, is what makes acceptance durable, and
    a crash loses at most the lines of the iteration in progress."""

    def __init__(
        self,
        state_dir: Path,
        *,
        enabled: bool = True,
        clock: Any = time.time,
        max_size: int = DEFAULT_MAX_SIZE,
        files: int = DEFAULT_FILES,
    ) -> None:
        self.path = state_dir / FILE_NAME
        self.enabled = enabled
        self.clock = clock
        self.max_size = max_size
        self.files = files
        self._lock = threading.Lock()
        self._fh = self._open() if enabled else None
        self._pending: list[str] = []

    def _open(self) -> TextIO:
        """The log file for appending; a new one is created 0600 (it names senders and clients)."""
        return os.fdopen(open_private(self.path), "a", encoding="utf-8")

    def write(
        self, event: TrackEvent, *, queue_id: str | None = None, message_id: str | None = None, **fields: Any
    ) -> None:
        if self._fh is None:
            return
        record = {
            "ts": round(self.clock(), 6),
            "event": str(event),
            "queue_id": queue_id,
            "message_id": message_id,
            **{k: v for k, v in fields.items() if v is not None},
        }
        line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._pending.append(line)
            if loop is not None and len(self._pending) > 1:
                return  # a flush is already scheduled
        if loop is None:
            self.flush()
        else:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the lines not written yet (and rotate when the file has reached ``max_size``)."""
        with self._lock:
            lines, self._pending = self._pending, []
            if self._fh is None or not lines:
                return
            try:
                self._reopen_if_rotated()
                self._fh.write("".join(lines))
                self._fh.flush()
                if self._fh.tell() >= self.max_size:
                    self._rotate()
            except OSError as exc:  # disk full: the log loses lines, the gateway goes on (the queue is what counts)
                log.warning("tracking log write failed", extra={"error": str(exc), "lines": len(lines)})

    def _reopen_if_rotated(self) -> None:
        """Another process (a receive worker, or the main process) rotated the file: follow the name."""
        assert self._fh is not None
        try:
            same = os.stat(self.path).st_ino == os.fstat(self._fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            self._fh.close()
            self._fh = self._open()

    def _rotate(self) -> None:
        assert self._fh is not None
        with open(os.open(self.path.parent / LOCK_NAME, os.O_WRONLY | os.O_CREAT, 0o600), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:  # only the file we are writing is rotated: another process may have done it already
                current = os.stat(self.path).st_ino == os.fstat(self._fh.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if current:
                rotated = rotated_paths(self.path.parent, self.files + 1)
                for path in rotated[self.files - 1 :]:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                for n in range(min(len(rotated), self.files) - 1, 0, -1):
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(rotated[n - 1], rotated[n])
                if self.files > 0:
                    os.rename(self.path, rotated[0])
                else:
                    self.path.unlink()
            self._fh.close()
            self._fh = self._open()

    def close(self) -> None:
        self.flush()
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError as exc:
                log.warning("tracking log write failed", extra={"error": str(exc)})


def rotated_paths(state_dir: Path, files: int) -> list[Path]:
    """``tracking.jsonl.1`` (the newest rotated file) .. ``tracking.jsonl.<files>``."""
    return [state_dir / f"{FILE_NAME}.{n}" for n in range(1, files + 1)]


def log_files(state_dir: Path) -> list[Path]:
    """The log's files, oldest first: the rotated ones (``.N`` .. ``.1``), then ``tracking.jsonl``."""
    numbered = []
    for path in state_dir.glob(f"{FILE_NAME}.*"):
        suffix = path.name[len(FILE_NAME) + 1 :]
        if suffix.isdigit():
            numbered.append((int(suffix), path))
    return [p for _, p in sorted(numbered, reverse=True)] + [state_dir / FILE_NAME]


def read_records(state_dir: Path) -> Iterator[TrackRecord]:
    """Every record, oldest first, one line at a time."""
    for path in log_files(state_dir):
        try:
            fh = path.open(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue  # rotated away meanwhile, or no log yet
        with fh:
            for line in fh:
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line after a crash
                if not isinstance(raw, dict):
                    continue
                ts, event = raw.pop("ts", 0.0), raw.pop("event", "?")
                qid, mid = raw.pop("queue_id", None), raw.pop("message_id", None)
                yield TrackRecord(float(ts), str(event), qid, mid, tuple(raw.items()))


def trace(state_dir: Path, ident: str, *, message_id: bool = False) -> list[TrackRecord]:
    """Every record of one message by its queue id; with ``message_id``, of every message whose Message-ID is
    ``ident`` (with or without angle brackets). The two are never mixed: a sender chooses its Message-ID, and one
    equal to another message's queue id must not splice that message's story into its own.

    Two streaming passes (the queue ids first, then their records): memory holds the matches, not the log."""
    if not message_id:
        return [r for r in read_records(state_dir) if r.queue_id == ident]
    wanted_mid = ident.strip().strip("<>")
    qids = {
        r.queue_id
        for r in read_records(state_dir)
        if r.message_id is not None and r.message_id.strip().strip("<>") == wanted_mid
    }
    qids.discard(None)
    if not qids:
        return []
    return [r for r in read_records(state_dir) if r.queue_id in qids]


def format_record(r: TrackRecord) -> str:
    """One line: time, event, queue id, then ``key=value`` fields -- every value escaped for the terminal and
    quoted when needed (:func:`mxgate.core.textsafe.quote`), so text from the network can neither drive the
    terminal nor pose as another field."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.ts)) + f".{int(r.ts * 1000) % 1000:03d}Z"
    details = " ".join(f"{escape(k)}={quote(v)}" for k, v in r.fields)
    return f"{when} {escape(r.event):<8} {escape(r.queue_id or '-')} {details}".rstrip()
