"""SMTP extensions on the receive side against real clients: CHUNKING/BDAT (RFC 3030) with a raw socket client
and Python's smtplib."""

from __future__ import annotations

import asyncio
import importlib
import os
import smtplib
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from smtp_raw import Raw, queued

from mxgate.core.hookspecs import hookimpl
from mxgate.core.messages import MessageOptions
from mxgate.core.model import DsnRet, Envelope, ReverseDnsStatus, Session
from mxgate.core.tracking import read_records
from mxgate.testing.ca import TestCA
from mxgate.testing.dnslab import DnsLab, ScriptedDnsServer
from mxgate.testing.gateway import TestGateway, free_port

pytestmark = [pytest.mark.integration]

BASE = '[server]\naccepted_domains = ["example.org"]\n'


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
    assert "\n250-CHUNKING\n" in await raw.cmd("EHLO c.example")
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


# --- DSN (RFC 3461) and REQUIRETLS (RFC 8689) -----------------------------------------------------------------


class EnvelopeSpy:
    name = "envelope_spy"

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    @hookimpl
    def mxgate_receive_on_end_of_data(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)


def _tls_config(ca: TestCA, tmp: Path) -> str:
    leaf = ca.issue(["mx.gateway.test"], directory=tmp)
    return BASE + f'[[listener]]\nname = "smtp"\naddress = "127.0.0.1:{free_port()}"\n' \
        f'tls_cert = "{leaf.chain_path}"\ntls_key = "{leaf.key_path}"\n'  # fmt: skip


async def test_dsn_parameters_kept_with_the_message_and_seen_by_plugins(mxgate_gateway: Start) -> None:
    spy = EnvelopeSpy()
    gw = await mxgate_gateway(BASE, extra_plugins=[("envelope_spy", spy)])
    raw = await Raw.connect(gw)
    ehlo = await raw.cmd("EHLO c.example")
    assert "\n250 DSN" in ehlo and "REQUIRETLS" not in ehlo
    assert (await raw.cmd("MAIL FROM:<a@example.net> RET=HDRS ENVID=Q+2B1")).startswith("250 2.1.0")
    assert (await raw.cmd("RCPT TO:<u@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;U+2Bx@example.org")).startswith(
        "250 2.1.5"
    )
    assert (await raw.cmd("RCPT TO:<v@example.org> NOTIFY=NEVER")).startswith("250 2.1.5")
    assert (await raw.cmd("RCPT TO:<w@example.org>")).startswith("250 2.1.5")
    assert (await raw.cmd("RCPT TO:<x@example.org> NOTIFY=NEVER,SUCCESS")).startswith("501 5.5.4")
    assert (await raw.cmd(b"BDAT 19 LAST\r\nSubject: dsn\r\n\r\nx\r\n")).startswith("250 2.0.0 Ok: queued as")
    # bad values and REQUIRETLS without TLS
    assert (await raw.cmd("MAIL FROM:<a@example.net> ENVID=bad+zz")).startswith("501 5.5.4")
    assert (await raw.cmd("MAIL FROM:<a@example.net> RET=ALL")).startswith("501 5.5.4")
    assert (await raw.cmd("MAIL FROM:<a@example.net> REQUIRETLS")).startswith("530 5.7.10")
    raw.close()
    (msg,) = await queued(gw)
    assert msg.options == MessageOptions(DsnRet.HDRS, "Q+1", requiretls=False)
    by = {r.address: (r.dsn_notify, r.orcpt) for r in msg.recipients}
    assert by == {
        "u@example.org": ("FAILURE,DELAY", "rfc822;U+x@example.org"),
        "v@example.org": ("NEVER", None),
        "w@example.org": (None, None),
    }
    (env,) = spy.envelopes
    assert (env.dsn_ret, env.envid, env.requiretls) == (DsnRet.HDRS, "Q+1", False)
    assert [d.notify_text for d in env.rcpt_dsn] == ["FAILURE,DELAY", "NEVER", None]


