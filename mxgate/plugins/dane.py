"""Built-in agent: DANE for SMTP (RFC 7672, RFC 7671, RFC 6698), outbound and inbound.

Outbound, per destination (hook ``mxgate_delivery_resolve_tls_policy``), every MX or smart host is examined on
its own (RFC 7672 §2.2.3):

* TLSA is looked up at ``_<port>._tcp.<base>`` only when the host's address records are DNSSEC-secure, judged
  per address RRset: a lookup that failed without a DNSSEC verdict (a dropped AAAA query) never makes the host
  insecure; when every address lookup failed the host is skipped for this attempt. The
  base domain is the CNAME-expanded host name when the (secure) address lookup went through CNAMEs; when that
  name yields no secure TLSA records (insecure records, or a secure or insecure denial) the initial name is tried
  (RFC 7672 §2.2.2, §2.2.3, RFC 7671 §7). An insecure MX RRset does not stop this: the host's own secure
  TLSA records are used, but the nexthop domain is then no reference identifier and a match is "trusted" rather
  than "verified" (RFC 7672 §2.2.1, as Postfix labels it).
* A secure, non-empty TLSA RRset with usable records: TLS is mandatory and authenticated; SNI is the base
  domain. Records exist but none is usable (usages 0/1, unknown parameters, digests of the wrong length): TLS is
  still mandatory, unauthenticated (§3.1.3). Secure or insecure denial, or insecure records: no DANE for that
  host: DANE has no opinion on it (``HostPolicy.applies = False``) and the core lets the next policy decide it
  (MTA-STS under enforce, else the connector). A bogus or failed TLSA lookup: the host is unusable (next MX, or
  defer).
* ``dane = "mandatory"`` on the connector: a host without usable TLSA is unusable (TLS-RPT ``dane-required``),
  and so is a destination whose MX RRset is not DNSSEC-secure (RFC 7672 §2.2.1: a forged MX could name the
  attacker's own host with his own signed TLSA).
* The start-up self-test (:mod:`mxgate.plugins.dnssec`) said the resolver does not validate: opportunistic DANE
  is off, mandatory DANE defers (``dnssec-invalid``). Before it finished, the AD bit of each answer decides.

Verification (hook ``mxgate_delivery_on_tls_verify``, only for policies whose ``source`` is ``"dane"``) runs on
the chain the peer actually presented, on every connection (there is no session cache that could skip it):

* DANE-EE (3): the leaf certificate (selector 0) or its SubjectPublicKeyInfo (selector 1) matches; no name and no
  date checks (RFC 7671 §5.1).
* DANE-TA (2): a certificate of the presented chain above the leaf matches (or, for ``2 1 0``, the top of the
  chain is signed by the published key; for ``2 0 0``, by the published certificate, RFC 7671 §5.2); the chain
  is then validated up to it (dates included) with ``cryptography.x509.verification`` under RFC 5280 rules, not
  the WebPKI profile (keyUsage checked only where present, key identifiers optional), and the leaf must carry a
  reference identifier (RFC 7672 §3.2: DNS-ID SANs, the CN only without them, wildcards only as the whole
  left-most label).
* Digest agility (RFC 7671 §9): per usage and selector only the strongest digest present counts (SHA2-512 over
  SHA2-256); full data (matching type 0) is always used.

Failures always defer. The retry schedule's final DSN uses :data:`DANE_STATUS` (enhanced codes after Exchange
Online's 5.7.321-5.7.325, extended for the other RFC 8460 result types).

Inbound: ``mxgate dane tlsa`` prints the record to publish for a certificate, ``mxgate dane check-inbound HOST``
checks that the published TLSA matches the certificate served, and warns when a next certificate is not yet
published. ``mxgate dane explain DOMAIN [--connect]`` shows the per-MX view (posttls-finger's job).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import ipaddress
import itertools
import json
import logging
import random
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import dns.rdtypes.tlsabase
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import verification

from mxgate.core.hookspecs import hookimpl
from mxgate.core.outcomes import (
    Destination,
    HopHost,
    HostPolicy,
    NextHop,
    PeerVerification,
    PolicyType,
    TlsLevel,
    TlsPolicy,
    TlsRptResult,
)
from mxgate.core.settings import ConfigRegistry, ConnectorSetting
from mxgate.core.tls import (
    cert_der,
    client_context,
    match_reference_identifiers,
    own_subject,
    peer_chain,
)

if TYPE_CHECKING:
    from mxgate.connectors.outbound import OutboundConnector
    from mxgate.core.dns import DnsAnswer, Resolver, SelfTestResult
    from mxgate.core.outcomes import AttemptContext
    from mxgate.core.runtime import Runtime

__all__ = [
    "DANE_MODE",
    "DANE_PRECEDENCE",
    "DANE_STATUS",
    "DaneAnalysis",
    "DaneCheck",
    "DaneMode",
    "DanePlugin",
    "HostDane",
    "HostState",
    "Matching",
    "Selector",
    "Tlsa",
    "Usage",
    "analyse",
    "dane_status",
    "effective_records",
    "examine_host",
    "host_policy",
    "make_tlsa",
    "record_matches",
    "starttls_probe",
    "verify_chain",
]

log = logging.getLogger(__name__)

DANE_MODE = ConnectorSetting(
    "outbound_connector",
    "dane",
    str,
    "opportunistic",
    "DANE (RFC 7672): none | opportunistic (use TLSA where published) | mandatory (no usable TLSA, no delivery).",
    ("none", "opportunistic", "mandatory"),
)

DANE_PRECEDENCE = 300  # RFC 8461 §2: DANE > MTA-STS (200) > connector (100)


class DaneMode(StrEnum):
    NONE = "none"
    OPPORTUNISTIC = "opportunistic"
    MANDATORY = "mandatory"


# Enhanced status codes (RFC 3463) per TLS-RPT result type, for DSNs when the retry schedule runs out (5.x.x) and
# for deferral texts while it runs (4.x.x, see dane_status). 5.7.321-5.7.325 are Exchange Online's DANE codes;
# 5.7.326-5.7.328 are mxgate's extension for the remaining RFC 8460 result types DANE can produce.
DANE_STATUS: dict[TlsRptResult, str] = {
    TlsRptResult.STARTTLS_NOT_SUPPORTED: "5.7.321",
    TlsRptResult.CERTIFICATE_EXPIRED: "5.7.322",
    TlsRptResult.TLSA_INVALID: "5.7.323",
    TlsRptResult.DNSSEC_INVALID: "5.7.324",
    TlsRptResult.CERTIFICATE_HOST_MISMATCH: "5.7.325",
    TlsRptResult.DANE_REQUIRED: "5.7.326",
    TlsRptResult.VALIDATION_FAILURE: "5.7.327",
    TlsRptResult.CERTIFICATE_NOT_TRUSTED: "5.7.328",
}


def dane_status(result: TlsRptResult | None, *, permanent: bool) -> str:
    """The enhanced status code for a DANE failure: ``5.7.3xx`` when giving up, ``4.7.3xx`` while retrying.

    Unknown or missing result types map to ``x.7.5`` (RFC 3463: cryptographic failure)."""
    code = DANE_STATUS.get(result, "5.7.5") if result is not None else "5.7.5"
    return code if permanent else "4" + code[1:]


# ============================================================================================================
# TLSA records: usability, digest agility, matching (pure)
# ============================================================================================================


class Usage(IntEnum):
    PKIX_TA = 0
    PKIX_EE = 1
    DANE_TA = 2
    DANE_EE = 3


class Selector(IntEnum):
    CERT = 0
    SPKI = 1


class Matching(IntEnum):
    FULL = 0
    SHA2_256 = 1
    SHA2_512 = 2


_DIGEST_LENGTH = {Matching.SHA2_256: 32, Matching.SHA2_512: 64}
_DIGEST_STRENGTH = {Matching.SHA2_256: 1, Matching.SHA2_512: 2}
_USAGE_NAMES = {0: "PKIX-TA", 1: "PKIX-EE", 2: "DANE-TA", 3: "DANE-EE"}


@dataclass(frozen=True, slots=True)
class Tlsa:
    """One TLSA record (RFC 6698 §2.1)."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @classmethod
    def parse(cls, text: str) -> Tlsa:
        """``"3 1 1 <hex>"`` (hex may contain spaces)."""
        parts = text.split()
        if len(parts) < 4:
            raise ValueError(f"TLSA record needs usage, selector, matching type and data: {text!r}")
        try:
            return cls(int(parts[0]), int(parts[1]), int(parts[2]), bytes.fromhex("".join(parts[3:])))
        except ValueError as exc:
            raise ValueError(f"bad TLSA record {text!r}: {exc}") from exc

    @classmethod
    def from_rdata(cls, rd: object) -> Tlsa:
        if not isinstance(rd, dns.rdtypes.tlsabase.TLSABase):
            raise TypeError(f"not a TLSA rdata: {type(rd).__name__}")
        return cls(int(rd.usage), int(rd.selector), int(rd.mtype), bytes(rd.cert))

    @property
    def params(self) -> str:
        """``"3 1 1"``: what the outcome record reports as ``matched``."""
        return f"{self.usage} {self.selector} {self.mtype}"

    @property
    def text(self) -> str:
        return f"{self.params} {self.data.hex()}"

    def __str__(self) -> str:
        return self.text

    @property
    def unusable_reason(self) -> str | None:
        """Why this record cannot be used for SMTP (RFC 7672 §3.1.3, RFC 6698 §2.1), or ``None``."""
        if self.usage in (Usage.PKIX_TA, Usage.PKIX_EE):
            return f"usage {self.usage} ({_USAGE_NAMES[self.usage]}) is not used for SMTP (RFC 7672 §3.1.3)"
        if self.usage not in (Usage.DANE_TA, Usage.DANE_EE):
            return f"unknown usage {self.usage}"
        if self.selector not in (Selector.CERT, Selector.SPKI):
            return f"unknown selector {self.selector}"
        if self.mtype not in (Matching.FULL, Matching.SHA2_256, Matching.SHA2_512):
            return f"unknown matching type {self.mtype}"
        want = _DIGEST_LENGTH.get(Matching(self.mtype))
        if want is not None and len(self.data) != want:
            return f"matching type {self.mtype} needs a {want}-byte digest, got {len(self.data)} bytes"
        if not self.data:
            return "empty certificate association data"
        if self.mtype == Matching.FULL:
            return _full_data_problem(self.selector, self.data)
        return None

    @property
    def usable(self) -> bool:
        return self.unusable_reason is None


