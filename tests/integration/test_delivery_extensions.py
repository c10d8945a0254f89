"""SMTP extensions on the delivery side (issue 19) against real next hops: Postfix's smtpd (CHUNKING/BDAT, DSN;
it relays on to an mxgate gateway that records what arrived), aiosmtpd sinks (DSN, REQUIRETLS advertised after
STARTTLS) and our own receive side; the scheduler's "relayed" DSN and the REQUIRETLS bounce (RFC 3030, 3461,
3464, 8689)."""

from __future__ import annotations

import asyncio
import email
import importlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from mxgate.core import bootstrap
from mxgate.core.delivery import Deliverer, DeliveryResult, OutgoingMessage
from mxgate.core.messages import MessageOptions, NewRecipient, RecipientStatus
from mxgate.core.model import DsnNotify, DsnRet, RecipientDsn
from mxgate.core.outcomes import Destination
from mxgate.core.queue.scheduler import Scheduler
from mxgate.core.queue.store import QueueStore
from mxgate.core.runtime import Runtime
from mxgate.testing.ca import TestCA
from mxgate.testing.gateway import TestGateway, delivery_config
from mxgate.testing.sinks import SmtpSink

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
Start = Callable[..., Awaitable[TestGateway]]
Factory = Callable[..., Awaitable[Runtime]]
BASE = '[server]\naccepted_domains = ["example.org"]\n'
# dot lines (which BDAT must not stuff) and enough bytes for three 1 MiB chunks
BODY = b"From: a@sender.test\r\nSubject: ext\r\nMessage-ID: <ext@sender.test>\r\n\r\n" + (
    b".dot line\r\n..two dots\r\nbody text\r\n" * 80_000
)


@pytest.fixture
async def make_runtime(tmp_path: Path) -> AsyncIterator[Factory]:
    made: list[Runtime] = []

    async def make(connectors: str, *, queue: bool = False) -> Runtime:
        directory = tmp_path / f"rt{len(made)}"
        directory.mkdir()
        config, plugins = bootstrap.load(delivery_config(directory, connectors), entry_points=False)
        runtime = Runtime.create(config, plugins)
        if queue:
            runtime.queue = await QueueStore.open(config.state_path)
        await runtime.hooks.on_startup(runtime)
        made.append(runtime)
        return runtime

    yield make
    for rt in made:
        for task in rt.tasks:
            task.cancel()
        if rt.queue is not None:
            await rt.queue.close()
        rt.tracking.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA.create(tmp_path_factory.mktemp("ca"))


def _relay(host: str, port: int, tls: str = "none", extra: str = "") -> str:
    return f"""
    [[outbound_connector]]
    name = "relay"
    recipient_domains = ["*"]
    smart_hosts = ["{host}:{port}"]
    tls = "{tls}"
    connect_timeout = 10
    command_timeout = 30
    retry_first = 60
    give_up_after = 3600
    {extra}
    """


async def _deliver(runtime: Runtime, port: int, msg: OutgoingMessage) -> DeliveryResult:
    dest = Destination(runtime.config.outbound("relay"), "127.0.0.1", (f"127.0.0.1:{port}",))
    return await Deliverer(runtime, reuse=False).deliver(dest, msg)


def _postfix(relay_port: int, **kwargs: Any) -> Any:
    """A relay-only Postfix (bench/'s harness): its smtpd is our next hop; it relays everything on to
    ``relay_port``."""
    if os.geteuid() != 0 or not os.access("/usr/sbin/postfix", os.X_OK):
        pytest.fail("starts its own Postfix: needs root and postfix (`make deps`)")
    sys.path.insert(0, str(REPO / "bench"))
    try:
        postfix = importlib.import_module("benchkit.postfix")
        procs = importlib.import_module("benchkit.procs")
    finally:
        sys.path.remove(str(REPO / "bench"))
    return postfix.PostfixInstance(procs.ProcGroup("ext-out"), relay_port=relay_port, **kwargs).start()


async def _arrived(gw: TestGateway, pf: Any, n: int = 1) -> list[Any]:
    queue = gw.runtime.queue
    assert queue is not None
    deadline = asyncio.get_running_loop().time() + 60
    while len(msgs := await queue.list()) < n:
        assert asyncio.get_running_loop().time() < deadline, pf.log_tail()
        await asyncio.sleep(0.1)
    return sorted(msgs, key=lambda m: m.received_at)


