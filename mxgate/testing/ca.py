"""A throw-away certificate authority for tests (ours and plugin authors').

Everything is generated in-process with ``cryptography``; files land in a directory the caller owns (a
pytest ``tmp_path``). ECDSA P-256 keys by default (a full handshake is ~2x cheaper than RSA-2048, see
PERF-NOTES), RSA-2048 on request.

Usage::

    ca = TestCA.create(tmp_path)                           # writes ca.pem / ca.key
    inter = ca.intermediate("mxgate test intermediate")    # a TestCA signed by ca
    leaf = inter.issue(["mx1.secure.test"])                # IssuedCert
    ctx = mxgate.core.tls.server_context(leaf.chain_path, leaf.key_path)
    expired = ca.issue(["old.test"], not_after=datetime.now(UTC) - timedelta(days=1))
    alone = self_signed(tmp_path, ["selfie.test"])

Files of an :class:`IssuedCert` (all PEM):

``cert_path``       the leaf alone
``key_path``        its private key (PKCS#8, unencrypted)
``chain_path``      leaf + intermediates, leaf first: what a server presents (``load_cert_chain`` wants this)
``fullchain_path``  leaf + intermediates + root: for tests that want the root on the wire (e.g. DANE-TA)

Pytest fixtures (via the ``mxgate.testing`` pytest plugin, or ``pytest_plugins = ["mxgate.testing.ca"]``):

``test_ca``     session-scoped root :class:`TestCA` in a temporary directory
``issue_cert``  ``issue_cert(names, **kwargs) -> IssuedCert``, issued by ``test_ca``
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import idna
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "FIXTURES",
    "IssueCert",
    "IssuedCert",
    "KeyType",
    "PrivateKey",
    "TestCA",
    "issue_cert",
    "self_signed",
    "test_ca",
]

# Fixture names the ``mxgate`` pytest plugin (mxgate/testing/pytest_plugin.py) re-exports.
FIXTURES = ("test_ca", "issue_cert")

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
IPLike = ipaddress.IPv4Address | ipaddress.IPv6Address | str

_LEAF_LIFETIME = timedelta(days=30)
_CA_LIFETIME = timedelta(days=3650)
_BACKDATE = timedelta(hours=1)
_CA_BACKDATE = timedelta(days=365)  # so leaves dated in the past (expired ones) still sit inside the CA's window


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"key_type must be 'ec' or 'rsa', not {key_type!r}")


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9.-]+", "-", text.replace("*", "wildcard")).strip("-.")
    return slug[:60] or "cert"


def _a_label(name: str) -> str:
    """DNS name as it goes into a certificate: A-labels, lower case, no trailing dot; ``*.`` kept."""
    name = name.rstrip(".").lower()
    if name.isascii():
        return name
    head, sep, rest = name.partition(".") if name.startswith("*.") else ("", "", name)
    return head + sep + idna.encode(rest, uts46=True).decode("ascii")


def _validity(
    not_before: datetime | None,
    not_after: datetime | None,
    lifetime: timedelta,
    backdate: timedelta = _BACKDATE,
) -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    if not_after is not None and not_after.tzinfo is None:
        not_after = not_after.replace(tzinfo=UTC)
    if not_before is not None and not_before.tzinfo is None:
        not_before = not_before.replace(tzinfo=UTC)
    if not_before is None:
        not_before = now - backdate
        if not_after is not None and not_after <= not_before:
            not_before = not_after - lifetime  # an already-expired certificate still has a sane window
    if not_after is None:
        not_after = max(not_before, now) + lifetime
    if not_after <= not_before:
        raise ValueError(f"not_after ({not_after}) must be later than not_before ({not_before})")
    return not_before, not_after


def _write(path: Path, data: bytes, *, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """A certificate with its key and the PEM files written for it (see the module docstring)."""

    cert: x509.Certificate
    key: PrivateKey
    cert_path: Path
    key_path: Path
    chain_path: Path
    fullchain_path: Path
    intermediates: tuple[x509.Certificate, ...]  # issuer first; empty when issued by a root or self-signed
    root: x509.Certificate  # the trust anchor: the issuing root, or the certificate itself when self-signed

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """What a server presents: leaf first, then the intermediates."""
        return (self.cert, *self.intermediates)

    @property
    def names(self) -> tuple[str, ...]:
        """The DNS names in the subjectAltName (empty without one)."""
        try:
            san = self.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return ()
        return tuple(san.get_values_for_type(x509.DNSName))

    @property
    def files(self) -> tuple[str, str]:
        """``(chain_path, key_path)`` as strings: the pair ``server_context``/``load_cert_chain`` takes."""
        return str(self.chain_path), str(self.key_path)


@dataclass(frozen=True, slots=True)
class TestCA:
    """A root or intermediate CA whose certificate and key live in ``directory``."""

    __test__: ClassVar[bool] = False  # not a pytest test class, despite the name

    name: str
    cert: x509.Certificate
    key: PrivateKey
    directory: Path
    cert_path: Path  # <directory>/ca.pem
    key_path: Path  # <directory>/ca.key
    parent: TestCA | None = field(default=None, repr=False)  # None for a root

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: Path,
        name: str = "mxgate test CA",
        key_type: KeyType = "ec",
        *,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        key_usage: bool = True,
        key_identifiers: bool = True,
    ) -> TestCA:
        """A new self-signed root; writes ``ca.pem`` and ``ca.key`` into ``directory`` (made if missing).

        :param key_usage: ``False`` leaves out keyUsage, and
        :param key_identifiers: ``False`` leaves out subject/authority key identifiers, here and in what this
            CA issues: a private CA as ``openssl req -x509`` makes one without an extensions section. RFC 5280
            path validation (DANE-TA) accepts it; the WebPKI profile does not.
        """
        key = _new_key(key_type)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        start, end = _validity(not_before, not_after, _CA_LIFETIME, _CA_BACKDATE)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        )
        if key_usage:
            builder = builder.add_extension(_ca_key_usage(), critical=True)
        if key_identifiers:
            ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
            builder = builder.add_extension(ski, critical=False).add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
        cert = builder.sign(key, hashes.SHA256())
        return cls._store(directory, name, cert, key, None)

    @classmethod
    def _store(
        cls,
        directory: Path,
        name: str,
        cert: x509.Certificate,
        key: PrivateKey,
        parent: TestCA | None,
    ) -> TestCA:
        directory.mkdir(parents=True, exist_ok=True)
        cert_path = _write(directory / "ca.pem", _cert_pem(cert))
        key_path = _write(directory / "ca.key", _key_pem(key), private=True)
        return cls(name, cert, key, directory, cert_path, key_path, parent)

    def intermediate(
        self,
        name: str = "mxgate test intermediate",
        *,
        key_type: KeyType = "ec",
        directory: Path | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        key_usage: bool = True,
        key_identifiers: bool = True,
    ) -> TestCA:
        """A CA signed by this one; files go to ``directory`` (default: a sub-directory named after it).

        ``key_usage`` and ``key_identifiers`` as for :meth:`create` (an AKI is only written when this CA has a
        subject key identifier)."""
        key = _new_key(key_type)
        start, end = _validity(not_before, not_after, _CA_LIFETIME, _CA_BACKDATE)
        builder = self._builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key, start, end, key_identifiers
        ).add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        if key_usage:
            builder = builder.add_extension(_ca_key_usage(), critical=True)
        cert = builder.sign(self.key, hashes.SHA256())
        return TestCA._store(directory or self.directory / _slug(name), name, cert, key, self)

    # -- properties -------------------------------------------------------------------------------

    @property
    def root(self) -> TestCA:
        ca = self
        while ca.parent is not None:
            ca = ca.parent
        return ca

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        """This CA's certificate and its ancestors', nearest first, root excluded (empty for a root)."""
        out: list[x509.Certificate] = []
        ca: TestCA | None = self
        while ca is not None and ca.parent is not None:
            out.append(ca.cert)
            ca = ca.parent
        return tuple(out)

    # -- issuing ----------------------------------------------------------------------------------

    def issue(
        self,
        names: Sequence[str] = (),
        *,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        key_type: KeyType = "ec",
        client: bool = False,
        ip_addresses: Iterable[IPLike] = (),
        common_name: str | None = None,
        san: bool = True,
        directory: Path | None = None,
        key_identifiers: bool = True,
    ) -> IssuedCert:
        """Issue an end-entity certificate.

        :param names: DNS names (``*.example.com`` allowed; U-labels are converted to A-labels) for the
            subjectAltName; the first is also the subject CN unless ``common_name`` is given.
        :param not_after: a past date gives an expired certificate (``not_before`` then defaults to 30 days
            earlier).
        :param client: also allow TLS client authentication (EKU clientAuth besides serverAuth).
        :param san: ``False`` leaves out the subjectAltName (for CN-fallback tests); names then only reach the
            certificate through ``common_name`` or the first name.
        :param directory: where the files go (default: this CA's directory).
        :param key_identifiers: ``False`` leaves out the subject and authority key identifiers (never written
            either when this CA has no subject key identifier).
        """
        ips = tuple(ipaddress.ip_address(ip) if isinstance(ip, str) else ip for ip in ip_addresses)
        dns = [_a_label(n) for n in names]
        cn = common_name if common_name is not None else (dns[0] if dns else (str(ips[0]) if ips else ""))
        key = _new_key(key_type)
        start, end = _validity(not_before, not_after, _LEAF_LIFETIME)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
        builder = self._builder(subject, key, start, end, key_identifiers)
        builder = _leaf_extensions(builder, key, dns, ips, client=client, san=san, empty_subject=not cn)
        cert = builder.sign(self.key, hashes.SHA256())
        intermediates = self.intermediates
        root = self.root.cert
        return _write_issued(directory or self.directory, cn or "leaf", cert, key, intermediates, root, full=(root,))

    def _builder(
        self, subject: x509.Name, key: PrivateKey, start: datetime, end: datetime, key_identifiers: bool = True
    ) -> x509.CertificateBuilder:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
        )
        try:
            ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            return builder  # a CA without key identifiers issues without them too
        if not key_identifiers:
            return builder
        return builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        ).add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_extensions(
    builder: x509.CertificateBuilder,
    key: PrivateKey,
    dns: Sequence[str],
    ips: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
    *,
    client: bool,
    san: bool,
    empty_subject: bool,
) -> x509.CertificateBuilder:
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=isinstance(key, rsa.RSAPrivateKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    ekus = [ExtendedKeyUsageOID.SERVER_AUTH] + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    builder = (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
    )
    general: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    general += [x509.IPAddress(ip) for ip in ips]
    if san and general:
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=empty_subject)
    return builder


def _write_issued(
    directory: Path,
    label: str,
    cert: x509.Certificate,
    key: PrivateKey,
    intermediates: tuple[x509.Certificate, ...],
    root: x509.Certificate,
    *,
    full: tuple[x509.Certificate, ...],
) -> IssuedCert:
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"{_slug(label)}-{cert.serial_number:x}"[:200]
    return IssuedCert(
        cert=cert,
        key=key,
        cert_path=_write(stem.with_name(stem.name + ".pem"), _cert_pem(cert)),
        key_path=_write(stem.with_name(stem.name + ".key"), _key_pem(key), private=True),
        chain_path=_write(stem.with_name(stem.name + ".chain.pem"), _cert_pem(cert, *intermediates)),
        fullchain_path=_write(stem.with_name(stem.name + ".fullchain.pem"), _cert_pem(cert, *intermediates, *full)),
        intermediates=intermediates,
        root=root,
    )


def self_signed(
    directory: Path,
    names: Sequence[str],
    *,
    key_type: KeyType = "ec",
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    common_name: str | None = None,
    client: bool = False,
) -> IssuedCert:
    """A self-signed end-entity certificate (CA:FALSE) for ``names``; ``root`` is the certificate itself.

    ``chain_path`` and ``fullchain_path`` both hold just the certificate. ``client``: also allow TLS client
    authentication (EKU clientAuth besides serverAuth), as a client certificate would.
    """
    dns = [_a_label(n) for n in names]
    cn = common_name if common_name is not None else (dns[0] if dns else "self-signed")
    key = _new_key(key_type)
    start, end = _validity(not_before, not_after, _LEAF_LIFETIME)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = builder.add_extension(ski, critical=False).add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
    )
    builder = _leaf_extensions(builder, key, dns, (), client=client, san=True, empty_subject=False)
    cert = builder.sign(key, hashes.SHA256())
    return _write_issued(directory, cn, cert, key, (), cert, full=())


# -- pytest fixtures -----------------------------------------------------------------------------


class IssueCert(Protocol):
    """Type of the ``issue_cert`` fixture."""

    def __call__(self, names: Sequence[str] = (), **kwargs: Any) -> IssuedCert: ...


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A root CA shared by the whole test session (ECDSA P-256)."""
    return TestCA.create(tmp_path_factory.mktemp("mxgate-test-ca"))


@pytest.fixture
def issue_cert(test_ca: TestCA, tmp_path: Path) -> IssueCert:
    """Factory: ``issue_cert(["mx.example.test"], not_after=...)`` -> :class:`IssuedCert` from ``test_ca``.

    Files go to the test's ``tmp_path``.
    """

    def _issue(names: Sequence[str] = (), **kwargs: Any) -> IssuedCert:
        kwargs.setdefault("directory", tmp_path)
        return test_ca.issue(names, **kwargs)

    return _issue
