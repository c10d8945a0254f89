"""Shared tools of the reliability suite (not a test module): a raw SMTP client that sends exact bytes and reads
exact replies, the hostile-corpus runner, and a gateway run as a real process (``python -m mxgate run``) that can
be SIGKILLed and restarted.

Everything here is bounded: every read has a timeout, every process is started in its own process group and
killed by id in ``finally`` blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

REPO = Path(__file__).resolve().parents[2]
HOSTILE = REPO / "tests" / "data" / "hostile"
REPLY_TIMEOUT = 10.0

# `python -m mxgate run`, as an operator starts it. MXGATE_TEST_NO_UVLOOP=1 runs it on the standard asyncio loop
# instead (the same CLI, with uvloop hidden), to tell a uvloop-only failure from the rest.
GATEWAY_MAIN = "import sys; sys.modules['uvloop'] = None; from mxgate.core.cli import main; sys.exit(main())"


# Whether the suite's gateway processes run under uvloop (the default of `mxgate run` when it is installed).
UVLOOP = True


def gateway_command(config: Path, *, uvloop: bool = True) -> list[str]:
    if os.environ.get("MXGATE_TEST_GATEWAY_SCRIPT"):  # debugging aid: a wrapper script of one's own
        return [sys.executable, os.environ["MXGATE_TEST_GATEWAY_SCRIPT"], "run", "--config", str(config)]
    if uvloop and os.environ.get("MXGATE_TEST_NO_UVLOOP") != "1":
        return [sys.executable, "-m", "mxgate", "run", "--config", str(config)]
    return [sys.executable, "-c", GATEWAY_MAIN, "run", "--config", str(config)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- a raw client ------------------------------------------------------------------------------------------------


@dataclass
class Reply:
    code: str  # "250"; "EOF" when the server closed; "TIMEOUT" when it said nothing in time
    lines: list[bytes] = field(default_factory=list)

    def __str__(self) -> str:
        if not self.lines:
            return self.code
        return " | ".join(line.decode("utf-8", "replace") for line in self.lines)[:300]


class RawClient:
    """Exact bytes out, whole (multi-line) replies in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int, *, source: str | None = None, timeout: float = 10.0) -> RawClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=(source, 0) if source else None, limit=1 << 20), timeout
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, timeout: float = REPLY_TIMEOUT) -> Reply:
        lines: list[bytes] = []
        try:
            while True:
                line = await asyncio.wait_for(self.reader.readline(), timeout)
                if not line:
                    return Reply("EOF", lines) if not lines else Reply(lines[0][:3].decode("latin-1"), lines)
                lines.append(line.rstrip(b"\r\n"))
                if len(line) < 4 or line[3:4] != b"-":
                    return Reply(line[:3].decode("latin-1"), lines)
        except TimeoutError:
            return Reply("TIMEOUT", lines)
        except (ConnectionError, OSError):
            return Reply("EOF", lines)

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        await self.writer.start_tls(context, server_hostname=server_hostname)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


# -- the hostile corpus --------------------------------------------------------------------------------------


