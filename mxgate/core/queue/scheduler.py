"""The delivery scheduler: lease due messages, categorize, deliver, record, notify.

One background task per gateway (:meth:`Scheduler.run`). Each round it leases the due messages
(:meth:`QueueStore.lease_due`, so a CLI ``queue flush`` from another process simply makes messages due), and for
each message:

1. the categorizer (:func:`mxgate.core.routing.categorize`: ``on_submitted_message``, ``resolve_recipient``,
   ``resolve_route``, ``on_routed_message``) returns a plan; the scheduler acts on it: an expansion is
   *bifurcated* (the new addresses go into a new message queued through ``runtime.submit``, marked categorized,
   and the original recipient is recorded as delivered "expanded"), an unroutable recipient fails (5.4.4);
2. the plan's groups by :class:`~mxgate.core.outcomes.Destination` (connector + domain, or the connector's smart
   hosts): one transaction per group, under a per-connector and a per-destination semaphore;
3. results recorded with the connector's retry schedule (``retry_first``/``retry_max``/``give_up_after``);
   deferrals past ``give_up_after`` fail;
4. reports (:class:`~mxgate.core.queue.reporting.Reporter`): ``on_delivered``/``on_deferred``/``on_failed`` per
   recipient, tracking-log events, metrics events; a DSN (RFC 3464) for final failures and an optional delay
   warning, queued through ``runtime.submit`` with the null sender (never to the null sender, never for a report
   or an auto-submitted message: no loops).

A message the receive side accepts takes a short cut (:meth:`Scheduler.enqueue`): when fewer than ``batch``
messages are in flight it is queued *leased* (one transaction) and its delivery starts from memory, so it is
neither found by a due-query nor read back. Otherwise it is queued unleased and a round leases it later; rounds
run on a wake-up, when deliveries free at least a tenth of the slots while a backlog exists, and every
``poll_interval``. Retries (messages with a recipient deferred before) hold at most ``retry_share`` of the
slots: a backlog that comes due for a destination that is down does not keep new mail out.

Restart semantics come from the store: leases left by a crashed or stopped process are released when the gateway
opens the queue, so attempts in flight become due again (at-least-once). :meth:`Scheduler.stop` lets in-flight
attempts finish (bounded) before cancelling, so a clean shutdown does not deliver twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace

from mxgate.connectors.outbound import OutboundConnector
from mxgate.core import routing
from mxgate.core.delivery import (
    DEFERRED,
    DELIVERED,
    FAILED,
    Deliverer,
    DeliveryResult,
    OutgoingMessage,
    RecipientOutcome,
)
from mxgate.core.messages import MessageOptions, NewRecipient, QueuedMessage, RecipientStatus
from mxgate.core.metadata import MessageHeaders, MetaInput
from mxgate.core.outcomes import Destination
from mxgate.core.queue.dsn import recipient_dsn
from mxgate.core.queue.errors import MessageNotFoundError, QueueError
from mxgate.core.queue.reporting import Reporter
from mxgate.core.queue.retry import RetrySchedule
from mxgate.core.queue.store import QueueStore, RecipientResult
from mxgate.core.runtime import Runtime
from mxgate.core.tracking import TrackEvent

__all__ = ["Scheduler", "schedule_for", "tls_required_no"]

log = logging.getLogger(__name__)

RELEASE_RETRY_FIRST = 1.0  # seconds before the first retry of a lease release the store refused
RELEASE_RETRY_MAX = 30.0


def tls_required_no(asked: bool, body: bytes) -> bool:
    """RFC 8689: the sender asked that recipient-side TLS policies not block this message (``asked``: the
    message's ``meta.tls_required_no``, set by a plugin such as TLS-RPT; or a ``TLS-Required: No`` header in it)."""
    if asked:
        return True
    end = body.find(b"\r\n\r\n")
    for line in (body if end < 0 else body[:end]).split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"tls-required":
            return value.strip().lower() == b"no"
    return False


def schedule_for(connector: OutboundConnector | None) -> RetrySchedule:
    """The retry schedule of a connector (the defaults for an unknown one)."""
    if connector is None:
        return RetrySchedule(delay_warning_after=None)
    maximum = max(connector.retry_max, connector.retry_first)
    warn = connector.delay_warning_after
    if warn is not None and warn >= connector.give_up_after:
        warn = None
    return RetrySchedule(
        first=connector.retry_first,
        maximum=maximum,
        give_up_after=connector.give_up_after,
        delay_warning_after=warn,
    )


@dataclass(frozen=True, slots=True)
class _Job:
    destination: Destination
    recipients: tuple[str, ...]


class Scheduler:
    """Delivers what is due. ``poll_interval`` bounds how late a flush from another process is noticed."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        poll_interval: float = 1.0,
        lease_seconds: float = 900.0,
        batch: int = 100,
        retry_share: float = 0.5,
        rng: random.Random | None = None,
        deliverer: Deliverer | None = None,
    ) -> None:
        self.runtime = runtime
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.batch = batch
        # Retries (messages with a recipient deferred before) take at most this many of the `batch` slots, so a
        # backlog that comes due for a destination that is down leaves the rest to new mail.
        self.retry_slots = max(1, int(batch * retry_share))
        self._retrying: set[asyncio.Task[None]] = set()
        self._retry_backlog = False  # due retries may be waiting for their share of the slots
        self.rng = rng or random.Random()
        self.deliverer = deliverer or Deliverer(runtime)
        self.reporter = Reporter(runtime, self.wakeup)  # reports, DSNs, delay warnings
        self._event = asyncio.Event()
        self._stopping = False
        self._inflight: set[asyncio.Task[None]] = set()
        self._reserved = 0  # enqueue() calls that will start a delivery once their put commits
        self._backlog = False  # due messages may be waiting in the store for a round
        self._releasing: set[asyncio.Task[None]] = set()  # leases to give back once the store takes writes
        self._connector_sems: dict[str, asyncio.Semaphore] = {}
        self._destination_sems: weakref.WeakValueDictionary[tuple[str, str], asyncio.Semaphore] = (
            weakref.WeakValueDictionary()
        )

    # -- lifecycle ---------------------------------------------------------------------------------------

    @property
    def queue(self) -> QueueStore:
        if self.runtime.queue is None:
            raise RuntimeError("the scheduler needs runtime.queue")
        return self.runtime.queue

    def wakeup(self) -> None:
        self._event.set()

    def _room(self) -> int:
        return self.batch - len(self._inflight) - self._reserved

    def _start(self, msg: QueuedMessage, body: bytes | None = None) -> None:
        task = asyncio.ensure_future(self._guarded(msg, body))
        self._inflight.add(task)
        if any(r.status is RecipientStatus.DEFERRED for r in msg.recipients):
            self._retrying.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if task in self._retrying:
            self._retrying.discard(task)
            free = self.retry_slots - len(self._retrying)
            if self._retry_backlog and free >= max(1, self.retry_slots // 10) and self._room() > 0:
                self._event.set()
        if self._backlog and self._room() >= max(1, self.batch // 10):
            self._event.set()

    async def enqueue(
        self,
        sender: str,
        recipients: Sequence[str | NewRecipient],
        data: bytes,
        *,
        meta: MetaInput = None,
        message_id: str | None = None,
        now: float,
        options: MessageOptions | None = None,
    ) -> str:
        """Queue a received message durably (returns once it is on disk) and, when a slot is free, start
        delivering it at once from memory. A caller cancelled while the put commits does not strand the
        message: its delivery starts anyway."""
        queue = self.queue
        if self._stopping or self._room() <= 0:
            queue_id = await queue.put(
                sender, recipients, data, meta=meta, message_id=message_id, now=now, options=options
            )
            self._backlog = True
            self.wakeup()
            return queue_id
        self._reserved += 1
        put = asyncio.ensure_future(
            queue.put_leased(
                sender,
                recipients,
                data,
                meta=meta,
                message_id=message_id,
                now=now,
                lease_seconds=self.lease_seconds,
                options=options,
            )
        )

        def committed(done: asyncio.Future[QueuedMessage]) -> None:
            self._reserved -= 1
            if done.cancelled() or done.exception() is not None:
                return
            if self._stopping:  # stays leased until the next start releases it
                return
            self._start(done.result(), data)

        put.add_done_callback(committed)
        msg = await asyncio.shield(put)
        return msg.id

    async def run(self) -> None:
        """The background loop: a round, then wait for a wake-up or the poll interval."""
        while not self._stopping:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("delivery scheduler round failed")
            self._event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), self.poll_interval)

    async def run_once(self) -> int:
        """Lease what is due and start delivering it; returns how many messages were leased."""
        if self._stopping:
            return 0
        room = self._room()
        if room <= 0:
            self._backlog = True
            return 0
        self._backlog = False
        retry_room = max(0, self.retry_slots - len(self._retrying))
        leased = await self.queue.lease_due(self.runtime.clock(), room, self.lease_seconds, retry_limit=retry_room)
        retries = sum(any(r.status is RecipientStatus.DEFERRED for r in m.recipients) for m in leased)
        if len(leased) == room:
            self._backlog = True  # there may be more
        # retries held back by their share of the slots: a round when some of theirs are free again
        self._retry_backlog = retries >= retry_room
        for msg in leased:
            self._start(msg)
        return len(leased)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until the attempts in flight are done."""
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=timeout)

    async def stop(self, timeout: float = 30.0) -> None:
        """Lease nothing more; let attempts in flight finish (up to ``timeout``), then cancel the rest (their
        leases are given back, so they are due again); QUIT the sessions kept for reuse."""
        self._stopping = True
        self.wakeup()
        await self.drain(timeout)
        for task in list(self._inflight):
            task.cancel()
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        for task in list(self._releasing):  # the next start releases every lease anyway
            task.cancel()
        await self.deliverer.close()  # QUIT the idle sessions kept for reuse

    # -- one message -------------------------------------------------------------------------------------

    async def _guarded(self, msg: QueuedMessage, body: bytes | None = None) -> None:
        try:
            await self.process(msg, body)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.queue.release_lease(msg.id))
            raise
        except MessageNotFoundError:
            return  # deleted (queue delete) while it was being delivered: nothing to record
        except QueueError as exc:  # the store refused the record (e.g. disk full): try the message again later
            log.warning(
                "could not record a delivery attempt; the message will be attempted again",
                extra={"queue_id": msg.id, "error": str(exc)},
            )
            self._release_later(msg.id)
        except Exception as exc:
            log.exception("delivery of a message failed", extra={"queue_id": msg.id})
            await self._internal_error(msg, exc)

    def _release_later(self, msg_id: str) -> None:
        """Give a lease back once the store takes writes again (retrying with backoff, bounded by the lease), so
        the message is attempted again as soon as the disk has room rather than when its lease runs out."""

        async def retry() -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.lease_seconds
            delay = RELEASE_RETRY_FIRST
            while not self._stopping and loop.time() < deadline:
                await asyncio.sleep(delay)
                try:
                    await self.queue.release_lease(msg_id)
                except QueueError:
                    delay = min(delay * 2, RELEASE_RETRY_MAX)
                    continue
                self._backlog = True
                self.wakeup()
                return

        task = asyncio.ensure_future(retry())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _internal_error(self, msg: QueuedMessage, exc: BaseException) -> None:
        now = self.runtime.clock()
        reply = f"451 4.3.0 internal error: {type(exc).__name__}"
        results = []
        for r in msg.recipients:
            if r.is_final:
                continue
            schedule = schedule_for(self.runtime.config.outbound(r.route) if r.route else None)
            nxt = schedule.next_attempt(msg.received_at, r.attempts + 1, now, self.rng)
            if nxt is None:
                results.append(RecipientResult(r.address, RecipientStatus.FAILED, reply, None))
            else:
                results.append(RecipientResult(r.address, RecipientStatus.DEFERRED, reply, nxt))
        try:
            if results:
                await self.queue.record_results(msg.id, results, now=now, detail="internal error")
            else:
                await self.queue.release_lease(msg.id)
        except Exception as exc2:
            log.warning("could not record an internal error", extra={"queue_id": msg.id, "error": str(exc2)})
            self._release_later(msg.id)

    async def process(self, msg: QueuedMessage, body: bytes | None = None) -> None:
        """Categorize (:func:`mxgate.core.routing.categorize`) and deliver the due recipients of one leased message,
        record and report the results. ``body``: the message data when the caller has it (a message just
        received); read from the store otherwise."""
        runtime, queue, tracking = self.runtime, self.queue, self.runtime.tracking
        now = runtime.clock()
        if body is None:
            try:
                body = await queue.body(msg.id)
            except MessageNotFoundError:
                return  # deleted (or finished) since it was leased
        pending = [r for r in msg.recipients if not r.is_final and r.next_attempt <= now]
        if not pending:
            await queue.release_lease(msg.id)
            return

        headers = MessageHeaders.of_message(body)
        plan = await routing.categorize(runtime.hooks, runtime.config.outbound, msg, pending, headers)
        results: dict[str, RecipientResult] = {}
        outcomes: dict[str, RecipientOutcome] = {}
        for decision in plan.decisions:
            rcpt = decision.recipient
            if isinstance(decision, routing.Expanded):
                await self._expand(msg, rcpt, decision.new_recipients, body, now)
                results[rcpt] = RecipientResult(rcpt, RecipientStatus.DELIVERED, decision.reply, None)
            elif isinstance(decision, routing.Unroutable):
                why = decision.reply
                results[rcpt] = RecipientResult(rcpt, RecipientStatus.FAILED, why, None)
                outcomes[rcpt] = RecipientOutcome(rcpt, FAILED, why, decision.status)
            else:
                tracking.write(
                    TrackEvent.ROUTE,
                    queue_id=msg.id,
                    message_id=msg.message_id,
                    recipient=rcpt,
                    connector=decision.destination.connector.name,
                    destination=decision.destination.domain,
                )
        groups = plan.groups
        new_routes = plan.route_changes(msg.recipients)

        jobs = [_Job(d, tuple(rcpts)) for d, rcpts in groups.items()]
        delivered = await asyncio.gather(*(self._deliver(msg, job, body) for job in jobs))
        mx_hosts = {res.mx_host for res in delivered if res.mx_host}
        for res in delivered:
            schedule = schedule_for(res.destination.connector)
            for out in res.outcomes:
                outcomes[out.recipient] = out
                results[out.recipient] = self._result(msg, out, schedule, now)

        previous_attempt = None
        if any(schedule_for(d.connector).delay_warning_after is not None for d in groups):
            history = await queue.attempts(msg.id)
            previous_attempt = max((a.at for a in history), default=None)

        ordered = [results[r.address] for r in pending if r.address in results]
        detail = None
        if len(mx_hosts) > 1:
            detail = "; ".join(f"{o.recipient}={o.mx_host}" for o in outcomes.values() if o.mx_host)
        updated = await queue.record_results(
            msg.id,
            ordered,
            now=now,
            mx=next(iter(mx_hosts)) if len(mx_hosts) == 1 else None,
            detail=detail,
            routes=new_routes,
            known=msg,
        )
        reporter = self.reporter
        await reporter.report(updated, ordered, outcomes, now)
        await reporter.dsn(updated, ordered, outcomes, now, body)
        await reporter.delay_warning(
            updated, [(schedule_for(d.connector), rcpts) for d, rcpts in groups.items()], previous_attempt, now
        )

    def _result(
        self, msg: QueuedMessage, out: RecipientOutcome, schedule: RetrySchedule, now: float
    ) -> RecipientResult:
        if out.result == DELIVERED:
            return RecipientResult(out.recipient, RecipientStatus.DELIVERED, out.reply, None)
        if out.result == FAILED:
            return RecipientResult(out.recipient, RecipientStatus.FAILED, out.reply, None)
        current = msg.recipient(out.recipient)
        attempts = (current.attempts if current is not None else 0) + 1
        nxt = schedule.next_attempt(msg.received_at, attempts, now, self.rng)
        if nxt is None:
            return RecipientResult(
                out.recipient,
                RecipientStatus.FAILED,
                f"{out.reply} (gave up after {attempts} attempts)",
                None,
            )
        return RecipientResult(out.recipient, RecipientStatus.DEFERRED, out.reply, nxt)

    async def _expand(self, msg: QueuedMessage, original: str, new: Sequence[str], body: bytes, now: float) -> None:
        """Queue the addresses an expansion gave in a message of their own (through ``runtime.submit``), marked
        categorized, with the original's metadata and options (REQUIRETLS, RET, ENVID stay with the content)."""
        if not new:
            self.runtime.tracking.write(
                TrackEvent.ROUTE, queue_id=msg.id, message_id=msg.message_id, recipient=original, expanded_to=[]
            )
            return
        meta = replace(msg.meta, categorized=True, expanded_from=(msg.id, original))
        new_id = await self.runtime.submit(
            msg.sender, list(new), body, meta=meta, message_id=msg.message_id, now=now, options=msg.options
        )
        self.runtime.tracking.write(
            TrackEvent.ROUTE,
            queue_id=msg.id,
            message_id=msg.message_id,
            recipient=original,
            expanded_to=list(new),
            new_queue_id=new_id,
        )
        self.wakeup()

    async def _deliver(self, msg: QueuedMessage, job: _Job, body: bytes) -> DeliveryResult:
        runtime = self.runtime
        dest = job.destination
        connector = dest.connector
        limit = connector.max_connections
        per_dest = connector.max_connections_per_destination
        csem = self._connector_sems.get(connector.name)
        if csem is None:
            csem = self._connector_sems[connector.name] = asyncio.Semaphore(limit)
        key = (connector.name, dest.domain)
        dsem = self._destination_sems.get(key)
        if dsem is None:
            dsem = asyncio.Semaphore(per_dest)
            self._destination_sems[key] = dsem
        outgoing = OutgoingMessage(
            queue_id=msg.id,
            sender=msg.sender,
            recipients=job.recipients,
            data=body,
            received_at=msg.received_at,
            envid=msg.options.envid,
            smtputf8=msg.meta.smtputf8,
            body_8bit=msg.meta.body_8bit,
            # RFC 8689 §4.1: with REQUIRETLS the TLS-Required header field is ignored
            tls_optional=not msg.requiretls and tls_required_no(msg.meta.tls_required_no, body),
            dsn_ret=msg.options.dsn_ret,
            recipient_dsn=tuple(recipient_dsn(msg.recipient(r)) for r in job.recipients),
            requiretls=msg.requiretls,
        )
        async with csem, dsem:
            result = await self.deliverer.deliver(dest, outgoing)
        counts: dict[str, int] = {}
        for o in result.outcomes:
            counts[o.result] = counts.get(o.result, 0) + 1
        runtime.tracking.write(
            TrackEvent.ATTEMPT,
            queue_id=msg.id,
            message_id=msg.message_id,
            connector=connector.name,
            destination=dest.domain,
            mx=result.mx_host,
            ip=result.peer_ip,
            tls=result.tls,
            verification=result.verification,
            results=counts,
        )
        summary = DELIVERED if counts.get(DELIVERED) else (DEFERRED if counts.get(DEFERRED) else FAILED)
        await runtime.hooks.on_event("delivery_attempt", connector=connector.name, result=summary)
        return result
