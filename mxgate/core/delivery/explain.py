"""``mxgate explain DOMAIN``: per MX (or smart) host, which mechanism governs it and why — computed by the code
delivery runs (:meth:`Deliverer.plan <mxgate.core.delivery.driver.Deliverer.plan>` and
:meth:`DestinationPlan.decide <mxgate.core.delivery.plan.DestinationPlan.decide>`), not re-derived, so what it
shows is what the next delivery does. ``--connect`` makes each connection as delivery would, up to the ready
session (STARTTLS, the host's verification), then QUITs; it records no TLS-RPT outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mxgate.core import checks
from mxgate.core.delivery.driver import Deliverer
from mxgate.core.delivery.plan import DestinationPlan
from mxgate.core.outcomes import Destination, HopHost, TlsPolicy

if TYPE_CHECKING:
    from mxgate.connectors.outbound import OutboundConnector
    from mxgate.core.runtime import Runtime

__all__ = [
    "HostExplanation",
    "SessionExplanation",
    "TransportExplanation",
    "destination_for",
    "explain_destination",
    "format_transport",
]


@dataclass(frozen=True, slots=True)
class SessionExplanation:
    """One ``--connect`` test of one address."""

    address: str
    ok: bool  # the session got ready under the host's policy
    tls: str | None = None
    verification: str | None = None  # label: verified / trusted / untrusted
    matched: str | None = None
    detail: str = ""
    failure: str | None = None  # the reply delivery would have recorded


@dataclass(frozen=True, slots=True)
class HostExplanation:
    host: str
    port: int
    preference: int
    addresses: tuple[str, ...]
    secure: bool  # everything leading to the host (MX or CNAME chain, addresses) was DNSSEC-secure
    dialled: bool  # False: outside an enforcing policy's mx patterns
    mechanism: str  # the governing policy's source: "dane", "mta_sts", "connector" or a plugin's name
    policy_type: str
    enforced_by: str  # the policy the attempt must satisfy (differs when the governing one is report-only)
    level: str  # TlsLevel name demanded of the connection
    usable: bool
    failure: str | None
    sni: str | None
    reference_ids: tuple[str, ...]
    why: tuple[str, ...]
    sessions: tuple[SessionExplanation, ...] = ()


@dataclass(frozen=True, slots=True)
class TransportExplanation:
    domain: str
    connector: str
    connector_tls: str
    tls_domain: str | None
    trust_anchors: str  # the connector's tls_ca_file, or the system trust store
    next_hop: str  # mx | implicit_mx | smart_host | null_mx | error
    mx_secure: bool
    error: str | None
    policies: tuple[str, ...]  # every opinion, one line each
    destination_failure: str | None  # defers the whole destination
    hosts: tuple[HostExplanation, ...]


def destination_for(connector: OutboundConnector, domain: str) -> Destination:
    """The destination delivery would use for ``domain`` through ``connector`` (smart hosts when it has them)."""
    if connector.smart_hosts:
        first = checks.split_hostport(connector.smart_hosts[0], connector.port)[0]
        return Destination(connector, first, connector.smart_hosts)
    return Destination(connector, domain.lower().rstrip("."))


def _policy_line(p: TlsPolicy) -> str:
    state = "applies" if p.applies else "no opinion"
    extra = [f"level {p.level.name}", state]
    if p.report_only:
        extra.append("report only")
    if p.mx_patterns:
        extra.append("mx " + ", ".join(p.mx_patterns))
    if p.failure is not None:
        extra.append(f"FAILED: {p.failure}")
    return f"{p.source} ({p.policy_type}; {'; '.join(extra)})" + (f": {p.detail}" if p.detail else "")


def _why(dplan: DestinationPlan, host: HopHost) -> tuple[str, ...]:
    """Each policy's word on this host, in precedence order: who has no opinion, and who decides."""
    decision, enforce_hp, _report_hp = dplan.decide(host)
    out: list[str] = []
    for p in sorted((p for p in dplan.candidates if p.applies), key=lambda p: -p.precedence):
        hp = p.for_host(host.name)
        if not hp.applies:
            out.append(f"{p.source}: no opinion on this host" + (f" ({hp.detail})" if hp.detail else ""))
            continue
        decides = p is decision.policy or p is decision.enforce
        detail = hp.detail or p.detail
        out.append(f"{p.source}: {'decides' if decides else 'outranked'}" + (f" ({detail})" if detail else ""))
        if decides and not decision.report_only:
            break
    if not enforce_hp.usable:
        out.append(f"unusable: {enforce_hp.failure or enforce_hp.detail or 'host unusable'}")
    return tuple(out)


