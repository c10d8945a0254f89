"""TLS-RPT over HTTPS on loopback: reports POSTed to a real HTTPS collector (test-CA certificate), found through a
real DNS exchange, retried after a failure; and our own HTTPS endpoint receiving reports."""

from __future__ import annotations

import asyncio
import gzip
import json
import ssl
import threading
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dns.message
import httpx
import jsonschema
import pytest
import tomli_w

from mxgate.core import engine
from mxgate.core.cli import main as cli_main
from mxgate.core.dns import Resolver
from mxgate.core.outcomes import PolicyType, TlsOutcome, TlsRptResult
from mxgate.core.tls import server_context
from mxgate.plugins.tlsrpt import TlsRptConfig, TlsRptService
from mxgate.plugins.tlsrpt import report as rpt
from mxgate.testing.ca import TestCA
from mxgate.testing.dnslab import ScriptedDnsServer, make_reply
from mxgate.testing.gateway import build_document

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "tlsrpt"
SCHEMA = json.loads((DATA / "report.schema.json").read_text())


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@dataclass
class Collector:
    """A minimal HTTPS server: records each POST; answers the scripted statuses, then 200."""

    statuses: list[int] = field(default_factory=list)
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append((method, path, headers, body))
        status = self.statuses.pop(0) if self.statuses else 200
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        writer.close()


def outcome(at: float, **kw: Any) -> TlsOutcome:
    base: dict[str, Any] = {
        "connector": "internet",
        "policy_type": PolicyType.STS,
        "policy_domain": "example.org",
        "success": True,
        "mx_host": "mx1.example.org",
        "receiving_ip": "192.0.2.25",
        "sending_ip": "198.51.100.1",
        "policy_strings": ("version: STSv1", "mode: enforce", "mx: mx1.example.org", "max_age: 86400"),
        "mx_patterns": ("mx1.example.org",),
        "at": at,
    }
    base.update(kw)
    return TlsOutcome(**base)


def txt_handler(records: dict[str, str]) -> Any:
    def handler(q: dns.message.Message) -> dns.message.Message:
        name = q.question[0].name.to_text(omit_final_dot=True).lower()
        if name in records:
            return make_reply(q, answer=[f"{name}. 60 IN TXT {json.dumps(records[name])}"])
        return make_reply(q, rcode=dns.rcode.NXDOMAIN)

    return handler


async def test_report_posted_to_a_real_https_collector_with_retry(tmp_path: Path) -> None:
    ca = TestCA.create(tmp_path / "ca")
    leaf = ca.issue(["collector.test"], ip_addresses=["127.0.0.1"])
    collector = Collector(statuses=[503])
    server = await asyncio.start_server(
        collector.handle, "127.0.0.1", 0, ssl=server_context(leaf.chain_path, leaf.key_path)
    )
    port = server.sockets[0].getsockname()[1]
    uri = f"https://127.0.0.1:{port}/v1/tlsrpt"
    records = {"_smtp._tls.example.org": f"v=TLSRPTv1; rua={uri}"}
    now = ts("2024-03-05T05:00:00")
    events: list[tuple[str, dict[str, str]]] = []

    async def emit(kind: str, value: float = 1.0, **labels: str) -> None:
        events.append((kind, labels))

    async with ScriptedDnsServer(txt_handler(records)) as dns_server:
        conf = replace(
            TlsRptConfig(),
            organization_name="Sender Org",
            contact_info="tlsrpt@sender.example",
            send_window_hours=0.0,
            https_ca_file=str(ca.cert_path),
        )
        svc = TlsRptService(
            conf,
            state_dir=tmp_path / "var",
            submitter="mx.sender.example",
            clock=lambda: now,
            resolver=Resolver([dns_server.endpoint()], timeout=2.0),
            emit=emit,
        )
        svc.record(outcome(ts("2024-03-04T09:00:00")))
        svc.record(outcome(ts("2024-03-04T09:01:00"), success=False, result_type=TlsRptResult.CERTIFICATE_EXPIRED))
        try:
            await svc.tick(now)  # first POST gets 503
            assert len(collector.requests) == 1
            (row,) = await svc.status("2024-03-04")
            assert row[3] == "pending" and row[5] == "HTTP 503"
            await svc.send_due(now + 60)  # not due yet: backoff
            assert len(collector.requests) == 1
            await svc.send_due(now + 301)
            assert len(collector.requests) == 2
            (row,) = await svc.status("2024-03-04")
            assert row[3] == "sent" and row[4] == 2
        finally:
            await svc.close()
            server.close()
            await server.wait_closed()
    method, path, headers, body = collector.requests[-1]
    assert (method, path) == ("POST", "/v1/tlsrpt")
    assert headers["content-type"] == "application/tlsrpt+gzip"
    assert collector.requests[0][3] == body  # the retry sends the same report
    report = json.loads(gzip.decompress(body))
    jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).validate(
        report
    )
    assert report["policies"][0]["summary"] == {
        "total-successful-session-count": 1,
        "total-failure-session-count": 1,
    }
    assert [lab for kind, lab in events if kind == "tlsrpt_sent"] == [
        {"result": "retry", "method": "https"},
        {"result": "ok", "method": "https"},
    ]