async def test_requiretls_only_over_tls_and_kept(mxgate_gateway: Start, test_ca: TestCA, tmp_path: Path) -> None:
    spy = EnvelopeSpy()
    gw = await mxgate_gateway(_tls_config(test_ca, tmp_path), extra_plugins=[("envelope_spy", spy)])
    raw = await Raw.connect(gw)
    assert "REQUIRETLS" not in await raw.cmd("EHLO c.example")
    refused = await raw.cmd("MAIL FROM:<a@example.net> REQUIRETLS")
    assert refused.startswith("530 5.7.10"), refused
    assert (await raw.cmd("STARTTLS")).startswith("220 2.0.0")
    ctx = ssl.create_default_context(cafile=str(test_ca.cert_path))
    await raw.writer.start_tls(ctx, server_hostname="mx.gateway.test")
    assert "\n250-REQUIRETLS\n" in await raw.cmd("EHLO c.example")
    assert (await raw.cmd("MAIL FROM:<a@example.net> REQUIRETLS")).startswith("250 2.1.0")
    assert (await raw.cmd("RCPT TO:<u@example.org>")).startswith("250 2.1.5")
    assert (await raw.cmd("DATA")).startswith("354")
    assert "queued as" in await raw.cmd(b"Subject: rt\r\n\r\nx\r\n.\r\n")
    raw.close()
    (msg,) = await queued(gw)
    assert msg.requiretls and msg.options.requiretls
    assert spy.envelopes[0].requiretls


REPO = Path(__file__).resolve().parents[2]


def _postfix(relay_port: int) -> Any:
    """A relay-only Postfix (bench/'s harness) relaying everything to mxgate on ``relay_port``."""
    if os.geteuid() != 0 or not os.access("/usr/sbin/postfix", os.X_OK):
        pytest.fail("starts its own Postfix: needs root and postfix (`make deps`)")
    sys.path.insert(0, str(REPO / "bench"))
    try:
        postfix = importlib.import_module("benchkit.postfix")
        procs = importlib.import_module("benchkit.procs")
    finally:
        sys.path.remove(str(REPO / "bench"))
    return postfix.PostfixInstance(procs.ProcGroup("ext"), relay_port=relay_port).start()


