"""Crash safety: SIGKILL a process that is putting messages; every id it printed must survive intact."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mxgate.core.queue import QueueStore

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
KILLS = 3
WORKERS = 16

# The child: WORKERS concurrent putters (so group commit is in play); each prints "<id> <key>" once put()
# has returned. Bounded: it stops by itself after 60 s or 200,000 messages.
CHILD = textwrap.dedent(
    """
    import asyncio, hashlib, sys, time
    from pathlib import Path
    from mxgate.core.queue import QueueStore

    def body(key: str) -> bytes:
        seed = hashlib.sha256(key.encode()).digest()
        return b"Subject: " + key.encode() + b"\\r\\n\\r\\n" + seed * (8192 // len(seed)) + key.encode()

    async def worker(store, run, w, deadline):
        for n in range(200_000 // {workers}):
            if time.monotonic() > deadline:
                return
            key = f"{{run}}-{{w}}-{{n}}"
            msg_id = await store.put("a@x.test", [f"r{{w}}@y.test"], body(key), now=time.time())
            sys.stdout.write(f"{{msg_id}} {{key}}\\n")
            sys.stdout.flush()

    async def main():
        store = await QueueStore.open(Path(sys.argv[1]))
        deadline = time.monotonic() + 60
        await asyncio.gather(*(worker(store, sys.argv[2], w, deadline) for w in range({workers})))
        await store.close()

    asyncio.run(main())
    """
).format(workers=WORKERS)


def body(key: str) -> bytes:
    seed = hashlib.sha256(key.encode()).digest()
    return b"Subject: " + key.encode() + b"\r\n\r\n" + seed * (8192 // len(seed)) + key.encode()


def wait_for_output(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"the child printed nothing in {timeout} s")


async def test_sigkill_while_putting_loses_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    rng = random.Random()
    printed: dict[str, str] = {}
    for run in range(KILLS):
        out = tmp_path / f"out-{run}.txt"
        with out.open("wb") as sink:
            child = subprocess.Popen(
                [sys.executable, str(script), str(state), str(run)],
                stdout=sink,
                stderr=subprocess.PIPE,
                env=env,
            )
            try:
                wait_for_output(out, timeout=20)
                time.sleep(rng.uniform(0.2, 1.0))
                assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
                os.kill(child.pid, signal.SIGKILL)
            finally:
                child.wait(timeout=20)
                if child.stderr:
                    child.stderr.close()
        assert child.returncode == -signal.SIGKILL
        for line in out.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:  # a line cut by the kill proves nothing either way
                printed[parts[0]] = parts[1]
    assert len(printed) > KILLS * 10, f"only {len(printed)} puts reported: the test proves little"

    store = await QueueStore.open(state)
    try:
        assert await store.integrity_check() == []
        for msg_id, key in printed.items():
            msg = await store.get(msg_id)
            assert msg is not None, f"{msg_id} ({key}) was acknowledged but is gone"
            assert await store.body(msg_id) == body(key)
            assert msg.size == len(body(key))
        queued = await store.list(limit=1_000_000)
        # Puts in flight at the kill may or may not have committed (never acknowledged); none is damaged.
        assert len(queued) >= len(printed)
        for msg in queued:
            data = await store.body(msg.id)
            key = data.split(b"\r\n", 1)[0].removeprefix(b"Subject: ").decode()
            assert data == body(key), f"{msg.id}: body damaged"
        counts = await store.counts(now=time.time())
        assert counts.messages == len(queued)
    finally:
        await store.close()
