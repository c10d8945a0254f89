"""SMTP extensions on the delivery side (issue 19) against real next hops: Postfix's smtpd (CHUNKING/BDAT, DSN,
SIZE; it relays on to an mxgate gateway or a sink that records what arrived), aiosmtpd sinks (DSN) and our own
receive side; the scheduler's "relayed" DSN (RFC 3030, 1870, 3461, 3464)."""

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

from mxgate.core import engine
from mxgate.core.delivery import Deliverer, DeliveryResult, OutgoingMessage
from mxgate.core.model import DsnNotify, DsnRet, RecipientDsn
from mxgate.core.outcomes import Destination
from mxgate.core.queue import MessageOptions, NewRecipient
from mxgate.core.queue.scheduler import Scheduler
from mxgate.core.queue.store import QueueStore, RecipientStatus
from mxgate.core.runtime import Runtime
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
        config, plugins = engine.load(delivery_config(directory, connectors), entry_points=False)
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
