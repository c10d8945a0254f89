"""Concurrency and durability: Postfix's smtp-source against the gateway, and SIGKILL under load -- every message
answered 250 must be in the queue after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import tomli_w

from mxgate.core.queue.store import QueueStore
from mxgate.testing.gateway import TestGateway, build_document

pytestmark = [pytest.mark.integration]

Start = Callable[..., Awaitable[TestGateway]]
BASE = '[server]\naccepted_domains = ["example.org"]\n'


async def test_smtp_source_concurrent_sessions(mxgate_gateway: Start) -> None:
    gw = await mxgate_gateway(BASE)
    count, sessions = 400, 20
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "/usr/sbin/smtp-source", "-s", str(sessions), "-m", str(count), "-l", "10240", "-f", "load@example.net",
        "-t", "rcpt@example.org", f"{gw.smtp_host}:{gw.smtp_port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 45)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, out.decode()
    assert gw.runtime.queue is not None
    msgs = await gw.runtime.queue.list(limit=count + 10)
    assert len(msgs) == count
    assert all(m.size > 10240 for m in msgs)
    print(f"smtp-source: {count} x 10 KiB in {elapsed:.2f} s = {count / elapsed:.0f} msg/s ({sessions} sessions)")


async def _client(port: int, acked: list[str], stop: asyncio.Event, n: int) -> None:
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await r.readline()
        w.write(b"EHLO load.example\r\n")
        while True:
            line = await r.readline()
            if not line:
                return
            if line.startswith(b"250 "):
                break
        body = b"Subject: crash test\r\n\r\n" + (b"x" * 98 + b"\r\n") * 20
        for i in range(n):
            if stop.is_set():
                break
            w.write(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n")
            for _ in range(3):
                await r.readline()
            w.write(body + f"{i}\r\n.\r\n".encode())
            line = await r.readline()
            m = re.match(rb"250 2\.0\.0 Ok: queued as (\S+)", line)
            if m is None:
                break
            acked.append(m.group(1).decode())
    except (ConnectionError, OSError):
        pass


async def test_sigkill_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    document = build_document(BASE, tmp_path)
    config = tmp_path / "mxgate.toml"
    config.write_text(tomli_w.dumps(document))
    port = int(document["listener"][0]["address"].rsplit(":", 1)[1])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mxgate", "run", "--config", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                assert time.monotonic() < deadline, "gateway did not start"
                await asyncio.sleep(0.1)
        acked: list[str] = []
        stop = asyncio.Event()
        clients = [asyncio.create_task(_client(port, acked, stop, 2000)) for _ in range(16)]
        while len(acked) < 200 and time.monotonic() < deadline + 10:
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # mid-flight: sessions are in every state
        await proc.wait()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), 10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert len(acked) >= 200
    store = await QueueStore.open(Path(document["server"]["state_dir"]))
    try:
        assert await store.integrity_check() == []
        present = {m.id for m in await store.list(limit=100_000)}
        missing = [qid for qid in acked if qid not in present]
        assert missing == [], f"{len(missing)} acknowledged messages lost"
    finally:
        await store.close()
