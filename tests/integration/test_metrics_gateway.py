"""Metrics of a running gateway: scripted SMTP sessions in, delivery to a sink out, then the counters scraped from
the real endpoint (``[metrics] listen``) must have moved exactly as the sessions say."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mxgate.testing.ca import TestCA
from mxgate.testing.gateway import TestGateway, free_port
from mxgate.testing.sinks import SinkFactory

pytestmark = [pytest.mark.integration]

Start = Callable[..., Awaitable[TestGateway]]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
BODY = b"From: a@example.net\r\nTo: ok@example.org\r\nSubject: metrics\r\n\r\nhello\r\n"


async def scrape(gw: TestGateway) -> Samples:
    assert gw.metrics_port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.metrics_port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def wait_for_metric(gw: TestGateway, name: str, expected: float, timeout: float = 10.0, **labels: str) -> Samples:
    """Scrape until the sample has the expected value (bounded); returns the last scrape."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        samples = await scrape(gw)
        if value(samples, name, **labels) == expected or loop.time() > deadline:
            return samples
        await asyncio.sleep(0.05)


def send(gw: TestGateway, rcpts: list[str], *, tls_ca: Path | None = None) -> dict[str, tuple[int, bytes]]:
    """One SMTP session (smtplib, in a thread): the refused recipients, as smtplib reports them."""
    with smtplib.SMTP(gw.smtp_host, gw.smtp_port, timeout=10) as client:
        client.ehlo("client.test")
        if tls_ca is not None:
            context = ssl.create_default_context(cafile=str(tls_ca))
            context.check_hostname = False  # dialled by IP; the chain is still verified
            client.starttls(context=context)
            client.ehlo("client.test")
        try:
            return client.sendmail("a@example.net", rcpts, BODY)
        except smtplib.SMTPRecipientsRefused as exc:
            return dict(exc.recipients)


