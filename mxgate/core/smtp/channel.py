"""The transport of one SMTP client on the receive side: :class:`Channel`, the I/O half of
:class:`~mxgate.core.smtp.connection.Connection` (which adds the session: commands, hooks, replies' content).

Here: an ``asyncio.Protocol`` (PERF-NOTES' "bare Protocol") around a :class:`~mxgate.core.smtp.wire.WireReader`
-- reading, writing, flow control, timeouts and deadlines, the STARTTLS upgrade (``loop.start_tls``) and what
the TLS handshake gave (:func:`tls_state`). Nothing here knows SMTP commands or plugins.

Flow control: input is paused above a high-water mark; replies to pipelined commands are written in one batch
when the server next waits for input. Over-long lines are discarded as they arrive, never held.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Final

from cryptography import x509
from cryptography.x509.oid import NameOID

from mxgate.core import tls as tlsmod
from mxgate.core.model import Reply, TlsState
from mxgate.core.smtp import wire
from mxgate.core.smtp.session import Limits, R
from mxgate.core.smtp.wire import CLOSED, NEED_DATA

__all__ = ["HANDSHAKE_TIMEOUT", "HIGH_WATER", "Channel", "Close", "Gone", "tls_state"]

log = logging.getLogger(__name__)

HIGH_WATER = 256 * 1024  # pause reading above this much unprocessed input
HANDSHAKE_TIMEOUT = 30.0
# what the reader's refusals are answered with
LINE_REFUSALS: Final[Mapping[type[wire.Event], Reply]] = {
    wire.LineTooLong: R.LINE_TOO_LONG,
    wire.BareLineEnding: R.BARE_LF,
}
_DATA_REFUSALS: Final = {wire.Refusal.TOO_BIG: R.TOO_BIG, wire.Refusal.BARE_LINE_ENDING: R.BARE_LF_DATA}


class Gone(Exception):
    """The client went away (EOF, reset, failed handshake)."""


class Close(Exception):
    """We are done with this client; the reply (if any) has been queued."""

    def __init__(self, reply: Reply | None = None) -> None:
        super().__init__(str(reply))
        self.reply = reply


def _certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """DNS SANs, or the subject CN when the certificate has no DNS SAN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(n.lower() for n in san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    if names:
        return names
    return tuple(str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))


def tls_state(
    ssl_object: ssl.SSLObject, verifier: tlsmod.ClientCertificateVerifier | None = None, *, now: float | None = None
) -> TlsState:
    """What the handshake gave. A client certificate never failed it (see :func:`tlsmod.ask_for_client_certificate`):
    it is verified here by the listener's ``verifier`` (``None``: certificates were not asked for), and the result
    only decides whether a certificate-pinned connector matches."""
    info = tlsmod.describe(ssl_object)
    chain = tlsmod.peer_chain(ssl_object)
    verified = False
    if chain and verifier is not None:
        when = datetime.fromtimestamp(time.time() if now is None else now, UTC)
        result = verifier.verify(chain, now=when, resumed=bool(ssl_object.session_reused))
        verified = result.ok
        if not result.ok:
            log.info(
                "client certificate not verified",
                extra={"subject": chain[0].subject.rfc4514_string()[:200], "reason": str(result.reason)},
            )
    return TlsState(
        version=info.version or "?",
        cipher=info.cipher or "?",
        bits=info.bits or 0,
        sni=info.server_name,
        peer_certificate_names=_certificate_names(chain[0]) if chain else (),
        peer_certificate_verified=verified,
    )


# --- the transport of one client ---------------------------------------------------------------------------------


