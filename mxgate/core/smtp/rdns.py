"""The client's reverse DNS: PTR, then forward confirmation (FCrDNS), as Postfix's smtpd does it.

``from helo (name [ip])`` in a ``Received:`` header (RFC 5321 §4.4) names the client only by a name whose PTR
points to it *and* whose A/AAAA records point back: anyone can publish a PTR for their own addresses that says
``mail.bank.example``. :func:`confirm` is that decision, free of I/O; :func:`lookup` does the queries with the
core resolver. A lookup never raises and never decides anything else: a failure is ``FAILED`` and the client is
"unknown", as it is without a PTR.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import dns.rdtypes.ANY.PTR

from mxgate.core.model import ReverseDnsStatus

if TYPE_CHECKING:
    from mxgate.core.dns import Resolver
    from mxgate.core.dns_answers import DnsAnswer

__all__ = ["MAX_PTR_NAMES", "ReverseDns", "confirm", "lookup", "reverse_query"]

MAX_PTR_NAMES: Final = 10  # PTR names checked for forward confirmation (more is an abuse of the lookup)


@dataclass(frozen=True, slots=True)
class ReverseDns:
    status: ReverseDnsStatus
    name: str | None = None  # the verified name (VERIFIED only)

    @classmethod
    def failed(cls) -> ReverseDns:
        return cls(ReverseDnsStatus.FAILED)


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


def confirm(ip: str, ptr: DnsAnswer, forward: Mapping[str, DnsAnswer]) -> ReverseDns:
    """The verdict from the PTR answer for ``ip`` and the forward answers (A for IPv4, AAAA for IPv6) of its
    names: the first PTR name (in answer order) whose addresses include ``ip`` is verified."""
    if ptr.is_failure:
        return ReverseDns.failed()
    names = ptr_names(ptr)
    if not names:
        return ReverseDns(ReverseDnsStatus.NONE)
    address = ipaddress.ip_address(ip)
    failed = False
    for name in names:
        answer = forward.get(name)
        if answer is None or answer.is_failure:
            failed = True
            continue
        if any(ipaddress.ip_address(rd.to_text()) == address for rd in answer.records):
            return ReverseDns(ReverseDnsStatus.VERIFIED, name)
    return ReverseDns.failed() if failed else ReverseDns(ReverseDnsStatus.UNVERIFIED)


def ptr_names(ptr: DnsAnswer) -> tuple[str, ...]:
    """The PTR targets, normalised (lower case, no final dot), at most :data:`MAX_PTR_NAMES`, root excluded."""
    out: list[str] = []
    for rd in ptr.records:
        if isinstance(rd, dns.rdtypes.ANY.PTR.PTR):
            name = _norm(rd.target.to_text())
            if name and name not in out:
                out.append(name)
    return tuple(out[:MAX_PTR_NAMES])


_REVERSE_CACHE_SIZE: Final = 4096
_reverse_names: dict[str, tuple[str, str, str] | None] = {}


def reverse_query(ip: str) -> tuple[str, str, str] | None:
    """``(address, PTR name, forward type)`` for a client address (an IPv4-mapped IPv6 address as IPv4), ``None``
    if it is not an address. Remembered (the same clients come back): parsing it is most of a cached lookup."""
    if ip in _reverse_names:
        return _reverse_names[ip]
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        query = None
    else:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        query = (str(address), address.reverse_pointer + ".", "A" if address.version == 4 else "AAAA")
    if len(_reverse_names) >= _REVERSE_CACHE_SIZE:
        _reverse_names.clear()
    _reverse_names[ip] = query
    return query


async def lookup(resolver: Resolver, ip: str) -> ReverseDns:
    """PTR of ``ip``, then A or AAAA of each PTR name (concurrently); never raises for DNS outcomes. The caller
    bounds the time (``asyncio.wait_for``): a lookup that does not finish is ``FAILED``."""
    query = reverse_query(ip)
    if query is None:
        return ReverseDns.failed()
    ip, reverse, rdtype = query
    ptr = await resolver.resolve(reverse, "PTR")
    names: Sequence[str] = () if ptr.is_failure else ptr_names(ptr)
    if len(names) == 1:  # the usual case: no task for one query
        answers: Sequence[DnsAnswer] = (await resolver.resolve(names[0], rdtype),)
    else:
        answers = await asyncio.gather(*(resolver.resolve(n, rdtype) for n in names))
    return confirm(ip, ptr, dict(zip(names, answers, strict=True)))
