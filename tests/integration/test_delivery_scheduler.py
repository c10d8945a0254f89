"""The scheduler end to end: queue -> categorizer hooks -> delivery to a real sink -> per-recipient state, retry
schedule, DSN to the sender (never to <>), tracking log, hooks; restart semantics; queue CLI on live state."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mxgate.core import bootstrap, tracking
from mxgate.core.cli import main as cli_main
from mxgate.core.hookspecs import hookimpl
from mxgate.core.messages import MessageOptions, RecipientStatus
from mxgate.core.metadata import MessageMeta
from mxgate.core.model import Address, DsnRet
from mxgate.core.outcomes import DeliveryReport, Route
from mxgate.core.queue.scheduler import Scheduler
from mxgate.core.queue.store import QueueStore
from mxgate.core.runtime import Runtime
from mxgate.testing.gateway import delivery_config
from mxgate.testing.sinks import SmtpSink

pytestmark = pytest.mark.integration

BODY = b"From: a@sender.test\r\nSubject: hello\r\nMessage-ID: <m1@sender.test>\r\n\r\nHello.\r\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Agent:
    """Records reports; optionally expands or reroutes recipients."""

    name = "agent"

    def __init__(self) -> None:
        self.reports: list[DeliveryReport] = []
        self.submitted: list[str] = []
        self.routed: list[list[str]] = []
        self.expand: dict[str, list[str]] = {}
        self.reroute: dict[str, str] = {}

    @hookimpl
    def mxgate_categorizer_on_submitted_message(self, message: Any) -> None:
        self.submitted.append(message.id)

    @hookimpl
    def mxgate_categorizer_resolve_recipient(self, recipient: Address) -> Sequence[Address] | None:
        targets = self.expand.get(str(recipient))
        if targets is None:
            return None
        return [Address(*t.split("@")) for t in targets]

    @hookimpl
    def mxgate_categorizer_resolve_route(self, recipient: Address) -> Route | None:
        name = self.reroute.get(recipient.domain)
        return Route(name) if name else None

    @hookimpl
    def mxgate_categorizer_on_routed_message(self, routes: Sequence[tuple[Address, Route]]) -> None:
        self.routed.append([f"{a}->{r.connector}" for a, r in routes])

    @hookimpl
    def mxgate_delivery_on_delivered(self, report: DeliveryReport) -> None:
        self.reports.append(report)

    @hookimpl
    def mxgate_delivery_on_deferred(self, report: DeliveryReport) -> None:
        self.reports.append(report)

    @hookimpl
    def mxgate_delivery_on_failed(self, report: DeliveryReport) -> None:
        self.reports.append(report)


Env = tuple[Runtime, Scheduler, Agent, Clock, Path]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[Env]]]:
    made: list[Runtime] = []

    async def make(connectors: str) -> Env:
        path = delivery_config(tmp_path, connectors)
        agent, clock = Agent(), Clock()
        config, plugins = bootstrap.load(path, entry_points=False, extra_plugins=[("agent", agent)])
        runtime = Runtime.create(config, plugins, clock=clock)
        runtime.queue = await QueueStore.open(config.state_path)
        await runtime.hooks.on_startup(runtime)
        made.append(runtime)
        return runtime, Scheduler(runtime, poll_interval=0.05), agent, clock, path

    yield make
    for rt in made:
        for task in rt.tasks:
            task.cancel()
        if rt.queue is not None:
            await rt.queue.close()
        rt.tracking.close()


def _relay(sink: SmtpSink, name: str = "relay", domains: str = '["*"]', extra: str = "") -> str:
    return f"""
    [[outbound_connector]]
    name = "{name}"
    recipient_domains = {domains}
    smart_hosts = ["{sink.host}:{sink.port}"]
    tls = "none"
    retry_first = 60
    retry_max = 600
    give_up_after = 3600
    {extra}
    """


async def _round(s: Scheduler) -> None:
    await s.run_once()
    await s.drain(10)


async def test_partial_delivery_retry_dsn_and_tracking(env: Callable[[str], Awaitable[Env]]) -> None:
    replies = {"busy": "451 4.2.0 mailbox busy", "nobody": "550 5.1.1 no such user"}
    async with SmtpSink(rcpt_replies=replies) as sink:
        runtime, sched, agent, clock, _ = await env(_relay(sink))
        queue = runtime.queue
        assert queue is not None
        qid = await queue.put(
            "a@sender.test",
            ["ok@x.test", "busy@x.test", "nobody@x.test"],
            BODY,
            message_id="<m1@sender.test>",
            now=clock.now,
        )
        await _round(sched)
        assert [m.rcpt_tos for m in sink.messages] == [("ok@x.test",)]
        msg = await queue.get(qid)
        assert msg is not None
        state = {r.address: r for r in msg.recipients}
        assert state["ok@x.test"].status is RecipientStatus.DELIVERED
        assert state["nobody@x.test"].status is RecipientStatus.FAILED
        busy = state["busy@x.test"]
        assert busy.status is RecipientStatus.DEFERRED and busy.last_error and busy.last_error.startswith("451")
        assert clock.now + 50 <= busy.next_attempt <= clock.now + 70  # retry_first = 60 with jitter
        assert {r.route for r in msg.recipients} == {"relay"}
        assert agent.submitted == [qid]
        assert sorted((r.recipient, r.result) for r in agent.reports) == [
            ("busy@x.test", "deferred"),
            ("nobody@x.test", "failed"),
            ("ok@x.test", "delivered"),
        ]
        # the DSN for nobody@ is queued with the null sender, to the original sender
        dsns = [m for m in await queue.list() if m.sender == ""]
        assert len(dsns) == 1 and [r.address for r in dsns[0].recipients] == ["a@sender.test"]
        dsn_body = await queue.body(dsns[0].id)
        assert b"delivery-status" in dsn_body and b"Final-Recipient: rfc822; nobody@x.test" in dsn_body
        assert b"Final-Recipient: rfc822; busy@x.test" not in dsn_body  # deferred, not failed
        events = [r.event for r in tracking.trace(runtime.state_dir, qid)]
        for ev in ("ROUTE", "ATTEMPT", "DELIVER", "DEFER", "FAIL", "DSN"):
            assert ev in events

        # not due yet: nothing happens; then the retry is due and the mailbox no longer busy
        sink.rcpt_replies.pop("busy")
        await _round(sched)
        assert len(sink.messages) == 2  # the DSN went out too (to sender.test through the same relay)
        clock.now += 120
        await _round(sched)
        msg = await queue.get(qid)
        assert msg is not None and msg.is_final and msg.recipient("busy@x.test").status is RecipientStatus.DELIVERED  # type: ignore[union-attr]
        assert [m.rcpt_tos for m in sink.messages if m.mail_from == "a@sender.test"] == [
            ("ok@x.test",),
            ("busy@x.test",),
        ]


async def test_give_up_after_expiry_and_no_dsn_to_null_sender(env: Callable[[str], Awaitable[Env]]) -> None:
    async with SmtpSink(rcpt_replies={"busy": "451 4.2.0 busy"}) as sink:
        runtime, sched, _agent, clock, _ = await env(_relay(sink))
        queue = runtime.queue
        assert queue is not None
        normal = await queue.put("a@sender.test", ["busy@x.test"], BODY, now=clock.now)
        bounce = await queue.put("", ["busy@x.test"], BODY, now=clock.now)
        await _round(sched)
        clock.now += 3600  # give_up_after
        await _round(sched)
        for qid in (normal, bounce):
            msg = await queue.get(qid)
            assert msg is not None and msg.recipients[0].status is RecipientStatus.FAILED
            assert "gave up" in (msg.recipients[0].last_error or "")
        dsns = [m for m in await queue.list() if m.sender == ""]
        assert [m.recipients[0].address for m in dsns] == ["a@sender.test"]  # none for the null-sender message
        # the last transient reply (451 4.2.0) is reported as final: Status 5.2.0, not 4.2.0
        dsn_body = await queue.body(dsns[0].id)
        assert b"Status: 5.2.0" in dsn_body and b"Status: 4." not in dsn_body


async def test_routing_specificity_override_and_expansion(env: Callable[[str], Awaitable[Env]]) -> None:
    async with SmtpSink() as wild, SmtpSink() as exact, SmtpSink() as special:
        runtime, sched, agent, clock, _ = await env(
            _relay(wild, "wild", '["*"]')
            + _relay(exact, "exact", '["example.test"]', "cost = 5")
            + _relay(exact, "exact-cheap-sub", '["*.example.test"]')
            + _relay(special, "special", '["special.test"]')
        )
        agent.reroute = {"override.test": "special"}
        agent.expand = {"list@example.test": ["m1@example.test", "m2@other.test"]}
        queue = runtime.queue
        assert queue is not None
        qid = await queue.put(
            "a@sender.test",
            ["x@example.test", "y@other.test", "z@override.test", "list@example.test"],
            BODY,
            now=clock.now,
        )
        await _round(sched)
        await _round(sched)  # the expansion's new message
        assert sorted(r for m in exact.messages for r in m.rcpt_tos) == ["m1@example.test", "x@example.test"]
        assert sorted(r for m in wild.messages for r in m.rcpt_tos) == ["m2@other.test", "y@other.test"]
        assert [m.rcpt_tos for m in special.messages] == [("z@override.test",)]
        msg = await queue.get(qid)
        assert msg is not None and msg.is_final
        assert "expanded" in (msg.recipient("list@example.test").last_error or "expanded")  # type: ignore[union-attr]
        assert any("z@override.test->special" in r for r in agent.routed[0])


async def test_expansions_and_dsns_go_through_runtime_submit_typed(env: Callable[[str], Awaitable[Env]]) -> None:
    """One door into the queue: the split message of an expansion and a DSN are queued with ``runtime.submit``;
    the split message keeps the original's metadata (marked categorized, with where it came from) and its
    options (REQUIRETLS, RET, ENVID travel with the content)."""
    async with SmtpSink() as sink:
        runtime, sched, agent, clock, _ = await env(_relay(sink))
        agent.expand = {"list@x.test": ["m1@x.test"]}
        agent.reroute = {"nowhere.test": "no-such-connector"}
        queue = runtime.queue
        assert queue is not None
        submitted: list[tuple[str, MessageMeta]] = []

        async def enqueue(sender: str, recipients: Any, data: bytes, **kw: Any) -> str:
            submitted.append((sender, kw["meta"]))
            return await queue.put(sender, recipients, data, **kw)

        runtime.enqueue = enqueue
        received = MessageMeta(listener="smtp", inbound_connector="partner", client_ip="192.0.2.9", extra={"a.b": "c"})
        options = MessageOptions(DsnRet.HDRS, "ENV-7")
        qid = await runtime.submit(
            "a@sender.test", ["list@x.test", "b@nowhere.test"], BODY, meta=received, now=clock.now, options=options
        )
        await _round(sched)
        split_meta = replace(received, categorized=True, expanded_from=(qid, "list@x.test"))
        assert submitted[:2] == [("a@sender.test", received), ("a@sender.test", split_meta)]
        assert submitted[2] == ("", MessageMeta(dsn_for=qid))  # b@nowhere.test: no such connector, a bounce
        split = [m for m in await queue.list() if m.meta.expanded_from]
        assert len(split) == 1 and split[0].meta == split_meta and split[0].options == options
        await _round(sched)
        assert sorted(m.rcpt_tos for m in sink.messages) == [("a@sender.test",), ("m1@x.test",)]  # DSN, split
        assert agent.submitted[0] == qid and split[0].id in agent.submitted  # its own first pick-up


async def test_restart_makes_leased_attempts_due_again_once(env: Callable[[str], Awaitable[Env]]) -> None:
    async with SmtpSink() as sink:
        runtime, _sched, _agent, clock, _ = await env(_relay(sink))
        queue = runtime.queue
        assert queue is not None
        qid = await queue.put("a@sender.test", ["b@x.test"], BODY, now=clock.now)
        # a "crash" with the attempt in flight: leased, never recorded
        assert [m.id for m in await queue.lease_due(clock.now, 10, 900)] == [qid]
        await queue.close()
        runtime.queue = await QueueStore.open(runtime.state_dir)  # the gateway's open releases old leases
        sched = Scheduler(runtime, poll_interval=0.05)
        await _round(sched)
        await _round(sched)
        assert len(sink.messages) == 1
        # a clean stop while delivering waits for the attempt: exactly one copy
        qid2 = await runtime.queue.put("a@sender.test", ["c@x.test"], BODY, now=clock.now)
        task = asyncio.ensure_future(sched.run())
        await sink.wait_for(2, timeout=10)
        await sched.stop(timeout=10)
        task.cancel()
        msg2 = await runtime.queue.get(qid2)
        assert msg2 is not None and msg2.is_final and len(sink.messages) == 2


async def test_queue_cli_on_live_state(
    env: Callable[[str], Awaitable[Env]], capsys: pytest.CaptureFixture[str]
) -> None:
    async with SmtpSink(rcpt_replies={"busy": "451 4.2.0 busy"}) as sink:
        runtime, sched, _agent, clock, config_path = await env(_relay(sink))
        clock.now = time.time()  # the CLI's flush uses the wall clock
        queue = runtime.queue
        assert queue is not None
        from mxgate.core.messages import MessageOptions, NewRecipient
        from mxgate.core.model import DsnRet

        qid = await queue.put(
            "a@sender.test",
            [NewRecipient("busy@x.test", "FAILURE,DELAY", "rfc822;Busy@x.test")],
            BODY,
            message_id="<m1@sender.test>",
            now=clock.now,
            options=MessageOptions(DsnRet.HDRS, "ENV\x1b]0;x"),
        )
        await _round(sched)

        def cli(*argv: str) -> tuple[int, str]:
            code = cli_main(["queue", *argv, "-c", str(config_path)])
            return code, capsys.readouterr().out

        code, out = await asyncio.to_thread(cli, "list", "--json")
        rows = json.loads(out)
        assert code == 0 and [r["id"] for r in rows] == [qid]
        assert rows[0]["state"] == "deferred" and rows[0]["last_error"].startswith("451 4.2.0")
        assert rows[0]["recipients"] == [{"address": "busy@x.test", "status": "deferred"}]
        code, out = await asyncio.to_thread(cli, "list")
        assert code == 0 and qid in out and "deferred" in out
        code, out = await asyncio.to_thread(cli, "show", qid)
        assert code == 0 and "Subject: hello" in out and "busy@x.test deferred" in out and "a@sender.test" in out
        assert "dsn:         RET=HDRS ENVID=ENV\\x1b]0;x\n" in out and "requiretls" not in out  # escaped
        assert "[NOTIFY=FAILURE,DELAY ORCPT=rfc822;Busy@x.test]" in out
        code, _ = await asyncio.to_thread(cli, "hold", qid)
        assert code == 0 and (await queue.get(qid)).held  # type: ignore[union-attr]
        code, _ = await asyncio.to_thread(cli, "flush", qid)
        assert code == 0
        clock.now = time.time()
        sink.rcpt_replies.clear()
        await _round(sched)
        assert sink.messages == ()  # held: the flush does not override the hold
        code, _ = await asyncio.to_thread(cli, "release", qid)
        assert code == 0
        await _round(sched)
        assert [m.rcpt_tos for m in sink.messages] == [("busy@x.test",)]
        other = await queue.put(
            "a@sender.test", ["b@x.test"], BODY, now=clock.now + 10_000, options=MessageOptions(requiretls=True)
        )
        code, out = await asyncio.to_thread(cli, "show", other)
        assert code == 0 and "requiretls:  yes" in out and "dsn:" not in out
        code, _ = await asyncio.to_thread(cli, "delete", other)
        assert code == 0 and await queue.get(other) is None
        code, _ = await asyncio.to_thread(cli, "show", "NOPE")
        assert code == 1
        assert (await queue.integrity_check()) == []


async def test_enqueue_hands_a_received_message_straight_to_delivery(env: Callable[[str], Awaitable[Env]]) -> None:
    async with SmtpSink() as sink:
        runtime, _, _agent, clock, _ = await env(_relay(sink))
        queue = runtime.queue
        assert queue is not None
        sched = Scheduler(runtime, poll_interval=3600)  # no round will run: only the hand-off can deliver
        qid = await sched.enqueue("a@sender.test", ["b@x.test"], BODY, message_id="<m1@sender.test>", now=clock.now)
        assert await queue.lease_due(clock.now, 10, 900) == []  # leased in the put's own transaction
        [got] = await sink.wait_for(1, timeout=10)
        assert got.mail_from == "a@sender.test" and got.rcpt_tos == ("b@x.test",) and got.data.endswith(BODY)
        await sched.drain(10)
        msg = await queue.get(qid)
        assert msg is not None and msg.is_final and msg.recipients[0].route == "relay"
        assert msg.leased_until == 0  # the result released the lease


async def test_enqueue_with_no_free_slot_queues_for_a_round(env: Callable[[str], Awaitable[Env]]) -> None:
    async with SmtpSink() as sink:
        runtime, _, _agent, clock, _ = await env(_relay(sink))
        queue = runtime.queue
        assert queue is not None
        sched = Scheduler(runtime, poll_interval=3600, batch=2)  # rounds run only when woken
        loop = asyncio.ensure_future(sched.run())
        try:
            ids = await asyncio.gather(
                *(sched.enqueue("a@sender.test", [f"r{i}@x.test"], BODY, now=clock.now) for i in range(12))
            )
            await sink.wait_for(12, timeout=15)
            await sched.drain(10)
            assert sorted(m.rcpt_tos[0] for m in sink.messages) == sorted(f"r{i}@x.test" for i in range(12))
            for qid in ids:
                msg = await queue.get(qid)
                assert msg is not None and msg.is_final
        finally:
            await sched.stop(timeout=5)
            loop.cancel()


async def test_enqueue_caller_cancelled_while_committing_still_delivers(
    env: Callable[[str], Awaitable[Env]],
) -> None:
    async with SmtpSink() as sink:
        runtime, _, _agent, clock, _ = await env(_relay(sink))
        sched = Scheduler(runtime, poll_interval=3600)
        caller = asyncio.ensure_future(sched.enqueue("a@sender.test", ["b@x.test"], BODY, now=clock.now))
        await asyncio.sleep(0)  # the put is submitted
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        [got] = await sink.wait_for(1, timeout=10)  # committed, so delivered: a possible duplicate, never a loss
        assert got.rcpt_tos == ("b@x.test",)
        await sched.drain(10)


async def test_connection_limits_hold_under_contention(env: Callable[[str], Awaitable[Env]]) -> None:
    """40 messages at once to a slow smart host: never more connections than max_connections_per_destination,
    and never more than max_connections across the connector's destinations (sessions kept for reuse included)."""
    async with SmtpSink(data_delay=0.05) as one, SmtpSink(data_delay=0.05) as two:
        runtime, sched, _agent, clock, _ = await env(
            _relay(one, "one", '["one.test"]', "max_connections_per_destination = 3")
            + _relay(two, "two", '["two.test"]', "max_connections = 2\nmax_connections_per_destination = 5")
        )
        queue = runtime.queue
        assert queue is not None
        for i in range(40):
            await queue.put("a@sender.test", [f"r{i}@{'one' if i % 2 else 'two'}.test"], BODY, now=clock.now)
        await _round(sched)
        assert len(one.messages) == 20 and len(two.messages) == 20
        # the limits are reached (there was contention) and never passed
        assert (one.peak_connections, two.peak_connections) == (3, 2)
        assert one.connections < 20 and two.connections < 20  # sessions were reused, not one per message


