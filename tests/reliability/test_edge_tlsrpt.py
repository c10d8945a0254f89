"""The TLS-RPT HTTPS receiver under abuse (issue 18, item 8), against a real ``mxgate run``:

* five big, valid reports (2,000 policies x 20 failure-details: 0.13 MB gzipped, 6 MB of JSON) POSTed at once
  are refused with 413, the store does not grow, and an SMTP session's NOOPs meanwhile stay quick (parsing runs
  off the event loop and stops at the bounds);
* a report within the bounds is stored as counts: the store grows by a fraction of the report's size;
* one client address gets 429 (with Retry-After) past ``receive_reports_per_hour``;
* past ``receive_store_limit`` reports are refused with 507 and the store stops growing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from reliability_kit import GatewayProcess, RawClient, free_port, gateway_document, write_config

from mxgate.testing.ca import TestCA

pytestmark = [pytest.mark.integration]


def report(policies: int, details: int, *, report_id: str, organization: str = "Flood Inc.") -> bytes:
    """A valid RFC 8460 report, gzipped."""
    doc: dict[str, Any] = {
        "organization-name": organization,
        "date-range": {"start-datetime": "2026-12-06T00:00:00Z", "end-datetime": "2026-12-06T23:59:59Z"},
        "contact-info": "tlsrpt@flood.example",
        "report-id": report_id,
        "policies": [
            {
                "policy": {
                    "policy-type": "sts",
                    "policy-string": ["version: STSv1", "mode: enforce", f"mx: mx.d{p}.example", "max_age: 86400"],
                    "policy-domain": f"d{p}.example",
                    "mx-host": [f"mx.d{p}.example"],
                },
                "summary": {"total-successful-session-count": 100, "total-failure-session-count": details},
                "failure-details": [
                    {
                        "result-type": "certificate-expired",
                        "sending-mta-ip": f"192.0.2.{f % 250}",
                        "receiving-mx-hostname": f"mx.d{p}.example",
                        "receiving-ip": f"198.51.{f // 250}.{f % 250}",
                        "failed-session-count": 1,
                        "failure-reason-code": "certificate has expired",
                    }
                    for f in range(details)
                ],
            }
            for p in range(policies)
        ],
    }
    return gzip.compress(json.dumps(doc).encode())


@dataclass
class Receiver:
    gw: GatewayProcess
    smtp_port: int
    url: str
    ctx: ssl.SSLContext
    store: Path

    def size(self) -> int:
        return sum(os.stat(p).st_size for p in (self.store, Path(f"{self.store}-wal")) if p.exists())

    async def post(self, body: bytes, source: str = "127.0.0.1") -> httpx.Response:
        transport = httpx.AsyncHTTPTransport(verify=self.ctx, local_address=source)
        async with httpx.AsyncClient(transport=transport, timeout=60) as client:
            return await client.post(self.url, content=body, headers={"Content-Type": "application/tlsrpt+gzip"})


@contextlib.asynccontextmanager
async def receiver(tmp_path: Path, **tlsrpt: Any) -> AsyncIterator[Receiver]:
    ca = TestCA.create(tmp_path / "ca")
    leaf = ca.issue(["tlsrpt.gateway.test"], ip_addresses=["127.0.0.1"])
    port, https = free_port(), free_port()
    doc = gateway_document(tmp_path / "var", port=port, smart_host=f"127.0.0.1:{free_port()}")
    doc["plugins"] = {
        "tlsrpt": {
            "receive_listen": f"127.0.0.1:{https}",
            "receive_cert": str(leaf.chain_path),
            "receive_key": str(leaf.key_path),
            **tlsrpt,
        }
    }
    gw = GatewayProcess(write_config(tmp_path / "mxgate.toml", doc), tmp_path / "gateway.log")
    gw.start(port)
    try:
        ctx = ssl.create_default_context(cafile=ca.cert_path)
        rx = Receiver(gw, port, f"https://127.0.0.1:{https}/tlsrpt", ctx, tmp_path / "var" / "tlsrpt.sqlite3")
        deadline = time.monotonic() + 20
        while True:  # the plugin's endpoint starts with the gateway: wait until it answers
            try:
                if (await rx.post(b"{}")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, gw.tail()
            await asyncio.sleep(0.1)
        yield rx
    finally:
        gw.kill()


async def _noop_latencies(port: int, stop: asyncio.Event) -> list[float]:
    client = await RawClient.connect("127.0.0.1", port)
    out: list[float] = []
    try:
        assert (await client.reply()).code == "220"
        while not stop.is_set():
            started = time.monotonic()
            await client.send(b"NOOP\r\n")
            assert (await client.reply()).code == "250"
            out.append(time.monotonic() - started)
            await asyncio.sleep(0.01)
    finally:
        await client.close()
    return out


@pytest.mark.asyncio
async def test_big_reports_neither_stall_the_loop_nor_fill_the_store(tmp_path: Path) -> None:
    big = [report(2000, 20, report_id=f"big-{i}") for i in range(5)]
    async with receiver(tmp_path) as rx:
        before = rx.size()
        stop = asyncio.Event()
        noops = asyncio.ensure_future(_noop_latencies(rx.smtp_port, stop))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        responses = await asyncio.gather(*(rx.post(body, f"127.0.3.{i + 1}") for i, body in enumerate(big)))
        took = time.monotonic() - started
        await asyncio.sleep(0.2)
        stop.set()
        latencies = await noops
        grew = rx.size() - before
        print(
            f"\n5 x {len(big[0]) / 1e6:.2f} MB gzipped reports: {[r.status_code for r in responses]} in {took:.2f} s;"
            f" NOOP max {max(latencies) * 1000:.0f} ms over {len(latencies)}; store +{grew} bytes"
        )
        assert [r.status_code for r in responses] == [413] * 5
        assert "at most" in responses[0].text
        assert max(latencies) < 0.5, sorted(latencies)[-5:]
        assert grew < 64 * 1024, grew

        # within the bounds: kept as counts, not as the report
        ok = report(100, 10, report_id="fine-1", organization="Fine Org")
        json_size = len(gzip.decompress(ok))
        before = rx.size()
        r = await rx.post(ok, "127.0.3.9")
        assert (r.status_code, r.text.strip()) == (200, "ok")
        grew = rx.size() - before
        print(f"a {json_size / 1e3:.0f} kB report (100 policies, 1,000 failure-details): store +{grew / 1e3:.0f} kB")
        assert grew < json_size / 3, (grew, json_size)


@pytest.mark.asyncio
async def test_rate_limit_and_store_limit_refuse_clearly(tmp_path: Path) -> None:
    async with receiver(tmp_path, receive_reports_per_hour=5, receive_store_limit=400_000) as rx:
        small = report(2, 2, report_id="rate-0")
        statuses = [(await rx.post(small, "127.0.4.1")).status_code for _ in range(5)]
        assert statuses == [200] * 5  # ok, then duplicates
        r = await rx.post(small, "127.0.4.1")
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0, (r.status_code, r.headers)
        assert (await rx.post(small, "127.0.4.2")).status_code == 200  # another client is not affected

        # fill the store from ever new addresses (each under its rate) until it refuses
        sizes = []
        for i in range(200):
            r = await rx.post(report(100, 10, report_id=f"fill-{i}"), f"127.0.5.{i + 1}")
            sizes.append(rx.size())
            if r.status_code != 200:
                break
        assert r.status_code == 507, (r.status_code, r.text, sizes[-3:])
        assert "store full" in r.text and "retry-after" in r.headers
        full = rx.size()
        for i in range(3):  # refused without reading the body: the store stays as it is
            r = await rx.post(report(100, 10, report_id=f"more-{i}"), f"127.0.6.{i + 1}")
            assert r.status_code == 507
        print(f"\nstore refused at {full} bytes (limit 400,000) after {len(sizes) - 1} reports")
        assert rx.size() - full < 16 * 1024  # nothing of those reports (a page or two of our own bookkeeping at most)
        assert full < 400_000 + 200_000  # one report past the limit at most