def _sent(result: DeliveryResult) -> list[str]:
    return [line[3:] for line in result.transcript if line.startswith("C: ")]


# --- 1. CHUNKING / BDAT, 2. DSN passed on: Postfix's smtpd as next hop ------------------------------------


@pytest.mark.parametrize("chunking", [True, False])
async def test_bdat_and_dsn_to_postfix_smtpd(mxgate_gateway: Start, make_runtime: Factory, chunking: bool) -> None:
    """Postfix's smtpd offers CHUNKING and DSN. With ``chunking = true`` (the default) the message goes in
    ``BDAT n [LAST]`` chunks pipelined with MAIL/RCPT, byte for byte (dot lines not stuffed); with ``false`` as
    DATA. Either way RET/ENVID and each recipient's NOTIFY/ORCPT go on (an ORCPT added where none was given):
    Postfix relays them to the gateway behind it, which records what arrived."""
    gw = await mxgate_gateway(BASE)
    pf = await asyncio.to_thread(_postfix, gw.smtp_port)
    try:
        runtime = await make_runtime(_relay(pf.host, pf.port, extra=f"chunking = {str(chunking).lower()}"))
        msg = OutgoingMessage(
            "Q1",
            "a@sender.test",
            ("u@example.org", "v@example.org"),
            BODY,
            envid="env+1",
            dsn_ret=DsnRet.HDRS,
            recipient_dsn=(RecipientDsn(frozenset({DsnNotify.FAILURE, DsnNotify.DELAY}), ("rfc822", "o@x.test")),),
        )
        result = await _deliver(runtime, pf.port, msg)
        assert [o.result for o in result.outcomes] == ["delivered", "delivered"], result.steps
        sent = _sent(result)
        if chunking:
            assert [c for c in sent if c.startswith("BDAT")] == [
                "BDAT 1048576 <data>",
                "BDAT 1048576 <data>",
                f"BDAT {len(BODY) - 2 * 1048576} LAST <data>",
            ]
            assert "DATA" not in sent
        else:
            assert "DATA" in sent and not any(c.startswith("BDAT") for c in sent)
        mail = next(i for i, c in enumerate(sent) if c.startswith("MAIL"))
        assert sent[mail] == f"MAIL FROM:<a@sender.test> SIZE={len(BODY)} RET=HDRS ENVID=env+2B1"
        assert sent[mail + 1 : mail + 3] == [
            "RCPT TO:<u@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;o@x.test",
            "RCPT TO:<v@example.org> ORCPT=rfc822;v@example.org",
        ]
        (got,) = await _arrived(gw, pf)
        assert got.options == MessageOptions(DsnRet.HDRS, "env+1")
        assert [(r.address, r.dsn_notify, r.orcpt) for r in got.recipients] == [
            ("u@example.org", "FAILURE,DELAY", "rfc822;o@x.test"),
            ("v@example.org", None, "rfc822;v@example.org"),
        ]
        assert gw.runtime.queue is not None
        body = await gw.runtime.queue.body(got.id)
        # Postfix's cleanup adds its headers (Received:, Date:, To:); the original ones are kept, the body is exact
        head, _, text = body.partition(b"\r\n\r\n")
        assert head.startswith(b"Received: from postfix.bench.test") and b"\r\nSubject: ext\r\n" in head
        assert text == BODY.partition(b"\r\n\r\n")[2]
    finally:
        await asyncio.to_thread(pf.stop)


