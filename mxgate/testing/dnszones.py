"""The DNS lab's zones: records, the zone key, DNSSEC signing (NSEC with dnspython, NSEC3 here) and deliberate
breakage (:class:`Corruption`). No daemons: :mod:`mxgate.testing.dnslab` serves these zones with nsd and
unbound, and re-exports the public names."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import dns.dnssec
import dns.dnssectypes
import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rdtypes.ANY.DNSKEY
import dns.rdtypes.ANY.RRSIG
import dns.rrset
import dns.zone
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mxgate.core.errors import MxgateError

__all__ = ["LAB_ROOT", "Algorithm", "Corruption", "Denial", "DnsLabError", "LabZone"]

LAB_ROOT = "test"
_NS_IP = "127.0.0.1"
_SOA_MINIMUM = 60  # negative-answer TTL of every lab zone
_DAY = 86400

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class DnsLabError(MxgateError):
    """The lab could not be built or started; the message carries the daemon's own words."""


class Algorithm(StrEnum):
    ECDSA = "ecdsa"  # ECDSAP256SHA256, algorithm 13
    RSA = "rsa"  # RSASHA256, algorithm 8, 2048 bits


class Denial(StrEnum):
    NSEC = "nsec"
    NSEC3 = "nsec3"  # SHA-1, no salt, 0 extra iterations (RFC 9276), no opt-out


class Corruption(StrEnum):
    """Ways to make a signed zone bogus (the parent still publishes a valid DS)."""

    SIGNATURE = "signature"  # every RRSIG except the DNSKEY's has a flipped bit
    EXPIRED = "expired"  # signed 30 days ago, expired 7 days ago (beyond any validator's clock skew)
    NOT_YET_VALID = "not_yet_valid"  # inception 7 days in the future
    MISSING_DNSKEY = "missing_dnskey"  # DNSKEY RRset (and its RRSIG) removed
    MISSING_RRSIG = "missing_rrsig"  # every RRSIG except the DNSKEY's removed


def _abs(name: str) -> dns.name.Name:
    return dns.name.from_text(name, origin=dns.name.root)


@dataclass(slots=True)
class _Record:
    owner: str
    rdtype: str
    rdata: str
    ttl: int


