"""What the DNS says about each host of a next hop, for DANE (RFC 7672 §2.2): which address RRsets answered
and how securely, which TLSA base domain (CNAME-expanded or initial name), which records, and their DNSSEC status.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from mxgate import DnssecStatus, HopHost, NextHop, Resolver, TlsRptResult
from mxgate.plugins.dane.records import Tlsa, effective_records, records_of

__all__ = ["HostDane", "HostState", "address_list", "examine_host", "is_ip"]


class HostState(StrEnum):
    DANE = "dane"  # secure TLSA with usable records: authenticated TLS required
    NO_USABLE = "no_usable"  # secure TLSA, none usable: TLS required, unauthenticated
    NO_TLSA = "no_tlsa"  # secure or insecure denial, or insecure records: DANE does not apply
    INSECURE_HOST = "insecure_host"  # the address records are not secure: TLSA not looked up
    NOT_APPLICABLE = "not_applicable"  # an IP literal
    FAILED = "failed"  # bogus or failed lookup: the host is unusable


@dataclass(frozen=True, slots=True)
class HostDane:
    """What the DNS says about one host, and the DANE decision for it."""

    host: str
    port: int
    state: HostState
    base_domain: str  # TLSA base domain (and SNI) when TLSA was found, else the host name
    tlsa_name: str | None = None  # the owner looked up last
    tlsa_status: str = ""  # "secure", "insecure", "bogus", ... of that lookup
    records: tuple[Tlsa, ...] = ()  # the whole RRset as published
    usable: tuple[Tlsa, ...] = ()  # what matching uses (after usability and digest agility)
    unusable: tuple[tuple[Tlsa, str], ...] = ()
    reference_ids: tuple[str, ...] = ()  # DANE-TA names: base domain, original name, nexthop (secure MX)
    name_secure: bool = True  # the MX RRset (or the configured name) is secure: "verified", else "trusted"
    failure: TlsRptResult | None = None
    detail: str = ""

    @property
    def label(self) -> str:
        return "verified" if self.name_secure else "trusted"


def is_ip(name: str) -> bool:
    """An IP literal (``192.0.2.1``, ``[2001:db8::1]``): no TLSA is looked up for it."""
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


async def address_list(resolver: Resolver, host: str) -> tuple[str, ...]:
    """The addresses to dial for ``host`` (``Resolver.host_addresses``: AAAA first, then A; an IP literal is
    itself)."""
    if is_ip(host):
        return (host.strip("[]"),)
    return (await resolver.host_addresses(host)).addresses


async def examine_host(resolver: Resolver, host: HopHost, next_hop: NextHop) -> HostDane:
    """Look up and classify the TLSA records of one host of ``next_hop`` (RFC 7672 §2.2)."""
    name = host.name.lower().rstrip(".")
    port = host.port
    name_secure = next_hop.mx_secure if next_hop.kind == "mx" else True
    if is_ip(name):
        return HostDane(name, port, HostState.NOT_APPLICABLE, name, detail="IP literal: no TLSA")
    addrs = await resolver.host_addresses(name)
    bad = addrs.bogus
    if bad is not None:
        return HostDane(
            name,
            port,
            HostState.FAILED,
            name,
            failure=TlsRptResult.DNSSEC_INVALID,
            detail=f"{bad.rdtype} lookup for {name} is bogus: {bad.error or 'validation failed'}",
        )
    # Per address RRset (Resolver.host_addresses, RFC-CHECKLIST 38, as Postfix): a failed lookup never makes the
    # host insecure; when none was answered the host is skipped for this attempt. Dropping AAAA queries must not
    # switch DANE off.
    if addrs.all_failed:
        a, aaaa = addrs.a, addrs.aaaa
        return HostDane(
            name,
            port,
            HostState.FAILED,
            name,
            name_secure=name_secure,
            detail=f"address lookups for {name} failed ({a.error or a.status}; {aaaa.error or aaaa.status}): "
            "host skipped for this attempt",
        )
    if not (host.secure or addrs.is_secure):
        return HostDane(
            name,
            port,
            HostState.INSECURE_HOST,
            name,
            name_secure=name_secure,
            detail="address records not DNSSEC-secure: no TLSA lookup",
        )
    answered = [x for x in (addrs.a, addrs.aaaa) if not x.is_failure]  # A first: as before, for the CNAME target
    found = next((x for x in answered if x.exists), answered[0])
    expanded = found.canonical_name if found.cname_chain and found.is_secure else name
    candidates = [expanded, name] if expanded != name else [name]
    ids: list[str] = list(dict.fromkeys(candidates))
    if next_hop.kind == "mx" and next_hop.mx_secure:
        ids.append(next_hop.destination.domain.lower().rstrip("."))
    reference_ids = tuple(dict.fromkeys(ids))
    last: HostDane | None = None
    for base in candidates:
        owner = f"_{port}._tcp.{base}"
        answer = await resolver.resolve(owner, "TLSA")
        common: dict[str, Any] = {
            "tlsa_name": owner,
            "tlsa_status": str(answer.status),
            "reference_ids": reference_ids,
            "name_secure": name_secure,
        }
        if answer.is_failure:
            why = "bogus" if answer.status is DnssecStatus.BOGUS else "failed"
            return HostDane(
                name,
                port,
                HostState.FAILED,
                base,
                failure=TlsRptResult.DNSSEC_INVALID,
                detail=f"TLSA lookup {owner} {why}: {answer.error or answer.status}",
                **common,
            )
        if answer.exists:
            records = records_of(answer)
            if answer.status is not DnssecStatus.SECURE:
                # RFC 7672 §2.2.3: insecure records at the CNAME-expanded name: the initial name is tried next
                last = HostDane(
                    name,
                    port,
                    HostState.NO_TLSA,
                    name,
                    records=records,
                    detail=f"TLSA records at {owner} insecure: ignored",
                    **common,
                )
                continue
            usable, unusable = effective_records(records)
            state = HostState.DANE if usable else HostState.NO_USABLE
            detail = (
                f"{len(usable)} usable TLSA record(s) at {owner}"
                if usable
                else f"TLSA at {owner} but none usable: TLS required, unauthenticated"
            )
            return HostDane(
                name, port, state, base, records=records, usable=usable, unusable=unusable, detail=detail, **common
            )
        last = HostDane(
            name,
            port,
            HostState.NO_TLSA,
            name,
            detail=f"no TLSA at {owner} ({answer.status} {answer.kind})",
            **common,
        )
        # a denial (secure or not) at the CNAME-expanded name: the initial name is tried next (RFC 7672 §2.2.3,
        # as Postfix and mox do); at the initial name it means no DANE for this host
    assert last is not None
    return last
