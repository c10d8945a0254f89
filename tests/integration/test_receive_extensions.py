"""SMTP extensions on the receive side against real clients: CHUNKING/BDAT (RFC 3030) with a raw socket client
and Python's smtplib."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from mxgate.core.tracking import read_records
from mxgate.testing.gateway import TestGateway, free_port

pytestmark = [pytest.mark.integration]

BASE = '[server]\naccepted_domains = ["example.org"]\n'


class Raw:
    """A raw SMTP client: send exact bytes, read whole (multi-line) replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, gw: TestGateway, *, greet: bool = True) -> Raw:
        r, w = await asyncio.open_connection(gw.smtp_host, gw.smtp_port)
        raw = cls(r, w)
        if greet:
            assert (await raw.reply()).startswith("220 ")
        return raw

    async def reply(self, timeout: float = 5.0) -> str:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                return "\n".join(lines) + ("\n" if lines else "") + "<EOF>"
            lines.append(line.decode().rstrip("\r\n"))
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(lines)

    async def cmd(self, data: bytes | str) -> str:
        self.send(data if isinstance(data, bytes) else data.encode() + b"\r\n")
        return await self.reply()

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), 5) == b""

    def close(self) -> None:
        self.writer.close()


async def queued(gw: TestGateway) -> list[Any]:
    assert gw.runtime.queue is not None
    return await gw.runtime.queue.list()


Start = Callable[..., Awaitable[TestGateway]]


async def _tx(raw: Raw, rcpt: str = "u@example.org") -> None:
    assert (await raw.cmd("MAIL FROM:<a@example.net>")).startswith("250 2.1.0")
    assert (await raw.cmd(f"RCPT TO:<{rcpt}>")).startswith("250 2.1.5")


async def _body(gw: TestGateway, index: int = 0) -> bytes:
    msgs = sorted(await queued(gw), key=lambda m: m.received_at)
    return await gw.runtime.queue.body(msgs[index].id)  # type: ignore[union-attr]


# --- CHUNKING / BDAT ------------------------------------------------------------------------------------------


async def test_bdat_chunks_pipelined_exact_and_not_commands(mxgate_gateway: Start) -> None:
    gw = await mxgate_gateway(BASE)
    raw = await Raw.connect(gw)
    assert "CHUNKING" in (await raw.cmd("EHLO c.example")).split("\n")[-1]
    # one write: MAIL, RCPT, two chunks whose octets look like commands and a lone dot, then NOOP
    c1 = b"Subject: chunked\r\n\r\nQUIT\r\n.\r\nMAIL FROM:<evil@example.net>\r\n"
    c2 = b"..leading dots stay\r\nend"
    raw.send(
        b"MAIL FROM:<a@example.net>\r\nRCPT TO:<u@example.org>\r\n"
        + b"BDAT %d\r\n" % len(c1) + c1 + b"BDAT %d LAST\r\n" % len(c2) + c2 + b"NOOP\r\n"
    )  # fmt: skip
    replies = [await raw.reply() for _ in range(5)]
    assert replies[0].startswith("250 2.1.0") and replies[1].startswith("250 2.1.5"), replies
    assert replies[2] == f"250 2.0.0 {len(c1)} octets received", replies
    assert replies[3].startswith("250 2.0.0 Ok: queued as"), replies
    assert replies[4].startswith("250 2.0.0 Ok"), replies
    raw.close()
    msgs = await queued(gw)
    assert len(msgs) == 1 and msgs[0].sender == "a@example.net"
    body = await _body(gw)
    # no dot-unstuffing, nothing read as a command; a final CRLF is added to a message that lacks one
    assert body.endswith(b"\r\n\r\nQUIT\r\n.\r\nMAIL FROM:<evil@example.net>\r\n..leading dots stay\r\nend\r\n")
    assert body.startswith(b"Received: from c.example")


async def test_bdat_sequence_errors_and_mixing_with_data(mxgate_gateway: Start) -> None:
    gw = await mxgate_gateway(BASE)
    raw = await Raw.connect(gw)
    await raw.cmd("EHLO c.example")
    # without MAIL: 503, and the 4 octets of the chunk are not a command
    raw.send(b"BDAT 6\r\nQUIT\r\n")
    assert (await raw.reply()).startswith("503 5.5.1 Need MAIL")
    assert (await raw.cmd("MAIL FROM:<a@example.net>")).startswith("250")
    raw.send(b"BDAT 6 LAST\r\nRSET\r\n")
    assert (await raw.reply()).startswith("503 5.5.1 Need RCPT")
    # a failed chunk failed the transaction: MAIL again
    await _tx(raw)
    assert (await raw.cmd(b"BDAT 8\r\nSubject:")).startswith("250 2.0.0 8 octets")
    assert (await raw.cmd("DATA")).startswith("503 5.5.1 DATA cannot follow BDAT")
    assert (await raw.cmd(b"BDAT 10 LAST\r\n x\r\n\r\nhi\r\n")).startswith("250 2.0.0 Ok: queued as")
    # BDAT 0 LAST ends a transaction; on its own it is an empty message
    await _tx(raw)
    assert (await raw.cmd(b"BDAT 10\r\nSubject: y")).startswith("250 2.0.0 10 octets")
    assert (await raw.cmd(b"BDAT 0 LAST\r\n")).startswith("250 2.0.0 Ok: queued as")
    # after DATA the transaction is over: BDAT needs MAIL again
    await _tx(raw)
    assert (await raw.cmd("DATA")).startswith("354")
    assert (await raw.cmd(b"Subject: z\r\n\r\nz\r\n.\r\n")).startswith("250 2.0.0 Ok: queued as")
    assert (await raw.cmd(b"BDAT 1 LAST\r\nx")).startswith("503 5.5.1 Need MAIL")
    # RSET drops chunks received so far
    await _tx(raw)
    assert (await raw.cmd(b"BDAT 3\r\nabc")).startswith("250 2.0.0 3 octets")
    assert (await raw.cmd("RSET")).startswith("250")
    assert (await raw.cmd(b"BDAT 1 LAST\r\nx")).startswith("503 5.5.1 Need MAIL")
    raw.close()
    bodies = [await _body(gw, i) for i in range(3)]
    assert bodies[0].endswith(b"\r\nSubject: x\r\n\r\nhi\r\n")
    assert bodies[1].endswith(b"\r\nSubject: y\r\n")
    assert len(await queued(gw)) == 3


