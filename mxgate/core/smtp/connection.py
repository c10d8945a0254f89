"""One SMTP client on the receive side: :class:`Connection`, the asyncio driver of a session (its listener:
:mod:`mxgate.core.smtp.server`).

Why not aiosmtpd's ``SMTP`` class: everything it does per command had to change here -- enhanced status codes
on every reply, our own EHLO list, bare CR/LF rejection in its line reader, bulk DATA reading, discard of input
pipelined before STARTTLS, AUTH against a hook, bounded reading of over-long lines, idle *and* session timeouts,
its per-connection ``inspect`` command table. A subclass would have overridden its reader loop and every
``smtp_*`` method and kept only its ``StreamReaderProtocol`` plumbing (and its private ``sslproto`` STARTTLS
swap). So this module is a small ``asyncio.Protocol`` (PERF-NOTES' "bare Protocol") and the thin driver of
socket-free parts: :mod:`mxgate.core.smtp.wire` frames the input (one buffer, ``find()`` for CRLF and CRLF.CRLF,
bare CR/LF refused), :mod:`mxgate.core.smtp.session` decides, :mod:`mxgate.core.smtp.sasl` runs AUTH exchanges,
:mod:`mxgate.core.smtp.transaction` turns a message into a queue submission. Here: the session's I/O, STARTTLS
(``loop.start_tls``), timeouts and deadlines, hook calls, replies.

Flow control: input is paused above a high-water mark; replies to pipelined commands are written in one batch
when the server next waits for input. Over-long lines are discarded as they arrive, never held.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Final

from cryptography import x509
from cryptography.x509.oid import NameOID

from mxgate.core import tls as tlsmod
from mxgate.core.errors import PluginError
from mxgate.core.model import (
    Accept,
    AuthResult,
    Disconnect,
    IncomingMessage,
    Reject,
    Reply,
    Session,
    Stash,
    TempFail,
    TlsState,
    Verdict,
)
from mxgate.core.plugins import HookCallError
from mxgate.core.smtp import sasl, transaction, wire
from mxgate.core.smtp.parse import ParseError, parse_bdat, parse_mail, parse_rcpt
from mxgate.core.smtp.rdns import ReverseDns
from mxgate.core.smtp.rdns import lookup as rdns_lookup
from mxgate.core.smtp.session import R, ReceiveState
from mxgate.core.smtp.wire import CLOSED, NEED_DATA
from mxgate.core.tracking import TrackEvent

if TYPE_CHECKING:
    from mxgate.core.smtp.server import Listener

__all__ = ["HANDSHAKE_TIMEOUT", "Connection", "tls_state"]

log = logging.getLogger(__name__)

HIGH_WATER = 256 * 1024  # pause reading above this much unprocessed input
HANDSHAKE_TIMEOUT = 30.0
# Distinct kinds of rejection (stage, reason, code) one session's tracking events are aggregated by; past this
# many, further kinds are counted under the last one.
MAX_REJECT_KINDS: Final = 16
# Commands allowed before STARTTLS on a require_tls listener.
_BEFORE_TLS = frozenset({b"EHLO", b"HELO", b"STARTTLS", b"NOOP", b"RSET", b"QUIT"})
PLUGIN_FAILED = TempFail(R.PLUGIN_ERROR)  # what a failing receive hook turns into
# what the reader's refusals are answered with
_LINE_REFUSALS: Final[Mapping[type[wire.Event], Reply]] = {
    wire.LineTooLong: R.LINE_TOO_LONG,
    wire.BareLineEnding: R.BARE_LF,
}
_DATA_REFUSALS: Final = {wire.Refusal.TOO_BIG: R.TOO_BIG, wire.Refusal.BARE_LINE_ENDING: R.BARE_LF_DATA}


class _Gone(Exception):
    """The client went away (EOF, reset, failed handshake)."""


# Requests of other protocols sent to an SMTP port (Postfix's smtpd_forbidden_commands: CONNECT, GET, POST):
# cross-protocol attacks, from a browser or a proxy. The session ends at the first one.
_FOREIGN_VERBS: Final = frozenset({b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"CONNECT"})


class _Close(Exception):
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


# --- one connection ---------------------------------------------------------------------------------------------


Handler = Callable[["Connection", str | None], Awaitable[None]]


class Connection(asyncio.Protocol):
    """One SMTP client. I/O here; decisions in :class:`ReceivePolicy`; hooks through ``runtime.hooks``."""

    COMMANDS: ClassVar[dict[bytes, Handler]] = {}  # filled once, after the class body

    def __init__(self, listener: Listener, *, release: Callable[[], None] | None = None) -> None:
        self.listener = listener
        self._release = release  # gives back the admission slot (see Listener._admit)
        self.runtime = listener.runtime
        self.hooks = listener.runtime.hooks
        self.policy = listener.policy
        self.loop = asyncio.get_running_loop()
        self.reader = wire.WireReader(line_limit=self.policy.limits.auth_line)  # (the longest: AUTH's)
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.stash = Stash()
        self.state = ReceiveState(peer_ip="")
        self.session_id = listener.next_session_id()
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)
        self._out: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._closed = False
        self._reading_paused = False
        self._writing_paused = False
        self._stopping = False
        self._idle_wait = False  # waiting for a command (a shutdown may interrupt)
        self._deadline = 0.0
        self._transactions = 0
        self._headers_msg: IncomingMessage | None = None
        # the client's reverse DNS: started at connect, awaited (bounded) at EHLO -- never before the banner
        self._rdns_task: asyncio.Task[ReverseDns] | None = None
        self._rdns_deadline = 0.0
        self.rdns: ReverseDns | None = None
        # rejections of this session already in the tracking log, by kind: the first of a kind is written at
        # once, the repeats are counted and written as one event when the session ends
        self._rejects: dict[tuple[str, str, str], tuple[dict[str, Any], int]] = {}

    # -- asyncio.Protocol ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        self.listener.connections.add(self)
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
        return self.state.tls is None  # keep the TCP side open to answer; TLS transports cannot half-close

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
        timer = self.loop.call_later(self.policy.limits.idle_timeout, waiter.cancel)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled() and self.task is not None and not self.task.cancelling():
                raise _Gone() from None  # a client that does not read its replies
            raise
        finally:
            timer.cancel()
            self._drain_waiter = None

    # -- input -----------------------------------------------------------------------------------------------

    async def _wait(self, *, idle: bool = False, until: float | None = None) -> None:
        """Wait for more input. Raises _Close on timeout or shutdown (the reply queued), _Gone on EOF.

        ``until``: a deadline of the input being read (a command line's, or DATA's minimum rate), besides the
        idle and session timeouts."""
        await self._drain()
        if self._closed or self._eof:
            raise _Gone()
        if idle and self._stopping:
            raise _Close(R.SHUTDOWN)
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        now = self.loop.time()
        idle_deadline = now + self.policy.limits.idle_timeout
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
            raise _Gone()
        if idle and self._stopping:
            raise _Close(R.SHUTDOWN)
        now = self.loop.time()
        if now >= self._deadline:
            raise _Close(R.SESSION_TOO_LONG)
        if now >= idle_deadline:
            raise _Close(R.TIMEOUT)
        if until is not None and now >= until:
            raise _Close(R.TOO_SLOW)

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
                    raise _Gone()
                return event
            if until is None and reader.line_started:
                until = self.loop.time() + self.policy.limits.command_timeout
            await self._wait(idle=idle and not reader.discarding_line, until=until)

    async def _read_line(self) -> bytes | Reply:
        """One CRLF-terminated line without its CRLF, or the Reply for a bad line (too long, bare CR/LF)."""
        event = await self._next()
        return event.line if type(event) is wire.Command else _LINE_REFUSALS[type(event)]

    async def _read_data(self) -> tuple[bytes | None, Reply | None]:
        """The DATA content up to CRLF.CRLF (see :mod:`mxgate.core.smtp.wire`), the header hook called when the
        header block has arrived. Returns ``(dot-unstuffed content, None)`` or ``(None, reply)``."""
        limits = self.policy.limits
        reader = self.reader
        reader.start_data(self.policy.size_limit(self.state))
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
                refused = await self._end_of_headers(event.block)
                if refused is not None:
                    reader.refuse()
            elif type(event) is wire.MessageEnded:
                return event.content, None
            elif type(event) is wire.MessageRefused:
                return None, refused if event.reason is wire.Refusal.REFUSED else _DATA_REFUSALS[event.reason]
            else:  # CLOSED
                raise _Gone()

    async def _read_chunk(self, size: int, into: bytearray | None) -> None:
        """Exactly ``size`` octets of a BDAT chunk, appended to ``into`` (``None``: read and dropped). Nothing in
        them is a command; what follows them is. The minimum data rate applies as for DATA."""
        limits = self.policy.limits
        rate = limits.min_data_rate
        started = self.loop.time()
        reader = self.reader
        reader.start_chunk(size, into)
        while True:
            event = reader.next_event()
            if type(event) is wire.ChunkEnded:
                return
            if event is CLOSED:
                raise _Gone()
            until = started + limits.command_timeout + reader.chunk_received / rate if rate else None
            await self._wait(until=until)

    # -- hooks -----------------------------------------------------------------------------------------------

    # -- reverse DNS -------------------------------------------------------------------------------------------

    def _start_rdns(self) -> None:
        timeout = self.listener.config.reverse_dns_timeout
        resolver = self.runtime.resolver
        if timeout <= 0 or resolver is None or not self.state.peer_ip:
            return
        listener = self.listener
        if listener.rdns_running >= listener.rdns_slots:
            # each lookup holds a socket: under a connection flood the lookups must stay inside the descriptor
            # reserve, so a client beyond the bound is simply "unknown" (as when the lookup fails)
            self.rdns = ReverseDns.failed()
            return
        listener.rdns_running += 1
        self._rdns_deadline = self.loop.time() + timeout
        self._rdns_task = self.loop.create_task(rdns_lookup(resolver, self.state.peer_ip))
        self._rdns_task.add_done_callback(listener.rdns_done)

    def _rdns_known(self) -> ReverseDns | None:
        """The result if the lookup has finished (never waits)."""
        task = self._rdns_task
        if self.rdns is None and task is not None and task.done():
            self._rdns_task = None
            if task.cancelled() or task.exception() is not None:
                if not task.cancelled():
                    log.info("reverse DNS lookup failed", extra={"error": repr(task.exception())})
                self.rdns = ReverseDns.failed()
            else:
                self.rdns = task.result()
        return self.rdns

    async def _await_rdns(self) -> ReverseDns | None:
        """The result, waiting at most until ``reverse_dns_timeout`` after the connection; then ``FAILED``."""
        if self._rdns_known() is not None or self._rdns_task is None:
            return self.rdns
        task = self._rdns_task
        remaining = max(0.0, self._rdns_deadline - self.loop.time())
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), remaining)
        if not task.done():
            task.cancel()
            self._rdns_task = None
            self.rdns = ReverseDns.failed()
        return self._rdns_known()

    def snapshot(self) -> Session:
        st = self.state
        conn = st.tx_connector if st.envelope.mail_from is not None else st.connector
        rdns = self._rdns_known()
        return Session(
            id=self.session_id,
            listener=self.listener.config.name,
            peer_ip=st.peer_ip,
            peer_port=self.peer[1],
            local_ip=self.local[0],
            local_port=self.local[1],
            connector=conn.name if conn else None,
            ehlo=st.helo,
            tls=st.tls,
            auth_user=st.auth_user,
            reverse_dns=rdns.name if rdns else None,
            reverse_dns_status=rdns.status if rdns else None,
            stash=self.stash,
        )

    async def _veto(self, call: Awaitable[Verdict | None]) -> Verdict | None:
        """A receive veto hook; a plugin that raises or returns junk becomes 451 4.3.0 (logged with its name)."""
        try:
            return await call
        except HookCallError as exc:
            log.warning("receive hook failed: answering 451 4.3.0", extra={"plugin": exc.plugin, "hook": exc.hook})
            return PLUGIN_FAILED
        except PluginError as exc:
            log.error("receive hook broke the contract: %s", exc)
            return PLUGIN_FAILED

    @staticmethod
    def _outcome(verdict: Verdict | None, default: Reply) -> tuple[Reply, bool, bool]:
        """(reply, accepted, disconnect)."""
        if verdict is None:
            return default, True, False
        if isinstance(verdict, Accept):
            reply = verdict.reply if verdict.reply is not None and verdict.reply.is_positive else default
            return reply, True, False
        if isinstance(verdict, Disconnect):
            return verdict.reply, False, True
        return verdict.reply, False, False

    def _label_connector(self) -> str:
        conn = self.state.tx_connector or self.state.connector
        return conn.name if conn else "anonymous"

    async def _rejected(self, stage: str, reply: Reply, reason: str, **fields: Any) -> None:
        """Record a rejection: the first of its kind in this session goes to the tracking log at once, repeats
        are counted and summed up in one event at the end of the session (a client sending thousands of
        refused RCPTs writes a few lines, not thousands)."""
        key = (stage, reason, f"{reply.code} {reply.enhanced}")
        seen = self._rejects.get(key)
        if seen is None and len(self._rejects) >= MAX_REJECT_KINDS:
            key = next(reversed(self._rejects))
            seen = self._rejects[key]
        if seen is not None:
            self._rejects[key] = (seen[0], seen[1] + 1)
        else:
            rdns = self._rdns_known()
            record = dict(
                stage=stage,
                reply=str(reply),
                connector=self._label_connector(),
                client=self.state.peer_ip,
                client_name=rdns.name if rdns else None,
                helo=self.state.helo,
                tls=self.state.tls.version if self.state.tls else None,
            )
            self._rejects[key] = (record, 0)
            self.runtime.tracking.write(TrackEvent.REJECT, **record, **fields)
        await self.hooks.on_event("message_rejected", listener=self.listener.config.name, reason=reason)

    def _write_repeated_rejections(self) -> None:
        for record, repeated in self._rejects.values():
            if repeated:
                self.runtime.tracking.write(TrackEvent.REJECT, **record, repeated=repeated, session=self.session_id)
        self._rejects.clear()

    async def _end_of_headers(self, block: bytes) -> Reply | None:
        self._headers_msg = IncomingMessage(block, transaction.parse_headers(block))
        verdict = await self._veto(
            self.hooks.on_end_of_headers(self.snapshot(), self.state.envelope, self._headers_msg)
        )
        reply, ok, _ = self._outcome(verdict, R.OK)
        return None if ok else reply

    # -- the session -----------------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self.transport is not None
        transport = self.transport
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.peer, self.local = (str(peer[0]), int(peer[1])), (str(local[0]), int(local[1]))
        self.state.peer_ip = self.peer[0]
        self._deadline = self.loop.time() + self.policy.limits.session_timeout
        self._start_rdns()
        started = False
        try:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                self.state.tls = tls_state(ssl_object, self.listener.client_verifier, now=self.runtime.clock())
            self.state.connector = self.policy.select_connector(self.state)
            started = True
            await self._session()
        except _Close as close:
            if close.reply is not None:
                self._reply(close.reply)
        except (_Gone, ConnectionError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("receive session failed", extra={"session": self.session_id})
            self._reply(Reply(421, "4.3.0", "Local error, closing connection"))
        finally:
            self._flush()
            if self._rdns_task is not None:
                self._rdns_task.cancel()
            if self.transport is not None:
                self.transport.close()
            self.listener.connections.discard(self)
            if self._release is not None:
                self._release()
            self._write_repeated_rejections()
            if started:
                with contextlib.suppress(Exception):
                    conn = self.state.connector  # the one in force at the end (after STARTTLS or AUTH chose)
                    label = conn.name if conn else "anonymous"
                    await self.hooks.on_event("disconnection", listener=self.listener.config.name, connector=label)
                    await self.hooks.on_disconnect(self.snapshot())

    async def _session(self) -> None:
        listener = self.listener.config.name
        await self.hooks.on_event("connection", listener=listener, connector=self._label_connector())
        if self.state.tls is not None:
            await self.hooks.on_event("tls_session", listener=listener, version=self.state.tls.version)
        if self.listener.stopping:
            raise _Close(R.SHUTDOWN)
        verdict = await self._veto(self.hooks.on_connect(self.snapshot()))
        if verdict is PLUGIN_FAILED:
            self.state.deferred = R.PLUGIN_ERROR  # greet, but no transaction gets through
        elif isinstance(verdict, Reject | TempFail | Disconnect):
            await self._rejected("connect", verdict.reply, "plugin")
            raise _Close(verdict.reply)
        self._reply(self.policy.banner())
        limits = self.policy.limits
        while True:
            # the reader's line limit is AUTH's (an initial response up to RFC 4954's 12,288 octets); others: 512
            event = await self._next()
            if type(event) is not wire.Command:
                await self._bad(_LINE_REFUSALS[type(event)])
                continue
            line = event.line
            verb, _, rest = line.partition(b" ")
            verb = verb.upper()
            if verb == b"BDAT":  # its chunk follows at once: it must be read (or the session ends), whatever we say
                await self.cmd_bdat(rest if len(line) + 2 <= limits.command_line else b"?")
                continue
            if len(line) + 2 > limits.command_line and verb != b"AUTH":
                await self._bad(R.LINE_TOO_LONG)
                continue
            handler = self.COMMANDS.get(verb)
            if handler is None:
                if verb in _FOREIGN_VERBS:  # an HTTP or proxy request at the SMTP port: not a confused client
                    await self._rejected("connect", R.FOREIGN_PROTOCOL, "protocol", command=verb.decode("ascii"))
                    raise _Close(R.FOREIGN_PROTOCOL)
                await self._bad(R.UNKNOWN)
                continue
            try:
                arg = rest.decode("utf-8").strip() or None
            except UnicodeDecodeError:
                await self._bad(R.BAD_UTF8)
                continue
            if self.listener.config.require_tls and self.state.tls is None and verb not in _BEFORE_TLS:
                await self._bad(R.NEED_TLS)
                continue
            await handler(self, arg)

    async def _bad(self, reply: Reply) -> None:
        """A bad command: answer (later and later past the soft error limit), count, and close after too many."""
        if self.policy.error(self.state):
            self._reply(reply)
            raise _Close(R.TOO_MANY_ERRORS)
        delay = self.policy.error_delay(self.state)
        if delay > 0:
            self._flush()
            await asyncio.sleep(delay)
        self._reply(reply)

    async def _refuse(self, reply: Reply) -> None:
        """A refused MAIL or RCPT: counted as an error (see :meth:`ReceivePolicy.counts_as_error`) or not."""
        if self.policy.counts_as_error(self.state, reply):
            await self._bad(reply)
        else:
            self._reply(reply)

    # -- commands --------------------------------------------------------------------------------------------

    async def cmd_helo(self, arg: str | None, *, esmtp: bool = False) -> None:
        if not arg or " " in arg or len(arg) > 255 or not arg.isprintable():  # no NUL or controls echoed back
            await self._bad(R.EHLO_SYNTAX)
            return
        st = self.state
        st.reset_transaction()
        st.helo, st.esmtp = arg, esmtp
        await self._await_rdns()
        verdict = await self._veto(self.hooks.on_ehlo_command(self.snapshot(), arg))
        if verdict is not None and not isinstance(verdict, Accept):
            st.helo = None
            if isinstance(verdict, Disconnect):
                raise _Close(verdict.reply)
            self._reply(verdict.reply)
            return
        if esmtp:
            self._reply_lines(250, self.policy.ehlo_lines(st))
        else:
            self._reply(f"250 {self.policy.hostname}")

    async def cmd_ehlo(self, arg: str | None) -> None:
        await self.cmd_helo(arg, esmtp=True)

    async def cmd_noop(self, arg: str | None) -> None:
        self._reply(R.OK)

    async def cmd_rset(self, arg: str | None) -> None:
        if arg:
            await self._bad(R.NO_ARGS)
            return
        self.state.reset_transaction()
        self._reply(R.RESET)

    async def cmd_quit(self, arg: str | None) -> None:
        raise _Close(R.BYE)

    async def cmd_vrfy(self, arg: str | None) -> None:
        self._reply(R.VRFY)

    async def cmd_help(self, arg: str | None) -> None:
        self._reply(R.HELP)

    async def cmd_not_implemented(self, arg: str | None) -> None:
        await self._bad(R.NOT_IMPLEMENTED)

    async def cmd_starttls(self, arg: str | None) -> None:
        ctx = self.listener.tls_context
        if arg:
            await self._bad(R.NO_ARGS)
            return
        if ctx is None:
            await self._bad(R.NOT_IMPLEMENTED)
            return
        if self.state.tls is not None:
            await self._bad(R.TLS_ACTIVE)
            return
        self._reply(R.TLS_READY)
        await self._drain()
        # RFC 3207 §4.2: whatever the client pipelined after STARTTLS is discarded, never executed under TLS.
        self.reader.discard_buffered()
        assert self.transport is not None
        try:
            transport = await self.loop.start_tls(
                self.transport, self, ctx, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("STARTTLS handshake failed", extra={"session": self.session_id, "error": repr(exc)})
            self.transport.abort()
            await self.hooks.on_event("tls_handshake_failed", listener=self.listener.config.name)
            raise _Gone() from None
        if transport is None:
            raise _Gone()
        self.transport = transport  # (input that arrived during the handshake came over TLS: kept)
        st = self.state
        st.reset_after_tls()
        ssl_object = transport.get_extra_info("ssl_object")
        st.tls = tls_state(ssl_object, self.listener.client_verifier, now=self.runtime.clock())
        st.connector = self.policy.select_connector(st)
        await self.hooks.on_starttls(self.snapshot())
        await self.hooks.on_event("tls_session", listener=self.listener.config.name, version=st.tls.version)

    async def cmd_auth(self, arg: str | None) -> None:
        st = self.state
        problem = self.policy.check_auth(st)
        if problem is not None:
            await self._bad(problem)
            return
        parsed = sasl.parse_auth(arg)
        if isinstance(parsed, Reply):
            await self._bad(parsed)
            return
        limiter = self.listener.auth_failures
        if limiter.blocked(st.peer_ip):
            await self.hooks.on_event("auth", result="rate_limited")
            self._reply(R.AUTH_RATE)
            return
        mech, initial = parsed
        exchange = sasl.new_exchange(mech)
        if exchange is None:
            await self._bad(R.AUTH_MECH)
            return
        creds = await self._sasl(exchange, initial)
        if isinstance(creds, Reply):
            await self._bad(creds)
            return
        username, password = creds.username, creds.password
        # reserved before the (slow) check: parallel connections cannot all slip under the limit
        if not limiter.reserve(st.peer_ip):
            await self.hooks.on_event("auth", result="rate_limited")
            self._reply(R.AUTH_RATE)
            return
        try:
            result: AuthResult | None = await self.hooks.resolve_credentials(self.snapshot(), username, password)
        except (HookCallError, PluginError) as exc:
            log.warning("credentials hook failed: answering 451 4.3.0", extra={"error": repr(exc)})
            self._reply(R.PLUGIN_ERROR)
            return
        finally:
            limiter.release(st.peer_ip)
        if result is not None and result.ok:
            limiter.succeeded(st.peer_ip)
            st.auth_user = result.user or username
            st.connector = self.policy.select_connector(st)  # re-evaluated after AUTH
            await self.hooks.on_event("auth", result="ok")
            self._reply(R.AUTH_OK)
            return
        if result is not None and result.temporary:
            await self.hooks.on_event("auth", result="tempfail")
            self._reply(R.AUTH_TEMP)
            return
        limiter.failed(st.peer_ip)
        await self.hooks.on_event("auth", result="failed")
        await self._bad(R.AUTH_FAILED)

    async def _sasl(self, exchange: sasl.Exchange, initial: str | None) -> sasl.Credentials | Reply:
        """Run an AUTH exchange (:mod:`mxgate.core.smtp.sasl`): its challenges sent, the client's lines fed to it,
        ``on_auth_command`` asked before it (LOGIN) or once the username is known (PLAIN)."""
        mech = exchange.mechanism
        if exchange.veto_first:
            refused = await self._auth_veto(mech, None)
            if refused is not None:
                return refused
        step = exchange.start(initial)
        while isinstance(step, sasl.Challenge):
            self._reply(f"334 {step.text}")
            line = await self._read_line()
            if isinstance(line, Reply):
                return line
            step = exchange.respond(line)
        if isinstance(step, Reply):
            return step
        if not exchange.veto_first:
            refused = await self._auth_veto(mech, step.username)
            if refused is not None:
                return refused
        return step if step.authzid_ok else R.AUTH_FAILED

    async def _auth_veto(self, mechanism: str, username: str | None) -> Reply | None:
        verdict = await self._veto(self.hooks.on_auth_command(self.snapshot(), mechanism, username))
        reply, ok, _ = self._outcome(verdict, R.OK)
        return None if ok else reply

    async def cmd_mail(self, arg: str | None) -> None:
        st = self.state
        if st.helo is None:
            await self._bad(R.NEED_EHLO)
            return
        try:
            mail = parse_mail(arg or "", esmtp=st.esmtp)
        except ParseError as exc:
            await self._bad(exc.reply)
            return
        problem = self.policy.check_mail(st, mail)
        if problem is not None:
            if problem.code == 503:
                await self._bad(problem)
            else:
                await self._rejected("mail", problem, _reason(problem), sender=str(mail.sender))
                await self._refuse(problem)
            return
        if st.deferred is not None:
            st.tx_connector = None
            self._reply(st.deferred)
            return
        verdict = await self._veto(self.hooks.on_mail_command(self.snapshot(), st.envelope, mail.sender))
        reply, ok, close = self._outcome(verdict, R.SENDER_OK)
        if not ok:
            st.tx_connector = None
            await self._rejected("mail", reply, "plugin", sender=str(mail.sender))
            if close:
                raise _Close(reply)
            await self._refuse(reply)
            return
        st.envelope = dataclasses.replace(
            st.envelope,
            mail_from=mail.sender,
            mail_options=mail.options,
            smtputf8=mail.smtputf8,
            body=mail.body,
            declared_size=mail.size,
            dsn_ret=mail.ret,
            envid=mail.envid,
            requiretls=mail.requiretls,
        )
        self._reply(reply)

    async def cmd_rcpt(self, arg: str | None) -> None:
        st = self.state
        if st.envelope.mail_from is None:
            await self._bad(R.NEED_MAIL)
            return
        try:
            parsed = parse_rcpt(
                arg or "", smtputf8=st.envelope.smtputf8, postmaster_domain=self.policy.postmaster_domain
            )
        except ParseError as exc:
            await self._bad(exc.reply)
            return
        rcpt = parsed.recipient
        problem = self.policy.check_rcpt(st, rcpt)
        if problem is not None:
            await self._rejected(
                "rcpt", problem, _reason(problem), sender=str(st.envelope.mail_from), recipient=str(rcpt)
            )
            await self._refuse(problem)
            return
        verdict = await self._veto(self.hooks.on_rcpt_command(self.snapshot(), st.envelope, rcpt))
        reply, ok, close = self._outcome(verdict, R.RCPT_OK)
        if not ok:
            await self._rejected("rcpt", reply, "plugin", sender=str(st.envelope.mail_from), recipient=str(rcpt))
            if close:
                raise _Close(reply)
            await self._refuse(reply)
            return
        st.envelope = dataclasses.replace(
            st.envelope, rcpt_tos=(*st.envelope.rcpt_tos, rcpt), rcpt_dsn=(*st.envelope.rcpt_dsn, parsed.dsn)
        )
        self._reply(reply)

    async def cmd_data(self, arg: str | None) -> None:
        st = self.state
        if arg:
            await self._bad(R.NO_ARGS)
            return
        problem = self.policy.check_data(st)
        if problem is not None:
            await self._bad(problem)
            return
        self._reply("354 End data with <CR><LF>.<CR><LF>")
        self._transactions += 1
        raw, refused = await self._read_data()
        envelope = st.envelope
        sender = str(envelope.mail_from)
        try:
            if refused is not None or raw is None:
                reply = refused or R.QUEUE_ERROR
                self._reply(reply)
                await self._rejected("data", reply, _reason(reply), sender=sender, recipients=len(envelope.rcpt_tos))
                if (reply is R.BARE_LF_DATA or reply is R.TEXT_LINE_TOO_LONG) and self.policy.error(st):
                    raise _Close(R.TOO_MANY_ERRORS)
                return
            await self._accept_message(raw)
        finally:
            st.reset_transaction()

    async def cmd_bdat(self, arg: bytes) -> None:
        """RFC 3030 ``BDAT <octets> [LAST]``: the chunk is read exactly, never dot-unstuffed, never parsed for
        commands; the assembled message meets DATA's rules (CRLF only, line length, size across chunks)."""
        st = self.state
        try:
            size, last = parse_bdat(arg.strip(b" "))
        except ParseError:
            # we cannot tell where the chunk ends: reading on would run its octets as commands
            await self._rejected("data", R.BDAT_SYNTAX, "syntax")
            raise _Close(R.BDAT_SYNTAX) from None
        problem = self.policy.check_bdat(st, size)
        if problem is not None:
            await self._read_chunk(size, None)
            sender = str(st.envelope.mail_from) if st.envelope.mail_from is not None else None
            st.reset_transaction()  # RFC 3030 §2: a failed chunk fails the transaction
            if problem.code in (503, 530):
                await self._bad(problem)
            else:
                await self._rejected("data", problem, _reason(problem), sender=sender)
                self._reply(problem)
            return
        if st.chunks is None:
            st.chunks = bytearray()
            self._transactions += 1
        await self._read_chunk(size, st.chunks)
        if not last:
            self._reply(Reply(250, "2.0.0", f"{size} octets received"))
            return
        raw = bytes(st.chunks)
        st.chunks = None
        envelope = st.envelope
        sender = str(envelope.mail_from)
        try:
            refused = self.policy.check_text(raw)
            if refused is None:
                j = raw.find(b"\r\n\r\n")
                refused = await self._end_of_headers(raw if j < 0 else raw[: j + 2])
            if refused is not None:
                self._reply(refused)
                await self._rejected(
                    "data", refused, _reason(refused), sender=sender, recipients=len(envelope.rcpt_tos)
                )
                if (refused is R.BARE_LF_DATA or refused is R.TEXT_LINE_TOO_LONG) and self.policy.error(st):
                    raise _Close(R.TOO_MANY_ERRORS)
                return
            if raw and not raw.endswith(b"\r\n"):
                raw += b"\r\n"  # a message ends with a line end (DATA's CRLF.CRLF guarantees one)
            await self._accept_message(raw, data_command=False)
        finally:
            st.reset_transaction()

    async def _accept_message(self, raw: bytes, *, data_command: bool = True) -> None:
        """A received message (DATA's unstuffed, BDAT's assembled): ``on_end_of_data``, then the queue
        (:mod:`mxgate.core.smtp.transaction`); ``250`` only once it is on disk."""
        st = self.state
        envelope = st.envelope
        sender = str(envelope.mail_from)
        # DATA's line lengths are checked here, once unstuffed (BDAT's in ReceivePolicy.check_text)
        if data_command and transaction.too_long_lines(raw, self.policy.limits.text_line):
            self._reply(R.TEXT_LINE_TOO_LONG)
            await self._rejected("data", R.TEXT_LINE_TOO_LONG, "line_length", sender=sender)
            return
        message = transaction.message_of(raw, self._headers_msg)
        self._headers_msg = None
        verdict = await self._veto(self.hooks.on_end_of_data(self.snapshot(), envelope, message))
        reply, ok, close = self._outcome(verdict, R.OK)
        if not ok:
            await self._rejected("data", reply, "plugin", sender=sender, recipients=len(envelope.rcpt_tos))
            if close:
                raise _Close(reply)
            self._reply(reply)
            return
        rdns = await self._await_rdns()
        listener = self.listener.config.name
        sub = transaction.prepare(
            st,
            message,
            hostname=self.policy.hostname,
            listener=listener,
            session_id=self.session_id,
            ident=f"{self.session_id}.{self._transactions}",
            rdns=rdns,
            now=self.runtime.clock(),
        )
        queued = await transaction.submit(self.runtime, sub, session_id=self.session_id)
        if isinstance(queued, tuple):
            reply, reason = queued
            self._reply(reply)
            await self._rejected("data", reply, reason, sender=sender)
            return
        record = transaction.receive_record(
            sub, st, queue_id=queued, listener=listener, connector=self._label_connector(), rdns=rdns
        )
        self.runtime.tracking.write(TrackEvent.RECEIVE, **record)
        self._reply(f"250 2.0.0 Ok: queued as {queued}")
        st.errors = 0  # a client that delivers mail starts over (max_errors counts errors "without delivering")
        await self.hooks.on_event("message_received", listener=listener, connector=self._label_connector())


