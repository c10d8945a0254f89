"""TLS-RPT by mail on loopback: the report goes into mxgate's real queue as a DKIM-signed multipart/report, is sent
over SMTP to a sink, arrives intact and its DKIM signature verifies (dkimpy, key with s=tlsrpt). The receiving
side reads a mailed report, checking DKIM with a key served by a real DNS exchange."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import gzip
import json
import smtplib
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dkim
import dns.message
import dns.rcode
import jsonschema
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mxgate.core.dns import Resolver
from mxgate.core.outcomes import PolicyType, TlsOutcome, TlsRptResult
from mxgate.core.queue.store import QueueStore
from mxgate.plugins.tlsrpt import TlsRptConfig, TlsRptPlugin, TlsRptService
from mxgate.plugins.tlsrpt import report as rpt
from mxgate.testing.ca import TestCA
from mxgate.testing.dnslab import ScriptedDnsServer, make_reply
from mxgate.testing.gateway import running_gateway
from mxgate.testing.sinks import SmtpSink

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "tlsrpt"
SCHEMA = json.loads((DATA / "report.schema.json").read_text())
SELECTOR = "tlsrpt2024"
SUBMITTER = "mx.sender.example"


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def dkim_key(tmp_path: Path) -> tuple[Path, str]:
    """(PKCS#8 private key file, the DNS key record with the tlsrpt service type)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "dkim.key"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return path, f"v=DKIM1; k=rsa; s=tlsrpt; p={base64.b64encode(spki).decode()}"


def txt_rr(name: str, text: str) -> str:
    chunks = [text[i : i + 200] for i in range(0, len(text), 200)]
    return f"{name}. 60 IN TXT " + " ".join(json.dumps(c) for c in chunks)


def handler_for(records: dict[str, str]) -> Any:
    def handler(q: dns.message.Message) -> dns.message.Message:
        name = q.question[0].name.to_text(omit_final_dot=True).lower()
        if name in records:
            return make_reply(q, answer=[txt_rr(name, records[name])])
        return make_reply(q, rcode=dns.rcode.NXDOMAIN)

    return handler


def outcome(at: float, **kw: Any) -> TlsOutcome:
    base: dict[str, Any] = {
        "connector": "internet",
        "policy_type": PolicyType.TLSA,
        "policy_domain": "example.org",
        "success": True,
        "mx_host": "mx1.example.org",
        "receiving_ip": "192.0.2.25",
        "sending_ip": "198.51.100.1",
        "policy_strings": ("3 1 1 0c72ac70b745ac19998811b131d662c9ac69dbdbe7cb23e5b514b56664c5d3d6",),
        "at": at,
    }
    base.update(kw)
    return TlsOutcome(**base)


def smtp_send(host: str, port: int, sender: str, rcpts: list[str], data: bytes) -> None:
    with smtplib.SMTP(host, port, timeout=10) as client:
        client.ehlo("mx.sender.example")
        client.sendmail(sender, rcpts, data)


async def test_mailed_report_arrives_as_signed_multipart_report(tmp_path: Path) -> None:
    key_file, key_record = dkim_key(tmp_path)
    now = ts("2024-03-05T04:00:00")
    records = {
        "_smtp._tls.example.org": "v=TLSRPTv1; rua=mailto:tlsrpt@example.org",
        f"{SELECTOR}._domainkey.{SUBMITTER}": key_record,
    }
    woken: list[bool] = []
    async with ScriptedDnsServer(handler_for(records)) as dns_server, SmtpSink() as sink:
        queue = await QueueStore.open(tmp_path / "var")

        async def submit(*args: Any, **kwargs: Any) -> str:  # the gateway's door (Runtime.submit): put, then wake
            queue_id = await queue.put(*args, **kwargs)
            woken.append(True)
            return queue_id

        conf = replace(
            TlsRptConfig(),
            organization_name="Sender Org",
            contact_info="tlsrpt@sender.example",
            dkim_selector=SELECTOR,
            dkim_key_file=str(key_file),
            send_window_hours=0.0,
        )
        svc = TlsRptService(
            conf,
            state_dir=tmp_path / "var",
            submitter=SUBMITTER,
            clock=lambda: now,
            resolver=Resolver([dns_server.endpoint()], timeout=2.0),
            submit=submit,
        )
        svc.record(outcome(ts("2024-03-04T08:00:00")))
        svc.record(outcome(ts("2024-03-04T08:00:05"), success=False, result_type=TlsRptResult.DANE_REQUIRED))
        try:
            await svc.tick(now)
            (row,) = await svc.status("2024-03-04")
            assert row[2:4] == ("mailto:tlsrpt@example.org", "sent")
            assert woken == [True]
            (queued,) = await queue.list()
            assert queued.sender == f"tlsrpt-noreply@{SUBMITTER}"
            assert [r.address for r in queued.recipients] == ["tlsrpt@example.org"]
            assert queued.meta.tls_required_no and queued.meta.origin == "tlsrpt"
            data = await queue.body(queued.id)
        finally:
            await svc.close()
            await queue.close()
        # what the delivery core will do: SMTP to the recipient's MX (here: the sink)
        await asyncio.to_thread(smtp_send, sink.host, sink.port, queued.sender, ["tlsrpt@example.org"], data)
        (received,) = await sink.wait_for(1)

    msg = email.message_from_bytes(received.data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert msg["TLS-Report-Domain"] == "example.org"
    assert msg["TLS-Report-Submitter"] == SUBMITTER
    assert msg["TLS-Required"] == "No"
    assert msg["Subject"].startswith(f"Report Domain: example.org Submitter: {SUBMITTER} Report-ID: <")
    attachment = next(p for p in msg.walk() if p.get_content_type() == "application/tlsrpt+gzip")
    assert attachment.get_filename().startswith(f"{SUBMITTER}!example.org!1709510400!1709596799!")
    report = json.loads(gzip.decompress(attachment.get_content()))
    jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).validate(
        report
    )
    assert f"<{report['report-id']}>" in msg["Subject"]
    assert report["policies"][0]["failure-details"][0]["result-type"] == "dane-required"

    sig = msg["DKIM-Signature"]
    tags = {k.strip(): "".join(v.split()) for k, _, v in (t.partition("=") for t in sig.split(";") if t.strip())}
    assert (tags["s"], tags["d"]) == (SELECTOR, SUBMITTER)
    assert "l" not in tags  # RFC 8460 5.3: no body length limit
    signed = tags["h"].lower().split(":")
    for header in ("tls-report-domain", "tls-report-submitter", "tls-required", "subject", "from", "content-type"):
        assert header in signed

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == f"{SELECTOR}._domainkey.{SUBMITTER}.".encode()
        return key_record.encode()

    assert dkim.verify(received.data, dnsfunc=dnsfunc, tlsrpt="strict")
    tampered = received.data.replace(b"TLS-Report-Domain: example.org", b"TLS-Report-Domain: evil.example")
    assert not dkim.verify(tampered, dnsfunc=dnsfunc, tlsrpt="strict")


async def test_mailed_reports_to_our_mailbox_are_read_when_dkim_verifies(tmp_path: Path) -> None:
    key_file, key_record = dkim_key(tmp_path)
    now = ts("2024-03-05T04:00:00")
    records = {f"{SELECTOR}._domainkey.reporter.example": key_record}
    async with ScriptedDnsServer(handler_for(records)) as dns_server:
        resolver = Resolver([dns_server.endpoint()], timeout=2.0)
        reporter = TlsRptService(
            replace(
                TlsRptConfig(), organization_name="Reporter Inc", dkim_selector=SELECTOR, dkim_key_file=str(key_file)
            ),
            state_dir=tmp_path / "reporter",
            submitter="reporter.example",
            clock=lambda: now,
        )
        receiver = TlsRptService(
            replace(TlsRptConfig(), receive_mailbox="tlsrpt@example.org"),
            state_dir=tmp_path / "receiver",
            submitter="mx.example.org",
            clock=lambda: now,
            resolver=resolver,
        )
        try:
            reporter.record(
                outcome(ts("2024-03-04T08:00:00"), success=False, result_type=TlsRptResult.CERTIFICATE_NOT_TRUSTED)
            )
            aggs = await reporter.aggregates("2024-03-04", "example.org")
            gz = rpt.gzip_report(reporter.render("2024-03-04", aggs, "r-1@reporter.example"))
            signed = await reporter.build_signed_mail(
                ["tlsrpt@example.org"],
                domain="example.org",
                report_id="r-1@reporter.example",
                filename="r.json.gz",
                gz=gz,
                now=now,
            )
            assert await receiver.receive_mail(signed) == "ok"
            assert await receiver.receive_mail(signed) == "duplicate"
            forged = signed.replace(b"This is an aggregate", b"This is a forged")
            assert await receiver.receive_mail(forged) == "unsigned"
            unsigned = signed.split(b"\r\n", 1)[1]
            while unsigned.startswith((b" ", b"\t")):  # drop the folded DKIM-Signature lines
                unsigned = unsigned.split(b"\r\n", 1)[1]
            assert await receiver.receive_mail(unsigned) == "unsigned"
            assert await receiver.reporter_failures() == [("Reporter Inc", 0, 1)]
        finally:
            await reporter.close()
            await receiver.close()


@pytest.mark.parametrize("service", ["", "s=email; ", "s=*; "])
async def test_dkim_keys_without_the_tlsrpt_service_type_are_ignored_rfc8460_3(tmp_path: Path, service: str) -> None:
    """RFC 8460 §3 (report submitters publish their DKIM key with ``s=tlsrpt``; receivers MAY ignore other
    signatures): a report signed with a key that lacks ``s=tlsrpt`` counts as unsigned (dkimpy strict mode), so
    ``receive_require_dkim`` refuses it; the same report signed with an ``s=tlsrpt`` key is read."""
    key_file, key_record = dkim_key(tmp_path)
    now = ts("2024-03-05T04:00:00")
    plain_record = key_record.replace("s=tlsrpt; ", service)
    assert "s=tlsrpt" not in plain_record
    records = {
        f"{SELECTOR}._domainkey.plain.example": plain_record,
        f"{SELECTOR}._domainkey.reporter.example": key_record,
        f"{SELECTOR}._domainkey.list.example": key_record.replace("s=tlsrpt", "s=email:tlsrpt"),
    }
    async with ScriptedDnsServer(handler_for(records)) as dns_server:
        resolver = Resolver([dns_server.endpoint()], timeout=2.0)
        reporters = {
            name: TlsRptService(
                replace(TlsRptConfig(), organization_name=name, dkim_selector=SELECTOR, dkim_key_file=str(key_file)),
                state_dir=tmp_path / name,
                submitter=name,
                clock=lambda: now,
            )
            for name in ("plain.example", "reporter.example", "list.example")
        }
        receiver = TlsRptService(
            replace(TlsRptConfig(), receive_mailbox="tlsrpt@example.org"),
            state_dir=tmp_path / "receiver",
            submitter="mx.example.org",
            clock=lambda: now,
            resolver=resolver,
        )
        lax = TlsRptService(
            replace(TlsRptConfig(), receive_mailbox="tlsrpt@example.org", receive_require_dkim=False),
            state_dir=tmp_path / "lax",
            submitter="mx.example.org",
            clock=lambda: now,
            resolver=resolver,
        )
        try:
            mails = {}
            for name, reporter in reporters.items():
                reporter.record(outcome(ts("2024-03-04T08:00:00")))
                aggs = await reporter.aggregates("2024-03-04", "example.org")
                gz = rpt.gzip_report(reporter.render("2024-03-04", aggs, f"r-1@{name}"))
                mails[name] = await reporter.build_signed_mail(
                    ["tlsrpt@example.org"],
                    domain="example.org",
                    report_id=f"r-1@{name}",
                    filename="r.json.gz",
                    gz=gz,
                    now=now,
                )
            # the signature itself is sound: dkimpy without strict mode accepts it
            plain_key = plain_record.encode()
            assert dkim.verify(mails["plain.example"], dnsfunc=lambda _n, timeout=5: plain_key, tlsrpt=True)
            assert await receiver.verify_dkim(mails["plain.example"]) == "ignored"
            assert await receiver.verify_dkim(mails["reporter.example"]) == "pass"
            assert await receiver.verify_dkim(mails["list.example"]) == "pass"  # RFC 6376 §3.6.1: a list of services
            assert await receiver.receive_mail(mails["plain.example"]) == "unsigned"
            assert await receiver.receive_mail(mails["reporter.example"]) == "ok"
            assert await receiver.reporter_failures() == [("reporter.example", 1, 0)]
            assert await lax.receive_mail(mails["plain.example"]) == "ok"  # kept, marked dkim=ignored
        finally:
            for reporter in reporters.values():
                await reporter.close()
            await receiver.close()
            await lax.close()


async def test_the_session_delivering_a_report_is_not_counted_rfc8460_5_3(tmp_path: Path) -> None:
    """RFC 8460 §5.3: a sending MTA "SHOULD NOT include this SMTP session in the next report". A real gateway
    relays an ordinary message and then a mailed TLS report (queued by the plugin itself) to a STARTTLS sink: two
    TLS sessions reach the sink, one is counted."""
    key_file, _ = dkim_key(tmp_path)
    ca = TestCA.create(tmp_path / "ca")
    cert = ca.issue(["sink.example.org"])
    async with SmtpSink(tls=cert, hostname="sink.example.org") as sink:
        toml = f"""
            [[outbound_connector]]
            name = "relay"
            recipient_domains = ["*"]
            smart_hosts = ["127.0.0.1:{sink.port}"]
            tls = "opportunistic"
            [plugins.tlsrpt]
            organization_name = "Sender Org"
            dkim_selector = "{SELECTOR}"
            dkim_key_file = "{key_file}"
        """
        (tmp_path / "gw").mkdir()
        async with running_gateway(toml, tmp_path / "gw") as gw:
            plugin = next(p for p in gw.runtime.plugins.pm.get_plugins() if isinstance(p, TlsRptPlugin))
            service = plugin.service
            assert service is not None
            await asyncio.to_thread(
                smtp_send,
                gw.smtp_host,
                gw.smtp_port,
                "a@sender.example",
                ["b@example.org"],
                b"Subject: hi\r\n\r\nhello\r\n",
            )
            await sink.wait_for(1)
            now = gw.runtime.clock()
            day = rpt.utc_day(now)

            async def counted() -> list[tuple[str, int, int]]:
                await service.flush()
                return [
                    (d, a.success, a.failure)
                    for d in await service.domains(day)
                    for a in await service.aggregates(day, d)
                ]

            assert await counted() == [("127.0.0.1", 1, 0)]  # a smart host by address: its own policy domain
            gz = rpt.gzip_report(service.render(day, await service.aggregates(day, "127.0.0.1"), "r-1"))
            sent = await service.send_mail(
                "mailto:tlsrpt@example.org", domain="example.org", report_id="r-1", filename="r.json.gz", gz=gz, now=now
            )
            assert sent.ok, sent.detail
            await sink.wait_for(2)
            assert sink.tls_handshakes == 2  # the report went over its own TLS session (TLS-Required: No)
            assert await counted() == [("127.0.0.1", 1, 0)]
    report_mail = email.message_from_bytes(sink.messages[1].data, policy=email.policy.default)
    assert report_mail["TLS-Report-Domain"] == "example.org"


async def test_report_messages_are_remembered_across_a_restart(tmp_path: Path) -> None:
    """RFC 8460 §5.3 after a restart: a report still in the queue is delivered later, by a new process; its session
    is not counted either."""
    key_file, _ = dkim_key(tmp_path)
    now = ts("2024-03-05T04:00:00")
    conf = replace(TlsRptConfig(), organization_name="Sender Org", dkim_selector=SELECTOR, dkim_key_file=str(key_file))
    queue = await QueueStore.open(tmp_path / "var")
    try:
        first = TlsRptService(
            conf, state_dir=tmp_path / "var", submitter=SUBMITTER, clock=lambda: now, submit=queue.put
        )
        sent = await first.send_mail(
            "mailto:tlsrpt@example.org", domain="example.org", report_id="r-1", filename="r.json.gz", gz=b"x", now=now
        )
        assert sent.ok, sent.detail
        await first.close()
        (queued,) = await queue.list()
        second = TlsRptService(
            conf, state_dir=tmp_path / "var", submitter=SUBMITTER, clock=lambda: now, submit=queue.put
        )
        try:
            await second.load_report_messages()
            second.record(outcome(now, queue_id=queued.id))
            assert second.pending == 0
            second.record(outcome(now, queue_id="some-other-message"))
            assert second.pending == 1
        finally:
            await second.close()
    finally:
        await queue.close()


def test_cli_send_queues_a_mailed_report_through_the_gateway_door(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``mxgate tlsrpt send`` with a ``mailto:`` rua: the DKIM-signed report lands in the state directory's queue as
    the gateway would queue it (``Runtime.submit`` on a command runtime): sender, recipient, the ``tls_required``
    meta, and its queue id remembered, so the session that later delivers it is not counted."""
    import tomli_w

    from mxgate.core.bootstrap import load
    from mxgate.core.cli import main as cli_main
    from mxgate.testing.gateway import build_document
    from tests.integration.test_tlsrpt_https import LoopThread

    key_file, _ = dkim_key(tmp_path)
    loop = LoopThread()
    records = {"_smtp._tls.example.org": "v=TLSRPTv1; rua=mailto:tlsrpt@example.org"}
    dns_server: ScriptedDnsServer = loop.run(ScriptedDnsServer(handler_for(records)).__aenter__())
    try:
        document = build_document("", tmp_path)
        document["server"]["hostname"] = SUBMITTER
        document["dns"] = {"resolvers": [f"127.0.0.1:{dns_server.port}"], "timeout": 2.0}
        document["plugins"] = {
            "disable": ["dane", "mta_sts", "prometheus", "dnssec"],
            "tlsrpt": {"organization_name": "Sender Org", "dkim_selector": SELECTOR, "dkim_key_file": str(key_file)},
        }
        path = tmp_path / "mxgate.toml"
        path.write_text(tomli_w.dumps(document), encoding="utf-8")
        config, _ = load(path, entry_points=False)

        async def seed() -> None:
            svc = TlsRptService(TlsRptConfig(), state_dir=config.state_path, submitter=SUBMITTER)
            svc.record(outcome(ts("2024-03-04T09:00:00")))
            await svc.close()

        asyncio.run(seed())
        assert cli_main(["tlsrpt", "send", "-c", str(path), "--date", "2024-03-04"]) == 0
        assert "example.org  mailto:tlsrpt@example.org  sent  attempts=1" in capsys.readouterr().out
    finally:
        loop.run(dns_server.__aexit__(None, None, None))
        loop.close()

    async def check() -> None:
        queue = await QueueStore.open(config.state_path)
        try:
            (queued,) = await queue.list()
            assert queued.sender == f"tlsrpt-noreply@{SUBMITTER}"
            assert [r.address for r in queued.recipients] == ["tlsrpt@example.org"]
            assert queued.meta.origin == "tlsrpt"
            assert queued.meta.tls_required_no
            data = await queue.body(queued.id)
        finally:
            await queue.close()
        msg = email.message_from_bytes(data, policy=email.policy.default)
        assert msg.get_param("report-type") == "tlsrpt" and msg["DKIM-Signature"] is not None
        gateway = TlsRptService(TlsRptConfig(), state_dir=config.state_path, submitter=SUBMITTER)
        try:
            await gateway.load_report_messages()
            gateway.record(outcome(ts("2024-03-05T09:00:00"), queue_id=queued.id))
            assert gateway.pending == 0
        finally:
            await gateway.close()

    asyncio.run(check())
