"""mxgate.core.dns against a scripted DNS server on loopback (no nsd/unbound needed).

RFC-CHECKLIST 1-3: every answer carries a status; bogus/indeterminate never reads as "no record"; AD is trusted
only from loopback or an endpoint marked trusted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rdtypes.ANY.MX
import pytest

from mxgate.core.dns import Resolver, ResolverEndpoint, resolver_from_config, system_resolvers
from mxgate.core.dns_answers import AnswerKind, DnsAnswer, DnsNameError, DnssecStatus
from mxgate.testing.dnslab import ScriptedDnsServer, make_reply

Msg = dns.message.Message


def qinfo(q: Msg) -> tuple[str, str]:
    question = q.question[0]
    return question.name.to_text(omit_final_dot=True).lower(), dns.rdatatype.to_text(question.rdtype)


def is_cd(q: Msg) -> bool:
    return bool(q.flags & dns.flags.CD)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SOA = "example.test. 300 IN SOA ns.example.test. host.example.test. 1 3600 900 604800 30"


def answer_a(ad: bool, ttl: int = 300) -> Callable[[Msg], Msg]:
    def handler(q: Msg) -> Msg:
        name, _ = qinfo(q)
        return make_reply(q, ad=ad, answer=[f"{name}. {ttl} IN A 127.0.0.5"])

    return handler


# -- query construction and AD trust (checklist 1, 3) ------------------------------------------------------


async def test_query_has_do_bit_rd_and_no_cd() -> None:
    async with ScriptedDnsServer(answer_a(ad=True)) as server:
        await Resolver([server.endpoint()]).resolve("mx.example.test", "A")
    (q,) = server.queries
    assert q.edns >= 0
    assert q.ednsflags & dns.flags.DO
    assert q.flags & dns.flags.RD
    assert not q.flags & dns.flags.CD


async def test_ad_from_loopback_is_secure() -> None:
    async with ScriptedDnsServer(answer_a(ad=True)) as server:
        a = await Resolver([server.endpoint()]).resolve("MX.Example.Test.", "A")
    assert a.kind is AnswerKind.ANSWER
    assert a.status is DnssecStatus.SECURE
    assert a.is_secure and not a.is_failure and a.exists
    assert a.name == "mx.example.test" == a.canonical_name
    assert a.cname_chain == ()
    assert [r.to_text() for r in a.records] == ["127.0.0.5"]
    assert a.ttl == 300
    assert a.server == str(server.endpoint())


async def test_no_ad_is_insecure() -> None:
    async with ScriptedDnsServer(answer_a(ad=False)) as server:
        a = await Resolver([server.endpoint()]).resolve("mx.example.test", "A")
    assert (a.kind, a.status) == (AnswerKind.ANSWER, DnssecStatus.INSECURE)
    assert not a.is_secure and not a.is_failure


async def test_untrusted_endpoint_ignores_ad_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    async with ScriptedDnsServer(answer_a(ad=True)) as server:
        ep = server.endpoint(trusted=False)  # loopback, but e.g. a tunnel to a remote resolver
        with caplog.at_level(logging.WARNING, logger="mxgate.core.dns"):
            resolver = Resolver([ep])
            first = await resolver.resolve("a.example.test", "A")
            second = await resolver.resolve("b.example.test", "A")
    assert not resolver.trusts_ad
    assert first.status is DnssecStatus.INSECURE
    assert second.status is DnssecStatus.INSECURE
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "not trusted" in warnings[0].getMessage()
    assert str(ep) in warnings[0].getMessage()


def test_endpoint_trust_rules() -> None:
    assert ResolverEndpoint("127.0.0.1").trusts_ad
    assert ResolverEndpoint("127.53.0.9", 5353).trusts_ad
    assert ResolverEndpoint("::1").trusts_ad
    assert not ResolverEndpoint("192.0.2.53").trusts_ad
    assert not ResolverEndpoint("2001:db8::53").trusts_ad
    assert ResolverEndpoint("192.0.2.53", trusted=True).trusts_ad
    assert not ResolverEndpoint("127.0.0.1", trusted=False).trusts_ad
    assert Resolver([ResolverEndpoint("127.0.0.1")]).trusts_ad
    assert not Resolver([ResolverEndpoint("127.0.0.1"), ResolverEndpoint("192.0.2.1")]).trusts_ad


def test_endpoint_parse() -> None:
    assert ResolverEndpoint.parse("127.0.0.1") == ResolverEndpoint("127.0.0.1", 53)
    assert ResolverEndpoint.parse("127.0.0.1:5353") == ResolverEndpoint("127.0.0.1", 5353)
    assert ResolverEndpoint.parse("::1") == ResolverEndpoint("::1", 53)
    assert ResolverEndpoint.parse("[::1]:5353") == ResolverEndpoint("::1", 5353)
    assert ResolverEndpoint.parse("10.0.0.1", trusted=True).trusted is True
    assert str(ResolverEndpoint("::1", 5353)) == "[::1]:5353"
    for bad in ("resolver.example", "127.0.0.1:0", "[::1", "127.0.0.1:99999"):
        with pytest.raises(ValueError):
            ResolverEndpoint.parse(bad)


def test_resolver_needs_endpoints() -> None:
    with pytest.raises(ValueError):
        Resolver([])


async def test_invalid_name_raises_programming_error() -> None:
    resolver = Resolver([ResolverEndpoint("127.0.0.1", 9)])
    with pytest.raises(DnsNameError):
        await resolver.resolve("a" * 64 + ".example", "A")
    with pytest.raises(dns.rdatatype.UnknownRdatatype):
        await resolver.resolve("example.test", "NOPE")


# -- negative answers --------------------------------------------------------------------------------------


async def test_secure_nxdomain_with_negative_ttl_from_soa() -> None:
    def handler(q: Msg) -> Msg:
        return make_reply(q, rcode=dns.rcode.NXDOMAIN, ad=True, authority=[SOA])

    async with ScriptedDnsServer(handler) as server:
        a = await Resolver([server.endpoint()]).resolve("gone.example.test", "MX")
    assert (a.kind, a.status) == (AnswerKind.NXDOMAIN, DnssecStatus.SECURE)
    assert a.records == ()
    assert a.ttl == 30  # min(SOA TTL 300, SOA MINIMUM 30), RFC 2308
    assert a.is_negative and a.is_secure and not a.is_failure


async def test_insecure_nodata() -> None:
    def handler(q: Msg) -> Msg:
        return make_reply(q, authority=[SOA.replace(" 300 ", " 20 ")])

    async with ScriptedDnsServer(handler) as server:
        a = await Resolver([server.endpoint()]).resolve("example.test", "TLSA")
    assert (a.kind, a.status) == (AnswerKind.NODATA, DnssecStatus.INSECURE)
    assert a.ttl == 20


# -- SERVFAIL: bogus vs indeterminate (checklist 2) --------------------------------------------------------


async def test_servfail_with_dnssec_ede_is_bogus_without_cd_retry() -> None:
    def handler(q: Msg) -> Msg:
        return make_reply(q, rcode=dns.rcode.SERVFAIL, ede=[(7, "signature expired")])

    async with ScriptedDnsServer(handler) as server:
        a = await Resolver([server.endpoint()]).resolve("mx.example.test", "A")
    assert (a.kind, a.status) == (AnswerKind.ERROR, DnssecStatus.BOGUS)
    assert a.records == ()
    assert a.ede == ((7, "signature expired"),)
    assert a.is_failure and not a.is_negative
    assert a.error is not None and "EDE 7" in a.error
    assert len(server.queries) == 1


async def test_servfail_then_cd_retry_with_data_is_bogus_and_data_discarded() -> None:
    def handler(q: Msg) -> Msg:
        if is_cd(q):
            return make_reply(q, answer=["mx.example.test. 300 IN A 192.0.2.66"])
        return make_reply(q, rcode=dns.rcode.SERVFAIL)

    async with ScriptedDnsServer(handler) as server:
        a = await Resolver([server.endpoint()]).resolve("mx.example.test", "A")
    assert (a.kind, a.status) == (AnswerKind.ERROR, DnssecStatus.BOGUS)
    assert a.records == ()  # bogus data is never data
    assert [is_cd(q) for q in server.queries] == [False, True]


async def test_servfail_then_cd_retry_nxdomain_is_bogus() -> None:
    def handler(q: Msg) -> Msg:
        if is_cd(q):
            return make_reply(q, rcode=dns.rcode.NXDOMAIN, authority=[SOA])
        return make_reply(q, rcode=dns.rcode.SERVFAIL)

    async with ScriptedDnsServer(handler) as server:
        a = await Resolver([server.endpoint()]).resolve("mx.example.test", "MX")
    assert (a.kind, a.status) == (AnswerKind.ERROR, DnssecStatus.BOGUS)
    assert not a.is_negative  # a bogus denial is not "no record"


async def test_servfail_twice_is_indeterminate() -> None:
    async with ScriptedDnsServer(lambda q: make_reply(q, rcode=dns.rcode.SERVFAIL)) as server:
        a = await Resolver([server.endpoint()]).resolve("mx.example.test", "MX")
    assert (a.kind, a.status) == (AnswerKind.ERROR, DnssecStatus.INDETERMINATE)
    assert a.is_failure and not a.is_negative
    assert len(server.queries) == 2


async def test_servfail_with_unreachable_ede_is_indeterminate_without_retry() -> None:
    def handler(q: Msg) -> Msg:
        return make_reply(q, rcode=dns.rcode.SERVFAIL, ede=[(22, "")])

    async with ScriptedDnsServer(handler) as server:
        a = await Resolver([server.endpoint()]).resolve("mx.example.test", "MX")
    assert (a.kind, a.status) == (AnswerKind.ERROR, DnssecStatus.INDETERMINATE)
    assert a.ede == ((22, ""),)
    assert len(server.queries) == 1


async def test_servfail_from_untrusted_endpoint_is_indeterminate() -> None:
    def handler(q: Msg) -> Msg:
        return make_reply(q, rcode=dns.rcode.SERVFAIL, ede=[(6, "")])

    async with ScriptedDnsServer(handler) as server:
        a = await Resolver([server.endpoint(trusted=False)]).resolve("mx.example.test", "MX")
    assert (a.kind, a.status) == (AnswerKind.ERROR, DnssecStatus.INDETERMINATE)


async def test_timeout_refused_then_next_endpoint() -> None:
    async with (
        ScriptedDnsServer(lambda q: None) as silent,
        ScriptedDnsServer(lambda q: make_reply(q, rcode=dns.rcode.REFUSED)) as refusing,
        ScriptedDnsServer(answer_a(ad=True)) as good,
    ):
        only_bad = Resolver([silent.endpoint(), refusing.endpoint()], timeout=0.2)
        bad = await only_bad.resolve("mx.example.test", "A")
        assert (bad.kind, bad.status) == (AnswerKind.ERROR, DnssecStatus.INDETERMINATE)
        assert bad.error is not None and "timeout" in bad.error and "REFUSED" in bad.error

        resolver = Resolver([silent.endpoint(), refusing.endpoint(), good.endpoint()], timeout=0.2)
        ok = await resolver.resolve("mx.example.test", "A")
    assert (ok.kind, ok.status) == (AnswerKind.ANSWER, DnssecStatus.SECURE)
    assert ok.server == str(good.endpoint())


async def test_bogus_is_final_no_next_endpoint() -> None:
    def bogus(q: Msg) -> Msg:
        return make_reply(q, rcode=dns.rcode.SERVFAIL, ede=[(6, "")])

    async with ScriptedDnsServer(bogus) as first, ScriptedDnsServer(answer_a(ad=True)) as second:
        a = await Resolver([first.endpoint(), second.endpoint()]).resolve("mx.example.test", "A")
    assert a.status is DnssecStatus.BOGUS
    assert second.queries == []


async def test_closed_port_is_error_not_exception() -> None:
    async with ScriptedDnsServer(lambda q: None) as server:
        port = server.port
    a = await Resolver([ResolverEndpoint("127.0.0.1", port)], timeout=0.3).resolve("x.example.test", "A")
    assert (a.kind, a.status) == (AnswerKind.ERROR, DnssecStatus.INDETERMINATE)


# -- CNAME chains ------------------------------------------------------------------------------------------


async def test_cname_chain_followed() -> None:
    def handler(q: Msg) -> Msg:
        return make_reply(
            q,
            ad=True,
            answer=[
                "www.example.test. 600 IN CNAME web.example.test.",
                "web.example.test. 120 IN CNAME host.other.test.",
                "host.other.test. 300 IN A 127.0.0.7",
            ],
        )

    async with ScriptedDnsServer(handler) as server:
        a = await Resolver([server.endpoint()]).resolve("www.example.test", "A")
    assert a.kind is AnswerKind.ANSWER and a.status is DnssecStatus.SECURE
    assert a.canonical_name == "host.other.test"
    assert a.cname_chain == ("www.example.test", "web.example.test", "host.other.test")
    assert a.ttl == 120
    assert [r.to_text() for r in a.records] == ["127.0.0.7"]


async def test_cname_to_nodata_and_cname_query() -> None:
    def handler(q: Msg) -> Msg:
        return make_reply(q, answer=["www.example.test. 600 IN CNAME web.example.test."], authority=[SOA])

    async with ScriptedDnsServer(handler) as server:
        resolver = Resolver([server.endpoint()])
        a = await resolver.resolve("www.example.test", "AAAA")
        c = await resolver.resolve("www.example.test", "CNAME")
    assert (a.kind, a.canonical_name, a.status) == (AnswerKind.NODATA, "web.example.test", DnssecStatus.INSECURE)
    assert c.kind is AnswerKind.ANSWER and c.canonical_name == "www.example.test" and c.cname_chain == ()


async def test_cname_loop_is_error() -> None:
    def handler(q: Msg) -> Msg:
        return make_reply(
            q,
            ad=True,
            answer=["a.example.test. 60 IN CNAME b.example.test.", "b.example.test. 60 IN CNAME a.example.test."],
        )

    async with ScriptedDnsServer(handler) as server:
        a = await Resolver([server.endpoint()]).resolve("a.example.test", "A")
    assert (a.kind, a.status) == (AnswerKind.ERROR, DnssecStatus.INDETERMINATE)
    assert a.error == "CNAME loop"


# -- cache (injected clock) --------------------------------------------------------------------------------


async def test_positive_cache_counts_down_and_expires() -> None:
    clock = FakeClock()
    async with ScriptedDnsServer(answer_a(ad=True, ttl=100)) as server:
        resolver = Resolver([server.endpoint()], clock=clock)
        first = await resolver.resolve("mx.example.test", "A")
        clock.now += 40
        cached = await resolver.resolve("MX.example.test.", "A")
        assert len(server.queries) == 1
        assert cached.ttl == 60
        assert cached.status is DnssecStatus.SECURE and cached.records == first.records
        clock.now += 60
        await resolver.resolve("mx.example.test", "A")
        assert len(server.queries) == 2
        await resolver.resolve("mx.example.test", "A", use_cache=False)
        assert len(server.queries) == 3


async def test_negative_cache_uses_soa_ttl() -> None:
    clock = FakeClock()

    def handler(q: Msg) -> Msg:
        return make_reply(q, rcode=dns.rcode.NXDOMAIN, ad=True, authority=[SOA])

    async with ScriptedDnsServer(handler) as server:
        resolver = Resolver([server.endpoint()], clock=clock)
        await resolver.resolve("gone.example.test", "A")
        clock.now += 29
        cached = await resolver.resolve("gone.example.test", "A")
        assert (cached.kind, cached.status, cached.ttl) == (AnswerKind.NXDOMAIN, DnssecStatus.SECURE, 1)
        assert len(server.queries) == 1
        clock.now += 1
        await resolver.resolve("gone.example.test", "A")
        assert len(server.queries) == 2


async def test_errors_cached_only_briefly() -> None:
    clock = FakeClock()

    def handler(q: Msg) -> Msg:
        return make_reply(q, rcode=dns.rcode.SERVFAIL, ede=[(6, "")])

    async with ScriptedDnsServer(handler) as server:
        resolver = Resolver([server.endpoint()], clock=clock, error_ttl=5)
        await resolver.resolve("bad.example.test", "A")
        clock.now += 4
        again = await resolver.resolve("bad.example.test", "A")
        assert again.status is DnssecStatus.BOGUS and len(server.queries) == 1
        clock.now += 1
        await resolver.resolve("bad.example.test", "A")
        assert len(server.queries) == 2

        no_error_cache = Resolver([server.endpoint()], clock=clock, error_ttl=0)
        await no_error_cache.resolve("bad.example.test", "A")
        await no_error_cache.resolve("bad.example.test", "A")
        assert len(server.queries) == 4


async def test_cache_is_bounded_lru_and_ttl_capped() -> None:
    clock = FakeClock()
    async with ScriptedDnsServer(answer_a(ad=False, ttl=999999)) as server:
        resolver = Resolver([server.endpoint()], clock=clock, cache_size=2, max_ttl=3600)
        await resolver.resolve("a.test", "A")
        await resolver.resolve("b.test", "A")
        await resolver.resolve("a.test", "A")  # a is now most recently used
        await resolver.resolve("c.test", "A")  # evicts b
        assert resolver.cache_len == 2
        assert len(server.queries) == 3
        await resolver.resolve("a.test", "A")
        assert len(server.queries) == 3
        await resolver.resolve("b.test", "A")
        assert len(server.queries) == 4
        clock.now += 3600
        await resolver.resolve("b.test", "A")
        assert len(server.queries) == 5


async def test_zero_ttl_not_cached_and_cache_can_be_disabled() -> None:
    async with ScriptedDnsServer(answer_a(ad=True, ttl=0)) as server:
        resolver = Resolver([server.endpoint()])
        await resolver.resolve("a.test", "A")
        await resolver.resolve("a.test", "A")
        assert len(server.queries) == 2
    async with ScriptedDnsServer(answer_a(ad=True)) as server:
        resolver = Resolver([server.endpoint()], cache_size=0)
        await resolver.resolve("a.test", "A")
        await resolver.resolve("a.test", "A")
        assert len(server.queries) == 2 and resolver.cache_len == 0


async def test_concurrent_identical_lookups_share_one_query() -> None:
    async with ScriptedDnsServer(answer_a(ad=True)) as server:
        resolver = Resolver([server.endpoint()])
        answers = await asyncio.gather(*(resolver.resolve("mx.example.test", "A") for _ in range(10)))
    assert len(server.queries) == 1
    assert all(a == answers[0] for a in answers)


async def test_observer_sees_network_lookups_only() -> None:
    seen: list[tuple[DnsAnswer, float]] = []

    def observer(answer: DnsAnswer, latency: float) -> None:
        seen.append((answer, latency))

    def broken(answer: DnsAnswer, latency: float) -> None:
        raise RuntimeError("metrics are down")

    async with ScriptedDnsServer(answer_a(ad=True)) as server:
        resolver = Resolver([server.endpoint()], observer=observer)
        await resolver.resolve("mx.example.test", "A")
        await resolver.resolve("mx.example.test", "A")
        assert len(seen) == 1
        assert seen[0][0].name == "mx.example.test" and seen[0][1] >= 0
        a = await Resolver([server.endpoint()], observer=broken).resolve("mx.example.test", "A")
        assert a.kind is AnswerKind.ANSWER  # a failing observer never breaks resolution


async def test_host_addresses_asks_a_and_aaaa() -> None:
    def handler(q: Msg) -> Msg:
        name, rdtype = qinfo(q)
        if rdtype == "A":
            return make_reply(q, ad=True, answer=[f"{name}. 60 IN A 127.0.0.8"])
        return make_reply(q, ad=True, authority=[SOA])

    async with ScriptedDnsServer(handler) as server:
        found = await Resolver([server.endpoint()]).host_addresses("mx.example.test")
    a, aaaa = found.a, found.aaaa
    assert (a.rdtype, a.kind, a.status) == ("A", AnswerKind.ANSWER, DnssecStatus.SECURE)
    assert (aaaa.rdtype, aaaa.kind, aaaa.status) == ("AAAA", AnswerKind.NODATA, DnssecStatus.SECURE)
    assert sorted(qinfo(q)[1] for q in server.queries) == ["A", "AAAA"]


# -- null MX, self-test ------------------------------------------------------------------------------------


async def test_null_mx() -> None:
    def handler(q: Msg) -> Msg:
        name, _ = qinfo(q)
        exchange = "." if name == "null.example.test" else "mx.example.test."
        return make_reply(q, ad=True, answer=[f"{name}. 60 IN MX 0 {exchange}"])

    async with ScriptedDnsServer(handler) as server:
        resolver = Resolver([server.endpoint()])
        null = await resolver.resolve("null.example.test", "MX")
        real = await resolver.resolve("real.example.test", "MX")
    assert null.is_null_mx and not real.is_null_mx
    (rd,) = null.records
    assert isinstance(rd, dns.rdtypes.ANY.MX.MX) and rd.exchange == dns.name.root


def _validating(q: Msg) -> Msg:
    name, _ = qinfo(q)
    if name.endswith("bogus.test") and not is_cd(q):
        return make_reply(q, rcode=dns.rcode.SERVFAIL, ede=[(6, "")])
    return make_reply(q, ad=not name.endswith("bogus.test"), answer=[f"{name}. 60 IN A 127.0.0.9"])


def _non_validating(q: Msg) -> Msg:
    name, _ = qinfo(q)
    return make_reply(q, answer=[f"{name}. 60 IN A 127.0.0.9"])


async def test_self_test_validating_resolver() -> None:
    async with ScriptedDnsServer(_validating) as server:
        result = await Resolver([server.endpoint()]).self_test("ok.test", "x.bogus.test")
    assert result.validating
    assert (result.secure_status, result.bogus_status) == (DnssecStatus.SECURE, DnssecStatus.BOGUS)
    assert (result.secure_name, result.bogus_name) == ("ok.test", "x.bogus.test")


async def test_self_test_bypasses_cache() -> None:
    async with ScriptedDnsServer(_validating) as server:
        resolver = Resolver([server.endpoint()])
        await resolver.resolve("ok.test", "A")
        await resolver.self_test("ok.test", "x.bogus.test")
    assert [qinfo(q)[0] for q in server.queries].count("ok.test") == 2


async def test_self_test_non_validating_and_untrusted() -> None:
    async with ScriptedDnsServer(_non_validating) as server:
        result = await Resolver([server.endpoint()]).self_test("ok.test", "x.bogus.test")
    assert not result.validating
    assert result.secure_status is DnssecStatus.INSECURE and result.bogus_status is DnssecStatus.INSECURE
    assert "does NOT validate" in result.detail

    async with ScriptedDnsServer(_validating) as server:
        result = await Resolver([server.endpoint(trusted=False)]).self_test("ok.test", "x.bogus.test")
    assert not result.validating
    assert "AD bit not trusted" in result.detail


def test_answer_helpers() -> None:
    base = DnsAnswer(
        name="x.test",
        rdtype="MX",
        kind=AnswerKind.NODATA,
        status=DnssecStatus.SECURE,
        records=(),
        ttl=1,
        canonical_name="x.test",
        cname_chain=(),
    )
    assert base.is_negative and base.is_secure and not base.is_failure and not base.exists
    for status in (DnssecStatus.BOGUS, DnssecStatus.INDETERMINATE):
        bad = dataclasses.replace(base, status=status)
        assert bad.is_failure and not bad.is_secure
    err = dataclasses.replace(base, kind=AnswerKind.ERROR)
    assert err.is_failure and not err.is_negative and not err.is_secure


# -- construction from configuration -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _EpConf:
    address: str
    trusted: bool = False


@dataclasses.dataclass(frozen=True)
class _DnsConf:
    resolvers: tuple[_EpConf, ...] = ()
    timeout: float = 2.0
    cache_size: int = 10


def test_resolver_from_config_trust_mapping() -> None:
    conf = _DnsConf(
        resolvers=(_EpConf("127.0.0.1:5353"), _EpConf("[::1]"), _EpConf("192.0.2.1", trusted=True)),
    )
    resolver = resolver_from_config(conf)
    assert resolver.endpoints == (
        ResolverEndpoint("127.0.0.1", 5353, None),  # config "trusted = false" keeps loopback trusted
        ResolverEndpoint("::1", 53, None),
        ResolverEndpoint("192.0.2.1", 53, True),
    )
    assert resolver.trusts_ad
    assert not resolver_from_config(_DnsConf(resolvers=(_EpConf("192.0.2.1"),))).trusts_ad
    with pytest.raises(ValueError):
        resolver_from_config(_DnsConf(resolvers=(_EpConf("resolver.example:53"),)))


def test_system_resolvers(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch example\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nnameserver bogus\n")
    assert system_resolvers(conf) == (ResolverEndpoint("127.0.0.53"), ResolverEndpoint("fe80::1"))
    assert system_resolvers(tmp_path / "missing") == (ResolverEndpoint("127.0.0.1"),)
