"""The socket-free half of mxgate's HTTP/1.1 server (:mod:`mxgate.core.http` is the asyncio driver).

:class:`HttpConnection` sits on h11: bytes in, :class:`HttpRequest` heads, bodies and error :class:`HttpResponse`
values out, response bytes back. Limits (:class:`HttpLimits`): head size -> 431; body size -> 413, before reading
when ``Content-Length`` declares it (after the ``before_body`` check, so a receiver's own refusals come first),
while reading when chunked. Malformed input -> 400; HEAD gets the GET's headers and no body; keep-alive is h11's
decision (HTTP/1.0, ``Connection: close``), bounded by ``max_requests``. Tested without sockets.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterable
from dataclasses import dataclass, replace
from http import HTTPStatus

import h11

__all__ = ["CLOSED", "NEED_DATA", "HttpConnection", "HttpLimits", "HttpRequest", "HttpResponse", "render_raw"]

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
