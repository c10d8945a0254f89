"""Reload (issue 23, item 2): ``mxgate run`` with a receive worker, mail flowing the whole time, and
``mxgate reload`` — a valid change applies to new sessions (served by the replaced worker), a session open across
the reload finishes, an invalid file and a change that needs a restart are refused with the reason and change
nothing; every message answered 250 arrives."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from mxgate.testing.sinks import SmtpSink

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env() -> dict[str, str]:
    out = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return out


def banner(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.settimeout(10)
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(512)
            if not chunk:
                break
            data += chunk
        s.sendall(b"QUIT\r\n")
    return data.decode()


def mxgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mxgate", *args], capture_output=True, text=True, env=env(), timeout=120
    )


class Load:
    """One client sending messages back to back in a thread until stopped; counts the 250s."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.accepted = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=20) as c:
                    c.sendmail("load@sender.test", [f"user{n}@example.org"], f"Subject: {n}\r\n\r\nload {n}\r\n")
                self.accepted += 1
            except (smtplib.SMTPException, OSError) as exc:
                self.failures.append(f"{n}: {exc!r}")

    def wait_for(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        target = self.accepted + n
        while self.accepted < target:
            assert time.monotonic() < deadline, f"load stalled at {self.accepted} ({self.failures[-3:]})"
            time.sleep(0.02)


async def test_reload_under_load(tmp_path: Path) -> None:
    port = free_port()
    async with SmtpSink() as sink:
        doc: dict[str, Any] = {
            "server": {
                "hostname": "mx.gateway.test",
                "state_dir": str(tmp_path / "state"),
                "accepted_domains": ["example.org"],
                "receive_workers": 1,
                "log_level": "info",
            },
            "listener": [{"name": "smtp", "address": f"127.0.0.1:{port}", "banner": "before reload"}],
            "outbound_connector": [
                {
                    "name": "inside",
                    "recipient_domains": ["*"],
                    "smart_hosts": [f"127.0.0.1:{sink.port}"],
                    "tls": "none",
                    "retry_first": 1.0,
                }
            ],
            "dns": {"resolvers": [f"127.0.0.1:{free_port()}"], "timeout": 0.5},
            "metrics": {"listen": ""},
        }
        config = tmp_path / "mxgate.toml"
        config.write_text(tomli_w.dumps(doc))
        log = tmp_path / "gateway.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mxgate", "run", "-c", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env(),
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, log.read_text()
                with contextlib.suppress(OSError):
                    if "before reload" in await asyncio.to_thread(banner, port):
                        break
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.05)

            with Load(port) as load:
                await asyncio.to_thread(load.wait_for, 5)
                # a session opened before the reload and finished after it
                held = smtplib.SMTP("127.0.0.1", port, timeout=20)
                held.ehlo("held.test")

                doc["listener"][0]["banner"] = "after reload"
                config.write_text(tomli_w.dumps(doc))
                done = await asyncio.to_thread(mxgate, "reload", "-c", str(config))
                assert done.returncode == 0, done.stderr + log.read_text()[-3000:]
                assert "reloaded" in done.stdout and "1 receive workers replaced" in done.stdout
                assert "after reload" in await asyncio.to_thread(banner, port)  # the new worker's banner
                await asyncio.to_thread(load.wait_for, 5)
                held.sendmail("held@sender.test", ["held@example.org"], "Subject: held\r\n\r\nacross\r\n")
                held.quit()

                # an invalid file: refused with the reason, nothing changes
                config.write_text(tomli_w.dumps(doc) + "\n[server2]\nx = 1\n")
                refused = await asyncio.to_thread(mxgate, "reload", "-c", str(config))
                assert refused.returncode == 1 and "server2" in refused.stderr
                # valid, but the address needs a restart: refused by the gateway, with the key
                moved = {
                    **doc,
                    "listener": [{**doc["listener"][0], "address": f"127.0.0.1:{free_port()}", "banner": "never"}],
                }
                config.write_text(tomli_w.dumps(moved))
                refused = await asyncio.to_thread(mxgate, "reload", "-c", str(config))
                assert refused.returncode == 1
                assert "listener[0].address: changed, and needs a restart" in refused.stderr, refused.stderr
                assert "after reload" in await asyncio.to_thread(banner, port)
                # SIGHUP itself (what systemctl reload sends) does not stop the gateway
                config.write_text(tomli_w.dumps(doc))
                os.kill(proc.pid, signal.SIGHUP)
                await asyncio.to_thread(load.wait_for, 5)
                assert proc.poll() is None
            assert load.failures == []
            total = load.accepted + 1
            received = await sink.wait_for(total, timeout=60)
            assert len(received) == total
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        assert proc.returncode == 0, log.read_text()[-3000:]
