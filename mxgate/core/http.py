"""One small HTTP/1.1 server for mxgate's own endpoints: metrics, MTA-STS policy serving, TLS-RPT receiving.

Why not aiohttp or hypercorn: the three endpoints answer a handful of fixed paths with small bodies; a web
framework would be the largest dependency in the gateway for ~300 lines of work. h11 (already a dependency) does
all HTTP parsing and framing, sans-I/O; this module adds what h11 leaves to its caller, in two layers as STYLE.md
asks:

* :class:`HttpConnection` — socket-free: bytes in, :class:`HttpRequest` heads, bodies and error
  :class:`HttpResponse` values out, response bytes back. Limits: head size -> 431; body size -> 413, before
  reading when ``Content-Length`` declares it (after the ``before_body`` check, so a receiver's own refusals come
  first), while reading when chunked. Malformed input -> 400; HEAD gets the GET's headers and no body;
  keep-alive is h11's decision (HTTP/1.0, ``Connection: close``), bounded by ``max_requests``. Tested without
  sockets.
* :class:`HttpServer` — the thin asyncio driver: listens on ``host:port`` (IPv4 or IPv6; several sockets for a
  wildcard), optional TLS (any :class:`ssl.SSLContext`, SNI callbacks included), timeouts (head: 408 then close;
  body: 408; idle keep-alive: close; writes), a connection cap (503), graceful close (stop listening, idle
  connections closed at once, busy ones finish within the timeout).

A handler is ``async (HttpRequest) -> HttpResponse`` (a plain function works too); :class:`HttpRouter` is one
that dispatches by method and path with 404/405 (``Allow``) and answers HEAD from the GET route. A
``before_body`` check sees the request head (``body == b""``) before any body byte is read, so a receiver can
refuse early (rate limits, ``411``, store full) without reading what it will not keep. Request bodies are
handed over as received: ``Content-Encoding: gzip`` is the handler's to undo (with its own size limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from http import HTTPStatus

import h11

from mxgate.core.checks import split_hostport

__all__ = [
    "Handler",
    "HttpConnection",
    "HttpCounters",
    "HttpLimits",
    "HttpRequest",
    "HttpResponse",
    "HttpRouter",
    "HttpServer",
]

log = logging.getLogger(__name__)

#: Headers a handler may not set: the server frames the message.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One request as received. Header names are lower-case; values are latin-1 text as sent."""

    method: str  # "GET", "POST", ...
    target: str  # as sent, query included: "/metrics?x=1"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""  # b"" in a before_body check: nothing has been read yet
    peer: str = ""  # client IP address ("" when unknown)
    peer_port: int = 0
    tls: bool = False
    http_version: str = "1.1"

    @property
    def path(self) -> str:
        """The target without query string."""
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: str, default: str = "") -> str:
        """The first value of header ``name`` (any case), else ``default``."""
        name = name.lower()
        return next((v for k, v in self.headers if k == name), default)

    @property
    def host(self) -> str:
        """The ``Host`` header without port, lower-case, without a trailing dot ("" when absent or a literal)."""
        value = self.header("host").strip()
        if not value or value.startswith("["):
            return ""
        return value.rsplit(":", 1)[0].lower().rstrip(".")

    @property
    def content_length(self) -> int | None:
        """The declared body length; ``None`` without one (chunked, or no body)."""
        text = self.header("content-length")
        return int(text) if text.isdigit() else None


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """What a handler answers. ``Content-Length`` and ``Connection`` are the server's; ``close`` ends the
    connection after this response."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()  # extra: ("Cache-Control", "max-age=60"), ("Retry-After", "60")
    close: bool = False

    @classmethod
    def text(
        cls, status: int, text: str, *, headers: Iterable[tuple[str, str]] = (), close: bool = False
    ) -> HttpResponse:
        """A ``text/plain`` response: ``text`` and a newline."""
        return cls(status, (text + "\n").encode(), headers=tuple(headers), close=close)

    def header(self, name: str, default: str = "") -> str:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), default)


Handler = Callable[[HttpRequest], "Awaitable[HttpResponse] | HttpResponse"]
BeforeBody = Callable[[HttpRequest], "Awaitable[HttpResponse | None] | HttpResponse | None"]
OnResponse = Callable[["HttpRequest | None", HttpResponse], "Awaitable[None] | None"]


async def _call(func: Callable[..., object], *args: object) -> object:
    result = func(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


class HttpRouter:
    """A handler that dispatches by (method, path). A GET route answers HEAD too (the server drops the body). A
    path without a route: ``not_found``; a path with routes for other methods: 405 with ``Allow``."""

    def __init__(
        self,
        routes: Mapping[tuple[str, str], Handler],
        *,
        not_found: HttpResponse = HttpResponse.text(404, "not found"),  # noqa: B008 - a frozen value
    ) -> None:
        self._routes = {(method.upper(), path): handler for (method, path), handler in routes.items()}
        self._not_found = not_found

    def allowed(self, path: str) -> tuple[str, ...]:
        methods = {m for m, p in self._routes if p == path}
        if "GET" in methods:
            methods.add("HEAD")
        return tuple(sorted(methods))

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        method = "GET" if request.method == "HEAD" else request.method
        handler = self._routes.get((method, request.path))
        if handler is not None:
            return await _call(handler, request)  # type: ignore[return-value]
        allowed = self.allowed(request.path)
        if not allowed:
            return self._not_found
        return HttpResponse.text(405, "method not allowed", headers=(("Allow", ", ".join(allowed)),))


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Bounds for one server. Times in seconds."""

    max_header_bytes: int = 16384  # request line + headers; more: 431
    max_body_bytes: int = 1 << 20  # more: 413 (before reading when Content-Length says so)
    header_timeout: float = 10.0  # from the connection (or the first byte of a later request) to the end of headers
    body_timeout: float = 30.0  # reading the body
    idle_timeout: float = 15.0  # keep-alive: waiting for the next request
    write_timeout: float = 30.0  # sending one response
    max_requests: int = 100  # per connection; the last response says "Connection: close"
    max_connections: int = 256  # open at once; more get 503 and are closed


