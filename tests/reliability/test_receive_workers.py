"""Receive workers (``server.receive_workers``): ``mxgate run`` as an operator starts it, real clients in
(smtp-source and raw sessions), a real sink out, the real metrics endpoint scraped.

What must hold: the worker accepts on the main process's listener and its messages are delivered exactly like the
main process's; the metrics describe one gateway (the same figures as one process for the same sessions); a
worker that dies is started again and nothing answered 250 is lost; a stop, or the main process's death, leaves
no process behind; the worker never opens the queue (the main process queues its messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from reliability_kit import (
    GatewayProcess,
    child_pids,
    free_port,
    gateway_command,
    gateway_document,
    write_config,
)

from mxgate.testing.sinks import SmtpSink

pytestmark = [pytest.mark.integration]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# A plugin, loaded from a file in every process: it tags each message with the pid that received it, and fails
# EHLO for one name (a plugin error to count).
PLUGIN = """
import os
from mxgate.core.hookspecs import hookimpl

@hookimpl
def mxgate_receive_on_end_of_data(message):
    message.add_header("X-Receiver-Pid", str(os.getpid()))

@hookimpl
def mxgate_receive_on_ehlo_command(hostname):
    if hostname == "boom.test":
        raise RuntimeError("boom")
"""


def listen_backlog(port: int) -> int:
    """The accept queue's limit of the socket listening on ``port`` (``ss`` shows it as Send-Q of a listener)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    (line,) = out.splitlines()
    return int(line.split()[2])


def open_files(pid: int) -> list[str]:
    """What a process's descriptors point at (one may close while we look)."""
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            out.append(os.readlink(fd))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def settled(port: int, ready: Any, timeout: float = 15.0) -> Samples:
    """Scrape until ``ready(samples)`` (what the workers report arrives within a second or so; bounded), then once
    more a little later, so that a figure still moving past its expected value shows."""
    deadline = time.monotonic() + timeout
    while not ready(scrape(port)) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.2)  # one more stats interval: nothing may come after
    return scrape(port)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class Setup:
    def __init__(self, tmp: Path, sink: SmtpSink, workers: int, state: Path | None = None) -> None:
        self.port = free_port()
        (tmp / "pidtag.py").write_text(PLUGIN)
        doc = gateway_document(
            state or tmp / "state",
            port=self.port,
            smart_host=f"127.0.0.1:{sink.port}",
            extra_server={"receive_workers": workers},
        )
        doc["plugins"] = {"load": ["pidtag.py"]}
        doc["inbound_connector"] = [{"name": "lab", "sender_ips": ["127.0.0.0/8"], "may_relay": True}]
        self.metrics_port = int(doc["metrics"]["listen"].rsplit(":", 1)[1])
        self.gw = GatewayProcess(write_config(tmp / "mxgate.toml", doc), tmp / "gateway.log")

    def worker_pids(self) -> set[int]:
        return child_pids(self.gw.pid)


@contextlib.contextmanager
def running(tmp: Path, sink: SmtpSink, workers: int, *, state: Path | None = None) -> Iterator[Setup]:
    setup = Setup(tmp, sink, workers, state)
    try:
        setup.gw.start(setup.port)
        if workers:
            wait_until(lambda: len(setup.worker_pids()) == workers, 20, "the workers")
        yield setup
    finally:
        setup.gw.kill()