def _send_with_dsn(port: int, message: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("py.example")
        assert client.has_extn("dsn")
        client.sendmail(
            "pf@example.net",
            ["u@example.org"],
            message,
            mail_options=["RET=HDRS", "ENVID=pf+2Benv"],
            rcpt_options=["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;U+2Borig@example.org"],
        )


async def test_dsn_parameters_from_postfix_smtp_client(mxgate_gateway: Start) -> None:
    """Postfix's smtp client passes RET, ENVID, NOTIFY and ORCPT on to a next hop that offers DSN: a real peer's
    encoding of them is parsed and kept. (Postfix 3.7's smtp client never sends BDAT -- Postfix implements
    CHUNKING only in its server -- so BDAT is tested with smtplib and raw clients above.)"""
    gw = await mxgate_gateway(BASE)
    pf = await asyncio.to_thread(_postfix, gw.smtp_port)
    try:
        text = b"Subject: via postfix\r\nMessage-ID: <pf-dsn@example.net>\r\n\r\n" + b".dot line\r\nbody\r\n" * 200
        await asyncio.to_thread(_send_with_dsn, pf.port, text)
        deadline = asyncio.get_running_loop().time() + 30
        while not await queued(gw):
            assert asyncio.get_running_loop().time() < deadline, pf.log_tail()
            await asyncio.sleep(0.1)
    finally:
        await asyncio.to_thread(pf.stop)
    (msg,) = await queued(gw)
    assert msg.message_id == "<pf-dsn@example.net>"
    assert msg.options == MessageOptions(DsnRet.HDRS, "pf+env")
    (rcpt,) = msg.recipients
    assert (rcpt.dsn_notify, rcpt.orcpt) == ("FAILURE,DELAY", "rfc822;U+orig@example.org")
    body = await _body(gw)
    assert body.startswith(b"Received: from postfix.bench.test") and body.endswith(b".dot line\r\nbody\r\n" * 200)


async def test_receive_worker_channel_carries_dsn_and_requiretls(mxgate_gateway: Start) -> None:
    """``server.receive_workers``: a worker hands its messages to the main process over a socket; the DSN
    parameters and REQUIRETLS travel with them (both ends of the real channel, the main process's real queue)."""
    from mxgate.core.messages import NewRecipient
    from mxgate.core.workers import ReceiveWorkers, _Channel, _read_frame, _Worker

    gw = await mxgate_gateway(BASE)
    a, b = socket.socketpair()
    worker_reader, worker_writer = await asyncio.open_unix_connection(sock=a)
    main_reader, main_writer = await asyncio.open_unix_connection(sock=b)
    channel = _Channel(worker_reader, worker_writer)
    answers = asyncio.ensure_future(channel.read_answers())
    main = ReceiveWorkers(gw.runtime, None, (), 0)  # type: ignore[arg-type]
    worker = _Worker(0, None, main_reader, main_writer)  # type: ignore[arg-type]

    async def serve() -> None:
        frame = await _read_frame(main_reader)
        assert frame is not None and frame[0] == b"P"
        await main._put(worker, frame[1])

    served = asyncio.ensure_future(serve())
    options = MessageOptions(DsnRet.FULL, "E 1", requiretls=True)
    rcpts = [NewRecipient("u@example.org", "NEVER", "rfc822;U@example.org"), "v@example.org"]
    try:
        qid = await asyncio.wait_for(
            channel.submit("a@example.net", rcpts, b"Subject: w\r\n\r\nw\r\n", now=1.0, options=options), 10
        )
        await asyncio.wait_for(served, 10)
    finally:
        worker_writer.close()
        main_writer.close()
        await asyncio.wait_for(answers, 10)
    msg = await gw.runtime.queue.get(qid)  # type: ignore[union-attr]
    assert msg is not None and msg.options == options
    assert [(r.address, r.dsn_notify, r.orcpt) for r in msg.recipients] == [
        ("u@example.org", "NEVER", "rfc822;U@example.org"),
        ("v@example.org", None, None),
    ]


# --- reverse DNS of the client (FCrDNS) -----------------------------------------------------------------------


class SessionSpy:
    name = "session_spy"

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}

    @hookimpl
    def mxgate_receive_on_ehlo_command(self, session: Session, hostname: str) -> None:
        self.sessions[hostname] = session


async def _send_from(gw: TestGateway, source: str, helo: str) -> str:
    r, w = await asyncio.open_connection(gw.smtp_host, gw.smtp_port, local_addr=(source, 0))
    raw = Raw(r, w)
    assert (await raw.reply()).startswith("220 ")
    assert (await raw.cmd(f"EHLO {helo}")).startswith("250")
    await _tx(raw)
    assert (await raw.cmd("DATA")).startswith("354")
    reply = await raw.cmd(f"Subject: {helo}\r\n\r\nx\r\n.\r\n".encode())
    assert "queued as" in reply, reply
    raw.close()
    return reply.rsplit(" ", 1)[-1]