def _full_data_problem(selector: int, data: bytes) -> str | None:
    """Matching type 0 carries the certificate (selector 0) or the SubjectPublicKeyInfo (selector 1) itself
    (RFC 6698 §2.1.2-2.1.3): data that does not parse as one is unusable, not a record that never matches."""
    try:
        if selector == Selector.CERT:
            x509.load_der_x509_certificate(data)
        else:
            serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        what = "certificate" if selector == Selector.CERT else "public key (SubjectPublicKeyInfo)"
        return f"matching type 0 data is not a DER {what}: {exc}"
    return None


def effective_records(records: Sequence[Tlsa]) -> tuple[tuple[Tlsa, ...], tuple[tuple[Tlsa, str], ...]]:
    """(records used for matching, records set aside with the reason).

    Unusable records are set aside; then digest agility (RFC 7671 §9): for each usage and selector only the
    strongest digest type present is used (SHA2-512 > SHA2-256). Full data (matching type 0) is always used.
    """
    usable: list[Tlsa] = []
    dropped: list[tuple[Tlsa, str]] = []
    for rec in records:
        reason = rec.unusable_reason
        if reason is None:
            usable.append(rec)
        else:
            dropped.append((rec, reason))
    strongest: dict[tuple[int, int], int] = {}
    for rec in usable:
        strength = _DIGEST_STRENGTH.get(Matching(rec.mtype), 0)
        key = (rec.usage, rec.selector)
        strongest[key] = max(strongest.get(key, 0), strength)
    kept: list[Tlsa] = []
    for rec in usable:
        strength = _DIGEST_STRENGTH.get(Matching(rec.mtype), 0)
        if strength == 0 or strength == strongest[(rec.usage, rec.selector)]:
            kept.append(rec)
        else:
            dropped.append((rec, "a stronger digest is published for this usage and selector (RFC 7671 §9)"))
    return tuple(kept), tuple(dropped)


def _selected(cert: x509.Certificate, selector: int) -> bytes:
    if selector == Selector.CERT:
        return cert_der(cert)
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def association_data(cert: x509.Certificate, selector: int, mtype: int) -> bytes:
    """The certificate association data for ``cert`` under ``selector`` and ``mtype``."""
    data = _selected(cert, selector)
    if mtype == Matching.SHA2_256:
        return hashlib.sha256(data).digest()
    if mtype == Matching.SHA2_512:
        return hashlib.sha512(data).digest()
    if mtype == Matching.FULL:
        return data
    raise ValueError(f"unknown matching type {mtype}")


def make_tlsa(cert: x509.Certificate, usage: int = 3, selector: int = 1, mtype: int = 1) -> Tlsa:
    """The TLSA record that publishes ``cert`` (``3 1 1`` by default, the usual choice for SMTP)."""
    return Tlsa(usage, selector, mtype, association_data(cert, selector, mtype))


def record_matches(rec: Tlsa, cert: x509.Certificate) -> bool:
    """Does ``cert`` match the record's selector/matching type/data (usage not considered)?"""
    try:
        return association_data(cert, rec.selector, rec.mtype) == rec.data
    except (ValueError, UnsupportedAlgorithm):
        return False


# ============================================================================================================
# verification of a presented chain (pure; blocking crypto: run it in a thread)
# ============================================================================================================


@dataclass(frozen=True, slots=True)
class DaneCheck:
    """The result of :func:`verify_chain`."""

    ok: bool
    result_type: TlsRptResult | None = None
    matched: Tlsa | None = None
    name: str | None = None  # the reference identifier the leaf matched (DANE-TA)
    detail: str = ""


def _verify_signature(cert: x509.Certificate, key: object) -> None:
    """Raise unless ``cert`` is signed by ``key`` (for ``2 1 0`` trust anchors that are bare keys)."""
    algorithm = cert.signature_hash_algorithm
    if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
        key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algorithm)
    elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
        key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        key.verify(cert.signature, cert.tbs_certificate_bytes)
    else:
        raise InvalidSignature(f"unsupported trust-anchor key type {type(key).__name__}")


def _is_ca(cert: x509.Certificate) -> bool:
    """An issuer under RFC 5280: basicConstraints cA (§4.2.1.9), and keyCertSign when keyUsage is present
    (§4.2.1.3: a CA certificate without keyUsage is fine)."""
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        return False
    try:
        return bool(cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign)
    except x509.ExtensionNotFound:
        return True


def _walk_path(
    path: Sequence[x509.Certificate], anchor: x509.Certificate | None, anchor_key: object, now: datetime
) -> tuple[bool, bool, str]:
    """Minimal path check for what cryptography's server verifier refuses (a leaf without subjectAltName, a
    bare-key anchor): dates, CA flags and signatures from the leaf up to the anchor. (ok, expired, detail)."""
    for cert in path:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return False, True, f"{cert.subject.rfc4514_string()} is outside its validity period"
    for child, parent in itertools.pairwise(path):
        if not _is_ca(parent):
            return False, False, f"{parent.subject.rfc4514_string()} is not a CA"
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
            return False, False, f"{child.subject.rfc4514_string()} not issued by its successor: {exc}"
    top = path[-1]
    try:
        if anchor is not None:
            if not _is_ca(anchor):
                return False, False, "the trust anchor is not a CA"
            top.verify_directly_issued_by(anchor)
        else:
            _verify_signature(top, anchor_key)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        return False, False, f"{top.subject.rfc4514_string()} is not signed by the trust anchor: {exc}"
    return True, False, "chain valid"