async def smtp_source(port: int, count: int, sessions: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        "/usr/sbin/smtp-source", "-s", str(sessions), "-m", str(count), "-l", "2048", "-f", "load@example.net",
        "-t", "rcpt@example.org", f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()


async def boom_session(port: int) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        await asyncio.wait_for(r.readline(), 10)
        w.write(b"EHLO boom.test\r\n")
        reply = await asyncio.wait_for(r.readline(), 10)
        w.write(b"QUIT\r\n")
        await asyncio.wait_for(r.read(), 10)
        return reply
    finally:
        w.close()


def receiver_pids(sink: SmtpSink) -> list[int]:
    out = []
    for m in sink.messages:
        found = re.search(rb"^X-Receiver-Pid: (\d+)\r$", m.data, re.M)
        assert found, m.data[:300]
        out.append(int(found.group(1)))
    return out


@pytest.mark.parametrize("workers", [0, 1])
async def test_worker_receives_on_the_shared_listener_and_metrics_describe_one_gateway(
    tmp_path: Path, workers: int
) -> None:
    count, booms = 400, 12
    async with SmtpSink() as sink:
        with running(tmp_path, sink, workers) as setup:
            await smtp_source(setup.port, count, 20)
            replies = await asyncio.gather(*(boom_session(setup.port) for _ in range(booms)))
            assert all(r.startswith(b"451 4.3.0") for r in replies), replies
            await sink.wait_for(count, timeout=30)
            # hook figures travel once a second; sessions close after their last reply
            hook = {"plugin": "pidtag", "hook": "mxgate_receive_on_end_of_data"}
            s = await settled(
                setup.metrics_port,
                lambda s: (
                    value(s, "mxgate_hook_calls_total", **hook) >= count
                    and value(s, "mxgate_smtp_sessions_active", listener="smtp") <= 0
                ),
            )
            pids = receiver_pids(sink)
            worker_pids = setup.worker_pids()
            # a burst of clients must not overflow the accept queue (the kernel caps a backlog at somaxconn)
            somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
            assert listen_backlog(setup.port) == min(1024, somaxconn)
            if workers:  # the main process binds the listener but leaves accepting to the worker
                (worker,) = worker_pids
                assert set(pids) == {worker}, "the main process received messages itself"
                fds = open_files(worker)
                assert not [f for f in fds if "queue" in f], f"a worker opened the queue: {fds}"
            else:
                assert set(pids) == {setup.gw.pid}
    assert len(sink.messages) == count
    # the same figures whether one process or two received
    probe = 1  # GatewayProcess.start reads one banner to know the gateway is up
    assert value(s, "mxgate_smtp_connections_total", listener="smtp", connector="lab") == count + booms + probe
    assert value(s, "mxgate_messages_received_total", listener="smtp", connector="lab") == count
    assert value(s, "mxgate_smtp_sessions_active", listener="smtp") == 0
    assert value(s, "mxgate_plugin_errors_total", plugin="pidtag", hook="mxgate_receive_on_ehlo_command") == booms
    assert value(s, "mxgate_hook_calls_total", **hook) == count
    assert value(s, "mxgate_hook_calls_total", plugin="core", hook="mxgate_lifecycle_on_startup") == 1 + workers
    assert value(s, "mxgate_delivery_recipients_total", connector="inside", result="delivered") == count
    assert s[("mxgate_receive_worker_restarts_total", ())] == 0  # exported (at 0) from the start
    # the worker's own process figures (mxgate_process_* are the main process's)
    slots = {labels for (name, labels) in s if name == "mxgate_receive_worker_resident_memory_bytes"}
    assert slots == ({(("slot", "0"),)} if workers else set())
    if workers:
        assert value(s, "mxgate_receive_worker_cpu_seconds_total", slot="0") > 0.1  # it received 400 messages
        assert value(s, "mxgate_receive_worker_resident_memory_bytes", slot="0") > 10 * 2**20
        assert value(s, "mxgate_receive_worker_open_fds", slot="0") >= 3


async def _reply(r: asyncio.StreamReader) -> bytes:
    """One whole SMTP reply (its last line), or ``b""`` at EOF: a session cut mid-reply ends the read."""
    while True:
        line = await r.readline()
        if not line or line[3:4] != b"-":
            return line


async def _client(port: int, tag: int, acked: list[bytes], stop: asyncio.Event) -> None:
    """A few messages on one session (sessions come and go, so both processes get some), until ``stop`` or the
    session dies; each body carries a unique token."""
    try:
        # one deadline for the whole session: ``wait_for`` around each read cannot be relied on to end a loop
        async with asyncio.timeout(30):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            try:
                if not (await _reply(r)).startswith(b"220 "):
                    return
                w.write(b"EHLO load.test\r\n")
                if not (await _reply(r)).startswith(b"250 "):
                    return
                for i in range(5):
                    if stop.is_set():
                        break
                    token = f"token-{tag}-{i}".encode()
                    w.write(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n")
                    replies = [await _reply(r) for _ in range(3)]
                    if not replies[-1].startswith(b"354 "):
                        break
                    w.write(b"Subject: worker test\r\n\r\n" + token + b"\r\n.\r\n")
                    if not (await _reply(r)).startswith(b"250 "):
                        break
                    acked.append(token)
            finally:
                w.close()
    except (ConnectionError, OSError, TimeoutError):
        pass


async def load_while(port: int, clients: int, acked: list[bytes], until: Any, timeout: float) -> None:
    """Clients in waves (a session that died is replaced) until ``until()`` holds (bounded by ``timeout``)."""
    stop = asyncio.Event()
    tag = 0
    deadline = time.monotonic() + timeout
    running_: set[asyncio.Task[None]] = set()
    while not until():
        assert time.monotonic() < deadline, f"load: condition not met in {timeout} s ({len(acked)} acked)"
        while len(running_) < clients:
            tag += 1
            task = asyncio.ensure_future(_client(port, tag, acked, stop))
            running_.add(task)
            task.add_done_callback(running_.discard)
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*running_), 20)


