"""The hostile corpus (tests/data/hostile/*.json) against a real gateway on loopback: smuggling variants,
commands injected before STARTTLS, over-long lines, NUL bytes, invalid UTF-8, 10,000 RCPT, huge header blocks,
malformed AUTH, the classic open-relay tricks. Each session is sent byte for byte by a raw client and every reply
is checked; afterwards the queue must hold exactly the messages the session was allowed to leave, and the
gateway must still serve a well-behaved client.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from reliability_kit import RawClient, free_port, load_corpus, run_session

from mxgate.core import tls as tlsmod
from mxgate.testing.ca import TestCA
from mxgate.testing.gateway import TestGateway, running_gateway

pytestmark = [pytest.mark.integration]

CORPUS = load_corpus()


@dataclass
class Target:
    gw: TestGateway
    tls: ssl.SSLContext


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def target(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Target]:
    d = tmp_path_factory.mktemp("hostile")
    ca = TestCA.create(d / "ca")
    cert = ca.issue(["mx.gateway.test"], directory=d)
    toml = f"""
        [server]
        accepted_domains = ["example.org"]
        max_message_size = 1048576
        max_recipients = 1000

        [[listener]]
        name = "smtp"
        address = "127.0.0.1:{free_port()}"
        tls_cert = "{cert.chain_path}"
        tls_key = "{cert.key_path}"
        idle_timeout = 15.0
        max_errors = 10

        [[inbound_connector]]
        name = "office"
        sender_ips = ["127.0.0.2/32"]
        may_relay = true

        [[outbound_connector]]
        name = "inside"
        recipient_domains = ["example.org"]
        smart_hosts = ["127.0.0.1:{free_port()}"]
        tls = "none"
        retry_first = 3600.0

        [[outbound_connector]]
        name = "internet"
        recipient_domains = ["*"]
        use_mx = true
        retry_first = 3600.0
    """
    async with running_gateway(toml, d) as gw:
        yield Target(gw, tlsmod.client_context(verify=True, cafile=ca.cert_path))


def _params() -> list[Any]:
    out = []
    for session in CORPUS:
        marks = []
        if session.get("xfail"):
            marks.append(pytest.mark.xfail(strict=True, reason=session["xfail"]))
        out.append(pytest.param(session, id=session["name"], marks=marks))
    return out


async def _queued(gw: TestGateway) -> int:
    assert gw.runtime.queue is not None
    return len(await gw.runtime.queue.list(limit=1_000_000, include_finished=True))


async def _still_serves(gw: TestGateway) -> None:
    client = await RawClient.connect(gw.smtp_host, gw.smtp_port)
    try:
        assert (await client.reply()).code == "220"
        await client.send(
            b"EHLO good.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<u@example.org>\r\nRSET\r\nQUIT\r\n"
        )
        codes = [(await client.reply()).code for _ in range(5)]
        assert codes == ["250", "250", "250", "250", "221"], codes
    finally:
        await client.close()


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("session", _params())
async def test_hostile_session(target: Target, session: dict[str, Any]) -> None:
    gw = target.gw
    before = await _queued(gw)
    problems, _checked = await asyncio.wait_for(
        run_session(session, gw.smtp_host, gw.smtp_port, tls=target.tls, server_name="mx.gateway.test"), 120
    )
    assert not problems, f"{session['name']}: {problems}"
    await asyncio.sleep(0.05)  # a message cut off mid-DATA: let the server notice the disconnect
    added = await _queued(gw) - before
    if "queued" in session:
        assert added == session["queued"], f"{session['name']}: {added} message(s) queued"
    if "queued_max" in session:
        assert added <= session["queued_max"], f"{session['name']}: {added} message(s) queued"
    await _still_serves(gw)


def test_corpus_is_large_and_named_uniquely() -> None:
    names = [s["name"] for s in CORPUS]
    assert len(names) == len(set(names))
    assert len(CORPUS) >= 100
    categories = {s["category"] for s in CORPUS}
    wanted = {"smuggling", "starttls", "auth", "limits", "utf8", "nul", "recipients", "headers", "open-relay"}
    assert wanted <= categories


def corpus_size() -> tuple[int, int]:
    """(sessions, command lines sent) -- the figure in bench/RESULTS.md."""
    lines = 0
    for session in CORPUS:
        for step in session["steps"]:
            if "send" in step:
                lines += max(1, step["send"].count("\n")) * int(step.get("times", 1))
    return len(CORPUS), lines


def test_corpus_size_report(capsys: pytest.CaptureFixture[str]) -> None:
    sessions, lines = corpus_size()
    with capsys.disabled():
        print(f"\nhostile corpus: {sessions} sessions, {lines} lines sent")
