"""Recipient callouts (``Runtime.callout``) against real SMTP servers on loopback: routed and secured like a delivery
(the connector's smart host, its TLS mode and CA), MAIL FROM:<> and RCPT only — never DATA — and an answer for
every way the next hop can fail to give one (refused TLS verification, closed port, silent server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from mxgate import Address, CalloutVerdict
from mxgate.core import bootstrap
from mxgate.core.runtime import Runtime
from mxgate.testing.ca import TestCA
from mxgate.testing.gateway import delivery_config
from mxgate.testing.sinks import SmtpSink

pytestmark = pytest.mark.integration

Factory = Callable[[str], Awaitable[Runtime]]


@pytest.fixture
async def make_runtime(tmp_path: Path) -> AsyncIterator[Factory]:
    made: list[Runtime] = []

    async def make(connectors: str) -> Runtime:
        directory = tmp_path / f"rt{len(made)}"
        directory.mkdir()
        config, plugins = bootstrap.load(delivery_config(directory, connectors), entry_points=False)
        runtime = Runtime.create(config, plugins)
        await runtime.hooks.on_startup(runtime)
        made.append(runtime)
        return runtime

    yield make
    for rt in made:
        for task in rt.tasks:
            task.cancel()
        rt.tracking.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA.create(tmp_path_factory.mktemp("ca"))


def _inside(target: str, tls: str, ca: TestCA) -> str:
    return f"""
    [[outbound_connector]]
    name = "inside"
    recipient_domains = ["example.org"]
    smart_hosts = ["{target}"]
    tls = "{tls}"
    tls_domain = "inside.example.test"
    tls_ca_file = "{ca.cert_path}"
    connect_timeout = 30
    command_timeout = 300
    """


async def test_callout_asks_rcpt_only_under_the_connectors_tls(ca: TestCA, make_runtime: Factory) -> None:
    replies = {"nobody@example.org": "550 5.1.1 no such user here", "busy@example.org": "451 4.3.2 try later"}
    async with SmtpSink(tls=ca.issue(["inside.example.test"]), rcpt_replies=replies) as sink:
        runtime = await make_runtime(_inside(f"127.0.0.1:{sink.port}", "domain_validation", ca))
        known = await runtime.callout(Address("alice", "example.org"), timeout=5)
        unknown = await runtime.callout(Address("nobody", "example.org"), timeout=5)
        busy = await runtime.callout(Address("busy", "example.org"), timeout=5)

    assert known.verdict is CalloutVerdict.ACCEPTED, known
    assert (unknown.verdict, unknown.status, unknown.remote) == (CalloutVerdict.REJECTED, "5.1.1", True), unknown
    assert unknown.reply.startswith("550 5.1.1")
    assert busy.verdict is CalloutVerdict.UNAVAILABLE, busy
    assert known.connector == "inside"
    assert sink.rcpt_commands == ["alice@example.org", "nobody@example.org", "busy@example.org"]
    assert sink.mail_commands == ["<>", "<>", "<>"]  # the null sender
    assert sink.messages == ()  # never DATA
    assert sink.tls_handshakes == 3  # the connector's domain_validation held for every callout
    assert sink.quits == 3


async def test_callout_never_asks_over_a_session_the_connector_would_not_deliver_on(
    ca: TestCA, make_runtime: Factory
) -> None:
    async with SmtpSink(tls=ca.issue(["someone-else.example.test"])) as sink:
        runtime = await make_runtime(_inside(f"127.0.0.1:{sink.port}", "domain_validation", ca))
        result = await runtime.callout(Address("alice", "example.org"), timeout=5)
    assert result.verdict is CalloutVerdict.UNAVAILABLE, result
    assert result.status.startswith("4.7."), result
    assert sink.rcpt_commands == []


async def test_callout_to_a_closed_port_or_a_silent_server_is_unavailable_within_the_timeout(
    ca: TestCA, make_runtime: Factory
) -> None:
    with_closed = await make_runtime(_inside("127.0.0.1:1", "none", ca))
    result = await with_closed.callout(Address("alice", "example.org"), timeout=5)
    assert result.verdict is CalloutVerdict.UNAVAILABLE, result

    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepts, never says a word

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        runtime = await make_runtime(_inside(f"127.0.0.1:{port}", "none", ca))
        started = time.monotonic()
        result = await runtime.callout(Address("alice", "example.org"), timeout=0.5)
        elapsed = time.monotonic() - started
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert result.verdict is CalloutVerdict.UNAVAILABLE, result
    assert result.status.startswith("4.4."), result
    assert elapsed < 5.0  # the connector's 30 s connect / 300 s command timeouts were capped


async def test_callout_without_a_route_is_rejected_like_the_delivery_would_be(
    ca: TestCA, make_runtime: Factory
) -> None:
    runtime = await make_runtime(_inside("127.0.0.1:1", "none", ca))
    result = await runtime.callout(Address("alice", "elsewhere.test"), timeout=5)
    assert (result.verdict, result.status) == (CalloutVerdict.REJECTED, "5.4.4"), result
