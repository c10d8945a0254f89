"""The receive side against real clients: swaks (plain, pipelined, STARTTLS, implicit TLS, AUTH, client
certificates) and a raw socket client for smuggling, injection, limits and timeouts."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from smtp_raw import Raw, queued

from mxgate.core.auth import UsersFile
from mxgate.core.hookspecs import hookimpl
from mxgate.core.model import Envelope, IncomingMessage, Reject, Reply, Session, TempFail
from mxgate.core.tracking import read_records
from mxgate.testing.ca import TestCA
from mxgate.testing.gateway import TestGateway

pytestmark = [pytest.mark.integration]

Start = Callable[..., Awaitable[TestGateway]]
BASE = '[server]\naccepted_domains = ["example.org"]\n'
ANON = BASE + '[[inbound_connector]]\nname = "nobody"\nsender_ips = ["192.0.2.0/24"]\n'  # loopback = internet


async def swaks(gw: TestGateway, *args: str, to: str = "rcpt@example.org") -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "swaks", "--server", f"{gw.smtp_host}:{gw.smtp_port}", "--from", "sender@example.net", "--to", to,
        "--timeout", "10", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode("utf-8", "replace")


def tls_config(ca: TestCA, tmp: Any, extra: str = "") -> str:
    leaf = ca.issue(["mx.gateway.test"], directory=tmp)
    return BASE + f'[[listener]]\nname = "smtp"\naddress = "127.0.0.1:{_port()}"\n' \
        f'tls_cert = "{leaf.chain_path}"\ntls_key = "{leaf.key_path}"\n' + extra  # fmt: skip


def _port() -> int:
    from mxgate.testing.gateway import free_port

    return free_port()


# --- swaks --------------------------------------------------------------------------------------------------------


async def test_swaks_plain_and_pipelined(mxgate_gateway: Start) -> None:
    gw = await mxgate_gateway(BASE)
    code, out = await swaks(gw)
    assert code == 0, out
    assert "250-PIPELINING" in out and "250-8BITMIME" in out and "250-SMTPUTF8" in out
    assert "ENHANCEDSTATUSCODES" in out and "SIZE 52428800" in out
    assert "STARTTLS" not in out and "AUTH" not in out.split("MAIL FROM")[0]
    code, out = await swaks(gw, "--pipeline")
    assert code == 0 and "250 2.0.0 Ok: queued as" in out, out
    msgs = await queued(gw)
    assert len(msgs) == 2 and all(m.recipients[0].address == "rcpt@example.org" for m in msgs)
    body = await gw.runtime.queue.body(msgs[0].id)  # type: ignore[union-attr]
    assert body.startswith(b"Received: from ") and b"with ESMTP id" in body
    events = [r.event for r in read_records(gw.state_dir)]
    assert events.count("RECEIVE") == 2


async def test_swaks_starttls_received_header_and_auth(mxgate_gateway: Start, test_ca: TestCA, tmp_path: Any) -> None:
    gw = await mxgate_gateway(tls_config(test_ca, tmp_path))
    UsersFile(gw.state_dir / "users").add("alice", "correct horse")
    # AUTH is not offered, and refused, without TLS
    raw = await Raw.connect(gw)
    ehlo = await raw.cmd("EHLO c.example")
    assert "STARTTLS" in ehlo and "AUTH" not in ehlo
    assert (await raw.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice\0correct horse").decode())).startswith(
        "538 5.7.11"
    )
    raw.close()
    code, out = await swaks(gw, "--tls", "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "correct horse",
                            to="someone@relayed.com")  # fmt: skip
    assert code == 0, out
    assert "235 2.7.0" in out and "queued as" in out
    code, out = await swaks(gw, "--tls", "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", "correct horse")
    assert code == 0 and "235 2.7.0" in out, out
    msgs = await queued(gw)
    body = await gw.runtime.queue.body(msgs[0].id)  # type: ignore[union-attr]
    assert b"(using TLSv1.3 with cipher" in body and b"with ESMTPSA id" in body
    assert msgs[0].meta.auth_user == "alice" and msgs[0].meta.tls_version == "TLSv1.3"
    receive = [r for r in read_records(gw.state_dir) if r.event == "RECEIVE"]
    assert receive[0].get("tls") == "TLSv1.3" and receive[0].get("cipher")


async def test_auth_failures_rate_limited(mxgate_gateway: Start, test_ca: TestCA, tmp_path: Any) -> None:
    gw = await mxgate_gateway(tls_config(test_ca, tmp_path))
    UsersFile(gw.state_dir / "users").add("alice", "right")
    for _ in range(5):
        _code, out = await swaks(gw, "--tls", "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "wrong")
        assert "535 5.7.8" in out, out
    _code, out = await swaks(gw, "--tls", "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "right")
    assert "454 4.7.0" in out and "235" not in out, out


async def test_implicit_tls_and_sni(mxgate_gateway: Start, test_ca: TestCA, tmp_path: Any) -> None:
    other = test_ca.issue(["mx.other.test"], directory=tmp_path / "o" if (tmp_path / "o").mkdir() is None else tmp_path)
    extra = f'implicit_tls = true\n[[listener.sni_certificates]]\nname = "mx.other.test"\n' \
        f'cert = "{other.chain_path}"\nkey = "{other.key_path}"\n'  # fmt: skip
    gw = await mxgate_gateway(tls_config(test_ca, tmp_path, extra))
    code, out = await swaks(gw, "--tlsc")
    assert code == 0 and "queued as" in out, out
    ctx = ssl.create_default_context(cafile=str(test_ca.cert_path))
    for name in ("mx.other.test", "mx.gateway.test"):
        r, w = await asyncio.open_connection(gw.smtp_host, gw.smtp_port, ssl=ctx, server_hostname=name)
        assert (await r.readline()).startswith(b"220 ")
        w.write(b"EHLO c\r\n")
        ehlo = await r.read(4096)
        assert b"STARTTLS" not in ehlo and b"AUTH PLAIN LOGIN" in ehlo
        w.close()


async def test_client_certificate_selects_connector(mxgate_gateway: Start, test_ca: TestCA, tmp_path: Any) -> None:
    client = test_ca.issue(
        ["mail.partner.test"], client=True, directory=tmp_path / "c" if (tmp_path / "c").mkdir() is None else tmp_path
    )
    extra = (
        f'tls_client_ca = "{test_ca.cert_path}"\n'
        '[[inbound_connector]]\nname = "partner"\ntls_sender_certificate_name = "mail.partner.test"\n'
        'sender_domains = ["partner.test"]\nrestrict_domains_to_certificate = true\nmay_relay = true\n'
        '[[inbound_connector]]\nname = "nobody"\nsender_ips = ["192.0.2.0/24"]\n'
    )
    gw = await mxgate_gateway(tls_config(test_ca, tmp_path, extra))
    # without the certificate: the partner's domain is refused with the reason, relaying too
    code, out = await swaks(gw, "--tls", "--from", "a@partner.test")
    assert "550 5.7.1" in out and "certificate" in out, out
    code, out = await swaks(gw, "--tls", to="x@relayed.com")
    assert "550 5.7.1 Relay access denied" in out, out
    code, out = await swaks(gw, "--tls", "--tls-cert", str(client.cert_path), "--tls-key", str(client.key_path),
                            "--from", "a@partner.test", to="x@relayed.com")  # fmt: skip
    assert code == 0 and "queued as" in out, out
    msgs = await queued(gw)
    assert [m.meta.inbound_connector for m in msgs] == ["partner"]


# --- raw socket: smuggling, STARTTLS injection, limits ------------------------------------------------------------


@pytest.mark.parametrize(
    "vector",
    [b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\n.\n", b"\r\n.\n"],
    ids=["LF.CRLF", "CR.CRLF", "CRLF.CR", "LF.LF", "CRLF.LF"],
)
async def test_smuggling_vectors_rejected(mxgate_gateway: Start, vector: bytes) -> None:
    gw = await mxgate_gateway(BASE)
    raw = await Raw.connect(gw)
    await raw.cmd("EHLO c.example")
    assert (await raw.cmd("MAIL FROM:<a@example.net>")).startswith("250")
    assert (await raw.cmd("RCPT TO:<u@example.org>")).startswith("250")
    assert (await raw.cmd("DATA")).startswith("354")
    smuggled = (
        b"Subject: hi\r\n\r\nbody" + vector + b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<v@example.org>\r\nDATA\r\n"
    )
    raw.send(smuggled + b"evil\r\n.\r\n")
    reply = await raw.reply()
    assert reply.startswith("550 5.6.0"), reply
    # the session goes on; the smuggled commands were never executed
    assert (await raw.cmd("NOOP")).startswith("250 2.0.0")
    raw.close()
    assert await queued(gw) == []
    rejects = [r for r in read_records(gw.state_dir) if r.event == "REJECT"]
    assert rejects and rejects[0].get("stage") == "data"


async def test_bare_lf_in_commands(mxgate_gateway: Start) -> None:
    gw = await mxgate_gateway(BASE)
    raw = await Raw.connect(gw)
    assert (await raw.cmd(b"EHLO c.example\n")).startswith("500 5.5.2 Bare CR or LF")
    assert (await raw.cmd(b"NOOP\rMAIL FROM:<a@b.example>\r\n")).startswith("500 5.5.2 Bare CR or LF")
    assert (await raw.cmd("HELO c.example")).startswith("250 ")
    raw.close()


async def test_pipelined_before_starttls_discarded(mxgate_gateway: Start, test_ca: TestCA, tmp_path: Any) -> None:
    gw = await mxgate_gateway(tls_config(test_ca, tmp_path))
    raw = await Raw.connect(gw)
    await raw.cmd("EHLO c.example")
    raw.send(b"STARTTLS\r\nMAIL FROM:<inject@example.net>\r\nRCPT TO:<u@example.org>\r\n")
    assert (await raw.reply()).startswith("220 2.0.0")
    ctx = ssl.create_default_context(cafile=str(test_ca.cert_path))
    await raw.writer.start_tls(ctx, server_hostname="mx.gateway.test")
    # state was forgotten: no EHLO yet, no injected MAIL FROM
    assert (await raw.cmd("RCPT TO:<u@example.org>")).startswith("503 5.5.1")
    assert (await raw.cmd("MAIL FROM:<a@example.net>")).startswith("503 5.5.1 Send EHLO")
    ehlo = await raw.cmd("EHLO c.example")
    assert "STARTTLS" not in ehlo and "AUTH PLAIN LOGIN" in ehlo
    assert (await raw.cmd("MAIL FROM:<a@example.net>")).startswith("250")
    raw.close()


async def test_line_and_size_limits(mxgate_gateway: Start) -> None:
    gw = await mxgate_gateway(
        BASE + f'[[listener]]\nname = "smtp"\naddress = "127.0.0.1:{_port()}"\nmax_message_size = 20000\n'
    )
    raw = await Raw.connect(gw)
    assert (await raw.cmd("NOOP " + "x" * 600)).startswith("500 5.5.2 Line too long")
    assert (await raw.cmd("EHLO c.example")).startswith("250-")
    assert "SIZE 20000" in await raw.cmd("EHLO c.example")
    assert (await raw.cmd("MAIL FROM:<a@example.net> SIZE=20001")).startswith("552 5.3.4")
    for data, expect in (
        (b"x" * 1200 + b"\r\n.\r\n", "500 5.5.2"),
        ((b"y" * 998 + b"\r\n") * 30 + b".\r\n", "552 5.3.4"),
    ):
        await raw.cmd("MAIL FROM:<a@example.net>")
        await raw.cmd("RCPT TO:<u@example.org>")
        assert (await raw.cmd("DATA")).startswith("354")
        raw.send(data)
        assert (await raw.reply()).startswith(expect)
    # a dot-stuffed line of 998 octets + CRLF is fine
    await raw.cmd("MAIL FROM:<a@example.net>")
    await raw.cmd("RCPT TO:<u@example.org>")
    await raw.cmd("DATA")
    raw.send(b"Subject: x\r\n\r\n." + b"." * 998 + b"\r\n..\r\n.\r\n")
    assert "queued as" in await raw.reply()
    raw.close()
    body = await gw.runtime.queue.body((await queued(gw))[0].id)  # type: ignore[union-attr]
    assert body.endswith(b"\r\n\r\n" + b"." * 998 + b"\r\n.\r\n")


async def test_connector_size_limit_with_swaks(mxgate_gateway: Start) -> None:
    """An inbound connector's max_message_size (lower than the listener's) is what its clients are told in SIZE
    and held to: a real client (swaks) gets 552 5.3.4 for a larger message, 250 for a smaller one."""
    gw = await mxgate_gateway(
        BASE + '[[inbound_connector]]\nname = "small"\nsender_ips = ["127.0.0.0/8"]\nmax_message_size = 2000\n'
    )
    code, out = await swaks(gw, "--body", "x" * 3000)
    assert "250-SIZE 2000" in out or "250 SIZE 2000" in out, out
    assert "552 5.3.4" in out and code != 0, out
    code, out = await swaks(gw, "--body", "small enough")
    assert code == 0 and "queued as" in out, out


async def test_syntax_errors_and_error_limit(mxgate_gateway: Start) -> None:
    gw = await mxgate_gateway(BASE + f'[[listener]]\nname = "smtp"\naddress = "127.0.0.1:{_port()}"\nmax_errors = 4\n')
    raw = await Raw.connect(gw)
    await raw.cmd("EHLO c.example")
    assert (await raw.cmd("MAIL FROM:a@example.net")).startswith("501 5.5.4")
    assert (await raw.cmd("MAIL FROM:<a..b@example.net>")).startswith("553 5.1.7 Bad sender address syntax")
    assert (await raw.cmd("XYZZY")).startswith("500 5.5.2")
    assert (await raw.cmd("RCPT TO:<u@example.org>")).startswith("503 5.5.1")
    assert (await raw.reply()).startswith("421 4.7.0 Too many errors")
    assert await raw.closed()


async def test_idle_and_session_timeouts(mxgate_gateway: Start) -> None:
    timeouts = "idle_timeout = 0.5\nsession_timeout = 1.5\n"
    gw = await mxgate_gateway(BASE + f'[[listener]]\nname = "smtp"\naddress = "127.0.0.1:{_port()}"\n{timeouts}')
    raw = await Raw.connect(gw)
    assert (await raw.reply()).startswith("421 4.4.2 Timeout")
    raw.close()
    slow = await Raw.connect(gw)  # a client that drips a byte at a time never exceeds the idle timeout...
    await slow.cmd("EHLO c")
    line = b""
    for _ in range(12):
        slow.send(b"N")
        with contextlib.suppress(TimeoutError):
            line = await asyncio.wait_for(slow.reader.readline(), 0.3)
            break
    assert line.startswith(b"421 4.4.2 Session too long")  # ...but the session timeout ends it
    assert await slow.closed()


async def test_anonymous_relay_refused(mxgate_gateway: Start) -> None:
    gw = await mxgate_gateway(ANON)
    code, out = await swaks(gw, to="victim@elsewhere.com")
    assert "550 5.7.1 Relay access denied" in out, out
    code, out = await swaks(gw)
    assert code == 0, out


# --- plugins ------------------------------------------------------------------------------------------------------


class Agent:
    name = "agent"

    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl
    def mxgate_receive_on_connect(self, session: Session) -> None:
        self.seen.append(f"connect:{session.peer_ip}")

    @hookimpl
    async def mxgate_receive_on_ehlo_command(self, session: Session, hostname: str) -> None:
        self.seen.append(f"ehlo:{hostname}")

    @hookimpl
    def mxgate_receive_on_mail_command(self, session: Session, envelope: Envelope) -> None:
        self.seen.append(f"mail:{session.connector}")

    @hookimpl
    def mxgate_receive_on_rcpt_command(self, envelope: Envelope, rcpt: Any) -> Any:
        if rcpt.local == "reject":
            return Reject(Reply(550, "5.1.1", "No such user here"))
        if rcpt.local == "later":
            return TempFail(Reply(450, "4.2.1", "Mailbox busy"))
        if rcpt.local == "boom":
            raise RuntimeError("plugin bug")
        if rcpt.local == "junk":
            return "250 ok"
        return None

    @hookimpl
    def mxgate_receive_on_end_of_headers(self, message: IncomingMessage) -> None:
        self.seen.append(f"eoh:{message.get_header('Subject')}")

    @hookimpl
    def mxgate_receive_on_end_of_data(self, envelope: Envelope, message: IncomingMessage) -> None:
        message.add_header("X-Agent", f"seen {len(envelope.rcpt_tos)}")

    @hookimpl
    def mxgate_receive_on_disconnect(self, session: Session) -> None:
        self.seen.append("disconnect")


async def test_plugin_verdicts_and_failures(mxgate_gateway: Start) -> None:
    agent = Agent()
    gw = await mxgate_gateway(BASE, extra_plugins=[("agent", agent)])
    raw = await Raw.connect(gw)
    await raw.cmd("EHLO c.example")
    assert (await raw.cmd("MAIL FROM:<a@example.net>")).startswith("250 2.1.0")
    assert (await raw.cmd("RCPT TO:<reject@example.org>")) == "550 5.1.1 No such user here"
    assert (await raw.cmd("RCPT TO:<later@example.org>")) == "450 4.2.1 Mailbox busy"
    assert (await raw.cmd("RCPT TO:<boom@example.org>")).startswith("451 4.3.0")
    assert (await raw.cmd("RCPT TO:<junk@example.org>")).startswith("451 4.3.0")
    assert (await raw.cmd("RCPT TO:<ok@example.org>")).startswith("250 2.1.5")
    await raw.cmd("DATA")
    raw.send(b"Subject: hello\r\n\r\nbody\r\n.\r\n")
    assert "queued as" in await raw.reply()
    assert (await raw.cmd("QUIT")).startswith("221 2.0.0")
    raw.close()
    for _ in range(50):
        if "disconnect" in agent.seen:
            break
        await asyncio.sleep(0.02)
    assert agent.seen == ["connect:127.0.0.1", "ehlo:c.example", "mail:localhost", "eoh:hello", "disconnect"]
    (msg,) = await queued(gw)
    assert [r.address for r in msg.recipients] == ["ok@example.org"]
    body = await gw.runtime.queue.body(msg.id)  # type: ignore[union-attr]
    assert body.startswith(b"X-Agent: seen 1\r\nReceived: ")


async def test_auth_initial_response_may_exceed_512_octets(
    mxgate_gateway: Start, test_ca: TestCA, tmp_path: Any
) -> None:
    gw = await mxgate_gateway(tls_config(test_ca, tmp_path))
    password = "p" * 2000  # RFC 4954 §4: an AUTH command line may be up to 12,288 octets
    UsersFile(gw.state_dir / "users").add("bob", password)
    raw = await Raw.connect(gw)
    await raw.cmd("EHLO c.example")
    assert (await raw.cmd("STARTTLS")).startswith("220 2.0.0")
    await raw.writer.start_tls(
        ssl.create_default_context(cafile=str(test_ca.cert_path)), server_hostname="mx.gateway.test"
    )
    await raw.cmd("EHLO c.example")
    line = "AUTH PLAIN " + base64.b64encode(b"\0bob\0" + password.encode()).decode()
    assert len(line) > 2600
    assert (await raw.cmd(line)).startswith("235 2.7.0")
    # every other command keeps the 512-octet limit, and so does AUTH past 12,288
    assert (await raw.cmd("NOOP " + "x" * 600)).startswith("500 5.5.2 Line too long")
    assert (await raw.cmd("AUTH PLAIN " + "A" * 13_000)).startswith("500 5.5.2 Line too long")
    assert (await raw.cmd("NOOP")).startswith("250")
    raw.close()


async def test_http_request_at_the_smtp_port_ends_the_session(mxgate_gateway: Start) -> None:
    gw = await mxgate_gateway(BASE)
    for request in (b"GET / HTTP/1.1\r\nHost: mx\r\n\r\n", b"CONNECT mx.example:25 HTTP/1.1\r\n\r\n"):
        raw = await Raw.connect(gw)
        assert (await raw.cmd(request)).startswith("221 2.7.0 This is an SMTP server")
        assert await raw.reply() == "<EOF>"  # closed at once: the header lines are never read as commands
        raw.close()
    rejects = [r for r in read_records(gw.state_dir) if r.event == "REJECT"]
    assert [(r.get("stage"), r.get("command")) for r in rejects] == [("connect", "GET"), ("connect", "CONNECT")]
    # an unknown verb is still just an error
    raw = await Raw.connect(gw)
    assert (await raw.cmd("FOO bar")).startswith("500 5.5.2")
    assert (await raw.cmd("NOOP")).startswith("250")
    raw.close()
