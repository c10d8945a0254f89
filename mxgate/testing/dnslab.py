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

The code is split by concern; this module runs the lab and re-exports the rest: zones and signing in
:mod:`mxgate.testing.dnszones`, the nsd/unbound processes in :mod:`mxgate.testing.dnsdaemons`, the scripted
server in :mod:`mxgate.testing.dnsscripted`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.name
import dns.rdata
import pytest

from mxgate.core.dns import Resolver, ResolverEndpoint
from mxgate.core.dns_answers import DnssecStatus
from mxgate.testing.dnsdaemons import (
    Daemon,
    find_binary,
    free_port,
    spawn_nsd,
    spawn_unbound,
    terminate,
    wait_answering,
)
from mxgate.testing.dnsscripted import ScriptedDnsServer, make_reply
from mxgate.testing.dnszones import LAB_ROOT, Algorithm, Corruption, Denial, DnsLabError, LabZone, _abs

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


# -- the lab -------------------------------------------------------------------------------------------------


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
        self._nsd: Daemon | None = None
        self._unbound: Daemon | None = None
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
            port = free_port()
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
            daemon: Daemon | None = getattr(self, attr)
            if daemon is not None:
                terminate(daemon.proc)
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
        self._nsd = spawn_nsd(self.workdir, self.nsd_port, self.write_zones())
        wait_answering(self._nsd, self.nsd_port, self.root.origin, want_ad=False)

    def _start_unbound(self) -> None:
        self._unbound = spawn_unbound(
            self.workdir,
            port=self.unbound_port,
            nsd_port=self.nsd_port,
            ede=self.ede,
            max_rtt_ms=self.effective_max_rtt_ms,
            root=self.root.origin,
            trust_anchor=self.trust_anchor,
            zones=self._zones,
            unreachable=self._unreachable,
            reverse=self._reverse,
        )
        wait_answering(self._unbound, self.unbound_port, self.root.origin, want_ad=True)


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
