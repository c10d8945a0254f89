"""Tests of the example routing agent, written the way a plugin author writes them: mxgate's own fixtures start a
real gateway with the plugin loaded (``mxgate_gateway``) and real SMTP servers it delivers to (``smtp_sink``)."""

from __future__ import annotations

import asyncio
import importlib
import smtplib
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from mxgate_route_by_header import RouteByHeader, RouteByHeaderConfig

from mxgate import ConfigError
from mxgate.testing.gateway import TestGateway, running_gateway
from mxgate.testing.sinks import SinkFactory, SmtpSink

Start = Callable[..., Awaitable[TestGateway]]
PACKAGE = Path(__file__).resolve().parents[1]


def gateway_config(mailstore: SmtpSink, archive: SmtpSink, plugin: str = 'inbound_connectors = ["localhost"]') -> str:
    """Mail for example.org goes to the mail store by default; the "archive" connector only by the header."""
    return f"""
        [server]
        accepted_domains = ["example.org"]

        [[outbound_connector]]
        name = "mailstore"
        recipient_domains = ["example.org"]
        smart_hosts = ["{mailstore.host}:{mailstore.port}"]
        tls = "none"

        [[outbound_connector]]
        name = "archive"
        recipient_domains = ["archive.example"]
        smart_hosts = ["{archive.host}:{archive.port}"]
        tls = "none"

        [plugins.route_by_header]
        {plugin}
    """


def send(gw: TestGateway, route_to: str | None, subject: str, rcpt: str = "user@example.org") -> None:
    header = f"x-route-to: {route_to}\r\n" if route_to is not None else ""
    body = f"From: a@example.org\r\nTo: {rcpt}\r\n{header}Subject: {subject}\r\n\r\nhi\r\n"
    with smtplib.SMTP(gw.smtp_host, gw.smtp_port, timeout=10) as client:
        client.sendmail("a@example.org", [rcpt], body.encode())


async def counted(plugin: RouteByHeader, n: int, timeout: float = 10.0) -> None:
    """Wait until ``n`` outcomes were reported (the hooks run once the next hop answered)."""
    async with asyncio.timeout(timeout):
        while plugin.counts.total() < n:
            await asyncio.sleep(0.02)


@pytest.mark.integration
@pytest.mark.asyncio  # explicit, for projects without asyncio_mode = "auto"
async def test_trusted_mail_goes_where_its_header_says(mxgate_gateway: Start, smtp_sink: SinkFactory) -> None:
    mailstore, archive = await smtp_sink(), await smtp_sink()
    plugin = RouteByHeader()
    gw = await mxgate_gateway(gateway_config(mailstore, archive), extra_plugins=[("route_by_header", plugin)])
    await asyncio.to_thread(send, gw, "archive", "to the archive")  # the header name in any case
    await asyncio.to_thread(send, gw, None, "as usual")
    await asyncio.to_thread(send, gw, "nonesuch", "a connector that does not exist")
    (archived,) = await archive.wait_for(1)
    assert b"Subject: to the archive" in archived.data and archived.rcpt_tos == ("user@example.org",)
    stored = await mailstore.wait_for(2)
    assert sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in stored) == [
        b"a connector that does not exist",
        b"as usual",
    ]
    await counted(plugin, 3)
    assert plugin.counts == {("archive", "delivered"): 1, ("mailstore", "delivered"): 2}


@pytest.mark.integration
@pytest.mark.asyncio
async def test_anyone_else_is_routed_as_usual(mxgate_gateway: Start, smtp_sink: SinkFactory) -> None:
    """The client comes in under the "localhost" inbound connector, which the plugin does not trust here: the
    header is ignored. Every outcome is counted: a failure, and the bounce (DSN) it causes, included."""
    mailstore = await smtp_sink(rcpt_replies={"nobody@example.org": "550 5.1.1 no such user"})
    archive = await smtp_sink()
    plugin = RouteByHeader()
    gw = await mxgate_gateway(
        gateway_config(mailstore, archive, 'inbound_connectors = ["partner"]'),
        extra_plugins=[("route_by_header", plugin)],
    )
    await asyncio.to_thread(send, gw, "archive", "not trusted")
    await asyncio.to_thread(send, gw, "archive", "to nobody", "nobody@example.org")
    stored = await mailstore.wait_for(2)  # the first message, and the bounce of the second to a@example.org
    assert b"Subject: not trusted" in stored[0].data or b"Subject: not trusted" in stored[1].data
    assert sorted(r for m in stored for r in m.rcpt_tos) == ["a@example.org", "user@example.org"]
    await counted(plugin, 3)
    assert plugin.counts == {("mailstore", "delivered"): 2, ("mailstore", "failed"): 1}
    assert archive.messages == ()


@pytest.mark.asyncio
async def test_a_bad_header_name_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"plugins\.route_by_header\.header: 'X Route': not a header name"):
        async with running_gateway(
            '[plugins.route_by_header]\nheader = "X Route"\n',
            tmp_path,
            extra_plugins=[("route_by_header", RouteByHeader())],
        ):
            pass


def test_defaults_trust_nobody() -> None:
    conf = RouteByHeaderConfig()
    assert (conf.header, conf.inbound_connectors, conf.authenticated) == ("X-Route-To", (), False)


def test_the_entry_point_names_the_plugin_class() -> None:
    project = tomllib.loads((PACKAGE / "pyproject.toml").read_text())
    entry = project["project"]["entry-points"]["mxgate"]["route_by_header"]
    module, _, attr = entry.partition(":")
    assert getattr(importlib.import_module(module), attr) is RouteByHeader
    assert RouteByHeader.name == "route_by_header"
