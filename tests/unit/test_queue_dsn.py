"""RFC 3464 DSNs, parsed back with the stdlib ``email`` package and checked part by part."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import Message

import pytest

from mxgate.core.messages import MessageOptions, QueuedMessage, QueuedRecipient, RecipientStatus
from mxgate.core.metadata import NO_META, MessageMeta
from mxgate.core.model import DsnRet
from mxgate.core.queue import DSN_ENVELOPE_SENDER, DsnRecipient, build_dsn, is_auto_message

NOW = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
RECEIVED = datetime(2024, 2, 28, 8, 30, 0, tzinfo=UTC)
HEADERS = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net, carol@example.net\r\n"
    b"Subject: quarterly figures\r\n"
    b"Message-ID: <q1@example.org>\r\n"
    b"\r\n"
)

ENV_42 = MessageOptions(envid="ENV-42")


def original(
    sender: str = "alice@example.org",
    notify: str | None = None,
    meta: MessageMeta = NO_META,
    options: MessageOptions = ENV_42,
) -> QueuedMessage:
    def rcpt(addr: str, status: RecipientStatus, orcpt: str | None = None) -> QueuedRecipient:
        return QueuedRecipient(addr, status, 1, None, None, 0.0, dsn_notify=notify, orcpt=orcpt)

    return QueuedMessage(
        id="06H2A1SRHDPZ6QTZ",
        sender=sender,
        recipients=(
            rcpt("bob@example.net", RecipientStatus.FAILED, orcpt="rfc822;Bob@Example.NET"),
            rcpt("carol@example.net", RecipientStatus.DEFERRED),
        ),
        received_at=RECEIVED.timestamp(),
        size=1234,
        message_id="<q1@example.org>",
        held=False,
        meta=meta,
        options=options,
    )


FAILED_BOB = DsnRecipient(
    "bob@example.net", "5.1.1", "smtp; 550 5.1.1 <bob@example.net>: no such user", "mx1.example.net", "failed"
)


def parse(raw: bytes) -> Message:
    return message_from_bytes(raw, policy=policy.compat32)


def subparts(msg: Message) -> list[Message]:
    """The parts of a multipart, or the field blocks of a message/delivery-status part."""
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [p for p in payload if isinstance(p, Message)]


def text(part: Message) -> str:
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data.decode()


def test_failure_dsn_part_by_part() -> None:
    raw = build_dsn(
        reporting_mta="gw.example.com",
        original=original(),
        original_headers=HEADERS,
        failed=[FAILED_BOB],
        now=NOW,
    )
    assert raw is not None
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only, ready for the wire
    assert raw.isascii()
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@gw.example.com>"
    assert msg["To"] == "<alice@example.org>"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Date"] == "Fri, 01 Mar 2024 12:00:00 +0000"
    assert msg["Message-ID"].endswith("@gw.example.com>")
    assert msg["References"] == "<q1@example.org>"
    assert msg["MIME-Version"] == "1.0"

    parts = subparts(msg)
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]

    human = text(parts[0])
    assert "could not be delivered" in human
    assert "<bob@example.net>" in human and "550 5.1.1" in human

    blocks = subparts(parts[1])
    assert len(blocks) == 2
    per_message, per_rcpt = blocks
    assert per_message["Reporting-MTA"] == "dns; gw.example.com"
    assert per_message["Arrival-Date"] == "Wed, 28 Feb 2024 08:30:00 +0000"
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@example.net"
    assert per_rcpt["Original-Recipient"] == "rfc822;Bob@Example.NET"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx1.example.net"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.net>: no such user"
    assert per_rcpt["Last-Attempt-Date"] == "Fri, 01 Mar 2024 12:00:00 +0000"
    assert per_rcpt["Will-Retry-Until"] is None

    returned = str(parts[2].get_payload()).encode()
    assert returned == HEADERS[:-2]  # the header section, without its blank line
    # Queued as a DSN, it must not produce another DSN.
    assert DSN_ENVELOPE_SENDER == ""
    assert is_auto_message(raw[: raw.index(b"\r\n\r\n") + 4])


def test_delay_warning_variant() -> None:
    carol = DsnRecipient("carol@example.net", "4.4.1", "451 4.4.1 connection timed out", None, "delayed")
    until = NOW + timedelta(days=4)
    raw = build_dsn(
        reporting_mta="gw.example.com",
        original=original(),
        original_headers=HEADERS,
        failed=[carol],
        now=NOW,
        retry_until=until,
        dsn_from="postmaster@example.com",
    )
    assert raw is not None
    msg = parse(raw)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert msg["From"] == "Mail Delivery System <postmaster@example.com>"
    human, status, headers = subparts(msg)
    assert "warning only" in text(human)
    rcpt = subparts(status)[1]
    assert rcpt["Action"] == "delayed"
    assert rcpt["Status"] == "4.4.1"
    assert rcpt["Remote-MTA"] is None
    assert rcpt["Diagnostic-Code"] == "smtp; 451 4.4.1 connection timed out"  # "smtp; " added
    assert rcpt["Will-Retry-Until"] == "Tue, 05 Mar 2024 12:00:00 +0000"
    assert headers["Content-Description"] == "Message Headers"


def test_several_recipients_mixed() -> None:
    carol = ("carol@example.net", "4.4.1", None, None, "delayed")
    raw = build_dsn(
        reporting_mta="gw.example.com",
        original=original(),
        original_headers=HEADERS,
        failed=[FAILED_BOB, carol],
        now=NOW,
    )
    assert raw is not None
    msg = parse(raw)
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    blocks = subparts(subparts(msg)[1])
    assert [(b["Final-Recipient"], b["Action"]) for b in blocks[1:]] == [
        ("rfc822; bob@example.net", "failed"),
        ("rfc822; carol@example.net", "delayed"),
    ]
    assert blocks[2]["Diagnostic-Code"] is None


def test_no_dsn_for_the_null_sender() -> None:
    assert (
        build_dsn(
            reporting_mta="gw.example.com",
            original=original(sender=""),
            original_headers=HEADERS,
            failed=[FAILED_BOB],
            now=NOW,
        )
        is None
    )


def test_no_dsn_for_a_dsn_even_with_a_sender() -> None:
    first = build_dsn(
        reporting_mta="gw.example.com",
        original=original(),
        original_headers=HEADERS,
        failed=[FAILED_BOB],
        now=NOW,
    )
    assert first is not None
    dsn_headers = first[: first.index(b"\r\n\r\n") + 4]
    without_auto = b"".join(
        line + b"\r\n" for line in dsn_headers.split(b"\r\n") if line and not line.startswith(b"Auto-Submitted")
    )
    for headers in (dsn_headers, without_auto):  # caught by Auto-Submitted, then by the report content type
        assert (
            build_dsn(
                reporting_mta="gw.example.com",
                original=original(sender="someone@example.org"),
                original_headers=headers,
                failed=[FAILED_BOB],
                now=NOW,
            )
            is None
        )


@pytest.mark.parametrize(
    ("extra", "auto"),
    [
        (b"Auto-Submitted: auto-replied\r\n", True),
        (b"Auto-Submitted: auto-generated; type=vacation\r\n", True),
        (b"Auto-Submitted: no\r\n", False),
        (b"Content-Type: multipart/report; report-type=disposition-notification; boundary=x\r\n", True),
        (b"Content-Type: multipart/mixed; boundary=x\r\n", False),
        (b"", False),
    ],
)
def test_is_auto_message(extra: bytes, auto: bool) -> None:
    assert is_auto_message(HEADERS[:-2] + extra + b"\r\n") is auto


@pytest.mark.parametrize(
    ("notify", "action", "sent"),
    [
        (None, "failed", True),
        ("NEVER", "failed", False),
        ("SUCCESS", "failed", False),
        ("FAILURE", "failed", True),
        ("failure,delay", "failed", True),
        (None, "delayed", True),
        ("FAILURE", "delayed", False),
        ("DELAY", "delayed", True),
    ],
)
def test_notify_parameter(notify: str | None, action: str, sent: bool) -> None:
    rec = DsnRecipient("bob@example.net", "5.1.1" if action == "failed" else "4.4.1", None, None, action)
    raw = build_dsn(
        reporting_mta="gw.example.com",
        original=original(notify=notify),
        original_headers=HEADERS,
        failed=[rec],
        now=NOW,
    )
    assert (raw is not None) is sent


def test_remote_text_cannot_inject_fields() -> None:
    evil = DsnRecipient(
        "bob@example.net",
        "5.7.1",
        "550 5.7.1 go away\r\nAction: delivered\r\n\r\nX: y",
        "mx.evil.test",
        "failed",
    )
    raw = build_dsn(
        reporting_mta="gw.example.com", original=original(), original_headers=HEADERS, failed=[evil], now=NOW
    )
    assert raw is not None
    blocks = subparts(subparts(parse(raw))[1])
    assert len(blocks) == 2
    assert blocks[1].get_all("Action") == ["failed"]
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.7.1 go away Action: delivered X: y"


def test_8bit_original_headers_are_kept_byte_for_byte() -> None:
    headers = b"Subject: Gr\xc3\xbc\xc3\x9fe\nFrom: a@example.org\n\n"
    raw = build_dsn(
        reporting_mta="gw.example.com",
        original=original(),
        original_headers=headers,
        failed=[FAILED_BOB],
        now=NOW,
    )
    assert raw is not None
    assert b"Content-Transfer-Encoding: 8bit" in raw
    assert b"Subject: Gr\xc3\xbc\xc3\x9fe\r\nFrom: a@example.org\r\n" in raw


@pytest.mark.parametrize(
    "bad",
    [
        DsnRecipient("bob@example.net", "5.1", None, None, "failed"),
        DsnRecipient("bob@example.net", "3.1.1", None, None, "failed"),
        DsnRecipient("bob@example.net", "5.1.1", None, None, "bounced"),
    ],
)
def test_invalid_input(bad: DsnRecipient) -> None:
    with pytest.raises(ValueError):
        build_dsn(
            reporting_mta="gw.example.com",
            original=original(),
            original_headers=HEADERS,
            failed=[bad],
            now=NOW,
        )


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError):
        build_dsn(
            reporting_mta="gw.example.com",
            original=original(),
            original_headers=HEADERS,
            failed=[FAILED_BOB],
            now=datetime(2024, 3, 1, 12, 0),
        )


# --- RET (RFC 3461 §4.3) ------------------------------------------------------------------------------------------

ORIGINAL = HEADERS + b"the figures\r\n.a line with a dot\r\n"


@pytest.mark.parametrize(
    ("ret", "action", "whole"),
    [
        (DsnRet.FULL, "failed", True),
        (DsnRet.HDRS, "failed", False),
        (None, "failed", False),  # no RET: our choice is headers only
        (DsnRet.FULL, "delayed", False),  # §4.3: a DSN without failures returns headers only
    ],
)
def test_ret_full_returns_the_whole_message_for_failures(ret: DsnRet | None, action: str, whole: bool) -> None:
    item = FAILED_BOB._replace(action=action, status="4.4.1" if action == "delayed" else "5.1.1")
    raw = build_dsn(
        reporting_mta="gw.example.com",
        original=original(options=MessageOptions(dsn_ret=ret, envid="ENV-42")),
        original_headers=HEADERS,
        failed=[item],
        now=NOW,
        original_message=ORIGINAL,
    )
    assert raw is not None
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only, the returned message included
    parts = subparts(parse(raw))
    if whole:
        assert parts[2].get_content_type() == "message/rfc822"
        assert raw.endswith(b"\r\n" + ORIGINAL + b"\r\n--" + parse(raw).get_boundary().encode() + b"--\r\n")
        assert "(headers only)" not in text(parts[0])
    else:
        assert parts[2].get_content_type() == "text/rfc822-headers"
        assert b"the figures" not in raw


def test_ret_full_of_a_huge_message_returns_headers() -> None:
    from mxgate.core.queue.dsn import MAX_RETURNED_MESSAGE

    raw = build_dsn(
        reporting_mta="gw.example.com",
        original=original(options=MessageOptions(dsn_ret=DsnRet.FULL)),
        original_headers=HEADERS,
        failed=[FAILED_BOB],
        now=NOW,
        original_message=HEADERS + b"x" * MAX_RETURNED_MESSAGE,
    )
    assert raw is not None and subparts(parse(raw))[2].get_content_type() == "text/rfc822-headers"
    per_message = subparts(subparts(parse(raw))[1])[0]
    assert per_message["Original-Envelope-Id"] is None  # no ENVID given: no field
