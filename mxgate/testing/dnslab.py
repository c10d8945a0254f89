"""The DNS lab: signed zones served by nsd, validated by unbound, on loopback — for mxgate's and your tests.

A lab is a private DNS tree under the lab root ``test.`` (reserved by RFC 6761, never on the internet). Zones
are written as text, signed with dnspython (keys made with ``cryptography``), served by **nsd** on a free high
port of 127.0.0.1 and resolved by **unbound**, a validating resolver on another free port whose only trust
anchor is the lab root's DS. Nothing leaves loopback: unbound's root is stubbed to nsd as well.

::

    lab = DnsLab(tmp_path)                                  # "test." root zone, signed, the trust anchor
    z = lab.zone("example.test")                            # signed (ECDSA P-256, NSEC), DS in "test."
    z.add("@", "MX", "10 mx1")                              # names are relative unless they end in "."
    z.add("mx1", "A", "127.0.0.11")
    z.add("_25._tcp.mx1", "TLSA", "3 1 1 " + "ab" * 32)
    lab.zone("rsa.test", algorithm="rsa", denial="nsec3")   # RSA/SHA-256 (alg 8), NSEC3 (SHA-1, 0 iterations)
    lab.zone("plain.test", signed=False)                    # delegated without DS: insecure
    lab.zone("island.test", delegate_ds=False)              # signed, but no DS in the parent: insecure
    lab.zone("bad.test", corrupt="signature")               # "expired", "not_yet_valid", "missing_dnskey",
                                                            # "missing_rrsig": each bogus in its own way
    lab.unreachable("dead.test")                            # delegated to a loopback port nobody serves
    lab.reverse_zone().add("1.0.0", "PTR", "c.example.test.")  # 127.in-addr.arpa, unsigned (PTR of 127.0.0.1)
    with lab.running() as endpoint:                         # unbound's ResolverEndpoint (AD trusted)
        resolver = Resolver([endpoint])
        ...
        z.add("new", "A", "127.0.0.99"); lab.reload()      # re-sign, restart nsd and unbound (empty cache)

:attr:`DnsLab.authoritative` is nsd's endpoint: a "resolver" that never sets AD, for non-validating set-ups.

Pytest fixtures (the ``mxgate`` pytest plugin registers them via ``FIXTURES``; or import them):

``dnslab``
    session-scoped :class:`StandardLab`, already running, with the zones listed on :class:`Std`.
``dnslab_factory``
    function-scoped: ``dnslab_factory(ede=True)`` returns a fresh, empty, not yet started :class:`DnsLab` in
    a temporary directory; every lab it made is stopped at the end of the test.

For unit tests without daemons, :class:`ScriptedDnsServer` is a real UDP DNS server on loopback whose replies
a test scripts (flags, rcode, RFC 8914 extended errors), with :func:`make_reply` to build them.

nsd and unbound must be installed (Debian: ``apt-get install nsd unbound``); when they are missing the
fixtures fail (never skip) with a message that says so.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, cast

import dns.dnssec
import dns.dnssectypes
import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rdtypes.ANY.DNSKEY
import dns.rdtypes.ANY.RRSIG
import dns.rrset
import dns.zone
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mxgate.core.dns import DnssecStatus, Resolver, ResolverEndpoint
from mxgate.core.errors import MxgateError

__all__ = [
    "FIXTURES",
    "LAB_ROOT",
    "Algorithm",
    "Corruption",
    "Denial",
    "DnsLab",
    "DnsLabError",
    "LabZone",
    "ScriptedDnsServer",
    "StandardLab",
    "Std",
    "build_standard_lab",
    "dnslab",
    "dnslab_factory",
    "find_binary",
    "make_reply",
]

#: fixtures re-exported by the ``mxgate`` pytest plugin (mxgate.testing.pytest_plugin)
FIXTURES = ("dnslab", "dnslab_factory")

LAB_ROOT = "test"
_NS_IP = "127.0.0.1"
_SOA_MINIMUM = 60  # negative-answer TTL of every lab zone
_START_TIMEOUT = 10.0  # seconds a daemon gets to answer its first query
_STOP_TIMEOUT = 5.0
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


def find_binary(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin directories (often missing from a user's PATH)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (bounded attempts)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise DnsLabError("no free loopback port for UDP and TCP")


def _abs(name: str) -> dns.name.Name:
    return dns.name.from_text(name, origin=dns.name.root)


# -- zones ---------------------------------------------------------------------------------------------------


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


# -- the lab -------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Daemon:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


class DnsLab:
    """A lab root ``test.``, its zones, and the nsd/unbound pair serving them (see the module docstring)."""

    def __init__(
        self,
        workdir: Path | str,
        *,
        root_algorithm: Algorithm | str = Algorithm.ECDSA,
        ede: bool = True,
        max_rtt_ms: int | None = None,
    ) -> None:
        """``ede=False``: unbound sends no RFC 8914 extended errors (exercises the CD-retry path).

        ``max_rtt_ms``: the longest unbound waits for nsd before it retries, and after a few misses takes the
        zone's server for dead for a minute (``infra-cache-max-rtt``). Every lab zone is served by the one nsd,
        so nsd taken for dead fails the whole lab (SERVFAIL, read as bogus). Default: 300 ms when the lab has a
        dead delegation (:meth:`unreachable`, which must fail fast), else 3,000 ms (on a loaded machine nsd may
        answer after 300 ms and is not dead)."""
        self.ede = ede
        self.max_rtt_ms = max_rtt_ms
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root = LabZone(LAB_ROOT, algorithm=root_algorithm)
        self._zones: dict[dns.name.Name, LabZone] = {self.root.origin: self.root}
        self._unreachable: dict[dns.name.Name, int] = {}
        self._reverse: dict[dns.name.Name, LabZone] = {}
        self._nsd: _Daemon | None = None
        self._unbound: _Daemon | None = None
        self.nsd_port = 0
        self.unbound_port = 0
        self._atexit_registered = False

    # -- building

    def zone(
        self,
        name: str,
        *,
        signed: bool = True,
        algorithm: Algorithm | str = Algorithm.ECDSA,
        delegate_ds: bool | None = None,
        corrupt: Corruption | str | None = None,
        denial: Denial | str = Denial.NSEC,
        ttl: int = 300,
    ) -> LabZone:
        """Create a zone below the lab root, delegated from its closest lab parent (with DS when signed)."""
        z = LabZone(
            name,
            signed=signed,
            algorithm=algorithm,
            delegate_ds=delegate_ds,
            corrupt=corrupt,
            denial=denial,
            ttl=ttl,
        )
        self._check_new(z.origin)
        self._zones[z.origin] = z
        return z

    def reverse_zone(self, name: str = "127.in-addr.arpa", *, ttl: int = 300) -> LabZone:
        """An unsigned reverse zone (below ``in-addr.arpa.`` or ``ip6.arpa.``, outside the lab root) served by nsd,
        with unbound told to ask nsd for it instead of answering from its built-in local zones; its answers are
        insecure (no trust anchor covers them). Add PTR records with owners relative to the zone::

            lab.reverse_zone().add("1.0.0", "PTR", "client.example.test.")   # 127.0.0.1
        """
        origin = _abs(name)
        if not (origin.is_subdomain(_abs("in-addr.arpa")) or origin.is_subdomain(_abs("ip6.arpa"))):
            raise DnsLabError(f"a reverse zone lies below in-addr.arpa. or ip6.arpa.: {origin}")
        if origin in self._reverse:
            raise DnsLabError(f"zone {origin} already exists")
        z = LabZone(name, signed=False, ttl=ttl)
        self._reverse[origin] = z
        return z

    def get(self, name: str) -> LabZone:
        origin = _abs(name)
        return self._reverse[origin] if origin in self._reverse else self._zones[origin]

    @property
    def zones(self) -> tuple[LabZone, ...]:
        return tuple(self._zones.values())

    def unreachable(self, name: str) -> None:
        """Delegate ``name`` (no DS) to a loopback port where nothing listens: every lookup below it fails."""
        origin = _abs(name)
        self._check_new(origin)
        self._unreachable[origin] = 0

    @property
    def effective_max_rtt_ms(self) -> int:
        if self.max_rtt_ms is not None:
            return self.max_rtt_ms
        return 300 if self._unreachable else 3000

    def _check_new(self, origin: dns.name.Name) -> None:
        if not origin.is_subdomain(self.root.origin) or origin == self.root.origin:
            raise DnsLabError(f"lab zones must lie below {LAB_ROOT}.: {origin}")
        if origin in self._zones or origin in self._unreachable:
            raise DnsLabError(f"zone {origin} already exists")

    def _parent_of(self, origin: dns.name.Name) -> LabZone:
        best = self.root
        for name, z in self._zones.items():
            if origin != name and origin.is_subdomain(name) and len(name) > len(best.origin):
                best = z
        return best

    @property
    def trust_anchor(self) -> str:
        """The lab root's DS as a presentation-format RR (what unbound gets as ``trust-anchor:``)."""
        return f"{self.root.origin} IN DS {self.root.ds().to_text()}"

    def write_zones(self) -> list[tuple[LabZone, Path]]:
        """Build, sign and write every zone file into ``workdir/zones``; return (zone, path) pairs."""
        zdir = self.workdir / "zones"
        zdir.mkdir(exist_ok=True)
        out = []
        for origin, z in self._zones.items():
            delegations: list[tuple[dns.name.Name, dns.rdata.Rdata | None]] = []
            for child_origin, child in self._zones.items():
                if child_origin != origin and self._parent_of(child_origin) is z:
                    delegations.append((child_origin, child.ds() if child.delegate_ds else None))
            for dead in self._unreachable:
                if self._parent_of(dead) is z:
                    delegations.append((dead, None))
            path = zdir / f"{z.name}.zone"
            z.build(delegations).to_file(str(path), relativize=False, want_origin=True)
            out.append((z, path))
        for z in self._reverse.values():
            path = zdir / f"{z.name}.zone"
            z.build().to_file(str(path), relativize=False, want_origin=True)
            out.append((z, path))
        return out

    # -- running

    @property
    def endpoint(self) -> ResolverEndpoint:
        """unbound, the validating resolver (loopback, so its AD bit is trusted)."""
        if self._unbound is None:
            raise DnsLabError("the lab is not running")
        return ResolverEndpoint("127.0.0.1", self.unbound_port)

    @property
    def authoritative(self) -> ResolverEndpoint:
        """nsd itself: answers authoritatively and never sets AD (a non-validating 'resolver')."""
        if self._nsd is None:
            raise DnsLabError("the lab is not running")
        return ResolverEndpoint("127.0.0.1", self.nsd_port)

    @property
    def is_running(self) -> bool:
        return self._nsd is not None and self._unbound is not None

    def start(self) -> ResolverEndpoint:
        """Write zones and configs, check them, start nsd then unbound, wait until both answer."""
        if self.is_running:
            return self.endpoint
        binaries = {b: find_binary(b) for b in ("nsd", "nsd-checkconf", "unbound", "unbound-checkconf")}
        missing = sorted(b for b, p in binaries.items() if p is None)
        if missing:
            raise DnsLabError(
                f"DNS lab needs {', '.join(missing)} (Debian: apt-get install nsd unbound; `make` does it)"
            )
        if not self._atexit_registered:  # no orphaned daemons when the test run is interrupted
            atexit.register(self.stop)
            self._atexit_registered = True
        attempts = 3
        for attempt in range(attempts):
            if not self.nsd_port:
                self._pick_ports()
            try:
                self._start_nsd()
                self._start_unbound()
            except DnsLabError as exc:
                self.stop()
                if "already in use" not in str(exc) or attempt == attempts - 1:
                    raise
                self.nsd_port = 0  # lost a race for a port: pick fresh ones
                continue
            except BaseException:
                self.stop()
                raise
            break
        return self.endpoint

    def _pick_ports(self) -> None:
        used: set[int] = set()
        for _ in range(20):
            port = _free_port()
            if port not in used:
                used.add(port)
            if len(used) == 2 + len(self._unreachable):
                break
        else:
            raise DnsLabError("could not find enough free loopback ports")
        ports = sorted(used)
        self.nsd_port, self.unbound_port = ports[0], ports[1]
        for dead, port in zip(self._unreachable, ports[2:], strict=True):
            self._unreachable[dead] = port

    def stop(self) -> None:
        """Stop unbound and nsd (process groups: TERM, then KILL after a bound wait). Idempotent."""
        for attr in ("_unbound", "_nsd"):
            daemon: _Daemon | None = getattr(self, attr)
            if daemon is not None:
                _terminate(daemon.proc)
                setattr(self, attr, None)

    def reload(self) -> None:
        """Re-sign and re-serve every zone after changes; unbound restarts too (so its cache is empty)."""
        if not self.is_running:
            raise DnsLabError("the lab is not running")
        self.stop()
        self.start()

    def wait_validating(self, secure: str, bogus: str, *, timeout: float = 10.0) -> None:
        """Wait (bounded, polled) until unbound answers ``secure`` as secure and ``bogus`` as bogus, as it will
        from then on: right after start its first validations can SERVFAIL, and a gateway's start-up DNSSEC
        self-test on these names would then (rightly) turn DANE off. Raises :class:`DnsLabError` on timeout."""

        async def ready() -> bool:
            resolver = Resolver([self.endpoint], timeout=1.0)
            ok = await resolver.resolve(secure, "A", use_cache=False)
            bad = await resolver.resolve(bogus, "A", use_cache=False)
            return ok.is_secure and bad.status is DnssecStatus.BOGUS

        deadline = time.monotonic() + timeout
        while not asyncio.run(ready()):
            if time.monotonic() > deadline:
                raise DnsLabError(f"the DNS lab does not validate {secure} (secure) and {bogus} (bogus)")
            time.sleep(0.1)

    @contextlib.contextmanager
    def running(self) -> Iterator[ResolverEndpoint]:
        """``with lab.running() as endpoint:`` — start, yield unbound's endpoint, always stop."""
        try:
            yield self.start()
        finally:
            self.stop()

    def __enter__(self) -> DnsLab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_nsd(self) -> None:
        d = self.workdir / "nsd"
        d.mkdir(exist_ok=True)
        zone_files = self.write_zones()
        conf = d / "nsd.conf"
        log = d / "nsd.log"
        lines = [
            "server:",
            f"  ip-address: 127.0.0.1@{self.nsd_port}",
            f"  port: {self.nsd_port}",
            "  do-ip4: yes",
            "  do-ip6: no",
            '  username: ""',
            '  chroot: ""',
            '  database: ""',
            f'  zonesdir: "{self.workdir / "zones"}"',
            f'  pidfile: "{d / "nsd.pid"}"',
            f'  logfile: "{log}"',
            f'  xfrdfile: "{d / "xfrd.state"}"',
            f'  zonelistfile: "{d / "zone.list"}"',
            f'  xfrdir: "{d}"',
            "  server-count: 1",
            "  verbosity: 1",
            "  hide-version: yes",
            "  refuse-any: yes",
            "  reuseport: no",
            "remote-control:",
            "  control-enable: no",
        ]
        for z, path in zone_files:
            lines += ["zone:", f'  name: "{z.origin}"', f'  zonefile: "{path}"']
        conf.write_text("\n".join(lines) + "\n")
        _check([_bin("nsd-checkconf"), str(conf)], "nsd-checkconf")
        log.write_text("")
        proc = _spawn([_bin("nsd"), "-d", "-c", str(conf)], log, d)
        self._nsd = _Daemon("nsd", proc, log)
        _wait_answering(self._nsd, self.nsd_port, self.root.origin, want_ad=False)

    def _start_unbound(self) -> None:
        d = self.workdir / "unbound"
        d.mkdir(exist_ok=True)
        conf = d / "unbound.conf"
        log = d / "unbound.log"
        nsd = f"127.0.0.1@{self.nsd_port}"
        lines = [
            "server:",
            f"  interface: 127.0.0.1@{self.unbound_port}",
            f"  port: {self.unbound_port}",
            "  do-ip4: yes",
            "  do-ip6: no",
            "  do-udp: yes",
            "  do-tcp: yes",
            '  username: ""',
            '  chroot: ""',
            f'  directory: "{d}"',
            f'  pidfile: "{d / "unbound.pid"}"',
            f'  logfile: "{log}"',
            "  use-syslog: no",
            "  verbosity: 1",
            "  val-log-level: 2",
            "  log-servfail: yes",
            f"  ede: {'yes' if self.ede else 'no'}",
            "  num-threads: 1",
            "  so-reuseport: no",
            "  outgoing-range: 64",
            "  num-queries-per-thread: 32",
            "  access-control: 127.0.0.0/8 allow",
            '  module-config: "validator iterator"',
            "  do-not-query-localhost: no",
            "  qname-minimisation: no",
            "  prefetch: no",
            "  serve-expired: no",
            "  aggressive-nsec: no",
            # a dead authority fails within about a second instead of after many exponential back-offs
            f"  infra-cache-max-rtt: {self.effective_max_rtt_ms}",
            "  infra-host-ttl: 60",
            f'  local-zone: "{self.root.origin}" nodefault',
            f'  trust-anchor: "{self.trust_anchor}"',
            # "no network beyond loopback": even the DNS root is stubbed to nsd (which refuses it)
            "stub-zone:",
            '  name: "."',
            f"  stub-addr: {nsd}",
            "stub-zone:",
            f'  name: "{self.root.origin}"',
            f"  stub-addr: {nsd}",
        ]
        for origin in self._zones:
            if origin != self.root.origin:
                lines += ["stub-zone:", f'  name: "{origin}"', f"  stub-addr: {nsd}"]
        for origin, port in self._unreachable.items():
            lines += ["stub-zone:", f'  name: "{origin}"', f"  stub-addr: 127.0.0.1@{port}"]
        if self._reverse:
            # unbound answers reverse lookups of private and loopback space itself (RFC 6303 local zones):
            # "nodefault" switches that off for the lab's reverse zones (and the default zone above each one)
            local = ["server:"]
            for origin in self._reverse:
                for default in _RFC6303_PARENTS:
                    if origin.is_subdomain(default):
                        local.append(f'  local-zone: "{default}" nodefault')
                local.append(f'  local-zone: "{origin}" nodefault')
                local.append(f'  domain-insecure: "{origin}"')
                lines += ["stub-zone:", f'  name: "{origin}"', f"  stub-addr: {nsd}"]
            lines = local + lines  # (server: options may come in several blocks)
        lines += ["remote-control:", "  control-enable: no"]
        conf.write_text("\n".join(lines) + "\n")
        _check([_bin("unbound-checkconf"), str(conf)], "unbound-checkconf")
        log.write_text("")
        proc = _spawn([_bin("unbound"), "-d", "-c", str(conf)], log, d)
        self._unbound = _Daemon("unbound", proc, log)
        _wait_answering(self._unbound, self.unbound_port, self.root.origin, want_ad=True)


