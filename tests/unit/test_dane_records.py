"""DANE's pure logic: TLSA usability, digest agility, matching, DANE-EE/DANE-TA verification, host policies,
enhanced status codes. No DNS, no sockets (RFC-CHECKLIST items 9-14, 16)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mxgate.core.outcomes import TlsLevel, TlsRptResult
from mxgate.plugins.dane import (
    DANE_STATUS,
    DaneMode,
    HostDane,
    HostState,
    Tlsa,
    dane_status,
    effective_records,
    host_policy,
    make_tlsa,
    record_matches,
    tlsa_for_file,
    verify_chain,
)
from mxgate.testing.ca import IssuedCert, TestCA, self_signed

DATA = Path(__file__).resolve().parents[1] / "data" / "dane"
NOW = datetime.now(UTC)
SHA256 = "ab" * 32
SHA512 = "cd" * 64


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("dane-pki")
    root = TestCA.create(d / "root")
    inter = root.intermediate()
    return {
        "root": root,
        "inter": inter,
        "leaf": inter.issue(["mx1.example.test"], directory=d),
        "wild": inter.issue(["*.example.test"], directory=d),
        "cn_only": inter.issue(["mx1.example.test"], san=False, directory=d),
        "expired": inter.issue(["mx1.example.test"], not_after=NOW - timedelta(days=2), directory=d),
        "other_ca_leaf": TestCA.create(d / "other").issue(["mx1.example.test"], directory=d),
        "self": self_signed(d, ["mx1.example.test"]),
    }


def chain_of(cert: IssuedCert, *, with_root: bool = False) -> tuple:  # type: ignore[type-arg]
    return (*cert.chain, cert.root) if with_root else cert.chain


# -- usability and agility -----------------------------------------------------------------------------------


def _usability_cases() -> list[tuple[str, str | None]]:
    raw = json.loads((DATA / "usability.json").read_text())
    return [(text.format(sha256=SHA256, sha512=SHA512), reason) for text, reason in raw["cases"]]


@pytest.mark.parametrize(("text", "reason"), _usability_cases())
def test_usability_table(text: str, reason: str | None) -> None:
    rec = Tlsa.parse(text)
    if reason is None:
        assert rec.usable, rec.unusable_reason
    else:
        assert not rec.usable
        assert reason in (rec.unusable_reason or "")


def test_full_data_records_need_a_certificate_or_key_rfc6698_2_1_3(pki: dict) -> None:  # type: ignore[type-arg]
    """RFC 6698 §2.1.3/§2.1.2, RFC 7672 §3.1.3: with matching type 0 the data IS the certificate (selector 0) or
    the SubjectPublicKeyInfo (selector 1). Data that is neither makes the record unusable, so a host that
    publishes only such records gets unauthenticated mandatory TLS, not an authentication that always fails."""
    leaf: IssuedCert = pki["leaf"]
    inter = pki["inter"].cert
    good = [make_tlsa(leaf.cert, 3, 0, 0), make_tlsa(leaf.cert, 3, 1, 0), make_tlsa(inter, 2, 0, 0)]
    for rec in good:
        assert rec.usable, rec.unusable_reason
    swapped = [
        Tlsa(3, 0, 0, make_tlsa(leaf.cert, 3, 1, 0).data),  # an SPKI where a certificate belongs
        Tlsa(2, 1, 0, make_tlsa(inter, 2, 0, 0).data),  # a certificate where an SPKI belongs
        Tlsa(3, 1, 0, make_tlsa(leaf.cert, 3, 1, 0).data[:-1]),  # truncated key
        Tlsa(3, 0, 0, make_tlsa(leaf.cert, 3, 0, 0).data + b"\x00"),  # trailing garbage
    ]
    usable, dropped = effective_records([*swapped, good[1]])
    assert usable == (good[1],)
    assert [rec for rec, _ in dropped] == swapped
    assert effective_records(swapped)[0] == ()


def test_parse_and_text_round_trip() -> None:
    rec = Tlsa.parse(f"3 1 1 {SHA256[:10]} {SHA256[10:]}")
    assert rec.params == "3 1 1" and rec.text == f"3 1 1 {SHA256}" and str(rec) == rec.text
    with pytest.raises(ValueError):
        Tlsa.parse("3 1 1")
    with pytest.raises(ValueError):
        Tlsa.parse("3 1 1 zz")


def test_digest_agility_prefers_sha512_per_usage_and_selector(pki: dict) -> None:  # type: ignore[type-arg]
    r311, r312 = Tlsa.parse(f"3 1 1 {SHA256}"), Tlsa.parse(f"3 1 2 {SHA512}")
    r301 = Tlsa.parse(f"3 0 1 {SHA256}")  # another selector: its own agility group
    r211 = Tlsa.parse(f"2 1 1 {SHA256}")
    r310 = make_tlsa(pki["leaf"].cert, 3, 1, 0)  # full data: never subject to agility
    used, dropped = effective_records([r311, r312, r301, r211, r310, Tlsa.parse(f"1 1 1 {SHA256}")])
    assert set(used) == {r312, r301, r211, r310}
    reasons = dict((r.text, why) for r, why in dropped)
    assert "stronger digest" in reasons[r311.text]
    assert "not used for SMTP" in reasons[f"1 1 1 {SHA256}"]


def test_only_pkix_usages_leave_nothing_usable() -> None:
    used, dropped = effective_records([Tlsa.parse(f"0 0 1 {SHA256}"), Tlsa.parse(f"1 1 1 {SHA256}")])
    assert used == () and len(dropped) == 2


# -- matching ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("selector", "mtype"), [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)])
def test_make_tlsa_matches_its_certificate_only(pki: dict, selector: int, mtype: int) -> None:  # type: ignore[type-arg]
    leaf, other = pki["leaf"], pki["other_ca_leaf"]
    rec = make_tlsa(leaf.cert, 3, selector, mtype)
    assert rec.usable
    assert record_matches(rec, leaf.cert)
    assert not record_matches(rec, other.cert)


def test_spki_selector_survives_reissue_with_same_key(pki: dict) -> None:  # type: ignore[type-arg]
    leaf: IssuedCert = pki["leaf"]
    spki = leaf.cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert make_tlsa(leaf.cert, 3, 1, 0).data == spki


# -- DANE-EE -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", ["3 1 1", "3 1 2", "3 0 1", "3 0 2", "3 0 0"])
def test_dane_ee_matches_leaf(pki: dict, params: str) -> None:  # type: ignore[type-arg]
    leaf: IssuedCert = pki["leaf"]
    usage, selector, mtype = (int(x) for x in params.split())
    check = verify_chain(leaf.chain, [make_tlsa(leaf.cert, usage, selector, mtype)], ["nothing.test"], NOW)
    assert check.ok and check.matched is not None and check.matched.params == params


def test_dane_ee_ignores_names_dates_and_issuer(pki: dict) -> None:  # type: ignore[type-arg]
    for name in ("expired", "self", "other_ca_leaf"):
        cert: IssuedCert = pki[name]
        check = verify_chain(cert.chain, [make_tlsa(cert.cert)], ["unrelated.test"], NOW)
        assert check.ok, (name, check.detail)


def test_wrong_digest_is_tlsa_invalid(pki: dict) -> None:  # type: ignore[type-arg]
    leaf: IssuedCert = pki["leaf"]
    check = verify_chain(leaf.chain, [Tlsa.parse(f"3 1 1 {SHA256}")], ["mx1.example.test"], NOW)
    assert not check.ok and check.result_type is TlsRptResult.TLSA_INVALID


def test_any_matching_record_authenticates(pki: dict) -> None:  # type: ignore[type-arg]
    leaf: IssuedCert = pki["leaf"]
    records = [Tlsa.parse(f"3 1 1 {SHA256}"), make_tlsa(leaf.cert, 3, 0, 1)]
    assert verify_chain(leaf.chain, records, [], NOW).ok


def test_no_certificate_fails(pki: dict) -> None:  # type: ignore[type-arg]
    check = verify_chain((), [make_tlsa(pki["leaf"].cert)], [], NOW)
    assert not check.ok and check.result_type is TlsRptResult.VALIDATION_FAILURE


# -- DANE-TA -------------------------------------------------------------------------------------------------


def test_dane_ta_intermediate_in_chain(pki: dict) -> None:  # type: ignore[type-arg]
    leaf: IssuedCert = pki["leaf"]
    rec = make_tlsa(pki["inter"].cert, 2, 0, 1)
    check = verify_chain(leaf.chain, [rec], ["mx1.example.test"], NOW)
    assert check.ok and check.name == "mx1.example.test" and check.matched == rec


def test_dane_ta_root_must_be_presented(pki: dict) -> None:  # type: ignore[type-arg]
    leaf: IssuedCert = pki["leaf"]
    rec = make_tlsa(pki["root"].cert, 2, 1, 1)
    assert verify_chain(chain_of(leaf, with_root=True), [rec], ["mx1.example.test"], NOW).ok
    check = verify_chain(leaf.chain, [rec], ["mx1.example.test"], NOW)
    assert not check.ok and check.result_type is TlsRptResult.TLSA_INVALID


def test_dane_ta_name_mismatch_while_dane_ee_passes(pki: dict) -> None:  # type: ignore[type-arg]
    leaf: IssuedCert = pki["leaf"]
    ta = verify_chain(leaf.chain, [make_tlsa(pki["inter"].cert, 2, 0, 1)], ["mx2.example.test"], NOW)
    assert not ta.ok and ta.result_type is TlsRptResult.CERTIFICATE_HOST_MISMATCH
    ee = verify_chain(leaf.chain, [make_tlsa(leaf.cert, 3, 1, 1)], ["mx2.example.test"], NOW)
    assert ee.ok


def test_dane_ta_checks_dates(pki: dict) -> None:  # type: ignore[type-arg]
    expired: IssuedCert = pki["expired"]
    check = verify_chain(expired.chain, [make_tlsa(pki["inter"].cert, 2, 0, 1)], ["mx1.example.test"], NOW)
    assert not check.ok and check.result_type is TlsRptResult.CERTIFICATE_EXPIRED


def test_dane_ta_wrong_issuer_fails(pki: dict) -> None:  # type: ignore[type-arg]
    other: IssuedCert = pki["other_ca_leaf"]
    forged = (other.cert, pki["inter"].cert)  # presents our intermediate, but the leaf is not issued by it
    check = verify_chain(forged, [make_tlsa(pki["inter"].cert, 2, 0, 1)], ["mx1.example.test"], NOW)
    assert not check.ok and check.result_type is TlsRptResult.VALIDATION_FAILURE


def test_dane_ta_matching_only_the_leaf_does_not_count(pki: dict) -> None:  # type: ignore[type-arg]
    leaf: IssuedCert = pki["self"]
    check = verify_chain(leaf.chain, [make_tlsa(leaf.cert, 2, 0, 1)], ["mx1.example.test"], NOW)
    assert not check.ok and check.result_type is TlsRptResult.TLSA_INVALID


@pytest.mark.parametrize(
    ("names", "ok"),
    [
        (["mx1.example.test"], True),
        (["a.mx1.example.test"], False),  # wildcard: exactly one label
        (["example.test"], False),
        (["nope.test", "mx7.example.test"], True),
    ],
)
def test_dane_ta_wildcard_is_one_left_label(pki: dict, names: list[str], ok: bool) -> None:  # type: ignore[type-arg]
    wild: IssuedCert = pki["wild"]
    check = verify_chain(wild.chain, [make_tlsa(pki["inter"].cert, 2, 0, 1)], names, NOW)
    assert check.ok is ok


def test_dane_ta_cn_only_leaf(pki: dict) -> None:  # type: ignore[type-arg]
    cn_only: IssuedCert = pki["cn_only"]
    rec = make_tlsa(pki["inter"].cert, 2, 0, 1)
    assert verify_chain(cn_only.chain, [rec], ["mx1.example.test"], NOW).ok
    bad = verify_chain(cn_only.chain, [rec], ["mx2.example.test"], NOW)
    assert bad.result_type is TlsRptResult.CERTIFICATE_HOST_MISMATCH


def test_dane_ta_bare_public_key_not_in_chain(pki: dict) -> None:  # type: ignore[type-arg]
    leaf: IssuedCert = pki["leaf"]
    rec = make_tlsa(pki["root"].cert, 2, 1, 0)  # the root's full SPKI; the server sends leaf + intermediate only
    check = verify_chain(leaf.chain, [rec], ["mx1.example.test"], NOW)
    assert check.ok, check.detail
    assert not verify_chain(pki["other_ca_leaf"].chain, [rec], ["mx1.example.test"], NOW).ok


def test_dane_ta_full_certificate_not_presented_rfc7671_5_2(pki: dict) -> None:  # type: ignore[type-arg]
    """RFC 7671 §5.2: a ``2 0 0`` record carries the whole trust-anchor certificate, so the server need not send
    it; the presented chain is validated up to the published certificate (dates, signatures, CA flags) and the
    leaf name is checked. A certificate that did not issue the chain anchors nothing."""
    leaf: IssuedCert = pki["leaf"]
    rec = make_tlsa(pki["root"].cert, 2, 0, 0)
    assert leaf.chain == (leaf.cert, pki["inter"].cert)  # the root is not sent
    check = verify_chain(leaf.chain, [rec], ["mx1.example.test"], NOW)
    assert check.ok and check.matched == rec and check.name == "mx1.example.test", check.detail
    direct = verify_chain((leaf.cert,), [make_tlsa(pki["inter"].cert, 2, 0, 0)], ["mx1.example.test"], NOW)
    assert direct.ok, direct.detail  # the server sent the leaf alone; the 2 0 0 intermediate anchors it
    mismatch = verify_chain(leaf.chain, [rec], ["mx2.example.test"], NOW)
    assert mismatch.result_type is TlsRptResult.CERTIFICATE_HOST_MISMATCH
    stranger = verify_chain(pki["other_ca_leaf"].chain, [rec], ["mx1.example.test"], NOW)
    assert not stranger.ok and stranger.result_type is TlsRptResult.TLSA_INVALID
    expired = verify_chain(pki["expired"].chain, [rec], ["mx1.example.test"], NOW)
    assert expired.result_type is TlsRptResult.CERTIFICATE_EXPIRED
    ee_cert = verify_chain(pki["self"].chain, [make_tlsa(pki["self"].cert, 2, 0, 0)], ["mx1.example.test"], NOW)
    assert not ee_cert.ok  # a 2 0 0 that is the leaf itself (not a CA) anchors nothing


@pytest.fixture(scope="module")
def private_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A private CA as ``openssl req -x509`` makes it without an extensions file: no keyUsage, no key identifiers."""
    d = tmp_path_factory.mktemp("dane-private-pki")
    root = TestCA.create(d / "root", key_usage=False, key_identifiers=False)
    inter = root.intermediate(key_usage=False, key_identifiers=False)
    return {
        "root": root,
        "inter": inter,
        "leaf": inter.issue(["mx1.example.test"], directory=d),
        "direct": root.issue(["mx1.example.test"], directory=d),
        "no_aki": pki_without_aki(d),
    }


