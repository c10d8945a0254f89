"""Inbound connectors (Exchange's receive connectors for partners and services): who may send us what.

A connector is chosen by the client's IP at connect time, then re-evaluated once the client has presented a TLS
certificate (``tls_sender_certificate_name``) or authenticated. No connector matched = anonymous internet mail.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from mxgate.core import checks
from mxgate.core.settings import ConnectorSetting, setting

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class InboundConnector:
    name: str = setting(desc="Connector name, used in logs, metrics and the tracking log.", check=checks.check_name)
    sender_ips: tuple[str, ...] = setting(
        (), desc="Client addresses or networks this connector applies to (CIDR).", check=checks.check_networks
    )
    sender_domains: tuple[str, ...] = setting(
        (),
        desc="Sender (MAIL FROM) domains this connector speaks for; patterns as '*.example.com'.",
        check=checks.check_domain_patterns,
    )
    tls_sender_certificate_name: str | None = setting(
        None,
        desc="Client certificate name (DNS SAN, CN without SANs) that identifies the partner, verified "
        "against tls_client_ca.",
    )
    tls_client_ca: str | None = setting(
        None,
        desc="CA bundle (PEM) used to verify client certificates for this connector; default: system CAs.",
    )
    require_tls: bool = setting(False, desc="Refuse MAIL from this connector's clients unless TLS is in use.")
    restrict_domains_to_ips: bool = setting(
        False, desc="Mail claiming sender_domains is refused (5.7.1) unless it comes from sender_ips."
    )
    restrict_domains_to_certificate: bool = setting(
        False,
        desc="Mail claiming sender_domains is refused (5.7.1) unless the client presented the certificate.",
    )
    accepted_domains: tuple[str, ...] = setting(
        (),
        desc="Extra recipient domains accepted from this connector's clients (beyond server.accepted_domains).",
        check=checks.check_domain_patterns,
    )
    may_relay: bool = setting(False, desc="Clients of this connector may send to any recipient domain.")
    max_message_size: int | None = setting(
        None,
        desc="Largest message (bytes) from this connector's clients: lowers the listener's limit, never raises it; "
        "advertised in SIZE once the connector is known (after STARTTLS or AUTH when they select it).",
        check=checks.check_optional_positive,
    )
    treat_as_internal: bool = setting(
        False,
        desc="Mail from this connector is internal (Exchange's "
        "TreatMessagesAsInternal): plugins may skip external-only checks.",
    )
    enabled: bool = setting(True, desc="A disabled connector never matches.")
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), compare=False)

    def get(self, spec: ConnectorSetting[T]) -> T:
        """A plugin-declared setting of this connector (its default when the file does not set it)."""
        value = self.extra.get(spec.name, spec.default)
        return value  # type: ignore[no-any-return]

    @property
    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return _networks(tuple(self.sender_ips))

    def matches_ip(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)


@functools.lru_cache(maxsize=256)
def _networks(sender_ips: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``sender_ips`` parsed, once per tuple (a connector is matched at every connection)."""
    return tuple(ipaddress.ip_network(n, strict=False) for n in sender_ips)


def select_inbound(
    connectors: Sequence[InboundConnector],
    ip: str,
    *,
    certificate_names: Sequence[str] = (),
    certificate_verified: bool = False,
) -> InboundConnector | None:
    """The connector for a client: a certificate match beats an IP match; most specific network wins; then order.

    A connector that names a certificate only matches once the client presented a verified certificate with that
    name; one with sender_ips must also match the address. A connector with neither never matches.
    """
    names = {n.lower().rstrip(".") for n in certificate_names} if certificate_verified else set()
    best: tuple[int, int, int] | None = None
    chosen: InboundConnector | None = None
    for index, conn in enumerate(connectors):
        if not conn.enabled:
            continue
        cert_name = (conn.tls_sender_certificate_name or "").lower().rstrip(".")
        if cert_name and not _cert_name_matches(cert_name, names):
            continue
        prefix = -1
        if conn.sender_ips:
            addr = ipaddress.ip_address(ip)
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            matching = [net.prefixlen for net in conn.networks if addr in net]
            if not matching:
                continue
            prefix = max(matching)
        elif not cert_name:
            continue
        rank = (1 if cert_name else 0, prefix, -index)
        if best is None or rank > best:
            best, chosen = rank, conn
    return chosen


def shadowed(connectors: Sequence[InboundConnector]) -> list[str]:
    """Pairs of enabled connectors that :func:`select_inbound` cannot tell apart for some clients -- the same
    certificate name (or none) and a network in common (or, for certificate-only connectors, no network at all):
    the one listed first always wins for those clients, and the other never applies to them. One line each, for
    ``mxgate run`` and ``mxgate config check`` to warn with (a configuration can mean it, so not an error)."""
    out: list[str] = []
    enabled = [(i, c) for i, c in enumerate(connectors) if c.enabled]
    for pos, (i, first) in enumerate(enabled):
        cert = (first.tls_sender_certificate_name or "").lower().rstrip(".")
        for j, later in enabled[pos + 1 :]:
            if (later.tls_sender_certificate_name or "").lower().rstrip(".") != cert:
                continue
            if first.sender_ips or later.sender_ips:
                common = sorted({str(n) for n in first.networks} & {str(n) for n in later.networks})
                if not common:
                    continue
                what = "clients from " + ", ".join(common) + (f" presenting certificate {cert}" if cert else "")
            elif cert:
                what = f"clients presenting certificate {cert}"
            else:
                continue  # matches nothing at all
            out.append(
                f"inbound_connector[{i}] {first.name!r} and inbound_connector[{j}] {later.name!r} both match "
                f"{what}: {first.name!r} (listed first) always wins, {later.name!r} never applies to them"
            )
    return out


def _cert_name_matches(wanted: str, presented: set[str]) -> bool:
    if wanted in presented:
        return True
    # a presented wildcard certificate covers exactly one left-most label
    _head, _, parent = wanted.partition(".")
    return bool(parent) and f"*.{parent}" in presented