async def test_postfix_size_limit_is_respected_before_mail(make_runtime: Factory) -> None:
    """RFC 1870: Postfix advertises its ``message_size_limit`` as SIZE; a larger message fails 552 5.3.4 before
    MAIL (nothing sent), a smaller one goes with SIZE= declared."""
    async with SmtpSink() as behind:
        pf = await asyncio.to_thread(_postfix, behind.port, extra={"message_size_limit": "200000"})
        try:
            runtime = await make_runtime(_relay(pf.host, pf.port))
            result = await _deliver(runtime, pf.port, OutgoingMessage("QS", "a@sender.test", ("b@x.test",), BODY))
            assert [(o.result, o.status) for o in result.outcomes] == [("failed", "5.3.4")], result.steps
            assert any("SIZE=200000" in s for s in result.steps)
            assert not any(c.startswith("MAIL") for c in _sent(result))
            data = BODY[: BODY.index(b"\r\n", 150_000) + 2]
            small = OutgoingMessage("QT", "a@sender.test", ("b@x.test",), data)
            result = await _deliver(runtime, pf.port, small)
            assert [o.result for o in result.outcomes] == ["delivered"], result.steps
            assert f"MAIL FROM:<a@sender.test> SIZE={len(data)}" in _sent(result)
            (got,) = await behind.wait_for(1, timeout=60)
            assert got.data.endswith(data.partition(b"\r\n\r\n")[2])
        finally:
            await asyncio.to_thread(pf.stop)


async def test_bdat_to_our_own_receive_side_small_and_empty_recipient_refused(
    mxgate_gateway: Start, make_runtime: Factory
) -> None:
    """Our receive side offers CHUNKING and PIPELINING: one ``BDAT n LAST`` in the pipelined group; a recipient
    the next hop refuses is failed while the other is delivered in the same transaction."""
    gw = await mxgate_gateway(BASE + '[[inbound_connector]]\nname = "lo"\nsender_ips = ["127.0.0.0/8"]\n')
    runtime = await make_runtime(_relay(gw.smtp_host, gw.smtp_port))
    data = b"Subject: small\r\n\r\n.x\r\n"
    result = await _deliver(runtime, gw.smtp_port, OutgoingMessage("Q2", "a@sender.test", ("u@example.org",), data))
    assert [o.result for o in result.outcomes] == ["delivered"], result.steps
    assert [c for c in _sent(result) if c.startswith("BDAT")] == [f"BDAT {len(data)} LAST <data>"]
    assert gw.runtime.queue is not None
    (got,) = await gw.runtime.queue.list()
    assert (await gw.runtime.queue.body(got.id)).endswith(data)
    result = await _deliver(
        runtime, gw.smtp_port, OutgoingMessage("Q3", "a@sender.test", ("u@example.org", "x@elsewhere.test"), data)
    )
    outcomes = {o.recipient: (o.result, o.status) for o in result.outcomes}
    assert outcomes == {"u@example.org": ("delivered", "2.0.0"), "x@elsewhere.test": ("failed", "5.7.1")}, result.steps
    assert len(await gw.runtime.queue.list()) == 2


# --- 3. REQUIRETLS (RFC 8689) ------------------------------------------------------------------------------


def _rt(*rcpts: str) -> OutgoingMessage:
    return OutgoingMessage(
        "QR", "a@sender.test", rcpts or ("b@x.test",), b"Subject: rt\r\n\r\nsecret\r\n", requiretls=True
    )


def _validating(port: int, ca: TestCA, tls: str = "domain_validation") -> str:
    return _relay("127.0.0.1", port, tls, f'tls_domain = "relay.example.test"\ntls_ca_file = "{ca.cert_path}"')


async def test_requiretls_passed_on_to_an_authenticated_peer_that_offers_it(ca: TestCA, make_runtime: Factory) -> None:
    """§4.2.1: TLS, the certificate validated (the connector's domain_validation), REQUIRETLS offered after
    STARTTLS: MAIL carries REQUIRETLS on to the next hop."""
    async with SmtpSink(tls=ca.issue(["relay.example.test"]), requiretls=True) as sink:
        runtime = await make_runtime(_validating(sink.port, ca))
        result = await _deliver(runtime, sink.port, _rt())
        assert [(o.result, o.status) for o in result.outcomes] == [("delivered", "2.0.0")], result.steps
        (got,) = sink.messages
        assert got.tls_version is not None and "REQUIRETLS" in got.mail_options
        assert any("extensions" in s and "REQUIRETLS" in s.split("(not offered")[0] for s in result.steps)


