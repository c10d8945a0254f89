"""mxgate.core.http.HttpServer on loopback with real clients: httpx (HTTP and HTTPS with SNI), curl when
installed, and raw sockets for what polite clients never do (oversize, slow, pipelined, malformed)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from mxgate import HttpLimits, HttpRequest, HttpResponse, HttpRouter, HttpServer
from mxgate.core.tls import server_context
from mxgate.testing.ca import IssueCert, TestCA

pytestmark = [pytest.mark.integration]

Start = Callable[..., Awaitable[HttpServer]]
Seen = list[tuple[HttpRequest | None, HttpResponse]]


async def hello(request: HttpRequest) -> HttpResponse:
    return HttpResponse(200, b"hello " + request.host.encode(), headers=(("Cache-Control", "max-age=60"),))


async def echo(request: HttpRequest) -> HttpResponse:
    return HttpResponse(200, request.body, content_type="application/octet-stream")


ROUTES = HttpRouter({("GET", "/hello"): hello, ("POST", "/echo"): echo})


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    servers: list[HttpServer] = []

    async def _start(host: str = "127.0.0.1", **kwargs: object) -> HttpServer:
        server = HttpServer(kwargs.pop("handler", ROUTES), **kwargs)  # type: ignore[arg-type]
        await server.start(host, 0)
        servers.append(server)
        return server

    yield _start
    for server in servers:
        await server.close(timeout=2.0)


async def raw(port: int, data: bytes, *, host: str = "127.0.0.1", timeout: float = 10.0) -> bytes:
    """Send ``data``, read until the server closes (bounded)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def test_get_head_404_405_with_httpx(start: Start) -> None:
    seen: Seen = []
    server = await start(on_response=lambda req, resp: seen.append((req, resp)))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", trust_env=False) as client:
        ok = await client.get("/hello", headers={"Host": "Mta-Sts.Example.Test:443"})
        assert (ok.status_code, ok.text) == (200, "hello mta-sts.example.test")
        assert ok.headers["cache-control"] == "max-age=60" and ok.headers["content-type"].startswith("text/plain")
        head = await client.head("/hello")
        assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == "15"
        assert (await client.get("/nope")).status_code == 404
        wrong = await client.put("/hello")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, HEAD"
        posted = await client.post("/echo", content=b"x" * 1000)
        assert posted.content == b"x" * 1000
    assert [resp.status for _, resp in seen] == [200, 200, 404, 405, 200]
    assert seen[0][0] is not None and seen[0][0].peer == "127.0.0.1"
    assert server.counters.connections == 1  # httpx kept the connection alive for all five


async def test_ipv6_loopback(start: Start) -> None:
    server = await start("::1")
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.get(f"http://[::1]:{server.port}/hello")
    assert response.status_code == 200


async def test_https_with_sni_callback(start: Start, issue_cert: IssueCert, test_ca: TestCA) -> None:
    default = issue_cert(["default.example.test"])
    sts = issue_cert(["mta-sts.example.test"])
    ctx = server_context(
        default.chain_path, default.key_path, sni={"mta-sts.example.test": (sts.chain_path, sts.key_path)}
    )
    server = await start(ssl=ctx)
    client_ctx = ssl.create_default_context(cafile=str(test_ca.cert_path))
    async with httpx.AsyncClient(verify=client_ctx, trust_env=False) as client:
        ext = {"sni_hostname": "mta-sts.example.test"}
        url = httpx.URL(scheme="https", host="127.0.0.1", port=server.port, path="/hello")
        response = await client.get(url, headers={"Host": "mta-sts.example.test"}, extensions=ext)
    assert (response.status_code, response.text) == (200, "hello mta-sts.example.test")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl(start: Start) -> None:
    server = await start()
    url = f"http://127.0.0.1:{server.port}"
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", "-i", f"{url}/hello", "--next", "-sS", "-d", "@-", f"{url}/echo",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(b"from curl"), 20)
    assert proc.returncode == 0, err
    assert b"HTTP/1.1 200 OK" in out and b"hello 127.0.0.1" in out
    assert out.endswith(b"from curl")  # the POST, on the same connection


