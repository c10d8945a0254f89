"""From a finished transaction to a queue submission: the envelope and the received content (DATA's, unstuffed, or
BDAT's, assembled) become the message the hooks see, the ``Received:`` header, the queue's metadata and recipient
records, one ``runtime.submit`` call and the tracking record of the receipt. No sockets and no replies to the
client: the server (:func:`mxgate.core.smtp.data.accept_message`) calls the ``on_end_of_data`` hook in
between and answers ``250`` only after :func:`submit` returned a queue id.
"""

from __future__ import annotations

import email.utils
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mxgate.core.messages import MessageOptions, NewRecipient
from mxgate.core.metadata import MessageMeta
from mxgate.core.model import Envelope, IncomingMessage, RecipientDsn, Reply, TlsState
from mxgate.core.queue.errors import QueueFullError
from mxgate.core.smtp.session import R, ReceiveState

if TYPE_CHECKING:
    from mxgate.core.runtime import Runtime
    from mxgate.core.smtp.rdns import ReverseDns

__all__ = ["Submission", "message_of", "parse_headers", "prepare", "received_header", "submit", "too_long_lines"]

log = logging.getLogger(__name__)

MAX_TEXT_LINE = 998  # RFC 5321 §4.5.3.1.6, without CRLF


def parse_headers(block: bytes) -> tuple[tuple[str, str], ...]:
    """``Name: value`` pairs of a header block, unfolded; lines without a colon are ignored."""
    out: list[tuple[str, str]] = []
    for line in block.decode("utf-8", "surrogateescape").split("\r\n"):
        if not line:
            continue
        if line[0] in " \t":
            if out:
                name, value = out[-1]
                out[-1] = (name, f"{value} {line.strip()}")
            continue
        name, sep, value = line.partition(":")
        if sep and name and name == name.rstrip():
            out.append((name, value.strip()))
    return tuple(out)


def _clean(text: str, limit: int = 255) -> str:
    return "".join(c if c.isprintable() and c not in "()" else "?" for c in text[:limit])