_EE_POLICY = verification.ExtensionPolicy.permit_all().require_present(
    x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None
)


def _require_ca(_policy: verification.Policy, _cert: x509.Certificate, bc: x509.BasicConstraints) -> None:
    if not bc.ca:
        raise ValueError("basicConstraints does not say cA")


def _key_cert_sign_if_present(_policy: verification.Policy, _cert: x509.Certificate, ku: x509.KeyUsage | None) -> None:
    if ku is not None and not ku.key_cert_sign:
        raise ValueError("keyUsage present without keyCertSign")


# DANE-TA validates with RFC 5280 semantics, as OpenSSL does for Postfix and Exim, not with the WebPKI profile
# (cryptography's webpki_defaults_ca demands keyUsage and key identifiers): a private CA made without keyUsage or
# AKI/SKI is a valid DANE-TA anchor. Issuers must still be CAs, and a keyUsage that is present must allow
# keyCertSign (§4.2.1.3, §4.2.1.9). WebPKI stays strict where it belongs (core.tls.verify_webpki, MTA-STS).
_CA_POLICY = (
    verification.ExtensionPolicy.permit_all()
    .require_present(x509.BasicConstraints, verification.Criticality.AGNOSTIC, _require_ca)
    .may_be_present(x509.KeyUsage, verification.Criticality.AGNOSTIC, _key_cert_sign_if_present)
)


def _ta_path(chain: Sequence[x509.Certificate], depth: int, now: datetime) -> tuple[bool, bool, str]:
    """Validate ``chain[0]`` up to ``chain[depth]`` as trust anchor. (ok, expired, detail)."""
    leaf, anchor, intermediates = chain[0], chain[depth], list(chain[1:depth])
    subject = own_subject(leaf)
    if subject is None:  # cryptography's server verifier demands a subjectAltName
        return _walk_path([leaf, *intermediates], anchor, None, now)
    builder = (
        verification.PolicyBuilder()
        .store(verification.Store([anchor]))
        .time(now)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
    )
    try:
        builder.build_server_verifier(subject).verify(leaf, intermediates)
    except verification.VerificationError as exc:
        text = str(exc)
        expired = "not valid at validation time" in text or any(
            not c.not_valid_before_utc <= now <= c.not_valid_after_utc for c in [leaf, *intermediates]
        )
        return False, expired, text
    return True, False, "chain valid"


def verify_chain(
    chain: Sequence[x509.Certificate],
    records: Sequence[Tlsa],
    reference_ids: Sequence[str],
    now: datetime,
) -> DaneCheck:
    """Authenticate a presented chain (leaf first) with usable TLSA ``records`` (see :func:`effective_records`).

    Any matching record authenticates the peer (RFC 6698 §4.1). DANE-EE first (no name, no dates), then DANE-TA
    (chain to the matched anchor, dates checked, then a reference identifier). On failure, the result type of
    the most advanced attempt: a matched anchor whose chain or name failed says more than "nothing matched"
    (``tlsa-invalid``).
    """
    when = now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
    if not chain:
        return DaneCheck(False, TlsRptResult.VALIDATION_FAILURE, detail="the peer presented no certificate")
    leaf = chain[0]
    for rec in records:
        if rec.usage == Usage.DANE_EE and record_matches(rec, leaf):
            return DaneCheck(True, matched=rec, detail=f"leaf matches DANE-EE {rec.params}")
    failure: DaneCheck | None = None
    for rec in records:
        if rec.usage != Usage.DANE_TA:
            continue
        anchors = [d for d in range(1, len(chain)) if record_matches(rec, chain[d])]
        for depth in anchors:
            ok, expired, detail = _ta_path(chain, depth, when)
            if not ok:
                rtype = TlsRptResult.CERTIFICATE_EXPIRED if expired else TlsRptResult.VALIDATION_FAILURE
                failure = failure or DaneCheck(
                    False, rtype, rec, detail=f"DANE-TA {rec.params} anchor at depth {depth}: {detail}"
                )
                continue
            check = _name_check(leaf, rec, reference_ids, f"anchor at depth {depth}")
            if check.ok:
                return check
            failure = failure or check
        if not anchors and rec.mtype == Matching.FULL:
            if rec.selector == Selector.SPKI:
                check = _bare_key_anchor(chain, rec, reference_ids, when)
            else:
                check = _full_certificate_anchor(chain, rec, reference_ids, when)
            if check.ok:
                return check
            if check.result_type is not TlsRptResult.TLSA_INVALID:
                failure = failure or check
    if failure is not None:
        return failure
    kinds = ", ".join(sorted({r.params for r in records})) or "none"
    return DaneCheck(
        False,
        TlsRptResult.TLSA_INVALID,
        detail=f"no TLSA record ({kinds}) matches the presented chain of {len(chain)} certificate(s)",
    )


def _name_check(leaf: x509.Certificate, rec: Tlsa, reference_ids: Sequence[str], where: str) -> DaneCheck:
    name = match_reference_identifiers(leaf, reference_ids)
    if name is None:
        return DaneCheck(
            False,
            TlsRptResult.CERTIFICATE_HOST_MISMATCH,
            rec,
            detail=f"DANE-TA {rec.params} ({where}) but the certificate is not valid for any of "
            f"{', '.join(reference_ids) or '(no reference identifiers)'}",
        )
    return DaneCheck(True, matched=rec, name=name, detail=f"chain to DANE-TA {rec.params} ({where}), name {name}")


def _full_certificate_anchor(
    chain: Sequence[x509.Certificate], rec: Tlsa, reference_ids: Sequence[str], now: datetime
) -> DaneCheck:
    """``2 0 0``: the published certificate need not be in the chain (RFC 7671 §5.2); the highest presented
    certificate it issued is the top of the path, validated up to it as if the server had sent it."""
    try:
        anchor = x509.load_der_x509_certificate(rec.data)
    except ValueError as exc:
        return DaneCheck(False, TlsRptResult.TLSA_INVALID, rec, detail=f"2 0 0 data is not a certificate: {exc}")
    for top in range(len(chain) - 1, -1, -1):
        if top == 0 and chain[0] == anchor:
            break  # a DANE-TA record that is the leaf itself anchors nothing
        try:
            chain[top].verify_directly_issued_by(anchor)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        ok, expired, detail = _ta_path((*chain[: top + 1], anchor), top + 1, now)
        if not ok:
            rtype = TlsRptResult.CERTIFICATE_EXPIRED if expired else TlsRptResult.VALIDATION_FAILURE
            return DaneCheck(False, rtype, rec, detail=f"DANE-TA 2 0 0 (not presented): {detail}")
        return _name_check(chain[0], rec, reference_ids, "certificate not presented")
    return DaneCheck(
        False, TlsRptResult.TLSA_INVALID, rec, detail="no presented certificate is issued by the 2 0 0 certificate"
    )