class LabZone:
    """One zone of the lab. Create with :meth:`DnsLab.zone`; add records with :meth:`add`."""

    def __init__(
        self,
        name: str,
        *,
        signed: bool = True,
        algorithm: Algorithm | str = Algorithm.ECDSA,
        delegate_ds: bool | None = None,
        corrupt: Corruption | str | None = None,
        denial: Denial | str = Denial.NSEC,
        ttl: int = 300,
    ) -> None:
        self.origin = _abs(name)
        self.signed = signed
        self.algorithm = Algorithm(algorithm)
        self.delegate_ds = signed if delegate_ds is None else delegate_ds
        self.corrupt = Corruption(corrupt) if corrupt is not None else None
        self.denial = Denial(denial)
        self.ttl = ttl
        if self.delegate_ds and not signed:
            raise DnsLabError(f"{self.name}: an unsigned zone cannot have a DS in its parent")
        if self.corrupt is not None and not signed:
            raise DnsLabError(f"{self.name}: corrupt= needs a signed zone")
        self._records: list[_Record] = []
        self._key: tuple[PrivateKey, dns.rdtypes.ANY.DNSKEY.DNSKEY] | None = None

    @property
    def name(self) -> str:
        """The zone name without trailing dot, e.g. ``"secure.test"``."""
        return self.origin.to_text(omit_final_dot=True)

    def add(self, owner: str, rdtype: str, rdata: str, ttl: int | None = None) -> LabZone:
        """Add one record. Owner ``"@"`` is the apex; names not ending in ``"."`` are relative to the zone."""
        self._records.append(_Record(owner, rdtype.upper(), rdata, self.ttl if ttl is None else ttl))
        return self

    def remove(self, owner: str, rdtype: str | None = None) -> int:
        """Remove records at ``owner`` (of ``rdtype`` if given); returns how many were removed."""
        target = self._owner(owner)
        keep = [
            r
            for r in self._records
            if not (self._owner(r.owner) == target and (rdtype is None or r.rdtype == rdtype.upper()))
        ]
        removed = len(self._records) - len(keep)
        self._records = keep
        return removed

    def _owner(self, owner: str) -> dns.name.Name:
        return self.origin if owner == "@" else dns.name.from_text(owner, origin=self.origin)

    @property
    def key(self) -> tuple[PrivateKey, dns.rdtypes.ANY.DNSKEY.DNSKEY]:
        """The zone's single key (a CSK, flags 257), made on first use and kept across reloads."""
        if self._key is None:
            private: PrivateKey
            if self.algorithm is Algorithm.ECDSA:
                private = ec.generate_private_key(ec.SECP256R1())
                alg = dns.dnssectypes.Algorithm.ECDSAP256SHA256
            else:
                private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
                alg = dns.dnssectypes.Algorithm.RSASHA256
            dnskey = dns.dnssec.make_dnskey(private.public_key(), alg, flags=257)
            self._key = (private, dnskey)
        return self._key

    def ds(self) -> dns.rdata.Rdata:
        """The DS (SHA-256) the parent publishes for this zone."""
        return dns.dnssec.make_ds(self.origin, self.key[1], "SHA256")

    def build(self, delegations: Sequence[tuple[dns.name.Name, dns.rdata.Rdata | None]] = ()) -> dns.zone.Zone:
        """The zone's content, signed as configured. ``delegations``: child zones with their DS (or None)."""
        origin = self.origin
        lines = [
            f"{origin} {self.ttl} IN SOA ns1.{origin} hostmaster.{origin} 1 3600 900 604800 {_SOA_MINIMUM}",
            f"{origin} {self.ttl} IN NS ns1.{origin}",
            f"ns1.{origin} {self.ttl} IN A {_NS_IP}",
        ]
        for child, ds in delegations:
            lines.append(f"{child} {self.ttl} IN NS ns1.{child}")
            lines.append(f"ns1.{child} {self.ttl} IN A {_NS_IP}")
            if ds is not None:
                lines.append(f"{child} {self.ttl} IN DS {ds.to_text()}")
        for r in self._records:
            lines.append(f"{self._owner(r.owner)} {r.ttl} IN {r.rdtype} {r.rdata}")
        try:
            zone = dns.zone.from_text("\n".join(lines) + "\n", origin=origin, relativize=False, check_origin=True)
        except dns.exception.DNSException as exc:
            raise DnsLabError(f"zone {self.name}: {exc}") from exc
        if self.signed:
            self._sign(zone)
        return zone

    def _sign(self, zone: dns.zone.Zone) -> None:
        now = int(time.time())
        inception, expiration = now - 3600, now + 30 * _DAY
        if self.corrupt is Corruption.EXPIRED:
            inception, expiration = now - 30 * _DAY, now - 7 * _DAY
        elif self.corrupt is Corruption.NOT_YET_VALID:
            inception, expiration = now + 7 * _DAY, now + 30 * _DAY
        if self.denial is Denial.NSEC:
            dns.dnssec.sign_zone(zone, keys=[self.key], inception=inception, expiration=expiration, dnskey_ttl=self.ttl)
        else:
            _sign_nsec3(zone, self.key, inception, expiration, self.ttl)
        self._apply_corruption(zone)

    def _apply_corruption(self, zone: dns.zone.Zone) -> None:
        dnskey_t = dns.rdatatype.DNSKEY
        rrsig_t = dns.rdatatype.RRSIG
        if self.corrupt is Corruption.MISSING_DNSKEY:
            zone.delete_rdataset(self.origin, dnskey_t)
            zone.delete_rdataset(self.origin, rrsig_t, covers=dnskey_t)
            return
        if self.corrupt not in (Corruption.SIGNATURE, Corruption.MISSING_RRSIG):
            return
        for name, node in list(zone.nodes.items()):
            for rds in list(node.rdatasets):
                if rds.rdtype != rrsig_t or rds.covers == dnskey_t:
                    continue
                if self.corrupt is Corruption.MISSING_RRSIG:
                    zone.delete_rdataset(name, rrsig_t, covers=rds.covers)
                    continue
                broken = dns.rdataset.Rdataset(rds.rdclass, rrsig_t, rds.covers, rds.ttl)
                for rd in rds:
                    assert isinstance(rd, dns.rdtypes.ANY.RRSIG.RRSIG)
                    sig = bytearray(rd.signature)
                    sig[len(sig) // 2] ^= 0x01
                    broken.add(rd.replace(signature=bytes(sig)), rds.ttl)
                zone.replace_rdataset(name, broken)


def _authoritative_names(zone: dns.zone.Zone) -> tuple[list[dns.name.Name], set[dns.name.Name]]:
    """Names that own authoritative data or are delegation points (plus empty non-terminals), and the cuts."""
    origin = zone.origin
    assert origin is not None
    cuts = {n for n in zone.nodes if n != origin and zone.get_rdataset(n, dns.rdatatype.NS) is not None}
    names: set[dns.name.Name] = set()
    for name in zone.nodes:
        if any(name != cut and name.is_subdomain(cut) for cut in cuts):
            continue  # glue and occluded data
        current = name
        while current != origin and current not in names:
            names.add(current)
            current = current.parent()
    names.add(origin)
    return sorted(names), cuts


def _sign_nsec3(
    zone: dns.zone.Zone,
    key: tuple[PrivateKey, dns.rdtypes.ANY.DNSKEY.DNSKEY],
    inception: int,
    expiration: int,
    dnskey_ttl: int,
) -> None:
    """Sign with an NSEC3 chain (dnspython's ``sign_zone`` only does NSEC): SHA-1, no salt, 0 iterations."""
    origin = zone.origin
    assert origin is not None
    private, dnskey = key
    soa = zone.get_rdataset(origin, dns.rdatatype.SOA)
    assert soa is not None
    denial_ttl = min(soa.ttl, _SOA_MINIMUM)
    in_ = dns.rdataclass.IN
    zone.find_rdataset(origin, dns.rdatatype.DNSKEY, create=True).add(dnskey, dnskey_ttl)
    zone.find_rdataset(origin, dns.rdatatype.NSEC3PARAM, create=True).add(
        dns.rdata.from_text(in_, dns.rdatatype.NSEC3PARAM, "1 0 0 -"), 0
    )
    names, cuts = _authoritative_names(zone)
    hashed: list[tuple[str, list[str]]] = []
    for name in names:
        node = zone.get_node(name)
        types = {rds.rdtype for rds in node.rdatasets} if node is not None else set()
        if name in cuts and dns.rdatatype.DS not in types:
            bitmap = types  # insecure delegation: NS only, no RRSIG
        elif types:
            bitmap = types | {dns.rdatatype.RRSIG}
        else:
            bitmap = set()  # empty non-terminal
        hashed.append((dns.dnssec.nsec3_hash(name, "", 0, 1).lower(), sorted(dns.rdatatype.to_text(t) for t in bitmap)))
    hashed.sort()
    for i, (owner_hash, type_names) in enumerate(hashed):
        next_hash = hashed[(i + 1) % len(hashed)][0]
        rd = dns.rdata.from_text(in_, dns.rdatatype.NSEC3, f"1 0 0 - {next_hash} {' '.join(type_names)}")
        zone.find_rdataset(dns.name.Name([owner_hash.encode()]).concatenate(origin), rd.rdtype, create=True).add(
            rd, denial_ttl
        )
    # sign every authoritative RRset: at cuts only DS; never glue; NSEC3 owners are names of their own
    for name, node in list(zone.nodes.items()):
        if any(name != cut and name.is_subdomain(cut) for cut in cuts):
            continue
        for rds in list(node.rdatasets):
            if rds.rdtype == dns.rdatatype.RRSIG or (name in cuts and rds.rdtype != dns.rdatatype.DS):
                continue
            rrset = dns.rrset.from_rdata_list(name, rds.ttl, list(rds))
            rrsig = dns.dnssec.sign(
                rrset,
                private,
                origin,
                dnskey,
                inception=inception,
                expiration=expiration,
                origin=origin,
            )
            zone.find_rdataset(name, dns.rdatatype.RRSIG, covers=rds.rdtype, create=True).add(rrsig, rds.ttl)
