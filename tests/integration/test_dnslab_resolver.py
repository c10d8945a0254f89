"""mxgate.core.dns against the DNS lab: nsd serving signed zones, unbound validating them (loopback only)."""

from __future__ import annotations

from collections.abc import Callable

import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.TLSA
import pytest

from mxgate.core.dns import Resolver, ResolverEndpoint
from mxgate.core.dns_answers import AnswerKind, DnssecStatus
from mxgate.testing.dnslab import (
    Corruption,
    DnsLab,
    DnsLabError,
    StandardLab,
    Std,
    dnslab,  # noqa: F401  (fixture)
    dnslab_factory,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.integration

LabFactory = Callable[..., DnsLab]

SECURE = DnssecStatus.SECURE
INSECURE = DnssecStatus.INSECURE


def resolver_for(lab: StandardLab, *, timeout: float = 3.0) -> Resolver:
    return Resolver([lab.resolver], timeout=timeout)


# -- secure ------------------------------------------------------------------------------------------------


async def test_secure_mx_and_hosts(dnslab: StandardLab) -> None:  # noqa: F811
    r = resolver_for(dnslab)
    mx = await r.resolve(Std.SECURE, "MX")
    assert (mx.kind, mx.status) == (AnswerKind.ANSWER, SECURE)
    prefs = sorted((rd.preference, rd.exchange.to_text()) for rd in mx.records if isinstance(rd, dns.rdtypes.ANY.MX.MX))
    assert prefs == [(10, "mx1.secure.test."), (20, "mx2.secure.test.")]
    found = await r.host_addresses(Std.SECURE_MX1)
    a, aaaa = found.a, found.aaaa
    assert (a.kind, a.status, [x.to_text() for x in a.records]) == (
        AnswerKind.ANSWER,
        SECURE,
        [Std.SECURE_MX1_IP],
    )
    assert (aaaa.kind, aaaa.status) == (AnswerKind.NODATA, SECURE)  # NSEC-proven NODATA
    tlsa = await r.resolve(Std.SECURE_TLSA, "TLSA")
    assert (tlsa.kind, tlsa.status) == (AnswerKind.ANSWER, SECURE)
    (rd,) = tlsa.records
    assert isinstance(rd, dns.rdtypes.ANY.TLSA.TLSA)
    assert (rd.usage, rd.selector, rd.mtype, rd.cert.hex()) == (3, 1, 1, Std.SECURE_TLSA_DIGEST)


async def test_rsa_zone_with_nsec3(dnslab: StandardLab) -> None:  # noqa: F811
    r = resolver_for(dnslab)
    mx = await r.resolve(Std.RSA, "MX")
    assert (mx.kind, mx.status) == (AnswerKind.ANSWER, SECURE)
    a = await r.resolve(Std.RSA_MX1, "A")
    assert (a.status, [x.to_text() for x in a.records]) == (SECURE, [Std.RSA_MX1_IP])
    tlsa = await r.resolve(f"_25._tcp.{Std.RSA_MX1}", "TLSA")
    assert (tlsa.kind, tlsa.status) == (AnswerKind.ANSWER, SECURE)


@pytest.mark.parametrize("name", [Std.SECURE_NXDOMAIN, Std.RSA_NXDOMAIN, "a.b.c.rsa.test"])
async def test_secure_nxdomain_nsec_and_nsec3(dnslab: StandardLab, name: str) -> None:  # noqa: F811
    a = await resolver_for(dnslab).resolve(name, "MX")
    assert (a.kind, a.status, a.records) == (AnswerKind.NXDOMAIN, SECURE, ())
    assert a.is_negative and not a.is_failure
    assert 0 < a.ttl <= 60  # SOA minimum of the lab zones


async def test_secure_nodata_nsec3_empty_non_terminal(dnslab: StandardLab) -> None:  # noqa: F811
    a = await resolver_for(dnslab).resolve(f"_tcp.{Std.RSA_MX1}", "TLSA")
    assert (a.kind, a.status) == (AnswerKind.NODATA, SECURE)


async def test_null_mx(dnslab: StandardLab) -> None:  # noqa: F811
    a = await resolver_for(dnslab).resolve(Std.NULL_MX, "MX")
    assert (a.kind, a.status) == (AnswerKind.ANSWER, SECURE)
    assert a.is_null_mx


# -- insecure ----------------------------------------------------------------------------------------------


async def test_insecure_zone(dnslab: StandardLab) -> None:  # noqa: F811
    r = resolver_for(dnslab)
    mx = await r.resolve(Std.INSECURE, "MX")
    assert (mx.kind, mx.status) == (AnswerKind.ANSWER, INSECURE)
    a = await r.resolve(Std.INSECURE_MX, "A")
    assert (a.status, [x.to_text() for x in a.records]) == (INSECURE, [Std.INSECURE_MX_IP])
    tlsa = await r.resolve(f"_25._tcp.{Std.INSECURE_MX}", "TLSA")
    assert (tlsa.kind, tlsa.status) == (AnswerKind.ANSWER, INSECURE)
    nx = await r.resolve(Std.INSECURE_NXDOMAIN, "A")
    assert (nx.kind, nx.status) == (AnswerKind.NXDOMAIN, INSECURE)
    nodata = await r.resolve(Std.INSECURE_MX, "AAAA")
    assert (nodata.kind, nodata.status) == (AnswerKind.NODATA, INSECURE)


async def test_signed_zone_without_ds_is_insecure(dnslab: StandardLab) -> None:  # noqa: F811
    a = await resolver_for(dnslab).resolve(Std.ISLAND, "MX")
    assert (a.kind, a.status) == (AnswerKind.ANSWER, INSECURE)


async def test_secure_mx_with_host_in_insecure_zone(dnslab: StandardLab) -> None:  # noqa: F811
    r = resolver_for(dnslab)
    mx = await r.resolve(Std.MIXED_MX, "MX")
    assert (mx.kind, mx.status) == (AnswerKind.ANSWER, SECURE)
    (rd,) = mx.records
    assert isinstance(rd, dns.rdtypes.ANY.MX.MX)
    host = await r.resolve(rd.exchange, "A")
    assert (host.name, host.status) == (Std.INSECURE_MX, INSECURE)


# -- CNAME chains ------------------------------------------------------------------------------------------


async def test_secure_cname_chain(dnslab: StandardLab) -> None:  # noqa: F811
    a = await resolver_for(dnslab).resolve(Std.SECURE_CNAME, "A")
    assert (a.kind, a.status) == (AnswerKind.ANSWER, SECURE)
    assert a.canonical_name == Std.SECURE_MX1
    assert a.cname_chain == (Std.SECURE_CNAME, Std.SECURE_CNAME_MID, Std.SECURE_MX1)
    assert [x.to_text() for x in a.records] == [Std.SECURE_MX1_IP]


@pytest.mark.parametrize(
    ("name", "target"),
    [
        (Std.CROSS_CNAME, Std.INSECURE_MX),  # secure -> insecure
        (Std.INSECURE_TO_SECURE_CNAME, Std.SECURE_MX1),  # insecure -> secure
        (Std.INSECURE_CNAME, Std.INSECURE_MX),  # insecure throughout
    ],
)
async def test_cname_chain_not_wholly_secure_is_insecure(
    dnslab: StandardLab,  # noqa: F811
    name: str,
    target: str,
) -> None:
    a = await resolver_for(dnslab).resolve(name, "A")
    assert (a.kind, a.status, a.canonical_name) == (AnswerKind.ANSWER, INSECURE, target)
    assert a.cname_chain == (name, target)


# -- bogus and unreachable ---------------------------------------------------------------------------------


BOGUS_EDE = {  # RFC 8914 codes unbound reports for each corruption
    Std.BOGUS_SIG: {6},
    Std.BOGUS_EXPIRED: {7},
    Std.BOGUS_NOT_YET: {8},
    Std.BOGUS_NO_DNSKEY: {9},
    Std.BOGUS_NO_RRSIG: {10, 12},  # 12 "NSEC Missing" for an unsigned denial of existence
}


@pytest.mark.parametrize("zone", Std.BOGUS_ZONES)
@pytest.mark.parametrize("rdtype", ["MX", "A", "TLSA"])
async def test_bogus_zones_are_errors_never_no_record(
    dnslab: StandardLab,  # noqa: F811
    zone: str,
    rdtype: str,
) -> None:
    name = zone if rdtype != "TLSA" else f"_25._tcp.mx.{zone}"  # TLSA: a bogus denial of existence
    a = await resolver_for(dnslab).resolve(name, rdtype)
    assert (a.kind, a.status, a.records) == (AnswerKind.ERROR, DnssecStatus.BOGUS, ())
    assert a.is_failure and not a.is_negative
    assert BOGUS_EDE[zone] & {code for code, _ in a.ede}


async def test_unreachable_authority_is_indeterminate(dnslab: StandardLab) -> None:  # noqa: F811
    r = resolver_for(dnslab)
    for rdtype in ("MX", "A"):
        a = await r.resolve(Std.DEAD_HOST, rdtype)
        assert (a.kind, a.status, a.records) == (AnswerKind.ERROR, DnssecStatus.INDETERMINATE, ())
        assert a.is_failure and not a.is_negative


# -- self-test ---------------------------------------------------------------------------------------------


async def test_self_test_against_validating_resolver(dnslab: StandardLab) -> None:  # noqa: F811
    result = await resolver_for(dnslab).self_test(Std.SELFTEST_SECURE, Std.SELFTEST_BOGUS)
    assert result.validating, result.detail
    assert (result.secure_status, result.bogus_status) == (SECURE, DnssecStatus.BOGUS)


async def test_self_test_against_non_validating_authoritative(dnslab: StandardLab) -> None:  # noqa: F811
    # nsd answers authoritatively: bogus data comes back as plain data and AD is never set
    r = Resolver([dnslab.authoritative], timeout=3)
    secure = await r.resolve(Std.SECURE, "MX")
    assert (secure.kind, secure.status) == (AnswerKind.ANSWER, INSECURE)
    result = await r.self_test(Std.SELFTEST_SECURE, Std.SELFTEST_BOGUS)
    assert not result.validating
    assert (result.secure_status, result.bogus_status) == (INSECURE, INSECURE)


async def test_self_test_against_untrusted_validating_resolver(dnslab: StandardLab) -> None:  # noqa: F811
    untrusted = ResolverEndpoint(dnslab.resolver.host, dnslab.resolver.port, trusted=False)
    r = Resolver([untrusted], timeout=3)
    a = await r.resolve(Std.SECURE, "MX")
    assert a.status is INSECURE  # AD set by unbound, but not believed
    result = await r.self_test(Std.SELFTEST_SECURE, Std.SELFTEST_BOGUS)
    assert not result.validating
    assert "AD bit not trusted" in result.detail


# -- lab features: CD-retry path (no EDE), reload, config errors -------------------------------------------


async def test_bogus_via_cd_retry_when_resolver_sends_no_ede(dnslab_factory: LabFactory) -> None:  # noqa: F811
    lab = dnslab_factory(ede=False)
    lab.zone("good.test").add("@", "A", "127.0.0.50")
    lab.zone("bad.test", corrupt=Corruption.SIGNATURE).add("@", "A", "127.0.0.51")
    with lab.running() as endpoint:
        r = Resolver([endpoint], timeout=3)
        bad = await r.resolve("bad.test", "A")
        assert (bad.kind, bad.status, bad.ede, bad.records) == (AnswerKind.ERROR, DnssecStatus.BOGUS, (), ())
        assert bad.error is not None and "checking disabled" in bad.error
        result = await r.self_test("good.test", "bad.test")
        assert result.validating, result.detail


async def test_reload_serves_changed_records(dnslab_factory: LabFactory) -> None:  # noqa: F811
    lab = dnslab_factory()
    z = lab.zone("change.test", algorithm="rsa", denial="nsec3")
    z.add("mx", "A", "127.0.0.60")
    with lab.running() as endpoint:
        before = await Resolver([endpoint], timeout=3).resolve("mx.change.test", "A")
        assert (before.status, [x.to_text() for x in before.records]) == (SECURE, ["127.0.0.60"])
        z.remove("mx", "A")
        z.add("mx", "A", "127.0.0.61")
        lab.reload()
        after = await Resolver([lab.endpoint], timeout=3).resolve("mx.change.test", "A")
        assert (after.status, [x.to_text() for x in after.records]) == (SECURE, ["127.0.0.61"])
    assert not lab.is_running


def test_bad_zone_data_raises_with_reason(dnslab_factory: LabFactory) -> None:  # noqa: F811
    lab = dnslab_factory()
    lab.zone("broken.test").add("@", "A", "not-an-address")
    with pytest.raises(DnsLabError, match=r"broken\.test"):
        lab.start()
    assert not lab.is_running


def test_lab_rejects_zones_outside_root(dnslab_factory: LabFactory) -> None:  # noqa: F811
    lab = dnslab_factory()
    with pytest.raises(DnsLabError):
        lab.zone("example.com")
    lab.zone("dup.test")
    with pytest.raises(DnsLabError):
        lab.zone("dup.test")
    with pytest.raises(DnsLabError):
        lab.zone("plain.test", signed=False, delegate_ds=True)


def test_trust_anchor_is_root_ds(dnslab: StandardLab) -> None:  # noqa: F811
    anchor = dnslab.lab.trust_anchor
    assert anchor.startswith("test. IN DS ")
    assert dns.rdatatype.from_text(anchor.split()[2]) == dns.rdatatype.DS
