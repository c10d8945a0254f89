"""What a DNS lookup answers: :class:`DnsAnswer` (records, kind, DNSSEC status), :class:`HostAddresses`, the
resolver self-test's :class:`SelfTestResult`. Values only; the :class:`~mxgate.core.dns.Resolver` makes them.

Failures are return values, never exceptions: a caller checks :attr:`DnsAnswer.is_failure` and defers. Only
programming errors (an unknown record type, a syntactically impossible name) raise.

Names in :class:`DnsAnswer` are absolute, lower-case and written *without* the trailing dot
(``"mx1.example.org"``); the root is ``"."``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import dns.name
import dns.rdata
import dns.rdtypes.ANY.MX

from mxgate.core.errors import MxgateError
from mxgate.core.model import StashKey

__all__ = [
    "DNSSEC_SELF_TEST",
    "AnswerKind",
    "DnsAnswer",
    "DnsNameError",
    "DnssecStatus",
    "HostAddresses",
    "SelfTestResult",
    "format_name",
]


class DnsNameError(MxgateError, ValueError):
    """A name that cannot exist in the DNS (empty label, label over 63 octets, name over 255 octets)."""


class DnssecStatus(StrEnum):
    """DNSSEC state of an answer (RFC 4035 §4.3)."""

    SECURE = "secure"
    INSECURE = "insecure"
    BOGUS = "bogus"
    INDETERMINATE = "indeterminate"


class AnswerKind(StrEnum):
    """What the DNS said. ``ERROR`` (SERVFAIL, timeout, REFUSED, bogus) never means "no record"."""

    ANSWER = "answer"
    NODATA = "nodata"
    NXDOMAIN = "nxdomain"
    ERROR = "error"


def format_name(name: dns.name.Name) -> str:
    """The convention of this module: lower-case, no trailing dot, ``"."`` for the root."""
    if name == dns.name.root:
        return "."
    return name.to_text(omit_final_dot=True).lower()


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """One lookup's result. ``records`` are the query type's rdata at ``canonical_name`` (never RRSIGs)."""

    name: str  # query name: lower-case, no trailing dot
    rdtype: str  # "MX", "A", "AAAA", "TLSA", ...
    kind: AnswerKind
    status: DnssecStatus
    records: tuple[dns.rdata.Rdata, ...]
    ttl: int  # seconds left (counts down when served from cache)
    canonical_name: str  # after CNAME expansion; == name without CNAME
    cname_chain: tuple[str, ...]  # every name from the query name to canonical_name; () without CNAME
    error: str | None = None  # why kind is ERROR
    ede: tuple[tuple[int, str], ...] = ()  # RFC 8914 extended errors seen (code, extra text)
    server: str = ""  # endpoint that produced the answer, "host:port"

    @property
    def is_failure(self) -> bool:
        """True when the caller must not use this as a fact (defer instead): error, bogus or indeterminate."""
        return self.kind is AnswerKind.ERROR or self.status in (
            DnssecStatus.BOGUS,
            DnssecStatus.INDETERMINATE,
        )

    @property
    def is_secure(self) -> bool:
        """A validated fact: records (or their proven absence) are DNSSEC-secure."""
        return not self.is_failure and self.status is DnssecStatus.SECURE

    @property
    def exists(self) -> bool:
        """Records of the type exist (``kind`` is ``ANSWER``)."""
        return self.kind is AnswerKind.ANSWER

    @property
    def is_negative(self) -> bool:
        """The name or type does not exist (NXDOMAIN or NODATA); bogus/failed lookups are never negative."""
        return self.kind in (AnswerKind.NXDOMAIN, AnswerKind.NODATA)

    @property
    def is_null_mx(self) -> bool:
        """RFC 7505 null MX: exactly one MX record, preference 0, exchange ``.``."""
        if self.kind is not AnswerKind.ANSWER or self.rdtype != "MX" or len(self.records) != 1:
            return False
        rd = self.records[0]
        return isinstance(rd, dns.rdtypes.ANY.MX.MX) and rd.preference == 0 and rd.exchange == dns.name.root


@dataclass(frozen=True, slots=True)
class HostAddresses:
    """A host name's addresses, as ``Resolver.host_addresses`` found them: the AAAA and the A answer.

    The order is fixed: **AAAA first, then A** (RFC 6724 §6 rule 6 prefers IPv6 destinations; RFC 8305 starts
    with IPv6; Postfix, Exim and the delivery path sort so). Every user of addresses takes them in this order.

    Security is decided per RRset (RFC-CHECKLIST 38, as Postfix does): a lookup that failed without a DNSSEC
    verdict (timeout, SERVFAIL) contributes no addresses and does *not* make the host insecure; the answered
    RRsets decide. So an attacker who drops AAAA queries gets fewer addresses, never a weaker policy. A bogus
    RRset is a failure with a verdict (:attr:`bogus`). Failures never become "no record": :attr:`is_negative`
    is true only when both lookups positively said there is nothing.
    """

    name: str  # as asked: lower-case, no trailing dot
    aaaa: DnsAnswer
    a: DnsAnswer

    @property
    def answers(self) -> tuple[DnsAnswer, DnsAnswer]:
        """``(aaaa, a)``: the documented order."""
        return self.aaaa, self.a

    @property
    def answered(self) -> tuple[DnsAnswer, ...]:
        """The RRsets that are facts (not failures), in order."""
        return tuple(x for x in (self.aaaa, self.a) if not x.is_failure)

    @property
    def failures(self) -> tuple[DnsAnswer, ...]:
        """The lookups that failed (error, bogus, indeterminate), in order."""
        return tuple(x for x in (self.aaaa, self.a) if x.is_failure)

    @property
    def addresses(self) -> tuple[str, ...]:
        """Addresses of the answered RRsets: AAAA's, then A's (as text)."""
        return tuple(str(getattr(r, "address", r)) for x in self.answered if x.exists for r in x.records)

    @property
    def bogus(self) -> DnsAnswer | None:
        """The first RRset that failed DNSSEC validation (AAAA before A), if any."""
        return next((x for x in (self.aaaa, self.a) if x.status is DnssecStatus.BOGUS), None)

    @property
    def all_failed(self) -> bool:
        """Neither lookup produced a fact: the host is skipped for now (never "no address")."""
        return not self.answered

    @property
    def is_secure(self) -> bool:
        """Addresses exist and every answered RRset is DNSSEC-secure (a failed one does not count; a bogus one
        forbids)."""
        answered = self.answered
        return (
            self.bogus is None
            and bool(answered)
            and all(x.is_secure for x in answered)
            and any(x.exists for x in answered)
        )

    @property
    def is_negative(self) -> bool:
        """Both lookups said NXDOMAIN/NODATA: the host has no address records (a failure is never this)."""
        return self.aaaa.is_negative and self.a.is_negative

    @property
    def error(self) -> str:
        """The failed lookups described (``"AAAA indeterminate: timeout; ..."``); ``""`` when none failed."""
        return "; ".join(f"{x.rdtype} {x.status}: {x.error or x.kind}" for x in self.failures)


@dataclass(frozen=True, slots=True)
class SelfTestResult:
    """Outcome of :meth:`~mxgate.core.dns.Resolver.self_test`: does the resolver really validate?"""

    validating: bool
    secure_name: str
    bogus_name: str
    secure_status: DnssecStatus
    bogus_status: DnssecStatus
    detail: str


#: In ``runtime.stash``: the latest resolver self-test result, set by the agent that runs it (the built-in
#: ``dnssec`` plugin) and read by those that must know whether the AD bit means anything (DANE). Unset until the
#: first verdict: a reader then relies on each answer's own status.
DNSSEC_SELF_TEST: Final = StashKey[SelfTestResult]()