async def test_message_deleted_while_in_flight_is_left_alone(
    env: Callable[[str], Awaitable[Env]], caplog: pytest.LogCaptureFixture
) -> None:
    async with SmtpSink(data_delay=0.3) as sink:
        runtime, sched, _agent, clock, _ = await env(_relay(sink))
        queue = runtime.queue
        assert queue is not None
        qid = await sched.enqueue("a@sender.test", ["b@x.test"], BODY, now=clock.now)
        await asyncio.sleep(0.1)  # delivery has started; the sink holds the end of data
        assert await queue.delete(qid)
        await sched.drain(10)
        assert len(sink.messages) == 1 and await queue.get(qid) is None
        assert not [r for r in caplog.records if r.name.startswith("mxgate.core") and r.levelno >= logging.WARNING]


async def test_dsn_honours_notify_ret_envid_and_orcpt(env: Callable[[str], Awaitable[Env]]) -> None:
    """RFC 3461 parameters kept with a message decide the DSNs the scheduler writes: NOTIFY=NEVER gets none,
    NOTIFY=SUCCESS alone none for a failure, RET=FULL returns the whole message, ENVID and ORCPT come back."""
    from mxgate.core.messages import MessageOptions, NewRecipient
    from mxgate.core.model import DsnRet

    replies = {"gone": "550 5.1.1 no such user", "quiet": "550 5.1.1 no such user", "succ": "550 5.1.1 no such user"}
    async with SmtpSink(rcpt_replies=replies) as sink:
        runtime, sched, _agent, clock, _ = await env(_relay(sink))
        queue = runtime.queue
        assert queue is not None
        qid = await queue.put(
            "a@sender.test",
            [
                NewRecipient("gone@x.test", "FAILURE", "rfc822;Gone+x@x.test"),
                NewRecipient("quiet@x.test", "NEVER"),
                NewRecipient("succ@x.test", "SUCCESS"),
            ],
            BODY,
            now=clock.now,
            options=MessageOptions(DsnRet.FULL, "ENV-7"),
        )
        quiet = await queue.put(
            "b@sender.test", [NewRecipient("quiet@x.test", "NEVER")], BODY, now=clock.now, options=None
        )
        await _round(sched)
        for msg_id in (qid, quiet):
            msg = await queue.get(msg_id)
            assert msg is not None and all(r.status is RecipientStatus.FAILED for r in msg.recipients)
        dsns = [m for m in await queue.list() if m.sender == ""]
        assert [m.recipients[0].address for m in dsns] == ["a@sender.test"]  # none for NOTIFY=NEVER alone
        dsn_body = await queue.body(dsns[0].id)
        assert b"Final-Recipient: rfc822; gone@x.test" in dsn_body
        assert b"quiet@x.test" not in dsn_body and b"succ@x.test" not in dsn_body
        assert b"Original-Recipient: rfc822;Gone+x@x.test" in dsn_body
        assert b"Original-Envelope-Id: ENV-7" in dsn_body
        assert b"Content-Type: message/rfc822" in dsn_body and BODY in dsn_body  # RET=FULL: the whole message