def pki_without_aki(d: Path) -> IssuedCert:
    """A leaf without AKI/SKI from an otherwise WebPKI-shaped CA (keyUsage present)."""
    return TestCA.create(d / "ku-root").issue(["mx1.example.test"], key_identifiers=False, directory=d)


@pytest.mark.parametrize(
    ("case", "anchor", "with_root"),
    [
        ("leaf", "inter", False),  # intermediate without keyUsage as the anchor
        ("leaf", "root", True),  # root anchor, intermediate without keyUsage and AKI in the path
        ("direct", "root", True),
        ("leaf", "root", False),  # 2 0 0: the root is not sent
    ],
)
def test_dane_ta_uses_rfc5280_not_webpki_rfc7672_3_1_2(
    private_pki: dict,  # type: ignore[type-arg]
    case: str,
    anchor: str,
    with_root: bool,
) -> None:
    """RFC 7672 §3.1.2 / RFC 7671 §5.2: DANE-TA chains are validated with RFC 5280 path semantics, as OpenSSL does
    for Postfix: keyUsage is checked only where present (§4.2.1.3), key identifiers are optional. The WebPKI
    profile (keyUsage and AKI required) is for MTA-STS and certificate-validating connectors only."""
    leaf: IssuedCert = private_pki[case]
    ca: TestCA = private_pki[anchor]
    for params in ((2, 0, 1), (2, 1, 1), (2, 0, 0)):
        rec = make_tlsa(ca.cert, *params)
        check = verify_chain(chain_of(leaf, with_root=with_root), [rec], ["mx1.example.test"], NOW)
        if params != (2, 0, 0) and not with_root and anchor == "root":
            assert check.result_type is TlsRptResult.TLSA_INVALID  # a digest anchor must be presented
            continue
        assert check.ok, (params, check.detail)
        assert check.name == "mx1.example.test"


