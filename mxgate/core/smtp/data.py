"""The message part of a session on the receive side: DATA and BDAT, the end-of-headers and end-of-data hooks,
the hand-off to the queue, and the ``250 ... queued as`` that follows only once the message is on disk.

These are command handlers of :class:`~mxgate.core.smtp.connection.Connection` (its ``COMMANDS`` table names
them), written as functions of the connection: the dialogue before them (EHLO, MAIL, RCPT, ...) stays in
:mod:`mxgate.core.smtp.connection`, the reading of the message in :class:`~mxgate.core.smtp.channel.Channel`, its
framing in :mod:`mxgate.core.smtp.wire`, and the making of a queue submission in
:mod:`mxgate.core.smtp.transaction`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mxgate.core.model import IncomingMessage, Reply
from mxgate.core.smtp import transaction
from mxgate.core.smtp.channel import Close
from mxgate.core.smtp.parse import ParseError, parse_bdat
from mxgate.core.smtp.session import R, reject_reason
from mxgate.core.tracking import TrackEvent

if TYPE_CHECKING:
    from mxgate.core.smtp.connection import Connection

__all__ = ["accept_message", "cmd_bdat", "cmd_data", "end_of_headers"]


async def cmd_data(conn: Connection, arg: str | None) -> None:
    st = conn.state
    if arg:
        await conn._bad(R.NO_ARGS)
        return
    problem = conn.policy.check_data(st)
    if problem is not None:
        await conn._bad(problem)
        return
    conn._reply("354 End data with <CR><LF>.<CR><LF>")
    conn._transactions += 1
    raw, refused = await conn._read_data(conn.policy.size_limit(st), lambda block: end_of_headers(conn, block))
    envelope = st.envelope
    sender = str(envelope.mail_from)
    try:
        if refused is not None or raw is None:
            reply = refused or R.QUEUE_ERROR
            conn._reply(reply)
            await conn._rejected("data", reply, reject_reason(reply), sender=sender, recipients=len(envelope.rcpt_tos))
            if (reply is R.BARE_LF_DATA or reply is R.TEXT_LINE_TOO_LONG) and conn.policy.error(st):
                raise Close(R.TOO_MANY_ERRORS)
            return
        await accept_message(conn, raw)
    finally:
        st.reset_transaction()


async def cmd_bdat(conn: Connection, arg: bytes) -> None:
    """RFC 3030 ``BDAT <octets> [LAST]``: the chunk is read exactly, never dot-unstuffed, never parsed for
    commands; the assembled message meets DATA's rules (CRLF only, line length, size across chunks)."""
    st = conn.state
    try:
        size, last = parse_bdat(arg.strip(b" "))
    except ParseError:
        # we cannot tell where the chunk ends: reading on would run its octets as commands
        await conn._rejected("data", R.BDAT_SYNTAX, "syntax")
        raise Close(R.BDAT_SYNTAX) from None
    problem = conn.policy.check_bdat(st, size)
    if problem is not None:
        await conn._read_chunk(size, None)
        sender = str(st.envelope.mail_from) if st.envelope.mail_from is not None else None
        st.reset_transaction()  # RFC 3030 §2: a failed chunk fails the transaction
        if problem.code in (503, 530):
            await conn._bad(problem)
        else:
            await conn._rejected("data", problem, reject_reason(problem), sender=sender)
            conn._reply(problem)
        return
    if st.chunks is None:
        st.chunks = bytearray()
        conn._transactions += 1
    await conn._read_chunk(size, st.chunks)
    if not last:
        conn._reply(Reply(250, "2.0.0", f"{size} octets received"))
        return
    raw = bytes(st.chunks)
    st.chunks = None
    envelope = st.envelope
    sender = str(envelope.mail_from)
    try:
        refused = conn.policy.check_text(raw)
        if refused is None:
            j = raw.find(b"\r\n\r\n")
            refused = await end_of_headers(conn, raw if j < 0 else raw[: j + 2])
        if refused is not None:
            conn._reply(refused)
            await conn._rejected(
                "data", refused, reject_reason(refused), sender=sender, recipients=len(envelope.rcpt_tos)
            )
            if (refused is R.BARE_LF_DATA or refused is R.TEXT_LINE_TOO_LONG) and conn.policy.error(st):
                raise Close(R.TOO_MANY_ERRORS)
            return
        if raw and not raw.endswith(b"\r\n"):
            raw += b"\r\n"  # a message ends with a line end (DATA's CRLF.CRLF guarantees one)
        await accept_message(conn, raw, data_command=False)
    finally:
        st.reset_transaction()


async def accept_message(conn: Connection, raw: bytes, *, data_command: bool = True) -> None:
    """A received message (DATA's unstuffed, BDAT's assembled): ``on_end_of_data``, then the queue
    (:mod:`mxgate.core.smtp.transaction`); ``250`` only once it is on disk."""
    st = conn.state
    envelope = st.envelope
    sender = str(envelope.mail_from)
    # DATA's line lengths are checked here, once unstuffed (BDAT's in ReceivePolicy.check_text)
    if data_command and transaction.too_long_lines(raw, conn.policy.limits.text_line):
        conn._reply(R.TEXT_LINE_TOO_LONG)
        await conn._rejected("data", R.TEXT_LINE_TOO_LONG, "line_length", sender=sender)
        return
    message = transaction.message_of(raw, conn._headers_msg, conn._headers_parsed)
    conn._headers_msg = conn._headers_parsed = None
    verdict = await conn._veto(conn.hooks.on_end_of_data(conn.snapshot(), envelope, message))
    reply, ok, close = conn._outcome(verdict, R.OK)
    if not ok:
        await conn._rejected("data", reply, "plugin", sender=sender, recipients=len(envelope.rcpt_tos))
        if close:
            raise Close(reply)
        conn._reply(reply)
        return
    rdns = await conn._await_rdns()
    listener = conn.listener.config.name
    sub = transaction.prepare(
        st,
        message,
        hostname=conn.policy.hostname,
        listener=listener,
        session_id=conn.session_id,
        ident=f"{conn.session_id}.{conn._transactions}",
        rdns=rdns,
        now=conn.runtime.clock(),
    )
    queued = await transaction.submit(conn.runtime, sub, session_id=conn.session_id)
    if isinstance(queued, tuple):
        reply, reason = queued
        conn._reply(reply)
        await conn._rejected("data", reply, reason, sender=sender)
        return
    record = transaction.receive_record(
        sub, st, queue_id=queued, listener=listener, connector=conn._label_connector(), rdns=rdns
    )
    conn.runtime.tracking.write(TrackEvent.RECEIVE, **record)
    conn._reply(f"250 2.0.0 Ok: queued as {queued}")
    st.errors = 0  # a client that delivers mail starts over (max_errors counts errors "without delivering")
    await conn.hooks.on_event("message_received", listener=listener, connector=conn._label_connector())


async def end_of_headers(conn: Connection, block: bytes) -> Reply | None:
    """The header block has arrived (DATA) or been assembled (BDAT): ``on_end_of_headers``; a refusal's reply."""
    conn._headers_parsed = (block, transaction.parse_headers(block))  # (DATA's block is the message's, unless dots)
    conn._headers_msg = IncomingMessage(block, conn._headers_parsed[1])
    verdict = await conn._veto(conn.hooks.on_end_of_headers(conn.snapshot(), conn.state.envelope, conn._headers_msg))
    reply, ok, _ = conn._outcome(verdict, R.OK)
    return None if ok else reply
