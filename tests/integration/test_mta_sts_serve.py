"""The MTA-STS policy server (``mxgate.plugins.mta_sts.serve.PolicyServer``) on loopback over real TLS: the
certificate chosen by SNI, every served header, HEAD/404/405, what the shared HTTP server adds (400, 431, 408)
and the ``sts_policy_served`` labels."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from cryptography import x509

from mxgate.core.tls import server_context
from mxgate.plugins.mta_sts import PolicyServer, ServedPolicy
from mxgate.plugins.mta_sts.policy import parse_policy
from mxgate.testing.ca import IssueCert, TestCA

pytestmark = [pytest.mark.integration]

WELL_KNOWN = "/.well-known/mta-sts.txt"
ORG = ServedPolicy(domain="example.org", mode="enforce", mx=("mx.example.org",), max_age=86400)
NET = ServedPolicy(domain="example.net", mode="testing", mx=("*.example.net",), max_age=600)


@dataclass
class Sink:
    events: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    async def on_event(self, kind: str, value: float = 1.0, **labels: str) -> None:
        self.events.append((kind, labels))

    async def on_tls_outcome(self, outcome: object) -> None:
        pass

    async def labels(self, count: int) -> list[str]:
        """The ``sts_policy_served`` results, once ``count`` arrived (reported after the response: polled)."""
        async with asyncio.timeout(5):
            while len(self.events) < count:
                await asyncio.sleep(0.01)
        assert all(kind == "sts_policy_served" for kind, _ in self.events)
        return [labels["result"] for _, labels in self.events]


@dataclass
class Served:
    server: PolicyServer
    sink: Sink
    client: ssl.SSLContext
    port: int

    async def raw(self, data: bytes, sni: str = "mta-sts.example.org") -> tuple[bytes, dict[str, str], bytes, str]:
        """(status line, headers, body, certificate subject names) for ``data`` sent over TLS with ``sni``."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, ssl=self.client, server_hostname=sni)
        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            cert = x509.load_der_x509_certificate(der)
            names = ",".join(
                cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                    x509.DNSName
                )
            )
            writer.write(data)
            async with asyncio.timeout(15):
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
                headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
                if data.startswith(b"HEAD "):
                    body = await reader.read()  # nothing: the server closes (one request per connection)
                else:
                    body = await reader.readexactly(int(headers["content-length"]))
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        return lines[0].encode(), headers, body, names


@pytest.fixture
async def served(issue_cert: IssueCert, test_ca: TestCA) -> AsyncIterator[Served]:
    default = issue_cert(["mta-sts.example.org"])
    net = issue_cert(["mta-sts.example.net"])
    ctx = server_context(
        default.chain_path, default.key_path, sni={"mta-sts.example.net": (net.chain_path, net.key_path)}
    )
    sink = Sink()
    server = PolicyServer([ORG, NET], ctx, sink)
    await server.start("127.0.0.1", 0)
    assert server.port is not None and server.sockets
    try:
        yield Served(server, sink, ssl.create_default_context(cafile=test_ca.cert_path), server.port)
    finally:
        await server.close()
    assert server.sockets == ()


def get(host: str, target: str = WELL_KNOWN, method: str = "GET") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


async def test_policy_per_sni_and_host_with_the_served_headers(served: Served) -> None:
    status, headers, body, names = await served.raw(get("mta-sts.example.org"))
    assert status == b"HTTP/1.1 200 OK" and names == "mta-sts.example.org"
    assert headers == {"content-type": "text/plain", "content-length": str(len(body)), "connection": "close"}
    assert body == ORG.render().encode() and parse_policy(body.decode()).mx == ("mx.example.org",)
    # the certificate follows SNI (the context's SNI callback), the policy follows Host
    status, headers, body, names = await served.raw(get("MTA-STS.example.net.:443"), sni="mta-sts.example.net")
    assert status == b"HTTP/1.1 200 OK" and names == "mta-sts.example.net"
    assert parse_policy(body.decode()).mode == "testing"
    status, headers, body, _ = await served.raw(get("mta-sts.example.net", method="HEAD"), sni="mta-sts.example.net")
    assert status == b"HTTP/1.1 200 OK" and body == b"" and headers["content-length"] == str(len(NET.render()))
    assert await served.sink.labels(3) == ["ok", "ok", "ok"]


async def test_not_found_and_method_not_allowed(served: Served) -> None:
    status, headers, body, _ = await served.raw(get("mta-sts.other.org"))
    assert (status, body) == (b"HTTP/1.1 404 Not Found", b"not found\n")
    assert headers["content-type"] == "text/plain; charset=utf-8" and headers["connection"] == "close"
    status, _, body, _ = await served.raw(get("mta-sts.example.org", target=WELL_KNOWN + "?x=1"))
    assert (status, body) == (b"HTTP/1.1 404 Not Found", b"not found\n")
    # a POST is refused before its body is read (the client may still be sending it)
    status, headers, body, _ = await served.raw(
        b"POST " + WELL_KNOWN.encode() + b" HTTP/1.1\r\nHost: mta-sts.example.org\r\nContent-Length: 5\r\n\r\nhello"
    )
    assert (status, body) == (b"HTTP/1.1 405 Method Not Allowed", b"method not allowed\n")
    assert headers["allow"] == "GET, HEAD" and headers["content-type"] == "text/plain; charset=utf-8"
    assert await served.sink.labels(3) == ["not_found", "not_found", "bad_request"]


async def test_what_the_shared_server_refuses(served: Served) -> None:
    """Answered now where the old server closed without a word: HTTP/1.1 without Host (400), garbage (400), a
    head over 8 KiB (431). All counted as ``bad_request``, as before."""
    status, headers, _, _ = await served.raw(b"GET " + WELL_KNOWN.encode() + b" HTTP/1.1\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400") and headers["connection"] == "close"
    status, _, _, _ = await served.raw(b"\x16garbage\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400")
    status, _, _, _ = await served.raw(
        f"GET {WELL_KNOWN} HTTP/1.1\r\nHost: mta-sts.example.org\r\nX-Pad: {'a' * 9000}\r\n\r\n".encode()
    )
    assert status.startswith(b"HTTP/1.1 431")
    # an HTTP/1.0 request without Host is still a plain 404
    status, _, _, _ = await served.raw(b"GET " + WELL_KNOWN.encode() + b" HTTP/1.0\r\n\r\n")
    assert status == b"HTTP/1.1 404 Not Found"
    assert await served.sink.labels(4) == ["bad_request", "bad_request", "bad_request", "not_found"]


async def test_a_connection_without_a_request_is_not_counted(served: Served) -> None:
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", served.port, ssl=served.client, server_hostname="mta-sts.example.org"
    )
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    await served.raw(get("mta-sts.example.org"))
    assert await served.sink.labels(1) == ["ok"]
    await asyncio.sleep(0.1)
    assert len(served.sink.events) == 1
