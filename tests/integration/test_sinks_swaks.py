"""The SMTP sinks against real clients: swaks, smtplib, and Postfix's smtp-sink as a server."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Callable

import pytest

from mxgate.core import tls
from mxgate.testing.ca import IssueCert, IssuedCert, TestCA
from mxgate.testing.sinks import PostfixSink, SinkFactory, SmtpSink, ThreadedSmtpSink

pytestmark = [
    pytest.mark.integration,
]

SWAKS_TIMEOUT = 30.0


async def swaks(host: str, port: int, *args: str, to: str = "rcpt@example.org") -> tuple[int, str]:
    """Run swaks without blocking the loop the sink runs on; (exit code, transcript)."""
    proc = await asyncio.create_subprocess_exec(
        "swaks",
        "--server",
        f"{host}:{port}" if ":" not in host else f"[{host}]:{port}",
        "--from",
        "sender@example.net",
        "--to",
        to,
        "--helo",
        "client.example.net",
        "--timeout",
        "10",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), SWAKS_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def sink_cert(test_ca: TestCA) -> IssuedCert:
    return test_ca.intermediate("sink intermediate").issue(["sink.mxgate.test", "mx.sink.test"])


async def test_plain_message(smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink()
    code, out = await swaks(sink.host, sink.port, "--header", "Subject: plain")
    assert code == 0, out
    (msg,) = await sink.wait_for(1)
    assert msg.mail_from == "sender@example.net"
    assert msg.rcpt_tos == ("rcpt@example.org",)
    assert b"Subject: plain\r\n" in msg.data
    assert msg.tls_version is None and msg.cipher is None and msg.sni is None
    assert msg.helo == "client.example.net"
    assert msg.peer is not None and msg.peer[0] == "127.0.0.1"
    assert "STARTTLS" not in out  # no certificate: not offered


async def test_starttls_message_records_tls_and_sni(smtp_sink: SinkFactory, sink_cert: IssuedCert) -> None:
    sink = await smtp_sink(tls=sink_cert, hostname="mx.sink.test")
    code, out = await swaks(sink.host, sink.port, "--tls", "--tls-sni", "mx.sink.test")
    assert code == 0, out
    assert "220 mx.sink.test" in out
    (msg,) = await sink.wait_for(1)
    assert msg.tls_version in ("TLSv1.3", "TLSv1.2")
    assert msg.cipher
    assert msg.sni == "mx.sink.test"


async def test_starttls_verified_by_swaks_against_the_test_ca(
    smtp_sink: SinkFactory, sink_cert: IssuedCert, test_ca: TestCA
) -> None:
    sink = await smtp_sink(tls=sink_cert)
    code, out = await swaks(
        sink.host,
        sink.port,
        "--tls",
        "--tls-verify",
        "--tls-ca-path",
        str(test_ca.cert_path),
        "--tls-sni",
        "sink.mxgate.test",
        "--tls-protocol",
        "tlsv1_2",
    )
    assert code == 0, out
    (msg,) = await sink.wait_for(1)
    assert msg.tls_version == "TLSv1.2"


async def test_starttls_not_offered_when_disabled(smtp_sink: SinkFactory, sink_cert: IssuedCert) -> None:
    sink = await smtp_sink(tls=sink_cert, starttls=False)
    code, out = await swaks(sink.host, sink.port, "--tls")
    assert code == 29, out  # swaks: "error in TLS transaction" (not advertised)
    assert not sink.messages
    code, out = await swaks(sink.host, sink.port)
    assert code == 0, out
    assert (await sink.wait_for(1))[0].tls_version is None


async def test_implicit_tls(smtp_sink: SinkFactory, sink_cert: IssuedCert) -> None:
    sink = await smtp_sink(tls=sink_cert, implicit_tls=True)
    code, out = await swaks(sink.host, sink.port, "--tls-on-connect", "--tls-sni", "sink.mxgate.test")
    assert code == 0, out
    (msg,) = await sink.wait_for(1)
    assert msg.tls_version is not None and msg.sni == "sink.mxgate.test"


async def test_require_tls(smtp_sink: SinkFactory, sink_cert: IssuedCert) -> None:
    sink = await smtp_sink(tls=sink_cert, require_tls=True)
    code, out = await swaks(sink.host, sink.port)
    assert code == 23, out
    assert "530" in out
    code, out = await swaks(sink.host, sink.port, "--tls")
    assert code == 0, out
    assert len(await sink.wait_for(1)) == 1


async def test_sni_map_through_swaks(smtp_sink: SinkFactory, sink_cert: IssuedCert, issue_cert: IssueCert) -> None:
    other = issue_cert(["mx.other.test"])
    sink = await smtp_sink(tls=sink_cert, sni={"mx.other.test": other})
    code, out = await swaks(sink.host, sink.port, "--tls", "--tls-sni", "mx.other.test", "--tls-get-peer-cert")
    assert code == 0, out
    assert "mx.other.test" in out
    (msg,) = await sink.wait_for(1)
    assert msg.sni == "mx.other.test"


async def test_rcpt_replies(smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink(rcpt_replies={"busy": "451 4.2.0 try later", "Nobody@Example.org": "550 5.1.1 no such user"})
    code, out = await swaks(sink.host, sink.port, to="busy@example.org")
    assert code == 24 and "451 4.2.0 try later" in out, out
    code, out = await swaks(sink.host, sink.port, to="nobody@example.org")
    assert code == 24 and "550 5.1.1 no such user" in out, out
    # one good recipient among bad ones: delivered to the good one only
    code, out = await swaks(sink.host, sink.port, to="busy@example.org,ok@example.org")
    assert code == 0, out
    (msg,) = await sink.wait_for(1)
    assert msg.rcpt_tos == ("ok@example.org",)
    assert sink.connections == 3


async def test_data_and_mail_replies(smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink(data_reply="452 4.3.1 insufficient storage")
    code, out = await swaks(sink.host, sink.port)
    assert code == 26 and "452 4.3.1" in out, out
    assert not sink.messages
    sink2 = await smtp_sink(mail_reply="421 4.7.0 go away")
    code, out = await swaks(sink2.host, sink2.port)
    assert code == 23 and "421 4.7.0 go away" in out, out


async def test_drop_mid_data(smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink(drop_after_data_bytes=100)
    code, out = await swaks(sink.host, sink.port, "--body", "x" * 5000)
    assert code not in (0, 25), out  # the connection vanished after 354
    assert "354" in out
    assert not sink.messages
    with pytest.raises(TimeoutError):
        await sink.wait_for(1, timeout=0.2)
    # a message shorter than the limit is cut at its final dot, not waited on
    small = await smtp_sink(drop_after_data_bytes=1_000_000)
    code, out = await asyncio.wait_for(swaks(small.host, small.port, "--body", "short"), 20)
    assert code != 0, out
    assert not small.messages


async def test_ipv6_loopback(smtp_sink: SinkFactory) -> None:
    try:
        sink = await smtp_sink(host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    code, out = await swaks(sink.host, sink.port)
    assert code == 0, out
    (msg,) = await sink.wait_for(1)
    assert msg.peer is not None and msg.peer[0] == "::1"


async def test_async_context_manager_and_smtplib(sink_cert: IssuedCert) -> None:
    async with SmtpSink(tls=sink_cert) as sink:

        def send() -> None:
            ctx = tls.client_context(verify=False)
            with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
                client.starttls(context=ctx)
                client.sendmail("a@example.net", ["b@example.org"], b"Subject: hi\r\n\r\nbody\r\n")

        await asyncio.to_thread(send)
        (msg,) = await sink.wait_for(1)
        assert msg.data.endswith(b"body\r\n") and msg.tls_version is not None
    with pytest.raises(RuntimeError):
        _ = sink.port


def test_loopback_only_and_argument_checks(sink_cert: IssuedCert) -> None:
    with pytest.raises(ValueError, match="loopback"):
        SmtpSink(host="0.0.0.0")
    with pytest.raises(ValueError, match="loopback"):
        PostfixSink(host="192.0.2.1")
    with pytest.raises(ValueError):
        SmtpSink(implicit_tls=True)
    with pytest.raises(ValueError):
        SmtpSink(tls=sink_cert, starttls=False, require_tls=True)


# -- synchronous tests: ThreadedSmtpSink ---------------------------------------------------------------


def test_threaded_sink_from_sync_code(sink_cert: IssuedCert) -> None:
    with ThreadedSmtpSink(tls=sink_cert, rcpt_replies={"full": "452 4.2.2 mailbox full"}) as sink:
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
            client.starttls(context=tls.client_context(verify=False))
            refused = client.sendmail("a@example.net", ["b@example.org", "full@example.org"], b"\r\nhello\r\n")
            assert refused == {"full@example.org": (452, b"4.2.2 mailbox full")}
        (msg,) = sink.wait_for(1)
        assert msg.rcpt_tos == ("b@example.org",)
        assert msg.tls_version is not None
        assert sink.connections == 1


def test_threaded_sink_fixture(threaded_smtp_sink: Callable[..., ThreadedSmtpSink]) -> None:
    sink = threaded_smtp_sink()
    with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
        client.sendmail("a@example.net", ["b@example.org"], b"\r\nhello\r\n")
    assert len(sink.wait_for(1, timeout=5)) == 1
    with pytest.raises(TimeoutError):
        sink.wait_for(2, timeout=0.2)


# -- Postfix smtp-sink -----------------------------------------------------------------------------------


async def test_postfix_sink_accepts_from_swaks() -> None:
    if not PostfixSink.available():
        pytest.fail("postfix smtp-sink not installed: `make deps` installs postfix")
    async with PostfixSink(dump=True, hostname="pf.sink.test") as sink:
        code, out = await swaks(sink.host, sink.port, "--header", "Subject: via postfix")
        assert code == 0, out
        assert "pf.sink.test" in out
        dumps = await asyncio.to_thread(sink.wait_for_dumps, 1)
        assert b"X-Rcpt-Args: <rcpt@example.org>" in dumps[0]
        assert b"Subject: via postfix" in dumps[0]
        dump_dir = sink.dump_dir
        assert dump_dir is not None
    assert not dump_dir.exists()


def test_postfix_sink_injected_failures(postfix_sink: Callable[..., PostfixSink]) -> None:
    factory = postfix_sink
    hard = factory(hard_reject=["rcpt"], hard_reply="550 5.1.1 no such user here")
    soft = factory(soft_reject=["mail"])
    gone = factory(disconnect=["data"])
    with smtplib.SMTP(hard.host, hard.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("a@example.net")[0] == 250
        assert client.rcpt("b@example.org") == (550, b"5.1.1 no such user here")
    with smtplib.SMTP(soft.host, soft.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("a@example.net")[0] == 450
    with smtplib.SMTP(gone.host, gone.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("a@example.net")
        client.rcpt("b@example.org")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.data(b"\r\nhi\r\n")
