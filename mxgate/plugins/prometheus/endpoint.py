"""The scrape endpoint on ``[metrics] listen``: ``GET /metrics`` (text or OpenMetrics, gzip when accepted), ``/``
a link page, on mxgate's shared HTTP server (:class:`mxgate.HttpServer`). One request per connection, as before
(``Connection: close``); bounded in head size and time."""

from __future__ import annotations

import gzip
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from mxgate import HttpLimits, HttpRequest, HttpResponse, HttpServer

#: One request per connection; the head within 10 s and 16 KiB; a scrape has no body worth reading.
LIMITS = HttpLimits(max_header_bytes=16384, max_body_bytes=65536, header_timeout=10.0, max_requests=1)
INDEX = b'<html><body><h1>mxgate</h1><p><a href="/metrics">metrics</a></p></body></html>\n'

Exposition = Callable[[str, str], tuple[bytes, dict[str, str]]]


def exposition(
    registry: CollectorRegistry, accept: str = "", accept_encoding: str = ""
) -> tuple[bytes, dict[str, str]]:
    """The scrape body and headers (OpenMetrics when the scraper asks for it; gzip when it accepts it)."""
    encoder, content_type = choose_encoder(accept)
    body = encoder(registry)
    headers = {"Content-Type": content_type}
    if "gzip" in accept_encoding.lower():
        body = gzip.compress(body, compresslevel=6)
        headers["Content-Encoding"] = "gzip"
    return body, headers


def respond(request: HttpRequest, scrape: Exposition) -> HttpResponse:
    """The answer to one request: pure apart from ``scrape``."""
    if request.method not in ("GET", "HEAD"):
        return HttpResponse(405, b"method not allowed\n", "text/plain", (("Allow", "GET, HEAD"),))
    if request.path == "/metrics":
        body, headers = scrape(request.header("accept"), request.header("accept-encoding"))
        content_type = headers.pop("Content-Type")
        return HttpResponse(200, body, content_type, tuple(headers.items()))
    if request.path == "/":
        return HttpResponse(200, INDEX, "text/html; charset=utf-8")
    return HttpResponse(404, b"not found: try /metrics\n", "text/plain")


async def start_endpoint(listen: str, scrape: Exposition) -> HttpServer:
    """Serve ``scrape`` on ``listen`` ("host:port"); raises OSError when the address is taken."""
    server = HttpServer(lambda request: respond(request, scrape), name="metrics", limits=LIMITS)
    await server.start(listen)
    return server