def received_header(
    *,
    helo: str | None,
    ip: str,
    hostname: str,
    esmtp: bool,
    tls: TlsState | None,
    auth: bool,
    ident: str,
    recipients: tuple[str, ...],
    when: datetime,
    reverse_dns: str | None = None,
) -> bytes:
    """RFC 5321 §4.4 trace header; protocol names per RFC 3848; TLS details in Postfix's style."""
    literal = f"IPv6:{ip}" if ":" in ip else ip
    name = _clean(reverse_dns) if reverse_dns else "unknown"  # only a forward-confirmed name (FCrDNS)
    lines = [f"Received: from {_clean(helo or 'unknown')} ({name} [{literal}])"]
    if tls is not None:
        lines.append(f"\t(using {tls.version} with cipher {tls.cipher} ({tls.bits}/{tls.bits} bits))")
    proto = "ESMTP" if esmtp else "SMTP"
    if esmtp and tls is not None:
        proto += "S"
    if esmtp and auth:
        proto += "A"
    by = f"\tby {hostname} (mxgate) with {proto} id {ident}"
    if len(recipients) == 1:
        by += f"\r\n\tfor <{recipients[0]}>"
    lines.append(by + ";")
    lines.append(f"\t{_rfc5322_date(when)}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


_last_date: tuple[tuple[datetime, Any], str] | None = None  # ((the second, its zone), its text)


def _rfc5322_date(when: datetime) -> str:
    """``email.utils.format_datetime`` (to the second), remembered for the last second asked."""
    global _last_date
    key = (when.replace(microsecond=0), when.tzinfo)  # (aware datetimes of one instant are equal across zones)
    if _last_date is None or _last_date[0] != key:
        _last_date = (key, email.utils.format_datetime(when))
    return _last_date[1]


def too_long_lines(raw: bytes, text_line: int) -> bool:
    """A line of DATA content (unstuffed) over 998 octets (lines end at CRLF). Jumps from the last CRLF within
    998 octets of a line's start to the next line: a handful of searches for a message of short lines, no copy."""
    if len(raw) <= text_line:
        return False
    start, end = 0, len(raw)
    while end - start > MAX_TEXT_LINE:
        # a CRLF starting at most MAX_TEXT_LINE octets after ``start`` ends the line within the limit
        crlf = raw.rfind(b"\r\n", start, start + MAX_TEXT_LINE + 2)
        if crlf < 0:
            return True
        start = crlf + 2
    return False


def message_of(
    raw: bytes, head: IncomingMessage | None, parsed: tuple[bytes, tuple[tuple[str, str], ...]] | None = None
) -> IncomingMessage:
    """The message ``on_end_of_data`` sees: ``raw`` with its headers parsed, carrying the headers a plugin added
    at end of headers (``head``: the message ``on_end_of_headers`` saw). ``parsed``: a header block already
    parsed (``(block, parse_headers(block))``), used when it is exactly ``raw``'s header block."""
    j = raw.find(b"\r\n\r\n")
    end = len(raw) if j < 0 else j + 2
    if parsed is not None and len(parsed[0]) == end and raw.startswith(parsed[0]):
        headers = parsed[1]
    else:
        headers = parse_headers(raw if j < 0 else raw[:end])
    message = IncomingMessage(raw, headers)
    if head is not None:  # headers a plugin added at end of headers, and metadata set then
        for edit in head.added_headers:
            message.add_header(edit.name, edit.value)
        for key, value in head.meta.items():
            message.set_meta(key, value)
    return message


@dataclass(frozen=True, slots=True)
class Submission:
    """One ``runtime.submit`` call: everything the queue gets for a received message."""

    sender: str
    recipients: tuple[NewRecipient, ...]
    data: bytes  # headers plugins added + Received: + the message
    meta: MessageMeta
    message_id: str | None
    options: MessageOptions
    ident: str  # the Received: header's id: session id "." transaction number
    now: float


def _meta(
    state: ReceiveState, envelope: Envelope, message: IncomingMessage, listener: str, session_id: str
) -> MessageMeta:
    """What the queue keeps about this transaction (``message.meta`` for categorizer and delivery hooks)."""
    conn = state.tx_connector
    return MessageMeta(
        listener=listener,
        inbound_connector=conn.name if conn else "",
        session=session_id,
        client_ip=state.peer_ip,
        helo=state.helo or "",
        tls_version=state.tls.version if state.tls is not None else None,
        tls_cipher=state.tls.cipher if state.tls is not None else None,
        auth_user=state.auth_user,
        internal=conn is not None and conn.treat_as_internal,
        body_8bit=envelope.body.upper() == "8BITMIME",
        smtputf8=envelope.smtputf8,
        extra=message.meta,
    )


def prepare(
    state: ReceiveState,
    message: IncomingMessage,
    *,
    hostname: str,
    listener: str,
    session_id: str,
    ident: str,
    rdns: ReverseDns | None,
    now: float,
) -> Submission:
    """The submission for the transaction in ``state`` (its envelope) with ``message`` as accepted by the hooks."""
    envelope = state.envelope
    recipients = tuple(str(r) for r in envelope.rcpt_tos)
    dsn = envelope.rcpt_dsn if len(envelope.rcpt_dsn) == len(recipients) else (RecipientDsn(),) * len(recipients)
    added = b"".join(f"{e.name}: {e.value}\r\n".encode("utf-8", "surrogateescape") for e in message.added_headers)
    received = received_header(
        helo=state.helo,
        ip=state.peer_ip,
        hostname=hostname,
        esmtp=state.esmtp,
        tls=state.tls,
        auth=state.auth_user is not None,
        ident=ident,
        recipients=recipients,
        when=datetime.fromtimestamp(now, UTC),
        reverse_dns=rdns.name if rdns else None,
    )
    return Submission(
        sender=str(envelope.mail_from),
        recipients=tuple(NewRecipient(r, d.notify_text, d.orcpt_text) for r, d in zip(recipients, dsn, strict=True)),
        data=added + received + message.data,
        meta=_meta(state, envelope, message, listener, session_id),
        message_id=message.get_header("Message-ID"),
        options=MessageOptions(envelope.dsn_ret, envelope.envid, envelope.requiretls),
        ident=ident,
        now=now,
    )


async def submit(runtime: Runtime, sub: Submission, *, session_id: str) -> str | tuple[Reply, str]:
    """Queue it: the queue id once it is on disk, or the reply and the rejection reason (``queue_full``,
    ``queue_error``; the latter logged)."""
    try:
        return await runtime.submit(
            sub.sender,
            sub.recipients,
            sub.data,
            meta=sub.meta,
            message_id=sub.message_id,
            now=sub.now,
            options=sub.options,
        )
    except QueueFullError:
        return R.QUEUE_FULL, "queue_full"
    except Exception:
        log.exception("queueing failed", extra={"session": session_id})
        return R.QUEUE_ERROR, "queue_error"


def receive_record(
    sub: Submission, state: ReceiveState, *, queue_id: str, listener: str, connector: str, rdns: ReverseDns | None
) -> dict[str, Any]:
    """The tracking log's ``RECEIVE`` record of a queued message."""
    tls = state.tls
    return dict(
        queue_id=queue_id,
        message_id=sub.message_id,
        received_id=sub.ident,
        listener=listener,
        connector=connector,
        client=state.peer_ip,
        client_name=rdns.name if rdns else None,
        client_rdns=str(rdns.status) if rdns else None,
        helo=state.helo,
        tls=tls.version if tls else None,
        cipher=tls.cipher if tls else None,
        auth_user=state.auth_user,
        sender=sub.sender,
        recipients=len(sub.recipients),
        size=len(sub.data),
    )
