"""One small HTTP/1.1 server for mxgate's own endpoints: metrics, MTA-STS policy serving, TLS-RPT receiving.

Why not aiohttp or hypercorn: the three endpoints answer a handful of fixed paths with small bodies; a web
framework would be the largest dependency in the gateway for ~300 lines of work. h11 (already a dependency) does
all HTTP parsing and framing, sans-I/O; this module adds what h11 leaves to its caller, in two layers as STYLE.md
asks:

* :class:`HttpConnection` — socket-free, in :mod:`mxgate.core.http_wire`: bytes in, :class:`HttpRequest` heads,
  bodies and error :class:`HttpResponse` values out, response bytes back, limits as responses (400, 413, 431).
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
import inspect
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace

import h11

from mxgate.core.checks import split_hostport
from mxgate.core.http_wire import (
    CLOSED,
    NEED_DATA,
    HttpConnection,
    HttpLimits,
    HttpRequest,
    HttpResponse,
    _Need,
    render_raw,
)

__all__ = [
    "Handler",
    "HttpCounters",
    "HttpRouter",
    "HttpServer",
]

log = logging.getLogger(__name__)

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
        limits: HttpLimits = HttpLimits(),  # noqa: B008 - a frozen value
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