@pytest.mark.parametrize("tls", ["opportunistic", "encryption_only"])
async def test_requiretls_bounces_without_an_authenticating_policy_never_in_the_clear(
    ca: TestCA, make_runtime: Factory, tls: str
) -> None:
    """A host no policy authenticates (opportunistic, encryption_only) is never dialled for a REQUIRETLS
    message: one permanent 5.7.30 failure, no connection at all (so nothing goes in the clear)."""
    async with SmtpSink(tls=ca.issue(["relay.example.test"]), requiretls=True) as sink:
        runtime = await make_runtime(_relay("127.0.0.1", sink.port, tls))
        result = await _deliver(runtime, sink.port, _rt())
        assert [(o.result, o.status) for o in result.outcomes] == [("failed", "5.7.30")], result.steps
        assert result.outcomes[0].reply.startswith("550 5.7.30 ")
        assert sink.connections == 0 and sink.messages == ()


async def test_requiretls_bounces_when_the_peer_does_not_offer_it(ca: TestCA, make_runtime: Factory) -> None:
    """An authenticated TLS peer without REQUIRETLS: 5.7.30, before MAIL (the message is not handed over)."""
    async with SmtpSink(tls=ca.issue(["relay.example.test"]), requiretls=False) as sink:
        runtime = await make_runtime(_validating(sink.port, ca, "certificate_validation"))
        result = await _deliver(runtime, sink.port, _rt())
        assert [(o.result, o.status) for o in result.outcomes] == [("failed", "5.7.30")], result.steps
        assert sink.tls_handshakes == 1 and sink.mail_commands == []


async def test_requiretls_to_postfix_which_does_not_offer_it(ca: TestCA, tmp_path: Path, make_runtime: Factory) -> None:
    """Postfix's smtpd (STARTTLS with a test-CA certificate, validated) does not implement REQUIRETLS: the
    message bounces with 5.7.30 and Postfix never sees a MAIL command; a message without REQUIRETLS goes."""
    cert = ca.issue(["relay.example.test"])
    async with SmtpSink() as behind:
        sys.path.insert(0, str(REPO / "bench"))
        try:
            postfix = importlib.import_module("benchkit.postfix")
            procs = importlib.import_module("benchkit.procs")
        finally:
            sys.path.remove(str(REPO / "bench"))
        if not postfix.available():
            pytest.fail("starts its own Postfix: needs root and postfix (`make deps`)")
        pf = postfix.PostfixInstance(
            procs.ProcGroup("ext-rt"), relay_port=behind.port, tls_cert=str(cert.chain_path), tls_key=str(cert.key_path)
        )
        await asyncio.to_thread(pf.start)
        try:
            runtime = await make_runtime(_validating(pf.port, ca))
            result = await _deliver(runtime, pf.port, _rt())
            assert [(o.result, o.status) for o in result.outcomes] == [("failed", "5.7.30")], result.steps
            assert any("TLS TLSv1." in s for s in result.steps) and not any(c.startswith("MAIL") for c in _sent(result))
            plain = OutgoingMessage("QP", "a@sender.test", ("b@x.test",), b"Subject: plain\r\n\r\nhi\r\n")
            result = await _deliver(runtime, pf.port, plain)
            assert [o.result for o in result.outcomes] == ["delivered"], result.steps
            (got,) = await behind.wait_for(1, timeout=60)
            assert got.data.endswith(b"\r\n\r\nhi\r\n")
        finally:
            await asyncio.to_thread(pf.stop)


# --- the scheduler: "relayed" DSN, the REQUIRETLS bounce ---------------------------------------------------


async def _round(runtime: Runtime) -> Scheduler:
    sched = Scheduler(runtime, poll_interval=0.05)
    await sched.run_once()
    await sched.drain(10)
    return sched


async def _dsns(runtime: Runtime) -> list[tuple[Any, email.message.Message]]:
    queue = runtime.queue
    assert queue is not None
    out = []
    for m in await queue.list():
        if m.sender == "":
            out.append((m, email.message_from_bytes(await queue.body(m.id))))
    return out


def _status_blocks(report: email.message.Message) -> list[email.message.Message]:
    part = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    payload = part.get_payload()
    assert isinstance(payload, list)
    return payload


