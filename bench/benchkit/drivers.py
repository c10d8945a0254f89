"""Load drivers: Postfix's smtp-source (headline rates) and our loadgen.py (latency, STARTTLS, idle sessions)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchkit.procs import stop_process
from benchkit.systems import raise_nofile

SMTP_SOURCE = "/usr/sbin/smtp-source"
HERE = Path(__file__).resolve().parent
SENDER = "source@client.bench.test"
RCPT = "rcpt@dest.bench.test"


def smtp_source(
    host: str, port: int, *, messages: int, sessions: int, size: int, reuse: bool, timeout: float, rcpt: str = RCPT
) -> dict[str, Any]:
    """smtp-source -s SESSIONS -m MESSAGES -l SIZE [-d]; it aborts on any unexpected reply (no -A)."""
    cmd = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size), "-f", SENDER, "-t", rcpt]
    cmd += ["-M", "client.bench.test"]
    if reuse:
        cmd.append("-d")
    cmd.append(f"inet:{host}:{port}")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=raise_nofile)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        return {"tool": "smtp-source", "ok": False, "error": f"timed out after {timeout}s", "elapsed_s": timeout}
    elapsed = time.monotonic() - t0
    ok = proc.returncode == 0
    return {
        "tool": "smtp-source",
        "ok": ok,
        "accepted": messages if ok else None,
        "elapsed_s": elapsed,
        "rate": messages / elapsed if ok else None,
        "error": None if ok else err.decode(errors="replace").strip()[-500:],
        "t0": t0,
    }


def loadgen(
    host: str,
    port: int,
    *,
    messages: int,
    sessions: int,
    size: int,
    reconnect: bool,
    starttls: bool,
    timeout: float,
    python: str = sys.executable,
    rcpt: str = RCPT,
) -> dict[str, Any]:
    cmd = [python, str(HERE / "loadgen.py"), "--host", host, "--port", str(port), "--messages", str(messages)]
    cmd += ["--sessions", str(sessions), "--size", str(size), "--max-seconds", str(timeout), "--rcpt", rcpt]
    cmd += ["--sender", SENDER]
    if reconnect:
        cmd.append("--reconnect")
    if starttls:
        cmd.append("--starttls")
    t0 = time.monotonic()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the harness waits for no other child meanwhile
    res = subprocess.run(cmd, capture_output=True, timeout=timeout + 30, preexec_fn=raise_nofile, check=False)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    elapsed = time.monotonic() - t0
    driver_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    try:
        out: dict[str, Any] = json.loads(res.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"tool": "loadgen", "ok": False, "error": res.stderr.decode(errors="replace")[-500:], "t0": t0}
    out["ok"] = out["accepted"] == messages and not out["timed_out"]
    if not out["ok"]:
        out["error"] = f"{out['accepted']} of {messages} accepted, {out['errors']} session errors"
    out["t0"] = out.get("t_start", t0)
    out["wall_s"] = elapsed
    out["driver_cpu_s"] = round(driver_cpu, 3)
    return out


class IdleSessions:
    """``loadgen.py --idle N`` as a context: open N sessions (EHLO'd), hold them until the context ends."""

    def __init__(self, host: str, port: int, n: int, *, starttls: bool, timeout: float, python: str = sys.executable):
        self.cmd = [python, str(HERE / "loadgen.py"), "--host", host, "--port", str(port), "--idle", str(n)]
        self.cmd += ["--max-seconds", str(timeout), "--connect-timeout", str(min(timeout, 60.0))]
        if starttls:
            self.cmd.append("--starttls")
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}

    def __enter__(self) -> IdleSessions:
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            preexec_fn=raise_nofile, start_new_session=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else b""
        try:
            self.ready = json.loads(line)
        except ValueError:
            self.ready = {"ready": 0, "failed": None, "error": "no answer from loadgen"}
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                stop_process(self.proc)
