"""Async DNS resolver facade: every answer carries its DNSSEC status.

mxgate does not validate DNSSEC itself (yet): it asks a *validating* resolver and reads the AD bit, which is
only meaningful when the path to that resolver cannot be tampered with (RFC 7672 §2.1.3, RFC 6698 §4.1).
The rules:

* Queries carry EDNS0 with the DO bit and no CD bit.
* The AD bit is trusted only from an endpoint on loopback (``127.0.0.0/8``, ``::1``) or one configured with
  ``trusted=True``. From any other endpoint every answer is :attr:`DnssecStatus.INSECURE` (a warning is logged
  once, when the :class:`Resolver` is built).
* NOERROR or NXDOMAIN with AD: ``SECURE``; without AD: ``INSECURE``.
* SERVFAIL: an RFC 8914 extended error that names a DNSSEC failure (6 "DNSSEC Bogus", 7 "Signature Expired",
  9 "DNSKEY Missing", ...) makes it ``BOGUS``. Otherwise the query is repeated with CD set: if the resolver
  can produce data when told not to validate, the data failed validation: ``BOGUS``. If it still cannot: the
  lookup is ``INDETERMINATE``. Either way the answer has ``kind=ERROR`` and no records: bogus data is never
  data.
* Timeouts, REFUSED, network errors: ``kind=ERROR``, ``INDETERMINATE``; the next endpoint is tried.

Failures are return values, never exceptions: a caller checks :attr:`DnsAnswer.is_failure` and defers. Only
programming errors (an unknown record type, a syntactically impossible name) raise. The answers' types are in
:mod:`mxgate.core.dns_answers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import dns.asyncquery
import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rrset

from mxgate.core.dns_answers import (
    AnswerKind,
    DnsAnswer,
    DnsNameError,
    DnssecStatus,
    HostAddresses,
    SelfTestResult,
    format_name,
)

__all__ = [
    "Resolver",
    "ResolverEndpoint",
    "resolver_from_config",
    "system_resolvers",
]

log = logging.getLogger(__name__)

#: RFC 8914 codes that say "the data failed DNSSEC validation".
BOGUS_EDE_CODES = frozenset({6, 7, 8, 9, 10, 11, 12, 25})
#: RFC 8914 codes that say "validation could not be completed".
INDETERMINATE_EDE_CODES = frozenset({5})
#: RFC 8914 codes that say "the authorities could not be reached" (not a DNSSEC verdict).
UNREACHABLE_EDE_CODES = frozenset({22, 23})

_MAX_CNAME_CHAIN = 16
_DEFAULT_NEGATIVE_TTL = 60
_EDNS_PAYLOAD = 1232  # DNS flag day 2020
_KEY_CACHE_SIZE = 4096  # parsed query names kept (cleared when full)


def _parse_name(name: str | dns.name.Name) -> dns.name.Name:
    if isinstance(name, dns.name.Name):
        return name if name.is_absolute() else name.concatenate(dns.name.root)
    try:
        return dns.name.from_text(name.strip() or ".", origin=dns.name.root)
    except (dns.exception.DNSException, UnicodeError) as exc:
        raise DnsNameError(f"invalid DNS name {name!r}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class ResolverEndpoint:
    """A recursive resolver to ask. ``host`` is an IP address.

    ``trusted``: ``None`` (default) believes the AD bit exactly when ``host`` is a loopback address; ``True``
    believes it from anywhere (a validating resolver reached over a secured path: IPsec, a private link);
    ``False`` never believes it, even on loopback (e.g. a local port forwarded to a remote resolver).
    """

    host: str
    port: int = 53
    trusted: bool | None = None

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError as exc:
            raise ValueError(f"resolver host must be an IP address, got {self.host!r}") from exc
        if not 0 < self.port < 65536:
            raise ValueError(f"resolver port out of range: {self.port}")

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    @property
    def trusts_ad(self) -> bool:
        """True when the AD bit from this endpoint may be believed (loopback or explicitly trusted)."""
        return self.is_loopback if self.trusted is None else self.trusted

    @classmethod
    def parse(cls, text: str, *, trusted: bool | None = None) -> ResolverEndpoint:
        """Parse ``"127.0.0.1"``, ``"127.0.0.1:5353"``, ``"::1"`` or ``"[::1]:5353"``."""
        text = text.strip()
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"bad resolver address {text!r}")
            port = int(rest[1:]) if rest else 53
            return cls(host, port, trusted)
        if text.count(":") == 1:
            host, _, port_text = text.partition(":")
            return cls(host, int(port_text), trusted)
        return cls(text, 53, trusted)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


Observer = Callable[[DnsAnswer, float], None]


@dataclass(slots=True)
class _CacheEntry:
    answer: DnsAnswer
    stored_at: float
    expires_at: float
    aged: DnsAnswer | None = None  # the answer with its TTL counted down, as last handed out


class Resolver:
    """Ask recursive resolvers; return :class:`DnsAnswer` with a DNSSEC status; cache by TTL.

    :param endpoints: tried in order; the next one is used when one fails (timeout, SERVFAIL without a DNSSEC
        verdict, REFUSED). A bogus verdict is final.
    :param timeout: seconds per query attempt (UDP, plus TCP when truncated).
    :param cache_size: entries kept (LRU); 0 disables caching.
    :param clock: monotonic seconds; inject a fake one in tests.
    :param observer: called after each lookup that went to the network, with the answer and its latency.
    :param error_ttl: seconds an ERROR answer is cached (0: not at all).
    :param max_ttl: cap on the cache lifetime of any answer.
    """

    def __init__(
        self,
        endpoints: Sequence[ResolverEndpoint],
        *,
        timeout: float = 5.0,
        cache_size: int = 10000,
        clock: Callable[[], float] = time.monotonic,
        observer: Observer | None = None,
        error_ttl: int = 5,
        max_ttl: int = 86400,
    ) -> None:
        if not endpoints:
            raise ValueError("Resolver needs at least one endpoint")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._endpoints = tuple(endpoints)
        self._timeout = timeout
        self._cache_size = max(0, cache_size)
        self._clock = clock
        self._observer = observer
        self._error_ttl = max(0, error_ttl)
        self._max_ttl = max_ttl
        self._cache: OrderedDict[tuple[dns.name.Name, int], _CacheEntry] = OrderedDict()
        self._keys: dict[tuple[str, str], tuple[dns.name.Name, int]] = {}
        self._inflight: dict[tuple[dns.name.Name, int], asyncio.Task[DnsAnswer]] = {}
        for ep in self._endpoints:
            if not ep.trusts_ad:
                log.warning(
                    "DNS resolver %s is not trusted (not on loopback, or trusted = false): its AD bit is "
                    "ignored and EVERY answer from it is treated as DNSSEC-insecure (DANE cannot apply). "
                    "Run a validating resolver on this host, or set trusted = true if the path is secured.",
                    ep,
                )

    @property
    def endpoints(self) -> tuple[ResolverEndpoint, ...]:
        return self._endpoints

    @property
    def trusts_ad(self) -> bool:
        """True when every endpoint's AD bit is believed, so SECURE answers are possible from all of them."""
        return all(ep.trusts_ad for ep in self._endpoints)

    @property
    def cache_len(self) -> int:
        return len(self._cache)

    def clear_cache(self) -> None:
        self._cache.clear()

    def _key(self, name: str | dns.name.Name, rdtype: str) -> tuple[dns.name.Name, int]:
        key = self._keys.get((name, rdtype)) if isinstance(name, str) else None
        if key is None:
            qtype = dns.rdatatype.from_text(rdtype)  # raises for an unknown type name: a programming error
            key = (_parse_name(name), int(qtype))
            if isinstance(name, str):  # names parsed once: the hot path asks for the same few names again
                if len(self._keys) >= _KEY_CACHE_SIZE:
                    self._keys.clear()
                self._keys[(name, rdtype)] = key
        return key

    async def resolve(self, name: str | dns.name.Name, rdtype: str, *, use_cache: bool = True) -> DnsAnswer:
        """Look up ``rdtype`` at ``name``; never raises for DNS outcomes (see the module docstring)."""
        key = self._key(name, rdtype)
        if use_cache:
            cached = self._cache_get(key)
            if cached is not None:
                return cached
        qname, qtype = key[0], dns.rdatatype.RdataType(key[1])
        if use_cache:
            task = self._inflight.get(key)
            if task is None:
                task = asyncio.ensure_future(self._lookup_and_store(qname, qtype))
                self._inflight[key] = task
                task.add_done_callback(functools.partial(self._forget_inflight, key))
            return await asyncio.shield(task)
        return await self._lookup_and_store(qname, qtype)

    async def host_addresses(self, name: str | dns.name.Name) -> HostAddresses:
        """The one host -> addresses lookup: AAAA and A for ``name``, asked concurrently, each with its DNSSEC
        status; see :class:`HostAddresses` for the order (AAAA first) and the per-RRset security rule. Never
        raises for DNS outcomes; an IP literal is the caller's business (it is not a host name)."""
        cached_a, cached_aaaa = self._cache_get(self._key(name, "A")), self._cache_get(self._key(name, "AAAA"))
        if cached_a is not None and cached_aaaa is not None:  # both cached: no tasks to start (every delivery asks)
            a, aaaa = cached_a, cached_aaaa
        else:
            a, aaaa = await asyncio.gather(self.resolve(name, "A"), self.resolve(name, "AAAA"))
        text = name if isinstance(name, str) else format_name(name)
        return HostAddresses(text.lower().rstrip(".") or ".", aaaa=aaaa, a=a)

    async def self_test(self, secure_name: str, bogus_name: str, *, rdtype: str = "A") -> SelfTestResult:
        """Prove that the resolver validates: ``secure_name`` must be SECURE and ``bogus_name`` BOGUS.

        Bypasses the cache. NODATA counts for the secure name: only the status matters.
        """
        secure, bogus = await asyncio.gather(
            self.resolve(secure_name, rdtype, use_cache=False),
            self.resolve(bogus_name, rdtype, use_cache=False),
        )
        problems: list[str] = []
        if not self.trusts_ad:
            untrusted = ", ".join(str(ep) for ep in self._endpoints if not ep.trusts_ad)
            problems.append(f"AD bit not trusted from {untrusted}")
        if secure.status is not DnssecStatus.SECURE or secure.kind is AnswerKind.ERROR:
            why = f" ({secure.error})" if secure.error else ""
            problems.append(f"{secure.name} {rdtype} came back {secure.kind}/{secure.status}, expected secure{why}")
        if bogus.status is not DnssecStatus.BOGUS:
            problems.append(f"{bogus.name} {rdtype} came back {bogus.kind}/{bogus.status}, expected bogus (SERVFAIL)")
        validating = not problems
        detail = (
            f"resolver validates: {secure.name} is secure, {bogus.name} is bogus"
            if validating
            else "resolver does NOT validate DNSSEC: " + "; ".join(problems)
        )
        return SelfTestResult(
            validating=validating,
            secure_name=secure.name,
            bogus_name=bogus.name,
            secure_status=secure.status,
            bogus_status=bogus.status,
            detail=detail,
        )

    def _forget_inflight(self, key: tuple[dns.name.Name, int], _task: asyncio.Task[DnsAnswer]) -> None:
        self._inflight.pop(key, None)

    # -- cache ---------------------------------------------------------------------------------------------

    def _cache_get(self, key: tuple[dns.name.Name, int]) -> DnsAnswer | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now >= entry.expires_at:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        remaining = int(entry.expires_at - now)
        if remaining == entry.answer.ttl:
            return entry.answer
        if entry.aged is None or entry.aged.ttl != remaining:
            entry.aged = dataclasses.replace(entry.answer, ttl=remaining)
        return entry.aged

    def _cache_put(self, key: tuple[dns.name.Name, int], answer: DnsAnswer) -> None:
        if self._cache_size == 0:
            return
        lifetime = self._error_ttl if answer.kind is AnswerKind.ERROR else min(answer.ttl, self._max_ttl)
        if lifetime <= 0:
            return
        now = self._clock()
        self._cache[key] = _CacheEntry(answer, now, now + lifetime)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def _lookup_and_store(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType) -> DnsAnswer:
        started = time.perf_counter()
        answer = await self._lookup(qname, qtype)
        latency = time.perf_counter() - started
        self._cache_put((qname, int(qtype)), answer)
        if self._observer is not None:
            try:
                self._observer(answer, latency)
            except Exception:  # an observer (metrics) must never break resolution
                log.exception("DNS observer failed")
        return answer

    # -- network -------------------------------------------------------------------------------------------

    async def _lookup(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType) -> DnsAnswer:
        errors: list[str] = []
        answer: DnsAnswer | None = None
        for ep in self._endpoints:
            answer = await self._ask_endpoint(ep, qname, qtype)
            if answer.kind is not AnswerKind.ERROR or answer.status is DnssecStatus.BOGUS:
                return answer
            errors.append(f"{ep}: {answer.error}")
        assert answer is not None  # endpoints is never empty
        if len(errors) > 1:
            answer = dataclasses.replace(answer, error="; ".join(errors))
        return answer

    async def _query(
        self, ep: ResolverEndpoint, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, *, cd: bool
    ) -> dns.message.Message | str:
        """One exchange; returns the response, or an error description."""
        q = dns.message.make_query(qname, qtype, use_edns=0, want_dnssec=True, payload=_EDNS_PAYLOAD)
        q.flags |= dns.flags.RD
        q.flags &= ~dns.flags.AD
        if cd:
            q.flags |= dns.flags.CD
        else:
            q.flags &= ~dns.flags.CD
        try:
            response, _ = await asyncio.wait_for(
                dns.asyncquery.udp_with_fallback(q, ep.host, timeout=self._timeout, port=ep.port),
                timeout=self._timeout * 2 + 1,
            )
        except (dns.exception.Timeout, TimeoutError):
            return "timeout"
        except OSError as exc:
            return f"network error: {exc.strerror or exc}"
        except (dns.exception.DNSException, ValueError, EOFError) as exc:
            return f"bad response: {type(exc).__name__}: {exc}"
        return response

    def _error(
        self,
        ep: ResolverEndpoint,
        qname: dns.name.Name,
        qtype: dns.rdatatype.RdataType,
        status: DnssecStatus,
        error: str,
        ede: tuple[tuple[int, str], ...] = (),
    ) -> DnsAnswer:
        text = format_name(qname)
        return DnsAnswer(
            name=text,
            rdtype=dns.rdatatype.to_text(qtype),
            kind=AnswerKind.ERROR,
            status=status,
            records=(),
            ttl=0,
            canonical_name=text,
            cname_chain=(),
            error=error,
            ede=ede,
            server=str(ep),
        )

    async def _ask_endpoint(
        self, ep: ResolverEndpoint, qname: dns.name.Name, qtype: dns.rdatatype.RdataType
    ) -> DnsAnswer:
        response = await self._query(ep, qname, qtype, cd=False)
        if isinstance(response, str):
            return self._error(ep, qname, qtype, DnssecStatus.INDETERMINATE, response)
        ede = _ede(response)
        rcode = response.rcode()
        if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return self._interpret(ep, qname, qtype, response, ede)
        rcode_text = dns.rcode.to_text(rcode)
        ede_text = "".join(f" EDE {code}" + (f" ({extra})" if extra else "") for code, extra in ede)
        if rcode != dns.rcode.SERVFAIL or not ep.trusts_ad:
            return self._error(ep, qname, qtype, DnssecStatus.INDETERMINATE, f"{rcode_text}{ede_text}", ede)
        codes = {code for code, _ in ede}
        if codes & BOGUS_EDE_CODES:
            return self._error(ep, qname, qtype, DnssecStatus.BOGUS, f"DNSSEC validation failed:{ede_text}", ede)
        if codes & (INDETERMINATE_EDE_CODES | UNREACHABLE_EDE_CODES):
            return self._error(ep, qname, qtype, DnssecStatus.INDETERMINATE, f"SERVFAIL{ede_text}", ede)
        # No verdict in the response: ask again with checking disabled. Data without validation means the data
        # is there but failed validation: bogus. Nothing either way: the lookup itself failed.
        retry = await self._query(ep, qname, qtype, cd=True)
        if isinstance(retry, str):
            return self._error(
                ep, qname, qtype, DnssecStatus.INDETERMINATE, f"SERVFAIL{ede_text}; CD retry: {retry}", ede
            )
        retry_ede = ede + tuple(e for e in _ede(retry) if e not in ede)
        retry_rcode = retry.rcode()
        if retry_rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return self._error(
                ep,
                qname,
                qtype,
                DnssecStatus.BOGUS,
                f"SERVFAIL{ede_text}, but {dns.rcode.to_text(retry_rcode)} with checking disabled: "
                "DNSSEC validation failed",
                retry_ede,
            )
        return self._error(
            ep,
            qname,
            qtype,
            DnssecStatus.INDETERMINATE,
            f"SERVFAIL{ede_text}; CD retry: {dns.rcode.to_text(retry_rcode)}",
            retry_ede,
        )

    def _interpret(
        self,
        ep: ResolverEndpoint,
        qname: dns.name.Name,
        qtype: dns.rdatatype.RdataType,
        response: dns.message.Message,
        ede: tuple[tuple[int, str], ...],
    ) -> DnsAnswer:
        secure = ep.trusts_ad and bool(response.flags & dns.flags.AD)
        status = DnssecStatus.SECURE if secure else DnssecStatus.INSECURE
        answers: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
        for rrset in response.answer:
            answers.setdefault((rrset.name, int(rrset.rdtype)), rrset)

        current = qname
        chain: list[dns.name.Name] = [qname]
        ttls: list[int] = []
        if qtype != dns.rdatatype.CNAME:
            for _ in range(_MAX_CNAME_CHAIN + 1):
                cname = answers.get((current, int(dns.rdatatype.CNAME)))
                if cname is None or len(cname) == 0:
                    break
                target: dns.name.Name = cname[0].target
                ttls.append(cname.ttl)
                if target in chain:
                    return self._error(ep, qname, qtype, DnssecStatus.INDETERMINATE, "CNAME loop", ede)
                chain.append(target)
                current = target
            else:
                return self._error(ep, qname, qtype, DnssecStatus.INDETERMINATE, "CNAME chain too long", ede)

        final = answers.get((current, int(qtype)))
        if final is not None and len(rrset) > 0:
            kind = AnswerKind.ANSWER
            records: tuple[dns.rdata.Rdata, ...] = tuple(final)
            ttls.append(final.ttl)
        else:
            kind = AnswerKind.NXDOMAIN if response.rcode() == dns.rcode.NXDOMAIN else AnswerKind.NODATA
            records = ()
            ttls.append(_negative_ttl(response))
        return DnsAnswer(
            name=format_name(qname),
            rdtype=dns.rdatatype.to_text(qtype),
            kind=kind,
            status=status,
            records=records,
            ttl=max(0, min(ttls)),
            canonical_name=format_name(current),
            cname_chain=tuple(format_name(n) for n in chain) if len(chain) > 1 else (),
            error=None,
            ede=ede,
            server=str(ep),
        )


