"""Sampling profiles of a system's Python processes during an extra (unmeasured) pass, with py-spy.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``); we keep the file and rank
functions by self samples (where the CPU is) and by inclusive samples (what a call costs with its callees).
py-spy is not a dependency of mxgate: ``.venv/bin/pip install py-spy`` to use ``--profile``.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchkit.procs import stop_process

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Profiler:
    def __init__(self, pid: int, out: Path, rate: int = 250) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (.venv/bin/pip install py-spy)")
        self.out = out
        self.cmd = [
            exe,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--rate",
            str(rate),
            "--subprocesses",
            "--threads",
        ]
        self.cmd += ["--nonblocking", "--output", str(out)]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profiler:
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc, sig=signal.SIGINT, timeout=30.0)  # SIGINT: py-spy writes its file and exits


_OWN = ("mxgate/", "benchkit/", "aiosmtpd/")  # py-spy already shortens paths to the import root


def _short(frame: str) -> tuple[str, bool]:
    """("function (path)", is_library): project frames are mxgate's, the harness's and aiosmtpd's."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), True
    path = m.group("file")
    for marker in ("site-packages/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m.group('func')} ({path})", not path.startswith(_OWN)


_ENTRY = ("<module> ", "main (mxgate/core/cli.py)", "cmd_run (", "run (mxgate/core/engine.py)", "Gateway.serve_forever")


def summarize(raw: Path, top: int = 15) -> dict[str, Any]:
    """Top functions by self share of the (busy) samples, top project functions by inclusive share, and
    activities: samples by their outermost project frame (a thread's loop, or the task an event-loop sample
    belongs to)."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    activities: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        parts = [p for p in stack.split(";") if p]
        frames = [_short(p) for p in parts if not p.startswith("process ") and not p.startswith("thread ")]
        if not frames:
            continue
        total += count
        self_counts[frames[-1][0]] += count
        own = [f for f, library in frames if not library and not f.startswith(_ENTRY)]
        for f in set(own):
            incl_counts[f] += count
        activities[own[0] if own else "(event loop / library only)"] += count

    def ranked(c: collections.Counter[str]) -> list[dict[str, Any]]:
        return [{"function": f, "share": round(n / total, 4), "samples": n} for f, n in c.most_common(top)]

    return {
        "file": str(raw),
        "samples": total,
        "self": ranked(self_counts),
        "inclusive": ranked(incl_counts),
        "activities": ranked(activities)[:8],
    }


_PROCESS = re.compile(r"^process (?P<pid>\d+):")


def by_module(raw: Path, main_pid: int | None, top: int = 12) -> dict[str, Any]:
    """Busy samples per process (``main`` or ``worker``) and module: the innermost mxgate frame's file (what
    mxgate code the CPU was spent for, library callees included), or the leaf's file when no mxgate frame is on
    the stack (the event loop's own work: uvloop, asyncio, ssl). Shares are of all busy samples of the pass."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        parts = [p for p in stack.split(";") if p]
        role = "?"
        frames = []
        for p in parts:
            m = _PROCESS.match(p)
            if m:
                role = "main" if main_pid is not None and int(m.group("pid")) == main_pid else "worker"
            elif not p.startswith("thread "):
                frames.append(_short(p)[0])
        if not frames:
            continue
        total += count
        files = [f.rsplit("(", 1)[-1].rstrip(")").split(":", 1)[0] for f in frames]
        own = [f for f in files if f.startswith("mxgate/") and not f.startswith(("mxgate/__main__", "mxgate/core/cli"))]
        counts[(role, own[-1] if own else f"(library) {files[-1]}")] += count
    per_role: dict[str, list[dict[str, Any]]] = {}
    for (role, module), n in counts.most_common():
        rows = per_role.setdefault(role, [])
        if len(rows) < top:
            rows.append({"module": module, "share": round(n / total, 4), "samples": n})
    return {"file": str(raw), "samples": total, "by_process": per_role}
