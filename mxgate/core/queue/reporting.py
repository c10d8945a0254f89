"""What the scheduler tells about a delivery attempt: reports, DSNs, delay warnings.

After each attempt the scheduler (:mod:`mxgate.core.queue.scheduler`) hands the recorded results to a
:class:`Reporter`: :meth:`Reporter.report` calls ``on_delivered``/``on_deferred``/``on_failed`` per recipient and
writes the tracking log; :meth:`Reporter.dsn` and :meth:`Reporter.delay_warning` build a DSN (RFC 3464,
:func:`~mxgate.core.queue.dsn.build_dsn`) and queue it through ``runtime.submit`` with the null sender (never to the
null sender, never for a report or an auto-submitted message: no loops).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from mxgate.core.delivery import DELIVERED, RecipientOutcome
from mxgate.core.messages import MessageOptions, QueuedMessage, RecipientStatus
from mxgate.core.metadata import MessageMeta
from mxgate.core.model import DsnNotify
from mxgate.core.outcomes import DeliveryReport
from mxgate.core.queue.dsn import build_dsn, recipient_dsn
from mxgate.core.queue.errors import MessageNotFoundError
from mxgate.core.queue.retry import RetrySchedule
from mxgate.core.queue.store import RecipientResult
from mxgate.core.runtime import Runtime
from mxgate.core.tracking import TrackEvent

__all__ = ["Reporter"]


class Reporter:
    """Reports of one scheduler; ``wakeup`` wakes the scheduler once a DSN is queued."""

    def __init__(self, runtime: Runtime, wakeup: Callable[[], None]) -> None:
        self.runtime = runtime
        self._wakeup = wakeup

    async def report(
        self,
        msg: QueuedMessage,
        results: Sequence[RecipientResult],
        outcomes: dict[str, RecipientOutcome],
        now: float,
    ) -> None:
        """Per recipient: ``on_delivered`` / ``on_deferred`` / ``on_failed``, a tracking-log line, a metrics event."""
        hooks, tracking = self.runtime.hooks, self.runtime.tracking
        for res in results:
            out = outcomes.get(res.recipient)
            rcpt = msg.recipient(res.recipient)
            connector = (rcpt.route if rcpt is not None else None) or ""
            report = DeliveryReport(
                message_id=msg.id,
                recipient=res.recipient,
                connector=connector,
                result=str(res.status),
                reply=res.reply,
                mx_host=out.mx_host if out is not None else None,
                received_at=msg.received_at,
                at=now,
            )
            event, notify = {
                RecipientStatus.DELIVERED: (TrackEvent.DELIVER, hooks.on_delivered),
                RecipientStatus.DEFERRED: (TrackEvent.DEFER, hooks.on_deferred),
            }.get(res.status, (TrackEvent.FAIL, hooks.on_failed))
            tracking.write(
                event,
                queue_id=msg.id,
                message_id=msg.message_id,
                recipient=res.recipient,
                connector=connector,
                mx=report.mx_host,
                reply=res.reply,
                next_attempt=res.next_attempt if res.status is RecipientStatus.DEFERRED else None,
            )
            await notify(report)
            await hooks.on_event("queue", action=str(res.status), connector=connector or "none")

    async def dsn(
        self,
        msg: QueuedMessage,
        results: Sequence[RecipientResult],
        outcomes: dict[str, RecipientOutcome],
        now: float,
        body: bytes | None = None,
    ) -> None:
        """A failure DSN for the recipients that failed for good, a "relayed" one for those delivered to a next hop
        without DSN support that asked for success notices (RFC 3461 §6.2.2)."""
        failed = []
        relayed = []
        for res in results:
            if res.status is RecipientStatus.DELIVERED:
                # RFC 3461 §6.2.2: a next hop without DSN cannot report success; we report "relayed" ourselves
                out = outcomes.get(res.recipient)
                rcpt = msg.recipient(res.recipient)
                asked = rcpt is not None and DsnNotify.SUCCESS in (recipient_dsn(rcpt).notify or ())
                if out is not None and out.remote and not out.dsn_passed and asked:
                    status = out.status if out.status.startswith("2.") else "2.0.0"
                    relayed.append((res.recipient, status, res.reply, out.mx_host, "relayed"))
                continue
            if res.status is not RecipientStatus.FAILED:
                continue
            out = outcomes.get(res.recipient)
            if out is not None and out.result == DELIVERED:
                continue
            status = out.status if out is not None else _status_of(res.reply)
            if status.startswith("4."):  # a transient failure that ran out of retries is reported as final
                status = "5" + status[1:]
            failed.append((res.recipient, status, res.reply, out.mx_host if out is not None else None, "failed"))
        if failed:
            await self._send_dsn(msg, failed, now, None, body)
        if relayed:
            await self._send_dsn(msg, relayed, now, None)

    async def delay_warning(
        self,
        msg: QueuedMessage,
        groups: Sequence[tuple[RetrySchedule, Sequence[str]]],
        previous_attempt: float | None,
        now: float,
    ) -> None:
        """A delay warning (a "delayed" DSN) for the deferred recipients of ``groups`` (each with its connector's
        retry schedule) once the schedule says one is due and none was sent at the previous attempt."""
        delayed = []
        retry_until = None
        for schedule, rcpts in groups:
            if schedule.delay_warning_after is None:
                continue
            already = (
                previous_attempt is not None and previous_attempt - msg.received_at >= schedule.delay_warning_after
            )
            if not schedule.delay_warning_due(msg.received_at, now, already_warned=already):
                continue
            for address in rcpts:
                r = msg.recipient(address)
                if r is not None and r.status is RecipientStatus.DEFERRED:
                    delayed.append((address, _status_of(r.last_error or ""), r.last_error, None, "delayed"))
                    retry_until = schedule.expires_at(msg.received_at)
        if delayed:
            until = datetime.fromtimestamp(retry_until, tz=UTC) if retry_until is not None else None
            await self._send_dsn(msg, delayed, now, until)

    async def _send_dsn(
        self,
        msg: QueuedMessage,
        items: Sequence[tuple[str, str, str | None, str | None, str]],
        now: float,
        retry_until: datetime | None,
        body: bytes | None = None,
    ) -> None:
        """``body``: the original message, returned whole in a failure DSN when the sender asked (RET=FULL).

        The DSN of a REQUIRETLS message (RFC 8689 §5) returns its headers only, never the content, and is itself
        sent with REQUIRETLS: it travels only as the original had to."""
        queue = self.runtime.queue
        if queue is None:
            raise RuntimeError("the scheduler needs runtime.queue")
        try:
            headers = await queue.headers(msg.id)
        except MessageNotFoundError:
            return
        report = build_dsn(
            reporting_mta=self.runtime.config.server.hostname,
            original=msg,
            original_headers=headers,
            failed=items,
            now=datetime.fromtimestamp(now, tz=UTC),
            retry_until=retry_until,
            original_message=None if msg.requiretls else body,
        )
        if report is None:
            return
        options = MessageOptions(requiretls=True) if msg.requiretls else None
        dsn_id = await self.runtime.submit(
            "", [msg.sender], report, meta=MessageMeta(dsn_for=msg.id), now=now, options=options
        )
        self.runtime.tracking.write(
            TrackEvent.DSN,
            queue_id=msg.id,
            message_id=msg.message_id,
            dsn_queue_id=dsn_id,
            action=items[0][4],
            to=msg.sender,
            recipients=[i[0] for i in items],
        )
        await self.runtime.hooks.on_event("queue", action="dsn", dsn=items[0][4])
        self._wakeup()


def _status_of(reply: str) -> str:
    parts = reply.split(" ", 2)
    if len(parts) >= 2 and parts[1][:1] in "245" and parts[1].count(".") == 2:
        return parts[1]
    code = parts[0] if parts else ""
    return f"{code[:1]}.0.0" if code[:1] in ("4", "5") else "4.0.0"