async def explain_destination(
    runtime: Runtime, destination: Destination, *, connect: bool = False
) -> TransportExplanation:
    """The per-host view of ``destination`` (see the module docstring)."""
    connector = destination.connector
    deliverer = Deliverer(runtime, reuse=False, probe=True)
    trust = connector.tls_ca_file or "system trust store"
    dplan = await deliverer.plan(destination)
    if dplan is None:
        return TransportExplanation(
            destination.domain, connector.name, connector.tls, connector.tls_domain, trust, "error", False,
            "no next hop resolver answered", (), None, (),
        )  # fmt: skip
    next_hop = dplan.next_hop
    hosts: list[HostExplanation] = []
    for host in next_hop.hosts:
        decision, enforce_hp, report_hp = dplan.decide(host)
        dialled = host in dplan.hosts
        sessions: list[SessionExplanation] = []
        if connect and dialled and enforce_hp.usable and dplan.failure is None:
            for address in await deliverer.addresses(host):
                result, failure, verification, _steps = await deliverer.probe_address(destination, dplan, host, address)
                sessions.append(
                    SessionExplanation(
                        address,
                        result is not None,
                        result.tls if result is not None else None,
                        verification.label if verification is not None else None,
                        verification.matched if verification is not None else None,
                        verification.detail if verification is not None else "",
                        failure.reply if failure is not None and result is None else None,
                    )
                )
        filtering = dplan.filtering.source if dplan.filtering is not None else "an enforced policy"
        why = _why(dplan, host) if dialled else (f"outside the mx patterns of {filtering}",)
        hosts.append(
            HostExplanation(
                host=host.name,
                port=host.port,
                preference=host.preference,
                addresses=host.addresses,
                secure=host.secure,
                dialled=dialled,
                mechanism=decision.policy.source,
                policy_type=str(decision.policy.policy_type),
                enforced_by=decision.enforce.source,
                level=enforce_hp.level.name,
                usable=enforce_hp.usable and dialled,
                failure=str(enforce_hp.failure) if enforce_hp.failure is not None else None,
                sni=enforce_hp.sni or report_hp.sni or host.name,
                reference_ids=enforce_hp.reference_ids or (() if decision.enforce.source == "dane" else (host.name,)),
                why=why,
                sessions=tuple(sessions),
            )
        )
    policy = dplan.decision.policy
    return TransportExplanation(
        domain=destination.domain,
        connector=connector.name,
        connector_tls=connector.tls,
        tls_domain=connector.tls_domain,
        trust_anchors=trust,
        next_hop=next_hop.kind,
        mx_secure=next_hop.mx_secure,
        error=next_hop.error,
        policies=tuple(_policy_line(p) for p in dplan.candidates),
        destination_failure=(f"{policy.source}: {dplan.failure} ({policy.detail})" if dplan.failure else None),
        hosts=tuple(hosts),
    )


def format_transport(ex: TransportExplanation) -> str:
    lines = [
        f"{ex.domain}: connector {ex.connector} (tls {ex.connector_tls}, tls_domain {ex.tls_domain or '-'},"
        f" trust anchors: {ex.trust_anchors})",
        f"next hop {ex.next_hop}"
        + (f" (MX RRset {'secure' if ex.mx_secure else 'NOT secure'})" if ex.next_hop in ("mx", "implicit_mx") else "")
        + (f": {ex.error}" if ex.error else ""),
        "TLS policies:",
        *(f"  {p}" for p in ex.policies),
    ]
    if ex.destination_failure:
        lines.append(f"DEFERRED before connecting: {ex.destination_failure}")
    for h in ex.hosts:
        where = (
            f"{h.preference:>5} {h.host}:{h.port} [{', '.join(h.addresses) or '-'}]{' (secure)' if h.secure else ''}"
        )
        if not h.dialled:
            lines.append(f"{where}: NOT DIALLED ({'; '.join(h.why)})")
            continue
        state = f"TLS level {h.level}" if h.usable else f"SKIPPED ({h.failure or 'unusable'})"
        enforced = f", enforced by {h.enforced_by}" if h.enforced_by != h.mechanism else ""
        lines.append(f"{where}: {h.mechanism} ({h.policy_type}{enforced}), {state}")
        lines.append(
            f"        SNI {h.sni or '-'}" + (f", names {', '.join(h.reference_ids)}" if h.reference_ids else "")
        )
        lines.extend(f"        {w}" for w in h.why)
        for s in h.sessions:
            if s.ok:
                by = f" ({s.matched})" if s.matched else ""
                lines.append(f"        connect {s.address}: {s.tls or 'cleartext'}, peer {s.verification or '-'}{by}")
            else:
                lines.append(f"        connect {s.address}: FAILED {s.failure}")
    return "\n".join(lines)