def load_corpus() -> list[dict[str, Any]]:
    sessions: list[dict[str, Any]] = []
    for path in sorted(HOSTILE.glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        for s in doc["sessions"]:
            s.setdefault("file", path.name)
            sessions.append(s)
    return sessions


def to_bytes(text: str) -> bytes:
    """Corpus strings are Latin-1: each character is one byte (so NUL, 0xFF and raw UTF-8 can be written)."""
    return text.encode("latin-1")


def expand_expect(items: list[str]) -> list[str]:
    """``"452*9000"`` stands for 9,000 replies that start with ``452``."""
    out: list[str] = []
    for item in items:
        m = re.fullmatch(r"(.*)\*(\d+)", item)
        out += [m.group(1)] * int(m.group(2)) if m else [item]
    return out


def matches(reply: Reply, expected: str) -> bool:
    """``"250"``, ``"5"`` (any 5xx), ``"550 5.7.1"`` (code and enhanced code), ``"EOF"``; ``"A|B"`` either."""
    for alternative in expected.split("|"):
        if alternative in ("EOF", "TIMEOUT"):
            if reply.code == alternative:
                return True
            continue
        if reply.code in ("EOF", "TIMEOUT") or not reply.lines:
            continue
        first = reply.lines[-1].decode("utf-8", "replace")
        if first.startswith(alternative):
            return True
    return False


async def run_session(
    session: dict[str, Any], host: str, port: int, *, tls: ssl.SSLContext | None, server_name: str
) -> tuple[list[str], int]:
    """Play one corpus session. Returns (mismatches, number of replies checked)."""
    problems: list[str] = []
    checked = 0
    client = await RawClient.connect(host, port, source=session.get("source"))
    pending: asyncio.Task[None] | None = None
    try:
        banner = await client.reply()
        if not matches(banner, "220"):
            return [f"banner: {banner}"], 1
        for number, step in enumerate(session["steps"]):
            if "send" in step:
                data = to_bytes(step["send"]) * int(step.get("times", 1))
                if pending is not None:  # bytes go out in order
                    with contextlib.suppress(ConnectionError, OSError):
                        await asyncio.wait_for(pending, REPLY_TIMEOUT)
                    pending = None
                # sends go on while replies are read (a big send and its replies could fill both buffers)
                pending = asyncio.ensure_future(client.send(data))
                await asyncio.sleep(0)
            if "tls" in step:
                assert tls is not None
                try:
                    await asyncio.wait_for(client.starttls(tls, server_name), 10)
                except (ssl.SSLError, OSError, TimeoutError) as exc:
                    problems.append(f"step {number}: TLS handshake failed: {exc!r}")
                    return problems, checked
            if "expect" in step:
                for i, expected in enumerate(expand_expect(step["expect"])):
                    reply = await client.reply(float(step.get("timeout", REPLY_TIMEOUT)))
                    checked += 1
                    if not matches(reply, expected):
                        problems.append(f"step {number} reply {i}: expected {expected!r}, got {reply}")
                        return problems, checked
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await client.close()
    return problems, checked


# -- a gateway process ---------------------------------------------------------------------------------------


def gateway_document(
    state: Path,
    *,
    port: int,
    smart_host: str,
    accepted: tuple[str, ...] = ("example.org",),
    extra_server: dict[str, Any] | None = None,
    extra_listener: dict[str, Any] | None = None,
    extra_connector: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A gateway for one accepted domain relayed to ``smart_host`` ("127.0.0.1:PORT", no TLS); DNS points at a
    closed loopback port and metrics are off, so nothing leaves the machine."""
    return {
        "server": {
            "hostname": "mx.gateway.test",
            "state_dir": str(state),
            "accepted_domains": list(accepted),
            "log_level": "warning",
            "receive_workers": 0,  # one process unless a test asks: "auto" (the default) depends on the machine
            **(extra_server or {}),
        },
        "listener": [{"name": "smtp", "address": f"127.0.0.1:{port}", **(extra_listener or {})}],
        "outbound_connector": [
            {
                "name": "inside",
                "recipient_domains": ["*"],
                "smart_hosts": [smart_host],
                "tls": "none",
                "retry_first": 1.0,
                "retry_max": 2.0,
                "connect_timeout": 5.0,
                "command_timeout": 5.0,
                **(extra_connector or {}),
            }
        ],
        "dns": {"resolvers": [f"127.0.0.1:{free_port()}"], "timeout": 0.5},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
    }


class GatewayProcess:
    """``mxgate run`` in its own process group; :meth:`kill` is SIGKILL to that group."""

    def __init__(self, config: Path, log: Path, *, uvloop: bool = True, nofile: tuple[int, int] | None = None) -> None:
        self.config = config
        self.log = log
        self.uvloop = uvloop
        self.nofile = nofile  # RLIMIT_NOFILE (soft, hard) to start the gateway with
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int, timeout: float = 20.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                gateway_command(self.config, uvloop=self.uvloop),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.config.parent,
                env=env,
                start_new_session=True,
                preexec_fn=self._limits if self.nofile else None,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(5)
                if s.recv(512).startswith(b"220"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"gateway not listening on {port} within {timeout} s:\n{self.tail()}")

    def _limits(self) -> None:
        import resource

        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, self.nofile)

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs in the gateway."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=20)

    def stop(self, timeout: float = 75.0) -> int | None:
        """SIGTERM (graceful), SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


@contextlib.contextmanager
def gateway_process(config: Path, port: int, log: Path, *, uvloop: bool = True) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(config, log, uvloop=uvloop)
    try:
        gw.start(port)
        yield gw
    finally:
        gw.kill()


def write_config(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    return path


def child_pids(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (a gateway's receive workers)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry.name))
    return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