async def test_oversize_body_is_413_without_reading_it(start: Start) -> None:
    server = await start(limits=HttpLimits(max_body_bytes=100))
    assert server.port is not None
    out = await raw(server.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in out
    chunks = b"".join(b"40\r\n" + b"y" * 64 + b"\r\n" for _ in range(3))
    out = await raw(server.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
    assert out.startswith(b"HTTP/1.1 413 ")


async def test_slow_client_gets_408_and_is_closed(start: Start) -> None:
    server = await start(limits=HttpLimits(header_timeout=0.5, body_timeout=0.5))
    assert server.port is not None
    out = await raw(server.port, b"GET /hello HTTP/1.1\r\nHost:", timeout=10)
    assert out.startswith(b"HTTP/1.1 408 ")
    out = await raw(server.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc", timeout=10)
    assert out.startswith(b"HTTP/1.1 408 ")
    assert await raw(server.port, b"", timeout=10) == b""  # silent client: closed without a word


async def test_pipelined_keep_alive_and_max_requests(start: Start) -> None:
    server = await start(limits=HttpLimits(max_requests=3))
    assert server.port is not None
    one = b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n"
    out = await raw(server.port, one * 5)
    assert out.count(b"HTTP/1.1 200 OK") == 3  # the third says close; the rest is never read
    assert out.count(b"Connection: close") == 1 and out.endswith(b"hello a")


async def test_malformed_request_is_400(start: Start) -> None:
    server = await start()
    assert server.port is not None
    assert (await raw(server.port, b"NOT HTTP AT ALL\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    big = b"GET /hello HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
    assert (await raw(server.port, big)).startswith(b"HTTP/1.1 431 ")


async def test_before_body_refuses_early_and_handler_errors_are_500(start: Start) -> None:
    async def check(head: HttpRequest) -> HttpResponse | None:
        assert head.body == b""
        if head.header("x-flood"):
            return HttpResponse.text(429, "slow down", headers=(("Retry-After", "60"),))
        if not head.header("content-length"):
            return HttpResponse.text(411, "Content-Length required", close=True)
        return None

    def broken(request: HttpRequest) -> HttpResponse:
        raise RuntimeError("boom")

    router = HttpRouter({("POST", "/echo"): echo, ("GET", "/broken"): broken})
    server = await start(handler=router, before_body=check, limits=HttpLimits(max_body_bytes=100))
    assert server.port is not None
    flood = b"POST /echo HTTP/1.1\r\nHost: x\r\nX-Flood: 1\r\nContent-Length: 1000\r\n\r\n"
    assert (await raw(server.port, flood)).startswith(b"HTTP/1.1 429 ")  # the check first, then the size (413)
    assert (await raw(server.port, flood.replace(b"X-Flood", b"X-Calm"))).startswith(b"HTTP/1.1 413 ")
    chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    assert (await raw(server.port, chunked)).startswith(b"HTTP/1.1 411 ")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", trust_env=False) as client:
        assert (await client.post("/echo", content=b"ok")).content == b"ok"
        assert (await client.get("/broken", headers={"Content-Length": "0"})).status_code == 500


async def test_connection_cap_and_graceful_close(start: Start) -> None:
    gate = asyncio.Event()

    async def slow(request: HttpRequest) -> HttpResponse:
        await gate.wait()
        return HttpResponse(200, b"done")

    server = await start(handler=HttpRouter({("GET", "/slow"): slow}), limits=HttpLimits(max_connections=1))
    assert server.port is not None
    busy = asyncio.ensure_future(raw(server.port, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"))
    for _ in range(200):  # until the first connection is in its handler
        if server.counters.connections:
            break
        await asyncio.sleep(0.01)
    refused = await raw(server.port, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    assert refused.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 5" in refused
    closing = asyncio.ensure_future(server.close(timeout=5.0))
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.wait_for(closing, 10)
    out = await asyncio.wait_for(busy, 10)
    assert out.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in out and out.endswith(b"done")
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.port)


async def test_expect_100_continue(start: Start) -> None:
    server = await start(limits=HttpLimits(max_body_bytes=10))
    assert server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 100 ")
        writer.write(b"ok")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ") and await asyncio.wait_for(reader.readexactly(2), 10) == b"ok"
    finally:
        writer.close()
    big = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n"
    assert (await raw(server.port, big)).startswith(b"HTTP/1.1 413 ")  # no 100 before the refusal
