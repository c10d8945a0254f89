"""Every CLI command through a subprocess, as an operator runs it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mxgate.core.tracking import TrackEvent, TrackingLog

ROOT = Path(__file__).resolve().parents[2]


def mxgate(*args: str, cwd: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mxgate", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        input=stdin,
        timeout=60,
    )


def test_help_lists_commands() -> None:
    out = mxgate("--help")
    assert out.returncode == 0
    for command in ("run", "config", "plugins", "trace", "version"):
        assert command in out.stdout
    assert "127.0.0.1:2525" in out.stdout and "127.0.0.1:9925" in out.stdout


def test_version() -> None:
    out = mxgate("version")
    assert out.returncode == 0 and out.stdout.startswith("mxgate 0.")


def test_config_check_valid_and_invalid(tmp_path: Path) -> None:
    good = mxgate("config", "check")
    assert good.returncode == 0, good.stderr
    assert "<built-in default>: OK" in good.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nmax_recipients = "many"\n[[listener]]\nname = "x"\nadress = "1.2.3.4:25"\n')
    out = mxgate("config", "check", str(bad))
    assert out.returncode == 1
    assert f"error: {bad}: server.max_recipients: expected a whole number, got a string ('many')" in out.stderr
    assert f"error: {bad}: listener[0].adress: unknown key 'adress'; did you mean 'address'?" in out.stderr
    assert f"error: {bad}: listener[0].address: missing;" in out.stderr
    assert "3 configuration error(s)" in out.stderr


def test_config_init_writes_a_valid_commented_default(tmp_path: Path) -> None:
    target = tmp_path / "mxgate.toml"
    out = mxgate("config", "init", str(target))
    assert out.returncode == 0, out.stderr
    text = target.read_text()
    assert "# Our host name" in text and '# dane = "opportunistic"' in text and "[plugins.tlsrpt]" in text
    assert mxgate("config", "check", str(target)).returncode == 0
    again = mxgate("config", "init", str(target))
    assert again.returncode == 1 and "exists" in again.stderr
    # the written file says what the built-in default says
    shown_file = mxgate("config", "show", "--json", str(target))
    shown_builtin = mxgate("config", "show", "--json")
    doc_file, doc_builtin = json.loads(shown_file.stdout), json.loads(shown_builtin.stdout)
    assert doc_file == doc_builtin


def test_config_show_prints_defaults(tmp_path: Path) -> None:
    path = tmp_path / "mx.toml"
    path.write_text(
        '[server]\nhostname = "mx.example.org"\n[[outbound_connector]]\nname = "p"\n'
        'recipient_domains = ["partner.example"]\nsmart_hosts = ["mx.partner.example"]\ndane = "mandatory"\n'
    )
    out = mxgate("config", "show", str(path))
    assert out.returncode == 0, out.stderr
    doc = tomllib.loads(out.stdout)
    assert doc["server"]["hostname"] == "mx.example.org"
    assert doc["server"]["max_message_size"] == 52428800
    assert doc["outbound_connector"][0]["tls"] == "opportunistic"
    assert doc["outbound_connector"][0]["dane"] == "mandatory"


def test_plugins_lists_builtins(tmp_path: Path) -> None:
    path = tmp_path / "mx.toml"
    path.write_text('[plugins]\ndisable = ["prometheus"]\n[plugins.priority]\ntlsrpt = 3\n')
    out = mxgate("plugins", "--config", str(path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "SOURCE", "PRIORITY", "ENABLED"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["tlsrpt"][1:4] == ["builtin", "3", "yes"]
    assert rows["prometheus"][3] == "no"
    assert rows["core"][1] == "essential"
    assert lines[1].split()[0] == "tlsrpt"  # priority 3 sorts first


async def test_tracking_log_writes_one_loop_iteration_together(tmp_path: Path) -> None:
    log = TrackingLog(tmp_path)
    try:
        log.write(TrackEvent.RECEIVE, queue_id="Q1")
        log.write(TrackEvent.ROUTE, queue_id="Q1")
        assert log.path.read_text() == ""  # inside the loop: written when this iteration ends
        await asyncio.sleep(0)
        assert [json.loads(x)["event"] for x in log.path.read_text().splitlines()] == ["RECEIVE", "ROUTE"]
        log.write(TrackEvent.DELIVER, queue_id="Q1")
    finally:
        log.close()  # closing writes what is pending
    assert [json.loads(x)["event"] for x in log.path.read_text().splitlines()] == ["RECEIVE", "ROUTE", "DELIVER"]


def test_tracking_log_outside_a_loop_writes_at_once(tmp_path: Path) -> None:
    log = TrackingLog(tmp_path)
    log.write(TrackEvent.RECEIVE, queue_id="Q1")
    assert json.loads(log.path.read_text())["queue_id"] == "Q1"
    log.close()


def test_trace_by_queue_id_and_message_id(tmp_path: Path) -> None:
    state = tmp_path / "var"
    state.mkdir()
    log = TrackingLog(state, clock=iter([1.0, 2.0, 3.0]).__next__)
    log.write(TrackEvent.RECEIVE, queue_id="Q1", message_id="<m1@example.org>", client="192.0.2.1")
    log.write(TrackEvent.RECEIVE, queue_id="Q2", message_id="<m2@example.org>")
    log.write(TrackEvent.DELIVER, queue_id="Q1", recipient="a@example.net", mx="mx.example.net")
    log.close()
    path = tmp_path / "mx.toml"
    path.write_text(f'[server]\nstate_dir = "{state}"\n')
    by_id = mxgate("trace", "Q1", "--config", str(path))
    assert by_id.returncode == 0, by_id.stderr
    assert [line.split()[2] for line in by_id.stdout.splitlines()] == ["RECEIVE", "DELIVER"]
    by_mid = mxgate("trace", "m1@example.org", "--config", str(path))
    assert by_mid.stdout == by_id.stdout
    missing = mxgate("trace", "nope", "--config", str(path))
    assert missing.returncode == 1 and "no tracking records" in missing.stderr


def test_invalid_config_for_any_command(tmp_path: Path) -> None:
    path = tmp_path / "mx.toml"
    path.write_text("[server\n")
    out = mxgate("plugins", "--config", str(path))
    assert out.returncode == 1 and "TOML syntax error" in out.stderr


EXAMPLE_CONFIGS = sorted(p for p in (ROOT / "examples").rglob("*.toml") if p.name != "pyproject.toml")


def test_there_are_example_configs() -> None:
    assert len(EXAMPLE_CONFIGS) >= 1


@pytest.mark.parametrize("config", EXAMPLE_CONFIGS, ids=lambda p: p.name)
def test_examples_pass_config_check(config: Path) -> None:
    out = mxgate("config", "check", str(config), cwd=config.parent)
    assert out.returncode == 0, out.stderr


def test_config_show_says_what_receive_workers_auto_decided(tmp_path: Path) -> None:
    from mxgate.core import checks

    out = mxgate("config", "show")
    assert out.returncode == 0, out.stderr
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("receive_workers")]
    decided = checks.auto_receive_workers()
    assert line == (
        f'receive_workers = "auto"  # {decided} on this machine: one per spare core '
        f"({checks.usable_cpus()} usable), at most {checks.RECEIVE_WORKERS_AUTO_MAX}"
    )
    assert tomllib.loads(out.stdout)["server"]["receive_workers"] == "auto"  # still valid TOML, still portable
    path = tmp_path / "two.toml"
    path.write_text("[server]\nreceive_workers = 2\n")
    out = mxgate("config", "show", str(path))
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("receive_workers")]
    assert line == "receive_workers = 2"


def test_receive_workers_auto_is_none_on_one_core() -> None:
    """Pinned to one core (CPU affinity, as `taskset -c 0` or a container's cpuset would), "auto" starts no worker."""
    import os

    one = min(os.sched_getaffinity(0))
    out = subprocess.run(
        [sys.executable, "-m", "mxgate", "config", "show"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=lambda: os.sched_setaffinity(0, {one}),
    )
    assert out.returncode == 0, out.stderr
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("receive_workers")]
    assert '"auto"  # 0 on this machine: one per spare core (1 usable)' in line
