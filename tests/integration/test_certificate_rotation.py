"""Certificates that rotate (issue 23, item 3): a running gateway's certificate and key files are replaced, as an
ACME client does (certificate first, key a moment later), and new handshakes present the new certificate without a
restart; a pair that does not match is refused and the old one keeps serving. Real gateway, real STARTTLS
handshakes, real metrics endpoint."""

from __future__ import annotations

import asyncio
import os
import smtplib
import ssl
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from mxgate.testing.ca import IssuedCert
from mxgate.testing.gateway import free_port

pytestmark = [pytest.mark.integration]


def served(port: int, sni: str | None = None) -> x509.Certificate:
    """The certificate a STARTTLS handshake gets now (a new connection each time)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        client._host = sni or "127.0.0.1"  # smtplib sends this as SNI; an IP address is never sent
        client.starttls(context=ctx)
        der = client.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        client.ehlo("client.test")
        assert client.noop()[0] == 250
    assert der is not None
    return x509.load_der_x509_certificate(der)


def install(target: Path, data: bytes) -> None:
    """Replace a file as renewal tools do: write a new file, rename it over the old one."""
    tmp = target.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def metric(port: int, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def until(predicate: Any, what: str, timeout: float = 15.0) -> None:
    """Poll ``predicate`` in a thread (it talks to the gateway, which runs on this loop) until it holds."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.fixture
def pair_dir(tmp_path: Path) -> Path:
    path = tmp_path / "certs"
    path.mkdir()
    return path


