"""Delivery through outbound connectors against real servers on loopback: aiosmtpd sinks with test-CA
certificates (good, wrong name, expired, self-signed, no STARTTLS), Postfix's smtp-sink with injected replies,
several MX hosts on 127.0.0.x (resolver override)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest

from mxgate.core import bootstrap
from mxgate.core.delivery import Deliverer, DeliveryResult, OutgoingMessage
from mxgate.core.dns_answers import AnswerKind, DnsAnswer, DnssecStatus, HostAddresses
from mxgate.core.hookspecs import hookimpl
from mxgate.core.outcomes import Destination, PolicyType, TlsOutcome, TlsRptResult
from mxgate.core.runtime import Runtime
from mxgate.testing.ca import IssuedCert, TestCA, self_signed
from mxgate.testing.gateway import delivery_config
from mxgate.testing.sinks import PostfixSink, SmtpSink

pytestmark = pytest.mark.integration

BODY = b"From: a@sender.test\r\nTo: b@example.test\r\nSubject: hello\r\n\r\nHello.\r\n.leading dot\r\n"


class StaticResolver:
    """A resolver override: {(name, type): [records]} answered as INSECURE; anything else NXDOMAIN."""

    def __init__(self, table: dict[tuple[str, str], list[str]]) -> None:
        self.table = table

    async def resolve(self, name: str, rdtype: str) -> DnsAnswer:
        texts = self.table.get((name, rdtype))
        if texts is None:
            kind = AnswerKind.NODATA if any(n == name for n, _ in self.table) else AnswerKind.NXDOMAIN
            return DnsAnswer(name, rdtype, kind, DnssecStatus.INSECURE, (), 60, name, ())
        records = tuple(dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), t) for t in texts)
        return DnsAnswer(name, rdtype, AnswerKind.ANSWER, DnssecStatus.INSECURE, records, 60, name, ())

    async def host_addresses(self, name: str) -> HostAddresses:
        return HostAddresses(name, aaaa=await self.resolve(name, "AAAA"), a=await self.resolve(name, "A"))


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.outcomes: list[TlsOutcome] = []

    @hookimpl
    def mxgate_delivery_on_tls_outcome(self, outcome: TlsOutcome) -> None:
        self.outcomes.append(outcome)


Factory = Callable[..., Awaitable[tuple[Runtime, Recorder]]]


@pytest.fixture
async def make_runtime(tmp_path: Path) -> AsyncIterator[Factory]:
    made: list[Runtime] = []

    async def make(connectors: str, resolver: Any = None) -> tuple[Runtime, Recorder]:
        directory = tmp_path / f"rt{len(made)}"
        directory.mkdir()
        path = delivery_config(directory, connectors)
        recorder = Recorder()
        config, plugins = bootstrap.load(path, entry_points=False, extra_plugins=[("recorder", recorder)])
        runtime = Runtime.create(config, plugins)
        await runtime.hooks.on_startup(runtime)
        runtime.resolver = resolver  # after start-up: the dnssec agent's self-test is not ours to run here
        made.append(runtime)
        return runtime, recorder

    yield make
    for rt in made:
        for task in rt.tasks:
            task.cancel()
        rt.tracking.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA.create(tmp_path_factory.mktemp("ca"))


def _msg(*rcpts: str, data: bytes = BODY, sender: str = "a@sender.test") -> OutgoingMessage:
    return OutgoingMessage("Q1", sender, tuple(rcpts), data)


async def _deliver(runtime: Runtime, dest: Destination, msg: OutgoingMessage) -> DeliveryResult:
    return await Deliverer(runtime).deliver(dest, msg)


def _smart(sink: SmtpSink | PostfixSink, tls: str, extra: str = "") -> str:
    return f"""
    [[outbound_connector]]
    name = "relay"
    recipient_domains = ["*"]
    smart_hosts = ["{sink.host}:{sink.port}"]
    tls = "{tls}"
    connect_timeout = 5
    command_timeout = 5
    {extra}
    """


async def test_mx_delivery_opportunistic_tls_with_outcome(ca: TestCA, make_runtime: Factory) -> None:
    cert = ca.issue(["mx.example.test"])
    async with SmtpSink(tls=cert, hostname="mx.example.test") as sink:
        resolver = StaticResolver(
            {("example.test", "MX"): ["10 mx.example.test."], ("mx.example.test", "A"): ["127.0.0.1"]}
        )
        runtime, rec = await make_runtime(
            f"""
            [[outbound_connector]]
            name = "internet"
            recipient_domains = ["*"]
            use_mx = true
            mx_port = {sink.port}
            tls = "opportunistic"
            """,
            resolver,
        )
        result = await _deliver(
            runtime, Destination(runtime.config.outbound("internet"), "example.test"), _msg("b@example.test")
        )
        assert [o.result for o in result.outcomes] == ["delivered"], result.steps
        assert result.mx_host == "mx.example.test" and result.tls and result.tls.startswith("TLSv1.")
        assert any("TLS TLSv1." in step and "SNI mx.example.test" in step for step in result.steps)
        (got,) = sink.messages
        assert got.tls_version in ("TLSv1.2", "TLSv1.3") and got.sni == "mx.example.test"
        assert got.rcpt_tos == ("b@example.test",) and b"\r\n.leading dot\r\n" in got.data
        assert got.helo == "gw.sender.test"
        assert any(opt.startswith("SIZE=") for opt in got.mail_options)
        (outcome,) = rec.outcomes
        assert outcome.success and outcome.policy_type is PolicyType.NO_POLICY
        assert outcome.policy_domain == "example.test" and outcome.mx_host == "mx.example.test"
        assert outcome.receiving_ip == "127.0.0.1" and outcome.receiving_helo == "mx.example.test"
        assert outcome.sending_ip == "127.0.0.1"
        assert outcome.tls_version == got.tls_version and outcome.cipher == got.cipher


@pytest.mark.parametrize(
    ("kind", "tls", "expect", "result_type"),
    [
        ("good", "domain_validation", "delivered", None),
        ("wrong_name", "domain_validation", "deferred", TlsRptResult.CERTIFICATE_HOST_MISMATCH),
        ("wrong_name", "certificate_validation", "delivered", None),
        ("expired", "certificate_validation", "deferred", TlsRptResult.CERTIFICATE_EXPIRED),
        ("self_signed", "certificate_validation", "deferred", TlsRptResult.CERTIFICATE_NOT_TRUSTED),
        ("self_signed", "encryption_only", "delivered", None),
        ("expired", "opportunistic", "delivered", None),
    ],
)
async def test_smart_host_tls_modes(
    ca: TestCA, tmp_path: Path, make_runtime: Factory, kind: str, tls: str, expect: str, result_type: Any
) -> None:
    certs: dict[str, IssuedCert] = {
        "good": ca.issue(["relay.example.test"]),
        "wrong_name": ca.issue(["other.example.test"]),
        "expired": ca.issue(["relay.example.test"], not_after=datetime.now(UTC) - timedelta(days=2)),
        "self_signed": self_signed(tmp_path / "self", ["relay.example.test"]),
    }
    async with SmtpSink(tls=certs[kind]) as sink:
        extra = f'tls_domain = "relay.example.test"\ntls_ca_file = "{ca.cert_path}"'
        runtime, rec = await make_runtime(_smart(sink, tls, extra))
        result = await _deliver(
            runtime,
            Destination(runtime.config.outbound("relay"), "127.0.0.1", (f"127.0.0.1:{sink.port}",)),
            _msg("b@x.test"),
        )
        assert [o.result for o in result.outcomes] == [expect], result.steps
        assert len(sink.messages) == (1 if expect == "delivered" else 0)
        if expect == "delivered":
            assert sink.messages[0].tls_version is not None
        (outcome,) = rec.outcomes
        assert outcome.success is (result_type is None)
        assert outcome.result_type is result_type
        if tls == "domain_validation" and expect == "delivered":
            assert any("peer verified (relay.example.test)" in step for step in result.steps)
        if result_type is not None:
            assert outcome.verification == "untrusted"
            assert result.outcomes[0].status == "4.7.5"


@pytest.mark.parametrize(("tls", "expect"), [("opportunistic", "delivered"), ("encryption_only", "deferred")])
async def test_peer_without_starttls(ca: TestCA, make_runtime: Factory, tls: str, expect: str) -> None:
    async with SmtpSink(tls=ca.issue(["relay.example.test"]), starttls=False) as sink:
        runtime, rec = await make_runtime(_smart(sink, tls))
        result = await _deliver(
            runtime,
            Destination(runtime.config.outbound("relay"), "127.0.0.1", (f"127.0.0.1:{sink.port}",)),
            _msg("b@x.test"),
        )
        assert [o.result for o in result.outcomes] == [expect]
        assert [m.tls_version for m in sink.messages] == ([None] if expect == "delivered" else [])
        (outcome,) = rec.outcomes
        assert not outcome.success and outcome.result_type is TlsRptResult.STARTTLS_NOT_SUPPORTED


async def test_tls_none_never_starttls(ca: TestCA, make_runtime: Factory) -> None:
    async with SmtpSink(tls=ca.issue(["relay.example.test"])) as sink:
        runtime, rec = await make_runtime(_smart(sink, "none"))
        result = await _deliver(
            runtime,
            Destination(runtime.config.outbound("relay"), "127.0.0.1", (f"127.0.0.1:{sink.port}",)),
            _msg("b@x.test"),
        )
        assert [o.result for o in result.outcomes] == ["delivered"]
        assert sink.messages[0].tls_version is None and rec.outcomes == []


async def test_per_recipient_results_in_one_transaction(make_runtime: Factory) -> None:
    replies = {"busy": "451 4.2.0 mailbox busy", "nobody": "550 5.1.1 no such user"}
    async with SmtpSink(rcpt_replies=replies) as sink:
        runtime, _ = await make_runtime(_smart(sink, "opportunistic"))
        msg = _msg("ok@x.test", "busy@x.test", "nobody@x.test", "ok2@x.test")
        result = await _deliver(
            runtime, Destination(runtime.config.outbound("relay"), "127.0.0.1", (f"127.0.0.1:{sink.port}",)), msg
        )
        by = {o.recipient: o for o in result.outcomes}
        assert {r: o.result for r, o in by.items()} == {
            "ok@x.test": "delivered",
            "busy@x.test": "deferred",
            "nobody@x.test": "failed",
            "ok2@x.test": "delivered",
        }
        assert by["nobody@x.test"].status == "5.1.1" and by["nobody@x.test"].remote
        assert by["busy@x.test"].reply.startswith("451 4.2.0")
        assert sink.connections == 1
        (got,) = sink.messages
        assert got.rcpt_tos == ("ok@x.test", "ok2@x.test")


async def test_mx_failover_across_loopback_addresses(make_runtime: Factory) -> None:
    async with SmtpSink(host="127.0.0.3", hostname="mx2.example.test") as sink:
        resolver = StaticResolver(
            {
                ("example.test", "MX"): ["20 mx2.example.test.", "10 mx1.example.test."],
                ("mx1.example.test", "A"): ["127.0.0.2"],  # nothing listens there
                ("mx2.example.test", "A"): ["127.0.0.3"],
            }
        )
        runtime, _ = await make_runtime(
            f"""
            [[outbound_connector]]
            name = "internet"
            recipient_domains = ["*"]
            use_mx = true
            mx_port = {sink.port}
            """,
            resolver,
        )
        result = await _deliver(
            runtime, Destination(runtime.config.outbound("internet"), "example.test"), _msg("b@example.test")
        )
        assert [o.result for o in result.outcomes] == ["delivered"]
        assert result.mx_host == "mx2.example.test" and result.peer_ip == "127.0.0.3"
        assert any("mx1.example.test[127.0.0.2]" in s for s in result.steps)


async def test_null_mx_fails_at_once_and_unreachable_defers(make_runtime: Factory) -> None:
    resolver = StaticResolver(
        {("null.test", "MX"): ["0 ."], ("down.test", "MX"): ["10 mx.down.test."], ("mx.down.test", "A"): ["127.0.0.2"]}
    )
    runtime, _ = await make_runtime(
        """
        [[outbound_connector]]
        name = "internet"
        recipient_domains = ["*"]
        use_mx = true
        mx_port = 1
        connect_timeout = 2
        """,
        resolver,
    )
    null = await _deliver(runtime, Destination(runtime.config.outbound("internet"), "null.test"), _msg("b@null.test"))
    assert [(o.result, o.status) for o in null.outcomes] == [("failed", "5.1.10")]
    down = await _deliver(runtime, Destination(runtime.config.outbound("internet"), "down.test"), _msg("b@down.test"))
    assert [o.result for o in down.outcomes] == ["deferred"] and down.outcomes[0].status.startswith("4.")


async def test_size_limit_is_honoured(make_runtime: Factory) -> None:
    async with SmtpSink(data_size_limit=100) as sink:
        runtime, _ = await make_runtime(_smart(sink, "none"))
        big = BODY + b"x" * 500 + b"\r\n"
        result = await _deliver(
            runtime,
            Destination(runtime.config.outbound("relay"), "127.0.0.1", (f"127.0.0.1:{sink.port}",)),
            _msg("b@x.test", data=big),
        )
        assert [(o.result, o.status) for o in result.outcomes] == [("failed", "5.3.4")]
        assert sink.messages == ()


async def test_test_mode_sends_nothing(make_runtime: Factory) -> None:
    async with SmtpSink() as sink:
        runtime, _ = await make_runtime(_smart(sink, "none", "test_mode = true"))
        result = await _deliver(
            runtime,
            Destination(runtime.config.outbound("relay"), "127.0.0.1", (f"127.0.0.1:{sink.port}",)),
            _msg("b@x.test"),
        )
        assert [o.result for o in result.outcomes] == ["delivered"] and sink.connections == 0


@pytest.mark.parametrize(
    ("options", "expect"),
    [
        ({"soft_reject": ["RCPT"]}, ("deferred", "4.")),
        ({"hard_reject": ["MAIL"]}, ("failed", "5.")),
        ({"hard_reject": ["."]}, ("failed", "5.")),
        ({}, ("delivered", "2.")),
    ],
)
async def test_postfix_smtp_sink_replies(
    make_runtime: Factory, options: dict[str, Any], expect: tuple[str, str]
) -> None:
    async with PostfixSink(**options) as sink:
        runtime, _ = await make_runtime(_smart(sink, "none"))
        result = await _deliver(
            runtime,
            Destination(runtime.config.outbound("relay"), "127.0.0.1", (f"127.0.0.1:{sink.port}",)),
            _msg("b@x.test"),
        )
        (o,) = result.outcomes
        assert (o.result, o.status[:2]) == expect, result.steps
