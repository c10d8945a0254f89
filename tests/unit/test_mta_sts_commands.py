"""``mxgate sts show | list``: what the cache holds came from the network, and reaches the terminal escaped.

A policy host's error text (a redirect's ``Location``, an exception message) lands in ``last_error``; a cluster
peer's row lands whole. The cache is filled directly here (no fetch needed), then the commands are run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w

from mxgate.core import cli
from mxgate.plugins.mta_sts import CACHE_FILE, CachedPolicy, SqlitePolicyStore
from mxgate.plugins.mta_sts.commands import describe
from mxgate.plugins.mta_sts.policy import parse_policy

POLICY = "version: STSv1\nmode: enforce\nmx: mx1.evil.test\nmax_age: 86400\n"
EVIL_ERROR = "mta-sts.evil.test: HTTP 302 redirect to \x1b]0;pwned\x07\x1b[2J\u202egnp.exe refused"


def _entry(**kwargs: object) -> CachedPolicy:
    fields: dict[str, object] = {
        "domain": "evil.test",
        "policy_id": "id1",
        "policy": parse_policy(POLICY),
        "fetched_at": 1_000_000.0,
        "expires_at": 4_000_000_000.0,
        "last_attempt_at": 1_000_000.0,
        "failures": 2,
        "last_error": EVIL_ERROR,
    }
    fields.update(kwargs)
    return CachedPolicy(**fields)  # type: ignore[arg-type]


def _config(tmp_path: Path, *entries: CachedPolicy) -> str:
    state = tmp_path / "var"
    state.mkdir(mode=0o700)
    document = {
        "server": {"hostname": "mx.gateway.test", "state_dir": str(state)},
        "outbound_connector": [{"name": "internet", "recipient_domains": ["*"], "use_mx": True}],
        "plugins": {"disable": ["dnssec", "dane", "tlsrpt", "prometheus"]},
    }
    path = tmp_path / "mxgate.toml"
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    store = SqlitePolicyStore(state / CACHE_FILE)
    try:
        for entry in entries:
            store.put(entry)
    finally:
        store.close()
    return str(path)


def _unsafe(text: str) -> list[str]:
    return [c for c in text if c in "\x1b\x07\u202e" or (ord(c) < 0x20 and c != "\n")]


def test_describe_escapes_network_text() -> None:
    shown = describe(_entry(policy_id="id\x1b[31m"), 1_000_000.0)
    assert _unsafe(shown) == []
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\u202egnp.exe" in shown
    assert "id:           id\\x1b[31m" in shown
    assert "mode:         enforce" in shown and "mx:           mx1.evil.test" in shown


def test_sts_show_and_list_escape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, _entry(), _entry(domain="two.test", policy_id="id\x1b[31m", last_error=""))
    assert cli.main(["sts", "show", "evil.test", "-c", config]) == 0
    out = capsys.readouterr().out
    assert _unsafe(out) == []
    assert "failures:     2 (mta-sts.evil.test: HTTP 302 redirect to \\x1b]0;pwned\\x07" in out
    assert cli.main(["sts", "list", "-c", config]) == 0
    out = capsys.readouterr().out
    assert _unsafe(out) == []
    assert out.splitlines()[2].split()[:2] == ["two.test", "id\\x1b[31m"]
    # --json is JSON: the value comes back exactly, and the text on the terminal is escaped by the encoder
    assert cli.main(["sts", "show", "evil.test", "--json", "-c", config]) == 0
    out = capsys.readouterr().out
    assert _unsafe(out) == []
    assert json.loads(out)["last_error"] == EVIL_ERROR