# unbound's built-in local zones (RFC 6303 and localhost) that may contain a lab reverse zone
_RFC6303_PARENTS: Final = tuple(
    dns.name.from_text(n)
    for n in (
        "127.in-addr.arpa.",
        "10.in-addr.arpa.",
        "168.192.in-addr.arpa.",
        "0.in-addr.arpa.",
        *(f"{i}.172.in-addr.arpa." for i in range(16, 32)),
    )
)


def _bin(name: str) -> str:
    path = find_binary(name)
    if path is None:
        raise DnsLabError(f"{name} not found")
    return path


def _check(argv: list[str], what: str) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if res.returncode != 0:
        raise DnsLabError(f"{what} rejected the generated config:\n{res.stdout}{res.stderr}")


def _spawn(argv: list[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=_STOP_TIMEOUT)
    # children (nsd's server and xfrd processes) share the group: make sure none outlives the lab
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_answering(daemon: _Daemon, port: int, qname: dns.name.Name, *, want_ad: bool) -> None:
    """Poll with SOA queries until the daemon answers (bounded); raise with its log otherwise."""
    deadline = time.monotonic() + _START_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise DnsLabError(f"{daemon.name} exited with status {daemon.proc.returncode}:\n{_tail(daemon.log)}")
        q = dns.message.make_query(qname, dns.rdatatype.SOA, want_dnssec=True)
        try:
            r = dns.query.udp(q, "127.0.0.1", port=port, timeout=0.2)
        except (dns.exception.DNSException, OSError) as exc:
            last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
            continue
        if r.rcode() == dns.rcode.NOERROR:
            if want_ad and not r.flags & dns.flags.AD:
                raise DnsLabError(
                    f"{daemon.name} answers but does not validate the lab root (no AD):\n{_tail(daemon.log)}"
                )
            return
        last = f"rcode {dns.rcode.to_text(r.rcode())}"
        time.sleep(0.05)
    raise DnsLabError(f"{daemon.name} did not answer within {_START_TIMEOUT}s ({last}):\n{_tail(daemon.log)}")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


# -- a scripted DNS server for unit tests -------------------------------------------------------------------

Handler = Callable[[dns.message.Message], dns.message.Message | None]


def make_reply(
    query: dns.message.Message,
    *,
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR,
    ad: bool = False,
    answer: Sequence[str] = (),
    authority: Sequence[str] = (),
    ede: Sequence[tuple[int, str]] = (),
) -> dns.message.Message:
    """A response to ``query``; ``answer``/``authority`` hold RR lines: ``"mx.test. 300 IN A 127.0.0.1"``."""
    r = dns.message.make_response(query)
    r.set_rcode(rcode)
    r.flags |= dns.flags.RA
    if ad:
        r.flags |= dns.flags.AD
    for section, lines in ((r.answer, answer), (r.authority, authority)):
        for line in lines:
            rrset = dns.rrset.from_text(*_split_rr(line))
            section.append(rrset)
    if ede:
        options: list[dns.edns.Option] = [
            dns.edns.EDEOption(dns.edns.EDECode(code), text or None) for code, text in ede
        ]
        r.use_edns(0, r.ednsflags, r.payload, options=options)
    return r


def _split_rr(line: str) -> tuple[str, int, str, str, str]:
    owner, ttl, rdclass, rdtype, rest = line.split(None, 4)
    return owner, int(ttl), rdclass, rdtype, rest


class ScriptedDnsServer:
    """A real UDP DNS server on loopback whose every reply is decided by ``handler`` (None: stay silent).

    ::

        def handler(q): return make_reply(q, ad=True, answer=[f"{q.question[0].name} 60 IN A 127.0.0.1"])
        async with ScriptedDnsServer(handler) as server:
            answer = await Resolver([server.endpoint()]).resolve("x.test", "A")
        assert server.queries[0].ednsflags & dns.flags.DO
    """

    def __init__(self, handler: Handler, *, host: str = "127.0.0.1") -> None:
        self.handler = handler
        self.host = host
        self.port = 0
        self.queries: list[dns.message.Message] = []
        self._transport: asyncio.DatagramTransport | None = None

    def endpoint(self, *, trusted: bool | None = None) -> ResolverEndpoint:
        return ResolverEndpoint(self.host, self.port, trusted)

    async def __aenter__(self) -> ScriptedDnsServer:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _ScriptedProtocol(self), local_addr=(self.host, 0))
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


