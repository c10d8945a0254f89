"""verify_webpki with the test CA, and the test CA itself."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from mxgate.core.tls import VerifyReason, cert_der, spki_der, system_trust_store_paths, verify_webpki
from mxgate.testing.ca import IssueCert, TestCA, self_signed

NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA.create(tmp_path_factory.mktemp("webpki-ca"))


@pytest.fixture(scope="module")
def inter(ca: TestCA) -> TestCA:
    return ca.intermediate("webpki intermediate")


def anchors(ca: TestCA) -> list[str]:
    return [str(ca.root.cert_path)]


def test_good_leaf_from_root(ca: TestCA) -> None:
    leaf = ca.issue(["mx1.secure.test"])
    result = verify_webpki(leaf.chain, name="mx1.secure.test", now=NOW, trust_store_paths=anchors(ca))
    assert result.ok and result.reason is VerifyReason.OK
    assert result.path == (leaf.cert, ca.cert)


def test_good_leaf_through_intermediate(inter: TestCA) -> None:
    leaf = inter.issue(["mx1.secure.test"])
    result = verify_webpki(leaf.chain, name="MX1.secure.test.", now=NOW, trust_store_paths=anchors(inter))
    assert result.ok, result
    assert result.path == (leaf.cert, inter.cert, inter.root.cert)


def test_missing_intermediate_is_untrusted(inter: TestCA) -> None:
    leaf = inter.issue(["mx1.secure.test"])
    result = verify_webpki((leaf.cert,), name="mx1.secure.test", now=NOW, trust_store_paths=anchors(inter))
    assert not result.ok and result.reason is VerifyReason.UNTRUSTED


@pytest.mark.parametrize(("key_usage", "key_identifiers"), [(False, True), (True, False), (False, False)])
def test_webpki_stays_strict_for_private_ca_shapes(tmp_path: Path, key_usage: bool, key_identifiers: bool) -> None:
    """The RFC 5280 leniency of DANE-TA (a CA without keyUsage, certificates without AKI) is not WebPKI's: MTA-STS
    and certificate-validating connectors keep the CA/B profile (RFC 8461 §4.2 "PKIX-validated")."""
    private = TestCA.create(tmp_path / "private", key_usage=key_usage, key_identifiers=key_identifiers)
    leaf = private.issue(["mx1.secure.test"], key_identifiers=key_identifiers)
    assert key_identifiers or not [e for e in leaf.cert.extensions if isinstance(e.value, x509.AuthorityKeyIdentifier)]
    assert key_usage or not [e for e in private.cert.extensions if isinstance(e.value, x509.KeyUsage)]
    result = verify_webpki(leaf.chain, name="mx1.secure.test", now=NOW, trust_store_paths=anchors(private))
    assert not result.ok and result.reason is VerifyReason.UNTRUSTED, result.detail


def test_wildcard_leaf(ca: TestCA) -> None:
    leaf = ca.issue(["*.secure.test"])
    assert verify_webpki(leaf.chain, name="mx.secure.test", now=NOW, trust_store_paths=anchors(ca)).ok
    deep = verify_webpki(leaf.chain, name="a.mx.secure.test", now=NOW, trust_store_paths=anchors(ca))
    assert deep.reason is VerifyReason.NAME_MISMATCH


def test_wrong_name(inter: TestCA) -> None:
    leaf = inter.issue(["mx1.secure.test"])
    result = verify_webpki(leaf.chain, name="mx2.secure.test", now=NOW, trust_store_paths=anchors(inter))
    assert not result.ok
    assert result.reason is VerifyReason.NAME_MISMATCH
    assert "mx2.secure.test" in result.detail


def test_expired_leaf_with_injected_clock(ca: TestCA) -> None:
    leaf = ca.issue(["mx1.secure.test"])  # valid for 30 days
    later = NOW + timedelta(days=31)
    result = verify_webpki(leaf.chain, name="mx1.secure.test", now=later, trust_store_paths=anchors(ca))
    assert result.reason is VerifyReason.EXPIRED
    # expiry wins over a wrong name and an unknown CA: it is checked first
    other = verify_webpki(leaf.chain, name="nope.test", now=later, trust_store_paths=anchors(ca))
    assert other.reason is VerifyReason.EXPIRED


def test_expired_certificate_from_the_ca(ca: TestCA) -> None:
    leaf = ca.issue(["old.secure.test"], not_after=NOW - timedelta(days=1))
    assert leaf.cert.not_valid_before_utc < leaf.cert.not_valid_after_utc < NOW
    result = verify_webpki(leaf.chain, name="old.secure.test", now=NOW, trust_store_paths=anchors(ca))
    assert result.reason is VerifyReason.EXPIRED
    # and valid at a time inside its window (naive datetimes mean UTC)
    inside = (NOW - timedelta(days=2)).replace(tzinfo=None)
    assert verify_webpki(leaf.chain, name="old.secure.test", now=inside, trust_store_paths=anchors(ca)).ok


def test_not_yet_valid(ca: TestCA) -> None:
    leaf = ca.issue(["soon.secure.test"], not_before=NOW + timedelta(days=1))
    result = verify_webpki(leaf.chain, name="soon.secure.test", now=NOW, trust_store_paths=anchors(ca))
    assert result.reason is VerifyReason.NOT_YET_VALID


def test_expired_intermediate(ca: TestCA) -> None:
    old = ca.intermediate("expired intermediate", not_after=NOW - timedelta(days=1))
    leaf = old.issue(["mx.secure.test"])
    result = verify_webpki(leaf.chain, name="mx.secure.test", now=NOW, trust_store_paths=anchors(ca))
    assert result.reason is VerifyReason.EXPIRED


def test_self_signed_is_untrusted(tmp_path: Path, ca: TestCA) -> None:
    leaf = self_signed(tmp_path, ["selfie.test"])
    assert leaf.root == leaf.cert and leaf.intermediates == ()
    result = verify_webpki(leaf.chain, name="selfie.test", now=NOW, trust_store_paths=anchors(ca))
    assert result.reason is VerifyReason.UNTRUSTED


def test_other_ca_is_untrusted(tmp_path: Path, ca: TestCA) -> None:
    stranger = TestCA.create(tmp_path / "stranger", "stranger CA")
    leaf = stranger.issue(["mx1.secure.test"])
    result = verify_webpki(leaf.chain, name="mx1.secure.test", now=NOW, trust_store_paths=anchors(ca))
    assert result.reason is VerifyReason.UNTRUSTED
    # the system store does not know our CA either
    assert verify_webpki(leaf.chain, name="mx1.secure.test", now=NOW).reason is VerifyReason.UNTRUSTED


def test_chain_only_validation(inter: TestCA, tmp_path: Path) -> None:
    for names in (["mx1.secure.test"], ["*.secure.test"]):
        leaf = inter.issue(names)
        result = verify_webpki(leaf.chain, name=None, now=NOW, trust_store_paths=anchors(inter))
        assert result.ok, result
    ip_only = inter.issue([], ip_addresses=["127.0.0.1"])
    assert verify_webpki(ip_only.chain, name=None, now=NOW, trust_store_paths=anchors(inter)).ok
    stranger = self_signed(tmp_path, ["mx1.secure.test"])
    bad = verify_webpki(stranger.chain, name=None, now=NOW, trust_store_paths=anchors(inter))
    assert bad.reason is VerifyReason.UNTRUSTED


def test_ip_reference_identifier(ca: TestCA) -> None:
    leaf = ca.issue(["mx.secure.test"], ip_addresses=["127.0.0.1", "::1"])
    assert verify_webpki(leaf.chain, name="127.0.0.1", now=NOW, trust_store_paths=anchors(ca)).ok
    assert verify_webpki(leaf.chain, name="[::1]", now=NOW, trust_store_paths=anchors(ca)).ok
    assert (
        verify_webpki(leaf.chain, name="127.0.0.2", now=NOW, trust_store_paths=anchors(ca)).reason
        is VerifyReason.NAME_MISMATCH
    )


def test_leaf_without_san_fails_webpki(ca: TestCA) -> None:
    leaf = ca.issue(["cn-only.secure.test"], san=False)
    result = verify_webpki(leaf.chain, name="cn-only.secure.test", now=NOW, trust_store_paths=anchors(ca))
    assert not result.ok and result.reason is VerifyReason.OTHER


def test_empty_chain_and_bad_inputs(ca: TestCA, tmp_path: Path) -> None:
    leaf = ca.issue(["mx.secure.test"])
    assert verify_webpki((), name="mx.secure.test", now=NOW, trust_store_paths=anchors(ca)).reason is (
        VerifyReason.OTHER
    )
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    assert verify_webpki(leaf.chain, name="mx.secure.test", now=NOW, trust_store_paths=[str(empty)]).reason is (
        VerifyReason.OTHER
    )
    missing = str(tmp_path / "missing.pem")
    assert verify_webpki(leaf.chain, name="mx.secure.test", now=NOW, trust_store_paths=[missing]).reason is (
        VerifyReason.OTHER
    )
    assert verify_webpki(leaf.chain, name="*.secure.test", now=NOW, trust_store_paths=anchors(ca)).reason is (
        VerifyReason.OTHER
    )


def test_trust_store_directory_and_junk(ca: TestCA, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    (store / "ca.crt").write_bytes(ca.cert_path.read_bytes())
    leaf = ca.issue(["mx.secure.test"])
    assert verify_webpki(leaf.chain, name="mx.secure.test", now=NOW, trust_store_paths=[str(store)]).ok
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((store / "junk.pem").read_bytes() + ca.cert_path.read_bytes())
    assert verify_webpki(leaf.chain, name="mx.secure.test", now=NOW, trust_store_paths=[str(bundle)]).ok


def test_system_trust_store_is_found() -> None:
    paths = system_trust_store_paths()
    assert paths, "no system CA bundle on this machine"


# -- the test CA ------------------------------------------------------------------------------------------


def test_ca_files_and_chain(test_ca: TestCA, tmp_path: Path) -> None:
    assert test_ca.cert_path.name == "ca.pem" and test_ca.key_path.name == "ca.key"
    assert isinstance(test_ca.key, ec.EllipticCurvePrivateKey)
    assert test_ca.root is test_ca and test_ca.intermediates == ()
    inter = test_ca.intermediate("inter for files", directory=tmp_path / "inter")
    assert inter.root is test_ca and inter.intermediates == (inter.cert,)
    assert (tmp_path / "inter" / "ca.pem").exists()
    leaf = inter.issue(["mx.files.test"], directory=tmp_path)
    assert leaf.intermediates == (inter.cert,) and leaf.root == test_ca.cert
    assert x509.load_pem_x509_certificates(leaf.cert_path.read_bytes()) == [leaf.cert]
    assert x509.load_pem_x509_certificates(leaf.chain_path.read_bytes()) == [leaf.cert, inter.cert]
    assert x509.load_pem_x509_certificates(leaf.fullchain_path.read_bytes()) == [
        leaf.cert,
        inter.cert,
        test_ca.cert,
    ]
    assert leaf.key_path.stat().st_mode & 0o077 == 0
    assert leaf.names == ("mx.files.test",)
    assert leaf.files == (str(leaf.chain_path), str(leaf.key_path))


def test_issue_options(issue_cert: IssueCert) -> None:
    leaf = issue_cert(["bücher.example", "*.mx.test"], key_type="rsa", client=True, ip_addresses=["::1"])
    assert isinstance(leaf.key, rsa.RSAPrivateKey) and leaf.key.key_size == 2048
    assert leaf.names == ("xn--bcher-kva.example", "*.mx.test")
    eku = leaf.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku and ExtendedKeyUsageOID.SERVER_AUTH in eku
    san = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["::1"]
    no_san = issue_cert(["cn.test"], san=False)
    assert no_san.names == ()
    with pytest.raises(x509.ExtensionNotFound):
        no_san.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    with pytest.raises(ValueError, match="key_type"):
        issue_cert(["x.test"], key_type="dsa")
    with pytest.raises(ValueError, match="not_after"):
        issue_cert(["x.test"], not_before=NOW, not_after=NOW - timedelta(days=1))


def test_der_helpers(issue_cert: IssueCert) -> None:
    leaf = issue_cert(["mx.der.test"])
    assert x509.load_der_x509_certificate(cert_der(leaf.cert)) == leaf.cert
    assert spki_der(leaf.cert) == spki_der(x509.load_der_x509_certificate(cert_der(leaf.cert)))
    assert spki_der(leaf.cert)[0] == 0x30 and spki_der(leaf.cert) in cert_der(leaf.cert)
