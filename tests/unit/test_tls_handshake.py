"""Real TLS handshakes over loopback: contexts, SNI, peer chains, client certificates, resumption."""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from mxgate.core import tls
from mxgate.core.tls import TlsMode
from mxgate.testing.ca import IssuedCert, TestCA, self_signed


@pytest.fixture(scope="module")
def inter(test_ca: TestCA) -> TestCA:
    return test_ca.intermediate("handshake intermediate")


@pytest.fixture(scope="module")
def mx1(inter: TestCA) -> IssuedCert:
    return inter.issue(["mx1.secure.test"])


@dataclass
class Server:
    host: str
    port: int
    seen: asyncio.Queue[ssl.SSLObject] = field(default_factory=asyncio.Queue)


async def _serve(ctx: ssl.SSLContext) -> AsyncIterator[Server]:
    state: dict[str, Server] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await state["server"].seen.put(writer.get_extra_info("ssl_object"))
            writer.write(b"hello\n")
            await writer.drain()
            await asyncio.wait_for(reader.read(100), 5)
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    state["server"] = Server("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        yield state["server"]
    finally:
        server.close()
        await server.wait_closed()


async def _connect(
    srv: Server, ctx: ssl.SSLContext, server_hostname: str | None
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """(client-side, server-side) SSL objects of one completed handshake."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(srv.host, srv.port, ssl=ctx, server_hostname=server_hostname), 5
    )
    try:
        assert await asyncio.wait_for(reader.readline(), 5) == b"hello\n"
        client_side = writer.get_extra_info("ssl_object")
        server_side = await asyncio.wait_for(srv.seen.get(), 5)
        return client_side, server_side
    finally:
        writer.close()


def _ctx_server(cert: IssuedCert, **kwargs: object) -> ssl.SSLContext:
    return tls.server_context(cert.chain_path, cert.key_path, **kwargs)  # type: ignore[arg-type]


async def test_peer_chain_is_leaf_and_intermediate(mx1: IssuedCert, inter: TestCA) -> None:
    async for srv in _serve(_ctx_server(mx1)):
        client_side, server_side = await _connect(srv, tls.client_context(verify=False), "mx1.secure.test")
        assert tls.peer_chain(client_side) == (mx1.cert, inter.cert)
        assert tls.peer_chain(server_side) == ()  # no client certificate was asked for
        info = tls.describe(client_side)
        assert info.version in ("TLSv1.3", "TLSv1.2")
        assert info.cipher and info.bits and info.bits >= 128
        assert info.peer_dns_names == ("mx1.secure.test",)
        assert info.peer_subject == "CN=mx1.secure.test"
        assert info.server_name == "mx1.secure.test"
        assert info.session_reused is False
        server_info = tls.describe(server_side)
        assert server_info.server_name == "mx1.secure.test"
        assert server_info.peer_subject is None and server_info.version == info.version


def test_python_311_exposes_the_chain_privately() -> None:
    """The gotcha peer_chain works around: 3.10-3.12 have no public accessor."""
    if sys.version_info >= (3, 13):
        assert hasattr(ssl.SSLObject, "get_unverified_chain")
    else:
        assert not hasattr(ssl.SSLObject, "get_unverified_chain")
        assert hasattr(ssl._ssl._SSLSocket, "get_unverified_chain")  # type: ignore[attr-defined]


def test_peer_chain_falls_back_to_the_leaf(mx1: IssuedCert) -> None:
    class LeafOnly:
        def getpeercert(self, binary_form: bool = False) -> bytes | None:
            return tls.cert_der(mx1.cert) if binary_form else None

    class Nothing:
        def getpeercert(self, binary_form: bool = False) -> bytes | None:
            return None

    assert tls.peer_chain(LeafOnly()) == (mx1.cert,)  # type: ignore[arg-type]
    assert tls.peer_chain(Nothing()) == ()  # type: ignore[arg-type]

    class PublicApi(LeafOnly):  # the 3.13+ shape: DER bytes
        def get_unverified_chain(self) -> list[bytes]:
            return [tls.cert_der(c) for c in mx1.chain]

    assert tls.peer_chain(PublicApi()) == mx1.chain  # type: ignore[arg-type]


async def test_client_verification_against_a_ca_file(mx1: IssuedCert, inter: TestCA) -> None:
    ctx = tls.client_context(verify=True, cafile=inter.root.cert_path)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    async for srv in _serve(_ctx_server(mx1)):
        client_side, _ = await _connect(srv, ctx, "mx1.secure.test")
        assert tls.peer_chain(client_side)[0] == mx1.cert
        with pytest.raises(ssl.SSLCertVerificationError):
            await _connect(srv, ctx, "mx2.secure.test")


def test_unverified_client_context_and_cipher_floor() -> None:
    client = tls.client_context(verify=False)
    assert client.verify_mode == ssl.CERT_NONE and not client.check_hostname
    for ctx in (client, tls.client_context(verify=True)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        suites = ctx.get_ciphers()
        assert suites
        assert all(s["auth"] != "auth-null" for s in suites), "anonymous suites must never be offered"
        assert not [s["name"] for s in suites if "ADH" in s["name"] or "AECDH" in s["name"] or "NULL" in s["name"]]


async def test_tls_1_2_client_gets_a_forward_secret_aead(mx1: IssuedCert) -> None:
    ctx = tls.client_context(verify=False)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async for srv in _serve(_ctx_server(mx1)):
        client_side, _ = await _connect(srv, ctx, "mx1.secure.test")
        info = tls.describe(client_side)
        assert info.version == "TLSv1.2"
        assert info.cipher is not None and info.cipher.startswith("ECDHE-ECDSA-") and "GCM" in info.cipher


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
async def test_tls_below_1_2_is_refused(mx1: IssuedCert) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    try:
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    except ValueError:
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    ctx = _ctx_server(mx1)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    async for srv in _serve(ctx):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await _connect(srv, old, "mx1.secure.test")


async def test_sni_map_picks_the_right_certificate(test_ca: TestCA, mx1: IssuedCert) -> None:
    exact = test_ca.issue(["mx.a.test"])
    wildcard = test_ca.issue(["*.b.test"])
    more_exact = test_ca.issue(["special.b.test"])
    ctx = _ctx_server(
        mx1, sni={"MX.A.TEST.": exact.files, "*.b.test": wildcard.files, "special.b.test": more_exact.files}
    )
    cases = {
        "mx.a.test": exact,
        "Mx.A.Test": exact,
        "x.b.test": wildcard,
        "special.b.test": more_exact,
        "y.x.b.test": mx1,  # a wildcard covers one label only
        "b.test": mx1,
        "unknown.test": mx1,
        None: mx1,
    }
    async for srv in _serve(ctx):
        for name, expected in cases.items():
            client_side, server_side = await _connect(srv, tls.client_context(verify=False), name)
            assert tls.peer_chain(client_side)[0] == expected.cert, name
            assert tls.requested_server_name(server_side) == (name.lower() if name else None)


async def test_client_certificates(test_ca: TestCA, inter: TestCA, mx1: IssuedCert) -> None:
    client_cert = inter.issue(["relay.partner.test"], client=True)
    ctx = _ctx_server(mx1, client_ca_file=test_ca.cert_path)
    assert ctx.verify_mode == ssl.CERT_OPTIONAL
    async for srv in _serve(ctx):
        with_cert = tls.client_context(verify=False, cert_file=client_cert.chain_path, key_file=client_cert.key_path)
        _, server_side = await _connect(srv, with_cert, "mx1.secure.test")
        # server side: CPython puts the peer's leaf in front of OpenSSL's leaf-less server-side chain
        assert tls.peer_chain(server_side) == (client_cert.cert, inter.cert)
        assert tls.describe(server_side).peer_dns_names == ("relay.partner.test",)
        _, anonymous = await _connect(srv, tls.client_context(verify=False), "mx1.secure.test")
        assert tls.peer_chain(anonymous) == ()


@pytest.mark.parametrize("kind", ["self_signed", "foreign_ca", "expired", "server_only_eku"])
async def test_a_client_certificate_that_does_not_verify_completes_the_handshake(
    tmp_path: Path, test_ca: TestCA, mx1: IssuedCert, kind: str
) -> None:
    """A client certificate never fails the handshake (DESIGN): it is there afterwards, and verifies or not."""
    if kind == "self_signed":
        cert = self_signed(tmp_path, ["stranger.test"])
    elif kind == "foreign_ca":
        cert = TestCA.create(tmp_path / "foreign").issue(["relay.partner.test"], client=True, directory=tmp_path)
    elif kind == "expired":
        cert = test_ca.issue(["relay.partner.test"], client=True, not_after=datetime.now(UTC) - timedelta(days=1))
    else:
        cert = test_ca.issue(["relay.partner.test"])  # serverAuth only: not for a TLS client (sslclient purpose)
    ctx = _ctx_server(mx1, client_ca_file=test_ca.cert_path)
    assert ctx.verify_mode == ssl.CERT_OPTIONAL
    async for srv in _serve(ctx):
        client = tls.client_context(verify=False, cert_file=cert.chain_path, key_file=cert.key_path)
        _, server_side = await _connect(srv, client, "mx1.secure.test")
        chain = tls.peer_chain(server_side)
        assert chain and chain[0] == cert.cert
        result = tls.verify_client_chain(chain, now=datetime.now(UTC), trust_store_paths=[str(test_ca.cert_path)])
        assert not result.ok
        expected = tls.VerifyReason.EXPIRED if kind == "expired" else tls.VerifyReason.UNTRUSTED
        assert result.reason == expected, result


async def test_a_client_certificate_that_verifies(test_ca: TestCA, inter: TestCA, mx1: IssuedCert) -> None:
    client_cert = inter.issue(["relay.partner.test"], client=True)
    async for srv in _serve(_ctx_server(mx1, request_client_cert=True)):
        with_cert = tls.client_context(verify=False, cert_file=client_cert.chain_path, key_file=client_cert.key_path)
        _, server_side = await _connect(srv, with_cert, "mx1.secure.test")
        chain = tls.peer_chain(server_side)
        now = datetime.now(UTC)
        assert tls.verify_client_chain(chain, now=now, trust_store_paths=[str(test_ca.cert_path)]).ok
        assert not tls.verify_client_chain(
            chain, now=now + timedelta(days=3650), trust_store_paths=[str(test_ca.cert_path)]
        ).ok
    assert tls.verify_client_chain((), now=datetime.now(UTC)).reason == tls.VerifyReason.OTHER


def test_request_client_cert_without_ca_file(mx1: IssuedCert) -> None:
    ctx = _ctx_server(mx1, request_client_cert=True)
    assert ctx.verify_mode == ssl.CERT_OPTIONAL  # asked for; verified after the handshake, not by OpenSSL


def _sync_client(host: str, port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[bool, object]:
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="mx1.secure.test", session=session) as conn,
    ):
        assert conn.recv(6) == b"hello\n"  # TLS 1.3 tickets arrive after the handshake
        reused = bool(conn.session_reused)
        new_session = conn.session
        conn.sendall(b"bye")
        return reused, new_session


async def test_server_allows_session_resumption(mx1: IssuedCert) -> None:
    client_ctx = tls.client_context(verify=False)
    server_ctx = _ctx_server(mx1)
    assert server_ctx.num_tickets == 1  # one TLS 1.3 ticket per full handshake, and it resumes
    async for srv in _serve(server_ctx):
        reused, session = await asyncio.to_thread(_sync_client, srv.host, srv.port, client_ctx, None)
        assert not reused and isinstance(session, ssl.SSLSession)
        await asyncio.wait_for(srv.seen.get(), 5)
        reused, _ = await asyncio.to_thread(_sync_client, srv.host, srv.port, client_ctx, session)
        assert reused
        server_side = await asyncio.wait_for(srv.seen.get(), 5)
        assert tls.describe(server_side).session_reused


async def test_a_resumed_session_keeps_its_client_certificate_verified(
    test_ca: TestCA, inter: TestCA, mx1: IssuedCert
) -> None:
    """A resumed session carries the client's leaf without its intermediate: the leaf verified in the full
    handshake stays verified (a leaf the verifier never saw does not)."""
    client_cert = inter.issue(["relay.partner.test"], client=True)
    client_ctx = tls.client_context(verify=False, cert_file=client_cert.chain_path, key_file=client_cert.key_path)
    now = datetime.now(UTC)
    async for srv in _serve(_ctx_server(mx1, request_client_cert=True)):
        reused, session = await asyncio.to_thread(_sync_client, srv.host, srv.port, client_ctx, None)
        full = await asyncio.wait_for(srv.seen.get(), 5)
        reused, _ = await asyncio.to_thread(_sync_client, srv.host, srv.port, client_ctx, session)
        resumed = await asyncio.wait_for(srv.seen.get(), 5)
        assert reused and resumed.session_reused
        assert tls.peer_chain(resumed) == (client_cert.cert,)  # the intermediate is not in the session
        fresh = tls.ClientCertificateVerifier([str(test_ca.cert_path)])
        assert not fresh.verify(tls.peer_chain(resumed), now=now, resumed=True).ok
        verifier = tls.ClientCertificateVerifier([str(test_ca.cert_path)])
        assert verifier.verify(tls.peer_chain(full), now=now).ok
        assert verifier.verify(tls.peer_chain(resumed), now=now, resumed=True).ok
        assert not verifier.verify(tls.peer_chain(resumed), now=now, resumed=False).ok
        later = now + timedelta(days=3650)
        assert not verifier.verify(tls.peer_chain(resumed), now=later, resumed=True).ok


def test_tls_mode_values() -> None:
    assert [m.value for m in TlsMode] == [
        "none",
        "opportunistic",
        "encryption_only",
        "certificate_validation",
        "domain_validation",
    ]
    assert TlsMode("domain_validation") is TlsMode.DOMAIN_VALIDATION


def test_certificates_round_trip_through_der(mx1: IssuedCert) -> None:
    assert x509.load_der_x509_certificate(tls.cert_der(mx1.cert)) == mx1.cert
