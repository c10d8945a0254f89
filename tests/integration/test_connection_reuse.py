"""Outbound connection reuse (Postfix's connection cache) against real servers on loopback: connections, QUITs,
RSETs and TLS handshakes are counted at the sink, never mocked."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from mxgate.core import bootstrap
from mxgate.core.delivery import Deliverer, DeliveryResult, OutgoingMessage
from mxgate.core.hookspecs import hookimpl
from mxgate.core.outcomes import (
    Destination,
    HostPolicy,
    NextHop,
    PolicyType,
    ReportEvent,
    TlsLevel,
    TlsOutcome,
    TlsPolicy,
)
from mxgate.core.runtime import Runtime
from mxgate.testing.ca import TestCA
from mxgate.testing.gateway import TestGateway, delivery_config, running_gateway
from mxgate.testing.sinks import PostfixSink, SmtpSink

pytestmark = pytest.mark.integration

BODY = b"From: a@sender.test\r\nTo: b@x.test\r\nSubject: hello\r\n\r\nHello.\r\n"


class Recorder:
    """TLS outcomes and reported events, as metrics and TLS-RPT see them."""

    name = "recorder"

    def __init__(self) -> None:
        self.outcomes: list[TlsOutcome] = []
        self.events: list[ReportEvent] = []

    @hookimpl
    def mxgate_delivery_on_tls_outcome(self, outcome: TlsOutcome) -> None:
        self.outcomes.append(outcome)

    @hookimpl
    def mxgate_report_on_event(self, event: ReportEvent) -> None:
        self.events.append(event)

    def reused(self) -> list[str]:
        return [e.label("connector") for e in self.events if e.kind == "outbound_session_reused"]


class TestPolicy:
    """A recipient-side policy plugin (as DANE is): its level, and per-host data standing for a TLSA RRset."""

    __test__ = False
    name = "test_policy"

    def __init__(self) -> None:
        self.level = TlsLevel.MAY
        self.data: object = ("3 1 1 aaaa",)

    @hookimpl
    def mxgate_delivery_resolve_tls_policy(self, destination: Destination, next_hop: NextHop) -> TlsPolicy | None:
        hosts = {h.name.lower(): HostPolicy(self.level, data=self.data) for h in next_hop.hosts}
        return TlsPolicy(
            source="test_policy",
            policy_type=PolicyType.TLSA,
            policy_domain=destination.domain,
            level=self.level,
            precedence=300,
            hosts=hosts,
        )


Factory = Callable[..., Awaitable[tuple[Runtime, Recorder]]]


@pytest.fixture
async def make_runtime(tmp_path: Path) -> AsyncIterator[Factory]:
    made: list[Runtime] = []

    async def make(connectors: str, *plugins: tuple[str, object]) -> tuple[Runtime, Recorder]:
        directory = tmp_path / f"rt{len(made)}"
        directory.mkdir()
        path = delivery_config(directory, connectors)
        recorder = Recorder()
        config, plugin_set = bootstrap.load(path, entry_points=False, extra_plugins=[("recorder", recorder), *plugins])
        runtime = Runtime.create(config, plugin_set)
        await runtime.hooks.on_startup(runtime)
        runtime.resolver = None  # smart hosts by IP: no DNS
        made.append(runtime)
        return runtime, recorder

    yield make
    for rt in made:
        for task in rt.tasks:
            task.cancel()
        await asyncio.gather(*rt.tasks, return_exceptions=True)
        rt.tracking.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA.create(tmp_path_factory.mktemp("ca"))


def connector(sink: SmtpSink | PostfixSink, name: str = "relay", tls: str = "none", extra: str = "") -> str:
    return f"""
    [[outbound_connector]]
    name = "{name}"
    recipient_domains = ["{name}.test"]
    smart_hosts = ["{sink.host}:{sink.port}"]
    tls = "{tls}"
    connect_timeout = 5
    command_timeout = 5
    {extra}
    """


def dest(runtime: Runtime, sink: SmtpSink | PostfixSink, name: str = "relay") -> Destination:
    connector = runtime.config.outbound(name)
    assert connector is not None
    return Destination(connector, sink.host, (f"{sink.host}:{sink.port}",))


def msg(n: int, *, data: bytes = BODY, tls_optional: bool = False, rcpt: str | None = None) -> OutgoingMessage:
    return OutgoingMessage(
        f"Q{n}", f"sender{n}@sender.test", (rcpt or f"rcpt{n}@x.test",), data, tls_optional=tls_optional
    )


def results(result: DeliveryResult) -> list[str]:
    return [o.result for o in result.outcomes]


def reusing(result: DeliveryResult) -> list[str]:
    return [s for s in result.steps if s.startswith("reusing session")]


async def test_sequential_messages_share_one_connection(make_runtime: Factory) -> None:
    async with SmtpSink() as sink:
        runtime, rec = await make_runtime(connector(sink))
        deliverer = Deliverer(runtime)
        for n in range(1, 6):
            result = await deliverer.deliver(dest(runtime, sink), msg(n))
            assert results(result) == ["delivered"], result.steps
            assert result.peer_ip == "127.0.0.1" and result.mx_host == "127.0.0.1"
            if n == 1:
                assert reusing(result) == [] and any(s.startswith("connected to") for s in result.steps)
            else:
                assert reusing(result) == [f"reusing session to 127.0.0.1[127.0.0.1]:{sink.port} (message {n} on it)"]
                assert not any(s.startswith("connected to") for s in result.steps)
                assert result.transcript[0] == "C: RSET"  # the liveness check is this delivery's
        assert sink.connections == 1 and sink.rsets == 4 and sink.quits == 0
        assert [(m.mail_from, m.rcpt_tos) for m in sink.messages] == [
            (f"sender{n}@sender.test", (f"rcpt{n}@x.test",)) for n in range(1, 6)
        ]
        assert rec.reused() == ["relay"] * 4
        assert deliverer.idle_sessions == 1
        await deliverer.close()
        assert sink.quits == 1 and deliverer.idle_sessions == 0
        await sink.wait_disconnections(1)


async def test_reuse_disabled_connects_per_message(make_runtime: Factory) -> None:
    async with SmtpSink() as sink:
        runtime, rec = await make_runtime(connector(sink, extra="connection_reuse = false"))
        deliverer = Deliverer(runtime)
        for n in range(1, 6):
            result = await deliverer.deliver(dest(runtime, sink), msg(n))
            assert results(result) == ["delivered"] and reusing(result) == []
            assert result.transcript[-1] == "S: 221 Bye"
        assert sink.connections == 5 and sink.quits == 5 and len(sink.messages) == 5
        assert deliverer.idle_sessions == 0 and rec.reused() == []


async def test_starttls_session_is_kept_with_its_verification(ca: TestCA, make_runtime: Factory) -> None:
    async with SmtpSink(tls=ca.issue(["relay.example.test"])) as sink:
        extra = f'tls_domain = "relay.example.test"\ntls_ca_file = "{ca.cert_path}"'
        runtime, rec = await make_runtime(connector(sink, tls="domain_validation", extra=extra))
        deliverer = Deliverer(runtime)
        first = await deliverer.deliver(dest(runtime, sink), msg(1))
        assert results(first) == ["delivered"], first.steps
        assert first.tls is not None and first.tls.startswith("TLSv1.") and first.verification == "verified"
        for n in range(2, 5):
            again = await deliverer.deliver(dest(runtime, sink), msg(n))
            assert results(again) == ["delivered"] and reusing(again)
            assert (again.tls, again.verification, again.peer_ip) == (first.tls, first.verification, first.peer_ip)
            assert not any("STARTTLS" in line for line in again.transcript)
        assert sink.connections == 1 and sink.tls_handshakes == 1
        assert [m.tls_version is not None for m in sink.messages] == [True] * 4
        assert len({m.peer for m in sink.messages}) == 1
        (outcome,) = rec.outcomes  # one TLS session, one TLS-RPT record
        assert outcome.success
        await deliverer.close()


@pytest.mark.parametrize("how", ["server_closes", "server_idle_timeout"])
async def test_connection_closed_by_server_while_idle(make_runtime: Factory, how: str) -> None:
    async with SmtpSink(idle_timeout=0.2 if how == "server_idle_timeout" else 30.0) as sink:
        runtime, _ = await make_runtime(connector(sink))
        deliverer = Deliverer(runtime)
        for n in range(1, 4):
            result = await deliverer.deliver(dest(runtime, sink), msg(n))
            assert results(result) == ["delivered"], result.steps
            assert reusing(result) == [] and not any(o.status.startswith("4") for o in result.outcomes)
            if how == "server_closes":
                assert sink.close_connections() == 1
            await sink.wait_disconnections(n)
        assert sink.connections == 3 and len(sink.messages) == 3


async def test_rset_refused_means_a_new_connection(make_runtime: Factory) -> None:
    async with PostfixSink(soft_reject=["RSET"]) as sink:
        runtime, _ = await make_runtime(connector(sink))
        deliverer = Deliverer(runtime)
        first = await deliverer.deliver(dest(runtime, sink), msg(1))
        second = await deliverer.deliver(dest(runtime, sink), msg(2))
        assert results(first) == results(second) == ["delivered"], second.steps
        assert reusing(second) == [] and any(s.startswith("connected to") for s in second.steps)
        assert "S: 450 4.3.0 Error: command failed" not in second.transcript  # the failed check stays out
        await deliverer.close()


async def test_idle_timeout_sends_quit(make_runtime: Factory) -> None:
    async with SmtpSink() as sink:
        runtime, _ = await make_runtime(connector(sink, extra="connection_idle_timeout = 0.3"))
        deliverer = Deliverer(runtime)
        loop = asyncio.get_running_loop()
        assert results(await deliverer.deliver(dest(runtime, sink), msg(1))) == ["delivered"]
        pooled_at = loop.time()
        assert deliverer.idle_sessions == 1 and sink.open_connections == 1
        await sink.wait_disconnections(1, timeout=2.0)
        assert loop.time() - pooled_at >= 0.25
        assert sink.quits == 1 and deliverer.idle_sessions == 0
        assert results(await deliverer.deliver(dest(runtime, sink), msg(2))) == ["delivered"]
        assert sink.connections == 2


async def test_reuse_limit_and_max_age(make_runtime: Factory) -> None:
    async with SmtpSink() as sink:
        runtime, _ = await make_runtime(connector(sink, extra="connection_reuse_limit = 2"))
        deliverer = Deliverer(runtime)
        for n in range(1, 6):
            assert results(await deliverer.deliver(dest(runtime, sink), msg(n))) == ["delivered"]
        assert sink.connections == 3 and sink.quits == 2 and len(sink.messages) == 5
        await deliverer.close()
    async with SmtpSink() as sink:
        runtime, _ = await make_runtime(connector(sink, extra="connection_max_age = 0.2"))
        deliverer = Deliverer(runtime)
        assert results(await deliverer.deliver(dest(runtime, sink), msg(1))) == ["delivered"]
        assert results(await deliverer.deliver(dest(runtime, sink), msg(2))) == ["delivered"]
        await asyncio.sleep(0.25)
        assert results(await deliverer.deliver(dest(runtime, sink), msg(3))) == ["delivered"]
        assert sink.connections == 2
        await deliverer.close()


async def test_policy_differences_never_share_a_session(make_runtime: Factory) -> None:
    async with SmtpSink() as sink:  # no STARTTLS: at level MAY the sessions are cleartext
        policy = TestPolicy()
        runtime, _ = await make_runtime(connector(sink, tls="opportunistic"), ("test_policy", policy))
        deliverer = Deliverer(runtime)

        async def send(n: int, **kw: bool) -> DeliveryResult:
            return await deliverer.deliver(dest(runtime, sink), msg(n, **kw))

        assert results(await send(1)) == ["delivered"]  # test_policy, MAY, data rrset 1: session A
        assert results(await send(2, tls_optional=True)) == ["delivered"]  # RFC 8689: connector policy: B
        assert sink.connections == 2
        assert reusing(await send(3)) and sink.connections == 2  # A again
        assert reusing(await send(4, tls_optional=True)) and sink.connections == 2  # B again
        policy.data = ("3 1 1 bbbb",)  # a new TLSA RRset: same level, SNI and names, other data
        assert results(await send(5)) == ["delivered"] and sink.connections == 3
        # The pooled cleartext sessions must not carry a message whose policy requires encryption.
        policy.level = TlsLevel.ENCRYPT
        required = await send(6)
        assert results(required) == ["deferred"] and reusing(required) == []
        assert any("does not offer STARTTLS" in o.reply for o in required.outcomes)
        assert sink.connections == 4 and len(sink.messages) == 5
        assert deliverer.idle_sessions == 3  # A (rrset 2), B and A (rrset 1)
        await deliverer.close()
        assert sink.quits == 4  # three pooled + the one refused for lack of STARTTLS


async def test_connectors_do_not_share_sessions_and_close_quits_all(make_runtime: Factory) -> None:
    async with SmtpSink() as sink:
        runtime, rec = await make_runtime(connector(sink, "one") + connector(sink, "two"))
        deliverer = Deliverer(runtime)
        for n in range(1, 5):
            name = "one" if n % 2 else "two"
            assert results(await deliverer.deliver(dest(runtime, sink, name), msg(n))) == ["delivered"]
        assert sink.connections == 2 and rec.reused() == ["one", "two"]
        assert deliverer.idle_sessions == 2 and sink.quits == 0
        await deliverer.close()
        await deliverer.close()  # idempotent
        assert sink.quits == 2 and deliverer.idle_sessions == 0
        await sink.wait_disconnections(2)
        # closed: deliveries still work, and QUIT at once
        assert results(await deliverer.deliver(dest(runtime, sink, "one"), msg(5))) == ["delivered"]
        assert sink.connections == 3 and sink.quits == 3 and deliverer.idle_sessions == 0


async def test_pool_holds_at_most_max_connections_per_destination(make_runtime: Factory) -> None:
    async with SmtpSink() as sink:
        runtime, _ = await make_runtime(connector(sink, extra="max_connections_per_destination = 2"))
        deliverer = Deliverer(runtime)
        done = await asyncio.gather(*(deliverer.deliver(dest(runtime, sink), msg(n)) for n in range(1, 5)))
        assert [results(r) for r in done] == [["delivered"]] * 4
        assert sink.connections == 4 and deliverer.idle_sessions == 2
        await sink.wait_disconnections(2)
        assert sink.quits == 2  # the extras
        await deliverer.close()


async def test_refused_transaction_and_unmet_needs_keep_the_session(make_runtime: Factory) -> None:
    replies = {"nobody": "550 5.1.1 no such user"}
    async with SmtpSink(rcpt_replies=replies, data_size_limit=1000) as sink:
        runtime, _ = await make_runtime(connector(sink))
        deliverer = Deliverer(runtime)
        assert results(await deliverer.deliver(dest(runtime, sink), msg(1))) == ["delivered"]
        refused = await deliverer.deliver(dest(runtime, sink), msg(2, rcpt="nobody@x.test"))
        assert results(refused) == ["failed"] and reusing(refused)
        big = await deliverer.deliver(dest(runtime, sink), msg(3, data=BODY + b"x" * 2000 + b"\r\n"))
        assert [(o.result, o.status) for o in big.outcomes] == [("failed", "5.3.4")] and reusing(big)
        after = await deliverer.deliver(dest(runtime, sink), msg(4))
        assert results(after) == ["delivered"] and reusing(after) == [
            f"reusing session to 127.0.0.1[127.0.0.1]:{sink.port} (message 3 on it)"  # the big one was not sent
        ]
        assert sink.connections == 1 and len(sink.messages) == 2
        await deliverer.close()


async def test_engine_shutdown_closes_pooled_sessions_without_close(make_runtime: Factory) -> None:
    """Nobody calls close(): cancelling runtime.tasks, as the engine does at shutdown, closes what is pooled."""
    async with SmtpSink() as sink:
        runtime, _ = await make_runtime(connector(sink))
        deliverer = Deliverer(runtime)
        others = list(runtime.tasks)  # the plugins' own
        assert results(await deliverer.deliver(dest(runtime, sink), msg(1))) == ["delivered"]
        (keeper,) = [t for t in runtime.tasks if t not in others]
        assert deliverer.idle_sessions == 1
        tasks = list(runtime.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sink.wait_disconnections(1)
        assert deliverer.idle_sessions == 0 and keeper.done() and keeper not in runtime.tasks
        assert results(await deliverer.deliver(dest(runtime, sink), msg(2))) == ["delivered"]  # no more pooling
        assert sink.connections == 2 and deliverer.idle_sessions == 0


async def test_gateway_relays_over_one_session_and_counts_it(tmp_path: Path) -> None:
    async with SmtpSink() as sink:
        toml = f"""
            [[outbound_connector]]
            name = "relay"
            recipient_domains = ["*"]
            smart_hosts = ["127.0.0.1:{sink.port}"]
            tls = "none"
        """
        async with running_gateway(toml, tmp_path) as gw:
            for n in range(1, 4):
                await asyncio.to_thread(submit, gw, n)
                await sink.wait_for(n)
            assert sink.connections == 1 and sink.rsets == 2
            assert [m.rcpt_tos for m in sink.messages] == [(f"rcpt{n}@example.org",) for n in range(1, 4)]
            assert gw.metrics_port is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.metrics_port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            await writer.wait_closed()
            assert b'mxgate_outbound_sessions_reused_total{connector="relay"} 2.0' in raw
        await sink.wait_disconnections(1)  # the gateway stopped: the pooled session is gone


def submit(gw: TestGateway, n: int) -> None:
    with smtplib.SMTP(gw.smtp_host, gw.smtp_port, timeout=10) as client:
        client.sendmail(f"sender{n}@example.net", [f"rcpt{n}@example.org"], BODY)
