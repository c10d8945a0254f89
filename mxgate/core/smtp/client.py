"""A small async SMTP client for the delivery path (RFC 5321, 3207, 2920, 1870, 6152, 6531, 3463, 4954).

Why our own and not aiosmtplib: the delivery path needs things a general-purpose client hides or does not do:

* RFC 3207 §4.2: whatever the server sent after its ``220`` to STARTTLS (a response-injection attack) is
  discarded before the handshake; here the receive buffer is ours, so it is simply cleared (and counted).
* the raw presented certificate chain (DANE and our own WebPKI checks verify *after* the handshake, with
  verification off in OpenSSL) and the peer's EHLO name (TLS-RPT ``receiving-mx-helo``);
* PIPELINING (RFC 2920) of MAIL/RCPT/DATA with per-recipient replies, which the transaction logic needs;
* CHUNKING (RFC 3030): the message in ``BDAT n [LAST]`` chunks, exact byte counts, no dot-stuffing, pipelined
  with MAIL/RCPT where the peer offers PIPELINING.

The client does I/O and parsing only; what to do with the replies is :mod:`mxgate.core.delivery`'s business.
Every read is bounded (line length, reply lines, ``timeout``); no loop waits forever.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

__all__ = [
    "MAX_LINE",
    "SmtpClient",
    "SmtpClientError",
    "SmtpConnectionError",
    "SmtpProtocolError",
    "SmtpReply",
    "StaleSession",
    "dot_stuff",
    "parse_enhanced",
]

MAX_LINE = 4096  # longer than RFC 5321's 512 for replies: real servers send long texts
MAX_REPLY_LINES = 200
BDAT_CHUNK = 1024 * 1024  # bytes per BDAT chunk
_LONE_CR = re.compile(rb"\r[^\n]")
_DOT_LINE = re.compile(rb"\n\.")
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|\Z)")


class SmtpClientError(Exception):
    """Base of the client's errors."""


class SmtpConnectionError(SmtpClientError):
    """The connection failed, was closed, or timed out."""


class SmtpProtocolError(SmtpClientError):
    """The peer sent something that is not SMTP (bad reply line, over-long line, too many lines)."""


class StaleSession(SmtpConnectionError):
    """A reused session failed the RSET pipelined in front of its transaction (no reply, or not 250): nothing of
    the transaction counts, and the caller should try another session (Postfix's cached-session check)."""


def _expire(waiter: asyncio.Future[None]) -> None:
    """A read's deadline (a timer callback): the waiting read raises."""
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def parse_enhanced(code: int, text: str) -> tuple[str | None, str]:
    """Split an RFC 3463 enhanced status code off the front of a reply text, when it fits the basic code."""
    m = _ENHANCED.match(text)
    if m and int(m.group(1)) == code // 100:
        return f"{m.group(1)}.{m.group(2)}.{m.group(3)}", text[m.end() :]
    return None, text


@dataclass(frozen=True, slots=True)
class SmtpReply:
    """One (possibly multi-line) reply from the peer."""

    code: int
    lines: tuple[str, ...]  # texts after "NNN-"/"NNN ", enhanced code left in
    enhanced: str | None = None  # RFC 3463 code of the first line, when the peer sent one

    @classmethod
    def parse(cls, code: int, lines: Sequence[str]) -> SmtpReply:
        enhanced, _ = parse_enhanced(code, lines[0] if lines else "")
        return cls(code, tuple(lines), enhanced)

    @property
    def text(self) -> str:
        """The texts without their enhanced codes, joined by spaces (one line, for logs and DSNs)."""
        return " ".join(parse_enhanced(self.code, line)[1].strip() for line in self.lines).strip()

    @property
    def status(self) -> str:
        """The enhanced code, or one derived from the basic code (RFC 3463: X.0.0)."""
        return self.enhanced or f"{self.code // 100}.0.0"

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}".rstrip()


def dot_stuff(data: bytes) -> bytes:
    """The DATA payload on the wire: CRLF line ends, leading dots doubled, final CRLF, without the ``.`` line.

    Bare CR and LF become CRLF, so that nothing we relay can be read as an end of data (SMTP smuggling).
    """
    # clean CRLF lines: as many CR as LF and every CR followed by LF (then every LF follows a CR); the scans
    # chosen for speed (bytes.count of two bytes and `in` are slower than these on a 10 KiB message)
    if (
        data.count(b"\r") == data.count(b"\n")
        and not data.endswith(b"\r")
        and _LONE_CR.search(data) is None
        and not data.startswith(b".")
        and _DOT_LINE.search(data) is None
    ):
        # the usual case (what our own receive side queued): clean CRLF lines, no leading dot; nothing to change
        return data if not data or data.endswith(b"\r\n") else data + b"\r\n"
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    lines = text.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


