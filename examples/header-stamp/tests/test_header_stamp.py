"""Tests of the example plugin, written the way a plugin author writes them: mxgate's own fixtures start a real
gateway with the plugin loaded (``mxgate_gateway``) and a real SMTP server it delivers to (``smtp_sink``)."""

from __future__ import annotations

import asyncio
import email
import importlib
import smtplib
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from mxgate_header_stamp import HeaderStamp, HeaderStampConfig

from mxgate import ConfigError
from mxgate.testing.gateway import TestGateway, running_gateway
from mxgate.testing.sinks import SinkFactory

Start = Callable[..., Awaitable[TestGateway]]
PACKAGE = Path(__file__).resolve().parents[1]
BODY = b"From: a@example.net\r\nTo: user@example.org\r\nSubject: hello\r\n\r\nhi\r\n"


def gateway_config(sink_host: str, sink_port: int, stamp: str = "") -> str:
    return f"""
        [server]
        accepted_domains = ["example.org"]

        [[outbound_connector]]
        name = "mailstore"
        recipient_domains = ["example.org"]
        smart_hosts = ["{sink_host}:{sink_port}"]
        tls = "none"

        [plugins.header_stamp]
        {stamp}
    """


def send(gw: TestGateway, rcpts: list[str]) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP(gw.smtp_host, gw.smtp_port, timeout=10) as client:
        try:
            return client.sendmail("a@example.net", rcpts, BODY)
        except smtplib.SMTPRecipientsRefused as exc:
            return dict(exc.recipients)


@pytest.mark.integration
@pytest.mark.asyncio  # explicit, for projects without asyncio_mode = "auto"
async def test_accepted_mail_arrives_stamped(mxgate_gateway: Start, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink()
    gw = await mxgate_gateway(
        gateway_config(sink.host, sink.port, 'header = "X-Checked"\nvalue = "edge-1"'),
        extra_plugins=[("header_stamp", HeaderStamp())],
    )
    assert await asyncio.to_thread(send, gw, ["user@example.org"]) == {}
    (received,) = await sink.wait_for(1)
    message = email.message_from_bytes(received.data)
    assert message["X-Checked"] == "edge-1 (smtp)"  # the value and the listener the message came in on
    assert message["Subject"] == "hello"


@pytest.mark.integration
@pytest.mark.asyncio
async def test_matching_recipients_are_refused(mxgate_gateway: Start, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink()
    gw = await mxgate_gateway(
        gateway_config(sink.host, sink.port, 'reject_pattern = "^noreply-"'),
        extra_plugins=[("header_stamp", HeaderStamp())],
    )
    refused = await asyncio.to_thread(send, gw, ["noreply-bot@example.org", "user@example.org"])
    assert refused == {"noreply-bot@example.org": (550, b"5.7.1 recipient noreply-bot@example.org refused by policy")}
    (received,) = await sink.wait_for(1)
    assert received.rcpt_tos == ("user@example.org",)
    assert email.message_from_bytes(received.data)["X-Stamped-By"] == "mxgate (smtp)"  # the defaults


@pytest.mark.asyncio
async def test_a_bad_pattern_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"plugins\.header_stamp\.reject_pattern: '\(unclosed': not a regular"):
        async with running_gateway(
            '[plugins.header_stamp]\nreject_pattern = "(unclosed"\n',
            tmp_path,
            extra_plugins=[("header_stamp", HeaderStamp())],
        ):
            pass


def test_defaults() -> None:
    conf = HeaderStampConfig()
    assert (conf.header, conf.value, conf.reject_pattern) == ("X-Stamped-By", "mxgate", "")


def test_the_entry_point_names_the_plugin_class() -> None:
    project = tomllib.loads((PACKAGE / "pyproject.toml").read_text())
    entry = project["project"]["entry-points"]["mxgate"]["header_stamp"]
    module, _, attr = entry.partition(":")
    assert getattr(importlib.import_module(module), attr) is HeaderStamp
    assert HeaderStamp.name == "header_stamp"