async def test_swapped_files_serve_without_restart_and_a_mismatched_pair_is_refused(
    mxgate_gateway: Any, issue_cert: Any, pair_dir: Path
) -> None:
    first: IssuedCert = issue_cert(["mx.gateway.test"])
    cert, key = pair_dir / "mx.pem", pair_dir / "mx.key"
    install(cert, first.chain_path.read_bytes())
    install(key, first.key_path.read_bytes())
    gw = await mxgate_gateway(
        f"""
        [server]
        certificate_check_interval = 0.1
        [[listener]]
        name = "smtp"
        address = "127.0.0.1:{free_port()}"
        tls_cert = "{cert}"
        tls_key = "{key}"
        """
    )
    port, mport = gw.smtp_port, gw.metrics_port
    assert mport is not None
    assert (await asyncio.to_thread(served, port)) == first.cert
    expiry = "mxgate_tls_certificate_expiry_timestamp_seconds"
    assert (
        await asyncio.to_thread(metric, mport, expiry, listener="smtp", certificate="default")
        == first.cert.not_valid_after_utc.timestamp()
    )

    # Renewal: the new certificate lands first, its key a moment later. In between, handshakes keep working with
    # the old pair (a handshake with a key that does not match its certificate would fail).
    second: IssuedCert = issue_cert(["mx.gateway.test"], not_after=first.cert.not_valid_after_utc.replace(year=2040))
    install(cert, second.chain_path.read_bytes())
    await until(lambda: metric(mport, "mxgate_tls_certificate_reloads_total", result="refused") == 1, "a refusal")
    assert (await asyncio.to_thread(served, port)) == first.cert
    install(key, second.key_path.read_bytes())
    await until(lambda: served(port) == second.cert, "the new certificate in a handshake")
    assert (await asyncio.to_thread(served, port, "mx.gateway.test")) == second.cert  # with SNI too
    assert (
        await asyncio.to_thread(metric, mport, expiry, listener="smtp", certificate="default")
        == second.cert.not_valid_after_utc.timestamp()
    )
    loaded = await asyncio.to_thread(metric, mport, "mxgate_tls_certificate_reloads_total", result="loaded")
    assert loaded == 1

    # A key that belongs to another certificate, then garbage: refused each time; the current pair keeps serving.
    third: IssuedCert = issue_cert(["mx.gateway.test"])
    install(key, third.key_path.read_bytes())
    await until(lambda: metric(mport, "mxgate_tls_certificate_reloads_total", result="refused") == 2, "a refusal")
    assert (await asyncio.to_thread(served, port)) == second.cert
    install(cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    await until(lambda: metric(mport, "mxgate_tls_certificate_reloads_total", result="refused") == 3, "a refusal")
    assert (await asyncio.to_thread(served, port)) == second.cert
    # the files become a good pair again: served
    install(cert, third.chain_path.read_bytes())
    await until(lambda: served(port) == third.cert, "the third certificate in a handshake")


class TlsLoad:
    """One client in a thread: STARTTLS and a message, again and again; records the certificates it saw."""

    def __init__(self, port: int) -> None:
        import threading

        self.port = port
        self.accepted = 0
        self.seen: list[x509.Certificate] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def __aenter__(self) -> TlsLoad:
        self._thread.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop and wait for the thread without blocking the loop (the gateway under test runs on it)."""
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 60)

    def _run(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=20) as c:
                    c.starttls(context=ctx)
                    der = c.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
                    c.sendmail("load@sender.test", [f"u{n}@example.org"], f"Subject: {n}\r\n\r\n{n}\r\n")
                assert der is not None
                self.seen.append(x509.load_der_x509_certificate(der))
                self.accepted += 1
            except (smtplib.SMTPException, OSError, AssertionError) as exc:
                self.failures.append(f"{n}: {exc!r}")

    def wait_for(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        target = self.accepted + n
        while self.accepted < target:
            assert time.monotonic() < deadline, f"load stalled at {self.accepted}: {self.failures[-3:]}"
            time.sleep(0.02)


async def test_rotation_and_reload_under_load_lose_nothing(issue_cert: Any, tmp_path: Path) -> None:
    """Mail over STARTTLS flows the whole time: the files are swapped in place (certificate first), then a reload
    points the listener at other files, then a reload with a mismatched pair is refused. Every handshake works,
    every message answered 250 arrives, and the new certificates serve."""
    import tomli_w

    from mxgate.core import bootstrap, engine
    from mxgate.testing.sinks import SmtpSink

    pairs: list[IssuedCert] = [issue_cert(["mx.gateway.test"]) for _ in range(3)]
    cert, key = tmp_path / "mx.pem", tmp_path / "mx.key"
    install(cert, pairs[0].chain_path.read_bytes())
    install(key, pairs[0].key_path.read_bytes())
    port = free_port()
    async with SmtpSink() as sink:
        doc: dict[str, Any] = {
            "server": {
                "hostname": "mx.gateway.test",
                "state_dir": str(tmp_path / "state"),
                "accepted_domains": ["example.org"],
                "certificate_check_interval": 0.1,
            },
            "listener": [{"name": "smtp", "address": f"127.0.0.1:{port}", "tls_cert": str(cert), "tls_key": str(key)}],
            "outbound_connector": [
                {"name": "inside", "recipient_domains": ["*"], "smart_hosts": [f"127.0.0.1:{sink.port}"], "tls": "none"}
            ],
            "dns": {"resolvers": [f"127.0.0.1:{free_port()}"], "timeout": 0.5},
            "metrics": {"listen": ""},
        }
        path = tmp_path / "mxgate.toml"
        path.write_text(tomli_w.dumps(doc))
        source = bootstrap.read_source(path)
        config, plugins = bootstrap.load_source(source, entry_points=False)
        gateway = engine.Gateway(config, plugins, source=source)
        await gateway.start()
        try:
            async with TlsLoad(port) as load:
                await asyncio.to_thread(load.wait_for, 5)
                install(cert, pairs[1].chain_path.read_bytes())  # the key follows a moment later
                await asyncio.to_thread(load.wait_for, 3)
                install(key, pairs[1].key_path.read_bytes())
                await until(lambda: bool(load.seen) and load.seen[-1] == pairs[1].cert, "the swapped certificate")
                # a reload that names other files: served at once
                doc["listener"][0].update(tls_cert=str(pairs[2].chain_path), tls_key=str(pairs[2].key_path))
                path.write_text(tomli_w.dumps(doc))
                status = await gateway.reload()
                assert status["ok"], status
                await until(lambda: load.seen[-1] == pairs[2].cert, "the reloaded certificate")
                # a reload with a key that does not match: refused, nothing changes
                doc["listener"][0].update(tls_key=str(pairs[0].key_path))
                path.write_text(tomli_w.dumps(doc))
                status = await gateway.reload()
                assert not status["ok"] and "does not match" in status["problems"][0], status
                await asyncio.to_thread(load.wait_for, 5)
                assert load.seen[-1] == pairs[2].cert
            assert load.failures == []
            received = await sink.wait_for(load.accepted, timeout=60)
            assert len(received) == load.accepted
            seen = {c.serial_number for c in load.seen}
            assert {p.cert.serial_number for p in pairs} == seen  # the first, the swapped and the reloaded
        finally:
            await gateway.stop(timeout=10)
