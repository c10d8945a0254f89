"""Delivery records: what one attempt and one delivery look like to hooks, the scheduler and the CLI."""

from __future__ import annotations

from dataclasses import dataclass

from mxgate.core.model import DsnRet, RecipientDsn
from mxgate.core.outcomes import Destination

__all__ = [
    "DEFERRED",
    "DELIVERED",
    "FAILED",
    "DeliveryResult",
    "OutgoingMessage",
    "RecipientOutcome",
]

DELIVERED = "delivered"
DEFERRED = "deferred"
FAILED = "failed"


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """What one transaction carries."""

    queue_id: str
    sender: str  # "" = null reverse-path
    recipients: tuple[str, ...]
    data: bytes
    received_at: float = 0.0
    envid: str | None = None
    smtputf8: bool = False  # the client asked for SMTPUTF8 when it gave us the message
    body_8bit: bool = False  # BODY=8BITMIME was declared
    tls_optional: bool = False  # RFC 8689 "TLS-Required: No": recipient-side policies (DANE, MTA-STS) do not bind
    # RFC 3461, passed on to a next hop that offers DSN: RET, and each recipient's NOTIFY/ORCPT (parallel to
    # ``recipients``; empty: none given)
    dsn_ret: DsnRet | None = None
    recipient_dsn: tuple[RecipientDsn, ...] = ()
    # RFC 8689 REQUIRETLS: only over TLS to a peer authenticated by DANE, MTA-STS enforce or the connector's
    # validation, and only to a next hop that offers REQUIRETLS; else the message fails with 5.7.30
    requiretls: bool = False
    # a recipient callout: MAIL and RCPT only, never DATA. "delivered" then means the next hop accepted the RCPT;
    # a refused MAIL (or anything but an RCPT reply) is "deferred": the recipient could not be verified.
    verify_only: bool = False


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    recipient: str
    result: str  # "delivered" | "deferred" | "failed"
    reply: str  # "250 2.0.0 Ok", or our own text for local failures
    status: str  # RFC 3463 code
    mx_host: str | None = None
    remote: bool = False  # the reply came from the remote server (DSN Diagnostic-Code)
    dsn_passed: bool = False  # delivered to a next hop that offers DSN: NOTIFY went on with the message


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    destination: Destination
    outcomes: tuple[RecipientOutcome, ...]
    mx_host: str | None = None
    peer_ip: str | None = None
    tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384" when the transaction ran under TLS
    verification: str | None = None
    steps: tuple[str, ...] = ()  # what happened, for `connector validate` and logs
    transcript: tuple[str, ...] = ()