async def test_counters_move_with_scripted_sessions(
    mxgate_gateway: Start, smtp_sink: SinkFactory, test_ca: TestCA, tmp_path: Path
) -> None:
    sink = await smtp_sink(rcpt_replies={"nobody": "550 5.1.1 no such user"})
    leaf = test_ca.issue(["mx.gateway.test"], directory=tmp_path)
    gw = await mxgate_gateway(f"""
        [server]
        accepted_domains = ["example.org"]

        [[listener]]
        name = "smtp"
        address = "127.0.0.1:{free_port()}"
        tls_cert = "{leaf.chain_path}"
        tls_key = "{leaf.key_path}"

        [[inbound_connector]]
        name = "partner"
        sender_ips = ["192.0.2.0/24"]  # loopback clients are anonymous internet senders here

        [[outbound_connector]]
        name = "mailstore"
        recipient_domains = ["example.org"]
        smart_hosts = ["{sink.host}:{sink.port}"]
        tls = "none"

        [[outbound_connector]]
        name = "internet"
        recipient_domains = ["*"]
        use_mx = true

        [dns]
        timeout = 0.1  # the resolver is a closed loopback port: fail fast
    """)
    before = await scrape(gw)
    assert value(before, "mxgate_smtp_connections_total", listener="smtp", connector="anonymous") == 0
    assert value(before, "mxgate_delivery_recipients_total", connector="mailstore", result="delivered") == 0

    # 1: plain, one accepted recipient; 2: STARTTLS, one good and one the sink refuses; 3: a relay attempt.
    assert await asyncio.to_thread(send, gw, ["ok@example.org"]) == {}
    assert await asyncio.to_thread(send, gw, ["ok@example.org", "nobody@example.org"], tls_ca=test_ca.cert_path) == {}
    refused = await asyncio.to_thread(send, gw, ["someone@example.net"])
    assert refused["someone@example.net"][0] == 550
    await sink.wait_for(2)

    s = await wait_for_metric(gw, "mxgate_delivery_recipients_total", 1, connector="mailstore", result="failed")
    assert value(s, "mxgate_smtp_connections_total", listener="smtp", connector="anonymous") == 3
    assert value(s, "mxgate_smtp_tls_sessions_total", listener="smtp", version="TLSv1.3") == 1
    assert value(s, "mxgate_messages_received_total", listener="smtp", connector="anonymous") == 2
    assert value(s, "mxgate_messages_rejected_total", listener="smtp", reason="relay") == 1
    assert value(s, "mxgate_delivery_recipients_total", connector="mailstore", result="delivered") == 2
    assert value(s, "mxgate_delivery_recipients_total", connector="mailstore", result="failed") == 1
    assert value(s, "mxgate_delivery_attempts_total", connector="mailstore", result="delivered") == 2
    assert value(s, "mxgate_delivery_latency_seconds_count", connector="mailstore", result="delivered") == 2
    assert value(s, "mxgate_delivery_latency_seconds_count", connector="mailstore", result="failed") == 1
    assert value(s, "mxgate_delivery_latency_seconds_bucket", connector="mailstore", result="delivered", le="60.0") == 2
    assert value(s, "mxgate_events_total", kind="message_received") == 2

    # The bounce to a@example.net is queued and cannot leave (no DNS here): one active message, a DSN counted.
    s = await wait_for_metric(gw, "mxgate_dsn_messages_total", 1, action="failed")
    assert value(s, "mxgate_dsn_messages_total", action="failed") == 1
    s = await wait_for_metric(gw, "mxgate_queue_messages", 1, state="deferred")
    assert value(s, "mxgate_queue_messages", state="active") == 1
    assert value(s, "mxgate_queue_messages", state="deferred") == 1
    assert value(s, "mxgate_queue_recipients", state="deferred") == 1
    assert (value(s, "mxgate_queue_oldest_message_age_seconds") or 0) >= 0
    assert value(s, "mxgate_delivery_recipients_total", connector="internet", result="deferred") == 1

    # Sessions are closed; hooks are timed. The resolver (a closed port) is never reported as validating: absent
    # until the self-test has finished its retries (seconds), then 0.
    assert value(s, "mxgate_dns_resolver_validating") in (None, 0)
    assert value(s, "mxgate_smtp_sessions_active", listener="smtp") == 0
    assert (value(s, "mxgate_hook_calls_total", plugin="prometheus", hook="mxgate_report_on_event") or 0) >= 6
    assert any(name == "mxgate_build_info" for name, _ in s)


async def test_two_gateways_in_one_process_count_apart(mxgate_gateway: Start) -> None:
    first = await mxgate_gateway('[server]\naccepted_domains = ["example.org"]\n')
    second = await mxgate_gateway('[server]\naccepted_domains = ["example.org"]\n')
    assert first.metrics_port != second.metrics_port
    assert await asyncio.to_thread(send, first, ["ok@example.org"]) == {}
    s1 = await wait_for_metric(first, "mxgate_messages_received_total", 1, listener="smtp", connector="localhost")
    s2 = await scrape(second)
    assert value(s1, "mxgate_messages_received_total", listener="smtp", connector="localhost") == 1
    assert value(s2, "mxgate_messages_received_total", listener="smtp", connector="localhost") == 0
    assert value(s2, "mxgate_smtp_connections_total", listener="smtp", connector="localhost") == 0


