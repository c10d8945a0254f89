"""Delivery targets that count what reaches them.

``smtp-sink`` (Postfix's C sink) has no counter API, but ``-c`` prints running counters (``sess=N quit=N
mesg=N``, separated by carriage returns) on standard output whenever "." is received; we follow that stream in
a thread. The TLS scenarios use ``countsink.py`` (ours: smtp-sink has no STARTTLS), which prints ``mesg=N``
lines the same way. Neither sink is part of the measured process group.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchkit.procs import free_port, stop_process, wait_port

SMTP_SINK = "/usr/sbin/smtp-sink"
HERE = Path(__file__).resolve().parent
_COUNT = re.compile(rb"mesg=(\d+)")


class CountingSink:
    """A sink process on 127.0.0.1 whose message count the harness can wait on."""

    def __init__(
        self,
        kind: str = "smtp-sink",
        *,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        python: str = sys.executable,
        max_seconds: float = 3600.0,
        tickets: int = 2,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        if kind not in ("smtp-sink", "countsink"):
            raise ValueError(kind)
        if kind == "smtp-sink" and tls_cert:
            raise ValueError("smtp-sink has no STARTTLS; use kind='countsink'")
        self.kind = kind
        self.tls_cert, self.tls_key = tls_cert, tls_key
        self.python = python
        self.max_seconds = max_seconds
        self.tickets = tickets
        self.extra_args = extra_args  # smtp-sink: e.g. ("-r", "rcpt") to refuse every RCPT with a 4xx
        self.host = "127.0.0.1"
        self.port = 0
        self.count = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()

    def _command(self, port: int) -> list[str]:
        if self.kind == "smtp-sink":
            cmd = [SMTP_SINK, "-c"]
            if os.geteuid() == 0:
                cmd += ["-u", "nobody"]
            # -t: its command timeout; backlog 4096 so bursts of connections are not refused
            return [*cmd, *self.extra_args, "-h", "smtp-sink.bench.test", f"inet:{self.host}:{port}", "4096"]
        cmd = [self.python, str(HERE / "countsink.py"), "--port", str(port), "--max-seconds", str(self.max_seconds)]
        if self.tls_cert:
            cmd += ["--tls-cert", self.tls_cert, "--tls-key", str(self.tls_key), "--tickets", str(self.tickets)]
        return cmd

    def start(self) -> CountingSink:
        for _ in range(3):
            port = free_port()
            proc = subprocess.Popen(
                self._command(port),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            if wait_port(self.host, port, 10.0, proc=proc):
                self._proc, self.port = proc, port
                self._thread = threading.Thread(target=self._follow, name=f"sink-{port}", daemon=True)
                self._thread.start()
                return self
            stop_process(proc)
        raise RuntimeError(f"{self.kind} did not start")

    def _follow(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        tail = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            text = tail + chunk
            cut = max(text.rfind(b"\r"), text.rfind(b"\n"))
            if cut < 0:
                tail = text
                continue
            tail = text[cut + 1 :]
            found = _COUNT.findall(text[:cut])
            if found:
                with self._cond:
                    # the probe connection of wait_port counts no message, so counts start at 0
                    self.count = int(found[-1])
                    self._cond.notify_all()

    def wait_for(self, n: int, timeout: float) -> float | None:
        """Block until the sink has ``n`` messages; the monotonic time it got there, or None on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self._proc is not None and self._proc.poll() is not None):
                    return None
                self._cond.wait(min(remaining, 0.5))
            return time.monotonic()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc, timeout=5.0)
        if self._thread is not None:
            self._thread.join(2.0)
