"""The tracking log's rotation by size, with two writers on one state directory (the main process and a receive
worker): files never grow far past the limit, only ``files`` rotated files stay, and what stays is an unbroken
run of the latest lines, oldest file first."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mxgate.core.tracking import TrackEvent, TrackingLog, log_files, read_records, trace


def test_two_writers_rotate_without_losing_lines_in_between(tmp_path: Path) -> None:
    a = TrackingLog(tmp_path, max_size=4000, files=3)
    b = TrackingLog(tmp_path, max_size=4000, files=3)
    try:
        for i in range(600):  # outside an event loop each write is flushed at once
            (a if i % 2 else b).write(TrackEvent.REJECT, stage="rcpt", n=i)
    finally:
        a.close()
        b.close()
    files = log_files(tmp_path)
    assert [p.name for p in files] == ["tracking.jsonl.3", "tracking.jsonl.2", "tracking.jsonl.1", "tracking.jsonl"]
    for path in files:
        assert path.stat().st_size < 4000 + 200, path
        assert path.stat().st_mode & 0o777 == 0o600, path
    kept = [json.loads(line)["n"] for p in files for line in p.read_text().splitlines()]
    assert kept == list(range(600 - len(kept), 600))  # the newest lines, none missing, in order
    assert [r.get("n") for r in read_records(tmp_path)] == kept


def test_no_rotated_files_kept_with_zero(tmp_path: Path) -> None:
    log = TrackingLog(tmp_path, max_size=1000, files=0)
    for i in range(100):
        log.write(TrackEvent.RECEIVE, queue_id=f"Q{i}", n=i)
    log.close()
    assert [p.name for p in log_files(tmp_path) if p.exists()] == ["tracking.jsonl"]
    assert os.path.getsize(tmp_path / "tracking.jsonl") < 1000 + 200


def test_trace_finds_a_story_across_rotated_files(tmp_path: Path) -> None:
    log = TrackingLog(tmp_path, max_size=2000, files=5)
    log.write(TrackEvent.RECEIVE, queue_id="Q1", message_id="<m@x>")
    for i in range(40):
        log.write(TrackEvent.REJECT, stage="rcpt", n=i)
    log.write(TrackEvent.DELIVER, queue_id="Q1")
    log.close()
    assert len(log_files(tmp_path)) > 2
    assert [r.event for r in trace(tmp_path, "<m@x>", message_id=True)] == ["RECEIVE", "DELIVER"]
    assert [r.event for r in trace(tmp_path, "Q1")] == ["RECEIVE", "DELIVER"]


def test_search_streams_across_rotated_files_in_bounded_memory(tmp_path: Path) -> None:
    import tracemalloc

    from mxgate.core.tracking import TraceFilter, search

    log = TrackingLog(tmp_path, max_size=1_000_000, files=10)
    log.write(TrackEvent.RECEIVE, queue_id="Q0", sender="wanted@ext.test", client="192.0.2.1")
    for i in range(30_000):  # about 4 MB of other mail
        log.write(TrackEvent.RECEIVE, queue_id=f"N{i}", sender=f"other{i}@ext.test", client="198.51.100.7", size=i)
    log.write(TrackEvent.DELIVER, queue_id="Q0", recipient="a@contoso.test")
    log.close()
    assert len(log_files(tmp_path)) >= 4 and sum(p.stat().st_size for p in log_files(tmp_path)) > 3_000_000
    tracemalloc.start()
    try:
        found = [(r.event, r.queue_id) for r in search(tmp_path, TraceFilter(sender="wanted@ext.test"))]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found == [("RECEIVE", "Q0"), ("DELIVER", "Q0")]
    assert peak < 300_000, peak  # a few lines and the matching ids, not the 4 MB log