def _ede(response: dns.message.Message) -> tuple[tuple[int, str], ...]:
    out: list[tuple[int, str]] = []
    with contextlib.suppress(Exception):  # malformed options must not break interpretation
        for opt in response.extended_errors():
            out.append((int(opt.code), opt.text or ""))
    return tuple(out)


def _negative_ttl(response: dns.message.Message) -> int:
    """RFC 2308 §5: the negative TTL is min(SOA TTL, SOA MINIMUM) of the SOA in the authority section."""
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset) > 0:
            minimum: int = rrset[0].minimum
            return min(rrset.ttl, minimum)
    return _DEFAULT_NEGATIVE_TTL


# -- construction from configuration ---------------------------------------------------------------------


class _EndpointConf(Protocol):
    @property
    def address(self) -> str: ...
    @property
    def trusted(self) -> bool: ...


class _DnsConf(Protocol):
    @property
    def resolvers(self) -> Sequence[_EndpointConf]: ...
    @property
    def timeout(self) -> float: ...
    @property
    def cache_size(self) -> int: ...


def system_resolvers(path: str | Path = "/etc/resolv.conf") -> tuple[ResolverEndpoint, ...]:
    """``nameserver`` lines of resolv.conf (IPv6 zone ids dropped); ``127.0.0.1:53`` when there are none."""
    found: list[ResolverEndpoint] = []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            with contextlib.suppress(ValueError):
                found.append(ResolverEndpoint(parts[1].split("%", 1)[0]))
    return tuple(found) or (ResolverEndpoint("127.0.0.1"),)


def resolver_from_config(
    conf: _DnsConf,
    *,
    observer: Observer | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Resolver:
    """A :class:`Resolver` for the ``[dns]`` section: ``resolvers`` ("host:port" + ``trusted``), ``timeout``,
    ``cache_size``. No resolvers configured: the ``nameserver`` lines of /etc/resolv.conf.

    ``trusted = false`` in the configuration means "not explicitly trusted": loopback endpoints stay trusted.
    Raises ``ValueError`` for an address that is not an IP address (with optional port).
    """
    endpoints = [
        ResolverEndpoint.parse(rc.address, trusted=True if rc.trusted else None) for rc in conf.resolvers
    ] or list(system_resolvers())
    return Resolver(endpoints, timeout=conf.timeout, cache_size=conf.cache_size, clock=clock, observer=observer)
