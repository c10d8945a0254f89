"""TLS contexts, peer-chain access and certificate checks.

This module knows TLS and X.509, not DANE or MTA-STS: those plugins build on it.

- :func:`server_context` / :func:`client_context` build ``ssl.SSLContext`` objects with mxgate's floor
  (TLS >= 1.2, never anonymous or null cipher suites).
- The delivery path verifies peers itself, *after* the handshake, because DANE needs the raw chain the peer
  sent: hence ``client_context(verify=False)`` and :func:`peer_chain`.
- :func:`match_reference_identifiers` is RFC 6125 name matching as RFC 7672 §3.2 narrows it (DANE-TA);
  :func:`verify_webpki` is WebPKI path validation (MTA-STS, ``certificate_validation`` / ``domain_validation``
  connectors) with an injected clock.

Blocking work: :func:`verify_webpki` may read the system trust store (cached afterwards) and does public-key
operations; call it via ``asyncio.to_thread`` on the event loop's behalf.
"""

from __future__ import annotations

import _ssl
import contextlib
import ctypes
import ipaddress
import logging
import os
import ssl
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import idna
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

__all__ = [
    "CIPHERS_TLS12",
    "ClientCertificateVerifier",
    "TlsInfo",
    "TlsMode",
    "VerifyReason",
    "VerifyResult",
    "cert_der",
    "client_context",
    "describe",
    "match_reference_identifiers",
    "normalize_dns_name",
    "peer_chain",
    "requested_server_name",
    "server_context",
    "spki_der",
    "system_trust_store_paths",
    "verify_client_chain",
    "verify_webpki",
]

log = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]

# TLS 1.2 suites (TLS 1.3 suites are OpenSSL's defaults, all authenticated AEADs). Forward-secret AEADs first,
# then CBC and static-RSA suites that old MTAs still need: for opportunistic SMTP TLS a weak cipher beats
# cleartext (RFC 7435). Anonymous (aNULL) and null-encryption (eNULL) suites are excluded on both sides: DANE
# and certificate checks mean nothing over an unauthenticated key exchange (RFC 7672 §8.1, RFC-CHECKLIST 16).
CIPHERS_TLS12 = (
    "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:ECDHE+AES:DHE+AES:RSA+AESGCM:RSA+AES"
    ":!aNULL:!eNULL:!MD5:!DSS:!PSK:!SRP:!RC4:!3DES:!AESCCM"
)


class TlsMode(StrEnum):
    """Outbound TLS setting of a connector (Exchange's ``TlsAuthLevel`` plus "none" and "opportunistic")."""

    NONE = "none"  # never STARTTLS
    OPPORTUNISTIC = "opportunistic"  # STARTTLS when offered, no checks, cleartext if it fails
    ENCRYPTION_ONLY = "encryption_only"  # TLS required, certificate not checked
    CERTIFICATE_VALIDATION = "certificate_validation"  # TLS required, WebPKI chain checked, name not
    DOMAIN_VALIDATION = "domain_validation"  # TLS required, WebPKI chain and name (tls_domain) checked


# -- contexts ------------------------------------------------------------------------------------


