"""The aiosmtpd sinks: :class:`SmtpSink`, an SMTP server in the test's own event loop (STARTTLS or implicit
TLS with a test-CA certificate, injected RCPT/DATA replies, a drop in the middle of DATA, every accepted
:class:`ReceivedMessage` with its TLS version and SNI), and :class:`ThreadedSmtpSink`, the same in its own thread
for synchronous tests. Re-exported by :mod:`mxgate.testing.sinks`."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
import threading
import weakref
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from mxgate.core import tls
from mxgate.testing.ca import IssuedCert

__all__ = ["ReceivedMessage", "SmtpSink", "ThreadedSmtpSink"]


def _require_loopback(host: str) -> None:
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise ValueError(f"test sinks listen on loopback only, not {host!r}")


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One message a sink accepted (the DATA reply was 2xx)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes  # as received after dot-unstuffing, CRLF line ends, without the final "."
    tls_version: str | None  # "TLSv1.3"; None for a cleartext session
    cipher: str | None
    sni: str | None  # the server name the client sent in its TLS ClientHello
    peer: tuple[str, int] | None  # client address and port
    helo: str | None = None  # the EHLO/HELO argument
    mail_options: tuple[str, ...] = ()  # MAIL FROM parameters, e.g. ("SIZE=123", "BODY=8BITMIME")
    rcpt_options: tuple[str, ...] = ()


class _SinkSMTP(SMTP):
    """aiosmtpd's SMTP with a DATA command that can hang up part-way, counting TLS handshakes and hang-ups."""

    def __init__(
        self, handler: _SinkHandler, *, sink: SmtpSink, drop_after_data_bytes: int | None, **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self._sink = sink
        self._drop_after = drop_after_data_bytes

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        await super().smtp_STARTTLS(arg)
        if self._tls_protocol is not None:
            self._sink.tls_handshakes += 1

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self._sink._event(disconnected=True)

    def _getparams(self, params: Sequence[str]) -> dict[str, str | bool] | None:
        """aiosmtpd refuses MAIL/RCPT parameters it does not know (555); those of the extensions this sink
        advertises (DSN, REQUIRETLS) are let through and recorded in ``mail_options``/``rcpt_options``."""
        result = super()._getparams(params)
        if result is not None:
            for keyword in self._sink.accepted_params(tls=self._tls_protocol is not None):
                result.pop(keyword, None)
        return result

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        envelope, session = self.envelope, self.session
        if self._drop_after is None or arg or envelope is None or session is None or not envelope.rcpt_tos:
            await super().smtp_DATA(arg)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        received = b""
        # Bounded: at most drop_after bytes are read, and a client that finished its message early is cut off
        # at its final "." instead of being waited on.
        while len(received) < self._drop_after and not received.endswith(b"\r\n.\r\n"):
            chunk = await self._reader.read(self._drop_after - len(received))
            if not chunk:
                break
            received += chunk
        if isinstance(self.transport, asyncio.WriteTransport):
            self.transport.abort()


class _SinkHandler:
    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        self._sink.mail_commands.append(address)
        if self._sink.mail_reply is not None:
            return self._sink.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        self._sink.rcpt_commands.append(address)
        reply = self._sink.rcpt_reply_for(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        tls = isinstance(server, _SinkSMTP) and server._tls_protocol is not None
        extra = [f"250-{keyword}" for keyword in self._sink.advertised(tls=tls)]
        return [*responses[:-1], *extra, responses[-1]]

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._sink.quits += 1
        return "221 Bye"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._sink.rsets += 1
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self._sink.data_delay:
            await asyncio.sleep(self._sink.data_delay)
        reply = self._sink.data_reply
        if reply is not None and not reply.startswith("2"):
            return reply
        transport = server.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        info = tls.describe(ssl_object) if ssl_object is not None else None
        peer = session.peer if isinstance(session.peer, tuple) else None
        content = envelope.original_content
        self._sink._record(
            ReceivedMessage(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=bytes(content) if content is not None else b"",
                tls_version=info.version if info else None,
                cipher=info.cipher if info else None,
                sni=info.server_name if info else None,
                peer=(str(peer[0]), int(peer[1])) if peer else None,
                helo=session.host_name,
                mail_options=tuple(envelope.mail_options),
                rcpt_options=tuple(envelope.rcpt_options),
            )
        )
        return reply or "250 2.0.0 OK: queued"


class SmtpSink:
    """An aiosmtpd SMTP server on loopback that records what it accepts.

    :param host: loopback address to listen on (``127.0.0.1``, ``::1``).
    :param port: 0 picks a free port; read it from :attr:`port` after :meth:`start`.
    :param tls: certificate to serve; STARTTLS is offered when set (unless ``starttls=False``).
    :param sni: server name -> certificate served when the client asks for it (``*.`` entries allowed).
    :param starttls: ``False`` never offers STARTTLS, even with a certificate.
    :param implicit_tls: TLS from the first byte (SMTPS/submissions style) instead of STARTTLS.
    :param require_tls: answer 530 to MAIL/RCPT/DATA until STARTTLS is done.
    :param hostname: name in the banner and the EHLO reply.
    :param rcpt_replies: recipient (full address or local part, case-insensitive) -> reply line, e.g.
        ``{"busy": "451 4.2.0 try later", "nobody@example.org": "550 5.1.1 no such user"}``.
    :param mail_reply: reply to every MAIL FROM instead of accepting it.
    :param data_reply: reply after DATA; a non-2xx reply records nothing.
    :param drop_after_data_bytes: after "354", read at most this many bytes, then close the connection
        without a reply (the message is not recorded).
    :param idle_timeout: seconds a client may stay silent before the sink closes the connection (no reply).
    :param data_delay: seconds to wait before answering the end of the message (a slow server).
    :param dsn: advertise DSN (RFC 3461) and accept RET/ENVID/NOTIFY/ORCPT (recorded, not acted on).
    :param requiretls: advertise REQUIRETLS (RFC 8689) once TLS is up, and accept ``MAIL FROM ... REQUIRETLS``.

    Counters for connection handling: :attr:`connections` (accepted), :attr:`disconnections` (closed, by
    either side), :attr:`peak_connections` (most open at once), :attr:`quits`, :attr:`rsets`,
    :attr:`tls_handshakes`; :attr:`mail_commands` and :attr:`rcpt_commands` record every MAIL / RCPT address,
    accepted or not, in order (a recipient callout shows up there and not in :attr:`messages`);
    :meth:`close_connections` hangs up on every open session, as a server that times out idle clients does.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: IssuedCert | None = None,
        sni: Mapping[str, IssuedCert] | None = None,
        starttls: bool = True,
        implicit_tls: bool = False,
        require_tls: bool = False,
        hostname: str = "sink.mxgate.test",
        rcpt_replies: Mapping[str, str] | None = None,
        mail_reply: str | None = None,
        data_reply: str | None = None,
        drop_after_data_bytes: int | None = None,
        data_size_limit: int = 33_554_432,
        idle_timeout: float = 30.0,
        data_delay: float = 0.0,
        dsn: bool = False,
        requiretls: bool = False,
    ) -> None:
        _require_loopback(host)
        if (implicit_tls or require_tls or sni) and tls is None:
            raise ValueError("implicit_tls, require_tls and sni need a certificate (tls=...)")
        if require_tls and not (starttls or implicit_tls):
            raise ValueError("require_tls with starttls=False and no implicit TLS would refuse every message")
        self._host = host
        self._port = port
        self.tls = tls
        self.sni = dict(sni or {})
        self.starttls = starttls
        self.implicit_tls = implicit_tls
        self.require_tls = require_tls
        self.hostname = hostname
        self.rcpt_replies = {k.lower(): v for k, v in (rcpt_replies or {}).items()}
        self.mail_reply = mail_reply
        self.data_reply = data_reply
        self.drop_after_data_bytes = drop_after_data_bytes
        self.data_size_limit = data_size_limit
        self.idle_timeout = idle_timeout
        self.data_delay = data_delay
        self.dsn = dsn
        self.requiretls = requiretls
        self.connections = 0  # TCP connections accepted so far
        self.peak_connections = 0  # most connections open at the same time
        self.disconnections = 0  # of those, closed since (by either side)
        self.quits = 0  # QUIT commands received
        self.rsets = 0  # RSET commands received
        self.tls_handshakes = 0  # STARTTLS handshakes completed
        self.mail_commands: list[str] = []  # MAIL FROM addresses ("<>": the null sender), whatever the reply
        self.rcpt_commands: list[str] = []  # RCPT TO addresses, in order, whatever the reply
        self._messages: list[ReceivedMessage] = []
        self._changed: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._protocols: weakref.WeakSet[_SinkSMTP] = weakref.WeakSet()

    # -- state ------------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    def advertised(self, *, tls: bool) -> tuple[str, ...]:
        """EHLO keywords this sink adds to aiosmtpd's own."""
        return (*(("DSN",) if self.dsn else ()), *(("REQUIRETLS",) if self.requiretls and tls else ()))

    def accepted_params(self, *, tls: bool) -> tuple[str, ...]:
        """MAIL/RCPT parameters of the advertised extensions."""
        dsn = ("RET", "ENVID", "NOTIFY", "ORCPT") if self.dsn else ()
        return (*dsn, *(("REQUIRETLS",) if self.requiretls and tls else ()))

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("sink not started")
        return self._port

    @property
    def messages(self) -> tuple[ReceivedMessage, ...]:
        return tuple(self._messages)

    def rcpt_reply_for(self, address: str) -> str | None:
        address = address.lower()
        reply = self.rcpt_replies.get(address)
        if reply is None and "@" in address:
            reply = self.rcpt_replies.get(address.rsplit("@", 1)[0])
        return reply

    @property
    def open_connections(self) -> int:
        return self.connections - self.disconnections

    def _record(self, message: ReceivedMessage) -> None:
        self._messages.append(message)
        self._event()

    def _event(self, *, disconnected: bool = False) -> None:
        if disconnected:
            self.disconnections += 1
        if self._changed is not None:
            self._changed.set()

    def close_connections(self) -> int:
        """Close every open session now, without a reply (an idle timeout on the server's side); returns how
        many were open."""
        closed = 0
        for proto in list(self._protocols):
            transport = proto.transport  # uvloop's transports are not asyncio.WriteTransport instances
            if transport is not None and not transport.is_closing():
                transport.close()
                closed += 1
        return closed

    async def wait_disconnections(self, n: int = 1, timeout: float = 5.0) -> int:
        """Wait until at least ``n`` connections were closed; :class:`TimeoutError` after ``timeout`` s."""
        if self._changed is None:
            raise RuntimeError("sink not started")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.disconnections < n:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{self.disconnections} of {n} connections closed within {timeout}s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return self.disconnections

    async def wait_for(self, n: int = 1, timeout: float = 5.0) -> tuple[ReceivedMessage, ...]:
        """Wait until at least ``n`` messages were accepted; :class:`TimeoutError` after ``timeout`` s."""
        if self._changed is None:
            raise RuntimeError("sink not started")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self._messages) < n:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{len(self._messages)} of {n} messages within {timeout}s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return self.messages

    # -- lifecycle --------------------------------------------------------------------------------

    def _contexts(self) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
        """(STARTTLS context, implicit-TLS context)."""
        if self.tls is None:
            return None, None
        ctx = tls.server_context(self.tls.chain_path, self.tls.key_path, sni={n: c.files for n, c in self.sni.items()})
        if self.implicit_tls:
            return None, ctx
        return (ctx if self.starttls else None), None

    async def start(self) -> Self:
        if self._server is not None:
            return self
        loop = asyncio.get_running_loop()
        starttls_ctx, implicit_ctx = self._contexts()
        self._changed = asyncio.Event()
        handler = _SinkHandler(self)

        def factory() -> _SinkSMTP:
            self.connections += 1
            self.peak_connections = max(self.peak_connections, self.open_connections)
            proto = _SinkSMTP(
                handler,
                sink=self,
                drop_after_data_bytes=self.drop_after_data_bytes,
                hostname=self.hostname,
                tls_context=starttls_ctx,
                require_starttls=self.require_tls and starttls_ctx is not None,
                data_size_limit=self.data_size_limit,
                enable_SMTPUTF8=True,
                timeout=self.idle_timeout,
                loop=loop,
            )
            self._protocols.add(proto)
            return proto

        self._server = await loop.create_server(factory, self._host, self._port, ssl=implicit_ctx)
        self._port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for proto in list(self._protocols):
            for transport in (proto.transport, getattr(proto, "_original_transport", None)):
                if isinstance(transport, asyncio.WriteTransport):
                    transport.abort()
        await server.wait_closed()
        for _ in range(3):  # let the aborted sessions' tasks see their cancellation
            await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class ThreadedSmtpSink:
    """A :class:`SmtpSink` running in its own thread and event loop, for synchronous tests.

    Takes the same arguments as :class:`SmtpSink`; use it as ``with ThreadedSmtpSink(tls=cert) as sink:``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.sink = SmtpSink(*args, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self.sink.host

    @property
    def port(self) -> int:
        return self.sink.port

    @property
    def messages(self) -> tuple[ReceivedMessage, ...]:
        return self.sink.messages

    @property
    def connections(self) -> int:
        return self.sink.connections

    def _run(self, coro: Awaitable[Any], timeout: float) -> Any:
        if self._loop is None:
            raise RuntimeError("sink not started")
        return asyncio.run_coroutine_threadsafe(_as_coroutine(coro), self._loop).result(timeout)

    def start(self, timeout: float = 10.0) -> Self:
        if self._loop is not None:
            return self
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="mxgate-smtp-sink", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._run(self.sink.start(), timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            with contextlib.suppress(Exception):
                self._run(self.sink.stop(), timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = None

    def wait_for(self, n: int = 1, timeout: float = 5.0) -> tuple[ReceivedMessage, ...]:
        result: tuple[ReceivedMessage, ...] = self._run(self.sink.wait_for(n, timeout), timeout + 5)
        return result

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


async def _as_coroutine(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
