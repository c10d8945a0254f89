"""The mail transaction over an established outbound session, and the :class:`DeliveryResult` it comes to.

:func:`send_message` checks what the message needs of the peer (SIZE, SMTPUTF8, 8BITMIME, REQUIRETLS) and runs
:func:`run_transaction`: MAIL/RCPT/DATA (or BDAT) pipelined where offered, one
:class:`~mxgate.core.delivery.model.RecipientOutcome` per recipient, the session back to the
:class:`~mxgate.core.delivery.pool.SessionPool` (or QUIT). A callout (``verify_only``) ends at RCPT
(:func:`callout_result`). :class:`AttemptLog` is the bookkeeping of one delivery (steps, transcript, failures)
that the results carry. Connecting and TLS are :mod:`mxgate.core.delivery.driver`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mxgate.core.delivery.model import (
    DEFERRED,
    DELIVERED,
    FAILED,
    DeliveryResult,
    OutgoingMessage,
    RecipientOutcome,
)
from mxgate.core.delivery.plan import (
    AttemptFailure,
    Capabilities,
    describe_extensions,
    local_reply,
    rcpt_params,
    transaction_params,
)
from mxgate.core.delivery.pool import RSET_TIMEOUT, PooledSession, SessionKey, SessionPool
from mxgate.core.outcomes import Destination, HopHost, PeerVerification
from mxgate.core.smtp.client import SmtpClient, SmtpClientError, SmtpReply, StaleSession

if TYPE_CHECKING:
    from mxgate.connectors.outbound import OutboundConnector

__all__ = [
    "AttemptLog",
    "callout_result",
    "capabilities_of",
    "run_transaction",
    "same_for_all",
    "send_message",
    "transaction_result",
]


@dataclass
class AttemptLog:
    """Mutable bookkeeping of one delivery (several hosts, several addresses)."""

    steps: list[str] = field(default_factory=list)
    transcript: list[str] = field(default_factory=list)
    failures: list[AttemptFailure] = field(default_factory=list)
    verification: PeerVerification | None = None  # of the last handshake (probes report it)

    def fail(self, failure: AttemptFailure, note: str = "") -> None:
        if note:
            self.steps.append(note)
        self.failures.append(failure)


async def send_message(
    pool: SessionPool,
    session: PooledSession,
    key: SessionKey | None,
    connector: OutboundConnector,
    destination: Destination,
    host: HopHost,
    message: OutgoingMessage,
    rec: AttemptLog,
    *,
    reset: bool = False,
) -> DeliveryResult | None:
    """The message over an established session: what it needs of the peer (SIZE, SMTPUTF8, 8BITMIME, from
    the session's EHLO), then the transaction. ``None`` when the peer cannot take it (recorded in ``rec``).

    ``reset``: a pooled session not checked yet: RSET goes in front of the transaction (pipelined where offered);
    :class:`~mxgate.core.smtp.client.StaleSession` is raised when it fails (nothing of the transaction counts:
    the caller drops the session and tries another)."""
    client = session.client
    verification = session.verification
    verified_tls = (
        session.tls_info is not None
        and verification is not None
        and verification.ok
        and verification.label in ("verified", "trusted")
    )
    caps = session.capabilities
    if caps is None:
        caps = session.capabilities = capabilities_of(client)
    if session.messages == 0:
        rec.steps.append(f"{session.where}: extensions {describe_extensions(caps)}")
    params, unmet = transaction_params(message, caps, session.where, verified_tls=verified_tls)
    if unmet is not None:
        rec.failures.append(unmet)
        await pool.finish(session, key, connector, reset=False)  # nothing was started: still clean
        rec.transcript.extend(client.transcript)
        client.transcript.clear()
        return None
    session.messages += 1
    return await run_transaction(pool, session, key, connector, destination, host, message, params, rec, reset=reset)


async def run_transaction(
    pool: SessionPool,
    session: PooledSession,
    key: SessionKey | None,
    connector: OutboundConnector,
    destination: Destination,
    host: HopHost,
    message: OutgoingMessage,
    params: list[str],
    rec: AttemptLog,
    *,
    reset: bool = False,
) -> DeliveryResult:
    client, tls_info, verification = session.client, session.tls_info, session.verification
    mx = host.name
    recipients = message.recipients
    outcomes: dict[str, RecipientOutcome] = {}
    accepted: list[str] = []
    per_rcpt = rcpt_params(message, session.capabilities or capabilities_of(client))
    bdat = connector.chunking and client.supports("CHUNKING") and not message.verify_only
    reset_timeout = min(connector.command_timeout, RSET_TIMEOUT)
    try:
        if bdat:
            mail, rcpts, data = await client.envelope_bdat(
                message.sender,
                params,
                recipients,
                message.data,
                per_recipient=per_rcpt,
                reset=reset,
                reset_timeout=reset_timeout,
            )
        else:
            mail, rcpts, data = await client.envelope(
                message.sender,
                params,
                recipients,
                data=not message.verify_only,
                per_recipient=per_rcpt,
                reset=reset,
                reset_timeout=reset_timeout,
            )
        if message.verify_only:
            return await callout_result(pool, session, key, connector, destination, host, message, rec, mail, rcpts)
        if not mail.is_positive:
            result = FAILED if mail.is_permanent else DEFERRED
            for r in recipients:
                outcomes[r] = RecipientOutcome(r, result, str(mail), mail.status, mx, True)
            if not bdat and data is not None and data.code == 354:
                await client.abort_data()
                await client.quit()
            else:
                await pool.finish(session, key, connector, reset=True)
            return transaction_result(destination, message, outcomes, rec, client, host, tls_info, verification)
        for r, reply in zip(recipients, rcpts, strict=False):
            if reply.is_positive:
                accepted.append(r)
            else:
                outcomes[r] = RecipientOutcome(
                    r, FAILED if reply.is_permanent else DEFERRED, str(reply), reply.status, mx, True
                )
        if not accepted:
            if not bdat and data is not None and data.code == 354:
                await client.abort_data()
                await client.quit()
            else:
                await pool.finish(session, key, connector, reset=True)
            return transaction_result(destination, message, outcomes, rec, client, host, tls_info, verification)
        if data is None or (not bdat and data.code != 354):
            for r in accepted:
                if data is None:
                    outcomes[r] = RecipientOutcome(r, DEFERRED, local_reply(451, "4.4.2", "DATA not sent"), "4.4.2", mx)
                else:
                    outcomes[r] = RecipientOutcome(
                        r, FAILED if data.is_permanent else DEFERRED, str(data), data.status, mx, True
                    )
            await pool.finish(session, key, connector, reset=True)
            return transaction_result(destination, message, outcomes, rec, client, host, tls_info, verification)
        # BDAT: the reply to the last chunk (or the first refused one) is the final reply
        final = data if bdat else await client.send_data(message.data)
        for r in accepted:
            if final.is_positive:
                outcomes[r] = RecipientOutcome(
                    r, DELIVERED, str(final), final.status, mx, True, dsn_passed=client.supports("DSN")
                )
            else:
                outcomes[r] = RecipientOutcome(
                    r, FAILED if final.is_permanent else DEFERRED, str(final), final.status, mx, True
                )
        await pool.finish(session, key, connector, reset=not final.is_positive)
    except StaleSession:
        raise  # the pooled session failed its RSET: nothing was sent that counts; the caller takes another
    except SmtpClientError as exc:
        # Lost in the middle: whatever was not confirmed is deferred (at-least-once; RFC 5321 §6.1).
        client.abort()
        for r in recipients:
            if r not in outcomes:
                outcomes[r] = RecipientOutcome(
                    r, DEFERRED, local_reply(451, "4.4.2", f"{host.name}: {exc}"), "4.4.2", mx
                )
        rec.steps.append(f"{host.name}: {exc}")
    return transaction_result(destination, message, outcomes, rec, client, host, tls_info, verification)


async def callout_result(
    pool: SessionPool,
    session: PooledSession,
    key: SessionKey | None,
    connector: OutboundConnector,
    destination: Destination,
    host: HopHost,
    message: OutgoingMessage,
    rec: AttemptLog,
    mail: SmtpReply,
    rcpts: Sequence[SmtpReply],
) -> DeliveryResult:
    """A callout's answer: each RCPT reply as it came (2xx delivered, 5xx failed, 4xx deferred); a refused
    MAIL verifies nothing (deferred, whatever its code). Then RSET (or QUIT)."""
    mx = host.name
    outcomes: dict[str, RecipientOutcome] = {}
    if mail.is_positive:
        for r, reply in zip(message.recipients, rcpts, strict=False):
            result = DELIVERED if reply.is_positive else FAILED if reply.is_permanent else DEFERRED
            outcomes[r] = RecipientOutcome(r, result, str(reply), reply.status, mx, True)
    for r in message.recipients:
        if r not in outcomes:
            why = local_reply(451, "4.4.3", f"{mx} did not verify the recipient (MAIL: {mail})")
            outcomes[r] = RecipientOutcome(r, DEFERRED, why, "4.4.3", mx)
    await pool.finish(session, key, connector, reset=True)
    return transaction_result(
        destination, message, outcomes, rec, session.client, host, session.tls_info, session.verification
    )


# -- verification and outcomes -------------------------------------------------------------------------


def same_for_all(
    destination: Destination,
    message: OutgoingMessage,
    result: str,
    reply: str,
    status: str,
    rec: AttemptLog,
    *,
    remote: bool = False,
) -> DeliveryResult:
    outcomes = tuple(RecipientOutcome(r, result, reply, status, None, remote) for r in message.recipients)
    rec.steps.append(f"{result}: {reply}")
    return DeliveryResult(destination, outcomes, steps=tuple(rec.steps), transcript=tuple(rec.transcript))


def transaction_result(
    destination: Destination,
    message: OutgoingMessage,
    outcomes: dict[str, RecipientOutcome],
    rec: AttemptLog,
    client: SmtpClient,
    host: HopHost,
    tls_info: str | None,
    verification: PeerVerification | None,
) -> DeliveryResult:
    ordered = tuple(outcomes[r] for r in message.recipients if r in outcomes)
    for o in ordered:
        rec.steps.append(f"<{o.recipient}>: {o.result}: {o.reply}")
    rec.transcript.extend(client.transcript)
    client.transcript.clear()
    return DeliveryResult(
        destination,
        ordered,
        mx_host=host.name,
        peer_ip=client.host,
        tls=tls_info,
        verification=verification.label if verification is not None else None,
        steps=tuple(rec.steps),
        transcript=tuple(rec.transcript),
    )


def capabilities_of(client: SmtpClient) -> Capabilities:
    return Capabilities(frozenset(client.extensions), client.size_limit)
