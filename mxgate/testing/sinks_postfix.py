"""Postfix's C ``smtp-sink`` as a test sink (:class:`PostfixSink`): a loopback port, smtp-sink's stage-wise
reject and hang-up switches, optional dumps of each transaction. Re-exported by :mod:`mxgate.testing.sinks`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from mxgate.testing.sinks_aiosmtpd import _require_loopback

__all__ = ["SMTP_SINK_BINARY", "PostfixSink"]

SMTP_SINK_BINARY = "/usr/sbin/smtp-sink"


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _commands(names: Iterable[str]) -> str:
    return ",".join(n.strip().upper() for n in names)


class PostfixSink:
    """Postfix's ``smtp-sink`` on a loopback port.

    Reply injection uses smtp-sink's own switches; command names are CONNECT, HELO, EHLO, MAIL, RCPT, DATA,
    ".", RSET, NOOP, QUIT.

    :param hard_reject: commands answered with ``hard_reply`` (``-f``; default "500 5.3.0 Error: command
        failed").
    :param soft_reject: commands answered with ``soft_reply`` (``-r``; default "450 4.3.0 Error: command
        failed").
    :param disconnect: commands after which it hangs up without a reply, ``-q``.
    :param reply_421: commands answered with 421 and a hang-up, ``-Q``.
    :param dump: keep each transaction as a file (``-d``) in a fresh directory; see :meth:`dumps`.

    As root it runs with ``-u nobody`` (smtp-sink insists); its dump directory is then owned by nobody.
    Start and stop are synchronous (a few ms); ``async with`` runs them in a thread.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        hostname: str = "smtp-sink.mxgate.test",
        hard_reject: Iterable[str] = (),
        soft_reject: Iterable[str] = (),
        disconnect: Iterable[str] = (),
        reply_421: Iterable[str] = (),
        hard_reply: str | None = None,
        soft_reply: str | None = None,
        dump: bool = False,
        extra_args: Iterable[str] = (),
        binary: str = SMTP_SINK_BINARY,
        startup_timeout: float = 5.0,
    ) -> None:
        _require_loopback(host)
        self._host = host
        self._requested_port = port
        self._port = port
        self.binary = binary
        self.startup_timeout = startup_timeout
        args = ["-h", hostname]
        for flag, names in (("-f", hard_reject), ("-r", soft_reject), ("-q", disconnect), ("-Q", reply_421)):
            joined = _commands(names)
            if joined:
                args += [flag, joined]
        if hard_reply is not None:
            args += ["-B", hard_reply]
        if soft_reply is not None:
            args += ["-b", soft_reply]
        self._args = args + list(extra_args)
        self._dump = dump
        self._dump_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._proc is None:
            raise RuntimeError("smtp-sink not started")
        return self._port

    @property
    def dump_dir(self) -> Path | None:
        return self._dump_dir

    @staticmethod
    def available(binary: str = SMTP_SINK_BINARY) -> bool:
        return os.access(binary, os.X_OK)

    def _command(self, port: int) -> list[str]:
        cmd = [self.binary]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += self._args
        if self._dump_dir is not None:
            cmd += ["-d", str(self._dump_dir).replace("%", "%%") + "/msg."]
        address = f"[{self._host}]" if ":" in self._host else self._host
        return [*cmd, f"inet:{address}:{port}", "64"]

    def start(self) -> Self:
        if self._proc is not None:
            return self
        if not self.available(self.binary):
            raise FileNotFoundError(f"{self.binary} not found or not executable (install postfix)")
        if self._dump:
            self._dump_dir = Path(tempfile.mkdtemp(prefix="mxgate-smtp-sink-"))
            if os.geteuid() == 0:
                nobody = pwd.getpwnam("nobody")
                os.chown(self._dump_dir, nobody.pw_uid, nobody.pw_gid)
        attempts = 1 if self._requested_port else 3  # a port we picked may be taken before smtp-sink binds
        last_error = ""
        for _ in range(attempts):
            port = self._requested_port or _free_port(self._host)
            self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  # lives as long as the process
            proc = subprocess.Popen(
                self._command(port),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
                start_new_session=True,  # its own process group: stop() kills the group
            )
            if self._wait_listening(proc, port):
                self._proc, self._port = proc, port
                return self
            last_error = self._read_stderr()
            self._kill(proc)
        self._cleanup_dump_dir()
        raise RuntimeError(f"smtp-sink did not start listening on {self._host}: {last_error.strip()}")

    def _wait_listening(self, proc: subprocess.Popen[bytes], port: int) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self._host, port), timeout=0.5) as probe:
                    probe.recv(1)  # wait for the start of its banner: it is really serving
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def _read_stderr(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", "replace")
        self._stderr.close()
        self._stderr = None
        return str(text)

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            if proc.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)

    def _cleanup_dump_dir(self) -> None:
        if self._dump_dir is not None:
            shutil.rmtree(self._dump_dir, ignore_errors=True)
            self._dump_dir = None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            self._kill(proc)
        self._read_stderr()
        self._cleanup_dump_dir()

    def dumps(self) -> list[bytes]:
        """Dumped transactions (with ``dump=True``): smtp-sink's X-Client-Addr/X-Mail-Args/X-Rcpt-Args headers
        and a Received: header, then the message. Oldest first."""
        if self._dump_dir is None:
            raise RuntimeError("PostfixSink(dump=True) is needed for dumps()")
        files = sorted(self._dump_dir.glob("msg.*"), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files]

    def wait_for_dumps(self, n: int = 1, timeout: float = 5.0) -> list[bytes]:
        """At least ``n`` dumps, once every dump is written: smtp-sink creates the file before the data arrives,
        so a dump counts when it is not empty and its size held over one poll."""
        deadline = time.monotonic() + timeout
        before: dict[Path, int] = {}
        while True:
            if self._dump_dir is None:
                raise RuntimeError("PostfixSink(dump=True) is needed for wait_for_dumps()")
            sizes = {p: p.stat().st_size for p in self._dump_dir.glob("msg.*")}
            if len(sizes) >= n and all(size and before.get(p) == size for p, size in sizes.items()):
                return self.dumps()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(sizes)} of {n} dumps within {timeout}s")
            before = sizes
            time.sleep(0.05)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)
