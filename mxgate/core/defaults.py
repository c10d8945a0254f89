"""The essential core plugin: the defaults every hook chain falls back to.

All implementations are ``trylast``, so any plugin answers before them (datasette's default pages). This
plugin cannot be disabled; it can be overridden.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from mxgate.connectors.outbound import select_outbound
from mxgate.core import checks
from mxgate.core.hookspecs import hookimpl
from mxgate.core.model import Address
from mxgate.core.outcomes import (
    Destination,
    HopHost,
    NextHop,
    PeerVerification,
    Route,
    TlsLevel,
    TlsPolicy,
    TlsRptResult,
)
from mxgate.core.runtime import Runtime

if TYPE_CHECKING:
    from cryptography import x509

    from mxgate.core.auth import AuthResult
    from mxgate.core.delivery import AttemptContext
    from mxgate.core.dns import Resolver


class CorePlugin:
    """Defaults: routing by connector, next hop (MX or smart hosts), the connector's TLS opinion and its checks."""

    name = "core"
    priority = 1000

    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        self.rng = random.Random()

    @hookimpl(tryfirst=True)
    def mxgate_lifecycle_on_startup(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @hookimpl(trylast=True)
    def mxgate_categorizer_resolve_route(self, recipient: Address) -> Route | None:
        """Most specific ``recipient_domains`` match; ties by cost, then file order."""
        if self.runtime is None:
            return None
        connector = select_outbound(self.runtime.config.outbound_connector, recipient.domain)
        return Route(connector.name) if connector else None

    # -- receive -----------------------------------------------------------------------------------------

    @hookimpl(trylast=True)
    async def mxgate_receive_resolve_credentials(self, username: str, password: str) -> AuthResult | None:
        """The built-in users file (``<state_dir>/users``, scrypt hashes); checked off the event loop, in the
        bounded password-check pool (full: a temporary failure, 454 4.7.0)."""
        from mxgate.core.auth import AuthResult, KdfPoolFull, kdf_pool_for_runtime, users_for_runtime

        if self.runtime is None:
            return None
        try:
            return await kdf_pool_for_runtime(self.runtime).run(
                users_for_runtime(self.runtime).verify, username, password
            )
        except KdfPoolFull:
            return AuthResult.failure("password checks busy", temporary=True)

    # -- delivery ----------------------------------------------------------------------------------------

    @hookimpl(trylast=True)
    async def mxgate_delivery_resolve_next_hop(self, destination: Destination) -> NextHop | None:
        """Smart hosts in order, or MX hosts (RFC 5321 §5.1) with the DNSSEC status of every RRset."""
        if self.runtime is None:
            return None
        connector = destination.connector
        resolver = self.runtime.resolver
        smart = destination.smart_hosts
        if smart:
            return await smart_host_next_hop(destination, smart, connector.port, resolver)
        if resolver is None:
            return NextHop(destination, (), "error", error="no DNS resolver configured")
        return await mx_next_hop(destination, resolver, connector.mx_port, self.rng)

    @hookimpl(trylast=True)
    def mxgate_delivery_resolve_tls_policy(self, destination: Destination) -> TlsPolicy | None:
        """The connector's own ``tls`` setting, precedence 100."""
        from mxgate.core.delivery import connector_policy

        return connector_policy(destination.connector, destination)

    @hookimpl(trylast=True)
    def mxgate_delivery_on_tls_verify(
        self, attempt: AttemptContext, policy: TlsPolicy, chain: Sequence[x509.Certificate]
    ) -> PeerVerification | None:
        """Connector policies only: WebPKI chain (certificate_validation), plus RFC 6125 names (domain_validation)."""
        if policy.source != "connector" or self.runtime is None:
            return None
        cafile = attempt.destination.connector.tls_ca_file
        trust = (str(self.runtime.config.path(cafile)),) if cafile else None
        hp = attempt.host_policy  # the per-host policy: its level and reference identifiers
        level = hp.level if hp is not None else policy.level
        names = (hp.reference_ids if hp is not None else ()) or policy.reference_ids or (attempt.host.name,)
        now = datetime.fromtimestamp(self.runtime.clock(), tz=UTC)
        return verify_connector_peer(chain, level=level, names=names, now=now, trust_store_paths=trust)


# -- pure helpers (tested directly) -------------------------------------------------------------------------


def verify_connector_peer(
    chain: Sequence[x509.Certificate],
    *,
    level: TlsLevel,
    names: Sequence[str],
    now: datetime,
    trust_store_paths: Sequence[str] | None,
) -> PeerVerification:
    """WebPKI path validation; at ``SECURE`` also a reference identifier (RFC 6125: DNS-ID SANs, CN only
    without them, a wildcard only as the whole left-most label)."""
    from mxgate.core.tls import VerifyReason, match_reference_identifiers, verify_webpki

    result = verify_webpki(chain, name=None, now=now, trust_store_paths=trust_store_paths)
    if not result.ok:
        rtype = {
            VerifyReason.EXPIRED: TlsRptResult.CERTIFICATE_EXPIRED,
            VerifyReason.UNTRUSTED: TlsRptResult.CERTIFICATE_NOT_TRUSTED,
            VerifyReason.NAME_MISMATCH: TlsRptResult.CERTIFICATE_HOST_MISMATCH,
        }.get(result.reason, TlsRptResult.VALIDATION_FAILURE)
        return PeerVerification(False, "untrusted", rtype, detail=result.detail)
    if level < TlsLevel.SECURE:
        return PeerVerification(True, "verified", detail="chain valid (name not checked)")
    matched = match_reference_identifiers(chain[0], names) if chain else None
    if matched is None:
        return PeerVerification(
            False,
            "untrusted",
            TlsRptResult.CERTIFICATE_HOST_MISMATCH,
            detail=f"certificate is not valid for {', '.join(names)}",
        )
    return PeerVerification(True, "verified", matched=matched, detail=f"chain valid for {matched}")


async def _host(resolver: Resolver | None, name: str, port: int, preference: int, chain_secure: bool) -> HopHost:
    """A host with its addresses (:meth:`Resolver.host_addresses`: AAAA first, then A); ``secure`` only when
    everything leading to it was.

    A lookup that failed (timeout, SERVFAIL without a DNSSEC verdict) contributes no addresses and does not make
    the host insecure: the addresses used are those of the answered RRsets, and the host is secure when these
    are (as Postfix decides per RRset; RFC-CHECKLIST 38). An attacker who drops AAAA queries gets no weaker
    policy, only fewer addresses. When every lookup failed the host has no addresses and is skipped."""
    try:
        ip = checks.split_hostport(name, port)[0]
        ipaddress.ip_address(ip)
        return HopHost(name, port, preference, (ip,), False)
    except ValueError:
        pass
    if resolver is None:
        return HopHost(name, port, preference)
    found = await resolver.host_addresses(name)
    return HopHost(name, port, preference, found.addresses, chain_secure and found.is_secure)


async def smart_host_next_hop(
    destination: Destination, smart_hosts: Sequence[str], default_port: int, resolver: Resolver | None
) -> NextHop:
    hosts = []
    for entry in smart_hosts:
        try:
            name, port = checks.split_hostport(entry, default_port)
        except ValueError as exc:
            return NextHop(destination, (), "error", error=f"smart host {entry!r}: {exc}")
        hosts.append(await _host(resolver, name, port, 0, True))
    return NextHop(destination, tuple(hosts), "smart_host")


async def mx_next_hop(destination: Destination, resolver: Resolver, port: int, rng: random.Random) -> NextHop:
    """RFC 5321 §5.1 (preference order, random among equals), implicit MX, RFC 7505 null MX. A failed or bogus
    lookup is never "no record": it defers, and an MX failure never falls back to A/AAAA."""
    domain = destination.domain.lower().rstrip(".")
    mx = await resolver.resolve(domain, "MX")
    if mx.is_failure:
        return NextHop(
            destination, (), "error", error=f"MX lookup for {domain} failed ({mx.status}: {mx.error or mx.kind})"
        )
    if mx.is_null_mx:
        return NextHop(destination, (), "null_mx", mx_secure=mx.is_secure, error="null MX", permanent=True)
    if mx.exists:
        by_pref: dict[int, list[str]] = {}
        seen: set[str] = set()
        for rd in mx.records:
            exchange = str(getattr(rd, "exchange", "")).rstrip(".").lower()
            preference = int(getattr(rd, "preference", 0))
            if not exchange or exchange in seen:  # "." in a mixed RRset is ignored (RFC 7505 §4)
                continue
            seen.add(exchange)
            by_pref.setdefault(preference, []).append(exchange)
        if not by_pref:
            return NextHop(destination, (), "null_mx", mx_secure=mx.is_secure, error="null MX", permanent=True)
        hosts: list[HopHost] = []
        for preference in sorted(by_pref):
            names = by_pref[preference]
            rng.shuffle(names)
            for name in names:
                hosts.append(await _host(resolver, name, port, preference, mx.is_secure))
        return NextHop(destination, tuple(hosts), "mx", mx_secure=mx.is_secure)
    # No MX (NODATA or NXDOMAIN): the domain itself is the implicit MX (RFC 5321 §5.1).
    host = await _host(resolver, domain, port, 0, mx.is_secure)
    if host.addresses:
        return NextHop(destination, (host,), "implicit_mx", mx_secure=mx.is_secure)
    if (await resolver.host_addresses(domain)).failures:
        return NextHop(destination, (), "error", error=f"address lookup for {domain} failed")
    return NextHop(destination, (), "error", error=f"{domain} has no MX and no address records", permanent=True)