def test_dane_ta_leaf_without_key_identifiers(private_pki: dict) -> None:  # type: ignore[type-arg]
    """RFC 5280 §4.2.1.1: AKI is a SHOULD for conforming CAs, not a condition of path validation."""
    leaf: IssuedCert = private_pki["no_aki"]
    assert not [e for e in leaf.cert.extensions if isinstance(e.value, x509.AuthorityKeyIdentifier)]
    for rec in (make_tlsa(leaf.root, 2, 0, 1), make_tlsa(leaf.root, 2, 0, 0)):
        check = verify_chain(chain_of(leaf, with_root=True), [rec], ["mx1.example.test"], NOW)
        assert check.ok, check.detail


def _hand_made_ca(d: Path, usage: x509.KeyUsage | None, *, ca: bool = True) -> tuple[x509.Certificate, IssuedCert]:
    """A root with the given keyUsage and basicConstraints cA flag, and a leaf it issued (the test CA always
    makes usable CAs)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hand-made CA")])
    start = NOW - timedelta(days=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    root = builder.sign(key, hashes.SHA256())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx1.example.test")]))
        .issuer_name(name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx1.example.test")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    issued = IssuedCert(leaf, leaf_key, d, d, d, d, (), root)
    return root, issued


@pytest.mark.parametrize(("usage", "ca"), [("signature-only", True), (None, False)])
def test_dane_ta_still_enforces_rfc5280_ca_rules(tmp_path: Path, usage: str | None, ca: bool) -> None:
    """RFC 5280 §4.2.1.3 and §4.2.1.9: a keyUsage that is present must allow keyCertSign, and an issuer must be a
    CA (basicConstraints cA) — with the anchor presented or published in full (2 0 0)."""
    ku = None
    if usage == "signature-only":
        ku = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    root, leaf = _hand_made_ca(tmp_path, ku, ca=ca)
    for rec, chain in ((make_tlsa(root, 2, 0, 1), (leaf.cert, root)), (make_tlsa(root, 2, 0, 0), (leaf.cert,))):
        check = verify_chain(chain, [rec], ["mx1.example.test"], NOW)
        assert not check.ok and check.result_type is not None, check.detail
    good_root, good_leaf = _hand_made_ca(tmp_path, None)
    assert verify_chain((good_leaf.cert,), [make_tlsa(good_root, 2, 0, 0)], ["mx1.example.test"], NOW).ok


# -- host policies and status codes --------------------------------------------------------------------------


def _hd(state: HostState, **kw: object) -> HostDane:
    base = HostDane("mx.example.test", 25, state, "mx.example.test", reference_ids=("mx.example.test",))
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("state", "mode", "level", "usable", "failure"),
    [
        (HostState.DANE, DaneMode.OPPORTUNISTIC, TlsLevel.SECURE, True, None),
        (HostState.DANE, DaneMode.MANDATORY, TlsLevel.SECURE, True, None),
        (HostState.NO_USABLE, DaneMode.OPPORTUNISTIC, TlsLevel.ENCRYPT, True, None),
        (HostState.NO_USABLE, DaneMode.MANDATORY, TlsLevel.SECURE, False, TlsRptResult.TLSA_INVALID),
        (HostState.NO_TLSA, DaneMode.OPPORTUNISTIC, TlsLevel.MAY, True, None),
        (HostState.NO_TLSA, DaneMode.MANDATORY, TlsLevel.SECURE, False, TlsRptResult.DANE_REQUIRED),
        (HostState.INSECURE_HOST, DaneMode.MANDATORY, TlsLevel.SECURE, False, TlsRptResult.DANE_REQUIRED),
    ],
)
def test_host_policy(
    state: HostState, mode: DaneMode, level: TlsLevel, usable: bool, failure: TlsRptResult | None
) -> None:
    hp = host_policy(_hd(state), mode)
    assert (hp.level, hp.usable, hp.failure) == (level, usable, failure)
    # opportunistic DANE has no opinion on a host without secure TLSA: the next policy decides it (RFC 7672 §2.2)
    assert hp.applies is not (state in (HostState.NO_TLSA, HostState.INSECURE_HOST) and mode is DaneMode.OPPORTUNISTIC)
    if state is HostState.DANE:
        assert hp.sni == "mx.example.test" and hp.reference_ids == ("mx.example.test",)


def test_failed_lookup_makes_host_unusable_in_any_mode() -> None:
    hd = _hd(HostState.FAILED, failure=TlsRptResult.DNSSEC_INVALID)
    for mode in (DaneMode.OPPORTUNISTIC, DaneMode.MANDATORY):
        hp = host_policy(hd, mode)
        assert not hp.usable and hp.failure is TlsRptResult.DNSSEC_INVALID


def test_label_follows_mx_security() -> None:
    assert _hd(HostState.DANE).label == "verified"
    assert _hd(HostState.DANE, name_secure=False).label == "trusted"


def test_status_codes() -> None:
    assert DANE_STATUS[TlsRptResult.STARTTLS_NOT_SUPPORTED] == "5.7.321"
    assert DANE_STATUS[TlsRptResult.CERTIFICATE_EXPIRED] == "5.7.322"
    assert DANE_STATUS[TlsRptResult.TLSA_INVALID] == "5.7.323"
    assert DANE_STATUS[TlsRptResult.DNSSEC_INVALID] == "5.7.324"
    assert dane_status(TlsRptResult.DANE_REQUIRED, permanent=False) == "4.7.326"
    assert dane_status(None, permanent=True) == "5.7.5"
    assert len(set(DANE_STATUS.values())) == len(DANE_STATUS)
    sts_only = {TlsRptResult.STS_POLICY_FETCH_ERROR, TlsRptResult.STS_POLICY_INVALID, TlsRptResult.STS_WEBPKI_INVALID}
    assert set(DANE_STATUS) == set(TlsRptResult) - sts_only


def test_tlsa_for_file(pki: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    leaf: IssuedCert = pki["leaf"]
    assert tlsa_for_file(str(leaf.chain_path), 3, 1, 1) == make_tlsa(leaf.cert)
    assert tlsa_for_file(str(leaf.fullchain_path), 2, 0, 1) == make_tlsa(leaf.root, 2, 0, 1)
    with pytest.raises(ValueError, match="needs the chain"):
        tlsa_for_file(str(leaf.cert_path), 2, 0, 1)
