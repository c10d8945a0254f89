"""Smoke test of the benchmark harness (bench/run.py): real floor, real Postfix, 200 messages, numbers out.

Runs the harness exactly as ``make bench`` does, in quick mode, and checks that every reported figure is a
number. It says nothing about speed; ``make bench`` is where figures come from.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "bench" / "run.py"


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    if os.geteuid() != 0 or not os.access("/usr/sbin/postfix", os.X_OK):
        pytest.fail("the bench harness starts its own Postfix: needs root and postfix (`make deps`)")
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    # every directory and process of this run lives under it (others may run benches on the machine too); not under
    # pytest's private temporary directory, which Postfix's unprivileged daemons cannot enter
    workdir = Path(tempfile.mkdtemp(prefix="mxbench-smoke-"))
    workdir.chmod(0o755)
    args = ["--quick", "--systems", "floor,postfix", "--json", str(out), "--workdir", str(workdir)]
    proc = subprocess.run(
        [sys.executable, str(RUN), *args],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=REPO,
        check=False,
        env={**os.environ, "MXBENCH_SMOKE_RUN": str(workdir)},  # inherited by the sinks and the floor
    )
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "## relay" in proc.stdout
        results: dict[str, object] = json.loads(out.read_text())
        results["workdir"] = str(workdir)
        yield results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_relay_report_fields_are_numbers(quick_results: dict[str, object]) -> None:
    relay = quick_results["scenarios"]["relay"]  # type: ignore[index]
    for system in ("floor", "postfix"):
        r = relay[system]
        assert r["ok"], r
        assert r["messages"] == 200
        for key in ("accept_rate", "cpu_s_per_1000", "peak_rss_mb", "peak_pss_mb"):
            assert _number(r[key]) and r[key] > 0, (system, key, r[key])
        for key in ("p50", "p99"):
            assert _number(r["latency_ms"][key]), (system, key, r["latency_ms"])
        assert r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
    postfix = relay["postfix"]
    assert _number(postfix["e2e_rate"]) and postfix["e2e_rate"] > 0
    assert postfix["delivered"] >= 200  # the sink counted every message
    assert relay["floor"]["e2e_rate"] is None  # the floor relays nothing


def test_machine_description(quick_results: dict[str, object]) -> None:
    machine = quick_results["machine"]
    assert machine["cores"] >= 1  # type: ignore[index]
    assert machine["versions"]["postfix"]  # type: ignore[index]


def test_nothing_left_running(quick_results: dict[str, object]) -> None:
    """The harness stops its Postfix and sinks: no process of this run (its sinks and floor name the run's work
    directory on their command line or in their environment; Postfix's daemons run in its queue directory there)
    survives. Processes of other runs on the same machine are not ours to judge."""
    workdir = str(quick_results["workdir"])
    left = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        if int(proc.name) == os.getpid():
            continue
        if cwd.startswith(workdir) or workdir in cmdline or workdir in environ:
            left.append((proc.name, cwd, cmdline[:200]))
    assert left == []