def _reason(reply: Reply) -> str:
    """A bounded label for ``message_rejected`` events."""
    if reply.enhanced == "5.7.1" and "Relay" in reply.text:
        return "relay"
    if reply.enhanced == "5.7.1":
        return "sender_restriction"
    if reply.code == 530:
        return "tls_required"
    if reply.enhanced == "5.3.4":
        return "size"
    if reply.enhanced == "5.6.0":
        return "smuggling"
    if reply.enhanced == "4.5.3":
        return "recipients"
    if reply.enhanced == "5.1.2":
        return "no_route"
    if reply.enhanced == "4.3.0":
        return "plugin"
    return "policy" if reply.code >= 500 else "tempfail"


Connection.COMMANDS = {
    b"HELO": Connection.cmd_helo,
    b"EHLO": Connection.cmd_ehlo,
    b"STARTTLS": Connection.cmd_starttls,
    b"AUTH": Connection.cmd_auth,
    b"MAIL": Connection.cmd_mail,
    b"RCPT": Connection.cmd_rcpt,
    b"DATA": Connection.cmd_data,
    b"RSET": Connection.cmd_rset,
    b"NOOP": Connection.cmd_noop,
    b"QUIT": Connection.cmd_quit,
    b"VRFY": Connection.cmd_vrfy,
    b"HELP": Connection.cmd_help,
    b"EXPN": Connection.cmd_not_implemented,
    b"TURN": Connection.cmd_not_implemented,
    b"ETRN": Connection.cmd_not_implemented,
}
