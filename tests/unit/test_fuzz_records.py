"""Fuzzing the parsers of what other people publish: TLSA records (text, wire rdata, verification), MTA-STS TXT
records and policies, TLS-RPT records and the reports others send us. Hostile DNS or a hostile HTTPS server must
never crash a delivery or a report import: each parser returns a value or raises its own documented error.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dns.exception
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.wire
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mxgate.plugins.dane import Tlsa, effective_records, make_tlsa, record_matches, verify_chain
from mxgate.plugins.mta_sts.policy import (
    MAX_AGE_LIMIT,
    RecordStatus,
    StsMode,
    StsSyntaxError,
    mx_matches,
    parse_policy,
    parse_record,
    render_policy,
    select_record,
)
from mxgate.plugins.tlsrpt.parse import (
    ReportError,
    decode_report_bytes,
    extract_report_from_mail,
    parse_datetime_lenient,
    parse_received_report,
)
from mxgate.plugins.tlsrpt.report import parse_tlsrpt_record
from mxgate.testing.ca import TestCA

QUICK = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SOAK = settings(
    max_examples=20_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
NOW = datetime.now(UTC)

# -- TLSA ------------------------------------------------------------------------------------------------------

BYTE = st.integers(0, 255)
TLSA_RECORDS = st.builds(Tlsa, BYTE | st.sampled_from([2, 3]), BYTE | st.sampled_from([0, 1]),
                         BYTE | st.sampled_from([0, 1, 2]), st.binary(max_size=80))  # fmt: skip


def tlsa_text_property(text: str) -> None:
    try:
        rec = Tlsa.parse(text)
    except ValueError as exc:
        assert "TLSA" in str(exc)
        return
    assert Tlsa.parse(rec.text) == rec  # what we print parses back to the same record
    reason = rec.unusable_reason
    assert reason is None or isinstance(reason, str)


@QUICK
@given(st.one_of(
    st.text(max_size=120),
    st.builds(lambda u, s, m, d: f"{u} {s} {m} {d}", st.integers(-300, 300), st.integers(-3, 300),
              st.integers(-3, 300), st.text(alphabet="0123456789abcdefABCDEF \t-xg", max_size=140)),
))  # fmt: skip
@example("3 1 1")
@example("3 1 1 " + "a" * 63)
@example("99999999999999999999 1 1 ab")
@example("٣ 1 1 ab")
@example("3 1 1 ab\x00cd")
def test_fuzz_tlsa_text(text: str) -> None:
    tlsa_text_property(text)


@QUICK
@given(st.binary(max_size=120))
@example(b"")
@example(b"\x03\x01")
@example(b"\x03\x01\x01")
def test_fuzz_tlsa_wire(wire: bytes) -> None:
    """TLSA rdata off the wire (what a hostile authoritative server can send) -> a record or a DNS FormError."""
    try:
        rd = dns.rdata.from_wire(dns.rdataclass.IN, dns.rdatatype.TLSA, wire, 0, len(wire))
    except (dns.exception.DNSException, ValueError):
        return
    rec = Tlsa.from_rdata(rd)
    assert (rec.usage, rec.selector, rec.mtype) == tuple(wire[:3])
    assert rec.data == wire[3:]


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("fuzz-dane")
    root = TestCA.create(d / "root")
    inter = root.intermediate()
    leaf = inter.issue(["mx1.example.test"], directory=d)
    return {"chain": leaf.chain, "with_root": (*leaf.chain, leaf.root)}


@QUICK
@given(st.lists(TLSA_RECORDS, max_size=6), st.booleans())
def test_fuzz_tlsa_verification_is_sound(chains: dict[str, Any], records: list[Tlsa], with_root: bool) -> None:
    """Arbitrary records never crash classification or verification, and random data never authenticates:
    a chain verifies only if some kept record really matches one of its certificates."""
    chain = chains["with_root" if with_root else "chain"]
    kept, dropped = effective_records(records)
    assert len(kept) + len(dropped) == len(records)
    assert all(rec.usable for rec in kept)
    assert all(reason for _rec, reason in dropped)
    check = verify_chain(chain, kept, ["mx1.example.test"], NOW)
    genuine = any(record_matches(rec, cert) for rec in kept for cert in chain)
    if check.ok:
        assert genuine, check
        assert check.matched in kept
    else:
        assert check.result_type is not None and check.detail


@QUICK
@given(st.sampled_from([(3, 0, 0), (3, 0, 1), (3, 1, 1), (3, 1, 2), (2, 0, 1), (2, 1, 1)]), st.integers(0, 2),
       st.integers(0, 511))  # fmt: skip
def test_one_flipped_bit_breaks_a_match(chains: dict[str, Any], params: tuple[int, int, int], depth: int,
                                        bit: int) -> None:  # fmt: skip
    """A genuine record authenticates; the same record with any single bit flipped does not (unless another
    certificate of the chain happens to match, which cannot happen for distinct certificates)."""
    chain = chains["with_root"]
    usage, selector, mtype = params
    cert = chain[0] if usage == 3 else chain[1 + depth % (len(chain) - 1)]
    rec = make_tlsa(cert, usage, selector, mtype)
    assert verify_chain(chain, [rec], ["mx1.example.test"], NOW).ok
    data = bytearray(rec.data)
    data[(bit // 8) % len(data)] ^= 1 << (bit % 8)
    bad = Tlsa(usage, selector, mtype, bytes(data))
    assert not verify_chain(chain, [bad], ["mx1.example.test"], NOW).ok


# -- MTA-STS ---------------------------------------------------------------------------------------------------

STS_PIECES = st.sampled_from(
    ["v=STSv1", "v=STSv1;", "; ", ";", "id=", "id=20240101", "id=" + "a" * 33, "=", " ", "\t", "ext=val", "v=",
     "STSv1", "\x00", "ü", "x" * 40]
)  # fmt: skip
STS_RECORDS = st.one_of(st.text(max_size=120), st.lists(STS_PIECES, max_size=12).map("".join))


def sts_record_property(texts: list[str]) -> None:
    lookup = select_record(texts)
    assert lookup.status in (RecordStatus.FOUND, RecordStatus.NONE, RecordStatus.INVALID)
    if lookup.status is RecordStatus.FOUND:
        assert lookup.record is not None
        assert re.fullmatch(r"[A-Za-z0-9]{1,32}", lookup.record.id)
        assert lookup.record.text in texts
    else:
        assert lookup.record is None and lookup.detail
    for text in texts:
        try:
            parse_record(text)
        except StsSyntaxError as exc:
            assert str(exc)


@QUICK
@given(st.lists(STS_RECORDS, max_size=3))
@example(["v=STSv1; id=abc; id=def"])
@example(["v=STSv1;id=abc;"])
@example(["v=STSv1; id=abc", "v=STSv1; id=abc"])
def test_fuzz_sts_txt(texts: list[str]) -> None:
    sts_record_property(texts)


POLICY_LINES = st.one_of(
    st.sampled_from(
        ["version: STSv1", "mode: enforce", "mode: testing", "mode: none", "mode: ENFORCE", "max_age: 86400",
         "max_age: 31557601", "max_age: 99999999999", "max_age: -1", "mx: mx.example.com", "mx: *.example.com",
         "mx: *.com", "mx: *", "mx: a..b", "mx: " + "a" * 64 + ".example", "unknown: \x00", "version:STSv1",
         "  mx :  mx2.example.com  ", "mx: MX.EXAMPLE.COM.", ": x", "x", ""]
    ),
    st.text(max_size=60),
)  # fmt: skip
POLICIES = st.builds(
    lambda lines, eol: eol.join(lines), st.lists(POLICY_LINES, max_size=12), st.sampled_from(["\n", "\r\n", "\r"])
)


def sts_policy_property(text: str) -> None:
    try:
        policy = parse_policy(text)
    except StsSyntaxError as exc:
        assert str(exc)
        return
    assert 0 <= policy.max_age <= MAX_AGE_LIMIT
    assert policy.mode is StsMode.NONE or policy.mx
    for pattern in policy.mx:
        assert pattern == pattern.lower() and not pattern.endswith(".")
        assert "*" not in pattern.removeprefix("*.")
        assert mx_matches(pattern, "x." + pattern.removeprefix("*.")) == pattern.startswith("*.")
    again = parse_policy(render_policy(policy.mode, policy.mx, policy.max_age))
    assert (again.mode, again.max_age, again.mx) == (policy.mode, policy.max_age, policy.mx)


@QUICK
@given(st.one_of(POLICIES, st.text(max_size=400)))
@example("version: STSv1\nmode: enforce\nmax_age: 86400\n")
@example("version: STSv1\nmode: enforce\nmx: *.example.com\nmax_age: ٣\n")
def test_fuzz_sts_policy(text: str) -> None:
    sts_policy_property(text)


@QUICK
@given(st.text(max_size=40), st.text(max_size=40))
@example("*.example.com", "a.b.example.com")
@example("*.example.com", "example.com")
@example("*.example.com", "*.example.com")
def test_fuzz_mx_matches(pattern: str, host: str) -> None:
    """RFC 8461 §4.1: a wildcard covers exactly one left-most label, never the parent or two labels."""
    if not mx_matches(pattern, host):
        return
    p = pattern.strip().rstrip(".").lower()
    h = host.strip().rstrip(".").lower()
    if p.startswith("*."):
        label, _, rest = h.partition(".")
        assert rest == p[2:] and label and label != "*"
    else:
        assert p == h


# -- TLS-RPT ---------------------------------------------------------------------------------------------------

RPT_PIECES = st.sampled_from(
    ["v=TLSRPTv1", ";", "; ", " ; ", "rua=", "mailto:a@example.org", "mailto:", "https://r.example/x", "https:",
     ",", " , ", "ext=v", "rua=mailto:%40@x", "?subject=x", "=", "\t", "ü", "\x00"]
)  # fmt: skip
RPT_RECORDS = st.one_of(
    st.text(max_size=120),
    st.lists(RPT_PIECES, max_size=14).map("".join),
    st.lists(st.lists(RPT_PIECES, max_size=6).map("".join), max_size=3),
    st.binary(max_size=80),
)


def tlsrpt_record_property(records: list[Any]) -> None:
    rec = parse_tlsrpt_record(records)
    if rec is None:
        return
    assert rec.rua or rec.ignored, "a valid record has a rua"  # (URIs of other schemes are kept apart)
    for uri in rec.rua:
        assert uri.lower().startswith(("mailto:", "https:"))
        assert " " not in uri and "\t" not in uri
    for address in rec.mailto:
        assert "@" in address and " " not in address
    for url in rec.https:
        assert url.lower().startswith("https:")


@QUICK
@given(st.lists(RPT_RECORDS, max_size=3))
@example(["v=TLSRPTv1; rua=mailto:a@example.org"])
@example([["v=TLSRPTv1;", "rua=https://[::1"]])
@example(["v=TLSRPTv1; rua=https://[zz]/"])
@example([b"v=TLSRPTv1; rua=mailto:\xff@x"])
def test_fuzz_tlsrpt_record(records: list[Any]) -> None:
    tlsrpt_record_property(records)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=30), c, max_size=4),
    max_leaves=25,
)
REPORT_KEYS = st.sampled_from(
    ["organization-name", "date-range", "start-datetime", "end-datetime", "contact-info", "report-id", "policies",
     "policy", "policy-type", "policy-string", "policy-domain", "mx-host", "summary",
     "total-successful-session-count", "total-failure-session-count", "failure-details", "result-type",
     "sending-mta-ip", "receiving-mx-hostname", "receiving-ip", "failed-session-count", "failure-reason-code",
     "Organization_Name", "POLICIES"]
)  # fmt: skip
REPORT_LIKE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
    | st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-01 00:00:00", "2026-02-30", "2026-01-01T25:61:61+99:99"]),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(REPORT_KEYS, c, max_size=6),
    max_leaves=40,
)  # fmt: skip


def received_report_property(document: Any) -> None:
    try:
        report = parse_received_report(document)
    except ReportError as exc:
        # only a non-object, or an object whose policy entries are all unusable (RFC 8460 §4.4)
        assert not isinstance(document, dict) or "no usable policy" in str(exc)
        return
    assert report.success >= 0 and report.failure >= 0
    for policy in report.policies:
        assert policy.policy_type in ("tlsa", "sts", "no-policy-found") and policy.policy_domain
        assert policy.success >= 0 and policy.failure >= 0
        assert all(f.count >= 0 for f in policy.failures)
    for ts in (report.start, report.end):
        assert ts is None or isinstance(ts, float)


@QUICK
@given(st.one_of(REPORT_LIKE, JSON_VALUES))
def test_fuzz_received_report(document: Any) -> None:
    received_report_property(document)


@QUICK
@given(st.one_of(st.text(max_size=40), st.integers(), st.floats(), st.none(), st.booleans()))
@example("2026-01-01T00:00:00+23:59")
@example("9999-12-31T23:59:59-23:59")
@example("0001-01-01T00:00:00+23:59")
@example("2026-01-01T00:00:00.99999999999999999999Z")
def test_fuzz_report_datetimes(value: Any) -> None:
    ts = parse_datetime_lenient(value)
    assert ts is None or isinstance(ts, float)


def decode_property(data: bytes) -> None:
    try:
        decoded = decode_report_bytes(data, limit=4096)
    except ReportError as exc:
        assert str(exc)
        return
    received_report_property(decoded)


@QUICK
@given(st.one_of(
    st.binary(max_size=300),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    JSON_VALUES.map(lambda v: gzip.compress(json.dumps(v).encode())),
    st.binary(max_size=200).map(gzip.compress).map(lambda b: b[: len(b) // 2]),
))  # fmt: skip
@example(gzip.compress(b"[" * 10_000))
@example(gzip.compress(b" " * 100_000))
@example(b"\x1f\x8b")
@example(b"\xef\xbb\xbf{}")
def test_fuzz_decode_report_bytes(data: bytes) -> None:
    decode_property(data)


def test_deeply_nested_report_is_a_report_error() -> None:
    """Found by this fuzzing: 300 gzipped bytes of nested '[' used to escape as json's RecursionError."""
    with pytest.raises(ReportError):
        decode_report_bytes(gzip.compress(b"[" * 100_000))