async def test_untrusted_collector_certificate_is_a_failure(tmp_path: Path) -> None:
    ca = TestCA.create(tmp_path / "ca")
    other = TestCA.create(tmp_path / "other")
    leaf = ca.issue(["collector.test"], ip_addresses=["127.0.0.1"])
    collector = Collector()
    server = await asyncio.start_server(
        collector.handle, "127.0.0.1", 0, ssl=server_context(leaf.chain_path, leaf.key_path)
    )
    port = server.sockets[0].getsockname()[1]
    svc = TlsRptService(
        replace(TlsRptConfig(), https_ca_file=str(other.cert_path)),
        state_dir=tmp_path / "var",
        submitter="mx.sender.example",
    )
    try:
        result = await svc.post_https(f"https://127.0.0.1:{port}/", b"x")
        assert not result.ok and "CERTIFICATE_VERIFY_FAILED" in result.detail
        assert collector.requests == []
    finally:
        await svc.close()
        server.close()
        await server.wait_closed()


async def test_our_https_endpoint_receives_reports(tmp_path: Path) -> None:
    ca = TestCA.create(tmp_path / "ca")
    leaf = ca.issue(["tlsrpt.receiver.test"], ip_addresses=["127.0.0.1"])
    now = ts("2024-03-05T05:00:00")
    receiver = TlsRptService(
        replace(
            TlsRptConfig(),
            receive_listen="127.0.0.1:0",
            receive_cert=str(leaf.chain_path),
            receive_key=str(leaf.key_path),
            receive_max_bytes=64 * 1024,
        ),
        state_dir=tmp_path / "receiver",
        submitter="mx.receiver.test",
        clock=lambda: now,
    )
    await receiver.start_receiver()
    url = f"https://127.0.0.1:{receiver.receiver_port}/tlsrpt"
    try:
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca.cert_path), timeout=10) as client:
            gz = gzip.compress((DATA / "microsoft-shaped.json").read_bytes())
            r = await client.post(url, content=gz, headers={"Content-Type": "application/tlsrpt+gzip"})
            assert r.status_code == 200 and r.text.strip() == "ok"
            plain = (DATA / "google-shaped.json").read_bytes()
            r = await client.post(url, content=plain, headers={"Content-Type": "application/tlsrpt+json"})
            assert r.status_code == 200
            r = await client.post(url, content=plain, headers={"Content-Type": "application/tlsrpt+json"})
            assert (r.status_code, r.text.strip()) == (200, "duplicate")
            assert (await client.get(url)).status_code == 405
            assert (await client.post(url, content=b"{nope")).status_code == 400
            assert (await client.post(url, content=b"x" * (64 * 1024 + 1))).status_code == 413

            # our own sender, reporting to our own endpoint: the round trip
            sender = TlsRptService(
                replace(TlsRptConfig(), organization_name="Loop Sender", https_ca_file=str(ca.cert_path)),
                state_dir=tmp_path / "sender",
                submitter="mx.sender.example",
            )
            try:
                sender.record(outcome(ts("2024-03-04T09:00:00"), success=False))
                (agg,) = await sender.aggregates("2024-03-04", "example.org")
                gz = rpt.gzip_report(sender.render("2024-03-04", [agg], "loop-1@mx.sender.example"))
                assert (await sender.post_https(url, gz)).ok
            finally:
                await sender.close()
        assert await receiver.reporter_failures() == [
            ("Microsoft Corporation", 47, 7),
            ("Google Inc.", 1520, 3),
            ("Loop Sender", 0, 1),
        ]
    finally:
        await receiver.close()