async def test_tls_outcomes_of_real_deliveries(
    mxgate_gateway: Start, smtp_sink: SinkFactory, test_ca: TestCA, tmp_path: Path
) -> None:
    """One delivery over verified TLS (success), one to a host that offers no STARTTLS where TLS is required
    (failure, starttls-not-supported): both counted from the TLS outcome records."""
    cert = test_ca.issue(["sink.mxgate.test"], directory=tmp_path)
    good = await smtp_sink(tls=cert)
    plain = await smtp_sink()
    gw = await mxgate_gateway(f"""
        [server]
        accepted_domains = ["example.org", "example.com"]

        [[outbound_connector]]
        name = "verified"
        recipient_domains = ["example.org"]
        smart_hosts = ["{good.host}:{good.port}"]
        tls = "domain_validation"
        tls_domain = "sink.mxgate.test"
        tls_ca_file = "{test_ca.cert_path}"

        [[outbound_connector]]
        name = "tls-required"
        recipient_domains = ["example.com"]
        smart_hosts = ["{plain.host}:{plain.port}"]
        tls = "encryption_only"
    """)
    assert await asyncio.to_thread(send, gw, ["ok@example.org", "ok@example.com"]) == {}
    await good.wait_for(1)
    m = "mxgate_tls_outcomes_total"
    failure = {"connector": "tls-required", "result": "failure", "result_type": "starttls-not-supported"}
    s = await wait_for_metric(gw, m, 1, policy_type="no-policy-found", **failure)
    assert value(s, m, connector="verified", policy_type="no-policy-found", result="success", result_type="") == 1
    assert value(s, m, policy_type="no-policy-found", **failure) == 1
    s = await wait_for_metric(gw, "mxgate_delivery_recipients_total", 1, connector="tls-required", result="deferred")
    assert value(s, "mxgate_delivery_recipients_total", connector="verified", result="delivered") == 1
    assert plain.messages == ()


async def test_connections_count_under_the_connector_in_force_and_handshake_failures(
    mxgate_gateway: Start, test_ca: TestCA, tmp_path: Path
) -> None:
    leaf = test_ca.issue(["mx.gateway.test"], directory=tmp_path)
    (tmp_path / "c").mkdir()
    partner = test_ca.issue(["mail.partner.test"], client=True, directory=tmp_path / "c")
    gw = await mxgate_gateway(f"""
        [server]
        accepted_domains = ["example.org"]

        [[listener]]
        name = "smtp"
        address = "127.0.0.1:{free_port()}"
        tls_cert = "{leaf.chain_path}"
        tls_key = "{leaf.key_path}"
        tls_client_ca = "{test_ca.cert_path}"

        [[inbound_connector]]
        name = "partner"
        tls_sender_certificate_name = "mail.partner.test"
    """)

    def pinned_session() -> None:
        context = ssl.create_default_context(cafile=str(test_ca.cert_path))
        context.check_hostname = False
        context.load_cert_chain(str(partner.cert_path), str(partner.key_path))
        with smtplib.SMTP(gw.smtp_host, gw.smtp_port, timeout=10) as client:
            client.starttls(context=context)
            client.sendmail("a@partner.test", ["ok@example.org"], BODY)

    await asyncio.to_thread(pinned_session)
    # a client that says STARTTLS and then sends no TLS at all
    reader, writer = await asyncio.open_connection(gw.smtp_host, gw.smtp_port)
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"220 ")
    writer.write(b"EHLO c.test\r\nSTARTTLS\r\n")
    while not (line := await asyncio.wait_for(reader.readline(), 5)).startswith(b"220 "):
        assert line, "closed before 220 to STARTTLS"
    writer.write(b"this is not a TLS ClientHello\r\n" * 4)
    assert await asyncio.wait_for(reader.read(), 10) == b""  # the gateway hangs up
    writer.close()

    s = await wait_for_metric(gw, "mxgate_smtp_tls_handshake_failures_total", 1, listener="smtp")
    assert value(s, "mxgate_smtp_tls_handshake_failures_total", listener="smtp") == 1
    s = await wait_for_metric(gw, "mxgate_smtp_connections_total", 1, listener="smtp", connector="anonymous")
    assert value(s, "mxgate_messages_received_total", listener="smtp", connector="partner") == 1
    assert value(s, "mxgate_smtp_connections_total", listener="smtp", connector="partner") == 1  # not anonymous
    assert value(s, "mxgate_smtp_connections_total", listener="smtp", connector="anonymous") == 1  # the bad one
    assert value(s, "mxgate_smtp_sessions_active", listener="smtp") == 0
