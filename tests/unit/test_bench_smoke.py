"""Smoke test of the benchmark harness (bench/run.py): real floor, real Postfix, 200 messages, numbers out.

Runs the harness exactly as ``make bench`` does, in quick mode, and checks that every reported figure is a
number. It says nothing about speed; ``make bench`` is where figures come from.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "bench" / "run.py"


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    if os.geteuid() != 0 or not os.access("/usr/sbin/postfix", os.X_OK):
        pytest.fail("the bench harness starts its own Postfix: needs root and postfix (`make deps`)")
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--systems", "floor,postfix", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "## relay" in proc.stdout
    results: dict[str, object] = json.loads(out.read_text())
    return results


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
    """The harness stops its Postfix and sinks: no master or smtp-sink from a bench directory survives."""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert "countsink.py" not in ps and "benchkit/floor.py" not in ps
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cwd = os.readlink(proc / "cwd")  # Postfix's daemons run in their queue directory
            except OSError:
                continue
            assert "mxbench-postfix-" not in cwd, (proc.name, cwd)