class Channel(asyncio.Protocol):
    """The I/O of one SMTP client: input framed by a :class:`wire.WireReader`, replies batched, timeouts.

    Waits raise :class:`Close` (a timeout or shutdown; the reply queued) or :class:`Gone` (EOF, reset)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self.reader = wire.WireReader(line_limit=limits.auth_line)  # (the longest: AUTH's)
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.over_tls = False
        self._out: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._closed = False
        self._reading_paused = False
        self._writing_paused = False
        self._stopping = False
        self._idle_wait = False  # waiting for a command (a shutdown may interrupt)
        self._deadline = 0.0  # the session's (set when it starts)

    async def _run(self) -> None:
        """The session, started once connected (see :meth:`connection_made`)."""
        raise NotImplementedError

    # -- asyncio.Protocol ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        self.over_tls = transport.get_extra_info("ssl_object") is not None
        self.task = self.loop.create_task(self._run())

    def data_received(self, data: bytes) -> None:
        self.reader.receive_data(data)
        if self.reader.buffered > HIGH_WATER and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self.reader.receive_data(b"")
        self._wake()
        return not self.over_tls  # keep the TCP side open to answer; TLS transports cannot half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def shutdown(self) -> None:
        self._stopping = True
        if self._idle_wait:
            self._wake()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- output ----------------------------------------------------------------------------------------------

    def _reply(self, reply: Reply | str) -> None:
        self._out.append(f"{reply}\r\n".encode("utf-8", "surrogateescape"))

    def _reply_lines(self, code: int, lines: list[str]) -> None:
        last = len(lines) - 1
        self._out.append(
            "".join(f"{code}{' ' if i == last else '-'}{line}\r\n" for i, line in enumerate(lines)).encode()
        )

    def _flush(self) -> None:
        if self._out and not self._closed and self.transport is not None:
            self.transport.write(b"".join(self._out))
        self._out.clear()

    async def _drain(self) -> None:
        self._flush()
        if not self._writing_paused or self._closed:
            return
        waiter = self._drain_waiter = self.loop.create_future()
        timer = self.loop.call_later(self.limits.idle_timeout, waiter.cancel)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled() and self.task is not None and not self.task.cancelling():
                raise Gone() from None  # a client that does not read its replies
            raise
        finally:
            timer.cancel()
            self._drain_waiter = None

    # -- input -----------------------------------------------------------------------------------------------

    async def _wait(self, *, idle: bool = False, until: float | None = None) -> None:
        """Wait for more input. Raises Close on timeout or shutdown (the reply queued), Gone on EOF.

        ``until``: a deadline of the input being read (a command line's, or DATA's minimum rate), besides the
        idle and session timeouts."""
        self._flush()
        if self._writing_paused and not self._closed:  # (the rest of _drain: only when the client lags)
            await self._drain()
        if self._closed or self._eof:
            raise Gone()
        if idle and self._stopping:
            raise Close(R.SHUTDOWN)
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        now = self.loop.time()
        idle_deadline = now + self.limits.idle_timeout
        deadline = min(idle_deadline, self._deadline, until if until is not None else self._deadline)
        waiter = self._waiter = self.loop.create_future()
        timer = self.loop.call_later(max(0.0, deadline - now), self._wake)
        self._idle_wait = idle
        before = self.reader.buffered
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
            self._idle_wait = False
        if self.reader.buffered > before:
            return
        if self._closed or self._eof:
            raise Gone()
        if idle and self._stopping:
            raise Close(R.SHUTDOWN)
        now = self.loop.time()
        if now >= self._deadline:
            raise Close(R.SESSION_TOO_LONG)
        if now >= idle_deadline:
            raise Close(R.TIMEOUT)
        if until is not None and now >= until:
            raise Close(R.TOO_SLOW)

    async def _next(self, *, idle: bool = True) -> wire.Event:
        """The reader's next event in command mode: a line, or why it is refused (never :class:`wire.NeedData`).

        Once a line has begun it must end within ``command_timeout`` (input that trickles in does not reset a
        deadline); an over-long line being discarded is not an idle wait.
        """
        reader = self.reader
        until: float | None = None
        while True:
            event = reader.next_event()
            if event is not NEED_DATA:
                if event is CLOSED:
                    raise Gone()
                return event
            if until is None and reader.line_started:
                until = self.loop.time() + self.limits.command_timeout
            await self._wait(idle=idle and not reader.discarding_line, until=until)

    async def _read_line(self) -> bytes | Reply:
        """One CRLF-terminated line without its CRLF, or the Reply for a bad line (too long, bare CR/LF)."""
        event = await self._next()
        return event.line if type(event) is wire.Command else LINE_REFUSALS[type(event)]

    async def _read_data(
        self, size_limit: int, end_of_headers: Callable[[bytes], Awaitable[Reply | None]]
    ) -> tuple[bytes | None, Reply | None]:
        """The DATA content up to CRLF.CRLF (see :mod:`mxgate.core.smtp.wire`), ``end_of_headers`` called when the
        header block has arrived (its reply, if any, refuses the message). Returns ``(dot-unstuffed content,
        None)`` or ``(None, reply)``."""
        limits = self.limits
        reader = self.reader
        reader.start_data(size_limit)
        started = self.loop.time()
        rate = limits.min_data_rate
        refused: Reply | None = None
        while True:
            event = reader.next_event()
            if event is NEED_DATA:
                # the minimum rate: after a grace of command_timeout, min_data_rate bytes per second on average
                until = started + limits.command_timeout + reader.data_received / rate if rate else None
                await self._wait(until=until)
            elif type(event) is wire.HeadersEnded:
                refused = await end_of_headers(event.block)
                if refused is not None:
                    reader.refuse()
            elif type(event) is wire.MessageEnded:
                return event.content, None
            elif type(event) is wire.MessageRefused:
                return None, refused if event.reason is wire.Refusal.REFUSED else _DATA_REFUSALS[event.reason]
            else:  # CLOSED
                raise Gone()

    async def _read_chunk(self, size: int, into: bytearray | None) -> None:
        """Exactly ``size`` octets of a BDAT chunk, appended to ``into`` (``None``: read and dropped). Nothing in
        them is a command; what follows them is. The minimum data rate applies as for DATA."""
        limits = self.limits
        rate = limits.min_data_rate
        started = self.loop.time()
        reader = self.reader
        reader.start_chunk(size, into)
        while True:
            event = reader.next_event()
            if type(event) is wire.ChunkEnded:
                return
            if event is CLOSED:
                raise Gone()
            until = started + limits.command_timeout + reader.chunk_received / rate if rate else None
            await self._wait(until=until)

    # -- STARTTLS --------------------------------------------------------------------------------------------

    async def _start_tls(self, ctx: ssl.SSLContext) -> Exception | None:
        """Upgrade to TLS once the replies queued so far (``220 Ready to start TLS``) are written. Returns the
        handshake's failure (the connection then aborted), ``None`` once over TLS; raises :class:`Gone` if the
        transport went away."""
        await self._drain()
        # RFC 3207 §4.2: whatever the client pipelined after STARTTLS is discarded, never executed under TLS.
        self.reader.discard_buffered()
        assert self.transport is not None
        try:
            transport = await self.loop.start_tls(
                self.transport, self, ctx, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            self.transport.abort()
            return exc
        if transport is None:
            raise Gone()
        self.transport = transport  # (input that arrived during the handshake came over TLS: kept)
        self.over_tls = True
        return None
