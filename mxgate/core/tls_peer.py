"""What the TLS peer presented: its raw certificate chain (for DANE and post-handshake checks), a summary of
the handshake (:class:`TlsInfo`) and the DER forms TLSA records hash. Part of :mod:`mxgate.core.tls`, which
re-exports the public names."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mxgate.core.tls_contexts import requested_server_name
from mxgate.core.tls_names import _dns_sans

__all__ = ["TlsInfo", "cert_der", "describe", "peer_chain", "spki_der"]


def peer_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> tuple[x509.Certificate, ...]:
    """The certificates the peer sent, leaf first, in the order it sent them; ``()`` when it sent none.

    Works with verification off (CERT_NONE). Every supported Python has ``get_unverified_chain()`` on the
    private ``_sslobj`` (``_ssl.Certificate`` objects); 3.13+ also has a public one (DER bytes), used only where
    the private one is missing: 3.13.0's public wrapper calls ``public_bytes`` on each item and so raises
    AttributeError on the ``None`` that stands for a client without a certificate. Both put the peer's leaf
    first on the server side too (OpenSSL's server-side chain lacks it; CPython prepends it, and yields ``[None]``
    for a client without a certificate). Without either, only the leaf is available (``getpeercert``).
    """
    getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if getter is None:
        getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is not None:
        # the server side with no client certificate returns [None]: the missing peer leaf
        raw = [item for item in (getter() or ()) if item is not None]
        if raw:
            return tuple(x509.load_der_x509_certificate(_der_of(item)) for item in raw)
    der = ssl_object.getpeercert(binary_form=True)
    return (x509.load_der_x509_certificate(der),) if der else ()


def _der_of(item: object) -> bytes:
    if isinstance(item, bytes | bytearray):
        return bytes(item)
    public_bytes = getattr(item, "public_bytes", None)  # _ssl.Certificate (3.10-3.12)
    if public_bytes is None:
        raise TypeError(f"unexpected certificate object {type(item).__name__}")
    der = public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
    if not isinstance(der, bytes):
        raise TypeError("certificate did not encode to bytes")
    return der


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What one TLS connection negotiated (for logs, tracking and Received: headers)."""

    version: str | None  # "TLSv1.3"
    cipher: str | None  # OpenSSL name, "TLS_AES_256_GCM_SHA384"
    bits: int | None
    peer_subject: str | None  # RFC 4514 string of the peer leaf's subject
    peer_dns_names: tuple[str, ...]  # DNS SANs of the peer leaf
    session_reused: bool
    server_name: str | None  # client side: the SNI we sent; server side: the SNI the peer sent


def describe(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> TlsInfo:
    """Summarise a completed handshake."""
    cipher = ssl_object.cipher()
    chain = peer_chain(ssl_object)
    leaf = chain[0] if chain else None
    server_side = ssl_object.server_side
    server_name = requested_server_name(ssl_object) if server_side else ssl_object.server_hostname
    return TlsInfo(
        version=ssl_object.version(),
        cipher=cipher[0] if cipher else None,
        bits=cipher[2] if cipher else None,
        peer_subject=leaf.subject.rfc4514_string() if leaf is not None else None,
        peer_dns_names=_dns_sans(leaf) if leaf is not None else (),
        session_reused=bool(ssl_object.session_reused),
        server_name=server_name,
    )


def spki_der(cert: x509.Certificate) -> bytes:
    """DER SubjectPublicKeyInfo (TLSA selector 1)."""
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def cert_der(cert: x509.Certificate) -> bytes:
    """DER of the whole certificate (TLSA selector 0)."""
    return cert.public_bytes(serialization.Encoding.DER)