class _ScriptedProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: ScriptedDnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return
        self.server.queries.append(query)
        reply = self.server.handler(query)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply.to_wire(), addr)


# -- the standard scenario -----------------------------------------------------------------------------------


def _tlsa_digest(label: str) -> str:
    return hashlib.sha256(f"mxgate dnslab {label}".encode()).hexdigest()


class Std:
    """Names of the standard lab (fixture ``dnslab``). Names carry no trailing dot."""

    # secure.test: ECDSA P-256, NSEC, DS in test.
    SECURE = "secure.test"  # A 127.0.0.10; MX 10 mx1, 20 mx2
    SECURE_MX1 = "mx1.secure.test"  # A 127.0.0.11, no AAAA (secure NODATA); TLSA at _25._tcp
    SECURE_MX2 = "mx2.secure.test"  # A 127.0.0.12, AAAA ::1
    SECURE_MX1_IP = "127.0.0.11"
    SECURE_MX2_IP = "127.0.0.12"
    SECURE_TLSA = "_25._tcp.mx1.secure.test"  # 3 1 1 <SECURE_TLSA_DIGEST>
    SECURE_TLSA_DIGEST = _tlsa_digest("mx1.secure.test")
    SECURE_CNAME = "alias2.secure.test"  # CNAME alias.secure.test -> CNAME mx1.secure.test (all secure)
    SECURE_CNAME_MID = "alias.secure.test"
    CROSS_CNAME = "cross.secure.test"  # CNAME mx.insecure.test (secure start, insecure end)
    MIXED_MX = "mixed.secure.test"  # MX 10 mx.insecure.test (secure MX RRset, host in an insecure zone)
    NULL_MX = "nullmx.secure.test"  # MX 0 . (RFC 7505)
    SECURE_NXDOMAIN = "nonexistent.secure.test"  # NSEC-proven NXDOMAIN
    # rsa.test: RSA/SHA-256, NSEC3
    RSA = "rsa.test"  # MX 10 mx1.rsa.test
    RSA_MX1 = "mx1.rsa.test"  # A 127.0.0.13; TLSA at _25._tcp
    RSA_MX1_IP = "127.0.0.13"
    RSA_NXDOMAIN = "nonexistent.rsa.test"  # NSEC3-proven NXDOMAIN
    # insecure.test: unsigned, delegated without DS
    INSECURE = "insecure.test"  # MX 10 mx.insecure.test
    INSECURE_MX = "mx.insecure.test"  # A 127.0.0.21; TLSA at _25._tcp (insecure, must be ignored)
    INSECURE_MX_IP = "127.0.0.21"
    INSECURE_CNAME = "alias.insecure.test"  # CNAME mx.insecure.test
    INSECURE_TO_SECURE_CNAME = "tosecure.insecure.test"  # CNAME mx1.secure.test (insecure start)
    INSECURE_NXDOMAIN = "nonexistent.insecure.test"
    # island.test: signed, but no DS in test. -> insecure
    ISLAND = "island.test"  # MX 10 mx.island.test; mx A 127.0.0.22
    # bogus zones: valid DS in test., broken below it. Each: MX 10 mx.<zone>, mx A 127.0.0.3x
    BOGUS_SIG = "bogus-sig.test"
    BOGUS_EXPIRED = "bogus-expired.test"
    BOGUS_NOT_YET = "bogus-notyet.test"
    BOGUS_NO_DNSKEY = "bogus-nodnskey.test"
    BOGUS_NO_RRSIG = "bogus-norrsig.test"
    BOGUS_ZONES = (BOGUS_SIG, BOGUS_EXPIRED, BOGUS_NOT_YET, BOGUS_NO_DNSKEY, BOGUS_NO_RRSIG)
    # a delegation to a server that does not answer
    DEAD = "dead.test"
    DEAD_HOST = "mx.dead.test"
    # for Resolver.self_test()
    SELFTEST_SECURE = "secure.test"
    SELFTEST_BOGUS = "bogus-sig.test"


