"""TLS-RPT agent with an injected clock, resolver and random source: aggregation (across a UTC day boundary),
durability, scheduling, rua discovery, retries, DANE MX-host reports, receiving, the hooks and the CLI."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dns.rdata
import jsonschema
import pytest
import tomli_w

from mxgate.core import bootstrap
from mxgate.core.cli import main as cli_main
from mxgate.core.dns_answers import AnswerKind, DnsAnswer, DnssecStatus
from mxgate.core.model import Address, Envelope, IncomingMessage, Session
from mxgate.core.outcomes import PolicyType, TlsOutcome, TlsRptResult
from mxgate.core.runtime import Runtime
from mxgate.plugins.tlsrpt import (
    GRACE_SECONDS,
    RETRY_WINDOW,
    SendResult,
    TlsRptConfig,
    TlsRptPlugin,
    TlsRptService,
    parse,
)
from mxgate.plugins.tlsrpt import report as rpt
from mxgate.testing.gateway import build_document

DATA = Path(__file__).resolve().parents[1] / "data" / "tlsrpt"
SCHEMA = json.loads((DATA / "report.schema.json").read_text())


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def validate(report: Any) -> None:
    jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).validate(
        report
    )


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeResolver:
    """TXT answers by name: a list of record texts, or "error" for a failed lookup; absent names are NXDOMAIN."""

    def __init__(self, txt: dict[str, list[str] | str]) -> None:
        self.txt = txt
        self.queries: list[str] = []

    async def resolve(self, name: str, rdtype: str, *, use_cache: bool = True) -> DnsAnswer:
        self.queries.append(name)
        found = self.txt.get(name)
        if found == "error":
            return DnsAnswer(name, rdtype, AnswerKind.ERROR, DnssecStatus.INDETERMINATE, (), 0, name, (), "timeout")
        if found is None:
            return DnsAnswer(name, rdtype, AnswerKind.NXDOMAIN, DnssecStatus.INSECURE, (), 60, name, ())
        records = tuple(dns.rdata.from_text("IN", "TXT", json.dumps(t)) for t in found)
        return DnsAnswer(name, rdtype, AnswerKind.ANSWER, DnssecStatus.INSECURE, records, 60, name, ())


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, float, dict[str, str]]] = []

    async def __call__(self, kind: str, value: float = 1.0, **labels: str) -> None:
        self.seen.append((kind, value, labels))

    def kinds(self, kind: str) -> list[dict[str, str]]:
        return [labels for k, _, labels in self.seen if k == kind]


def outcome(at: float, *, success: bool = True, domain: str = "example.org", **kw: Any) -> TlsOutcome:
    base: dict[str, Any] = {
        "connector": "internet",
        "policy_type": PolicyType.STS,
        "policy_domain": domain,
        "success": success,
        "mx_host": "mx1.example.org",
        "receiving_ip": "192.0.2.25",
        "sending_ip": "198.51.100.1",
        "policy_strings": ("version: STSv1", "mode: enforce", "mx: mx1.example.org", "max_age: 86400"),
        "mx_patterns": ("mx1.example.org",),
        "result_type": None if success else TlsRptResult.CERTIFICATE_EXPIRED,
        "at": at,
    }
    base.update(kw)
    return TlsOutcome(**base)


def make_service(tmp_path: Path, clock: Clock, **kw: Any) -> TlsRptService:
    conf_fields = {k: kw.pop(k) for k in list(kw) if k in TlsRptConfig.__dataclass_fields__}
    conf = replace(TlsRptConfig(), organization_name="Sender Org", contact_info="tlsrpt@sender.example", **conf_fields)
    return TlsRptService(conf, state_dir=tmp_path / "var", submitter="mx.sender.example", clock=clock, **kw)


RUA_HTTPS = {"_smtp._tls.example.org": ["v=TLSRPTv1; rua=https://reports.example.org/tlsrpt"]}


# -- aggregation -------------------------------------------------------------------------------------------------


async def test_aggregation_across_a_utc_day_boundary(tmp_path: Path) -> None:
    clock = Clock(ts("2024-03-05T00:05:00"))
    svc = make_service(tmp_path, clock, resolver=FakeResolver(RUA_HTTPS), send_window_hours=0.0)
    sent: list[tuple[str, bytes]] = []

    async def fake_post(uri: str, gz: bytes) -> SendResult:
        sent.append((uri, gz))
        return SendResult(uri, "https", True)

    svc.post_https = fake_post  # type: ignore[method-assign]
    svc.record(outcome(ts("2024-03-04T23:59:58")))
    svc.record(outcome(ts("2024-03-04T23:59:59"), success=False))
    svc.record(outcome(ts("2024-03-05T00:00:00")))
    svc.record(outcome(ts("2024-03-05T00:00:01"), success=False))
    svc.record(outcome(ts("2024-03-05T00:00:02"), success=False))
    try:
        day1 = await svc.aggregates("2024-03-04", "example.org")
        day2 = await svc.aggregates("2024-03-05", "example.org")
        assert [(a.success, a.failure) for a in day1] == [(1, 1)]
        assert [(a.success, a.failure) for a in day2] == [(1, 2)]
        # 00:05 is still inside the grace period: nothing goes out yet
        await svc.tick(clock.now)
        assert sent == []
        clock.now = ts("2024-03-05T00:00:00") + GRACE_SECONDS + 1
        await svc.tick(clock.now)
        assert len(sent) == 1  # day 1 only; day 2 is not over
        uri, gz = sent[0]
        assert uri == "https://reports.example.org/tlsrpt"
        report = parse.decode_report_bytes(gz)
        validate(report)
        assert report["date-range"]["start-datetime"] == "2024-03-04T00:00:00Z"
        (entry,) = report["policies"]
        assert entry["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 1}
        assert entry["failure-details"][0]["result-type"] == "certificate-expired"
        assert entry["policy"]["mx-host"] == ["mx1.example.org"]
        # the next day's ticks do not send day 1 again
        await svc.tick(clock.now + 60)
        assert len(sent) == 1
        status = await svc.status("2024-03-04")
        assert status == [("example.org", "", "https://reports.example.org/tlsrpt", "sent", 1, "")]
        assert await svc.status("2024-03-05") == []
    finally:
        await svc.close()


async def test_counts_survive_a_restart_and_a_crash_after_flush(tmp_path: Path) -> None:
    clock = Clock(ts("2024-03-04T12:00:00"))
    svc = make_service(tmp_path, clock)
    for i in range(5):
        svc.record(outcome(clock.now + i, success=i % 2 == 0))
    await svc.close()  # a stop flushes
    again = make_service(tmp_path, clock)
    again.record(outcome(clock.now + 10, success=False))
    await again.flush()  # ... and so does the periodic flush: a "crash" now loses nothing
    third = make_service(tmp_path, clock)
    try:
        (agg,) = await third.aggregates("2024-03-04", "example.org")
        assert (agg.success, agg.failure) == (3, 3)
        assert sum(n for _, n in agg.failures) == 3
    finally:
        await again.close()
        await third.close()


async def test_no_policy_found_is_counted_per_domain(tmp_path: Path) -> None:
    clock = Clock(ts("2024-03-04T12:00:00"))
    svc = make_service(tmp_path, clock)
    svc.record(outcome(clock.now, policy_type=PolicyType.NO_POLICY, domain="plain.example", policy_strings=()))
    svc.record(
        outcome(
            clock.now,
            policy_type=PolicyType.NO_POLICY,
            domain="plain.example",
            success=False,
            result_type=TlsRptResult.STARTTLS_NOT_SUPPORTED,
        )
    )
    try:
        report = await svc.preview("2024-03-04", "plain.example")
        assert report is not None
        validate(report)
        (entry,) = report["policies"]
        assert entry["policy"] == {"policy-type": "no-policy-found", "policy-domain": "plain.example"}
        assert entry["summary"]["total-failure-session-count"] == 1
    finally:
        await svc.close()


# -- scheduling and rua discovery ---------------------------------------------------------------------------------


async def test_send_delay_is_random_within_the_window(tmp_path: Path) -> None:
    clock = Clock(ts("2024-03-05T00:01:00"))
    svc = make_service(tmp_path, clock, rng=random.Random(7))
    for n in range(20):
        svc.record(outcome(ts("2024-03-04T10:00:00"), domain=f"d{n}.example"))
    try:
        assert await svc.schedule(clock.now) == 20
        assert await svc.schedule(clock.now) == 0  # once per (day, domain)
        dues = await svc.db.run(lambda c: [r[0] for r in c.execute("SELECT due_at FROM report").fetchall()])
        midnight = ts("2024-03-05T00:00:00")
        assert all(midnight + GRACE_SECONDS <= d <= midnight + GRACE_SECONDS + 4 * 3600 for d in dues)
        assert max(dues) - min(dues) > 3600  # spread, not all at once
    finally:
        await svc.close()


async def test_without_exactly_one_valid_record_nothing_is_sent(tmp_path: Path) -> None:
    clock = Clock(ts("2024-03-05T06:00:00"))
    resolver = FakeResolver(
        {
            "_smtp._tls.two.example": ["v=TLSRPTv1; rua=mailto:a@two.example", "v=TLSRPTv1; rua=mailto:b@two.example"],
            "_smtp._tls.bad.example": ["v=TLSRPTv1; rua=ftp://x.example/"],
        }
    )
    svc = make_service(tmp_path, clock, resolver=resolver, send_window_hours=0.0)
    for d in ("two.example", "bad.example", "none.example"):
        svc.record(outcome(ts("2024-03-04T10:00:00"), domain=d))
    try:
        await svc.tick(clock.now)
        status = {row[0]: row[3] for row in await svc.status("2024-03-04")}
        assert status == {"two.example": "no-rua", "bad.example": "no-rua", "none.example": "no-rua"}
    finally:
        await svc.close()


async def test_dns_failure_is_retried_then_given_up(tmp_path: Path) -> None:
    clock = Clock(ts("2024-03-05T06:00:00"))
    resolver = FakeResolver({"_smtp._tls.example.org": "error"})
    svc = make_service(tmp_path, clock, resolver=resolver, send_window_hours=0.0)
    svc.record(outcome(ts("2024-03-04T10:00:00")))
    try:
        await svc.tick(clock.now)
        (row,) = await svc.status("2024-03-04")
        assert row[3] == "scheduled" and "error" in row[5]  # a failure is never "no record"
        for _ in range(30):  # bounded: the retry window closes within these rounds
            clock.now += 4 * 3600
            await svc.tick(clock.now)
            (row,) = await svc.status("2024-03-04")
            if row[3] != "scheduled":
                break
        assert row[3] == "dns-failed"
    finally:
        await svc.close()


async def test_https_failures_are_retried_with_backoff_for_24_hours(tmp_path: Path) -> None:
    clock = Clock(ts("2024-03-05T06:00:00"))
    events = Events()
    svc = make_service(tmp_path, clock, resolver=FakeResolver(RUA_HTTPS), send_window_hours=0.0, emit=events)
    attempts: list[float] = []

    async def failing(uri: str, gz: bytes) -> SendResult:
        attempts.append(clock.now)
        return SendResult(uri, "https", False, "HTTP 503")

    svc.post_https = failing  # type: ignore[method-assign]
    svc.record(outcome(ts("2024-03-04T10:00:00")))
    start = clock.now
    try:
        for _ in range(2000):  # bounded simulation, one step per minute
            await svc.send_due(clock.now) if attempts else await svc.tick(clock.now)
            clock.now += 60
            if clock.now > start + RETRY_WINDOW + 3600:
                break
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert gaps == sorted(gaps)  # backoff never shrinks
        assert gaps[0] < gaps[-1]
        assert attempts[-1] - attempts[0] <= RETRY_WINDOW
        (row,) = await svc.status("2024-03-04")
        assert row[3] == "failed" and row[5] == "HTTP 503"
        labels = events.kinds("tlsrpt_sent")
        assert labels[-1] == {"result": "failed", "method": "https"}
        assert all(lab == {"result": "retry", "method": "https"} for lab in labels[:-1])
    finally:
        await svc.close()


async def test_dane_mx_host_with_its_own_record_gets_its_part(tmp_path: Path) -> None:
    clock = Clock(ts("2024-03-05T06:00:00"))
    resolver = FakeResolver(
        {
            "_smtp._tls.example.org": ["v=TLSRPTv1; rua=https://reports.example.org/"],
            "_smtp._tls.mx.hoster.example": ["v=TLSRPTv1; rua=https://tlsrpt.hoster.example/in"],
        }
    )
    svc = make_service(tmp_path, clock, resolver=resolver, send_window_hours=0.0)
    sent: dict[str, dict[str, Any]] = {}

    async def fake_post(uri: str, gz: bytes) -> SendResult:
        sent[uri] = parse.decode_report_bytes(gz)
        return SendResult(uri, "https", True)

    svc.post_https = fake_post  # type: ignore[method-assign]
    day = ts("2024-03-04T10:00:00")
    svc.record(outcome(day, policy_type=PolicyType.TLSA, mx_host="mx.hoster.example", policy_strings=("3 1 1 aa",)))
    svc.record(outcome(day, policy_type=PolicyType.TLSA, mx_host="mx2.other.example", policy_strings=("3 1 1 bb",)))
    svc.record(outcome(day))  # an STS entry as well
    try:
        await svc.tick(clock.now)
        assert set(sent) == {"https://reports.example.org/", "https://tlsrpt.hoster.example/in"}
        full, part = sent["https://reports.example.org/"], sent["https://tlsrpt.hoster.example/in"]
        validate(full)
        validate(part)
        assert len(full["policies"]) == 3
        assert [p["policy"]["mx-host"] for p in part["policies"]] == [["mx.hoster.example"]]
        assert part["policies"][0]["policy"]["policy-domain"] == "example.org"
        assert part["report-id"] != full["report-id"]
    finally:
        await svc.close()


async def test_mailto_without_a_dkim_key_is_not_sent_unsigned(tmp_path: Path) -> None:
    clock = Clock(ts("2024-03-05T06:00:00"))
    resolver = FakeResolver({"_smtp._tls.example.org": ["v=TLSRPTv1; rua=mailto:tlsrpt@example.org"]})

    class Queue:
        puts: list[Any] = []

        async def put(self, *a: Any, **kw: Any) -> str:
            self.puts.append((a, kw))
            return "id"

    queue = Queue()
    svc = make_service(tmp_path, clock, resolver=resolver, send_window_hours=0.0, submit=queue.put)
    svc.record(outcome(ts("2024-03-04T10:00:00")))
    try:
        await svc.tick(clock.now)
        (row,) = await svc.status("2024-03-04")
        assert row[3] == "pending" and "DKIM" in row[5]
        assert queue.puts == []
    finally:
        await svc.close()


async def test_send_refuses_a_day_that_is_not_over(tmp_path: Path) -> None:
    clock = Clock(ts("2024-03-05T06:00:00"))
    svc = make_service(tmp_path, clock)
    try:
        with pytest.raises(ValueError, match="not over"):
            await svc.send_day("2024-03-05")
    finally:
        await svc.close()


# -- receiving ---------------------------------------------------------------------------------------------------


async def test_received_reports_are_kept_and_counted_per_reporter(tmp_path: Path) -> None:
    clock = Clock(ts("2024-03-05T06:00:00"))
    events = Events()
    svc = make_service(tmp_path, clock, emit=events)
    try:
        for name in ("rfc8460-example.json", "google-shaped.json", "microsoft-shaped.json"):
            result, report = await svc.accept_report((DATA / name).read_bytes(), method="https")
            assert result == "ok" and report is not None
        result, _ = await svc.accept_report((DATA / "google-shaped.json").read_bytes(), method="mailto")
        assert result == "duplicate"
        result, _ = await svc.accept_report(b"<html>", method="https")
        assert result == "invalid"
        assert await svc.reporter_failures() == [
            ("Company-X", 5326, 303),
            ("Microsoft Corporation", 47, 7),
            ("Google Inc.", 1520, 3),
        ]
        assert await svc.reporter_failures(top=1) == [("Company-X", 5326, 303)]
        types = await svc.received_failure_types()
        assert ("Microsoft Corporation", "certificate-host-mismatch", 7) in types
        received = events.kinds("tlsrpt_received")
        assert [r["result"] for r in received] == ["ok", "ok", "ok", "duplicate", "invalid"]
        failures = [
            (lab.get("result_type"), v)
            for k, v, lab in events.seen
            if k == "tlsrpt_received_sessions" and lab["result"] == "failure"
        ]
        assert ("certificate-expired", 100.0) in failures and ("certificate-host-mismatch", 7.0) in failures
    finally:
        await svc.close()


async def test_received_policies_without_domain_or_known_type_are_rejected_rfc8460_4_4(tmp_path: Path) -> None:
    """RFC 8460 §4.4: every policy names its ``policy-type`` (tlsa | sts | no-policy-found) and its
    ``policy-domain``. An entry without a domain or with an unknown type is rejected, never stored under "";
    a report whose every policy is rejected is invalid."""
    clock = Clock(ts("2024-03-05T06:00:00"))
    events = Events()
    svc = make_service(tmp_path, clock, emit=events)

    def policy(ptype: str | None, domain: str | None, failures: int) -> dict[str, Any]:
        pol = {k: v for k, v in (("policy-type", ptype), ("policy-domain", domain)) if v is not None}
        return {
            "policy": pol,
            "summary": {"total-successful-session-count": 1, "total-failure-session-count": failures},
            "failure-details": [{"result-type": "validation-failure", "failed-session-count": failures}],
        }

    def report(rid: str, *policies: dict[str, Any]) -> bytes:
        doc = {"organization-name": "Mixed Inc", "report-id": rid, "policies": list(policies)}
        return json.dumps(doc).encode()

    try:
        result, parsed = await svc.accept_report(
            report(
                "mixed-1",
                policy("sts", "example.org", 2),
                policy("sts", "", 3),
                policy(None, "example.net", 5),
                policy("dmarc", "example.com", 7),
            ),
            method="https",
        )
        assert result == "ok" and parsed is not None
        assert [(p.policy_type, p.policy_domain) for p in parsed.policies] == [("sts", "example.org")]
        assert len(parsed.rejected) == 3
        assert await svc.reporter_failures() == [("Mixed Inc", 1, 2)]
        assert [t for _, t, _ in await svc.received_failure_types()] == ["validation-failure"]
        result, parsed = await svc.accept_report(
            report("bad-1", policy("sts", None, 1), policy("nonsense", "example.org", 1)), method="https"
        )
        assert (result, parsed) == ("invalid", None)
        assert [r["result"] for r in events.kinds("tlsrpt_received")] == ["ok", "invalid"]
        assert await svc.reporter_failures() == [("Mixed Inc", 1, 2)]
    finally:
        await svc.close()


async def test_received_reports_are_bounded_kept_as_counts_and_expire(tmp_path: Path) -> None:
    clock = Clock(ts("2024-03-05T06:00:00"))
    svc = make_service(tmp_path, clock, receive_max_policies=2, receive_max_failure_details=3, receive_retention_days=1)

    def doc(policies: int, details: int, rid: str) -> bytes:
        return json.dumps(
            {
                "organization-name": "Org",
                "report-id": rid,
                "policies": [
                    {
                        "policy": {"policy-type": "sts", "policy-domain": "example.org"},
                        "summary": {"total-successful-session-count": 1, "total-failure-session-count": details},
                        "failure-details": [
                            {
                                "result-type": "certificate-expired",
                                "receiving-mx-hostname": "mx.example.org",
                                "receiving-ip": f"192.0.2.{i}",
                                "failed-session-count": 2,
                            }
                            for i in range(details)
                        ],
                    }
                    for _ in range(policies)
                ],
            }
        ).encode()

    try:
        assert (await svc.accept_report(doc(3, 0, "a"), method="https"))[0] == "too_large"
        assert (await svc.accept_report(doc(2, 2, "b"), method="https"))[0] == "too_large"  # 4 details in all
        assert (await svc.accept_report(doc(1, 3, "c"), method="https"))[0] == "ok"
        rows = await svc.db.run(
            lambda c: (
                c.execute("SELECT raw FROM received").fetchall()
                + c.execute("SELECT result_type, receiving_mx, receiving_ip, count FROM received_failure").fetchall()
            )
        )
        # no copy of the report; three failure-details against one MX are one row
        assert rows == [("",), ("certificate-expired", "mx.example.org", "", 6)]
        assert await svc.received_failure_types() == [("Org", "certificate-expired", 6)]
        clock.now += 2 * 86400  # past receive_retention_days
        await svc.purge(clock.now)
        assert await svc.reporter_failures(days=30) == []
    finally:
        await svc.close()


# -- the plugin through the real dispatcher, and the CLI -------------------------------------------------------------


def write_config(tmp_path: Path, tlsrpt: dict[str, Any]) -> Path:
    document = build_document("", tmp_path)
    document["server"]["hostname"] = "mx.sender.example"
    # the other built-in agents are not under test here
    document["plugins"] = {"disable": ["dane", "mta_sts", "prometheus", "dnssec"], "tlsrpt": tlsrpt}
    path = tmp_path / "mxgate.toml"
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    return path


async def test_plugin_hooks_collect_receive_and_flush_at_shutdown(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        {
            "organization_name": "Sender Org",
            "receive_mailbox": "tlsrpt@example.org",
            "receive_require_dkim": False,
            "receive_deliver": False,
        },
    )
    config, plugins = bootstrap.load(path, entry_points=False)
    runtime = Runtime.create(config, plugins)
    await runtime.hooks.on_startup(runtime)
    plugin = plugins.pm.get_plugin("tlsrpt")
    assert isinstance(plugin, TlsRptPlugin) and plugin.service is not None
    service = plugin.service
    try:
        now = runtime.clock()
        await runtime.hooks.on_tls_outcome(outcome(now))
        await runtime.hooks.on_tls_outcome(outcome(now, success=False))
        assert service.pending == 2
        # a report mailed to our rua mailbox
        mail = rpt.build_mail(
            from_addr="noreply@reporter.example",
            to_addrs=["tlsrpt@example.org"],
            policy_domain="example.org",
            submitter="reporter.example",
            report_id="r1@reporter.example",
            filename="f.json.gz",
            gz=rpt.gzip_report(json.loads((DATA / "google-shaped.json").read_text())),
            now=now,
        )
        session = Session("s1", "smtp", "192.0.2.9", 40000, "127.0.0.1", 25)
        envelope = Envelope(Address("noreply", "reporter.example"), rcpt_tos=(Address("TLSRPT", "example.org"),))
        assert await runtime.hooks.on_end_of_data(session, envelope, IncomingMessage(mail, ())) is None
        # receive_deliver = false: the mailbox is dropped from routing, other recipients are not
        assert await runtime.hooks.resolve_recipient(None, Address("tlsrpt", "example.org")) == []  # type: ignore[arg-type]
        assert await runtime.hooks.resolve_recipient(None, Address("ceo", "example.org")) is None  # type: ignore[arg-type]
    finally:
        for task in runtime.tasks:
            task.cancel()
        await runtime.hooks.on_shutdown(runtime)
    again = TlsRptService(TlsRptConfig(), state_dir=config.state_path, submitter="mx.sender.example")
    try:
        (agg,) = await again.aggregates(rpt.utc_day(now), "example.org")
        assert (agg.success, agg.failure) == (1, 1)
        assert await again.reporter_failures() == [("Google Inc.", 1520, 3)]
    finally:
        await again.close()


async def test_disabled_plugin_collects_nothing(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"enabled": False})
    config, plugins = bootstrap.load(path, entry_points=False)
    runtime = Runtime.create(config, plugins)
    await runtime.hooks.on_startup(runtime)
    plugin = plugins.pm.get_plugin("tlsrpt")
    assert plugin.service is None
    assert not [t for t in runtime.tasks if "TlsRptService" in repr(t)]
    await runtime.hooks.on_tls_outcome(outcome(runtime.clock()))
    await runtime.hooks.on_shutdown(runtime)
    assert not (config.state_path / "tlsrpt.sqlite3").exists()


def test_cli_show_prints_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    path = write_config(tmp_path, {"organization_name": "Sender Org", "contact_info": "tlsrpt@sender.example"})
    config, _ = bootstrap.load(path, entry_points=False)

    async def seed() -> None:
        svc = TlsRptService(TlsRptConfig(), state_dir=config.state_path, submitter="mx.sender.example")
        svc.record(outcome(ts("2024-03-04T10:00:00")))
        svc.record(outcome(ts("2024-03-04T11:00:00"), domain="other.example"))
        await svc.close()

    asyncio.run(seed())
    assert cli_main(["tlsrpt", "show", "-c", str(path), "--date", "2024-03-04", "--domain", "Example.org"]) == 0
    out = capsys.readouterr().out
    first, _, body = out.partition("\n")
    assert first == "# mx.sender.example!example.org!1709510400!1709596799.json.gz"
    report = json.loads(body)
    validate(report)
    assert report["organization-name"] == "Sender Org"
    assert report["contact-info"] == "tlsrpt@sender.example"
    assert cli_main(["tlsrpt", "show", "-c", str(path), "--date", "2024-03-04"]) == 0
    assert capsys.readouterr().out.count("# mx.sender.example!") == 2
    assert cli_main(["tlsrpt", "show", "-c", str(path), "--date", "2024-03-01"]) == 0
    assert "no TLS outcomes recorded for 2024-03-01" in capsys.readouterr().err


def test_cli_received_lists_reporters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    path = write_config(tmp_path, {})
    config, _ = bootstrap.load(path, entry_points=False)

    async def seed() -> None:
        svc = TlsRptService(TlsRptConfig(), state_dir=config.state_path, submitter="mx.sender.example")
        await svc.accept_report((DATA / "microsoft-shaped.json").read_bytes(), method="https")
        await svc.close()

    asyncio.run(seed())
    assert cli_main(["tlsrpt", "received", "-c", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["Microsoft", "Corporation", "47", "7"]


def test_cli_escapes_network_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A reporter names itself, an MX host's name comes from DNS and a remote error from a server: ESC, bidi
    overrides and DEL reach the terminal escaped, and ``show`` still prints valid JSON."""
    import asyncio

    path = write_config(tmp_path, {})
    config, _ = bootstrap.load(path, entry_points=False)
    hostile = "Evil\x1b]0;pwned\x07 Corp\u202egnp.exe"
    document = json.loads((DATA / "microsoft-shaped.json").read_text())
    document["organization-name"] = hostile
    mx = "mx\x7f\x1b[2j.example.org"  # names are kept lower-case

    async def seed() -> None:
        svc = TlsRptService(TlsRptConfig(), state_dir=config.state_path, submitter="mx.sender.example")
        assert (await svc.accept_report(json.dumps(document).encode(), method="https"))[0] == "ok"
        svc.record(outcome(ts("2024-03-04T10:00:00"), success=False, mx_host=mx))
        await svc.close()

    asyncio.run(seed())
    assert cli_main(["tlsrpt", "received", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
    assert "Evil\\x1b]0;pwned\\x07 Corp\\u202egnp.exe"[:40] in out
    assert cli_main(["tlsrpt", "show", "-c", str(path), "--date", "2024-03-04", "--domain", "example.org"]) == 0
    out = capsys.readouterr().out
    assert not [c for c in out if c != "\n" and (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c == "\u202e")]
    report = json.loads(out.partition("\n")[2])
    (detail,) = report["policies"][0]["failure-details"]
    assert detail["receiving-mx-hostname"] == mx  # escaped on the terminal, the same name once parsed


@pytest.mark.parametrize(
    ("key", "value"),
    [("receive_listen", "nope"), ("flush_interval", 0), ("send_window_hours", -1), ("submitter", "not a host")],
)
def test_bad_configuration_is_refused_with_its_key_path(tmp_path: Path, key: str, value: Any) -> None:
    from mxgate.core.errors import ConfigError

    path = write_config(tmp_path, {key: value})
    with pytest.raises(ConfigError) as info:
        bootstrap.load(path, entry_points=False)
    assert f"plugins.tlsrpt.{key}" in str(info.value)