async def test_bdat_syntax_error_ends_the_session(mxgate_gateway: Start) -> None:
    gw = await mxgate_gateway(BASE)
    raw = await Raw.connect(gw)
    await raw.cmd("EHLO c.example")
    await _tx(raw)
    raw.send(b"BDAT ten LAST\r\nMAIL FROM:<evil@example.net>\r\n")
    reply = await raw.reply()
    assert reply.startswith("501 5.5.4 Syntax: BDAT"), reply
    assert await raw.closed()
    assert await queued(gw) == []


@pytest.mark.parametrize(
    "vector",
    [b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\n.\n", b"\r\n.\n", b"\n"],
    ids=["LF.CRLF", "CR.CRLF", "CRLF.CR", "LF.LF", "CRLF.LF", "LF"],
)
async def test_bdat_smuggling_vectors_rejected(mxgate_gateway: Start, vector: bytes) -> None:
    gw = await mxgate_gateway(BASE)
    raw = await Raw.connect(gw)
    await raw.cmd("EHLO c.example")
    await _tx(raw)
    # the bare line end is in one chunk, the rest in the next: the assembled message is checked
    c1 = b"Subject: hi\r\n\r\nbody" + vector
    c2 = b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<v@example.org>\r\nDATA\r\nevil\r\n"
    assert (await raw.cmd(b"BDAT %d\r\n" % len(c1) + c1)).startswith("250 2.0.0")
    reply = await raw.cmd(b"BDAT %d LAST\r\n" % len(c2) + c2)
    assert reply.startswith("550 5.6.0"), reply
    assert (await raw.cmd("NOOP")).startswith("250 2.0.0")
    raw.close()
    assert await queued(gw) == []
    rejects = [r for r in read_records(gw.state_dir) if r.event == "REJECT"]
    assert rejects and rejects[0].get("stage") == "data"


async def test_bdat_size_limit_across_chunks(mxgate_gateway: Start) -> None:
    gw = await mxgate_gateway(
        BASE + f'[[listener]]\nname = "smtp"\naddress = "127.0.0.1:{free_port()}"\nmax_message_size = 1000\n'
    )
    raw = await Raw.connect(gw)
    await raw.cmd("EHLO c.example")
    await _tx(raw)
    assert (await raw.cmd(b"BDAT 600\r\n" + b"x" * 600)).startswith("250 2.0.0 600 octets")
    # the second chunk passes the limit: 552 5.3.4, its octets are read and dropped, the transaction is over
    reply = await raw.cmd(b"BDAT 401 LAST\r\n" + b"RSET\r\n" * 66 + b"RSET\r")
    assert reply.startswith("552 5.3.4"), reply
    assert (await raw.cmd(b"BDAT 1 LAST\r\nx")).startswith("503 5.5.1 Need MAIL")
    # a single chunk too big for the limit, sent in pieces
    await _tx(raw)
    raw.send(b"BDAT 5000 LAST\r\n")
    for _ in range(5):
        raw.send(b"y" * 1000)
    assert (await raw.reply()).startswith("552 5.3.4")
    assert (await raw.cmd("NOOP")).startswith("250 2.0.0")
    raw.close()
    assert await queued(gw) == []


def _smtplib_bdat(port: int, chunks: list[bytes]) -> list[tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("py.example")
        assert client.has_extn("chunking") and client.has_extn("pipelining")
        client.mail("py@example.net")
        client.rcpt("u@example.org")
        replies = []
        for i, chunk in enumerate(chunks):
            last = " LAST" if i == len(chunks) - 1 else ""
            client.send(f"BDAT {len(chunk)}{last}\r\n".encode() + chunk)
            replies.append(client.getreply())
        return replies


async def test_bdat_with_smtplib(mxgate_gateway: Start) -> None:
    gw = await mxgate_gateway(BASE)
    chunks = [b"Subject: from smtplib\r\n", b"\r\n", b"line one\r\n.\r\n" * 500, b""]
    replies = await asyncio.to_thread(_smtplib_bdat, gw.smtp_port, chunks)
    assert [code for code, _ in replies] == [250, 250, 250, 250], replies
    assert replies[-1][1].startswith(b"2.0.0 Ok: queued as")
    body = await _body(gw)
    assert body.endswith(b"Subject: from smtplib\r\n\r\n" + b"line one\r\n.\r\n" * 500)
    events = [r.event for r in read_records(gw.state_dir)]
    assert events.count("RECEIVE") == 1
