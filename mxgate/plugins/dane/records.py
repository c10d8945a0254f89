"""TLSA records (RFC 6698 §2.1): parsing, usability for SMTP (RFC 7672 §3.1.3), digest agility (RFC 7671 §9) and
matching a certificate. Pure: no DNS, no sockets."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import dns.rdtypes.tlsabase
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from mxgate import DnsAnswer

__all__ = [
    "Matching",
    "Selector",
    "Tlsa",
    "Usage",
    "association_data",
    "effective_records",
    "make_tlsa",
    "record_matches",
    "records_of",
]


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
        return cert.public_bytes(serialization.Encoding.DER)
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


def records_of(answer: DnsAnswer) -> tuple[Tlsa, ...]:
    """The TLSA records of a lookup's answer (anything that is not TLSA rdata is left out)."""
    out = []
    for rd in answer.records:
        with contextlib.suppress(TypeError):
            out.append(Tlsa.from_rdata(rd))
    return tuple(out)
