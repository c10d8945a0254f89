"""The TLS-RPT HTTPS receiver's decisions without sockets: its ``before_body`` refusals on the request head, in
order (405, 429 with Retry-After, 411, 413, 507), and its answers to a report's body."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from mxgate import HttpRequest, HttpResponse
from mxgate.plugins.tlsrpt import TlsRptConfig, TlsRptService

DATA = Path(__file__).resolve().parents[1] / "data" / "tlsrpt"


class Events:
    def __init__(self) -> None:
        self.results: list[str] = []

    async def __call__(self, kind: str, value: float = 1.0, **labels: str) -> None:
        if kind == "tlsrpt_received":
            self.results.append(labels["result"])


def head(method: str = "POST", length: int | None = 100, *, peer: str = "192.0.2.1", **extra: str) -> HttpRequest:
    headers = [("host", "tlsrpt.example.org")]
    if length is not None:
        headers.append(("content-length", str(length)))
    headers += [(k.replace("_", "-"), v) for k, v in extra.items()]
    return HttpRequest(method, "/any/path", tuple(headers), peer=peer, tls=True)


def text(response: HttpResponse | None) -> tuple[int, str]:
    assert response is not None and response.content_type == "text/plain"
    assert response.body.endswith(b"\r\n")
    return response.status, response.body.decode().removesuffix("\r\n")


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[TlsRptService]:
    conf = replace(TlsRptConfig(), receive_max_bytes=1000, receive_reports_per_hour=2)
    svc = TlsRptService(conf, state_dir=tmp_path / "var", submitter="mx.example.org", emit=Events())
    yield svc
    await svc.close()


async def test_refusals_on_the_head_in_order(service: TlsRptService) -> None:
    events = service.emit
    assert isinstance(events, Events)
    refuse = service._before_body
    response = await refuse(head("GET"))
    assert text(response) == (405, "POST reports here") and response is not None and response.header("allow") == "POST"
    assert await refuse(head()) is None  # 1st of 2 an hour
    status, _ = text(await refuse(head(length=None)))  # counts against the rate too (as before)
    assert status == 411
    response = await refuse(head())
    assert text(response) == (429, "too many reports from 192.0.2.1; at most 2 an hour")
    assert response is not None and int(response.header("retry-after")) > 0
    assert events.results == ["rate_limited"]
    assert await refuse(head(peer="192.0.2.2", transfer_encoding="chunked", length=None)) is not None
    assert text(await refuse(head(peer="192.0.2.3", length=None))) == (411, "Content-Length required")
    status, body = text(await refuse(head(peer="192.0.2.4", length=1001)))
    assert (status, body) == (413, "report too large: at most 1000 bytes")
    assert await refuse(head(peer="192.0.2.5", length=1000)) is None

    assert await service.reporter_failures() == []  # the store exists now: more than 1 byte
    service.conf = replace(service.conf, receive_store_limit=1)
    response = await refuse(head(peer="192.0.2.6"))
    assert text(response) == (507, "report store full, try again later")
    assert response is not None and response.header("retry-after") == "3600"
    assert events.results == ["rate_limited", "store_full"]
    # the order: a client over its rate gets 429 even when the store is full; a GET gets 405 before both
    assert text(await refuse(head(length=None)))[0] == 429
    assert text(await refuse(head("GET")))[0] == 405


async def test_chunked_is_length_required(service: TlsRptService) -> None:
    response = await service._before_body(head(transfer_encoding="chunked", length=None))
    assert text(response) == (411, "Content-Length required")


async def test_answers_to_a_report_body(service: TlsRptService) -> None:
    report = (DATA / "google-shaped.json").read_bytes()
    handle = service._handle_report
    assert text(await handle(replace(head(), body=gzip.compress(report)))) == (200, "ok")
    assert text(await handle(replace(head(), body=report))) == (200, "duplicate")
    assert text(await handle(replace(head(), body=b"{nope"))) == (400, "not a TLS report")
    status, body = text(await handle(replace(head(), body=gzip.compress(b" " * 2000 + report))))
    assert status == 413 and body.startswith("report too large: at most 1000 bytes decompressed")
