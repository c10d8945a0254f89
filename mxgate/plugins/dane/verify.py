"""Authenticating a presented chain with usable TLSA records (RFC 7671 §5, RFC 7672 §3): DANE-EE matches the
leaf, DANE-TA validates the chain up to the matched anchor (RFC 5280 rules, dates included) and needs a reference
identifier. Pure; the crypto blocks: the plugin runs :func:`verify_chain` in a thread."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import verification

from mxgate import TlsRptResult, match_reference_identifiers, own_subject
from mxgate.plugins.dane.records import Matching, Selector, Tlsa, Usage, record_matches

__all__ = ["DaneCheck", "verify_chain"]


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
