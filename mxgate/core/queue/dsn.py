"""RFC 3464 delivery status notifications (pure: stdlib ``email``, no I/O, the clock is a parameter).

:func:`build_dsn` returns the bytes of a ``multipart/report; report-type=delivery-status`` message with three
parts: a human-readable text, the ``message/delivery-status`` fields and the original's header section as
``text/rfc822-headers`` -- or, for a failure when the sender asked with ``RET=FULL`` (RFC 3461 §4.3) and the message
is at most :data:`MAX_RETURNED_MESSAGE`, the whole message as ``message/rfc822``. Without ``RET``, or ``RET=HDRS``,
or for a delay warning: headers only. ``ENVID`` and ``ORCPT`` come back as ``Original-Envelope-Id`` and
``Original-Recipient`` (RFC 3464 §2.2.1, §2.3.1). Queue it with the null envelope sender ``""``
(:data:`DSN_ENVELOPE_SENDER`) so that a DSN never causes another one.

No DSN (``None``) when: the original's envelope sender is null; the original is itself a delivery report or is
auto-submitted (RFC 3834 ``Auto-Submitted`` other than ``no``) -- no loops; or no recipient asked for one
(RFC 3461 ``NOTIFY=NEVER``, or ``NOTIFY`` without ``DELAY`` for a delay warning).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from email.utils import format_datetime, make_msgid
from typing import Final, NamedTuple

from mxgate.core.messages import QueuedMessage, QueuedRecipient
from mxgate.core.model import DsnNotify, DsnRet, RecipientDsn

__all__ = ["DSN_ENVELOPE_SENDER", "DsnRecipient", "build_dsn", "is_auto_message", "recipient_dsn"]

DSN_ENVELOPE_SENDER: Final = ""
ACTIONS: Final = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
MAX_RETURNED_HEADERS: Final = 64 * 1024
MAX_RETURNED_MESSAGE: Final = 10 * 1024 * 1024  # RET=FULL beyond this returns headers only (Postfix: 50 kB)
SUBJECT_FAILED: Final = "Undelivered Mail Returned to Sender"
SUBJECT_DELAYED: Final = "Delayed Mail (still being retried)"
SUBJECT_SUCCESS: Final = "Successful Mail Delivery Report"


class DsnRecipient(NamedTuple):
    """One recipient to report (plain 5-tuples work too)."""

    recipient: str
    status: str  # RFC 3463, "5.1.1"
    diagnostic: str | None  # "smtp; 550 5.1.1 no such user" (a bare reply gets "smtp; " in front)
    remote_mta: str | None  # host name of the MX that answered, if any
    action: str  # "failed" | "delayed" | "relayed" (RFC 3464 also allows delivered, expanded)


def is_auto_message(headers: bytes) -> bool:
    """Whether a header section belongs to a delivery report or an auto-submitted message."""
    msg = BytesHeaderParser(policy=policy.compat32).parsebytes(headers)
    auto = msg.get("Auto-Submitted")
    if auto is not None and str(auto).split(";")[0].strip().lower() not in ("", "no"):
        return True
    if msg.get_content_type() == "multipart/report":
        return str(msg.get_param("report-type", "")).lower() in (
            "delivery-status",
            "disposition-notification",
        )
    return False


def _check_status(status: str) -> str:
    parts = status.split(".")
    ok = (
        len(parts) == 3
        and parts[0] in ("2", "4", "5")
        and all(p.isdigit() and p.isascii() and 1 <= len(p) <= 3 for p in parts[1:])
    )
    if not ok:
        raise ValueError(f"not an RFC 3463 status code: {status!r}")
    return status


def _one_line(value: str) -> str:
    """Header values never carry line breaks from remote replies."""
    return " ".join(value.split())


def _address_type(address: str) -> str:
    return "rfc822" if address.isascii() else "utf-8"


def _wants(notify: str | None, action: str) -> bool:
    """RFC 3461: absent NOTIFY means failures (and, our choice, delays) are reported."""
    if notify is None:
        return True
    words = {w.strip().upper() for w in notify.split(",")}
    if "NEVER" in words:
        return False
    if action == "failed":
        return "FAILURE" in words
    if action == "delayed":
        return "DELAY" in words
    return "SUCCESS" in words


def _normalise_headers(raw: bytes) -> bytes:
    lines = raw[:MAX_RETURNED_HEADERS].replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


def _fields_block(fields: Sequence[tuple[str, str]]) -> Message:
    block = Message(policy=policy.compat32)
    for name, value in fields:
        block[name] = value
    return block


def build_dsn(
    *,
    reporting_mta: str,
    original: QueuedMessage,
    original_headers: bytes,
    failed: Sequence[DsnRecipient | tuple[str, str, str | None, str | None, str]],
    now: datetime,
    dsn_from: str | None = None,
    retry_until: datetime | None = None,
    original_message: bytes | None = None,
) -> bytes | None:
    """Build a DSN for ``original`` reporting ``failed`` (failures and/or delays), or ``None`` (module docs).

    :param reporting_mta: our host name (``Reporting-MTA: dns; ...``, ``MAILER-DAEMON@...``).
    :param original_headers: the original's header section (``QueueStore.headers(id)``).
    :param now: the report's ``Date:`` (timezone-aware).
    :param dsn_from: ``From:`` address; default ``MAILER-DAEMON@<reporting_mta>``.
    :param retry_until: for delay warnings, when we give up (``Will-Retry-Until``).
    :param original_message: the whole original, returned for failures when it asked ``RET=FULL``.
    :returns: the message in wire form (CRLF line ends), to be queued with envelope sender ``""``.
    """
    if original.sender == "" or is_auto_message(original_headers):
        return None
    notify = {r.address: r.dsn_notify for r in original.recipients}
    orcpt = {r.address: r.orcpt for r in original.recipients}
    reports: list[DsnRecipient] = []
    for item in failed:
        rec = DsnRecipient(*item)
        if rec.action not in ACTIONS:
            raise ValueError(f"{rec.recipient}: unknown DSN action {rec.action!r}")
        _check_status(rec.status)
        if _wants(notify.get(rec.recipient), rec.action):
            reports.append(rec)
    if not reports:
        return None
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")

    any_failed = any(r.action == "failed" for r in reports)
    full = (
        any_failed
        and original.options.dsn_ret is DsnRet.FULL
        and original_message is not None
        and len(original_message) <= MAX_RETURNED_MESSAGE
    )
    sender = dsn_from or f"MAILER-DAEMON@{reporting_mta}"
    utf8 = not all(s.isascii() for s in (original.sender, sender, *(r.recipient for r in reports)))

    # --- the human-readable part
    if any_failed:
        intro = (
            f"This is the mail system at host {reporting_mta}.\r\n\r\n"
            "I'm sorry to have to inform you that your message could not be delivered to one or more\r\n"
            f"recipients. It's attached below{'' if full else ' (headers only)'}.\r\n"
        )
    elif not any(r.action == "delayed" for r in reports):
        intro = (
            f"This is the mail system at host {reporting_mta}.\r\n\r\n"
            "Your message was relayed to a mail system that does not return delivery notifications: you will\r\n"
            "not be told whether it reaches the recipients below.\r\n"
        )
    else:
        until = f" until {format_datetime(retry_until)}" if retry_until is not None else ""
        intro = (
            f"This is the mail system at host {reporting_mta}.\r\n\r\n"
            "Your message could not be delivered yet to one or more recipients. This is a warning only;\r\n"
            f"you do not need to send your message again. Delivery will be retried{until}.\r\n"
        )
    lines = [intro, "\r\n"]
    for r in reports:
        where = f" (remote host {r.remote_mta})" if r.remote_mta else ""
        said = f": {_one_line(r.diagnostic)}" if r.diagnostic else ""
        lines.append(f"<{r.recipient}>{where}: {r.action}, status {r.status}{said}\r\n")
    text = "".join(lines).replace("\r\n", "\n")
    plain = text.isascii() and all(len(line) < 990 for line in text.split("\n"))
    human = EmailMessage(policy=policy.SMTP.clone(max_line_length=998))
    human.set_content(text, charset="utf-8", cte="7bit" if plain else "quoted-printable")
    del human["MIME-Version"]
    human["Content-Description"] = "Notification"

    # --- the machine-readable part
    per_message: list[tuple[str, str]] = [("Reporting-MTA", f"dns; {reporting_mta}")]
    envid = original.options.envid
    if envid:
        per_message.append(("Original-Envelope-Id", _one_line(envid)))
    per_message.append(("X-Mxgate-Queue-ID", original.id))
    per_message.append(("Arrival-Date", format_datetime(datetime.fromtimestamp(original.received_at, tz=UTC))))
    blocks: list[Message | str] = [_fields_block(per_message)]
    for r in reports:
        fields: list[tuple[str, str]] = []
        o = orcpt.get(r.recipient)
        if o:
            fields.append(("Original-Recipient", _one_line(o if ";" in o else f"rfc822; {o}")))
        fields += [
            ("Final-Recipient", f"{_address_type(r.recipient)}; {r.recipient}"),
            ("Action", r.action),
            ("Status", r.status),
        ]
        if r.remote_mta:
            fields.append(("Remote-MTA", f"dns; {r.remote_mta}"))
        if r.diagnostic:
            diag = _one_line(r.diagnostic)
            fields.append(("Diagnostic-Code", diag if ";" in diag.split(" ", 1)[0] else f"smtp; {diag}"))
        fields.append(("Last-Attempt-Date", format_datetime(now)))
        if r.action == "delayed" and retry_until is not None:
            fields.append(("Will-Retry-Until", format_datetime(retry_until)))
        blocks.append(_fields_block(fields))
    status_part = Message(policy=policy.compat32)
    status_part["Content-Type"] = "message/global-delivery-status" if utf8 else "message/delivery-status"
    status_part["Content-Description"] = "Delivery report"
    status_part.set_payload(blocks)

    # --- the original: whole (RET=FULL, failures only: RFC 3461 §4.3) or its headers
    headers_part = Message(policy=policy.compat32)
    if full and original_message is not None:
        content = original_message if original_message.endswith(b"\r\n") else original_message + b"\r\n"
        headers_part["Content-Type"] = "message/rfc822"
        headers_part["Content-Description"] = "Undelivered Message"
        headers_part["Content-Transfer-Encoding"] = "7bit" if content.isascii() else "8bit"
        # written as it is (CRLF kept): the generator does not re-wrap a message/* payload given as text
        headers_part.set_payload(content.decode("ascii", "surrogateescape"))
    else:
        headers = _normalise_headers(original_headers)
        headers_part["Content-Type"] = "text/rfc822-headers"
        headers_part["Content-Description"] = "Undelivered Message Headers" if any_failed else "Message Headers"
        headers_part["Content-Transfer-Encoding"] = "7bit" if headers.isascii() else "8bit"
        headers_part.set_payload(headers.decode("ascii", "surrogateescape"))

    # --- the envelope of it all
    report = Message(policy=policy.compat32)
    report["From"] = f"Mail Delivery System <{sender}>"
    report["To"] = f"<{original.sender}>"
    delayed = any(r.action == "delayed" for r in reports)
    report["Subject"] = SUBJECT_FAILED if any_failed else SUBJECT_DELAYED if delayed else SUBJECT_SUCCESS
    report["Date"] = format_datetime(now)
    report["Message-ID"] = make_msgid(domain=reporting_mta)
    if original.message_id:
        report["In-Reply-To"] = _one_line(original.message_id)
        report["References"] = _one_line(original.message_id)
    report["Auto-Submitted"] = "auto-replied"
    report["MIME-Version"] = "1.0"
    report["Content-Type"] = "multipart/report"
    report.set_param("report-type", "delivery-status")
    report.set_payload([human, status_part, headers_part])
    out_policy = policy.SMTPUTF8 if utf8 else policy.SMTP
    return report.as_bytes(policy=out_policy.clone(max_line_length=998))


def recipient_dsn(rcpt: QueuedRecipient | None) -> RecipientDsn:
    """The queue's NOTIFY/ORCPT text of one recipient as the typed value delivery passes on."""
    if rcpt is None:
        return RecipientDsn()
    notify = None
    if rcpt.dsn_notify is not None:
        words = {w.strip().upper() for w in rcpt.dsn_notify.split(",")}
        notify = frozenset(n for n in DsnNotify if n.value in words)
    orcpt = None
    if rcpt.orcpt:
        addr_type, sep, address = rcpt.orcpt.partition(";")
        orcpt = (addr_type.strip().lower(), address.strip()) if sep else ("rfc822", rcpt.orcpt.strip())
    return RecipientDsn(notify, orcpt)
