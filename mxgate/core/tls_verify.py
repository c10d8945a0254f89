"""Certificate path validation with an injected clock: WebPKI for servers (:func:`verify_webpki`: MTA-STS,
``certificate_validation`` / ``domain_validation`` connectors) and client certificates after the handshake
(:func:`verify_client_chain`, :class:`ClientCertificateVerifier`). Part of :mod:`mxgate.core.tls`, which
re-exports the public names.

Blocking work: :func:`verify_webpki` may read the system trust store (cached afterwards) and does public-key
operations; call it via ``asyncio.to_thread`` on the event loop's behalf.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509 import verification

from mxgate.core.tls_names import normalize_dns_name
from mxgate.core.tls_peer import cert_der

__all__ = [
    "ClientCertificateVerifier",
    "VerifyReason",
    "VerifyResult",
    "own_subject",
    "system_trust_store_paths",
    "verify_client_chain",
    "verify_webpki",
]


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