def _base_context(protocol: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


# The server name each server-side connection asked for (SNI), recorded by the SNI callback.
_REQUESTED_SNI: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def requested_server_name(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    """The server name (SNI) the client sent on a connection accepted with a :func:`server_context` context.

    ``None`` when the client sent none (or the context was not built here). Lower case, as sent otherwise.
    """
    try:
        return _REQUESTED_SNI.get(ssl_object)
    except TypeError:  # not weak-referenceable
        return None


def _server_leaf_context(
    cert_file: StrPath, key_file: StrPath, client_ca_file: StrPath | None, request_client_cert: bool
) -> ssl.SSLContext:
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    # Resumption stays on (tickets, and the session cache): a resumed handshake is ~4x cheaper (PERF-NOTES).
    ctx.options &= ~ssl.OP_NO_TICKET
    if request_client_cert or client_ca_file is not None:
        ask_for_client_certificate(ctx)
    return ctx


# -- client certificates: asked for, never fatal ------------------------------------------------------------------
#
# Internet MTAs present client certificates from CAs we have never heard of (Exchange Online's among them). With
# CERT_OPTIONAL, OpenSSL aborts the handshake when a presented certificate does not verify, and Python offers no
# verify callback to say "record it and go on". So the context gets OpenSSL's callback through ctypes -- one that
# accepts whatever was presented (Postfix's ask_ccert) -- and the chain is verified after the handshake
# (:func:`verify_client_chain`); the result only decides whether a certificate-pinned connector matches.

_VERIFY_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
_SSL_VERIFY_PEER = 0x01


def _accept_all(_preverify_ok: int, _store_ctx: int | None) -> int:
    return 1


_accept_presented_certificate = _VERIFY_CALLBACK(_accept_all)  # kept alive: OpenSSL holds the pointer


def _libssl() -> Any:
    lib = ctypes.CDLL(_ssl.__file__)  # dlsym through _ssl's handle finds the libssl it is linked with
    lib.SSL_CTX_set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, _VERIFY_CALLBACK]
    lib.SSL_CTX_set_verify.restype = None
    lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    return lib


def _ssl_ctx_pointer(ctx: ssl.SSLContext, lib: Any) -> int | None:
    """The ``SSL_CTX *`` of ``ctx``: CPython's context object holds it right after the object header. Checked
    against what Python reports (verify mode and options) before it is used."""
    address = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not address:
        return None
    if lib.SSL_CTX_get_verify_mode(address) != _SSL_VERIFY_PEER:
        return None
    if lib.SSL_CTX_get_options(address) != int(ctx.options):
        return None
    return int(address)


def ask_for_client_certificate(ctx: ssl.SSLContext) -> bool:
    """Ask clients for a certificate without ever failing the handshake over it: the client may present none,
    or one that does not verify (foreign CA, self-signed, expired). Verify it afterwards with
    :func:`verify_client_chain`. Returns False (and asks for nothing: CERT_NONE) where OpenSSL's verify
    callback cannot be reached (not CPython's ``_ssl``) -- a failed handshake would be worse than no certificate.
    """
    ctx.verify_mode = ssl.CERT_OPTIONAL
    try:
        lib = _libssl()
        pointer = _ssl_ctx_pointer(ctx, lib)
        if pointer is not None:
            lib.SSL_CTX_set_verify(pointer, _SSL_VERIFY_PEER, _accept_presented_certificate)
            return True
    except (OSError, AttributeError, ValueError, ImportError) as exc:
        log.debug("no OpenSSL verify callback: %r", exc)
    ctx.verify_mode = ssl.CERT_NONE
    log.error("client certificates cannot be requested on this Python build: certificate-pinned connectors never match")
    return False


def server_context(
    cert_file: StrPath,
    key_file: StrPath,
    *,
    sni: Mapping[str, tuple[StrPath, StrPath]] | None = None,
    client_ca_file: StrPath | None = None,
    request_client_cert: bool = False,
) -> ssl.SSLContext:
    """A server context: TLS >= 1.2, session resumption allowed, optional SNI map and client certificates.

    :param cert_file: PEM chain, leaf first (e.g. ``IssuedCert.chain_path``); the default certificate.
    :param sni: server name -> ``(cert_file, key_file)``. Exact names win over ``*.`` entries, which match one
        left-most label (``*.example.org`` serves ``mx.example.org``). Names are case-insensitive; unknown
        names get the default certificate.
    :param client_ca_file: implies ``request_client_cert`` (kept for callers; the CAs are not loaded here).
    :param request_client_cert: ask for a client certificate. The handshake never fails over it: a client may
        present none, or one that does not verify (see :func:`ask_for_client_certificate`); verify the chain
        after the handshake with :func:`verify_client_chain`.

    The SNI callback also records the name the client asked for: see :func:`requested_server_name`.
    """
    default = _server_leaf_context(cert_file, key_file, client_ca_file, request_client_cert)
    by_name = {
        normalize_dns_name(name) or name.lower(): _server_leaf_context(c, k, client_ca_file, request_client_cert)
        for name, (c, k) in (sni or {}).items()
    }

    def pick(ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        if server_name is None:
            return None
        name = server_name.rstrip(".").lower()
        with contextlib.suppress(TypeError):  # not weak-referenceable: just not recorded
            _REQUESTED_SNI[ssl_object] = name
        chosen = by_name.get(name)
        if chosen is None and "." in name:
            chosen = by_name.get("*." + name.split(".", 1)[1])
        if chosen is not None:
            ssl_object.context = chosen
        return None

    default.sni_callback = pick
    return default


# -- certificates that rotate ------------------------------------------------------------------------------------


def pair_problem(cert_file: StrPath, key_file: StrPath) -> str | None:
    """Why this certificate chain and key cannot serve (unreadable, not PEM, key not matching), or None.

    Exactly what a server context does with them (``load_cert_chain``), so a pair that passes here loads at start.
    """
    data: dict[str, bytes] = {}
    for what, path in (("certificate", cert_file), ("key", key_file)):
        try:
            with open(path, "rb") as f:
                data[what] = f.read()
        except OSError as exc:
            return f"{os.fspath(path)}: cannot read the {what}: {(exc.strerror or str(exc)).lower()}"
    try:
        x509.load_pem_x509_certificates(data["certificate"])
    except ValueError:
        return f"{os.fspath(cert_file)}: not a PEM certificate chain"
    try:
        serialization.load_pem_private_key(data["key"], password=None)
    except (ValueError, TypeError):
        return f"{os.fspath(key_file)}: not a PEM private key (or one protected by a passphrase)"
    except Exception:  # an unsupported key type: let OpenSSL below judge it
        pass
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).lower().replace("_", " ")
        if "key values mismatch" in reason:
            return f"{os.fspath(key_file)}: the key does not match the certificate in {os.fspath(cert_file)}"
        return f"{os.fspath(cert_file)} / {os.fspath(key_file)}: not a PEM certificate chain and key ({reason})"
    except OSError as exc:
        return f"{os.fspath(cert_file)}: {(exc.strerror or str(exc)).lower()}"
    return None


def leaf_certificate(cert_file: StrPath) -> x509.Certificate:
    """The first certificate of a PEM chain file (raises OSError or ValueError)."""
    with open(cert_file, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def not_after(cert: x509.Certificate) -> datetime:
    return cert.not_valid_after_utc


FileStamp = tuple[tuple[int, int, int, int] | None, ...]


def _stamp(paths: Sequence[StrPath]) -> FileStamp:
    out: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class ServedCertificates:
    """One consistent set of a listener's certificates: the default context and leaf, and the SNI ones."""

    default: ssl.SSLContext
    leaf: x509.Certificate
    by_name: Mapping[str, ssl.SSLContext]
    leaves: Mapping[str, x509.Certificate]  # "" (the default) and every SNI name -> leaf certificate


@dataclass(frozen=True, slots=True)
class _Target:
    """The files a :class:`RotatingServerContext` serves from."""

    pairs: tuple[tuple[str, StrPath, StrPath], ...]  # ("" for the default | SNI name, cert, key)
    client_ca_file: StrPath | None
    request_client_cert: bool

    @classmethod
    def of(
        cls,
        cert_file: StrPath,
        key_file: StrPath,
        sni: Mapping[str, tuple[StrPath, StrPath]] | None,
        client_ca_file: StrPath | None,
        request_client_cert: bool,
    ) -> _Target:
        pairs = [("", cert_file, key_file)]
        pairs += [(normalize_dns_name(name) or name.lower(), c, k) for name, (c, k) in (sni or {}).items()]
        return cls(tuple(pairs), client_ca_file, request_client_cert)

    @property
    def files(self) -> list[StrPath]:
        out: list[StrPath] = [p for _, c, k in self.pairs for p in (c, k)]
        return out if self.client_ca_file is None else [*out, self.client_ca_file]

    def build(self) -> ServedCertificates:
        contexts: dict[str, ssl.SSLContext] = {}
        leaves: dict[str, x509.Certificate] = {}
        for name, cert, key in self.pairs:
            contexts[name] = _server_leaf_context(cert, key, self.client_ca_file, self.request_client_cert)
            leaves[name] = leaf_certificate(cert)
        default = contexts.pop("")
        return ServedCertificates(default, leaves[""], contexts, leaves)


class RotatingServerContext:
    """A listener's server context whose certificate and key files may be replaced while it runs (ACME renewals,
    DANE key rollovers), with no restart.

    :attr:`context` is what the listener hands to every handshake; it never changes. Its server-name callback,
    which OpenSSL calls in every handshake (with or without SNI), moves the connection to the context of the
    current :class:`ServedCertificates` — the default or the one for the SNI name. :meth:`refresh` rebuilds the
    whole set from the files when any of them changed and swaps it in at once, only if every pair loads (each
    ``load_cert_chain`` checks that the key matches its certificate): while an ACME client has written the new
    certificate but not yet the new key, the old pair keeps serving, and the next refresh after the key arrives
    takes both. Handshakes in progress keep the context they started with.
    """

    def __init__(
        self,
        cert_file: StrPath,
        key_file: StrPath,
        *,
        sni: Mapping[str, tuple[StrPath, StrPath]] | None = None,
        client_ca_file: StrPath | None = None,
        request_client_cert: bool = False,
    ) -> None:
        self._target = _Target.of(cert_file, key_file, sni, client_ca_file, request_client_cert)
        self._stamp = _stamp(self._target.files)
        self._failed: FileStamp | None = None
        self.current = self._target.build()  # errors at start are the caller's
        self.context = _server_leaf_context(cert_file, key_file, client_ca_file, request_client_cert)
        self.context.sni_callback = self._pick

    def prepare(
        self,
        cert_file: StrPath,
        key_file: StrPath,
        *,
        sni: Mapping[str, tuple[StrPath, StrPath]] | None = None,
        client_ca_file: StrPath | None = None,
        request_client_cert: bool = False,
    ) -> Callable[[], None]:
        """Load other files (a reloaded configuration) now; returns what switches to them. Raises (OSError,
        ValueError, ssl.SSLError) when they do not load: nothing changed then."""
        target = _Target.of(cert_file, key_file, sni, client_ca_file, request_client_cert)
        stamp = _stamp(target.files)
        fresh = target.build()

        def adopt() -> None:
            self._target, self._stamp, self._failed, self.current = target, stamp, None, fresh

        return adopt

    def _pick(self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        current = self.current
        chosen = None
        if server_name is not None:
            name = server_name.rstrip(".").lower()
            with contextlib.suppress(TypeError):  # not weak-referenceable: just not recorded
                _REQUESTED_SNI[ssl_object] = name
            chosen = current.by_name.get(name)
            if chosen is None and "." in name:
                chosen = current.by_name.get("*." + name.split(".", 1)[1])
        ssl_object.context = chosen or current.default
        return None

    def refresh(self) -> str | None:
        """Reload when the files changed. Returns None when nothing changed or the new set serves now; else why
        the new files were refused (the previous set keeps serving; the same files are not tried again)."""
        stamp = _stamp(self._target.files)
        if stamp == self._stamp or stamp == self._failed:
            return None
        try:
            fresh = self._target.build()
        except (OSError, ValueError, ssl.SSLError) as exc:
            self._failed = stamp
            return _load_error(exc)
        self.current, self._stamp, self._failed = fresh, stamp, None
        return None


def _load_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or str(exc)).lower().replace("_", " ")
        if "key values mismatch" in reason:
            return "the key does not match its certificate"
        return f"not a PEM certificate chain and key ({reason})"
    if isinstance(exc, OSError):
        return f"{exc.filename or ''}: {(exc.strerror or str(exc)).lower()}".lstrip(": ")
    return str(exc)


def client_context(
    *,
    verify: bool,
    cafile: StrPath | None = None,
    cert_file: StrPath | None = None,
    key_file: StrPath | None = None,
) -> ssl.SSLContext:
    """A client-side context: TLS >= 1.2, no anonymous suites.

    :param verify: ``True``: OpenSSL verifies chain and host name during the handshake (``cafile`` or the
        system store; pass ``server_hostname``). ``False``: CERT_NONE and no host-name check, because the
        delivery path verifies after the handshake from :func:`peer_chain` (DANE needs the raw chain).
        ``server_hostname`` is still sent as SNI either way.
    :param cert_file: optional client certificate chain (with ``key_file``) to present, e.g. to a partner
        connector that checks the sender's certificate.
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    if verify:
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        if cafile is not None:
            ctx.load_verify_locations(cafile=os.fspath(cafile))
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


# -- what the peer presented ---------------------------------------------------------------------


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


# -- name matching (RFC 6125 as RFC 7672 §3.2 narrows it) ----------------------------------------


def normalize_dns_name(name: str) -> str | None:
    """Lower-case A-label form without trailing dot; ``None`` if not a usable DNS name.

    A ``*`` label is kept as is, so presented wildcards survive normalisation.
    """
    name = name.strip().rstrip(".").lower()
    if not name or ".." in name:
        return None
    if name.isascii():
        return name
    labels = name.split(".")
    try:
        return ".".join(
            label if label.isascii() else idna.encode(label, uts46=True).decode("ascii").lower() for label in labels
        )
    except idna.IDNAError:
        return None


def _dns_sans(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(san.get_values_for_type(x509.DNSName))


def _presented_identifiers(cert: x509.Certificate) -> tuple[str, ...]:
    dns = _dns_sans(cert)
    if not dns:  # CN only when there are no DNS-ID SANs (RFC 6125 §6.4.4)
        dns = tuple(str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    out = []
    for presented in dns:
        norm = normalize_dns_name(presented)
        if norm is not None:
            out.append(norm)
    return tuple(out)


def _name_matches(presented: str, reference: str) -> bool:
    if presented == reference:
        return True
    if not presented.startswith("*."):
        return False
    rest = presented[2:]
    # The wildcard is the whole left-most label, and never the only label left of a bare TLD (*.com).
    if "*" in rest or "." not in rest:
        return False
    first, dot, ref_rest = reference.partition(".")
    return bool(first) and bool(dot) and ref_rest == rest


def match_reference_identifiers(cert: x509.Certificate, names: Iterable[str]) -> str | None:
    """The first of ``names`` (reference identifiers, in the caller's order) that ``cert`` is valid for.

    DNS-ID subjectAltNames are used; the subject CN only when the certificate has no DNS SANs. A presented
    wildcard must be the whole left-most label and stands for exactly one label (``*.example.com`` matches
    ``a.example.com``, not ``example.com`` nor ``a.b.example.com``; ``f*.example.com`` matches nothing but
    itself). Comparison is case-insensitive, ignores trailing dots and uses IDNA A-labels. Returns the
    matching name as the caller gave it, or ``None``.
    """
    presented = _presented_identifiers(cert)
    if not presented:
        return None
    for name in names:
        reference = normalize_dns_name(name)
        if reference is None or "*" in reference:
            continue
        if any(_name_matches(p, reference) for p in presented):
            return name
    return None


# -- WebPKI validation ---------------------------------------------------------------------------


class VerifyReason(StrEnum):
    """Why :func:`verify_webpki` said no (callers map these onto TLS-RPT result types)."""

    OK = "ok"
    EXPIRED = "expired"  # certificate-expired
    NOT_YET_VALID = "not_yet_valid"  # validation-failure
    UNTRUSTED = "untrusted"  # certificate-not-trusted
    NAME_MISMATCH = "name_mismatch"  # certificate-host-mismatch
    OTHER = "other"  # validation-failure


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    reason: VerifyReason
    detail: str = ""
    path: tuple[x509.Certificate, ...] = ()  # the validated path, leaf to anchor (when ok)


def system_trust_store_paths() -> tuple[str, ...]:
    """Where the system CA bundle is: OpenSSL's default file (honours SSL_CERT_FILE), else its directory."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and os.path.isfile(candidate):
            return (candidate,)
    for candidate in (paths.capath, paths.openssl_capath):
        if candidate and os.path.isdir(candidate):
            return (candidate,)
    return ()


_STORE_CACHE: dict[tuple[tuple[str, int, int], ...], tuple[int, verification.Store]] = {}


def _pem_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        # c_rehash directories hold each certificate under its name and as <hash>.N links: load the named
        # files only; duplicates are dropped below anyway.
        return sorted(f for f in p.iterdir() if f.suffix in (".pem", ".crt") and f.is_file())
    return [p]


def _load_pem_bundle(data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        pass
    certs = []  # one bad block must not lose the rest of the bundle
    marker = b"-----BEGIN CERTIFICATE-----"
    for block in data.split(marker)[1:]:
        try:
            certs.append(x509.load_pem_x509_certificate(marker + block))
        except ValueError:
            continue
    return certs


def _trust_store(paths: Sequence[str]) -> tuple[int, verification.Store | None]:
    """(number of anchors, Store or None without anchors), cached per (path, mtime, size) of each file."""
    files = [f for path in paths for f in _pem_files(path)]
    key = tuple((str(f), st.st_mtime_ns, st.st_size) for f in files if (st := f.stat()))
    cached = _STORE_CACHE.get(key)
    if cached is not None:
        return cached
    seen: dict[bytes, x509.Certificate] = {}
    with warnings.catch_warnings():
        # System bundles still carry a root or two with a non-positive serial (cryptography warns on load).
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        for f in files:
            for cert in _load_pem_bundle(f.read_bytes()):
                seen.setdefault(cert_der(cert), cert)
    if not seen:
        return 0, None
    if len(_STORE_CACHE) > 16:
        _STORE_CACHE.clear()
    _STORE_CACHE[key] = entry = (len(seen), verification.Store(list(seen.values())))
    return entry


def _subject_for(name: str) -> verification.Subject:
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        pass
    norm = normalize_dns_name(name)
    if norm is None or "*" in norm:
        raise ValueError(f"not a usable host name: {name!r}")
    return x509.DNSName(norm)


def own_subject(leaf: x509.Certificate) -> verification.Subject | None:
    """A subject the leaf is valid for by construction, for chain-only validation (see verify_webpki)."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for dns in san.get_values_for_type(x509.DNSName):
        norm = normalize_dns_name(dns)
        if norm is None:
            continue
        if norm.startswith("*.") and "*" not in norm[2:]:
            norm = "wildcard-probe" + norm[1:]
        if "*" not in norm:
            return x509.DNSName(norm)
    ips = san.get_values_for_type(x509.IPAddress)
    if ips:
        return x509.IPAddress(ips[0])
    return None


def _as_utc(now: datetime) -> datetime:
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def _verify(
    builder: verification.PolicyBuilder,
    subject: verification.Subject,
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
) -> tuple[tuple[x509.Certificate, ...], str]:
    try:
        path = builder.build_server_verifier(subject).verify(leaf, intermediates)
    except verification.VerificationError as exc:
        return (), str(exc)
    return tuple(path), ""


def _leaf_and_anchors(
    chain: Sequence[x509.Certificate], now: datetime, trust_store_paths: Sequence[str] | None, nothing: str
) -> VerifyResult | tuple[x509.Certificate, list[x509.Certificate], verification.Store, datetime]:
    """What both verifiers check first: a leaf within its dates and the trust anchors; else the failure."""
    if not chain:
        return VerifyResult(False, VerifyReason.OTHER, nothing)
    when = _as_utc(now)
    leaf, intermediates = chain[0], list(chain[1:])
    if when > leaf.not_valid_after_utc:
        return VerifyResult(
            False, VerifyReason.EXPIRED, f"certificate expired {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
        )
    if when < leaf.not_valid_before_utc:
        return VerifyResult(
            False,
            VerifyReason.NOT_YET_VALID,
            f"certificate not valid before {leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}",
        )
    paths = system_trust_store_paths() if trust_store_paths is None else tuple(trust_store_paths)
    try:
        _count, store = _trust_store(paths)
    except OSError as exc:
        return VerifyResult(False, VerifyReason.OTHER, f"cannot read trust store: {exc}")
    if store is None:
        return VerifyResult(False, VerifyReason.OTHER, f"no trust anchors in {list(paths)}")
    return leaf, intermediates, store, when


def _client_verifier(store: verification.Store, when: datetime) -> verification.ClientVerifier:
    builder = verification.PolicyBuilder().store(store).time(when)
    policy = getattr(verification, "ExtensionPolicy", None)  # cryptography >= 45
    if policy is not None:  # a certificate named by its CN alone (no subjectAltName) is still a client certificate
        ee = policy.webpki_defaults_ee().may_be_present(
            x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None
        )
        builder = builder.extension_policies(ca_policy=policy.webpki_defaults_ca(), ee_policy=ee)
    return builder.build_client_verifier()


def verify_client_chain(
    chain: Sequence[x509.Certificate], *, now: datetime, trust_store_paths: Sequence[str] | None = None
) -> VerifyResult:
    """Path validation of the chain a client presented (leaf first), after the handshake: the dates, a path to
    an anchor in ``trust_store_paths`` (``None``: the system store) and the clientAuth extended key usage
    (OpenSSL's ``sslclient`` purpose). No name is checked here: the caller compares the names.

    Small (a few signature checks, anchors cached per file): fine on the event loop.
    """
    ready = _leaf_and_anchors(chain, now, trust_store_paths, "no client certificate")
    if isinstance(ready, VerifyResult):
        return ready
    leaf, intermediates, store, when = ready
    try:
        verified = _client_verifier(store, when).verify(leaf, intermediates)
    except verification.VerificationError as exc:
        error = str(exc)
        reason = VerifyReason.EXPIRED if "not valid at validation time" in error else VerifyReason.UNTRUSTED
        return VerifyResult(False, reason, error)
    return VerifyResult(True, VerifyReason.OK, "client certificate verified", tuple(verified.chain))


class ClientCertificateVerifier:
    """:func:`verify_client_chain` for one listener, remembering which leaves verified.

    A resumed TLS session carries the client's leaf but not its intermediates (OpenSSL keeps only the peer
    certificate in a session or ticket), so the chain of a resumed session often cannot be validated again. The
    session itself proves that this process completed a full handshake with that certificate: a leaf that
    verified then is still verified on resumption (its dates checked again). Bounded: the oldest forgotten first.
    """

    def __init__(self, trust_store_paths: Sequence[str] | None, *, max_entries: int = 10_000) -> None:
        self.trust_store_paths = trust_store_paths
        self.max_entries = max_entries
        self._verified: dict[bytes, None] = {}

    def verify(self, chain: Sequence[x509.Certificate], *, now: datetime, resumed: bool = False) -> VerifyResult:
        result = verify_client_chain(chain, now=now, trust_store_paths=self.trust_store_paths)
        if not chain:
            return result
        der = cert_der(chain[0])
        if result.ok:
            self._verified.pop(der, None)
            self._verified[der] = None
            if len(self._verified) > self.max_entries:
                self._verified.pop(next(iter(self._verified)))
            return result
        if resumed and der in self._verified:
            leaf = chain[0]
            if leaf.not_valid_before_utc <= _as_utc(now) <= leaf.not_valid_after_utc:
                return VerifyResult(True, VerifyReason.OK, "client certificate verified in the resumed session")
        return result


def verify_webpki(
    chain: Sequence[x509.Certificate],
    *,
    name: str | None,
    now: datetime,
    trust_store_paths: Sequence[str] | None = None,
) -> VerifyResult:
    """WebPKI path validation of a presented chain (leaf first) with cryptography's verifier.

    :param name: the reference identifier (host name or IP literal). ``None`` means chain-only validation
        (``certificate_validation`` connectors): cryptography only offers a server verifier that needs a
        subject, and its client verifier demands the clientAuth EKU, so the chain is validated for a name the
        leaf itself carries (its first DNS SAN, a wildcard's left label replaced, else its first IP SAN).
        The name then proves nothing, the path does. A leaf without any SAN fails WebPKI either way
        (``OTHER``).
    :param now: the validation time (naive means UTC); injected so tests are exact about expiry.
    :param trust_store_paths: PEM bundle files and/or directories; ``None`` is the system store
        (:func:`system_trust_store_paths`). Anchors are cached per file (path, mtime, size).

    Reasons: an expired (or not yet valid) leaf is ``EXPIRED`` (``NOT_YET_VALID``), checked before anything
    else; a chain that validates for the leaf's own name but not for ``name`` is ``NAME_MISMATCH``; a chain
    that does not validate is ``UNTRUSTED`` (``EXPIRED`` when a presented intermediate is outside its dates).
    """
    ready = _leaf_and_anchors(chain, now, trust_store_paths, "peer presented no certificate")
    if isinstance(ready, VerifyResult):
        return ready
    leaf, intermediates, store, when = ready
    builder = verification.PolicyBuilder().store(store).time(when)

    own = own_subject(leaf)
    if name is not None:
        try:
            subject = _subject_for(name)
        except ValueError as exc:
            return VerifyResult(False, VerifyReason.OTHER, str(exc))
        path, error = _verify(builder, subject, leaf, intermediates)
        if path:
            return VerifyResult(True, VerifyReason.OK, f"valid for {name}", path)
        if own is None:
            return VerifyResult(False, VerifyReason.OTHER, f"leaf has no subjectAltName: {error}")
        if _verify(builder, own, leaf, intermediates)[0]:
            return VerifyResult(False, VerifyReason.NAME_MISMATCH, f"certificate not valid for {name}: {error}")
    else:
        if own is None:
            return VerifyResult(False, VerifyReason.OTHER, "leaf has no subjectAltName")
        path, error = _verify(builder, own, leaf, intermediates)
        if path:
            return VerifyResult(True, VerifyReason.OK, "chain valid (no name checked)", path)
    if "not valid at validation time" in error:  # an intermediate or the anchor is outside its dates
        return VerifyResult(False, VerifyReason.EXPIRED, error)
    for cert in intermediates:
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            return VerifyResult(
                False,
                VerifyReason.EXPIRED,
                f"intermediate {cert.subject.rfc4514_string()} outside its validity: {error}",
            )
    return VerifyResult(False, VerifyReason.UNTRUSTED, error)