def build_standard_lab(workdir: Path | str) -> DnsLab:
    """A not-yet-started lab with every zone described on :class:`Std`."""
    lab = DnsLab(workdir)
    s = lab.zone(Std.SECURE)
    s.add("@", "A", "127.0.0.10")
    s.add("@", "MX", "10 mx1").add("@", "MX", "20 mx2")
    s.add("mx1", "A", Std.SECURE_MX1_IP)
    s.add("mx2", "A", Std.SECURE_MX2_IP).add("mx2", "AAAA", "::1")
    s.add("_25._tcp.mx1", "TLSA", f"3 1 1 {Std.SECURE_TLSA_DIGEST}")
    s.add("alias", "CNAME", "mx1").add("alias2", "CNAME", "alias")
    s.add("cross", "CNAME", f"{Std.INSECURE_MX}.")
    s.add("mixed", "MX", f"10 {Std.INSECURE_MX}.")
    s.add("nullmx", "MX", "0 .")

    r = lab.zone(Std.RSA, algorithm=Algorithm.RSA, denial=Denial.NSEC3)
    r.add("@", "MX", "10 mx1").add("mx1", "A", Std.RSA_MX1_IP)
    r.add("_25._tcp.mx1", "TLSA", f"3 1 1 {_tlsa_digest(Std.RSA_MX1)}")

    i = lab.zone(Std.INSECURE, signed=False)
    i.add("@", "MX", "10 mx").add("mx", "A", Std.INSECURE_MX_IP)
    i.add("_25._tcp.mx", "TLSA", f"3 1 1 {_tlsa_digest(Std.INSECURE_MX)}")
    i.add("alias", "CNAME", "mx").add("tosecure", "CNAME", f"{Std.SECURE_MX1}.")

    lab.zone(Std.ISLAND, delegate_ds=False).add("@", "MX", "10 mx").add("mx", "A", "127.0.0.22")

    corruptions = (
        Corruption.SIGNATURE,
        Corruption.EXPIRED,
        Corruption.NOT_YET_VALID,
        Corruption.MISSING_DNSKEY,
        Corruption.MISSING_RRSIG,
    )
    for n, (zone_name, corruption) in enumerate(zip(Std.BOGUS_ZONES, corruptions, strict=True)):
        b = lab.zone(zone_name, corrupt=corruption)
        b.add("@", "A", f"127.0.0.{30 + n}").add("@", "MX", "10 mx").add("mx", "A", f"127.0.0.{40 + n}")

    lab.unreachable(Std.DEAD)
    return lab