class _Need(enum.Enum):
    DATA = "need data"
    CLOSED = "closed"


NEED_DATA = _Need.DATA
CLOSED = _Need.CLOSED


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def render_raw(response: HttpResponse) -> bytes:
    """A complete response that closes the connection, without h11 (for errors before or outside a request)."""
    lines = [f"HTTP/1.1 {response.status} {_reason(response.status).decode()}"]
    if response.content_type:
        lines.append(f"Content-Type: {response.content_type}")
    lines += [f"{k}: {v}" for k, v in response.headers if k.lower() not in _FRAMING]
    lines += [f"Content-Length: {len(response.body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body


class HttpConnection:
    """The socket-free half: one connection's HTTP state on top of ``h11.Connection``.

    Feed received bytes with :meth:`receive` (``b""`` = the peer closed), then ask :meth:`next_request` for a
    request head, :meth:`read_body` for its body; each returns a value, :data:`NEED_DATA`, :data:`CLOSED`, or an
    error :class:`HttpResponse` to send with :meth:`send_error`. :meth:`send` turns a handler's response into bytes;
    :meth:`start_next` says whether the connection may carry another request.
    """

    def __init__(
        self, limits: HttpLimits = HttpLimits(), *, peer: str = "", peer_port: int = 0, tls: bool = False
    ) -> None:
        self.limits = limits
        self.peer, self.peer_port, self.tls = peer, peer_port, tls
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self._head: HttpRequest | None = None
        self._body: list[bytes] = []
        self._size = 0
        self.requests = 0  # requests received on this connection
        self.received_any = False  # bytes of the current request arrived (a timeout then earns a 408)
        self.closing = False  # set by the driver (graceful close): the next response ends the connection

    def receive(self, data: bytes) -> None:
        if data:
            self.received_any = True
        self._conn.receive_data(data)

    def _event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED] | HttpResponse:
        try:
            return self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            text = "request header too large" if status == 431 else f"bad request: {exc}"
            return HttpResponse.text(status, text, close=True)

    def next_request(self) -> HttpRequest | HttpResponse | _Need:
        """The next request's head (``body=b""``), an error response, ``NEED_DATA`` or ``CLOSED``."""
        event = self._event()
        if isinstance(event, HttpResponse):
            return event
        if event is h11.NEED_DATA:
            return NEED_DATA
        if isinstance(event, h11.Request):
            # h11 bounds only an incomplete head; one that arrived whole is measured here (request line + fields)
            size = len(event.method) + len(event.target) + 12 + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if size > self.limits.max_header_bytes:
                return HttpResponse.text(431, "request header too large", close=True)
            self.requests += 1
            self._body, self._size = [], 0
            headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers)
            self._head = HttpRequest(
                method=event.method.decode("ascii", "replace"),
                target=event.target.decode("latin-1"),
                headers=headers,
                peer=self.peer,
                peer_port=self.peer_port,
                tls=self.tls,
                http_version=event.http_version.decode("ascii", "replace"),
            )
            return self._head
        return CLOSED  # ConnectionClosed, or PAUSED (nothing more will be read on this connection)

    def _too_large(self) -> HttpResponse:
        return HttpResponse.text(413, f"request body too large: at most {self.limits.max_body_bytes} bytes", close=True)

    @property
    def expects_continue(self) -> bool:
        """The client waits for ``100 Continue`` before sending the body."""
        return bool(self._conn.they_are_waiting_for_100_continue)

    def send_continue(self) -> bytes:
        return self._conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""

    def read_body(self) -> bytes | HttpResponse | _Need:
        """The whole body once its end arrived; an error response (413: at once when ``Content-Length`` declares
        too much, else when the received chunks exceed the limit; 400); or ``NEED_DATA``."""
        declared = self._head.content_length if self._head is not None and not self._size else None
        if declared is not None and declared > self.limits.max_body_bytes:
            return self._too_large()
        while True:
            event = self._event()
            if isinstance(event, HttpResponse):
                return event
            if event is h11.NEED_DATA:
                return NEED_DATA
            if isinstance(event, h11.Data):
                self._size += len(event.data)
                if self._size > self.limits.max_body_bytes:
                    return self._too_large()
                self._body.append(bytes(event.data))
                continue
            if isinstance(event, h11.EndOfMessage):
                body, self._body = b"".join(self._body), []
                return body
            return HttpResponse.text(400, "bad request: connection closed in the body", close=True)

    def send(self, request: HttpRequest, response: HttpResponse) -> bytes:
        """The bytes of ``response`` to ``request`` (no body for HEAD). Adds ``Connection: close`` when the
        response, the limits or a graceful close end the connection."""
        close = response.close or self.closing or self.requests >= self.limits.max_requests
        headers: list[tuple[str, str]] = []
        if response.content_type:
            headers.append(("Content-Type", response.content_type))
        headers += [(k, v) for k, v in response.headers if k.lower() not in _FRAMING]
        headers.append(("Content-Length", str(len(response.body))))
        if close:
            headers.append(("Connection", "close"))
        out = [
            self._conn.send(h11.Response(status_code=response.status, headers=headers, reason=_reason(response.status)))
        ]
        if request.method != "HEAD" and response.body:
            out.append(self._conn.send(h11.Data(data=response.body)))
        out.append(self._conn.send(h11.EndOfMessage()))
        return b"".join(x for x in out if x)

    def send_error(self, response: HttpResponse) -> bytes:
        """An error response that ends the connection (h11 frames it when it can, else a raw one)."""
        response = replace(response, close=True)
        if self._head is not None and self._conn.our_state is h11.SEND_RESPONSE:
            with contextlib.suppress(h11.LocalProtocolError):
                return self.send(self._head, response)
        return render_raw(response)

    @property
    def unread(self) -> bool:
        """The client may still be sending this request (its body was not read to the end)."""
        return self._conn.their_state is h11.SEND_BODY

    def start_next(self) -> bool:
        """After a response: True when the connection may carry another request (both sides done)."""
        if self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE and not self.closing:
            self._conn.start_next_cycle()
            self._head = None
            self.received_any = bool(self._conn.trailing_data[0])
            return True
        return False