def sockets_open(pid: int) -> int:
    return sum(1 for target in open_files(pid) if target.startswith("socket:"))


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_killed_worker_is_restarted_and_nothing_acknowledged_is_lost(tmp_path: Path) -> None:
    acked: list[bytes] = []
    done = False
    async with SmtpSink() as sink:
        with running(tmp_path, sink, 1) as setup:
            (first,) = setup.worker_pids()
            idle = sockets_open(first)
            load = asyncio.ensure_future(load_while(setup.port, 12, acked, lambda: done, 90))
            await wait_for(lambda: len(acked) >= 300 and first in receiver_pids(sink), 30, "the worker's share")
            # mid-flight: the worker holds sessions in every state
            await wait_for(lambda: sockets_open(first) >= idle + 3, 10, "sessions open in the worker")
            os.kill(first, signal.SIGKILL)
            killed_at = len(acked)
            await wait_for(lambda: setup.worker_pids() - {first}, 20, "a new worker")
            (second,) = setup.worker_pids()
            await wait_for(
                lambda: len(acked) >= killed_at + 300 and second in receiver_pids(sink), 30, "the new worker's share"
            )
            done = True
            await load
            await sink.wait_for(len(acked), timeout=30)
            s = await settled(
                setup.metrics_port, lambda s: value(s, "mxgate_smtp_sessions_active", listener="smtp") <= 0
            )
            assert setup.gw.proc is not None and setup.gw.proc.poll() is None, "the main process died"
    delivered = {m.data.rsplit(b"\r\n\r\n", 1)[1].strip() for m in sink.messages}
    missing = [t for t in acked if t not in delivered]
    assert missing == [], f"{len(missing)} of {len(acked)} acknowledged messages never delivered"
    assert value(s, "mxgate_events_total", kind="receive_worker_restart") == 1
    assert value(s, "mxgate_receive_worker_restarts_total") == 1
    assert value(s, "mxgate_smtp_sessions_active", listener="smtp") == 0, "the dead worker's sessions stay open"


async def test_stop_and_main_process_death_leave_no_worker_behind(tmp_path: Path) -> None:
    async with SmtpSink() as sink:
        (tmp_path / "a").mkdir()
        with running(tmp_path / "a", sink, 2) as a:
            workers = a.worker_pids()
            assert len(workers) == 2
            os.kill(a.gw.pid, signal.SIGTERM)  # the main process only, as systemd's KillMode=mixed would
            assert a.gw.proc is not None
            assert a.gw.proc.wait(timeout=60) == 0
            wait_until(lambda: not any(alive(p) for p in workers), 10, "the workers to stop with the main process")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", a.port), timeout=1):
                pytest.fail("something still listens after the stop")
        (tmp_path / "b").mkdir()
        with running(tmp_path / "b", sink, 1) as b:
            (worker,) = b.worker_pids()
            os.kill(b.gw.pid, signal.SIGKILL)  # no clean-up at all in the main process
            assert b.gw.proc is not None
            b.gw.proc.wait(timeout=10)
            wait_until(lambda: not alive(worker), 45, "the orphaned worker to notice and stop")


async def test_a_worker_that_cannot_start_stops_the_gateway_with_a_clear_error(tmp_path: Path) -> None:
    """A plugin whose start-up fails only in a receive worker: ``mxgate run`` must exit 1 with one line saying
    which worker did not start (the plugin's error is logged above it), and leave no process behind."""
    (tmp_path / "broken.py").write_text(
        "from mxgate.core.hookspecs import hookimpl\n\n"
        "@hookimpl\n"
        "def mxgate_lifecycle_on_startup(runtime):\n"
        "    if runtime.role == 'receiver':\n"
        "        raise RuntimeError('no licence for a second process')\n"
    )
    doc = gateway_document(tmp_path / "state", port=free_port(), smart_host="127.0.0.1:9")
    doc["server"]["receive_workers"] = 1
    doc["plugins"] = {"load": ["broken.py"]}
    config = write_config(tmp_path / "mxgate.toml", doc)
    proc = await asyncio.create_subprocess_exec(
        *gateway_command(config), cwd=tmp_path, stderr=asyncio.subprocess.PIPE, start_new_session=True
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = err.decode()
    assert proc.returncode == 1, text
    assert "mxgate: receive worker 0 did not start" in text, text
    assert "no licence for a second process" in text, text
    assert not child_pids(proc.pid)


async def test_full_disk_through_a_worker_is_452_and_recovers(tmp_path: Path) -> None:
    """The main process cannot queue a worker's message (the state directory's disk is full): the worker answers
    452 4.3.1 as one process would, and takes mail again once space returns."""
    from test_faults import fill, message, tmpfs, transaction

    with tmpfs(tmp_path / "disk", "8m") as disk:
        async with SmtpSink() as sink:
            with running(tmp_path, sink, 1, state=disk / "var") as setup:
                first = await transaction(setup.port, message("before", 2000))
                assert first[-1].startswith("250 2.0.0"), first
                await sink.wait_for(1, timeout=20)
                await asyncio.sleep(0.5)  # its result recorded before the disk fills
                filler = fill(disk, leave=64 * 1024)
                full = await transaction(setup.port, message("while-full", 600_000))
                assert full[-1].startswith("452 4.3.1"), full
                filler.unlink()
                again = await transaction(setup.port, message("after", 600_000))
                assert again[-1].startswith("250 2.0.0"), again
                await sink.wait_for(2, timeout=20)
                assert setup.gw.proc is not None and setup.gw.proc.poll() is None
    subjects = sorted(re.search(rb"^Subject: (\S+)", m.data, re.M).group(1) for m in sink.messages)  # type: ignore[union-attr]
    assert subjects == [b"after", b"before"]