class LoopThread:
    """An event loop in a thread, hosting servers for a synchronous test (the CLI runs its own loop)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def test_cli_send_posts_a_past_day_now(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = TestCA.create(tmp_path / "ca")
    leaf = ca.issue(["collector.test"], ip_addresses=["127.0.0.1"])
    collector = Collector(statuses=[500])
    loop = LoopThread()
    dns_server: ScriptedDnsServer | None = None
    server: asyncio.Server | None = None
    try:

        async def start() -> tuple[asyncio.Server, ScriptedDnsServer, int]:
            srv = await asyncio.start_server(
                collector.handle, "127.0.0.1", 0, ssl=server_context(leaf.chain_path, leaf.key_path)
            )
            port = srv.sockets[0].getsockname()[1]
            records = {"_smtp._tls.example.org": f"v=TLSRPTv1; rua=https://127.0.0.1:{port}/r"}
            dns_srv = await ScriptedDnsServer(txt_handler(records)).__aenter__()
            return srv, dns_srv, port

        server, dns_server, _port = loop.run(start())
        document = build_document("", tmp_path)
        document["server"]["hostname"] = "mx.sender.example"
        document["dns"] = {"resolvers": [f"127.0.0.1:{dns_server.port}"], "timeout": 2.0}
        document["plugins"] = {
            "disable": ["dane", "mta_sts", "prometheus", "dnssec"],
            "tlsrpt": {"organization_name": "Sender Org", "https_ca_file": str(ca.cert_path)},
        }
        path = tmp_path / "mxgate.toml"
        path.write_text(tomli_w.dumps(document), encoding="utf-8")
        config, _ = engine.load(path, entry_points=False)

        async def seed() -> None:
            svc = TlsRptService(TlsRptConfig(), state_dir=config.state_path, submitter="mx.sender.example")
            svc.record(outcome(ts("2024-03-04T09:00:00")))
            await svc.close()

        asyncio.run(seed())
        argv = ["tlsrpt", "send", "-c", str(path), "--date", "2024-03-04"]
        assert cli_main(argv) == 1  # HTTP 500: still owed
        assert "pending  attempts=1  HTTP 500" in capsys.readouterr().out
        assert cli_main(argv) == 0  # "send now" does not wait for the backoff
        assert "sent  attempts=2" in capsys.readouterr().out
        assert len(collector.requests) == 2
        assert cli_main(argv) == 0  # nothing owed any more: nothing sent again
        assert len(collector.requests) == 2
        report = json.loads(gzip.decompress(collector.requests[-1][3]))
        assert report["organization-name"] == "Sender Org"
        today = datetime.now(UTC).date().isoformat()
        assert cli_main(["tlsrpt", "send", "-c", str(path), "--date", today]) == 2
        assert "not over yet" in capsys.readouterr().err
    finally:

        async def stop() -> None:
            if server is not None:
                server.close()
            if dns_server is not None:
                await dns_server.__aexit__(None, None, None)

        loop.run(stop())
        loop.close()