@pytest.mark.parametrize("next_hop_dsn", [False, True])
async def test_relayed_dsn_when_the_next_hop_does_not_offer_dsn(make_runtime: Factory, next_hop_dsn: bool) -> None:
    """RFC 3461 §6.2.2 / RFC 3464: delivered to a next hop without DSN, a recipient that asked NOTIFY=SUCCESS
    gets a "relayed" DSN from us (Original-Recipient, Original-Envelope-Id kept); recipients that did not ask get
    none. A next hop that offers DSN gets NOTIFY passed on, and we send nothing."""
    async with SmtpSink(dsn=next_hop_dsn) as sink:
        runtime = await make_runtime(_relay(sink.host, sink.port), queue=True)
        assert runtime.queue is not None
        qid = await runtime.queue.put(
            "a@sender.test",
            [NewRecipient("s@x.test", "SUCCESS,FAILURE", "rfc822;orig@x.test"), NewRecipient("f@x.test", "FAILURE")],
            b"Subject: hi\r\nMessage-ID: <r@sender.test>\r\n\r\nhello\r\n",
            now=1_700_000_000.0,
            options=MessageOptions(envid="env-7"),
        )
        await _round(runtime)
        msg = await runtime.queue.get(qid)
        assert msg is not None and all(r.status is RecipientStatus.DELIVERED for r in msg.recipients)
        (got,) = sink.messages
        dsns = await _dsns(runtime)
        if next_hop_dsn:
            assert dsns == []
            assert "NOTIFY=SUCCESS,FAILURE" in got.rcpt_options and "NOTIFY=FAILURE" in got.rcpt_options
            return
        assert not any(o.startswith("NOTIFY") for o in got.rcpt_options)
        ((dsn_msg, report),) = dsns
        assert [r.address for r in dsn_msg.recipients] == ["a@sender.test"]
        assert report["Subject"] == "Successful Mail Delivery Report"
        per_message, *per_rcpt = _status_blocks(report)
        assert per_message["Original-Envelope-Id"] == "env-7"
        assert [(b["Final-Recipient"], b["Action"], b["Original-Recipient"]) for b in per_rcpt] == [
            ("rfc822; s@x.test", "relayed", "rfc822;orig@x.test")
        ]
        assert per_rcpt[0]["Status"].startswith("2.")


async def test_requiretls_bounce_follows_rfc8689_s5_and_tls_required_no_does_not_weaken_it(
    make_runtime: Factory,
) -> None:
    """A REQUIRETLS message (also carrying ``TLS-Required: No``: §4.1, the header field is ignored) to a next
    hop no policy authenticates: failed at once with 5.7.30 (never retried, never sent in the clear). Its DSN
    (§5) returns the headers only, although RET=FULL was asked, and is itself queued with REQUIRETLS -- so over
    the same opportunistic connector it is not sent either."""
    async with SmtpSink() as sink:
        runtime = await make_runtime(_relay(sink.host, sink.port, "opportunistic"), queue=True)
        assert runtime.queue is not None
        body = b"Subject: secret\r\nTLS-Required: No\r\nMessage-ID: <rt@sender.test>\r\n\r\nthe secret text\r\n"
        qid = await runtime.queue.put(
            "a@sender.test",
            ["b@x.test"],
            body,
            now=1_700_000_000.0,
            options=MessageOptions(DsnRet.FULL, None, requiretls=True),
        )
        await _round(runtime)
        msg = await runtime.queue.get(qid)
        assert msg is not None
        (rcpt,) = msg.recipients
        assert rcpt.status is RecipientStatus.FAILED and rcpt.last_error and "5.7.30" in rcpt.last_error
        assert sink.connections == 0
        ((dsn_msg, report),) = await _dsns(runtime)
        assert dsn_msg.options.requiretls
        assert dsn_body_has_no_content(await runtime.queue.body(dsn_msg.id))
        (block,) = _status_blocks(report)[1:]
        assert (block["Action"], block["Status"]) == ("failed", "5.7.30")
        await _round(runtime)  # the DSN, REQUIRETLS itself, is not sent over the opportunistic connector either
        assert sink.connections == 0
        dsn_after = await runtime.queue.get(dsn_msg.id)
        assert dsn_after is not None and dsn_after.recipients[0].status is RecipientStatus.FAILED


def dsn_body_has_no_content(raw: bytes) -> bool:
    return b"text/rfc822-headers" in raw and b"Subject: secret" in raw and b"the secret text" not in raw
