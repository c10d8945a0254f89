"""MTA-STS without I/O: TXT records, policy text, mx patterns (RFC-CHECKLIST 18, 19, 23), table-driven from
tests/data/mta_sts/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mxgate.plugins.mta_sts.policy import (
    MAX_AGE_LIMIT,
    RecordStatus,
    StsMode,
    StsSyntaxError,
    is_text_plain,
    mx_matches,
    parse_policy,
    parse_record,
    render_policy,
    select_record,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "mta_sts"


def _cases(name: str) -> list[Any]:
    cases: list[Any] = json.loads((DATA / name).read_text(encoding="utf-8"))["cases"]
    return [pytest.param(c, id=c["name"]) for c in cases]


@pytest.mark.parametrize("case", _cases("records.json"))
def test_txt_record(case: dict[str, Any]) -> None:
    lookup = select_record(case["txt"])
    assert lookup.status is RecordStatus(case["status"]), lookup.detail
    if case["status"] == "found":
        assert lookup.id == case["id"]
    else:
        assert lookup.id is None
        assert lookup.detail


def test_parse_record_reasons() -> None:
    with pytest.raises(StsSyntaxError, match="begin"):
        parse_record("id=1; v=STSv1")
    with pytest.raises(StsSyntaxError, match="1-32"):
        parse_record("v=STSv1; id=" + "a" * 33)
    assert parse_record("v=STSv1; id=" + "a" * 32).id == "a" * 32


@pytest.mark.parametrize("case", _cases("policies.json"))
def test_policy(case: dict[str, Any]) -> None:
    if case["error"] is not None:
        with pytest.raises(StsSyntaxError, match=case["error"]):
            parse_policy(case["text"])
        return
    policy = parse_policy(case["text"])
    assert policy.mode is StsMode(case["mode"])
    assert policy.max_age == case["max_age"]
    assert list(policy.mx) == case["mx"]
    assert policy.text == case["text"]


def test_policy_strings_are_the_lines_without_cr() -> None:
    policy = parse_policy("version: STSv1\r\nmode: enforce\r\nmx: mx.example.org\r\n\r\nmax_age: 86400\r\n")
    assert policy.policy_strings == ("version: STSv1", "mode: enforce", "mx: mx.example.org", "max_age: 86400")


def test_render_round_trip() -> None:
    text = render_policy("enforce", ["mx1.example.org", "*.example.net"], 604800)
    assert text == "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.org\r\nmx: *.example.net\r\nmax_age: 604800\r\n"
    policy = parse_policy(text)
    assert (policy.mode, policy.mx, policy.max_age) == (StsMode.ENFORCE, ("mx1.example.org", "*.example.net"), 604800)
    assert parse_policy(render_policy("none", [], MAX_AGE_LIMIT)).mode is StsMode.NONE


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("mail.example.com", "mail.example.com", True),
        ("mail.example.com", "MAIL.Example.COM.", True),
        ("mail.example.com", "mail2.example.com", False),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "A.EXAMPLE.COM.", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", ".example.com", False),
        ("*.example.com", "a.example.org", False),
        ("*.example.com", "*.example.com", False),
        ("", "example.com", False),
    ],
)
def test_mx_matches(pattern: str, host: str, expected: bool) -> None:
    assert mx_matches(pattern, host) is expected


def test_policy_matches_any_pattern() -> None:
    policy = parse_policy("version: STSv1\nmode: enforce\nmx: mx1.example.org\nmx: *.backup.example.org\nmax_age: 1\n")
    assert policy.matches("mx1.example.org")
    assert policy.matches("b1.backup.example.org")
    assert not policy.matches("mx2.example.org")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("text/plain", True),
        ("text/plain; charset=utf-8", True),
        ("TEXT/Plain ;charset=us-ascii", True),
        ("text/html", False),
        ("application/octet-stream", False),
        ("text/plainx", False),
        ("", False),
        (None, False),
    ],
)
def test_media_type(value: str | None, expected: bool) -> None:
    assert is_text_plain(value) is expected
