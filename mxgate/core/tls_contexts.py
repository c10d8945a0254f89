"""``ssl.SSLContext`` building with mxgate's floor (TLS >= 1.2, never anonymous or null cipher suites): server
contexts (SNI map, client certificates asked for but never fatal) and client contexts. Part of
:mod:`mxgate.core.tls`, which re-exports the public names; rotating server certificates are in
:mod:`mxgate.core.tls_rotation`."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import ssl
import weakref
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from mxgate.core.tls_names import normalize_dns_name

__all__ = [
    "CIPHERS_TLS12",
    "TlsMode",
    "ask_for_client_certificate",
    "client_context",
    "requested_server_name",
    "server_context",
]

log = logging.getLogger("mxgate.core.tls")

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
    # Resumption stays on (tickets, and the session cache): a resumed handshake is ~4x cheaper (PERF-NOTES). One
    # TLS 1.3 ticket per handshake, not OpenSSL's two: an SMTP client keeps one session per server (Postfix's
    # smtp_tls_session_cache), and each ticket costs the server ~30 us of a ~370 us handshake.
    ctx.options &= ~ssl.OP_NO_TICKET
    ctx.num_tickets = 1
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
    import _ssl

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
