"""Coverage-guided fuzzing with atheris (libFuzzer for Python), where it installs (``pip install atheris``; not a
declared dependency: skipped without it). Each target runs in a child process, bounded by ``-runs`` and
``-max_total_time``; a crash is any exception the target does not document. Soak only (``make soak``): the
instrumented start alone takes seconds, and ``make test`` has hypothesis fuzzing the same targets.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")

HARNESS = textwrap.dedent(
    """
    import sys, tempfile, atheris
    from pathlib import Path

    with atheris.instrument_imports():
        from mxgate.core import engine
        from mxgate.core.errors import ConfigError
        from mxgate.core.smtp.parse import ParseError, parse_mail, parse_rcpt
        from mxgate.plugins.mta_sts.policy import StsSyntaxError, parse_policy, select_record
        from mxgate.plugins.tlsrpt.parse import ReportError, decode_report_bytes, parse_received_report
        from mxgate.plugins.tlsrpt.report import parse_tlsrpt_record
        from mxgate.plugins.dane import Tlsa, effective_records

    WORK = Path(tempfile.mkdtemp(prefix="mxgate-atheris-"))

    def smtp(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        utf8 = fdp.ConsumeBool()
        text = fdp.ConsumeUnicodeNoSurrogates(400)
        for fn in (lambda t: parse_mail(t, smtputf8_offered=utf8), lambda t: parse_rcpt(t, smtputf8=utf8)):
            try:
                fn(text)
            except ParseError:
                pass

    def config(data: bytes) -> None:
        path = WORK / "f.toml"
        path.write_bytes(data)
        try:
            engine.load(path, entry_points=False)
        except ConfigError:
            pass

    def records(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        which = fdp.ConsumeIntInRange(0, 4)
        text = fdp.ConsumeUnicodeNoSurrogates(600)
        if which == 0:
            try:
                parse_policy(text)
            except StsSyntaxError:
                pass
        elif which == 1:
            select_record(text.split("|"))
        elif which == 2:
            parse_tlsrpt_record(text.split("|"))
        elif which == 3:
            try:
                effective_records([Tlsa.parse(text)])
            except ValueError:
                pass
        else:
            try:
                parse_received_report(decode_report_bytes(text.encode("utf-8", "surrogatepass"), limit=65536))
            except ReportError:
                pass

    target = {"smtp": smtp, "config": config, "records": records}[sys.argv[1]]
    atheris.Setup(sys.argv[1:2] + sys.argv[2:], target)
    atheris.Fuzz()
    """
)


def run_atheris(tmp_path: Path, target: str, runs: int, seconds: int) -> None:
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(script), target, f"-runs={runs}", f"-max_total_time={seconds}", "-rss_limit_mb=2048",
         f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=seconds + 120, env=env, cwd=tmp_path,
    )  # fmt: skip
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"atheris found a crash in {target}:\n{tail}"
    done = [line for line in tail.splitlines() if line.startswith("Done")]
    assert done, tail
    print(f"\natheris {target}: {done[-1]}")


@pytest.mark.soak
@pytest.mark.parametrize("target", ["smtp", "config", "records"])
def test_soak_atheris(tmp_path: Path, target: str) -> None:
    run_atheris(tmp_path, target, runs=2_000_000, seconds=180)