def _bare_key_anchor(
    chain: Sequence[x509.Certificate], rec: Tlsa, reference_ids: Sequence[str], now: datetime
) -> DaneCheck:
    """``2 1 0``: the published key need not be in the chain; some presented certificate must be signed by it."""
    try:
        key = serialization.load_der_public_key(rec.data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        return DaneCheck(False, TlsRptResult.TLSA_INVALID, rec, detail=f"2 1 0 data is not a public key: {exc}")
    for top in range(len(chain) - 1, -1, -1):
        try:
            _verify_signature(chain[top], key)
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            continue
        ok, expired, detail = _walk_path(list(chain[: top + 1]), None, key, now)
        if not ok:
            rtype = TlsRptResult.CERTIFICATE_EXPIRED if expired else TlsRptResult.VALIDATION_FAILURE
            return DaneCheck(False, rtype, rec, detail=f"DANE-TA 2 1 0: {detail}")
        return _name_check(chain[0], rec, reference_ids, "public key")
    return DaneCheck(
        False, TlsRptResult.TLSA_INVALID, rec, detail="no presented certificate is signed by the 2 1 0 key"
    )


# ============================================================================================================
# per-host DANE state from the DNS
# ============================================================================================================


class HostState(StrEnum):
    DANE = "dane"  # secure TLSA with usable records: authenticated TLS required
    NO_USABLE = "no_usable"  # secure TLSA, none usable: TLS required, unauthenticated
    NO_TLSA = "no_tlsa"  # secure or insecure denial, or insecure records: DANE does not apply
    INSECURE_HOST = "insecure_host"  # the address records are not secure: TLSA not looked up
    NOT_APPLICABLE = "not_applicable"  # an IP literal
    FAILED = "failed"  # bogus or failed lookup: the host is unusable


@dataclass(frozen=True, slots=True)
class HostDane:
    """What the DNS says about one host, and the DANE decision for it."""

    host: str
    port: int
    state: HostState
    base_domain: str  # TLSA base domain (and SNI) when TLSA was found, else the host name
    tlsa_name: str | None = None  # the owner looked up last
    tlsa_status: str = ""  # "secure", "insecure", "bogus", ... of that lookup
    records: tuple[Tlsa, ...] = ()  # the whole RRset as published
    usable: tuple[Tlsa, ...] = ()  # what matching uses (after usability and digest agility)
    unusable: tuple[tuple[Tlsa, str], ...] = ()
    reference_ids: tuple[str, ...] = ()  # DANE-TA names: base domain, original name, nexthop (secure MX)
    name_secure: bool = True  # the MX RRset (or the configured name) is secure: "verified", else "trusted"
    failure: TlsRptResult | None = None
    detail: str = ""

    @property
    def label(self) -> str:
        return "verified" if self.name_secure else "trusted"


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def _records(answer: DnsAnswer) -> tuple[Tlsa, ...]:
    out = []
    for rd in answer.records:
        with contextlib.suppress(TypeError):
            out.append(Tlsa.from_rdata(rd))
    return tuple(out)


async def examine_host(resolver: Resolver, host: HopHost, next_hop: NextHop) -> HostDane:
    """Look up and classify the TLSA records of one host of ``next_hop`` (RFC 7672 §2.2)."""
    from mxgate.core.dns import DnssecStatus

    name = host.name.lower().rstrip(".")
    port = host.port
    name_secure = next_hop.mx_secure if next_hop.kind == "mx" else True
    if _is_ip(name):
        return HostDane(name, port, HostState.NOT_APPLICABLE, name, detail="IP literal: no TLSA")
    a, aaaa = await resolver.resolve_addresses(name)
    if a.status is DnssecStatus.BOGUS or aaaa.status is DnssecStatus.BOGUS:
        bad = a if a.status is DnssecStatus.BOGUS else aaaa
        return HostDane(
            name,
            port,
            HostState.FAILED,
            name,
            failure=TlsRptResult.DNSSEC_INVALID,
            detail=f"{bad.rdtype} lookup for {name} is bogus: {bad.error or 'validation failed'}",
        )
    # Per address RRset (RFC-CHECKLIST 38, as Postfix): a lookup that failed without a DNSSEC verdict (timeout,
    # SERVFAIL) says nothing, so it never makes the host insecure. The answered RRsets decide; when none was
    # answered the host is skipped for this attempt. Dropping AAAA queries must not switch DANE off.
    answered = [x for x in (a, aaaa) if not x.is_failure]
    if not answered:
        return HostDane(
            name,
            port,
            HostState.FAILED,
            name,
            name_secure=name_secure,
            detail=f"address lookups for {name} failed ({a.error or a.status}; {aaaa.error or aaaa.status}): "
            "host skipped for this attempt",
        )
    addresses_secure = all(x.is_secure for x in answered) and any(x.exists for x in answered)
    if not (host.secure or addresses_secure):
        return HostDane(
            name,
            port,
            HostState.INSECURE_HOST,
            name,
            name_secure=name_secure,
            detail="address records not DNSSEC-secure: no TLSA lookup",
        )
    found = next((x for x in answered if x.exists), answered[0])
    expanded = found.canonical_name if found.cname_chain and found.is_secure else name
    candidates = [expanded, name] if expanded != name else [name]
    ids: list[str] = list(dict.fromkeys(candidates))
    if next_hop.kind == "mx" and next_hop.mx_secure:
        ids.append(next_hop.destination.domain.lower().rstrip("."))
    reference_ids = tuple(dict.fromkeys(ids))
    last: HostDane | None = None
    for base in candidates:
        owner = f"_{port}._tcp.{base}"
        answer = await resolver.resolve(owner, "TLSA")
        common: dict[str, Any] = {
            "tlsa_name": owner,
            "tlsa_status": str(answer.status),
            "reference_ids": reference_ids,
            "name_secure": name_secure,
        }
        if answer.is_failure:
            why = "bogus" if answer.status is DnssecStatus.BOGUS else "failed"
            return HostDane(
                name,
                port,
                HostState.FAILED,
                base,
                failure=TlsRptResult.DNSSEC_INVALID,
                detail=f"TLSA lookup {owner} {why}: {answer.error or answer.status}",
                **common,
            )
        if answer.exists:
            records = _records(answer)
            if answer.status is not DnssecStatus.SECURE:
                # RFC 7672 §2.2.3: insecure records at the CNAME-expanded name: the initial name is tried next
                last = HostDane(
                    name,
                    port,
                    HostState.NO_TLSA,
                    name,
                    records=records,
                    detail=f"TLSA records at {owner} insecure: ignored",
                    **common,
                )
                continue
            usable, unusable = effective_records(records)
            state = HostState.DANE if usable else HostState.NO_USABLE
            detail = (
                f"{len(usable)} usable TLSA record(s) at {owner}"
                if usable
                else f"TLSA at {owner} but none usable: TLS required, unauthenticated"
            )
            return HostDane(
                name, port, state, base, records=records, usable=usable, unusable=unusable, detail=detail, **common
            )
        last = HostDane(
            name,
            port,
            HostState.NO_TLSA,
            name,
            detail=f"no TLSA at {owner} ({answer.status} {answer.kind})",
            **common,
        )
        # a denial (secure or not) at the CNAME-expanded name: the initial name is tried next (RFC 7672 §2.2.3,
        # as Postfix and mox do); at the initial name it means no DANE for this host
    assert last is not None
    return last


def host_policy(hd: HostDane, mode: DaneMode) -> HostPolicy:
    """The :class:`HostPolicy` for one examined host.

    DANE governs the host (``applies``) when its address records and its TLSA RRset are secure (usable records
    or not), or when a lookup failed (the host is then unusable: never a downgrade because a query went
    unanswered). Otherwise, with opportunistic DANE, DANE has no opinion on this host (``applies=False``) and the
    next policy decides it (MTA-STS, else the connector); with mandatory DANE the host is unusable (RFC 7672 §6),
    and so is any host learnt from an insecure MX RRset (RFC 7672 §2.2.1: Postfix's "non DNSSEC destination")."""
    # TLS-RPT (RFC 8460 §4.4): a tlsa result's policy-domain is the host's TLSA base domain, its policy-string
    # that host's own records (not the destination's, nor every MX host's)
    domain, strings = hd.base_domain, tuple(r.text for r in hd.records)
    if hd.state is HostState.FAILED:
        return HostPolicy(
            TlsLevel.SECURE,
            usable=False,
            failure=hd.failure,
            detail=hd.detail,
            data=hd,
            policy_domain=domain,
            policy_strings=strings,
        )
    if mode is DaneMode.MANDATORY and not hd.name_secure:
        return HostPolicy(
            TlsLevel.SECURE,
            usable=False,
            failure=TlsRptResult.DANE_REQUIRED,
            detail=f"dane = mandatory needs a DNSSEC-secure MX RRset; {hd.host} came from an insecure one",
            data=hd,
            policy_domain=domain,
            policy_strings=strings,
        )
    if hd.state is HostState.DANE:
        return HostPolicy(
            TlsLevel.SECURE,
            sni=hd.base_domain,
            reference_ids=hd.reference_ids,
            detail=hd.detail,
            data=hd,
            policy_domain=domain,
            policy_strings=strings,
        )
    if hd.state is HostState.NO_USABLE:
        if mode is DaneMode.MANDATORY:
            return HostPolicy(
                TlsLevel.SECURE,
                usable=False,
                failure=TlsRptResult.TLSA_INVALID,
                detail=f"{hd.detail}; dane = mandatory needs a usable record",
                data=hd,
                policy_domain=domain,
                policy_strings=strings,
            )
        return HostPolicy(
            TlsLevel.ENCRYPT,
            sni=hd.base_domain,
            detail=hd.detail,
            data=hd,
            policy_domain=domain,
            policy_strings=strings,
        )
    if mode is DaneMode.MANDATORY:
        return HostPolicy(
            TlsLevel.SECURE,
            usable=False,
            failure=TlsRptResult.DANE_REQUIRED,
            detail=f"{hd.detail}; dane = mandatory",
            data=hd,
            policy_domain=domain,
            policy_strings=strings,
        )
    return HostPolicy(TlsLevel.MAY, applies=False, detail=f"DANE does not apply: {hd.detail}", data=hd)


@dataclass(frozen=True, slots=True)
class DaneAnalysis:
    """Everything DANE decided for a destination: per host, and the policy for the core (``None``: no opinion)."""

    mode: DaneMode
    hosts: tuple[HostDane, ...]
    policy: TlsPolicy | None
    detail: str = ""


async def analyse(
    resolver: Resolver,
    destination: Destination,
    next_hop: NextHop,
    *,
    mode: DaneMode,
    self_test: SelfTestResult | None = None,
) -> DaneAnalysis:
    """Examine every host of ``next_hop`` and build the DANE :class:`TlsPolicy` (precedence 300), with a
    :class:`HostPolicy` per host: DANE decides only the hosts it applies to (see :func:`host_policy`)."""
    domain = destination.domain.lower().rstrip(".")

    def policy(**kwargs: Any) -> TlsPolicy:
        return TlsPolicy(
            source="dane",
            policy_type=PolicyType.TLSA,
            policy_domain=domain,
            level=TlsLevel.SECURE,
            precedence=DANE_PRECEDENCE,
            status_codes=DANE_STATUS,
            **kwargs,
        )

    if mode is DaneMode.NONE:
        return DaneAnalysis(mode, (), None, "dane = none")
    if self_test is not None and not self_test.validating:
        why = f"DANE unavailable: {self_test.detail}"
        if mode is DaneMode.MANDATORY:
            return DaneAnalysis(mode, (), policy(failure=TlsRptResult.DNSSEC_INVALID, detail=why), why)
        return DaneAnalysis(mode, (), None, why)
    if mode is DaneMode.MANDATORY and next_hop.kind in ("mx", "implicit_mx") and not next_hop.mx_secure:
        # RFC 7672 §2.2.1: an attacker can forge an insecure MX RRset to name his own host with his own signed
        # TLSA records; mandatory DANE therefore needs the MX RRset itself to be secure (Postfix: dane-only defers
        # a "non DNSSEC destination", 4.7.5).
        what = "MX RRset" if next_hop.kind == "mx" else "MX denial (implicit MX)"
        why = f"dane = mandatory and the {what} of {domain} is not DNSSEC-secure"
        return DaneAnalysis(mode, (), policy(failure=TlsRptResult.DANE_REQUIRED, detail=why), why)
    hosts = tuple(await asyncio.gather(*(examine_host(resolver, h, next_hop) for h in next_hop.hosts)))
    per_host = {hd.host: host_policy(hd, mode) for hd in hosts}
    relevant = [hd for hd in hosts if hd.state in (HostState.DANE, HostState.NO_USABLE, HostState.FAILED)]
    if mode is DaneMode.OPPORTUNISTIC and not relevant:
        return DaneAnalysis(mode, hosts, None, "no host publishes secure TLSA records")
    strings = tuple(dict.fromkeys(r.text for hd in hosts for r in hd.records if hd.state is not HostState.NO_TLSA))
    failure: TlsRptResult | None = None
    detail = ", ".join(f"{hd.host}: {hd.state}" for hd in hosts)
    if mode is DaneMode.MANDATORY and not any(hd.state is HostState.DANE for hd in hosts):
        failed = next((hd for hd in hosts if hd.state is HostState.FAILED), None)
        failure = failed.failure if failed is not None and failed.failure else TlsRptResult.DANE_REQUIRED
        detail = f"dane = mandatory and no host has usable TLSA records ({detail})"
    return DaneAnalysis(
        mode,
        hosts,
        policy(hosts=per_host, policy_strings=strings, failure=failure, detail=detail, data=hosts),
        detail,
    )


# ============================================================================================================
# a STARTTLS probe (for `dane explain --connect` and `dane check-inbound`; delivery uses the core's client)
# ============================================================================================================


@dataclass(frozen=True, slots=True)
class Probe:
    address: str
    port: int
    sni: str | None
    banner: str = ""
    starttls: bool = False
    tls_version: str | None = None
    cipher: str | None = None
    chain: tuple[x509.Certificate, ...] = field(default=(), repr=False)
    error: str | None = None


async def _reply(reader: asyncio.StreamReader) -> list[str]:
    lines: list[str] = []
    for _ in range(200):  # bounded multi-line reply
        raw = await reader.readline()
        if not raw:
            raise ConnectionError("connection closed")
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            return lines
    raise ConnectionError("reply too long")


async def starttls_probe(
    address: str, port: int, *, sni: str | None, helo: str = "mxgate.invalid", timeout: float = 10.0
) -> Probe:
    """Connect, EHLO, STARTTLS with ``sni``, and take the presented chain (no verification here)."""
    writer: asyncio.StreamWriter | None = None
    probe = Probe(address, port, sni)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(address, port)
            banner = await _reply(reader)
            probe = Probe(address, port, sni, banner=banner[-1])
            writer.write(f"EHLO {helo}\r\n".encode())
            ehlo = await _reply(reader)
            offered = any(line[4:].strip().upper() == "STARTTLS" for line in ehlo)
            if not offered:
                writer.write(b"QUIT\r\n")
                return Probe(address, port, sni, banner=banner[-1], error="STARTTLS not offered")
            writer.write(b"STARTTLS\r\n")
            reply = await _reply(reader)
            if not reply[-1].startswith("220"):
                return Probe(address, port, sni, banner[-1], True, error=f"STARTTLS refused: {reply[-1]}")
            await writer.start_tls(client_context(verify=False), server_hostname=sni or None)
            obj = writer.get_extra_info("ssl_object")
            if not isinstance(obj, ssl.SSLObject):
                return Probe(address, port, sni, banner[-1], True, error="no TLS object after the handshake")
            cipher = obj.cipher()
            probe = Probe(
                address, port, sni, banner[-1], True, obj.version(), cipher[0] if cipher else None, peer_chain(obj)
            )
            writer.write(b"QUIT\r\n")
            with contextlib.suppress(Exception):
                await writer.drain()
            return probe
    except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as exc:
        return Probe(address, port, sni, probe.banner, probe.starttls, error=f"{type(exc).__name__}: {exc}")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)