async def test_a_backlog_coming_due_leaves_slots_to_new_mail(env: Callable[[str], Awaitable[Env]]) -> None:
    """30 deferred messages for a destination that is down (one connection, each attempt slow, then 451) are all
    due; new mail for a healthy destination still gets slots at once: it is delivered while the retries have
    barely started (without the retries' share of slots it waited for all 30, each holding a slot)."""
    async with SmtpSink() as good, SmtpSink(data_delay=0.3, data_reply="451 4.3.0 try later") as down:
        runtime, _, _agent, clock, _ = await env(
            _relay(good, "good", '["good.test"]')
            + _relay(down, "down", '["down.test"]', "max_connections_per_destination = 1")
        )
        queue = runtime.queue
        assert queue is not None
        backlog = []
        for i in range(30):
            msg = await queue.put_leased("a@sender.test", [f"r{i}@down.test"], BODY, now=clock.now - 600)
            await queue.record_results(
                msg.id, [(f"r{i}@down.test", RecipientStatus.DEFERRED, "451 4.3.0 earlier", clock.now - 1)],
                now=clock.now - 600, known=msg,
            )  # fmt: skip
            backlog.append(msg.id)
        sched = Scheduler(runtime, poll_interval=0.05, batch=10)
        assert sched.retry_slots == 5
        loop = asyncio.ensure_future(sched.run())
        try:
            deadline = time.monotonic() + 20
            while (await queue.counts(now=clock.now)).leased < sched.retry_slots:  # rounds lease their share
                assert time.monotonic() < deadline, "the retries were not leased"
                await asyncio.sleep(0.02)
            ids = await asyncio.gather(
                *(sched.enqueue("a@sender.test", [f"n{i}@good.test"], BODY, now=clock.now) for i in range(10))
            )
            await good.wait_for(10, timeout=20)
            retried = [len(await queue.attempts(m)) - 1 for m in backlog]
            # one connection, 0.3 s per attempt: a few retries at most while ten new messages went through
            assert sum(retried) < 10, retried
            assert len(sched._retrying) <= sched.retry_slots
            for qid in ids:
                msg = await queue.get(qid)
                assert msg is not None and msg.is_final
        finally:
            await sched.stop(timeout=5)
            loop.cancel()