@dataclass(slots=True, eq=False)
class _Conn:
    writer: asyncio.StreamWriter
    task: asyncio.Task[None] | None
    http: HttpConnection | None = None
    busy: bool = False


@dataclass(slots=True)
class HttpCounters:
    """What an :class:`HttpServer` did since it started."""

    connections: int = 0
    requests: int = 0
    refused: int = 0


class HttpServer:
    """The asyncio driver around :class:`HttpConnection`; one per endpoint.

    :param handler: ``(HttpRequest) -> HttpResponse`` (async or not); a :class:`HttpRouter` usually. An exception
        is a 500 (logged) and closes the connection.
    :param name: for logs ("metrics", "mta-sts", "tlsrpt").
    :param ssl: a server :class:`ssl.SSLContext` (its SNI callback included) for HTTPS; ``None``: plain HTTP.
    :param limits: sizes, timeouts and counts (:class:`HttpLimits`).
    :param before_body: called with the head (``body=b""``) before the body is read; a response is sent instead
        of reading it (and the connection closes if a body was on its way).
    :param on_response: called after each response was written, with the request (``None`` when none could be
        parsed: 400, 408, 431, 503) and the response: counts and access logs. A connection that closes without
        a request, or whose response cannot be written, is not reported.

    ``counters`` holds connections accepted, requests answered and connections refused (503) since start.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        name: str = "http",
        ssl: ssl.SSLContext | None = None,
        limits: HttpLimits = HttpLimits(),
        before_body: BeforeBody | None = None,
        on_response: OnResponse | None = None,
    ) -> None:
        self.handler = handler
        self.name = name
        self.limits = limits
        self._ssl = ssl
        self._before_body = before_body
        self._on_response = on_response
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self.counters = HttpCounters()

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self, host: str, port: int | None = None) -> None:
        """Listen on ``host`` and ``port`` (``""`` for every address; brackets around IPv6 are dropped), or, without
        ``port``, on a configured ``"host:port"`` / ``"[v6]:port"`` given as ``host``. Raises OSError (address in
        use) and ValueError (a malformed address)."""
        if port is None:
            host, port = split_hostport(host)
        self._server = await asyncio.start_server(
            self._connected,
            host.strip("[]") or None,
            port,
            ssl=self._ssl,
            ssl_handshake_timeout=self.limits.header_timeout if self._ssl is not None else None,
            limit=max(65536, self.limits.max_header_bytes),
        )

    @property
    def sockets(self) -> tuple[object, ...]:
        return tuple(self._server.sockets) if self._server is not None else ()

    @property
    def port(self) -> int | None:
        """The port of the first listening socket (useful after ``start(host, 0)``)."""
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self, timeout: float = 5.0) -> None:
        """Stop accepting; close idle connections now; let busy ones finish their response (which then says
        ``Connection: close``) for up to ``timeout`` seconds, then cut them."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._conns):
            if conn.http is not None:
                conn.http.closing = True
            if not conn.busy and conn.task is not None:
                conn.task.cancel()
        tasks = [c.task for c in self._conns if c.task is not None]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await server.wait_closed()

    async def __aenter__(self) -> HttpServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- one connection --------------------------------------------------------------------------------------

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:  # its TLS handshake finished after close() began
            writer.close()
            return
        conn = _Conn(writer, asyncio.current_task())
        self._conns.add(conn)
        self.counters.connections += 1
        try:
            if len(self._conns) > self.limits.max_connections:
                self.counters.refused += 1
                busy = HttpResponse.text(503, "too many connections", headers=(("Retry-After", "5"),), close=True)
                await self._write(writer, render_raw(busy))
                await self._observe(None, busy)
                await self._linger(reader, writer)
                return
            await self._serve(conn, reader, writer)
        except asyncio.CancelledError:
            pass  # graceful close or shutdown
        except (OSError, ssl.SSLError, h11.LocalProtocolError, TimeoutError):
            pass  # the peer went away, or a write timed out
        except Exception:
            log.exception("%s endpoint: connection failed", self.name)
        finally:
            self._conns.discard(conn)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _serve(self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        host, port = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else ("", 0)
        http = conn.http = HttpConnection(self.limits, peer=host, peer_port=port, tls=self._ssl is not None)
        first = True
        while True:
            conn.busy = False
            head = await self._read_head(http, reader, idle=not first and not http.received_any)
            first = False
            if head is CLOSED or head is NEED_DATA:
                return
            conn.busy = True
            if isinstance(head, HttpResponse):
                await self._write(writer, http.send_error(head))
                await self._observe(None, head)
                await self._linger(reader, writer)
                return
            assert isinstance(head, HttpRequest)
            request, response, framed = await self._respond(http, reader, writer, head)
            await self._write(writer, http.send(request, response) if framed else http.send_error(response))
            self.counters.requests += 1
            await self._observe(request, response)
            if not framed or not http.start_next():
                if http.unread:
                    await self._linger(reader, writer)
                return

    async def _read_head(
        self, http: HttpConnection, reader: asyncio.StreamReader, *, idle: bool
    ) -> HttpRequest | HttpResponse | _Need:
        """Wait for the next request head: first up to ``idle_timeout`` for a byte (keep-alive), then up to
        ``header_timeout`` for the rest. A timeout after some bytes: 408."""
        if idle:
            result = http.next_request()
            if result is not NEED_DATA:
                return result
            try:
                async with asyncio.timeout(self.limits.idle_timeout):
                    http.receive(await reader.read(65536))
            except TimeoutError:
                return CLOSED
        try:
            async with asyncio.timeout(self.limits.header_timeout):
                while True:
                    result = http.next_request()
                    if result is not NEED_DATA:
                        return result
                    http.receive(await reader.read(65536))
        except TimeoutError:
            if http.received_any:
                return HttpResponse.text(408, "request timeout", close=True)
            return CLOSED

    async def _respond(
        self, http: HttpConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: HttpRequest
    ) -> tuple[HttpRequest, HttpResponse, bool]:
        """(request, response, framed): ``framed`` False for an error that ends the connection."""
        if self._before_body is not None:
            early = await self._guarded(self._before_body, head)
            if isinstance(early, HttpResponse):
                return head, early, True
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                while True:
                    body = http.read_body()
                    if body is not NEED_DATA:
                        break
                    if http.expects_continue:  # only now: a refused request (413 above) gets no 100 first
                        await self._write(writer, http.send_continue())
                    http.receive(await reader.read(65536))
        except TimeoutError:
            return head, HttpResponse.text(408, "request timeout", close=True), False
        if isinstance(body, HttpResponse):
            return head, body, False
        assert isinstance(body, bytes)
        request = replace(head, body=body)
        response = await self._guarded(self.handler, request)
        if not isinstance(response, HttpResponse):
            response = HttpResponse.text(500, "internal error", close=True)
        return request, response, True

    async def _guarded(self, func: Callable[..., object], request: HttpRequest) -> object:
        try:
            return await _call(func, request)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s endpoint: handler failed", self.name, extra={"path": request.path[:200]})
            return HttpResponse.text(500, "internal error", close=True)

    @staticmethod
    async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Before closing with input unread: half-close and discard what the client still sends (at most 64 KiB,
        1 s), so that the kernel does not answer it with a reset that can destroy our response in flight."""
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            if writer.can_write_eof():
                writer.write_eof()
            async with asyncio.timeout(1.0):
                left = 65536
                while left > 0:
                    chunk = await reader.read(left)
                    if not chunk:
                        return
                    left -= len(chunk)

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        async with asyncio.timeout(self.limits.write_timeout):
            await writer.drain()

    async def _observe(self, request: HttpRequest | None, response: HttpResponse) -> None:
        if self._on_response is None:
            return
        try:
            await _call(self._on_response, request, response)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s endpoint: on_response failed", self.name)
