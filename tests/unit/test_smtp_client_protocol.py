"""The SMTP client against scripted servers on loopback: reply parsing, HELO fallback, pipelining, dot-stuffing,
and the RFC 3207 §4.2 rule that whatever follows the 220 to STARTTLS is discarded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from mxgate.core import tls
from mxgate.core.smtp.client import (
    SmtpClient,
    SmtpConnectionError,
    SmtpProtocolError,
    SmtpReply,
    StaleSession,
    dot_stuff,
    parse_enhanced,
)
from mxgate.testing.ca import TestCA

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(script: Script) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(script, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], Awaitable[int]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> int:
        server, port = await _serve(script)
        servers.append(server)
        return port

    yield start
    for s in servers:
        s.close()


async def _line(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readline(), 5)


def test_parse_enhanced_only_when_class_matches() -> None:
    assert parse_enhanced(550, "5.1.1 no such user") == ("5.1.1", "no such user")
    assert parse_enhanced(550, "4.1.1 mismatched class") == (None, "4.1.1 mismatched class")
    assert parse_enhanced(250, "ok") == (None, "ok")
    reply = SmtpReply.parse(451, ["4.7.1 greylisted", "4.7.1 come back later"])
    assert reply.status == "4.7.1"
    assert reply.text == "greylisted come back later"
    assert str(reply) == "451 4.7.1 greylisted come back later"
    assert SmtpReply.parse(554, ["no enhanced code"]).status == "5.0.0"


def test_dot_stuffing_and_line_ends() -> None:
    assert dot_stuff(b"a\r\n.b\r\n..c\n") == b"a\r\n..b\r\n...c\r\n"
    assert dot_stuff(b"no final newline") == b"no final newline\r\n"
    # bare CR and LF never survive: nothing we relay can end DATA early (smuggling)
    assert dot_stuff(b"x\n.\ny\rz") == b"x\r\n..\r\ny\r\nz\r\n"
    # the fast path (clean CRLF lines, no leading dot) must give exactly what the general one gives
    assert dot_stuff(b"") == b""
    assert dot_stuff(b"a\r\nb\r\n") == b"a\r\nb\r\n"
    assert dot_stuff(b".a\r\n") == b"..a\r\n" and dot_stuff(b"a\r\n\r\n.") == b"a\r\n\r\n..\r\n"
    assert dot_stuff(b"a\r\r\n") == b"a\r\n\r\n" and dot_stuff(b"a\n\r\n") == b"a\r\n\r\n"


async def test_helo_fallback_and_multiline_banner(scripted: Callable[[Script], Awaitable[int]]) -> None:
    seen: list[bytes] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220-old.example ESMTP\r\n220 second line\r\n")
        seen.append(await _line(r))
        w.write(b"502 5.5.1 EHLO not implemented\r\n")
        seen.append(await _line(r))
        w.write(b"250 old.example\r\n")
        seen.append(await _line(r))
        w.write(b"221 bye\r\n")
        await w.drain()
        w.close()

    port = await scripted(script)
    client = await SmtpClient.connect("127.0.0.1", port, timeout=5)
    assert client.banner is not None and client.banner.code == 220 and len(client.banner.lines) == 2
    reply = await client.ehlo("me.example")
    assert reply.code == 250 and not client.esmtp and client.extensions == {}
    assert client.peer_ehlo_name == "old.example"
    await client.quit()
    assert seen == [b"EHLO me.example\r\n", b"HELO me.example\r\n", b"QUIT\r\n"]


async def test_pipelined_envelope_in_one_write(scripted: Callable[[Script], Awaitable[int]]) -> None:
    got: list[bytes] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 mx ESMTP\r\n")
        await _line(r)
        w.write(b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n")
        await w.drain()
        # the whole group arrives before we answer anything: proof that it was pipelined
        for _ in range(4):
            got.append(await _line(r))
        w.write(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 unknown\r\n354 go\r\n")
        await w.drain()
        body = b""
        while not body.endswith(b"\r\n.\r\n"):
            line = await _line(r)
            assert line, f"EOF inside the message: {body!r}"
            body += line
        got.append(body)
        w.write(b"250 2.0.0 queued\r\n")
        await _line(r)
        w.write(b"221 bye\r\n")
        await w.drain()
        w.close()

    port = await scripted(script)
    client = await SmtpClient.connect("127.0.0.1", port, timeout=5)
    await client.ehlo("me.example")
    assert client.supports("pipelining") and client.size_limit == 1000
    mail, rcpts, data = await client.envelope("a@x.test", ["SIZE=10"], ["b@y.test", "c@y.test"])
    assert mail.code == 250 and [r.code for r in rcpts] == [250, 550] and data is not None and data.code == 354
    assert rcpts[1].status == "5.1.1"
    final = await client.send_data(b"Subject: t\r\n\r\n.dot\r\n")
    assert final.code == 250
    await client.quit()
    assert got[:4] == [
        b"MAIL FROM:<a@x.test> SIZE=10\r\n",
        b"RCPT TO:<b@y.test>\r\n",
        b"RCPT TO:<c@y.test>\r\n",
        b"DATA\r\n",
    ]
    assert got[4] == b"Subject: t\r\n\r\n..dot\r\n.\r\n"


async def test_garbage_and_silence_are_errors(scripted: Callable[[Script], Awaitable[int]]) -> None:
    async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 400 Bad Request\r\n")
        await w.drain()

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(2)

    with pytest.raises(SmtpProtocolError):
        await SmtpClient.connect("127.0.0.1", await scripted(garbage), timeout=2)
    with pytest.raises(SmtpConnectionError, match="timed out"):
        await SmtpClient.connect("127.0.0.1", await scripted(silent), timeout=0.2)


async def test_starttls_discards_injected_response(
    scripted: Callable[[Script], Awaitable[int]], tmp_path: Path
) -> None:
    """RFC 3207 §4.2: a reply smuggled after "220 ready" must never be read as the answer to our EHLO."""
    ca = TestCA.create(tmp_path)
    leaf = ca.issue(["mx.example"])
    server_ctx = tls.server_context(leaf.chain_path, leaf.key_path)
    ehlo_after_tls: list[bytes] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 mx ESMTP\r\n")
        await _line(r)
        w.write(b"250-mx.example\r\n250 STARTTLS\r\n")
        await _line(r)  # STARTTLS
        w.write(b"220 2.0.0 ready\r\n250-injected.example\r\n250 AUTH PLAIN\r\n")  # one segment
        await w.drain()
        await w.start_tls(server_ctx)
        ehlo_after_tls.append(await _line(r))
        w.write(b"250-mx.example\r\n250 PIPELINING\r\n")
        await _line(r)
        w.write(b"221 bye\r\n")
        await w.drain()
        w.close()

    port = await scripted(script)
    client = await SmtpClient.connect("127.0.0.1", port, timeout=5)
    await client.ehlo("me.example")
    await asyncio.sleep(0.05)  # let the injected bytes arrive together with the 220
    reply = await client.starttls(tls.client_context(verify=False), "mx.example")
    assert reply.code == 220
    assert client.tls and client.discarded_after_starttls > 0
    ehlo = await client.ehlo("me.example")
    assert ehlo_after_tls == [b"EHLO me.example\r\n"]
    assert ehlo.lines[0] == "mx.example"
    assert client.supports("PIPELINING") and not client.supports("AUTH")
    assert client.ssl_object is not None and client.ssl_object.version() in ("TLSv1.2", "TLSv1.3")
    chain = tls.peer_chain(client.ssl_object)
    assert chain and chain[0].serial_number == leaf.cert.serial_number
    await client.quit()


async def test_handshake_failure_raises_connection_error(scripted: Callable[[Script], Awaitable[int]]) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 mx ESMTP\r\n")
        await _line(r)
        w.write(b"250-mx.example\r\n250 STARTTLS\r\n")
        await _line(r)
        w.write(b"220 ready\r\nthis is not TLS\r\n" * 3)
        await w.drain()
        await asyncio.sleep(0.2)
        w.close()

    port = await scripted(script)
    client = await SmtpClient.connect("127.0.0.1", port, timeout=2)
    await client.ehlo("me.example")
    with pytest.raises(SmtpConnectionError, match="TLS handshake failed"):
        await client.starttls(tls.client_context(verify=False), "mx.example")
    assert not client.tls


async def test_bdat_without_pipelining_waits_for_each_reply_and_stops_at_a_refusal(
    scripted: Callable[[Script], Awaitable[int]],
) -> None:
    """RFC 3030 without PIPELINING: MAIL and RCPT answered one by one; then each chunk (exact byte count, bytes
    as they are, no dot-stuffing, no end-of-data line) waits for its reply; a refused chunk ends the transaction
    (its reply is the final one); no chunk at all when no recipient was accepted."""
    got: list[bytes] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 peer ESMTP\r\n")
        await _line(r)
        w.write(b"250-peer\r\n250 CHUNKING\r\n")
        for reply in (b"250 ok\r\n", b"250 ok\r\n"):  # MAIL, RCPT (each before the next command)
            got.append(await _line(r))
            w.write(reply)
        for reply in (b"250 2.0.0 chunk\r\n", b"552 5.3.4 too big\r\n"):
            header = await _line(r)
            got.append(header)
            got.append(await asyncio.wait_for(r.readexactly(int(header.split()[1])), 5))
            w.write(reply)
        got.append(await _line(r))  # MAIL of the second transaction
        w.write(b"250 ok\r\n")
        got.append(await _line(r))
        w.write(b"550 5.1.1 nobody\r\n")
        got.append(await _line(r))
        w.write(b"221 bye\r\n")
        await w.drain()
        w.close()

    port = await scripted(script)
    client = await SmtpClient.connect("127.0.0.1", port, timeout=5)
    await client.ehlo("me.example")
    data = b".dot\r\n" + b"x" * 10
    mail, rcpts, final = await client.envelope_bdat("a@x.test", [], ["b@y.test"], data * 2, chunk_size=len(data))
    assert (mail.code, [r.code for r in rcpts]) == (250, [250])
    assert final is not None and (final.code, final.status) == (552, "5.3.4")
    assert got[:6] == [
        b"MAIL FROM:<a@x.test>\r\n",
        b"RCPT TO:<b@y.test>\r\n",
        f"BDAT {len(data)}\r\n".encode(),
        data,
        f"BDAT {len(data)} LAST\r\n".encode(),
        data,
    ]
    mail, rcpts, final = await client.envelope_bdat("a@x.test", [], ["n@y.test"], data)
    assert [r.code for r in rcpts] == [550] and final is None
    await client.quit()
    assert got[6:] == [b"MAIL FROM:<a@x.test>\r\n", b"RCPT TO:<n@y.test>\r\n", b"QUIT\r\n"]


async def test_reset_goes_in_front_of_the_pipelined_group(scripted: Callable[[Script], Awaitable[int]]) -> None:
    """A reused session's liveness check: RSET in the same write as MAIL/RCPT/DATA (RFC 2920 §3.1); a 250 lets
    the transaction count; anything else raises StaleSession, whatever the rest of the group was answered."""
    got: list[bytes] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 mx ESMTP\r\n")
        await _line(r)
        w.write(b"250-mx.example\r\n250 PIPELINING\r\n")
        await w.drain()
        for answers in (b"250 2.0.0 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n", b"421 4.3.2 going away\r\n" * 4):
            for _ in range(4):  # the whole group before any answer: one write
                got.append(await _line(r))
            w.write(answers)
            await w.drain()
            if answers.startswith(b"250"):
                while await _line(r) != b".\r\n":
                    pass
                w.write(b"250 2.0.0 queued\r\n")
                await w.drain()
        await _line(r)
        w.close()

    port = await scripted(script)
    client = await SmtpClient.connect("127.0.0.1", port, timeout=5)
    await client.ehlo("me.example")
    mail, rcpts, data = await client.envelope("a@x.test", [], ["b@y.test"], reset=True, reset_timeout=5)
    assert mail.code == 250 and [r.code for r in rcpts] == [250] and data is not None and data.code == 354
    assert (await client.send_data(b"Subject: t\r\n\r\nbody\r\n")).code == 250
    with pytest.raises(StaleSession, match="RSET answered 421"):
        await client.envelope("a@x.test", [], ["b@y.test"], reset=True, reset_timeout=5)
    client.abort()
    group = [b"RSET\r\n", b"MAIL FROM:<a@x.test>\r\n", b"RCPT TO:<b@y.test>\r\n", b"DATA\r\n"]
    assert got == group * 2
    start = client.transcript.index("C: RSET")
    assert client.transcript[start : start + 5] == [
        "C: RSET",
        "C: MAIL FROM:<a@x.test>",
        "C: RCPT TO:<b@y.test>",
        "C: DATA",
        "S: 250 2.0.0 reset",
    ]


async def test_reset_without_pipelining_and_on_a_dead_session(scripted: Callable[[Script], Awaitable[int]]) -> None:
    """No PIPELINING: RSET waits for its 250 before MAIL (BDAT alike). A session the peer dropped raises
    StaleSession, not a transaction failure."""
    got: list[bytes] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 mx ESMTP\r\n")
        await _line(r)
        w.write(b"250-mx.example\r\n250 CHUNKING\r\n")
        for reply in (b"250 reset\r\n", b"250 ok\r\n", b"250 ok\r\n"):  # RSET, MAIL, RCPT
            got.append(await _line(r))
            w.write(reply)
        header = await _line(r)
        got.append(header)
        await asyncio.wait_for(r.readexactly(int(header.split()[1])), 5)
        w.write(b"250 2.0.0 queued\r\n")
        await w.drain()
        w.close()  # dropped while idle

    port = await scripted(script)
    client = await SmtpClient.connect("127.0.0.1", port, timeout=5)
    await client.ehlo("me.example")
    mail, rcpts, final = await client.envelope_bdat("a@x.test", [], ["b@y.test"], b"x\r\n", reset=True)
    assert mail.code == 250 and [r.code for r in rcpts] == [250] and final is not None and final.code == 250
    assert got == [b"RSET\r\n", b"MAIL FROM:<a@x.test>\r\n", b"RCPT TO:<b@y.test>\r\n", b"BDAT 3 LAST\r\n"]
    for _ in range(100):  # until the EOF arrived (bounded)
        if client.closed:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(StaleSession):
        await client.envelope_bdat("a@x.test", [], ["b@y.test"], b"x\r\n", reset=True, reset_timeout=2)
    client.abort()
