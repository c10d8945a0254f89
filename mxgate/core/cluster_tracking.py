"""Message tracking across the cluster: every node ships its tracking log to PostgreSQL; ``mxgate trace`` on any
node reads the whole story from there, each record with the node that wrote it.

The node's own ``tracking.jsonl`` (and its rotated files) is the buffer: a shipper in the main process reads it
from where it stopped, every second, and inserts the complete lines keyed by (node, file, byte offset), so a
round repeated after a lost connection or a crash inserts nothing twice (``ON CONFLICT DO NOTHING``). Where it
stopped is kept in ``tracking.shipped`` in the state directory (written after the database has the lines). A
file is named by its inode and a digest of its first line, which carries a microsecond time stamp: a recycled
inode is a different file. With the database away, nothing waits: the log grows as always and is shipped when
the database returns (unless rotation deleted it first: ``tracking_log_files`` bounds that).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from mxgate.core.cluster_db import ClusterUnavailable, PgConnection, SharedDb
from mxgate.core.files import private_file
from mxgate.core.tracking import TrackRecord, log_files

log = logging.getLogger(__name__)

STATE_NAME: Final = "tracking.shipped"
SHIP_INTERVAL: Final = 1.0
BATCH_LINES: Final = 5000  # lines per transaction; a round goes on until the log is shipped
PURGE_EVERY: Final = 3600.0


@dataclass(frozen=True, slots=True)
class _Position:
    file_id: str
    offset: int


def file_id(path: Path) -> str | None:
    """``<inode>-<digest of the first line>``; None for a missing or empty file (or no complete line yet)."""
    try:
        with path.open("rb") as fh:
            first = fh.readline()
            inode = os.fstat(fh.fileno()).st_ino
    except FileNotFoundError:
        return None
    if not first.endswith(b"\n"):
        return None
    return f"{inode}-{hashlib.sha256(first).hexdigest()[:16]}"


def _parse(line: bytes) -> tuple[float, str, str | None, str | None] | None:
    try:
        raw = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(raw, dict):
        return None
    try:
        return float(raw.get("ts", 0.0)), str(raw.get("event", "?")), raw.get("queue_id"), raw.get("message_id")
    except (TypeError, ValueError):
        return None


class TrackingShipper:
    """Ships ``state_dir``'s tracking log to the cluster's ``mxgate_tracking`` table (see the module docstring)."""

    def __init__(self, db: SharedDb, state_dir: Path, *, clock: Any = time.time, retention_days: int = 30) -> None:
        self.db = db
        self.retention_days = retention_days  # records older than this are deleted from the shared table
        self.state_dir = state_dir
        self.state_path = state_dir / STATE_NAME
        self.clock = clock
        self._last_purge = 0.0
        self._failed = False

    def _load(self) -> _Position | None:
        try:
            doc = json.loads(self.state_path.read_text(encoding="utf-8"))
            return _Position(str(doc["file"]), int(doc["offset"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _save(self, pos: _Position) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        private_file(tmp)
        tmp.write_text(json.dumps({"file": pos.file_id, "offset": pos.offset}), encoding="utf-8")
        os.replace(tmp, self.state_path)

    def _next_batch(self) -> tuple[_Position, _Position, list[tuple[int, bytes]]] | None:
        """(where the batch starts, where it ends, [(offset, line)]) of the oldest unshipped complete lines."""
        files = [(p, fid) for p in log_files(self.state_dir) if (fid := file_id(p)) is not None]
        if not files:
            return None
        pos = self._load()
        index = next((i for i, (_, fid) in enumerate(files) if pos is not None and fid == pos.file_id), None)
        if index is None:  # first run, or the file was rotated away: from the oldest file still there
            index, pos = 0, _Position(files[0][1], 0)
        assert pos is not None
        for i in range(index, len(files)):
            path, fid = files[i]
            start = pos.offset if fid == pos.file_id else 0
            lines: list[tuple[int, bytes]] = []
            offset = start
            with contextlib.suppress(FileNotFoundError), path.open("rb") as fh:
                fh.seek(start)
                while len(lines) < BATCH_LINES:
                    line = fh.readline()
                    if not line.endswith(b"\n"):
                        break  # EOF, or a line still being written
                    lines.append((offset, line))
                    offset += len(line)
            if lines:
                return _Position(fid, start), _Position(fid, offset), lines
            if i + 1 < len(files):  # this file is done: the next one, from its start
                pos = _Position(files[i + 1][1], 0)
                self._save(pos)
        return None

    async def ship(self) -> int:
        """Ship everything complete now; returns the lines shipped (0 with the database away)."""
        shipped = 0
        node = self.db.node
        while True:
            batch = await asyncio.to_thread(self._next_batch)
            if batch is None:
                return shipped
            _start, end, lines = batch
            rows = []
            for offset, line in lines:
                parsed = _parse(line)
                if parsed is not None:
                    rows.append((node, end.file_id, offset, *parsed, line.decode("utf-8", "replace").rstrip("\n")))

            def job(c: PgConnection, rows: Sequence[tuple[Any, ...]] = rows) -> None:
                c.executemany(
                    "INSERT INTO mxgate_tracking (node, file_id, pos, ts, event, queue_id, message_id, line)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    rows,
                )

            try:
                await self.db.write(job)
            except ClusterUnavailable as exc:
                if not self._failed:
                    log.warning(
                        "tracking log kept locally until the cluster database returns", extra={"error": str(exc)}
                    )
                self._failed = True
                return shipped
            self._failed = False
            await asyncio.to_thread(self._save, end)
            shipped += len(lines)

    async def purge(self) -> None:
        cutoff = self.clock() - self.retention_days * 86400
        await self.db.run(lambda c: c.execute("DELETE FROM mxgate_tracking WHERE ts < ?", (cutoff,)))

    async def run(self) -> None:
        while True:
            try:
                await self.ship()
                if self.clock() - self._last_purge >= PURGE_EVERY:
                    self._last_purge = self.clock()
                    await self.purge()
            except ClusterUnavailable:
                pass
            except Exception:
                log.exception("tracking shipper round failed")
            await asyncio.sleep(SHIP_INTERVAL)


def _record(node: str, line: str) -> TrackRecord | None:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(raw, dict):
        return None
    ts, event = raw.pop("ts", 0.0), raw.pop("event", "?")
    qid, mid = raw.pop("queue_id", None), raw.pop("message_id", None)
    return TrackRecord(float(ts), str(event), qid, mid, (("node", node), *raw.items()))


def trace(db: SharedDb, ident: str, *, message_id: bool = False) -> list[TrackRecord]:
    """The story of one message (by queue id) or of every message with a Message-ID, across the nodes, in time
    order; each record names its node. Runs on the caller's thread (the CLI)."""

    def job(c: PgConnection) -> list[Any]:
        if message_id:
            wanted = ident.strip().strip("<>")
            qids = [
                r[0]
                for r in c.execute(
                    "SELECT DISTINCT queue_id FROM mxgate_tracking WHERE message_id IN (?, ?) AND queue_id IS NOT NULL",
                    (wanted, f"<{wanted}>"),
                ).fetchall()
            ]
        else:
            qids = [ident]
        rows: list[Any] = []
        for qid in qids:
            rows += c.execute(
                "SELECT node, line, ts, file_id, pos FROM mxgate_tracking WHERE queue_id = ?", (qid,)
            ).fetchall()
        return rows

    rows = db.call(job)
    rows.sort(key=lambda r: (float(r[2]), str(r[0]), str(r[3]), int(r[4])))
    return [rec for rec in (_record(str(r[0]), str(r[1])) for r in rows) if rec is not None]
