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


@pytest.fixture(scope="module")
def edge_results() -> Iterator[dict[str, object]]:
    """The edge scenario at a tiny size: DNS lab, TLSA-verified sink, Postfix and mxgate with STARTTLS in."""
    if os.geteuid() != 0 or not os.access("/usr/sbin/postfix", os.X_OK):
        pytest.fail("the bench harness starts its own Postfix: needs root and postfix (`make deps`)")
    # Postfix's daemons (user postfix) must reach the work directory: pytest's own is private to root
    base = Path(tempfile.mkdtemp(prefix="mxbench-smoke-"))
    base.chmod(0o755)
    try:
        yield _edge_run(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _edge_run(base: Path) -> dict[str, object]:
    out, workdir = base / "edge.json", base / "work"
    argv = ["--scenario", "edge", "--messages", "40", "--sessions", "4", "--systems", "postfix,mxgate"]
    argv += ["--workdir", str(workdir)]
    proc = subprocess.run(
        [sys.executable, str(RUN), *argv, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "## edge" in proc.stdout and "by stage" in proc.stdout
    results: dict[str, object] = json.loads(out.read_text())
    results["workdir"] = str(workdir)
    return results


def test_edge_relays_through_verified_tls_and_splits_cpu_by_stage(edge_results: dict[str, object]) -> None:
    edge = edge_results["scenarios"]["edge"]  # type: ignore[index]
    postfix = edge["postfix"]
    if "skipped" in postfix:  # the lab's unbound could not have 127.0.0.1:53 (another resolver holds it)
        assert "53" in postfix["skipped"]
        systems = ["mxgate"]
    else:
        systems = ["postfix", "mxgate"]
        # DANE-verified outbound TLS, and tlsproxy reused some of those connections
        tls = postfix["outbound_tls"]
        assert tls.get("verified established", 0) > 0, tls
        assert set(tls) <= {"verified established", "verified reused"}, tls
    mx_tls = edge["mxgate"]["outbound_tls"]
    assert mx_tls.get("tlsa success", 0) > 0, mx_tls
    assert set(mx_tls) == {"tlsa success"}, mx_tls  # no failure and no other policy
    for system in systems:
        r = edge[system]
        assert r["ok"], r
        assert r["messages"] == 40 and r["delivered"] >= 40
        for key in ("accept_rate", "e2e_rate", "cpu_s_per_1000"):
            assert _number(r[key]) and r[key] > 0, (system, key, r[key])
        assert r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
        assert _number(r["setup_ms"]["p99"]) and r["setup_ms"]["n"] >= 40  # one STARTTLS session per message
        st = r["stages"]
        parts = st["stages_ms_per_msg"]
        assert set(parts) == {"receive", "queue", "deliver", "tls", "other"}
        assert all(_number(v) for v in parts.values()), parts
        # the stages split each thread's /proc figure by perf's samples of it (199 Hz); on 40 messages a thread may
        # get only a few samples, all in one library (TLS, SQLite), so a stage can read 0 while its thread did work
        assert parts["receive"] > 0 and parts["deliver"] + parts["queue"] + parts["tls"] > 0, parts
        # the parts are measured per thread from /proc; together they cannot exceed the cgroup's total by more
        # than the rounding of a clock tick per thread
        assert st["attributed_ms_per_msg"] <= st["total_ms_per_msg"] * 1.1 + 1.0, st
        assert _number(st["ceilings"]["cores_msgs"])
    mx_units = edge["mxgate"]["stages"]["units_ms_per_msg"]
    assert "worker" in mx_units and "main: event loop" in mx_units  # the receive worker and the main process
    assert mx_units["worker"] > 0 and mx_units["main: event loop"] > 0, mx_units  # both measured from /proc
    if "skipped" not in postfix:
        # qmgr may spend less than a clock tick on 40 messages and then has no figure of its own
        assert {"smtpd", "cleanup", "smtp"} <= set(postfix["stages"]["units_ms_per_msg"])


def test_edge_leaves_nothing_running(edge_results: dict[str, object]) -> None:
    """The lab's nsd/unbound, the TLS sink, Postfix, mxgate and perf of this run are all gone: no process runs
    in its work directory or names a file in it (configurations, certificates, perf's output)."""
    workdir = str(edge_results["workdir"])
    left = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                cwd = os.readlink(proc / "cwd")
            except OSError:
                continue
            if workdir in args or cwd.startswith(workdir):
                left.append((proc.name, args[:200], cwd))
    assert not left
