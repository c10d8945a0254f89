"""Rejected commands are not free (issue 18, item 3), against a real ``mxgate run``:

* relay-denied RCPTs count towards ``max_errors``; past ``soft_error_limit`` each error reply comes later than the
  one before, and the client gets ``421 4.7.0`` at the limit;
* the rejections of one session are one tracking event (plus one summary), not one line per RCPT;
* the tracking log is rotated by size and only ``tracking_log_files`` rotated files are kept;
* ``mxgate trace`` reads a large log (rotated files included) in bounded memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from reliability_kit import REPO, GatewayProcess, RawClient, free_port, gateway_document, write_config

pytestmark = [pytest.mark.integration]

ERROR_SLEEP = 0.2
SOFT = 3
HARD = 10


def _gateway(tmp_path: Path, *, extra_server: dict[str, Any] | None = None) -> tuple[GatewayProcess, int, Path]:
    port = free_port()
    state = tmp_path / "var"
    doc = gateway_document(
        state,
        port=port,
        smart_host=f"127.0.0.1:{free_port()}",
        extra_server={"max_recipients": 5, **(extra_server or {})},
        extra_listener={"max_errors": HARD, "soft_error_limit": SOFT, "error_sleep": ERROR_SLEEP},
    )
    gw = GatewayProcess(write_config(tmp_path / "mxgate.toml", doc), tmp_path / "gateway.log")
    gw.start(port)
    return gw, port, state


def _tracking_size(state: Path) -> int:
    return sum(p.stat().st_size for p in state.glob("tracking.jsonl*"))


async def _wait_for(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def _relay_attempts(port: int, n: int) -> tuple[list[str], list[float]]:
    """MAIL then ``n`` relay-denied RCPTs pipelined; the reply codes and when each reply came."""
    client = await RawClient.connect("127.0.0.1", port)
    try:
        assert (await client.reply()).code == "220"
        await client.send(b"EHLO attacker.example\r\nMAIL FROM:<a@example.net>\r\n")
        assert [(await client.reply()).code for _ in range(2)] == ["250", "250"]
        await client.send(b"RCPT TO:<victim@elsewhere.example>\r\n" * n)
        codes, times = [], []
        while True:  # ends at EOF (the 421) or at the n-th reply
            reply = await client.reply()
            codes.append(str(reply)[:9] if reply.code not in ("EOF", "TIMEOUT") else reply.code)
            times.append(time.monotonic())
            if reply.code in ("EOF", "TIMEOUT") or len(codes) >= n + 1:
                return codes, times
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_relay_denied_rcpts_count_as_errors_with_growing_delay(tmp_path: Path) -> None:
    gw, port, state = _gateway(tmp_path)
    try:
        await _wait_for(lambda: (state / "tracking.jsonl").exists())
        before = _tracking_size(state)
        results = await asyncio.gather(*(_relay_attempts(port, 200) for _ in range(4)))
        for codes, times in results:
            # 10 refusals, the 421 (same write as the 10th), then the server hangs up: 190 RCPTs never answered
            assert codes == ["550 5.7.1"] * HARD + ["421 4.7.0", "EOF"], codes
            gaps = [b - a for a, b in zip(times[SOFT - 1 : HARD - 2], times[SOFT : HARD - 1], strict=True)]
            # the (SOFT+k)-th error reply waits k * error_sleep: later and later (lower bounds only); the last one,
            # at max_errors, goes out at once with the 421
            for k, gap in enumerate(gaps, start=1):
                assert gap >= 0.9 * k * ERROR_SLEEP, (k, gaps)
        # one REJECT line per session at once, one summary line with repeated=9 at its end
        await _wait_for(lambda: _tracking_size(state) - before > 0 and _summaries(state) >= 4)
        written = _tracking_size(state) - before
        per_rcpt = written / (4 * HARD)
        print(f"\ntracking.jsonl: {written} bytes for {4 * HARD} rejected RCPTs ({per_rcpt:.0f} bytes each)")
        assert per_rcpt < 100, written
        rejects = [r for r in _records(state) if r["event"] == "REJECT"]
        assert len(rejects) == 8, rejects
        assert sorted(r.get("repeated", 0) for r in rejects) == [0, 0, 0, 0, 9, 9, 9, 9]
    finally:
        gw.kill()


@pytest.mark.asyncio
async def test_over_limit_rcpts_are_one_tracking_event(tmp_path: Path) -> None:
    """RCPTs past max_recipients within the overshoot allowance get 452 without errors, and 995 of them write
    two tracking lines, not 995."""
    gw, port, state = _gateway(tmp_path)
    try:
        await _wait_for(lambda: (state / "tracking.jsonl").exists())
        before = _tracking_size(state)
        client = await RawClient.connect("127.0.0.1", port)
        try:
            assert (await client.reply()).code == "220"
            await client.send(b"EHLO many.example\r\nMAIL FROM:<a@example.net>\r\n")
            assert [(await client.reply()).code for _ in range(2)] == ["250", "250"]
            await client.send(b"RCPT TO:<u@example.org>\r\n" * 1000)
            codes = [(await client.reply()).code for _ in range(1000)]
            assert codes == ["250"] * 5 + ["452"] * 995
            await client.send(b"QUIT\r\n")
            assert (await client.reply()).code == "221"
        finally:
            await client.close()
        await _wait_for(lambda: _summaries(state) >= 1)
        written = _tracking_size(state) - before
        print(f"\ntracking.jsonl: {written} bytes for 995 refused RCPTs ({written / 995:.1f} bytes each)")
        assert written < 2000, written
        assert [r.get("repeated", 0) for r in _records(state) if r["event"] == "REJECT"] == [0, 994]
    finally:
        gw.kill()


@pytest.mark.asyncio
async def test_tracking_log_is_rotated_by_size_with_retention(tmp_path: Path) -> None:
    max_size, files = 20_000, 2
    gw, port, state = _gateway(tmp_path, extra_server={"tracking_log_max_size": max_size, "tracking_log_files": files})
    try:
        for _ in range(300):  # each session writes one REJECT line of about 250 bytes: ~75 KB, rotated thrice
            client = await RawClient.connect("127.0.0.1", port)
            try:
                await client.reply()
                await client.send(
                    b"EHLO a.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<v@elsewhere.example>\r\nQUIT\r\n"
                )
                assert [(await client.reply()).code for _ in range(4)] == ["250", "250", "550", "221"]
            finally:
                await client.close()
        await _wait_for(lambda: (state / "tracking.jsonl.2").exists())
        names = sorted(p.name for p in state.glob("tracking.jsonl*"))
        assert names == ["tracking.jsonl", "tracking.jsonl.1", "tracking.jsonl.2"], names
        for name in names:  # a file is rotated at the first write that takes it past max_size
            assert (state / name).stat().st_size < max_size + 2_000, name
        assert _tracking_size(state) < (files + 1) * (max_size + 2_000)
    finally:
        gw.kill()


def _write_log(path: Path, lines: int, *, extra: list[dict[str, Any]] = ()) -> None:  # type: ignore[assignment]
    filler = {
        "event": "REJECT",
        "queue_id": None,
        "message_id": None,
        "stage": "rcpt",
        "reply": "550 5.7.1 Relay access denied: we do not accept mail for elsewhere.example from you",
        "connector": "anonymous",
        "client": "192.0.2.1",
        "helo": "attacker.example",
        "sender": "a@example.net",
        "recipient": "victim@elsewhere.example",
    }
    with path.open("w", encoding="utf-8") as fh:
        for i in range(lines):
            fh.write(json.dumps({"ts": 1_700_000_000 + i / 1000, **filler}) + "\n")
        for record in extra:
            fh.write(json.dumps(record) + "\n")


def test_trace_streams_a_large_rotated_log(tmp_path: Path) -> None:
    state = tmp_path / "var"
    state.mkdir()
    doc = gateway_document(state, port=free_port(), smart_host="127.0.0.1:1")
    config = write_config(tmp_path / "mxgate.toml", doc)
    per_file = 60_000  # ~16 MB each, ~48 MB in all
    receive = {"ts": 1_700_000_000.0, "event": "RECEIVE", "queue_id": "Q1", "message_id": "<m1@x>", "size": 10}
    deliver = {"ts": 1_700_000_100.0, "event": "DELIVER", "queue_id": "Q1", "message_id": None, "host": "h"}
    _write_log(state / "tracking.jsonl.2", per_file, extra=[receive])
    _write_log(state / "tracking.jsonl.1", per_file)
    _write_log(state / "tracking.jsonl", per_file, extra=[deliver])
    size = _tracking_size(state)
    probe = (
        "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
        " print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(p.returncode); print(p.stdout)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            probe,
            sys.executable,
            "-m",
            "mxgate",
            "trace",
            "--config",
            str(config),
            "--message-id",
            "<m1@x>",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=True,
    ).stdout.splitlines()
    rss_kib, rc, story = int(out[0]), int(out[1]), out[2:]
    print(f"\nmxgate trace on {size / 1e6:.0f} MB of log: max RSS {rss_kib / 1024:.0f} MiB")
    assert rc == 0
    assert [line.split()[2] for line in story if line] == ["RECEIVE", "DELIVER"], story
    assert rss_kib < 100 * 1024, rss_kib  # the whole log parsed at once took 328 MiB for 50 MB


def _records(state: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(state.glob("tracking.jsonl*"), reverse=True):
        for line in path.read_text(encoding="utf-8").splitlines():
            out.append(json.loads(line))
    return out


def _summaries(state: Path) -> int:
    return sum(1 for r in _records(state) if r["event"] == "REJECT" and "repeated" in r)
