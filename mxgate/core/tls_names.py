"""DNS names in certificates: normalisation and RFC 6125 reference-identifier matching, as RFC 7672 §3.2
narrows it (DANE-TA). Part of :mod:`mxgate.core.tls`, which re-exports the public names."""

from __future__ import annotations

from collections.abc import Iterable

import idna
from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = ["match_reference_identifiers", "normalize_dns_name"]


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
