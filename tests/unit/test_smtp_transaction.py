"""From a finished transaction to a queue submission, without sockets (:mod:`mxgate.core.smtp.transaction`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

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


def test_too_long_lines() -> None:
    assert not transaction.too_long_lines(b"x" * 998 + b"\r\n", 1000)
    assert transaction.too_long_lines(b"a\r\n" + b"x" * 999 + b"\r\n", 1000)
    assert not transaction.too_long_lines(b"short\r\n", 1000)


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
