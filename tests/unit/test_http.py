"""mxgate.core.http without sockets: HttpConnection (h11 events -> requests, limits, errors) and HttpRouter."""

from __future__ import annotations

import h11
import pytest

from mxgate import HttpConnection, HttpLimits, HttpRequest, HttpResponse, HttpRouter
from mxgate.core.http_wire import CLOSED, NEED_DATA, render_raw

GET = b"GET /metrics?x=1 HTTP/1.1\r\nHost: Example.Test:9925\r\nAccept: text/plain\r\n\r\n"


def parse(data: bytes) -> list[h11.Event]:
    """What a client makes of the server's bytes."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    events: list[h11.Event] = []
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return events
        events.append(event)  # type: ignore[arg-type]
        if isinstance(event, h11.EndOfMessage):
            return events


def test_request_head_and_body() -> None:
    conn = HttpConnection(peer="127.0.0.1", peer_port=4242, tls=True)
    assert conn.next_request() is NEED_DATA
    conn.receive(GET)
    head = conn.next_request()
    assert isinstance(head, HttpRequest)
    assert (head.method, head.target, head.path, head.query) == ("GET", "/metrics?x=1", "/metrics", "x=1")
    assert head.header("ACCEPT") == "text/plain" and head.host == "example.test"
    assert (head.peer, head.peer_port, head.tls, head.body) == ("127.0.0.1", 4242, True, b"")
    assert conn.read_body() == b""


def test_response_bytes_keep_alive_and_next_cycle() -> None:
    conn = HttpConnection()
    conn.receive(GET + GET)  # pipelined
    head = conn.next_request()
    assert isinstance(head, HttpRequest) and conn.read_body() == b""
    out = conn.send(head, HttpResponse(200, b"hello", headers=(("Cache-Control", "no-store"), ("Content-Length", "9"))))
    response, data = parse(out)[:2]
    assert isinstance(response, h11.Response) and response.status_code == 200
    headers = dict(response.headers)
    assert headers[b"content-length"] == b"5" and headers[b"cache-control"] == b"no-store"
    assert headers[b"content-type"] == b"text/plain; charset=utf-8" and b"connection" not in headers
    assert isinstance(data, h11.Data) and data.data == b"hello"
    assert conn.start_next()
    second = conn.next_request()
    assert isinstance(second, HttpRequest) and second.path == "/metrics"


def test_head_has_headers_but_no_body() -> None:
    conn = HttpConnection()
    conn.receive(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = conn.next_request()
    assert isinstance(head, HttpRequest) and conn.read_body() == b""
    out = conn.send(head, HttpResponse(200, b"0123456789"))
    assert b"Content-Length: 10\r\n" in out and out.endswith(b"\r\n\r\n")


def test_post_body_content_length_and_chunked() -> None:
    conn = HttpConnection()
    conn.receive(b"POST /r HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")
    assert isinstance(conn.next_request(), HttpRequest)
    assert conn.read_body() is NEED_DATA
    conn.receive(b"cde")
    assert conn.read_body() == b"abcde"
    chunked = HttpConnection()
    chunked.receive(
        b"POST /r HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    head = chunked.next_request()
    assert isinstance(head, HttpRequest) and head.content_length is None
    assert chunked.read_body() == b"abcde"


def test_declared_oversize_body_is_413_before_reading() -> None:
    conn = HttpConnection(HttpLimits(max_body_bytes=10))
    conn.receive(b"POST /r HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
    head = conn.next_request()  # the head first: a before_body check may refuse otherwise (429, 411...)
    assert isinstance(head, HttpRequest) and head.content_length == 11
    error = conn.read_body()
    assert isinstance(error, HttpResponse) and error.status == 413 and error.close
    out = conn.send_error(error)
    assert out.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in out
    assert not conn.start_next()


def test_chunked_oversize_body_is_413_while_reading() -> None:
    conn = HttpConnection(HttpLimits(max_body_bytes=4))
    conn.receive(b"POST /r HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n")
    assert isinstance(conn.next_request(), HttpRequest)
    error = conn.read_body()
    assert isinstance(error, HttpResponse) and error.status == 413


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000, 431),  # incomplete: h11's bound
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),  # complete: ours
    ],
)
def test_malformed_requests(data: bytes, status: int) -> None:
    conn = HttpConnection()
    conn.receive(data)
    error = conn.next_request()
    assert isinstance(error, HttpResponse) and error.status == status
    assert conn.send_error(error).startswith(f"HTTP/1.1 {status} ".encode())


def test_eof_is_closed_and_http10_closes() -> None:
    conn = HttpConnection()
    conn.receive(b"")
    assert conn.next_request() is CLOSED
    old = HttpConnection()
    old.receive(b"GET / HTTP/1.0\r\n\r\n")
    head = old.next_request()
    assert isinstance(head, HttpRequest) and head.http_version == "1.0" and old.read_body() == b""
    old.send(head, HttpResponse(200, b"x"))
    assert not old.start_next()


def test_max_requests_and_graceful_close_say_connection_close() -> None:
    conn = HttpConnection(HttpLimits(max_requests=1))
    conn.receive(GET)
    head = conn.next_request()
    assert isinstance(head, HttpRequest) and conn.read_body() == b""
    assert b"Connection: close\r\n" in conn.send(head, HttpResponse(200))
    assert not conn.start_next()
    closing = HttpConnection()
    closing.closing = True
    closing.receive(GET)
    head = closing.next_request()
    assert isinstance(head, HttpRequest) and closing.read_body() == b""
    assert b"Connection: close\r\n" in closing.send(head, HttpResponse(204, content_type=""))


def test_expect_100_continue() -> None:
    conn = HttpConnection()
    conn.receive(b"POST /r HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert isinstance(conn.next_request(), HttpRequest)
    assert conn.expects_continue
    assert conn.send_continue().startswith(b"HTTP/1.1 100 ")
    conn.receive(b"ok")
    assert conn.read_body() == b"ok"


def test_render_raw() -> None:
    out = render_raw(HttpResponse.text(503, "busy", headers=(("Retry-After", "5"), ("Connection", "keep-alive"))))
    assert out == (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nRetry-After: 5\r\n"
        b"Content-Length: 5\r\nConnection: close\r\n\r\nbusy\n"
    )


async def test_router() -> None:
    async def metrics(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, b"m " + request.method.encode())

    def post(request: HttpRequest) -> HttpResponse:  # a plain function works too
        return HttpResponse(202, request.body)

    router = HttpRouter({("GET", "/metrics"): metrics, ("POST", "/report"): post})
    assert (await router(HttpRequest("GET", "/metrics?a"))).body == b"m GET"
    assert (await router(HttpRequest("HEAD", "/metrics"))).status == 200
    assert (await router(HttpRequest("POST", "/report", body=b"r"))).body == b"r"
    not_allowed = await router(HttpRequest("DELETE", "/metrics"))
    assert not_allowed.status == 405 and not_allowed.header("allow") == "GET, HEAD"
    assert (await router(HttpRequest("GET", "/nope"))).status == 404
    assert router.allowed("/report") == ("POST",)
