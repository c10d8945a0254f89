"""Regression: outbound STARTTLS against a server in another event loop that sends TLS 1.3 session tickets
right after the handshake. A lost wake-up in the client's reply reader made most such sessions time out."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from mxgate.core.smtp.client import SmtpClient
from mxgate.core.tls import client_context
from mxgate.testing.ca import TestCA
from mxgate.testing.sinks import ThreadedSmtpSink

pytestmark = pytest.mark.integration


async def one_session(port: int, n: int) -> str:
    client = await SmtpClient.connect("127.0.0.1", port, timeout=5)
    try:
        await client.ehlo("client.test")
        reply = await client.starttls(client_context(verify=False), "sink.test")
        assert reply.code == 220
        ehlo = await client.ehlo("client.test")
        assert ehlo.code == 250
        for line in (f"MAIL FROM:<s{n}@client.test>", "RCPT TO:<r@sink.test>"):
            assert (await client.command(line)).code == 250
        assert (await client.command("DATA")).code == 354
        await client.send_command(f"Subject: {n}\r\n\r\nbody\r\n.", log="<data>")
        return str(await client.read_reply())
    finally:
        with contextlib.suppress(Exception):
            await client.quit()


async def test_concurrent_starttls_sessions_never_stall(tmp_path: Path) -> None:
    cert = TestCA.create(tmp_path).issue(["sink.test"])
    with ThreadedSmtpSink(tls=cert, hostname="sink.test") as sink:
        replies = await asyncio.wait_for(asyncio.gather(*(one_session(sink.port, n) for n in range(20))), 30)
    assert all(r.startswith("250") for r in replies), replies
    assert len(sink.messages) == 20
    assert {m.tls_version for m in sink.messages} == {"TLSv1.3"}
