"""From a finished transaction to a queue submission, without sockets (:mod:`mxgate.core.smtp.transaction`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from mxgate.core.messages import MessageOptions, NewRecipient
from mxgate.core.metadata import MessageMeta
from mxgate.core.model import Address, Envelope, IncomingMessage, RecipientDsn, TlsState
from mxgate.core.queue.errors import QueueFullError
from mxgate.core.smtp import transaction
from mxgate.core.smtp.session import R, ReceiveState

NOW = datetime(2026, 12, 7, 4, 0, tzinfo=UTC).timestamp()


def state(**envelope: Any) -> ReceiveState:
    st = ReceiveState(peer_ip="192.0.2.7", helo="client.example", esmtp=True)
    st.envelope = Envelope(mail_from=Address("a", "example.net"), rcpt_tos=(Address("u", "example.org"),), **envelope)
    return st


def test_message_of_parses_headers_and_carries_edits_from_end_of_headers() -> None:
    raw = b"Subject: hi\r\nMessage-ID: <m@x>\r\n\r\nbody\r\n"
    head = IncomingMessage(b"Subject: hi\r\n", (("Subject", "hi"),))
    head.add_header("X-Scanned", "yes")
    msg = transaction.message_of(raw, head)
    assert msg.data == raw and msg.get_header("Message-ID") == "<m@x>"
    assert [(e.name, e.value) for e in msg.added_headers] == [("X-Scanned", "yes")]
    assert transaction.message_of(b"no headers end\r\n", None).headers == ()


def test_message_of_reuses_headers_parsed_at_end_of_headers_only_for_the_same_block() -> None:
    raw = b"Subject: s\r\nX-A: 1\r\n\r\nbody\r\n"
    block = b"Subject: s\r\nX-A: 1\r\n"
    known = (("Subject", "s"), ("X-A", "1"))
    assert transaction.message_of(raw, None, (block, known)).headers is known
    stuffed = b"Subject: s\r\n..X: 1\r\n"  # the block as received (dot-stuffed): not the message's
    assert transaction.message_of(raw, None, (stuffed, (("Subject", "other"),))).headers == known
    assert transaction.message_of(b"x\r\n", None, (b"x\r\n\r\n", ())).headers == ()


def test_too_long_lines() -> None:
    assert not transaction.too_long_lines(b"x" * 998 + b"\r\n", 1000)
    assert transaction.too_long_lines(b"a\r\n" + b"x" * 999 + b"\r\n", 1000)
    assert not transaction.too_long_lines(b"short\r\n", 1000)


def _too_long_by_split(raw: bytes) -> bool:
    return max(map(len, raw.split(b"\r\n"))) > transaction.MAX_TEXT_LINE


@pytest.mark.parametrize("lengths", [(998,) * 12, (997, 998, 999), (80,) * 200 + (999,), (0, 998, 0, 998), (1, 2000)])
@pytest.mark.parametrize("ending", [b"", b"\r\n", b"\r", b"\n"])
def test_too_long_lines_agrees_with_splitting(lengths: tuple[int, ...], ending: bytes) -> None:
    """The searching check says what splitting the content at every CRLF says, line ends near the limit too."""
    raw = b"\r\n".join(b"x" * n for n in lengths) + ending
    assert transaction.too_long_lines(raw, 1000) == _too_long_by_split(raw)
    lone = b"\r\n".join(b"x\ry" * (n // 3) for n in lengths) + ending  # lone CRs do not end a line
    assert transaction.too_long_lines(lone, 1000) == _too_long_by_split(lone)


def test_received_date_is_the_email_date_of_that_second() -> None:
    import email.utils
    from datetime import timedelta, timezone

    for when in (
        datetime.fromtimestamp(1765000000.25, UTC),
        datetime.fromtimestamp(1765000000.75, UTC),
        datetime.fromtimestamp(1765000001.0, UTC),
        datetime.fromtimestamp(1765000001.0, timezone(timedelta(hours=2))),  # the same instant, another zone
    ):
        header = transaction.received_header(
            helo="h", ip="192.0.2.1", hostname="mx", esmtp=True, tls=None, auth=False, ident="i", recipients=(),
            when=when,
        )  # fmt: skip
        assert header.endswith(f"\t{email.utils.format_datetime(when)}\r\n".encode())


def test_prepare_builds_the_submission() -> None:
    st = state(requiretls=True, envid="E1", rcpt_dsn=(RecipientDsn(),))
    st.tls = TlsState(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", bits=256)
    st.auth_user = "user"
    msg = transaction.message_of(b"Message-ID: <m@x>\r\n\r\nbody\r\n", None)
    msg.add_header("X-Added", "1")
    sub = transaction.prepare(
        st, msg, hostname="mx.example", listener="smtp", session_id="abc1", ident="abc1.1", rdns=None, now=NOW
    )
    assert sub.sender == "a@example.net"
    assert sub.recipients == (NewRecipient("u@example.org", None, None),)
    assert sub.message_id == "<m@x>" and sub.ident == "abc1.1" and sub.now == NOW
    assert sub.options == MessageOptions(None, "E1", True)
    assert sub.data.startswith(b"X-Added: 1\r\nReceived: from client.example (unknown [192.0.2.7])\r\n")
    assert b"with ESMTPSA id abc1.1\r\n\tfor <u@example.org>;" in sub.data
    assert sub.data.endswith(b"\r\nMessage-ID: <m@x>\r\n\r\nbody\r\n")
    assert sub.meta == MessageMeta(
        listener="smtp",
        inbound_connector="",
        session="abc1",
        client_ip="192.0.2.7",
        helo="client.example",
        tls_version="TLSv1.3",
        tls_cipher="TLS_AES_256_GCM_SHA384",
        auth_user="user",
    )


def test_receive_record() -> None:
    st = state()
    sub = transaction.prepare(
        st, transaction.message_of(b"a: b\r\n\r\nx\r\n", None), hostname="mx.example", listener="smtp",
        session_id="s", ident="s.1", rdns=None, now=NOW,
    )  # fmt: skip
    rec = transaction.receive_record(sub, st, queue_id="Q1", listener="smtp", connector="anonymous", rdns=None)
    assert rec["queue_id"] == "Q1" and rec["received_id"] == "s.1" and rec["size"] == len(sub.data)
    assert rec["recipients"] == 1 and rec["sender"] == "a@example.net" and rec["tls"] is None


class FakeRuntime:
    def __init__(self, result: object) -> None:
        self.result = result
        self.calls: list[tuple[Any, ...]] = []

    async def submit(self, sender: str, recipients: Any, data: bytes, **kw: Any) -> str:
        self.calls.append((sender, recipients, data, kw))
        if isinstance(self.result, BaseException):
            raise self.result
        return str(self.result)


async def test_submit_outcomes() -> None:
    st = state()
    sub = transaction.prepare(
        st, transaction.message_of(b"x\r\n", None), hostname="h", listener="l", session_id="s", ident="s.1",
        rdns=None, now=NOW,
    )  # fmt: skip
    ok = FakeRuntime("Q42")
    assert await transaction.submit(ok, sub, session_id="s") == "Q42"  # type: ignore[arg-type]
    (_, recipients, data, kw) = ok.calls[0]
    assert recipients == sub.recipients and data == sub.data and kw["now"] == NOW and kw["meta"] == sub.meta
    full = FakeRuntime(QueueFullError("full"))
    assert await transaction.submit(full, sub, session_id="s") == (R.QUEUE_FULL, "queue_full")  # type: ignore[arg-type]
    broken = FakeRuntime(RuntimeError("disk on fire"))
    assert await transaction.submit(broken, sub, session_id="s") == (R.QUEUE_ERROR, "queue_error")  # type: ignore[arg-type]
