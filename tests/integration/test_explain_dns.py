"""`mxgate explain DOMAIN --dns` and the start-up self-test, in the DNS lab (nsd + unbound on loopback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mxgate import ReportEvent, hookimpl
from mxgate.core import bootstrap
from mxgate.core.dns import resolver_from_config
from mxgate.core.runtime import Runtime
from mxgate.plugins.dnssec import SELF_TEST, run_self_test
from mxgate.testing.dnslab import StandardLab, Std

pytestmark = pytest.mark.integration


def lab_config(tmp_path: Path, resolver: str, *, bogus: str = Std.BOGUS_SIG) -> Path:
    path = tmp_path / "mx.toml"
    path.write_text(
        f'[server]\nstate_dir = "{tmp_path / "var"}"\n'
        f'[dns]\nresolvers = ["{resolver}"]\nself_test_secure = "{Std.SECURE}"\nself_test_bogus = "{bogus}"\n'
    )
    return path


def explain(config: Path, domain: str, *extra: str) -> tuple[int, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "mxgate", "explain", domain, "--dns", "--json", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.returncode, json.loads(out.stdout) if out.stdout else out.stderr


def test_secure_mx_with_address_statuses(dnslab: StandardLab, tmp_path: Path) -> None:
    code, ex = explain(lab_config(tmp_path, str(dnslab.resolver)), Std.SECURE)
    assert code == 0, ex
    assert (ex["mx_kind"], ex["mx_status"]) == ("answer", "secure")
    assert [(h["name"], h["preference"]) for h in ex["hosts"]] == [(Std.SECURE_MX1, 10), (Std.SECURE_MX2, 20)]
    a, aaaa = ex["hosts"][0]["addresses"]
    assert (a["rdtype"], a["kind"], a["status"], a["addresses"]) == ("A", "answer", "secure", [Std.SECURE_MX1_IP])
    assert (aaaa["kind"], aaaa["status"]) == ("nodata", "secure")
    assert ex["self_test"]["validating"] is True
    assert ex["ad_trusted"] is True


def test_insecure_bogus_null_and_dead(dnslab: StandardLab, tmp_path: Path) -> None:
    config = lab_config(tmp_path, str(dnslab.resolver))
    code, ex = explain(config, Std.INSECURE, "--no-self-test")
    assert code == 0 and (ex["mx_kind"], ex["mx_status"]) == ("answer", "insecure")
    assert ex["hosts"][0]["addresses"][0]["status"] == "insecure"
    code, ex = explain(config, Std.BOGUS_SIG, "--no-self-test")
    assert code == 1 and (ex["mx_kind"], ex["mx_status"]) == ("error", "bogus") and ex["hosts"] == []
    code, ex = explain(config, Std.NULL_MX, "--no-self-test")
    assert code == 0 and ex["null_mx"] is True and ex["hosts"] == []
    code, ex = explain(config, Std.DEAD, "--no-self-test")
    assert code == 1 and (ex["mx_kind"], ex["mx_status"]) == ("error", "indeterminate")


def test_text_output_names_statuses(dnslab: StandardLab, tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mxgate",
            "explain",
            Std.MIXED_MX,
            "--dns",
            "--config",
            str(lab_config(tmp_path, str(dnslab.resolver))),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert f"MX {Std.MIXED_MX}: answer, secure" in out.stdout
    assert "self-test: validating" in out.stdout
    assert "insecure" in out.stdout and Std.INSECURE_MX_IP in out.stdout


def test_non_validating_resolver_fails_self_test(dnslab: StandardLab, tmp_path: Path) -> None:
    # nsd answers authoritatively but never validates: the self-test must say so (exit 1)
    code, ex = explain(lab_config(tmp_path, str(dnslab.authoritative)), Std.SECURE)
    assert code == 1
    assert ex["self_test"]["validating"] is False


class EventRecorder:
    def __init__(self) -> None:
        self.events: list[ReportEvent] = []

    @hookimpl
    def mxgate_report_on_event(self, event: ReportEvent) -> None:
        self.events.append(event)


@pytest.mark.parametrize(("bogus", "validating"), [(Std.BOGUS_SIG, True), (Std.SECURE, False)])
async def test_startup_self_test_is_stored_and_reported(
    dnslab: StandardLab, tmp_path: Path, bogus: str, validating: bool
) -> None:
    recorder = EventRecorder()
    config, plugins = bootstrap.load(
        lab_config(tmp_path, str(dnslab.resolver), bogus=bogus), extra_plugins=[("recorder", recorder)]
    )
    runtime = Runtime.create(config, plugins)
    runtime.resolver = resolver_from_config(config.dns)
    result = await run_self_test(runtime)
    assert result is not None and result.validating is validating
    assert runtime.stash[SELF_TEST] == result
    expected = "validating" if validating else "not_validating"
    assert [(e.kind, e.label("result")) for e in recorder.events] == [("dns_self_test", expected)]
    runtime.tracking.close()
