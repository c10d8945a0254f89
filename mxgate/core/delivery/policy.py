"""What to do, as pure functions (no sockets, no hooks): the connector's own TLS opinion, how the opinions of
the policy plugins combine — per MX host (RFC 7672 §2.2, RFC 8461 §2, §4, §5; RFC-CHECKLIST 36-37) — and what a
message needs of the peer.

* :func:`enforced_mx_patterns` / :func:`filter_hosts_by_policies`: an enforcing policy's ``mx`` patterns (MTA-STS
  ``enforce``) filter ALL candidate MX hosts BEFORE connecting, whether or not DANE governs a host (RFC 8461 §4.1).
* :func:`decide_host`: per host, the highest-precedence applicable policy that has an opinion on THAT host decides
  (DANE where it applies to the host, else MTA-STS, else the connector). A report-only deciding opinion (MTA-STS
  "testing") is verified and reported while the next one is enforced. One host's TLSA never changes another's.
* :func:`combine_policies`: the destination-wide view, whose failure (a policy that could not be established)
  defers the whole destination.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mxgate.core.outcomes import Destination, HopHost, PolicyType, TlsLevel, TlsPolicy

if TYPE_CHECKING:
    from mxgate.connectors.outbound import OutboundConnector
    from mxgate.core.delivery.model import OutgoingMessage

__all__ = [
    "CONNECTOR_PRECEDENCE",
    "TlsDecision",
    "combine_policies",
    "connector_level",
    "connector_policy",
    "decide_host",
    "decide_ranked",
    "enforced_mx_patterns",
    "filter_hosts",
    "filter_hosts_by_policies",
    "is_ip",
    "mx_pattern_matches",
    "needs_8bitmime",
    "needs_smtputf8",
    "rank_policies",
]

CONNECTOR_PRECEDENCE = 100
_LEVELS = {
    "none": TlsLevel.NONE,
    "opportunistic": TlsLevel.MAY,
    "encryption_only": TlsLevel.ENCRYPT,
    "certificate_validation": TlsLevel.VERIFY,
    "domain_validation": TlsLevel.SECURE,
}


@dataclass(frozen=True, slots=True)
class TlsDecision:
    """``policy`` decided (and is reported); ``enforce`` is what an attempt must satisfy (the same policy unless
    the deciding one is report-only)."""

    policy: TlsPolicy
    enforce: TlsPolicy

    @property
    def report_only(self) -> bool:
        return self.policy.report_only and self.policy is not self.enforce


def connector_level(tls: str) -> TlsLevel:
    """The :class:`TlsLevel` of an outbound connector's ``tls`` setting."""
    try:
        return _LEVELS[tls]
    except KeyError:
        raise ValueError(f"unknown connector tls mode {tls!r}") from None


def connector_policy(connector: OutboundConnector, destination: Destination) -> TlsPolicy:
    """The connector's own opinion (precedence 100)."""
    return TlsPolicy(
        source="connector",
        policy_type=PolicyType.NO_POLICY,
        policy_domain=destination.domain,
        level=connector_level(connector.tls),
        precedence=CONNECTOR_PRECEDENCE,
        reference_ids=(connector.tls_domain,) if connector.tls_domain else (),
        detail=f"connector {connector.name} tls={connector.tls}",
        data=connector,
    )


def combine_policies(policies: Sequence[TlsPolicy], fallback: TlsPolicy) -> TlsDecision:
    """Highest ``precedence`` applicable opinion decides (file order among equals); ``fallback`` when none
    applies. A report-only deciding policy is enforced by the next applicable enforcing one.

    This is the destination-wide view (whose lookup failure defers the whole destination); each host is decided
    by :func:`decide_host`."""
    applying = sorted((p for p in policies if p.applies), key=lambda p: -p.precedence)
    if not applying:
        return TlsDecision(fallback, fallback)
    deciding = applying[0]
    if not deciding.report_only:
        return TlsDecision(deciding, deciding)
    enforce = next((p for p in applying[1:] if not p.report_only), fallback)
    return TlsDecision(deciding, enforce)