@QUICK
@given(st.one_of(
    st.binary(max_size=600),
    st.builds(lambda ctype, name, body: (
        f"From: a@b\r\nContent-Type: multipart/report; boundary=B\r\n\r\n--B\r\nContent-Type: {ctype}\r\n"
        f"Content-Disposition: attachment; filename=\"{name}\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        f"{body}\r\n--B--\r\n").encode("utf-8", "surrogateescape"),
        st.sampled_from(["application/tlsrpt+gzip", "application/json", "text/plain", "application/octet-stream",
                         "x/y; name=\"\x00\""]),
        st.sampled_from(["r.json.gz", "r.json", "x", ""]), st.text(alphabet="QUJD=\r\n!", max_size=60)),
))  # fmt: skip
def test_fuzz_extract_report_from_mail(data: bytes) -> None:
    payload = extract_report_from_mail(data)
    assert payload is None or isinstance(payload, bytes)


# -- soak ------------------------------------------------------------------------------------------------------


def _soak(fn: Callable[..., None], *strategies: Any) -> Callable[[], None]:
    @pytest.mark.soak
    @SOAK
    @given(st.tuples(*strategies))
    def run(args: tuple[Any, ...]) -> None:
        fn(*args)

    return run


test_soak_fuzz_tlsa_text = _soak(tlsa_text_property, st.text(max_size=200))
test_soak_fuzz_sts_txt = _soak(sts_record_property, st.lists(STS_RECORDS, max_size=3))
test_soak_fuzz_sts_policy = _soak(sts_policy_property, st.one_of(POLICIES, st.text(max_size=400)))
test_soak_fuzz_tlsrpt_record = _soak(tlsrpt_record_property, st.lists(RPT_RECORDS, max_size=3))
test_soak_fuzz_received_report = _soak(received_report_property, REPORT_LIKE)
test_soak_fuzz_decode_report = _soak(decode_property, st.binary(max_size=600))

DATA = Path(__file__).resolve().parents[1] / "data" / "tlsrpt"


@pytest.mark.parametrize("name", ["google-shaped.json", "microsoft-shaped.json", "rfc8460-example.json"])
def test_real_reports_survive_every_single_byte_truncation(name: str) -> None:
    """Cut a real-shaped report at every length: each prefix is a ReportError or parses, never a crash."""
    data = (DATA / name).read_bytes()
    for end in range(0, len(data), max(1, len(data) // 300)):
        decode_property(data[:end])
        decode_property(gzip.compress(data)[:end])