class _Protocol(asyncio.Protocol):
    """A receive buffer we own (so STARTTLS can drop what was injected) plus connection state."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool | None:
        self.closed = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def waiter(self) -> asyncio.Future[None]:
        """A future the next ``data_received``/EOF/loss resolves. Made synchronously, before awaiting, so that
        data arriving between the buffer check and the wait cannot be missed (a lost wake-up stalled sessions
        whose TLS 1.3 server sent session tickets right after the handshake)."""
        self._waiter = asyncio.get_running_loop().create_future()
        return self._waiter


@dataclass
class SmtpClient:
    """One SMTP connection. Create with :meth:`connect`; every method raises :class:`SmtpClientError` subclasses
    for transport and protocol failures and returns :class:`SmtpReply` for anything the server answered."""

    host: str  # address dialled
    port: int
    timeout: float
    _proto: _Protocol = field(repr=False)
    _transport: asyncio.Transport = field(repr=False)
    banner: SmtpReply | None = None
    ehlo_reply: SmtpReply | None = None
    extensions: dict[str, str] = field(default_factory=dict)  # EHLO keyword (upper case) -> parameters
    esmtp: bool = False
    peer_ehlo_name: str | None = None  # the host name in the peer's EHLO (or banner) reply
    tls: bool = False
    discarded_after_starttls: int = 0  # bytes dropped per RFC 3207 §4.2
    transcript: list[str] = field(default_factory=list)  # "C: ..."/"S: ..." lines (no message data, no secrets)
    local_address: tuple[str, int] | None = None

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        timeout: float = 30.0,
        connect_timeout: float | None = None,
        source_address: str | None = None,
    ) -> SmtpClient:
        """Open a TCP connection and read the greeting (``banner``; a non-2xx greeting is returned, not raised)."""
        loop = asyncio.get_running_loop()
        local = (source_address, 0) if source_address else None
        try:
            transport, proto = await asyncio.wait_for(
                loop.create_connection(_Protocol, host, port, local_addr=local),
                connect_timeout if connect_timeout is not None else timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise SmtpConnectionError(f"connect to {host}:{port} failed: {exc or type(exc).__name__}") from exc
        sock = transport.get_extra_info("sockname")
        client = cls(host, port, timeout, proto, transport)
        if isinstance(sock, tuple):
            client.local_address = (str(sock[0]), int(sock[1]))
        try:
            client.banner = await client.read_reply(connect_timeout)
        except BaseException:
            client.abort()
            raise
        first = client.banner.lines[0].split() if client.banner.lines else []
        client.peer_ehlo_name = first[0] if first else None
        return client

    # -- low level ---------------------------------------------------------------------------------------

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        obj = self._transport.get_extra_info("ssl_object")
        return obj if isinstance(obj, ssl.SSLObject) else None

    def _write(self, data: bytes) -> None:
        if self._proto.closed or self._transport.is_closing():
            raise SmtpConnectionError("connection closed by peer")
        self._transport.write(data)

    async def send_command(self, line: str, *, log: str | None = None) -> None:
        self.transcript.append(f"C: {log if log is not None else line}")
        self._write(line.encode("utf-8") + b"\r\n")

    async def _readline(self, deadline: float) -> bytes:
        proto = self._proto
        while True:
            buffer = proto.buffer
            idx = buffer.find(b"\n")
            if idx >= 0:
                if idx + 1 > MAX_LINE:
                    raise SmtpProtocolError("reply line too long")
                line = bytes(buffer[: idx + 1])
                del buffer[: idx + 1]
                return line
            if len(buffer) > MAX_LINE:
                raise SmtpProtocolError("reply line too long")
            if proto.closed:
                raise SmtpConnectionError("connection closed by peer")
            loop = asyncio.get_running_loop()
            if deadline - loop.time() <= 0:
                raise SmtpConnectionError("timed out waiting for a reply")
            # a timer on the waiter rather than asyncio.wait_for (which wraps every wait in a task): this is on
            # every reply's path
            waiter = proto.waiter()
            timer = loop.call_at(deadline, _expire, waiter)
            try:
                await waiter
            except TimeoutError:
                raise SmtpConnectionError("timed out waiting for a reply") from None
            finally:
                timer.cancel()
                proto._waiter = None

    async def read_reply(self, timeout: float | None = None) -> SmtpReply:
        """Read one reply (all its lines)."""
        deadline = asyncio.get_running_loop().time() + (timeout if timeout is not None else self.timeout)
        code: int | None = None
        lines: list[str] = []
        buffer = self._proto.buffer
        for _ in range(MAX_REPLY_LINES):
            idx = buffer.find(b"\n")
            if 0 <= idx < MAX_LINE:  # the line is here already (pipelined replies come together): no wait
                raw = bytes(buffer[: idx + 1])
                del buffer[: idx + 1]
            else:
                raw = await self._readline(deadline)
            text = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            if len(text) < 3 or not text[:3].isdigit() or (len(text) > 3 and text[3] not in " -"):
                raise SmtpProtocolError(f"not an SMTP reply: {text[:80]!r}")
            this = int(text[:3])
            if not 200 <= this <= 599:
                raise SmtpProtocolError(f"reply code out of range: {text[:80]!r}")
            if code is not None and this != code:
                raise SmtpProtocolError(f"reply code changed inside a multi-line reply: {text[:80]!r}")
            code = this
            lines.append(text[4:])
            self.transcript.append(f"S: {text}")
            if len(text) == 3 or text[3] == " ":
                return SmtpReply.parse(code, lines)
        raise SmtpProtocolError("too many reply lines")

    async def command(self, line: str, *, log: str | None = None, timeout: float | None = None) -> SmtpReply:
        await self.send_command(line, log=log)
        return await self.read_reply(timeout)

    # -- session -----------------------------------------------------------------------------------------

    async def ehlo(self, name: str) -> SmtpReply:
        """EHLO, falling back to HELO when the server refuses EHLO with 5xx (RFC 5321 §3.2)."""
        reply = await self.command(f"EHLO {name}")
        self.extensions = {}
        if reply.code == 250:
            self.esmtp = True
            for line in reply.lines[1:]:
                keyword, _, params = line.strip().partition(" ")
                if keyword:
                    self.extensions[keyword.upper()] = params.strip()
        elif reply.is_permanent:
            reply = await self.command(f"HELO {name}")
            self.esmtp = False
        self.ehlo_reply = reply
        if reply.code == 250 and reply.lines:
            first = reply.lines[0].split()
            if first:
                self.peer_ehlo_name = first[0]
        return reply

    def supports(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    @property
    def size_limit(self) -> int | None:
        """The SIZE the peer advertised (RFC 1870); ``None`` when it gave none or 0 (no fixed limit)."""
        value = self.extensions.get("SIZE")
        if value is None or not value.strip().isdigit():
            return None
        limit = int(value.strip())
        return limit or None

    async def starttls(self, context: ssl.SSLContext, server_hostname: str | None) -> SmtpReply:
        """STARTTLS; on 220 drop whatever else the server sent (RFC 3207 §4.2), handshake, and forget the
        EHLO state (the caller must EHLO again). A non-220 reply is returned without a handshake.

        :raises SmtpConnectionError: the handshake failed (the connection is then unusable).
        """
        reply = await self.command("STARTTLS")
        if reply.code != 220:
            return reply
        self.discarded_after_starttls = len(self._proto.buffer)
        self._proto.buffer.clear()
        loop = asyncio.get_running_loop()
        try:
            new_transport = await loop.start_tls(
                self._transport,
                self._proto,
                context,
                server_hostname=server_hostname or None,
                ssl_handshake_timeout=self.timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            self.abort()
            raise SmtpConnectionError(f"TLS handshake failed: {exc or type(exc).__name__}") from exc
        if new_transport is None:  # pragma: no cover - start_tls returns None only when the loop is closing
            raise SmtpConnectionError("TLS handshake failed: transport closed")
        self._transport = new_transport
        self.tls = True
        self.extensions = {}
        self.ehlo_reply = None
        self.esmtp = False
        self.transcript.append(f"   (TLS {self.describe_tls()})")
        return reply

    def describe_tls(self) -> str:
        obj = self.ssl_object
        if obj is None:
            return "none"
        cipher = obj.cipher()
        return f"{obj.version()} {cipher[0] if cipher else '?'}"

    async def auth(self, username: str, password: str) -> SmtpReply:
        """AUTH PLAIN (or LOGIN when only that is offered). The caller makes sure the session is encrypted."""
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms or not mechanisms:
            token = base64.b64encode(f"\0{username}\0{password}".encode()).decode("ascii")
            return await self.command(f"AUTH PLAIN {token}", log="AUTH PLAIN <credentials>")
        reply = await self.command("AUTH LOGIN")
        if reply.code != 334:
            return reply
        reply = await self.command(base64.b64encode(username.encode()).decode("ascii"), log="<username>")
        if reply.code != 334:
            return reply
        return await self.command(base64.b64encode(password.encode()).decode("ascii"), log="<password>")

    async def envelope(
        self,
        sender: str,
        mail_params: Sequence[str],
        recipients: Sequence[str],
        rcpt_params: Sequence[str] = (),
        *,
        data: bool = True,
        per_recipient: Sequence[Sequence[str]] | None = None,
        reset: bool = False,
        reset_timeout: float | None = None,
    ) -> tuple[SmtpReply, list[SmtpReply], SmtpReply | None]:
        """MAIL, every RCPT and DATA; pipelined in one write when the server offers PIPELINING (RFC 2920).

        Returns (MAIL reply, RCPT replies in order, DATA reply or ``None`` when DATA was not sent). Without
        pipelining, DATA is sent only if MAIL and at least one RCPT succeeded. With pipelining DATA is always
        sent last in the group; if it is answered 354 although no recipient was accepted, an empty message
        is not sent: the caller must :meth:`abort_data`. ``data=False`` stops after the RCPTs (a recipient
        callout): DATA is never sent and the DATA reply is ``None``. ``per_recipient``: each recipient's own
        parameters (DSN's NOTIFY/ORCPT), after ``rcpt_params``.

        ``reset``: a reused session's liveness check first, an ``RSET`` (answered within ``reset_timeout``) in
        front of the group (RFC 2920 §3.1 lets RSET stand anywhere in one); when it is not answered 250,
        :class:`StaleSession` is raised and nothing after it counts.
        """
        mail_line, rcpt_lines = self._envelope_lines(sender, mail_params, recipients, rcpt_params, per_recipient)
        if self.supports("PIPELINING"):
            group = [mail_line, *rcpt_lines, "DATA"] if data else [mail_line, *rcpt_lines]
            if reset:
                group.insert(0, "RSET")
            transcript = self.transcript
            for line in group:
                transcript.append(f"C: {line}")
            self._write("\r\n".join(group).encode("utf-8") + b"\r\n")
            if reset:
                await self._reset_reply(reset_timeout)
            mail = await self.read_reply()
            rcpts = [await self.read_reply() for _ in rcpt_lines]
            return mail, rcpts, (await self.read_reply()) if data else None
        if reset:
            await self._reset(reset_timeout)
        mail = await self.command(mail_line)
        if not mail.is_positive:
            return mail, [], None
        rcpts = [await self.command(line) for line in rcpt_lines]
        if not data or not any(r.is_positive for r in rcpts):
            return mail, rcpts, None
        return mail, rcpts, await self.command("DATA")

    async def _reset(self, timeout: float | None) -> None:
        """RSET on its own (a peer without PIPELINING); :class:`StaleSession` unless answered 250."""
        try:
            self.transcript.append("C: RSET")
            self._write(b"RSET\r\n")
        except SmtpConnectionError as exc:
            raise StaleSession(str(exc)) from exc
        await self._reset_reply(timeout)

    async def _reset_reply(self, timeout: float | None) -> None:
        try:
            reply = await self.read_reply(timeout)
        except SmtpClientError as exc:
            raise StaleSession(str(exc)) from exc
        if reply.code != 250:
            raise StaleSession(f"RSET answered {reply}")

    @staticmethod
    def _envelope_lines(
        sender: str,
        mail_params: Sequence[str],
        recipients: Sequence[str],
        rcpt_params: Sequence[str],
        per_recipient: Sequence[Sequence[str]] | None,
    ) -> tuple[str, list[str]]:
        params = "".join(f" {p}" for p in mail_params)
        common = [*rcpt_params]
        rcpt_lines = []
        for i, r in enumerate(recipients):
            own = per_recipient[i] if per_recipient is not None and i < len(per_recipient) else ()
            rcpt_lines.append(f"RCPT TO:<{r}>" + "".join(f" {p}" for p in (*common, *own)))
        return f"MAIL FROM:<{sender}>{params}", rcpt_lines

    async def envelope_bdat(
        self,
        sender: str,
        mail_params: Sequence[str],
        recipients: Sequence[str],
        data: bytes,
        *,
        per_recipient: Sequence[Sequence[str]] | None = None,
        chunk_size: int = BDAT_CHUNK,
        timeout: float | None = None,
        reset: bool = False,
        reset_timeout: float | None = None,
    ) -> tuple[SmtpReply, list[SmtpReply], SmtpReply | None]:
        """MAIL, every RCPT and the message as ``BDAT n [LAST]`` chunks (RFC 3030): the bytes as they are (no
        dot-stuffing, no end-of-data line). The caller makes sure the peer offers CHUNKING.

        With PIPELINING everything goes in one write (RFC 3030 §4.2 allows BDAT in a pipelined group) and every
        reply is read; a peer with no accepted recipient refuses the chunks (it must read them). Without, MAIL and
        each RCPT are answered first and the chunks are sent only when a recipient was accepted, each waiting
        for its reply. Returns (MAIL reply, RCPT replies, the reply to the last chunk or to the first refused one;
        ``None`` when no chunk was sent). ``timeout``: for the chunks' replies. ``reset``: as in :meth:`envelope`.
        """
        mail_line, rcpt_lines = self._envelope_lines(sender, mail_params, recipients, (), per_recipient)
        size = max(1, chunk_size)
        chunks = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
        frames = [
            f"BDAT {len(c)}{' LAST' if i == len(chunks) - 1 else ''}".encode("ascii") + b"\r\n" + c
            for i, c in enumerate(chunks)
        ]
        if self.supports("PIPELINING"):
            commands = ["RSET", mail_line, *rcpt_lines] if reset else [mail_line, *rcpt_lines]
            for line in commands:
                self.transcript.append(f"C: {line}")
            self.transcript.extend(
                f"C: BDAT {len(c)}{' LAST' if i == len(chunks) - 1 else ''} <data>" for i, c in enumerate(chunks)
            )
            self._write(("\r\n".join(commands) + "\r\n").encode("utf-8") + b"".join(frames))
            if reset:
                await self._reset_reply(reset_timeout)
            mail = await self.read_reply()
            rcpts = [await self.read_reply() for _ in rcpt_lines]
            final: SmtpReply | None = None
            for _ in frames:
                reply = await self.read_reply(timeout)
                if final is None or final.is_positive:
                    final = reply  # the first refusal stands
            return mail, rcpts, final
        if reset:
            await self._reset(reset_timeout)
        mail = await self.command(mail_line)
        if not mail.is_positive:
            return mail, [], None
        rcpts = [await self.command(line) for line in rcpt_lines]
        if not any(r.is_positive for r in rcpts):
            return mail, rcpts, None
        last: SmtpReply | None = None
        for i, frame in enumerate(frames):
            self.transcript.append(f"C: BDAT {len(chunks[i])}{' LAST' if i == len(chunks) - 1 else ''} <data>")
            self._write(frame)
            last = await self.read_reply(timeout)
            if not last.is_positive:
                break
        return mail, rcpts, last

    async def send_data(self, data: bytes, *, timeout: float | None = None) -> SmtpReply:
        """After 354: the message (dot-stuffed) and the final ``.``; returns the final reply."""
        payload = dot_stuff(data) + b".\r\n"
        self.transcript.append(f"C: <{len(payload)} bytes of message data>")
        self._write(payload)
        return await self.read_reply(timeout)

    async def abort_data(self) -> SmtpReply:
        """End a DATA that must not carry a message (354 with no accepted recipient): an empty body, which
        the server will refuse for lack of recipients; then RSET."""
        self._write(b".\r\n")
        reply = await self.read_reply()
        with contextlib.suppress(SmtpClientError):
            await self.command("RSET")
        return reply

    async def quit(self, timeout: float = 5.0) -> None:
        """QUIT politely (waiting at most ``timeout`` and ``self.timeout`` for the reply) and close."""
        with contextlib.suppress(SmtpClientError):
            await self.command("QUIT", timeout=min(self.timeout, timeout))
        self.close()

    def quit_nowait(self) -> None:
        """QUIT without waiting for the reply, then close (an idle session expiring from a timer callback: nothing
        to await, no task to track). The transport sends what is buffered before it closes."""
        if not self.closed:
            self.transcript.append("C: QUIT")
            with contextlib.suppress(OSError, RuntimeError):
                self._transport.write(b"QUIT\r\n")
        self.close()

    @property
    def closed(self) -> bool:
        """The peer closed the connection, or we did."""
        return self._proto.closed or self._transport.is_closing()

    @property
    def unread(self) -> int:
        """Bytes received and not read as a reply yet (an idle session should have none)."""
        return len(self._proto.buffer)

    def close(self) -> None:
        if not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        self._transport.abort()
