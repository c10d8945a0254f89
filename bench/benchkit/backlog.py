"""The backlog scenario's pieces: a deep queue of deferred mail written straight through the store API, and the
per-process figures (CPU, RSS) of mxgate's main process, which queues, schedules and delivers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
DOWN_DOMAIN = "down.bench.test"
REPLY = "451 4.3.0 <{rcpt}>: Recipient address rejected (smtp-sink -r rcpt; written by the bench prefill)"


def prefill(state_dir: Path, count: int, *, size: int = 2048, retry_in: float = 7200.0) -> dict[str, Any]:
    """``count`` messages to ``DOWN_DOMAIN``, each queued and deferred once (as after a 4xx), next attempt
    ``retry_in`` s from now spread over another hour (by default none comes due while the scenario measures;
    a negative ``retry_in`` makes them all due at once). Goes
    through :class:`QueueStore` (put + record_results, group-committed), not SMTP: fast, and the same rows the
    gateway writes. Returns the time it took and a few ids for ``queue show``."""
    from mxgate.core.messages import RecipientStatus
    from mxgate.core.queue import QueueStore

    body = b"From: backlog@bench.test\r\nSubject: deferred\r\n\r\n" + b"x" * max(0, size - 60) + b"\r\n"

    async def run() -> dict[str, Any]:
        ids: list[str] = []
        t0 = time.monotonic()
        now = time.time()
        async with await QueueStore.open(state_dir) as store:

            async def one(i: int) -> None:
                rcpt = f"u{i}@{DOWN_DOMAIN}"
                msg = await store.put_leased("backlog@bench.test", [rcpt], body, now=now, lease_seconds=900)
                due = now + retry_in + 3600.0 * i / max(1, count)
                await store.record_results(
                    msg.id, [(rcpt, RecipientStatus.DEFERRED, REPLY.format(rcpt=rcpt), due)], now=now, known=msg
                )
                if i in (0, count // 2, count - 1):
                    ids.append(msg.id)

            step = 2000
            for first in range(0, count, step):
                await asyncio.gather(*(one(i) for i in range(first, min(first + step, count))))
            counts = await store.counts(now=time.time())
        return {
            "prefill_s": round(time.monotonic() - t0, 1),
            "deferred": counts.deferred,
            "ids": sorted(ids),
        }

    return asyncio.run(run())


def store_timings(state_dir: Path, msg_id: str | None, repeat: int = 5) -> dict[str, float]:
    """Milliseconds (median of ``repeat``) of what ``queue list`` / ``queue show`` / the metrics ask the store,
    from a second process while the gateway runs (as the CLI opens it: leases left alone): the queries alone,
    without the interpreter's start-up that the CLI wall times include."""
    import statistics

    from mxgate.core.queue import QueueStore

    async def run() -> dict[str, float]:
        out: dict[str, float] = {}
        store = await QueueStore.open(state_dir, release_leases=False)
        try:

            async def show(i: str) -> None:
                await store.get(i)
                await store.headers(i)
                await store.attempts(i)

            probes: dict[str, Any] = {
                "counts": lambda: store.counts(now=time.time()),
                "list page": lambda: store.list(limit=100),
            }
            if msg_id:
                probes["list page --after"] = lambda: store.list(limit=100, after=msg_id)
                probes["show"] = lambda: show(msg_id)
            for name, fn in probes.items():
                times = []
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    try:
                        await fn()
                    except TypeError:  # an older store without paging (measuring a baseline)
                        break
                    times.append((time.perf_counter() - t0) * 1000)
                if times:
                    out[name] = round(statistics.median(times), 2)
        finally:
            await store.close()
        return out

    return asyncio.run(run())


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of one process so far; 0.0 when it is gone."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    return 0.0


def proc_rss_mb(pid: int) -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def timed_cli(python: str, args: list[str], cwd: Path, timeout: float = 60.0) -> dict[str, Any]:
    """Wall time of one ``python -m mxgate ...`` (a new process, as an operator runs it)."""
    t0 = time.monotonic()
    try:
        out = subprocess.run(
            [python, "-m", "mxgate", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
        )
    except subprocess.TimeoutExpired:
        return {"s": None, "ok": False, "error": f"timed out after {timeout}s"}
    return {
        "s": round(time.monotonic() - t0, 3),
        "ok": out.returncode == 0,
        "lines": out.stdout.count("\n"),
        "error": None if out.returncode == 0 else (out.stderr.strip().splitlines() or ["?"])[-1][:200],
    }


if __name__ == "__main__":  # a quick look by hand: python bench/benchkit/backlog.py DIR COUNT
    print(prefill(Path(sys.argv[1]), int(sys.argv[2])))
