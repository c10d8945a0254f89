"""TLS-RPT without I/O: the _smtp._tls record, aggregation keys, the report document (schema-validated), file name,
mail message, and the lenient reader for reports others send (RFC 8460; RFC-CHECKLIST 26-31)."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from mxgate.core.outcomes import PolicyType, TlsOutcome, TlsRptResult
from mxgate.plugins.tlsrpt import parse
from mxgate.plugins.tlsrpt import report as rpt

DATA = Path(__file__).resolve().parents[1] / "data" / "tlsrpt"
SCHEMA = json.loads((DATA / "report.schema.json").read_text())


def validate(report: Any) -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(report), key=str)
    assert errors == [], [e.message for e in errors]


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


# -- RFC-CHECKLIST 26: the record ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "rua"),
    [
        (["v=TLSRPTv1; rua=mailto:tlsrpt@example.org"], ("mailto:tlsrpt@example.org",)),
        (
            ["v=TLSRPTv1;rua=https://r.example.org/v1,mailto:a@example.org;"],
            ("https://r.example.org/v1", "mailto:a@example.org"),
        ),
        (
            ["v=TLSRPTv1; rua=mailto:a@example.org , https://r.example.org/"],
            ("mailto:a@example.org", "https://r.example.org/"),
        ),
        ([("v=TLSRPTv1; rua=mai", "lto:a@example.org")], ("mailto:a@example.org",)),  # strings concatenated
        (["v=spf1 -all", "v=TLSRPTv1; rua=mailto:a@example.org"], ("mailto:a@example.org",)),  # others discarded
        (["v=TLSRPTv1; ext_1=val; rua=mailto:a@example.org"], ("mailto:a@example.org",)),  # extension before rua
    ],
)
def test_valid_records(records: list[Any], rua: tuple[str, ...]) -> None:
    rec = rpt.parse_tlsrpt_record(records)
    assert rec is not None and rec.rua == rua


@pytest.mark.parametrize(
    "records",
    [
        [],
        ["v=TLSRPTv1; rua=mailto:a@example.org", "v=TLSRPTv1; rua=mailto:b@example.org"],  # two records
        ["v=TLSRPTv1"],  # no rua
        ["v=TLSRPTv1;"],
        ["v=TLSRPTv1; rua="],
        ["v=TLSRPTv2; rua=mailto:a@example.org"],
        ["v=tlsrptv1; rua=mailto:a@example.org"],  # version is case-sensitive (%s in the ABNF)
        [" v=TLSRPTv1; rua=mailto:a@example.org"],
        ["v=TLSRPTv1; rua=mailto:a@example.org; bad field"],
        ["v=TLSRPTv1 rua=mailto:a@example.org"],
    ],
)
def test_invalid_records_mean_no_reporting(records: list[str]) -> None:
    assert rpt.parse_tlsrpt_record(records) is None


def test_repeated_rua_fields_merge_rfc8460_3() -> None:
    """RFC 8460 §3 (RFC-CHECKLIST 26): repeated ``rua=`` fields merge; they do not make the record invalid."""
    rec = rpt.parse_tlsrpt_record(
        ["v=TLSRPTv1; rua=mailto:a@example.org; ext=1; rua=https://r.example.org/v1,mailto:a@example.org"]
    )
    assert rec is not None
    assert rec.rua == ("mailto:a@example.org", "https://r.example.org/v1")


def test_exclamation_mark_must_be_percent_encoded_rfc8460_3() -> None:
    """RFC 8460 §3: "commas (ASCII 0x2C) and exclamation points (ASCII 0x21) MUST be encoded" in a rua URI;
    a literal ``!`` makes that URI unusable (the others stay), ``%21`` is the way to write it."""
    rec = rpt.parse_tlsrpt_record(["v=TLSRPTv1; rua=mailto:a!b@example.org,mailto:c%21d@example.org"])
    assert rec is not None
    assert rec.rua == ("mailto:c%21d@example.org",)
    assert rec.ignored == ("mailto:a!b@example.org",)
    assert rec.mailto == ("c!d@example.org",)
    only_bad = rpt.parse_tlsrpt_record(["v=TLSRPTv1; rua=https://r.example.org/a!b"])
    assert only_bad is not None and only_bad.rua == () and only_bad.mailto == ()


def test_record_keeps_only_mailto_and_https() -> None:
    rec = rpt.parse_tlsrpt_record(["v=TLSRPTv1; rua=http://insecure.example/,mailto:r%40example.org?subject=x"])
    assert rec is not None
    assert rec.rua == ("mailto:r%40example.org?subject=x",)
    assert rec.ignored == ("http://insecure.example/",)
    assert rec.mailto == ("r@example.org",)


# -- aggregation keys --------------------------------------------------------------------------------------------


def outcome(**kw: Any) -> TlsOutcome:
    base: dict[str, Any] = {
        "connector": "internet",
        "policy_type": PolicyType.STS,
        "policy_domain": "Example.ORG.",
        "success": True,
        "mx_host": "MX1.example.org.",
        "policy_strings": ("version: STSv1", "mode: enforce", "mx: *.example.org", "max_age: 86400"),
        "mx_patterns": ("*.example.org",),
        "at": ts("2024-03-04T12:00:00"),
    }
    base.update(kw)
    return TlsOutcome(**base)


def test_keys_sts_tlsa_and_no_policy() -> None:
    key, fail = rpt.keys_for_outcome(outcome())
    assert fail is None
    assert key == rpt.PolicyKey("2024-03-04", "example.org", "sts", outcome().policy_strings, ("*.example.org",))
    key, _ = rpt.keys_for_outcome(outcome(policy_type=PolicyType.TLSA, policy_strings=("3 1 1 ab",)))
    assert key.mx_hosts == ("mx1.example.org",)  # tlsa: the MX host reported on
    key, _ = rpt.keys_for_outcome(outcome(policy_type=PolicyType.NO_POLICY))
    assert (key.policy_type, key.policy_strings, key.mx_hosts) == ("no-policy-found", (), ())


def test_failure_groups_and_default_result_type() -> None:
    _, fail = rpt.keys_for_outcome(
        outcome(
            success=False,
            result_type=TlsRptResult.CERTIFICATE_EXPIRED,
            sending_ip="192.0.2.1",
            receiving_ip="198.51.100.7",
            receiving_helo="mx1",
            detail="certificate   has\nexpired",
        )
    )
    assert fail == rpt.FailureKey(
        "certificate-expired", "192.0.2.1", "mx1.example.org", "mx1", "198.51.100.7", "", "certificate has expired"
    )
    _, fail = rpt.keys_for_outcome(outcome(success=False))
    assert fail is not None and fail.result_type == "validation-failure"


def test_day_is_the_utc_day_of_the_attempt() -> None:
    k1, _ = rpt.keys_for_outcome(outcome(at=ts("2024-03-04T23:59:59")))
    k2, _ = rpt.keys_for_outcome(outcome(at=ts("2024-03-05T00:00:00")))
    assert (k1.day, k2.day) == ("2024-03-04", "2024-03-05")


# -- RFC-CHECKLIST 27-29: the report ---------------------------------------------------------------------------


def sample_report() -> dict[str, Any]:
    sts = rpt.PolicyKey("2024-03-04", "example.org", "sts", ("version: STSv1", "mode: testing"), ("*.example.org",))
    tlsa = rpt.PolicyKey("2024-03-04", "example.org", "tlsa", ("3 1 1 abcd",), ("mx1.example.org",))
    none = rpt.PolicyKey("2024-03-04", "example.org", "no-policy-found")
    failures = (
        (rpt.FailureKey("starttls-not-supported", "192.0.2.1", "mx2.example.org", "", "2001:db8::25"), 2),
        (
            rpt.FailureKey("certificate-expired", "192.0.2.1", "mx1.example.org", "mx1", "198.51.100.7", "", "expired"),
            5,
        ),
    )
    return rpt.build_report(
        organization_name="Example Sender",
        contact_info="tlsrpt@sender.example",
        report_id="20240304.example.org.abc@mx.sender.example",
        day="2024-03-04",
        policies=[
            rpt.PolicyAggregate(sts, 10, 7, failures),
            rpt.PolicyAggregate(tlsa, 3, 0),
            rpt.PolicyAggregate(none, 1, 0),
        ],
    )


def test_report_validates_and_covers_the_full_utc_day() -> None:
    report = sample_report()
    validate(report)
    assert report["date-range"] == {"start-datetime": "2024-03-04T00:00:00Z", "end-datetime": "2024-03-04T23:59:59Z"}
    sts = next(p for p in report["policies"] if p["policy"]["policy-type"] == "sts")
    assert sts["summary"] == {"total-successful-session-count": 10, "total-failure-session-count": 7}
    assert [d["result-type"] for d in sts["failure-details"]] == ["certificate-expired", "starttls-not-supported"]
    assert sts["failure-details"][0] == {
        "result-type": "certificate-expired",
        "sending-mta-ip": "192.0.2.1",
        "receiving-mx-hostname": "mx1.example.org",
        "receiving-mx-helo": "mx1",
        "receiving-ip": "198.51.100.7",
        "failed-session-count": 5,
        "failure-reason-code": "expired",
    }
    none = next(p for p in report["policies"] if p["policy"]["policy-type"] == "no-policy-found")
    assert none["policy"] == {"policy-type": "no-policy-found", "policy-domain": "example.org"}


def test_schema_rejects_what_the_rfc_does_not_allow() -> None:
    bad = sample_report()
    bad["date-range"]["start-datetime"] = "2024-03-04T00:00:00"  # no zone
    with pytest.raises(AssertionError):
        validate(bad)
    bad = sample_report()
    sts = next(p for p in bad["policies"] if p["policy"]["policy-type"] == "sts")
    sts["failure-details"][0]["result-type"] = "tls-broken"
    with pytest.raises(AssertionError):
        validate(bad)
    bad = sample_report()
    bad["policies"][0]["summary"]["total_failure_session_count"] = 1
    with pytest.raises(AssertionError):
        validate(bad)
    bad = sample_report()
    sts = next(p for p in bad["policies"] if p["policy"]["policy-type"] == "sts")
    sts["failure-details"][0]["sending-mta-ip"] = "not-an-ip"
    with pytest.raises(AssertionError):
        validate(bad)


def test_gzip_is_deterministic_and_round_trips() -> None:
    report = sample_report()
    gz = rpt.gzip_report(report)
    assert gz == rpt.gzip_report(report)
    assert json.loads(gzip.decompress(gz)) == report


def test_filename_rfc8460_5_1() -> None:
    assert rpt.report_filename("MX.Sender.example.", "example.org", "2024-03-04") == (
        "mx.sender.example!example.org!1709510400!1709596799.json.gz"
    )
    assert rpt.report_filename("s.example", "example.org", "2024-03-04", "a1b2").endswith("!1709596799!a1b2.json.gz")
    with pytest.raises(ValueError):
        rpt.report_filename("s.example", "example.org", "2024-03-04", "not-alnum")


def test_mail_message_rfc8460_5_3() -> None:
    gz = rpt.gzip_report(sample_report())
    data = rpt.build_mail(
        from_addr="tlsrpt-noreply@mx.sender.example",
        to_addrs=["reports@example.org"],
        policy_domain="example.org",
        submitter="mx.sender.example",
        report_id="20240304.example.org.abc@mx.sender.example",
        filename="mx.sender.example!example.org!1709510400!1709596799!abc.json.gz",
        gz=gz,
        now=ts("2024-03-05T01:00:00"),
    )
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert msg["TLS-Report-Domain"] == "example.org"
    assert msg["TLS-Report-Submitter"] == "mx.sender.example"
    assert msg["TLS-Required"] == "No"
    assert msg["Subject"] == (
        "Report Domain: example.org Submitter: mx.sender.example"
        " Report-ID: <20240304.example.org.abc@mx.sender.example>"
    )
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "application/tlsrpt+gzip"]
    assert parts[1].get_filename() == "mx.sender.example!example.org!1709510400!1709596799!abc.json.gz"
    assert parts[1].get_content() == gz
    assert parse.extract_report_from_mail(data) == gz


# -- RFC-CHECKLIST 31: reading others' reports leniently -----------------------------------------------------------


def test_rfc_example_report_is_read() -> None:
    report = parse.parse_received_report(json.loads((DATA / "rfc8460-example.json").read_text()))
    assert report.organization == "Company-X"
    assert report.start == ts("2016-04-01T00:00:00") and report.end == ts("2016-04-01T23:59:59")
    (policy,) = report.policies
    assert policy.mx_hosts == ("*.mail.company-y.example",)  # the example's string form
    assert (policy.success, policy.failure) == (5326, 303)
    assert [(f.result_type, f.count) for f in policy.failures] == [
        ("certificate-expired", 100),
        ("starttls-not-supported", 200),
        ("validation-failure", 3),
    ]
    assert policy.failures[2].reason == "X509_V_ERR_PROXY_PATH_LENGTH_EXCEEDED"


def test_google_shaped_report_gzip() -> None:
    raw = (DATA / "google-shaped.json").read_bytes()
    report = parse.parse_received_report(parse.decode_report_bytes(gzip.compress(raw)))
    assert report.organization == "Google Inc."
    assert report.start == ts("2024-03-04T00:00:00")
    assert (report.success, report.failure) == (1520, 3)
    assert report.policies[0].mx_hosts == ("mx1.example.org", "mx2.example.org")


def test_microsoft_shaped_report_zoneless_and_empty_fields() -> None:
    report = parse.parse_received_report(parse.decode_report_bytes((DATA / "microsoft-shaped.json").read_bytes()))
    assert report.start == ts("2024-03-04T00:00:00")  # no zone: read as UTC
    assert report.end == ts("2024-03-04T23:59:59")
    sts, none = report.policies
    assert sts.failures[0].reason == "" and sts.failures[0].count == 7
    assert (none.policy_type, none.policy_strings, none.mx_hosts, none.failures) == ("no-policy-found", (), (), ())
    assert (report.success, report.failure) == (47, 7)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-03-04T00:00:00Z", "2024-03-04T00:00:00"),
        ("2024-03-04T00:00:00", "2024-03-04T00:00:00"),
        ("2024-03-04 00:00:00", "2024-03-04T00:00:00"),
        ("2024-03-04T01:00:00+01:00", "2024-03-04T00:00:00"),
        ("2024-03-03T19:00:00-0500", "2024-03-04T00:00:00"),
        ("2024-03-04T00:00:00.000Z", "2024-03-04T00:00:00"),
        ("2024-03-04", "2024-03-04T00:00:00"),
    ],
)
def test_lenient_datetimes(text: str, expected: str) -> None:
    assert parse.parse_datetime_lenient(text) == ts(expected)


@pytest.mark.parametrize("text", ["", "yesterday", "2024-13-01T00:00:00", None, True])
def test_unreadable_datetimes_are_none(text: Any) -> None:
    assert parse.parse_datetime_lenient(text) is None


def test_lenient_fields() -> None:
    report = parse.parse_received_report(
        {
            "organization-name": None,
            "policies": [
                {
                    "policy": {"policy-type": "sts", "policy-domain": "Example.org."},
                    "summary": {"total-successful-session-count": "12", "total-failure-session-count": ""},
                    "failure-details": [{"result-type": "", "failed-session-count": "3"}],
                },
                "garbage",
            ],
        }
    )
    assert report.organization == "" and report.start is None
    first = report.policies[0]
    assert (first.policy_domain, first.success, first.failure) == ("example.org", 12, 3)
    assert first.failures[0].result_type == "unknown"


def test_unreadable_reports_are_refused() -> None:
    with pytest.raises(parse.ReportError):
        parse.decode_report_bytes(b"not json")
    with pytest.raises(parse.ReportError):
        parse.parse_received_report([1, 2])
    bomb = gzip.compress(b" " * (parse.MAX_REPORT_BYTES + 10))
    with pytest.raises(parse.ReportError):
        parse.decode_report_bytes(bomb)