async def test_reverse_dns_in_received_tracking_and_session(
    mxgate_gateway: Start, dnslab_factory: Callable[..., DnsLab]
) -> None:
    """Against the DNS lab (nsd + unbound, a reverse zone for 127/8): verified, unverified, no PTR, a failed
    forward lookup."""
    lab = dnslab_factory()
    z = lab.zone("clients.test")
    z.add("good", "A", "127.0.0.1")
    z.add("liar", "A", "127.0.0.99")
    lab.unreachable("dead.test")
    rev = lab.reverse_zone("127.in-addr.arpa")
    rev.add("1.0.0", "PTR", "good.clients.test.")
    rev.add("2.0.0", "PTR", "liar.clients.test.")
    rev.add("4.0.0", "PTR", "host.dead.test.")  # 127.0.0.3: no PTR
    endpoint = lab.start()
    spy = SessionSpy()
    gw = await mxgate_gateway(
        BASE + f'[dns]\nresolvers = ["{endpoint}"]\ntimeout = 5.0\n'
        f'[[listener]]\nname = "smtp"\naddress = "127.0.0.1:{free_port()}"\nreverse_dns_timeout = 10.0\n',
        extra_plugins=[("session_spy", spy)],
    )
    ids = {}
    for source, helo in (("127.0.0.1", "one"), ("127.0.0.2", "two"), ("127.0.0.3", "three")):
        ids[helo] = await _send_from(gw, source, helo)
    # a PTR whose forward lookup fails (its zone's server is unreachable): "unknown", status failed
    r, w = await asyncio.open_connection(gw.smtp_host, gw.smtp_port, local_addr=("127.0.0.4", 0))
    failing = Raw(r, w)
    assert (await failing.reply()).startswith("220 ")
    assert (await failing.cmd("EHLO four")).startswith("250")
    failing.close()

    seen = {h: (s.reverse_dns, s.reverse_dns_status) for h, s in spy.sessions.items()}
    assert seen == {
        "one": ("good.clients.test", ReverseDnsStatus.VERIFIED),
        "two": (None, ReverseDnsStatus.UNVERIFIED),
        "three": (None, ReverseDnsStatus.NONE),
        "four": (None, ReverseDnsStatus.FAILED),
    }
    msgs = {m.id: m for m in await queued(gw)}
    bodies = {h: await gw.runtime.queue.body(msgs[q].id) for h, q in ids.items()}  # type: ignore[union-attr]
    assert bodies["one"].startswith(b"Received: from one (good.clients.test [127.0.0.1])\r\n")
    assert bodies["two"].startswith(b"Received: from two (unknown [127.0.0.2])\r\n")
    assert bodies["three"].startswith(b"Received: from three (unknown [127.0.0.3])\r\n")
    receive = {r.get("helo"): r for r in read_records(gw.state_dir) if r.event == "RECEIVE"}
    assert (receive["one"].get("client_name"), receive["one"].get("client_rdns")) == ("good.clients.test", "verified")
    assert (receive["two"].get("client_name"), receive["two"].get("client_rdns")) == (None, "unverified")
    assert receive["three"].get("client_rdns") == "none"


async def test_reverse_dns_never_delays_the_banner_and_ehlo_waits_at_most_the_bound(mxgate_gateway: Start) -> None:
    """A resolver that never answers: the banner comes at once, EHLO after about reverse_dns_timeout, and the
    client is "unknown" (status failed)."""
    spy = SessionSpy()
    async with ScriptedDnsServer(lambda q: None) as silent:
        gw = await mxgate_gateway(
            BASE + f'[dns]\nresolvers = ["{silent.endpoint()}"]\ntimeout = 30.0\n'
            f'[[listener]]\nname = "smtp"\naddress = "127.0.0.1:{free_port()}"\nreverse_dns_timeout = 1.5\n',
            extra_plugins=[("session_spy", spy)],
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        raw = await Raw.connect(gw, greet=False)
        assert (await raw.reply()).startswith("220 ")
        banner_after = loop.time() - started
        assert (await raw.cmd("EHLO slow")).startswith("250")
        ehlo_after = loop.time() - started
        assert (await raw.cmd("EHLO again")).startswith("250")  # settled: no second wait
        again_after = loop.time() - started - ehlo_after
        raw.close()
        assert silent.queries  # the PTR query was sent
    assert banner_after < 1.0, banner_after  # far below the 1.5 s bound, even at half speed
    assert 1.2 <= ehlo_after < 4.0, ehlo_after  # the bound (from connect), plus room for a slow machine
    assert again_after < 1.0, again_after
    slow = spy.sessions["slow"]
    assert (slow.reverse_dns, slow.reverse_dns_status) == (None, ReverseDnsStatus.FAILED)
