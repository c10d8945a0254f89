"""RFC 6125 name matching as RFC 7672 §3.2 narrows it (RFC-CHECKLIST 12, 23)."""

from __future__ import annotations

import pytest

from mxgate.core.tls import match_reference_identifiers, normalize_dns_name
from mxgate.testing.ca import IssueCert


@pytest.mark.parametrize(
    ("presented", "reference", "matches"),
    [
        # exact, case-insensitive, trailing dots ignored
        (["mx1.example.com"], "mx1.example.com", True),
        (["mx1.example.com"], "MX1.Example.COM", True),
        (["mx1.example.com"], "mx1.example.com.", True),
        (["mx1.example.com."], "mx1.example.com", True),
        (["mx1.example.com"], "mx2.example.com", False),
        (["mx1.example.com"], "example.com", False),
        # a wildcard is the whole left-most label and stands for exactly one label
        (["*.example.com"], "a.example.com", True),
        (["*.example.com"], "A.EXAMPLE.COM.", True),
        (["*.example.com"], "example.com", False),
        (["*.example.com"], "a.b.example.com", False),
        (["*.example.com"], ".example.com", False),
        (["f*.example.com"], "foo.example.com", False),
        (["*oo.example.com"], "foo.example.com", False),
        (["a.*.example.com"], "a.b.example.com", False),
        (["*.*.example.com"], "a.b.example.com", False),
        (["*.com"], "example.com", False),
        (["*"], "localhost", False),
        # reference identifiers are names, never patterns
        (["*.example.com"], "*.example.com", False),
        # any presented name may match
        (["mx1.other.test", "*.example.com"], "mx9.example.com", True),
        # IDNA: U-labels and A-labels are the same name
        (["xn--bcher-kva.example"], "bücher.example", True),
        (["xn--bcher-kva.example"], "XN--BCHER-KVA.example", True),
        (["*.xn--bcher-kva.example"], "mx.bücher.example", True),
        (["bücher.example"], "xn--bcher-kva.example", True),
        (["xn--bcher-kva.example"], "bucher.example", False),
    ],
)
def test_dns_san_matching(issue_cert: IssueCert, presented: list[str], reference: str, matches: bool) -> None:
    cert = issue_cert(presented, common_name="unrelated-cn.test").cert
    assert match_reference_identifiers(cert, [reference]) == (reference if matches else None)


def test_cn_is_ignored_when_dns_sans_exist(issue_cert: IssueCert) -> None:
    cert = issue_cert(["mx1.example.com"], common_name="mx.example.com").cert
    assert match_reference_identifiers(cert, ["mx.example.com"]) is None
    assert match_reference_identifiers(cert, ["mx1.example.com"]) == "mx1.example.com"


def test_cn_is_used_without_dns_sans(issue_cert: IssueCert) -> None:
    cert = issue_cert(["mx.example.com"], san=False).cert
    assert match_reference_identifiers(cert, ["MX.example.com."]) == "MX.example.com."
    assert match_reference_identifiers(cert, ["other.example.com"]) is None


def test_cn_wildcard_without_dns_sans(issue_cert: IssueCert) -> None:
    cert = issue_cert([], common_name="*.example.com", san=False).cert
    assert match_reference_identifiers(cert, ["a.example.com"]) == "a.example.com"
    assert match_reference_identifiers(cert, ["a.b.example.com"]) is None


def test_cn_is_used_when_san_has_only_ip_addresses(issue_cert: IssueCert) -> None:
    cert = issue_cert([], ip_addresses=["127.0.0.1"], common_name="mx.example.com").cert
    assert match_reference_identifiers(cert, ["mx.example.com"]) == "mx.example.com"


def test_no_identifiers_at_all(issue_cert: IssueCert) -> None:
    cert = issue_cert([], ip_addresses=["127.0.0.1"], common_name="").cert
    assert match_reference_identifiers(cert, ["127.0.0.1", "localhost"]) is None


def test_first_matching_reference_in_callers_order(issue_cert: IssueCert) -> None:
    cert = issue_cert(["mx.example.com", "example.com"]).cert
    names = ["nomatch.test", "example.com", "mx.example.com"]
    assert match_reference_identifiers(cert, names) == "example.com"
    assert match_reference_identifiers(cert, iter(["", "..", "mx.example.com"])) == "mx.example.com"
    assert match_reference_identifiers(cert, []) is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Example.COM.", "example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("*.bücher.example", "*.xn--bcher-kva.example"),
        ("", None),
        (".", None),
        ("a..b", None),
    ],
)
def test_normalize_dns_name(name: str, expected: str | None) -> None:
    assert normalize_dns_name(name) == expected