@dataclass(frozen=True, slots=True)
class StandardLab:
    """What the ``dnslab`` fixture provides: the running lab and its two endpoints."""

    lab: DnsLab
    resolver: ResolverEndpoint  # unbound: validating, loopback (AD trusted)
    authoritative: ResolverEndpoint  # nsd: never sets AD
    names: type[Std] = field(default=Std)


# -- pytest fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dnslab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandardLab]:
    """The standard lab (zones on :class:`Std`), started once per session."""
    lab = build_standard_lab(tmp_path_factory.mktemp("dnslab"))
    try:
        lab.start()
    except DnsLabError as exc:
        pytest.fail(f"DNS lab could not start: {exc}", pytrace=False)
    try:
        yield StandardLab(lab=lab, resolver=lab.endpoint, authoritative=lab.authoritative)
    finally:
        lab.stop()


@pytest.fixture
def dnslab_factory(tmp_path: Path) -> Iterator[Callable[..., DnsLab]]:
    """``dnslab_factory(**kwargs)`` -> a fresh empty :class:`DnsLab` (not started; ``kwargs`` go to
    :class:`DnsLab`, e.g. ``ede=False``); every lab made is stopped after the test."""
    labs: list[DnsLab] = []

    def make(*, root_algorithm: Algorithm | str = Algorithm.ECDSA, ede: bool = True) -> DnsLab:
        lab = DnsLab(tmp_path / f"dnslab{len(labs)}", root_algorithm=root_algorithm, ede=ede)
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.stop()