def decide_host(policies: Sequence[TlsPolicy], fallback: TlsPolicy, host: HopHost | str) -> TlsDecision:
    """The per-host policy (RFC 7672 §2.2, RFC 8461 §2; RFC-CHECKLIST 37): among the applicable policies that
    have an opinion on THIS host (:attr:`HostPolicy.applies`), the highest ``precedence`` decides — DANE where
    it applies to the host, else MTA-STS, else the connector (``fallback``). A report-only deciding policy (MTA-STS
    testing) is enforced by the next one with an opinion on the host. One host's TLSA records never change
    another host's policy, and a host DANE governs is never rescued by MTA-STS."""
    return decide_ranked(rank_policies(policies), fallback, host)


def rank_policies(policies: Sequence[TlsPolicy]) -> tuple[TlsPolicy, ...]:
    """The applicable policies, highest ``precedence`` first (file order among equals)."""
    return tuple(sorted((p for p in policies if p.applies), key=lambda p: -p.precedence))


def decide_ranked(ranked: Sequence[TlsPolicy], fallback: TlsPolicy, host: HopHost | str) -> TlsDecision:
    """:func:`decide_host` over policies already ranked by :func:`rank_policies` (delivery ranks once per
    destination, then decides each host)."""
    key = (host if isinstance(host, str) else host.name).lower().rstrip(".")
    deciding: TlsPolicy | None = None
    for p in ranked:
        if not _has_opinion(p, key):
            continue
        if deciding is None:
            if not p.report_only:
                return TlsDecision(p, p)
            deciding = p
        elif not p.report_only:
            return TlsDecision(deciding, p)
    return TlsDecision(deciding, fallback) if deciding is not None else TlsDecision(fallback, fallback)


def _has_opinion(policy: TlsPolicy, key: str) -> bool:
    """``policy.for_host(key).applies`` without building the default refinement (every host, every message)."""
    found = policy.hosts.get(key)
    return found is None or found.applies


def enforced_mx_patterns(policies: Sequence[TlsPolicy]) -> tuple[tuple[TlsPolicy, tuple[str, ...]], ...]:
    """The ``mx`` patterns every candidate MX host must match: those of each applicable, enforcing policy that
    has them (MTA-STS ``enforce``), whichever policy later governs the host (RFC 8461 §4.1, RFC-CHECKLIST 36)."""
    return tuple((p, p.mx_patterns) for p in policies if p.applies and not p.report_only and p.mx_patterns)


def filter_hosts_by_policies(
    hosts: Sequence[HopHost], policies: Sequence[TlsPolicy]
) -> tuple[tuple[HopHost, ...], TlsPolicy | None]:
    """``hosts`` filtered by :func:`enforced_mx_patterns` (all of them, DANE or not), and the first policy that
    filtered any host out (for the outcome record when none is left)."""
    kept = tuple(hosts)
    first: TlsPolicy | None = None
    for policy, patterns in enforced_mx_patterns(policies):
        left = filter_hosts(kept, patterns)
        if len(left) != len(kept) and first is None:
            first = policy
        kept = left
    return kept, first


def mx_pattern_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: exact, or ``*.example.com`` = exactly one label in front of ``example.com``."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return host == pattern


def filter_hosts(hosts: Sequence[HopHost], patterns: Sequence[str]) -> tuple[HopHost, ...]:
    """The hosts whose names match one of ``patterns`` (all hosts when there are no patterns)."""
    if not patterns:
        return tuple(hosts)
    return tuple(h for h in hosts if any(mx_pattern_matches(p, h.name) for p in patterns))


def needs_smtputf8(message: OutgoingMessage) -> bool:
    return message.smtputf8 or not message.sender.isascii() or not all(r.isascii() for r in message.recipients)


def needs_8bitmime(message: OutgoingMessage) -> bool:
    return message.body_8bit or not message.data.isascii()


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True
