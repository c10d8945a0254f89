"""``mxgate demo``: the real command in a subprocess tells its four-part story, the day's TLS-RPT report (RFC 8460
shape, checked against the schema) and a trace, exits 0 and leaves no process or directory behind; a world where
an outcome differs makes it exit 1 with one line saying which; building the command line never loads
mxgate.testing (the layering rule: only the demo, when it runs, uses it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest

DATA = Path(__file__).resolve().parents[1] / "data" / "tlsrpt"
SCHEMA = json.loads((DATA / "report.schema.json").read_text())


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (nsd and unbound run with their config path)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


def _block(out: str, start: str, end: str) -> str:
    """The lines of ``out`` from the one starting with ``start`` up to (not including) the next starting with
    ``end``."""
    found = re.search(rf"^{re.escape(start)}.*?(?=^{re.escape(end)})", out, flags=re.M | re.S)
    assert found, f"no block {start!r} .. {end!r} in:\n{out}"
    return found.group(0)


@pytest.mark.integration
def test_demo_tells_the_story_and_cleans_up(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "mxgate", "demo"], capture_output=True, text=True, env=env, timeout=120)
    out = res.stdout
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{out}\nstderr:\n{res.stderr}"
    assert res.stderr == ""

    one = _block(out, "1. DANE-EE", "2. ")
    assert "bank.test MX 10 mx.bank.test   (DNSSEC: secure)" in one
    assert re.search(r"_\d+\._tcp\.mx\.bank\.test TLSA 3 1 1 [0-9a-f]{64}", one)
    assert re.search(
        r"=> delivered to mx\.bank\.test over TLSv1\.[23], peer authenticated by DANE-EE \(TLSA 3 1 1\)", one
    )

    two = _block(out, "2. DANE:", "3. ")
    assert re.search(r"=> held in the queue \(deferred, not bounced\): 4\d\d 4\.7\.\d+ .*\(tlsa-invalid\)", two)
    assert "mx.broken.test received no message" in two

    three = _block(out, "3. MTA-STS enforce", "4. ")
    assert "mode: enforce; mx: mx.shop.test" in three
    assert "=> mx.attacker.test is not in the policy's mx list: it got nothing (0 connections)" in three
    assert "=> delivered to mx.shop.test, certificate verified" in three

    four = _block(out, "4. An unsigned domain", "TLS-RPT")
    assert "(DNSSEC: insecure)" in four
    assert re.search(r"=> delivered opportunistically over TLSv1\.[23]: encrypted, not authenticated", four)
    assert "UNEXPECTED" not in out

    # the per-domain summary, then the full report for the domain with the failure
    summary = _block(out, "TLS-RPT", "   The report for")
    # a tlsa result's policy domain is the MX host's TLSA base domain (RFC 8460 §4.4)
    assert re.search(r"mx\.broken\.test\s+tlsa\s+0\s+1\s+tlsa-invalid \(mx\.broken\.test\)", summary)
    assert re.search(r"plain\.test\s+no-policy-found\s+1\s+0", summary)
    report_text = _block(out, "   {", "The held message")
    report: dict[str, Any] = json.loads(textwrap.dedent(report_text))
    jsonschema.validate(report, SCHEMA)
    (policy,) = report["policies"]
    assert policy["policy"]["policy-type"] == "tlsa" and policy["policy"]["policy-domain"] == "mx.broken.test"
    assert policy["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
    assert [d["result-type"] for d in policy["failure-details"]] == ["tlsa-invalid"]
    assert re.search(r"^   # gw\.sender\.test!mx\.broken\.test!\d+!\d+\.json\.gz$", out, flags=re.M)

    # the trace of the held message: received, then deferred with the DANE reason
    held = re.search(r"\(queue id (\S+)\)", two)
    assert held
    qid = held.group(1)
    trace = out[out.index(f"(`mxgate trace {qid}`)") :]
    events = re.findall(rf"^   \S+ \S+ (\w+)\s+{qid} ", trace, flags=re.M)
    assert {"RECEIVE", "ROUTE", "ATTEMPT", "DEFER"} <= set(events), trace
    assert "tlsa-invalid" in trace

    assert out.rstrip().splitlines()[-1].startswith("All four outcomes as expected")
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone...
    assert _processes_mentioning(str(tmp_path)) == []  # ...and so are nsd and unbound


@pytest.mark.integration
def test_an_unexpected_outcome_exits_1_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """bank.test's MX serves another key than its TLSA names: scenario 1 is held instead of delivered."""
    import tempfile

    from mxgate.demo import story

    build = story.build_world

    def swapped(workdir: Path) -> story.World:
        world = build(workdir)
        world.certs[story.BANK_MX] = world.certs[story.BROKEN_MX]
        return world

    monkeypatch.setattr(story, "build_world", swapped)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert story.main() == 1
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith("mxgate demo: FAILED: scenario 1: expected delivery over DANE-EE to mx.bank.test; deferred")
    assert "=> UNEXPECTED: deferred: 4" in captured.out
    assert "All four outcomes" not in captured.out
    assert list(tmp_path.iterdir()) == []


def test_help_describes_the_demo_without_loading_mxgate_testing() -> None:
    """``mxgate demo --help`` (and so every command line) is built without importing mxgate.testing or pytest."""
    probe = textwrap.dedent(
        """
        import contextlib, io, sys
        from mxgate.__main__ import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main(["demo", "--help"])
        print(out.getvalue())
        print("LOADED:", sorted(m for m in sys.modules if m.startswith("mxgate.testing") or m == "pytest"))
        """
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "LOADED: []" in res.stdout
    assert "usage: mxgate demo" in res.stdout
    for words in ("DANE-EE", "deferred, not bounced", "forged MX", "opportunistic TLS", "TLS-RPT", "mxgate trace"):
        assert words in res.stdout


def test_text_is_escaped_for_the_terminal() -> None:
    """Replies and trace lines come from the network: terminal controls and bidi overrides are shown escaped."""
    from mxgate.demo.story import shown

    assert shown("250 ok") == "250 ok"
    assert shown("a\x1b[2Jb\u202ec\r\n\t\x00\U0001f600") == "a\\x1b[2Jb\\u202ec\\x0d\\x0a\\t\\x00\\U0001f600"
