"""Recipient verification by callout (Postfix's ``reject_unverified_recipient``, Exim's ``verify = recipient/callout``).

A callout asks the next hop a recipient would be delivered to whether it takes that recipient, without sending a
message: it is routed exactly like a queued message (``resolve_route``, the same connector, the same next hop from
``resolve_next_hop``, the same TLS policies, verification and AUTH), and the :class:`~mxgate.core.delivery.Deliverer`
runs the session with ``verify_only``: MAIL FROM (the null sender by default), RCPT TO, then RSET/QUIT; DATA is
never sent. Nothing is queued or tracked. Plugins reach it through :meth:`mxgate.core.runtime.Runtime.callout`;
caching, rate limits and what to answer the client are the caller's business (the ``recipients`` agent).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from mxgate.core.delivery import DEFERRED, DELIVERED, Deliverer, OutgoingMessage
from mxgate.core.messages import QueuedMessage, QueuedRecipient, RecipientStatus
from mxgate.core.model import Address
from mxgate.core.outcomes import CalloutResult, CalloutVerdict
from mxgate.core.routing import Unroutable, route_recipient

if TYPE_CHECKING:
    from mxgate.core.runtime import Runtime

__all__ = ["CALLOUT_QUEUE_ID", "callout"]

#: The queue id routing hooks see for a callout (its message is not in the queue).
CALLOUT_QUEUE_ID = "callout"


async def callout(
    runtime: Runtime, recipient: Address, *, sender: Address | None = None, timeout: float = 10.0
) -> CalloutResult:
    """Verify ``recipient`` at its next hop; at most ``timeout`` seconds in all (each connect and reply is capped
    at it too). ``sender`` is the MAIL FROM of the callout (default ``<>``)."""
    rcpt = str(recipient)
    mail_from = "" if sender is None else str(sender)
    now = runtime.clock()
    probe = QueuedMessage(
        id=CALLOUT_QUEUE_ID,
        sender=mail_from,
        recipients=(QueuedRecipient(rcpt, RecipientStatus.QUEUED, 0, None, None, now),),
        received_at=now,
        size=0,
        message_id=None,
        held=False,
    )
    decision = await route_recipient(runtime.hooks, runtime.config.outbound, probe, recipient)
    if isinstance(decision, Unroutable):
        why = f"550 5.4.4 no outbound connector routes {recipient.domain}"
        return CalloutResult(rcpt, CalloutVerdict.REJECTED, why, "5.4.4")
    destination = decision.destination
    connector = destination.connector
    message = OutgoingMessage(
        CALLOUT_QUEUE_ID,
        mail_from,
        (rcpt,),
        b"",
        received_at=now,
        smtputf8=not rcpt.isascii(),
        verify_only=True,
    )
    try:
        async with asyncio.timeout(timeout):
            result = await Deliverer(runtime, reuse=False, timeout_cap=timeout).deliver(destination, message)
    except TimeoutError:
        why = f"451 4.4.3 no answer from {destination.domain} within {timeout:g} s"
        return CalloutResult(rcpt, CalloutVerdict.UNAVAILABLE, why, "4.4.3", connector.name)
    outcome = next((o for o in result.outcomes if o.recipient == rcpt), None)
    if outcome is None:  # pragma: no cover - the deliverer answers for every recipient
        return CalloutResult(rcpt, CalloutVerdict.UNAVAILABLE, "451 4.4.3 no answer", "4.4.3", connector.name)
    verdict = (
        CalloutVerdict.ACCEPTED
        if outcome.result == DELIVERED
        else CalloutVerdict.UNAVAILABLE
        if outcome.result == DEFERRED
        else CalloutVerdict.REJECTED
    )
    return CalloutResult(
        rcpt, verdict, outcome.reply, outcome.status, connector.name, outcome.mx_host or result.mx_host, outcome.remote
    )
