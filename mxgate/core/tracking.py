"""The message-tracking log (Exchange's message tracking): one JSON line per step of a message's life.

Events: RECEIVE, REJECT (receive side); ROUTE, ATTEMPT, DELIVER, DEFER, FAIL, DSN (queue and delivery).
``mxgate trace ID`` prints a message's story in order, by queue id or Message-ID.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from mxgate.core.files import open_private
from mxgate.core.textsafe import escape, quote

log = logging.getLogger(__name__)

FILE_NAME = "tracking.jsonl"


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

    def __init__(self, state_dir: Path, *, enabled: bool = True, clock: Any = time.time) -> None:
        self.path = state_dir / FILE_NAME
        self.enabled = enabled
        self.clock = clock
        self._lock = threading.Lock()
        self._fh = os.fdopen(open_private(self.path), "a", encoding="utf-8") if enabled else None  # 0600
        self._pending: list[str] = []

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
        """Write the lines not written yet."""
        with self._lock:
            lines, self._pending = self._pending, []
            if self._fh is None or not lines:
                return
            try:
                self._fh.write("".join(lines))
                self._fh.flush()
            except OSError as exc:  # disk full: the log loses lines, the gateway goes on (the queue is what counts)
                log.warning("tracking log write failed", extra={"error": str(exc), "lines": len(lines)})

    def close(self) -> None:
        self.flush()
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError as exc:
                log.warning("tracking log write failed", extra={"error": str(exc)})


def read_records(state_dir: Path) -> Iterator[TrackRecord]:
    path = state_dir / FILE_NAME
    if not path.exists():
        return
    with path.open(encoding="utf-8", errors="replace") as fh:
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
    equal to another message's queue id must not splice that message's story into its own."""
    records = list(read_records(state_dir))
    if not message_id:
        return [r for r in records if r.queue_id == ident]
    wanted_mid = ident.strip().strip("<>")
    qids = {r.queue_id for r in records if r.message_id is not None and r.message_id.strip().strip("<>") == wanted_mid}
    qids.discard(None)
    return [r for r in records if r.queue_id in qids]


def format_record(r: TrackRecord) -> str:
    """One line: time, event, queue id, then ``key=value`` fields -- every value escaped for the terminal and
    quoted when needed (:func:`mxgate.core.textsafe.quote`), so text from the network can neither drive the
    terminal nor pose as another field."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.ts)) + f".{int(r.ts * 1000) % 1000:03d}Z"
    details = " ".join(f"{escape(k)}={quote(v)}" for k, v in r.fields)
    return f"{when} {escape(r.event):<8} {escape(r.queue_id or '-')} {details}".rstrip()
