"""The message-tracking log (Exchange's message tracking): one JSON line per step of a message's life.

Events: RECEIVE, REJECT (receive side); ROUTE, ATTEMPT, DELIVER, DEFER, FAIL, DSN (queue and delivery); ADMIN
(an operator's ``mxgate queue hold/release/delete/flush``: ``action`` and ``by`` whom).
``mxgate trace ID`` prints a message's story in order, by queue id, the id of our ``Received:`` header or
Message-ID; ``mxgate trace --from/--to/--client/--since`` finds the messages (and rejections) that match.

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
import ipaddress
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
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

# json.dumps with arguments builds a new encoder on every call; one record per step of every message is hot
_ENCODE = json.JSONEncoder(default=str, separators=(",", ":")).encode


class TrackEvent(StrEnum):
    RECEIVE = "RECEIVE"
    REJECT = "REJECT"
    ROUTE = "ROUTE"
    ATTEMPT = "ATTEMPT"
    DELIVER = "DELIVER"
    DEFER = "DEFER"
    FAIL = "FAIL"
    DSN = "DSN"
    ADMIN = "ADMIN"


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
        self._ino = -1  # inode of the file open in _fh
        self._fh = self._open() if enabled else None
        self._pending: list[str] = []

    def _open(self) -> TextIO:
        """The log file for appending; a new one is created 0600 (it names senders and clients)."""
        fh = os.fdopen(open_private(self.path), "a", encoding="utf-8")
        self._ino = os.fstat(fh.fileno()).st_ino
        return fh

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
        line = _ENCODE(record) + "\n"
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
            same = os.stat(self.path).st_ino == self._ino
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
    """Every record of one message by its queue id (or the id of the ``Received:`` header we added, which the
    RECEIVE record keeps as ``received_id``); with ``message_id``, of every message whose Message-ID is
    ``ident`` (with or without angle brackets). The two are never mixed: a sender chooses its Message-ID, and one
    equal to another message's queue id must not splice that message's story into its own.

    Two streaming passes (the queue ids first, then their records): memory holds the matches, not the log."""
    if not message_id:
        qids = {
            r.queue_id
            for r in read_records(state_dir)
            if r.queue_id == ident or (r.event == TrackEvent.RECEIVE and r.get("received_id") == ident)
        }
    else:
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


@dataclass(frozen=True, slots=True)
class TraceFilter:
    """What ``mxgate trace --from/--to/--client/--since`` asks for; every criterion given must hold.

    ``sender`` and ``client`` are matched on a message's RECEIVE record (and on REJECT records, which have no
    queue id and are shown themselves), ``recipient`` on the records that name one recipient (ROUTE, DELIVER,
    DEFER, FAIL; a REJECT at RCPT), ``since`` on any record. Addresses compare without case and angle brackets;
    ``<>`` is the null sender."""

    sender: str | None = None
    recipient: str | None = None
    client: str | None = None
    since: float | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.sender, self.recipient, self.client, self.since))


def _address(value: object) -> str:
    text = str(value).strip()
    return "<>" if text in ("", "<>") else text.strip("<>").lower()


def _client(value: object) -> str:
    """An address in one spelling (``[IPv6:2001:DB8::0:1]`` is ``2001:db8::1``)."""
    text = str(value).strip().strip("[]").lower().removeprefix("ipv6:")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def _received_matches(r: TrackRecord, flt: TraceFilter) -> bool:
    if flt.sender is not None and _address(r.get("sender", "")) != _address(flt.sender):
        return False
    return flt.client is None or _client(r.get("client", "")) == _client(flt.client)


def _names_recipient(r: TrackRecord, wanted: str) -> bool:
    value = r.get("recipient")
    return value is not None and _address(value) == wanted


def search(state_dir: Path, flt: TraceFilter) -> Iterator[TrackRecord]:
    """The stories of every message that matches ``flt``, and the REJECT records that match it, in log order.

    Two streaming passes, like :func:`trace`: the first collects the queue ids that match each criterion, the
    second yields their records; memory holds the matching ids, never the records or the log."""
    by_receive: set[str] | None = set() if flt.sender is not None or flt.client is not None else None
    by_recipient: set[str] | None = set() if flt.recipient is not None else None
    by_time: set[str] | None = set() if flt.since is not None else None
    wanted_rcpt = _address(flt.recipient) if flt.recipient is not None else ""
    for r in read_records(state_dir):
        if r.queue_id is None:
            continue
        if by_receive is not None and r.event == TrackEvent.RECEIVE and _received_matches(r, flt):
            by_receive.add(r.queue_id)
        if by_recipient is not None and _names_recipient(r, wanted_rcpt):
            by_recipient.add(r.queue_id)
        if by_time is not None and flt.since is not None and r.ts >= flt.since:
            by_time.add(r.queue_id)
    chosen: set[str] | None = None
    for found in (by_receive, by_recipient, by_time):
        if found is not None:
            chosen = found if chosen is None else chosen & found
    if chosen is None:  # an empty filter chooses nothing (``trace`` wants an id or a criterion)
        return
    for r in read_records(state_dir):
        if r.queue_id is not None:
            if r.queue_id in chosen:
                yield r
        elif r.event == TrackEvent.REJECT and _reject_matches(r, flt, wanted_rcpt):
            yield r


def _reject_matches(r: TrackRecord, flt: TraceFilter, wanted_rcpt: str) -> bool:
    if flt.since is not None and r.ts < flt.since:
        return False
    if flt.recipient is not None and not _names_recipient(r, wanted_rcpt):
        return False
    return _received_matches(r, flt)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, *, now: float) -> float:
    """``--since``: an age (``90s``, ``30m``, ``2h``, ``7d``) or an ISO 8601 date or time (UTC unless it names
    its offset). Raises :class:`ValueError` with the accepted forms."""
    t = text.strip()
    if len(t) > 1 and t[-1] in _UNITS and t[:-1].isdigit():
        return now - int(t[:-1]) * _UNITS[t[-1]]
    try:
        when = datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(
            f"{t!r} is neither an age (30m, 2h, 7d) nor an ISO time (2026-12-07, 2026-12-07T01:30)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


TIME_FIELDS = frozenset({"next_attempt", "retry_until", "expires", "not_after"})


def readable(key: str, value: Any) -> Any:
    """A field as an operator reads it: times (``next_attempt``, ``*_at``) as ISO 8601 UTC instead of epoch
    seconds, and counts (``results={"failed": 1}``) as words (``1 failed``). Other values unchanged."""
    if isinstance(value, int | float) and not isinstance(value, bool) and (key in TIME_FIELDS or key.endswith("_at")):
        return _iso(float(value))
    if (
        isinstance(value, dict)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value.values())
    ):
        return ", ".join(f"{v} {k}" for k, v in value.items())
    return value


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def format_record(r: TrackRecord) -> str:
    """One line: time, event, queue id, then ``key=value`` fields -- made :func:`readable`, every value escaped
    for the terminal and quoted when needed (:func:`mxgate.core.textsafe.quote`), so text from the network can
    neither drive the terminal nor pose as another field."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.ts)) + f".{int(r.ts * 1000) % 1000:03d}Z"
    details = " ".join(f"{escape(k)}={quote(readable(k, v))}" for k, v in r.fields)
    return f"{when} {escape(r.event):<8} {escape(r.queue_id or '-')} {details}".rstrip()