# ============================================================================================================
# the plugin
# ============================================================================================================


# One analysis serves every message to the same destination over the same next hop (same MX answer, same host
# order) with the same resolver self-test result for this long: under load it was one examination of every MX
# host per message (~10% of the delivering process's time in the dane benchmark), while the DNS answers it rests
# on come from the resolver's cache anyway. A TLSA or address record that changes is seen at most this much later
# than its TTL says; the examination (and its dane_tlsa_lookup events) then runs again.
ANALYSIS_REUSE_SECONDS: Final = 1.0
ANALYSIS_REUSE_MAX: Final = 4096  # destinations remembered at once (expired ones are dropped when it is full)


def _mode(connector: OutboundConnector) -> DaneMode:
    return DaneMode(connector.get(DANE_MODE))


class DanePlugin:
    """DANE for SMTP (RFC 7672): TLSA-authenticated delivery, and tools for publishing our own TLSA."""

    name = "dane"
    priority = 40

    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        # (destination, next hop, self-test) -> (good until, analysis): see ANALYSIS_REUSE_SECONDS
        self._recent: dict[tuple[Destination, NextHop, object], tuple[float, DaneAnalysis]] = {}

    @hookimpl
    def mxgate_lifecycle_register_config(self, registry: ConfigRegistry) -> None:
        registry.add_connector_setting(DANE_MODE, owner=self.name)

    @hookimpl
    def mxgate_lifecycle_on_startup(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @hookimpl
    async def mxgate_lifecycle_on_preflight(self, runtime: Runtime) -> list[str]:
        return await preflight_own_tlsa(runtime)

    @hookimpl
    async def mxgate_delivery_resolve_tls_policy(self, destination: Destination, next_hop: NextHop) -> TlsPolicy | None:
        from mxgate.plugins.dnssec import SELF_TEST

        runtime = self.runtime
        if runtime is None or runtime.resolver is None or not next_hop.hosts:
            return None
        mode = _mode(destination.connector)
        if mode is DaneMode.NONE:
            return None
        if mode is DaneMode.OPPORTUNISTIC and all(_is_ip(h.name) for h in next_hop.hosts):
            return None  # smart hosts by IP address: no TLSA to look up, nothing to say (every message asks)
        # Stash.get's default must have the key's type, hence no .get(SELF_TEST, None)
        self_test = runtime.stash[SELF_TEST] if SELF_TEST in runtime.stash else None  # noqa: SIM401
        key = (destination, next_hop, self_test)
        now = asyncio.get_running_loop().time()
        recent = self._recent.get(key)
        if recent is not None and recent[0] > now:
            return recent[1].policy
        analysis = await analyse(runtime.resolver, destination, next_hop, mode=mode, self_test=self_test)
        if len(self._recent) >= ANALYSIS_REUSE_MAX:
            self._recent = {k: v for k, v in self._recent.items() if v[0] > now}
        if len(self._recent) < ANALYSIS_REUSE_MAX:
            self._recent[key] = (now + ANALYSIS_REUSE_SECONDS, analysis)
        for hd in analysis.hosts:
            await runtime.hooks.on_event("dane_tlsa_lookup", state=str(hd.state))
        return analysis.policy

    @hookimpl
    async def mxgate_delivery_on_tls_verify(
        self, attempt: AttemptContext, policy: TlsPolicy, chain: Sequence[x509.Certificate]
    ) -> PeerVerification | None:
        if policy.source != "dane":
            return None
        runtime = self.runtime
        hp = attempt.host_policy if attempt.host_policy is not None else policy.for_host(attempt.host.name)
        hd = hp.data if isinstance(hp.data, HostDane) else None
        now = datetime.fromtimestamp(runtime.clock() if runtime is not None else datetime.now(UTC).timestamp(), UTC)
        if hd is None or hd.state is not HostState.DANE:
            if hd is not None and hd.state is HostState.NO_USABLE:
                return PeerVerification(True, "untrusted", detail="TLSA present but none usable: encrypted only")
            # DANE does not govern this host (the core asks the policy that does): not ours to judge.
            return None
        check = await asyncio.to_thread(verify_chain, tuple(chain), hd.usable, hd.reference_ids, now)
        if runtime is not None:
            await runtime.hooks.on_event(
                "dane_verification",
                result="ok" if check.ok else "failed",
                result_type=str(check.result_type or ""),
                usage=str(check.matched.usage) if check.matched is not None else "",
            )
        if check.ok:
            return PeerVerification(
                True, hd.label, matched=check.matched.params if check.matched else None, detail=check.detail
            )
        return PeerVerification(
            False,
            "untrusted",
            check.result_type,
            matched=check.matched.params if check.matched else None,
            detail=check.detail,
        )

    @hookimpl
    def mxgate_lifecycle_register_commands(self, subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        from mxgate.core.commands import add_config_arg

        p = subparsers.add_parser("dane", help="DANE (RFC 7672): TLSA records to publish, inbound checks, per-MX view")
        sub = p.add_subparsers(dest="dane_command", metavar="ACTION", required=True)

        t = sub.add_parser("tlsa", help="print the TLSA record to publish for a certificate")
        t.add_argument("--cert", required=True, metavar="FILE", help="PEM certificate or chain (leaf first)")
        t.add_argument("--usage", type=int, default=3, choices=(2, 3), help="3 DANE-EE (default) or 2 DANE-TA")
        t.add_argument("--selector", type=int, default=1, choices=(0, 1), help="0 certificate, 1 public key (default)")
        t.add_argument("--matching", type=int, default=1, choices=(0, 1, 2), help="0 full, 1 SHA2-256, 2 SHA2-512")
        t.add_argument("--host", help="print a whole RR for _PORT._tcp.HOST")
        t.add_argument("--port", type=int, default=25)
        t.set_defaults(func=cmd_tlsa)

        c = sub.add_parser("check-inbound", help="does our published TLSA match the certificate we serve?")
        c.add_argument("host", help="our MX host name (the TLSA base domain)")
        c.add_argument("--port", type=int, default=25)
        c.add_argument("--address", help="connect here instead of the host's addresses")
        c.add_argument("--cert", metavar="FILE", help="the certificate we mean to serve (default: listener tls_cert)")
        c.add_argument(
            "--next-cert", metavar="FILE", action="append", default=[], help="next certificate (rollover); repeatable"
        )
        c.add_argument("--json", action="store_true")
        add_config_arg(c)
        c.set_defaults(func=cmd_check_inbound)

        e = sub.add_parser("explain", help="per MX: TLSA records, usability, effective DANE policy (--connect: TLS)")
        e.add_argument("domain")
        e.add_argument("--connect", action="store_true", help="handshake with each MX: chain and matching record")
        e.add_argument("--port", type=int, help="SMTP port (default: the routing connector's mx_port)")
        e.add_argument("--json", action="store_true")
        add_config_arg(e)
        e.set_defaults(func=cmd_explain)


# ============================================================================================================
# commands
# ============================================================================================================


def _load_certs(path: str) -> list[x509.Certificate]:
    data = Path(path).read_bytes()
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = [x509.load_der_x509_certificate(data)]
    if not certs:
        raise ValueError(f"{path}: no certificate")
    return certs


def tlsa_for_file(path: str, usage: int, selector: int, mtype: int) -> Tlsa:
    """The record for a PEM file: DANE-EE publishes the leaf (the first certificate), DANE-TA the last one of the
    chain (the issuing CA the server must then also present)."""
    certs = _load_certs(path)
    if usage == Usage.DANE_TA:
        if len(certs) < 2:
            raise ValueError(f"{path}: DANE-TA (usage 2) needs the chain with its CA certificate, found only a leaf")
        return make_tlsa(certs[-1], usage, selector, mtype)
    return make_tlsa(certs[0], usage, selector, mtype)


def cmd_tlsa(args: argparse.Namespace) -> int:
    try:
        rec = tlsa_for_file(args.cert, args.usage, args.selector, args.matching)
    except (OSError, ValueError) as exc:
        print(f"mxgate: {exc}", file=sys.stderr)
        return 1
    if args.host:
        print(f"_{args.port}._tcp.{args.host.rstrip('.')}. IN TLSA {rec.text}")
    else:
        print(rec.text)
    return 0


def _resolver(args: argparse.Namespace) -> tuple[Any, Resolver]:
    from mxgate.core.commands import load_from_args
    from mxgate.core.dns import resolver_from_config

    config, _plugins = load_from_args(args)
    return config, resolver_from_config(config.dns)


async def _addresses(resolver: Resolver, host: str) -> tuple[str, ...]:
    if _is_ip(host):
        return (host.strip("[]"),)
    a, aaaa = await resolver.resolve_addresses(host)
    out: list[str] = []
    for ans in (aaaa, a):
        if not ans.is_failure and ans.exists:
            out.extend(str(getattr(r, "address", r)) for r in ans.records)
    return tuple(out)


def _covers(records: Sequence[Tlsa], certs: Sequence[x509.Certificate]) -> Tlsa | None:
    """The first record a certificate file (leaf first, then its chain) would satisfy, ignoring names."""
    for rec in records:
        if rec.usage == Usage.DANE_EE and certs and record_matches(rec, certs[0]):
            return rec
        if rec.usage == Usage.DANE_TA and any(record_matches(rec, c) for c in certs[1:]):
            return rec
    return None


async def check_inbound(
    resolver: Resolver,
    host: str,
    port: int,
    *,
    address: str | None = None,
    cert_file: str | None = None,
    next_certs: Sequence[str] = (),
    now: datetime | None = None,
) -> dict[str, Any]:
    """What ``mxgate dane check-inbound`` reports: ``ok``, ``errors``, ``warnings`` and the details."""
    from mxgate.core.dns import DnssecStatus

    host = host.lower().rstrip(".")
    when = now or datetime.now(UTC)
    errors: list[str] = []
    warnings: list[str] = []
    owner = f"_{port}._tcp.{host}"
    answer = await resolver.resolve(owner, "TLSA")
    records = _records(answer)
    usable, unusable = effective_records(records)
    if answer.is_failure:
        errors.append(f"TLSA lookup {owner} failed ({answer.status}): {answer.error}")
    elif not answer.exists:
        errors.append(f"no TLSA records at {owner} ({answer.kind}, {answer.status})")
    elif answer.status is not DnssecStatus.SECURE:
        errors.append(f"TLSA records at {owner} are {answer.status}: senders ignore them (sign the zone)")
    elif not usable:
        errors.append(f"no usable TLSA record at {owner} (senders then only require unauthenticated TLS)")
    for rec, why in unusable:
        warnings.append(f"record {rec.params} set aside: {why}")
    addresses = (address,) if address else await _addresses(resolver, host)
    if not addresses:
        errors.append(f"{host} has no address records")
    served: list[dict[str, Any]] = []
    leaf: x509.Certificate | None = None
    for addr in addresses:
        probe = await starttls_probe(addr, port, sni=host)
        entry: dict[str, Any] = {"address": addr, "error": probe.error, "tls": probe.tls_version}
        if probe.error is None and probe.chain:
            check = verify_chain(probe.chain, usable, (host,), when)
            leaf = leaf or probe.chain[0]
            entry.update(
                subject=probe.chain[0].subject.rfc4514_string(),
                matches=check.ok,
                matched=check.matched.params if check.matched and check.ok else None,
                result_type=str(check.result_type) if check.result_type else None,
                detail=check.detail,
                tlsa_3_1_1=make_tlsa(probe.chain[0]).text,
            )
            if not check.ok and records:
                errors.append(f"{addr}: the served certificate does not match the TLSA records: {check.detail}")
        else:
            errors.append(f"{addr}: {probe.error or 'no certificate presented'}")
        served.append(entry)
    if cert_file:
        try:
            configured = _load_certs(cert_file)
        except (OSError, ValueError) as exc:
            errors.append(f"{cert_file}: {exc}")
        else:
            if leaf is not None and cert_der(configured[0]) != cert_der(leaf):
                warnings.append(f"the served certificate is not the one in {cert_file} (not reloaded yet?)")
            if _covers(usable, configured) is None:
                errors.append(f"{cert_file} is not covered by any usable TLSA record at {owner}")
    pending: list[dict[str, str]] = []
    for path in next_certs:
        try:
            certs = _load_certs(path)
        except (OSError, ValueError) as exc:
            errors.append(f"{path}: {exc}")
            continue
        if _covers(usable, certs) is None:
            template = usable[0] if usable else Tlsa(3, 1, 1, b"")
            usage = template.usage if template.usage == Usage.DANE_EE or len(certs) > 1 else Usage.DANE_EE
            target = certs[0] if usage == Usage.DANE_EE else certs[-1]
            rec = make_tlsa(target, usage, template.selector, template.mtype)
            warnings.append(
                f"next certificate {path} is NOT published yet: add `{owner}. IN TLSA {rec.text}` and wait at "
                f"least twice the TLSA TTL ({answer.ttl}s) before switching"
            )
            pending.append({"file": path, "record": rec.text})
    return {
        "host": host,
        "port": port,
        "tlsa_name": owner,
        "tlsa_status": str(answer.status),
        "tlsa_kind": str(answer.kind),
        "records": [{"record": r.text, "usable": r in usable} for r in records],
        "served": served,
        "next_certificates_unpublished": pending,
        "errors": errors,
        "warnings": warnings,
        "ok": not errors,
    }


async def preflight_own_tlsa(runtime: Runtime) -> list[str]:
    """``mxgate check``: where our MX (``server.hostname``) publishes TLSA records for a listener's port, they are
    signed, usable, and cover the certificate that listener serves (its files). No records: nothing to check."""
    from mxgate.core.dns import DnssecStatus

    config, resolver = runtime.config, runtime.resolver
    if resolver is None:
        return []
    host = config.server.hostname.lower().rstrip(".")
    problems: list[str] = []
    for lc in config.listener:
        if not lc.tls_cert:
            continue
        owner = f"_{lc.port}._tcp.{host}"
        answer = await resolver.resolve(owner, "TLSA")
        if answer.is_failure:
            problems.append(f"TLSA {owner}: lookup failed ({answer.status}): {answer.error}")
            continue
        if not answer.exists:
            continue
        if answer.status is not DnssecStatus.SECURE:
            problems.append(f"TLSA {owner} is {answer.status}: senders ignore it (sign the zone)")
            continue
        usable, _unusable = effective_records(_records(answer))
        cert_file = str(config.path(lc.tls_cert))
        try:
            certs = _load_certs(cert_file)
        except (OSError, ValueError):
            continue  # the core's certificate check names this file
        if not usable:
            problems.append(f"TLSA {owner}: no usable record (senders then only require unauthenticated TLS)")
        elif _covers(usable, certs) is None:
            problems.append(
                f"TLSA {owner} does not cover {cert_file}, which listener {lc.name} serves: DANE senders will defer; "
                f"publish `{owner}. IN TLSA {make_tlsa(certs[0]).text}` (or serve the published key)"
            )
    return problems


def _configured_cert(config: Any) -> str | None:
    for listener in config.listener:
        if listener.tls_cert:
            return str(config.path(listener.tls_cert))
    return None


def cmd_check_inbound(args: argparse.Namespace) -> int:
    config, resolver = _resolver(args)
    report = asyncio.run(
        check_inbound(
            resolver,
            args.host,
            args.port,
            address=args.address,
            cert_file=args.cert or _configured_cert(config),
            next_certs=args.next_cert,
        )
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"TLSA {report['tlsa_name']}: {report['tlsa_kind']}, {report['tlsa_status']}")
        for r in report["records"]:
            print(f"  {'usable  ' if r['usable'] else 'UNUSABLE'} {r['record']}")
        for s in report["served"]:
            state = "matches" if s.get("matches") else "DOES NOT MATCH"
            print(f"  {s['address']}: {s.get('subject', '-')} {state} {s.get('matched') or ''}".rstrip())
        for w in report["warnings"]:
            print(f"warning: {w}")
        for e in report["errors"]:
            print(f"error: {e}")
        print("OK" if report["ok"] else "FAILED")
    return 0 if report["ok"] else 1


def _cert_view(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_after": f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
        "3 1 1": make_tlsa(cert).data.hex(),
        "2 0 1": make_tlsa(cert, 2, 0, 1).data.hex(),
    }


async def explain_dane(
    config: Any, resolver: Resolver, domain: str, *, port: int | None = None, connect: bool = False
) -> dict[str, Any]:
    """The per-MX DANE view of ``domain`` (and, with ``connect``, what each MX presents)."""
    from mxgate.connectors.outbound import OutboundConnector, select_outbound
    from mxgate.core.defaults import mx_next_hop

    domain = domain.lower().rstrip(".")
    connector = select_outbound(config.outbound_connector, domain)
    mode = DaneMode(connector.get(DANE_MODE)) if connector is not None else DaneMode.OPPORTUNISTIC
    mx_port = port or (connector.mx_port if connector is not None else 25)
    destination = Destination(connector or OutboundConnector(name="-", recipient_domains=("*",), use_mx=True), domain)
    next_hop = await mx_next_hop(destination, resolver, mx_port, random.Random(0))
    test = await resolver.self_test(config.dns.self_test_secure, config.dns.self_test_bogus)
    effective = mode if mode is not DaneMode.NONE else DaneMode.OPPORTUNISTIC  # show what DANE would do
    analysis = await analyse(resolver, destination, next_hop, mode=effective, self_test=test)
    policy = analysis.policy
    hosts: list[dict[str, Any]] = []
    for hop, hd in zip(next_hop.hosts, analysis.hosts, strict=False):
        hp = policy.for_host(hd.host) if policy is not None else None
        view: dict[str, Any] = {
            "host": hd.host,
            "preference": hop.preference,
            "addresses": list(hop.addresses),
            "state": str(hd.state),
            "tlsa_name": hd.tlsa_name,
            "tlsa_status": hd.tlsa_status,
            "records": [
                {
                    "record": r.text,
                    "usable": r in hd.usable,
                    "why": dict((x.text, w) for x, w in hd.unusable).get(r.text),
                }
                for r in hd.records
            ],
            "policy": {
                "level": hp.level.name if hp else "connector",
                "usable": hp.usable if hp else True,
                "failure": str(hp.failure) if hp and hp.failure else None,
                "sni": hp.sni if hp else None,
                "reference_ids": list(hd.reference_ids) if hd.state is HostState.DANE else [],
                "label": hd.label if hd.state is HostState.DANE else None,
            },
            "detail": hd.detail,
        }
        if connect and hp is not None and hp.usable and hd.state in (HostState.DANE, HostState.NO_USABLE):
            sessions = []
            for addr in hop.addresses:
                probe = await starttls_probe(addr, hd.port, sni=hp.sni or hd.host)
                session: dict[str, Any] = {
                    "address": addr,
                    "sni": probe.sni,
                    "tls": probe.tls_version,
                    "cipher": probe.cipher,
                    "error": probe.error,
                }
                session["chain"] = [_cert_view(c) for c in probe.chain]
                if probe.chain and hd.state is HostState.DANE:
                    check = verify_chain(probe.chain, hd.usable, hd.reference_ids, datetime.now(UTC))
                    session.update(
                        verified=check.ok,
                        label=hd.label if check.ok else "untrusted",
                        matched=check.matched.params if check.matched else None,
                        matched_record=check.matched.text if check.matched else None,
                        result_type=str(check.result_type) if check.result_type else None,
                        detail=check.detail,
                    )
                sessions.append(session)
            view["sessions"] = sessions
        hosts.append(view)
    return {
        "domain": domain,
        "connector": connector.name if connector is not None else None,
        "dane": str(mode),
        "next_hop": next_hop.kind,
        "mx_secure": next_hop.mx_secure,
        "mx_error": next_hop.error,
        "self_test": {"validating": test.validating, "detail": test.detail},
        "applies": policy is not None and policy.applies,
        "policy_failure": str(policy.failure) if policy is not None and policy.failure else None,
        "detail": analysis.detail,
        "hosts": hosts,
    }


def format_explain(ex: dict[str, Any]) -> str:
    lines = [
        f"{ex['domain']}: connector {ex['connector'] or '-'}, dane = {ex['dane']}, next hop {ex['next_hop']}"
        f" (MX RRset {'secure' if ex['mx_secure'] else 'NOT secure'})",
        f"resolver self-test: {'validating' if ex['self_test']['validating'] else 'NOT validating'}",
        f"DANE policy: {'applies' if ex['applies'] else 'does not apply'}"
        + (f", fails: {ex['policy_failure']}" if ex["policy_failure"] else ""),
    ]
    if ex["mx_error"]:
        lines.append(f"  {ex['mx_error']}")
    for h in ex["hosts"]:
        pol = h["policy"]
        lines.append(f"  {h['preference']:>5} {h['host']} [{', '.join(h['addresses']) or '-'}]: {h['state']}")
        if h["tlsa_name"]:
            lines.append(f"        TLSA {h['tlsa_name']} ({h['tlsa_status']})")
        for r in h["records"]:
            why = f"  ({r['why']})" if r["why"] else ""
            lines.append(f"          {'usable  ' if r['usable'] else 'unusable'} {r['record']}{why}")
        effect = "SKIPPED" if not pol["usable"] else f"TLS level {pol['level']}"
        lines.append(
            f"        policy: {effect}"
            + (f" ({pol['failure']})" if pol["failure"] else "")
            + (f", SNI {pol['sni']}" if pol["sni"] else "")
            + (f", names {', '.join(pol['reference_ids'])}" if pol["reference_ids"] else "")
        )
        lines.append(f"        {h['detail']}")
        for s in h.get("sessions", []):
            lines.append(f"        connect {s['address']} SNI {s['sni']}: {s['error'] or s['tls'] + ' ' + s['cipher']}")
            for depth, c in enumerate(s["chain"]):
                lines.append(f"          {depth} s:{c['subject']} i:{c['issuer']} until {c['not_after']}")
                lines.append(f"            3 1 1 {c['3 1 1']}")
            if "verified" in s:
                by = f" by {s['matched_record']}" if s["matched_record"] else ""
                rtype = f" ({s['result_type']})" if s["result_type"] else ""
                lines.append(f"          => {s['label']}{by}{rtype}: {s['detail']}")
    return "\n".join(lines)


def cmd_explain(args: argparse.Namespace) -> int:
    config, resolver = _resolver(args)
    ex = asyncio.run(explain_dane(config, resolver, args.domain, port=args.port, connect=args.connect))
    print(json.dumps(ex, indent=2) if args.json else format_explain(ex))
    sessions = [s for h in ex["hosts"] for s in h.get("sessions", [])]
    failed = ex["policy_failure"] is not None or any(s.get("verified") is False for s in sessions)
    return 1 if failed else 0
