"""Issue 17: the per-host transport-security policy, rule by rule, without sockets (RFC-CHECKLIST 36-40).

DNS answers come from a table (:class:`TableResolver`), the policies are the plugins' own values; the end-to-end
counterparts are in ``tests/integration/test_policy_downgrades.py``.
"""

from __future__ import annotations

import random

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest

from mxgate.connectors.outbound import OutboundConnector
from mxgate.core.defaults import mx_next_hop
from mxgate.core.delivery import decide_host, filter_hosts_by_policies
from mxgate.core.dns_answers import AnswerKind, DnsAnswer, DnssecStatus, HostAddresses
from mxgate.core.outcomes import (
    Destination,
    HopHost,
    HostPolicy,
    NextHop,
    PolicyType,
    TlsLevel,
    TlsPolicy,
    TlsRptResult,
)
from mxgate.plugins.dane import DaneMode, HostState, analyse, examine_host, host_policy

A, NODATA, NX, ERR = AnswerKind.ANSWER, AnswerKind.NODATA, AnswerKind.NXDOMAIN, AnswerKind.ERROR
SEC, INS, BOGUS, IND = DnssecStatus.SECURE, DnssecStatus.INSECURE, DnssecStatus.BOGUS, DnssecStatus.INDETERMINATE
TLSA = "3 1 1 " + "ab" * 32
INTERNET = OutboundConnector(name="internet", recipient_domains=("*",), use_mx=True)
DEST = Destination(INTERNET, "example.test")

Row = tuple[AnswerKind, DnssecStatus, list[str]]


class TableResolver:
    """(name, type) -> (kind, status, records as text); ``cnames``: name -> canonical name (secure chain)."""

    def __init__(self, table: dict[tuple[str, str], Row], cnames: dict[str, tuple[str, DnssecStatus]] | None = None):
        self.table = table
        self.cnames = cnames or {}
        self.asked: list[tuple[str, str]] = []

    async def resolve(self, name: str, rdtype: str) -> DnsAnswer:
        self.asked.append((name, rdtype))
        canonical, chain_status = self.cnames.get(name, (name, SEC))
        kind, status, texts = self.table.get((canonical, rdtype), (NX, INS, []))
        if canonical != name and chain_status is not SEC and status is SEC:
            status = chain_status
        records = tuple(dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), t) for t in texts)
        chain = (name, canonical) if canonical != name else ()
        return DnsAnswer(name, rdtype, kind, status, records, 300, canonical, chain)

    async def host_addresses(self, name: str) -> HostAddresses:
        return HostAddresses(name, aaaa=await self.resolve(name, "AAAA"), a=await self.resolve(name, "A"))


def _policy(source: str, prec: int, level: TlsLevel, **kw: object) -> TlsPolicy:
    return TlsPolicy(source, PolicyType.NO_POLICY, "example.test", level, prec, **kw)  # type: ignore[arg-type]


CONNECTOR = _policy("connector", 100, TlsLevel.MAY)
STS_ENFORCE = TlsPolicy(
    "mta_sts", PolicyType.STS, "example.test", TlsLevel.SECURE, 200, mx_patterns=("mx1.example.test",)
)
STS_TESTING = TlsPolicy(
    "mta_sts", PolicyType.STS, "example.test", TlsLevel.SECURE, 200, report_only=True, mx_patterns=("mx1.example.test",)
)
MX1, MX2, FORGED = (
    HopHost(n, 25, p) for n, p in (("mx1.example.test", 10), ("mx2.example.test", 20), ("evil.test", 5))
)


def _dane(**hosts: HostPolicy) -> TlsPolicy:
    """A DANE policy with per-host refinements (keys: the first label of the host name)."""
    return TlsPolicy(
        "dane",
        PolicyType.TLSA,
        "example.test",
        TlsLevel.SECURE,
        300,
        hosts={f"{k}.example.test" if k != "evil" else "evil.test": v for k, v in hosts.items()},
    )


DANE_HOST = HostPolicy(TlsLevel.SECURE, sni="mx1.example.test")
NO_DANE = HostPolicy(TlsLevel.MAY, applies=False)


# -- RFC-CHECKLIST 36: an enforce policy filters every MX host ---------------------------------------------------


def test_rfc8461_s4_1_enforce_mx_patterns_filter_all_hosts_also_next_to_dane() -> None:
    """RFC 8461 §4.1: the forged MX outside the enforce policy's patterns is dropped even though DANE (which has
    no patterns) is the highest-precedence policy of the destination."""
    dane = _dane(mx1=DANE_HOST, evil=NO_DANE)
    kept, by = filter_hosts_by_policies((FORGED, MX1), [CONNECTOR, STS_ENFORCE, dane])
    assert kept == (MX1,) and by is STS_ENFORCE


def test_rfc8461_s5_testing_policy_filters_nothing() -> None:
    """RFC 8461 §5: ``testing`` only reports; every MX host stays a candidate."""
    kept, by = filter_hosts_by_policies((FORGED, MX1), [CONNECTOR, STS_TESTING])
    assert kept == (FORGED, MX1) and by is None


# -- RFC-CHECKLIST 37: per host, DANE where it applies, else MTA-STS, else the connector --------------------------


def test_rfc7672_s2_2_dane_governs_only_the_host_it_applies_to() -> None:
    """RFC 7672 §2.2 + RFC 8461 §2: mx1 has secure TLSA, mx2 has none: DANE decides mx1, the enforce MTA-STS
    policy decides mx2 (WebPKI for its MX name), never the connector's opportunistic level."""
    policies = [CONNECTOR, STS_ENFORCE, _dane(mx1=DANE_HOST, mx2=NO_DANE)]
    one, two = decide_host(policies, CONNECTOR, MX1), decide_host(policies, CONNECTOR, MX2)
    assert (one.policy.source, one.enforce.source) == ("dane", "dane")
    assert (two.policy.source, two.enforce.source) == ("mta_sts", "mta_sts")
    assert two.enforce.for_host(MX2.name).level is TlsLevel.SECURE


def test_rfc7672_s2_2_without_sts_a_host_without_tlsa_gets_the_connector_level() -> None:
    """RFC 7672 §2.2: no DANE for the host and no MTA-STS: the connector's own level."""
    policies = [CONNECTOR, _dane(mx1=DANE_HOST, mx2=NO_DANE)]
    assert decide_host(policies, CONNECTOR, MX2).enforce is CONNECTOR


def test_rfc8461_s2_an_sts_pass_never_rescues_a_dane_failure() -> None:
    """RFC 8461 §2 / RFC 7672 §2.2.3: a host whose TLSA lookup is bogus stays DANE's and unusable; MTA-STS does
    not take it over."""
    bogus = HostPolicy(TlsLevel.SECURE, usable=False, failure=TlsRptResult.DNSSEC_INVALID)
    decision = decide_host([CONNECTOR, STS_ENFORCE, _dane(mx1=bogus)], CONNECTOR, MX1)
    assert decision.enforce.source == "dane" and not decision.enforce.for_host(MX1.name).usable


def test_rfc8461_s5_testing_host_without_dane_is_enforced_by_the_connector_and_reported_by_sts() -> None:
    """RFC 8461 §5: ``testing`` reports; the connector's level is what the attempt must satisfy."""
    decision = decide_host([CONNECTOR, STS_TESTING, _dane(mx2=NO_DANE)], CONNECTOR, MX2)
    assert decision.report_only and decision.policy is STS_TESTING and decision.enforce is CONNECTOR


# -- RFC-CHECKLIST 38: a failed address lookup is never "insecure" -------------------------------------------------


def _mx_table() -> dict[tuple[str, str], Row]:
    return {
        ("example.test", "MX"): (A, SEC, ["10 mx1.example.test."]),
        ("mx1.example.test", "A"): (A, SEC, ["192.0.2.1"]),
        ("mx1.example.test", "AAAA"): (NODATA, SEC, []),
        ("_25._tcp.mx1.example.test", "TLSA"): (A, SEC, [TLSA]),
    }


def _with(table: dict[tuple[str, str], Row], key: tuple[str, str], row: Row) -> dict[tuple[str, str], Row]:
    return {**table, key: row}


@pytest.mark.parametrize("failed", ["A", "AAAA"])
async def test_rfc7672_s2_2_3_failed_address_lookup_keeps_dane(failed: str) -> None:
    """RFC 7672 §2.2.3, RFC-CHECKLIST 38: A secure and AAAA timed out (or the reverse): the host stays secure,
    TLSA is looked up and DANE governs it; the answered RRset's addresses are dialled."""
    table = _mx_table()
    table[("mx1.example.test", "AAAA")] = (A, SEC, ["2001:db8::1"])
    table = _with(table, ("mx1.example.test", failed), (ERR, IND, []))
    resolver = TableResolver(table)
    hop = await mx_next_hop(DEST, resolver, 25, random.Random(1))  # type: ignore[arg-type]
    (host,) = hop.hosts
    assert host.secure and host.addresses == (("192.0.2.1",) if failed == "AAAA" else ("2001:db8::1",))
    hd = await examine_host(resolver, host, hop)  # type: ignore[arg-type]
    assert hd.state is HostState.DANE and ("_25._tcp.mx1.example.test", "TLSA") in resolver.asked
    hp = host_policy(hd, DaneMode.OPPORTUNISTIC)
    assert hp.applies and hp.usable and hp.level is TlsLevel.SECURE


async def test_rfc7672_s2_2_3_every_address_lookup_failed_skips_the_host() -> None:
    """RFC-CHECKLIST 38: both lookups failed: no addresses, and DANE marks the host unusable for this attempt
    (not insecure); no TLS-RPT failure type, since no TLS was attempted."""
    table = _with(
        _with(_mx_table(), ("mx1.example.test", "A"), (ERR, IND, [])), ("mx1.example.test", "AAAA"), (ERR, IND, [])
    )
    resolver = TableResolver(table)
    hop = await mx_next_hop(DEST, resolver, 25, random.Random(1))  # type: ignore[arg-type]
    (host,) = hop.hosts
    assert host.addresses == () and not host.secure
    hd = await examine_host(resolver, host, hop)  # type: ignore[arg-type]
    assert hd.state is HostState.FAILED and hd.failure is None
    hp = host_policy(hd, DaneMode.OPPORTUNISTIC)
    assert hp.applies and not hp.usable and hp.failure is None


async def test_rfc7672_s2_2_3_bogus_address_rrset_still_fails_the_host() -> None:
    """RFC 7672 §2.1: a bogus AAAA next to a secure A is not a failed lookup: the host is unusable (dnssec-invalid)."""
    table = _with(_mx_table(), ("mx1.example.test", "AAAA"), (ERR, BOGUS, []))
    resolver = TableResolver(table)
    hop = await mx_next_hop(DEST, resolver, 25, random.Random(1))  # type: ignore[arg-type]
    assert not hop.hosts[0].secure
    hd = await examine_host(resolver, hop.hosts[0], hop)  # type: ignore[arg-type]
    assert hd.state is HostState.FAILED and hd.failure is TlsRptResult.DNSSEC_INVALID


# -- RFC-CHECKLIST 39: mandatory DANE needs a secure MX RRset ------------------------------------------------------


async def test_rfc7672_s2_2_1_mandatory_dane_defers_an_insecure_mx_rrset() -> None:
    """RFC 7672 §2.2.1: with ``dane = "mandatory"`` an insecure MX RRset is refused outright, even when its target
    has signed TLSA records: dane-required, and the reason names the MX RRset."""
    table = _with(_mx_table(), ("example.test", "MX"), (A, INS, ["10 mx1.example.test."]))
    resolver = TableResolver(table)
    hop = await mx_next_hop(DEST, resolver, 25, random.Random(1))  # type: ignore[arg-type]
    assert not hop.mx_secure
    analysis = await analyse(resolver, DEST, hop, mode=DaneMode.MANDATORY)  # type: ignore[arg-type]
    assert analysis.policy is not None and analysis.policy.failure is TlsRptResult.DANE_REQUIRED
    assert "MX RRset" in analysis.policy.detail and "not DNSSEC-secure" in analysis.policy.detail
    assert analysis.policy.status_for(analysis.policy.failure).startswith("4.7.")


async def test_rfc7672_s2_2_1_opportunistic_dane_uses_tlsa_behind_an_insecure_mx_rrset() -> None:
    """RFC 7672 §2.2.1: opportunistic DANE still uses the MX host's own secure TLSA; the nexthop domain is then
    not a reference identifier and a match is "trusted"."""
    table = _with(_mx_table(), ("example.test", "MX"), (A, INS, ["10 mx1.example.test."]))
    resolver = TableResolver(table)
    hop = await mx_next_hop(DEST, resolver, 25, random.Random(1))  # type: ignore[arg-type]
    analysis = await analyse(resolver, DEST, hop, mode=DaneMode.OPPORTUNISTIC)  # type: ignore[arg-type]
    (hd,) = analysis.hosts
    assert hd.state is HostState.DANE and hd.label == "trusted" and "example.test" not in hd.reference_ids
    assert analysis.policy is not None and analysis.policy.for_host("mx1.example.test").usable


def test_rfc7672_s2_2_1_mandatory_host_from_insecure_mx_is_unusable() -> None:
    """RFC 7672 §2.2.1, per host: under mandatory DANE a host learnt from an insecure MX RRset is never used."""
    from mxgate.plugins.dane import HostDane

    hd = HostDane("mx1.example.test", 25, HostState.DANE, "mx1.example.test", name_secure=False)
    hp = host_policy(hd, DaneMode.MANDATORY)
    assert not hp.usable and hp.failure is TlsRptResult.DANE_REQUIRED and "MX RRset" in hp.detail
    assert host_policy(hd, DaneMode.OPPORTUNISTIC).usable


async def test_rfc7672_s2_2_1_mandatory_dane_accepts_a_secure_mx_rrset() -> None:
    """RFC 7672 §2.2.1 (control): a secure MX RRset to a host with usable TLSA is DANE-authenticated."""
    resolver = TableResolver(_mx_table())
    hop = await mx_next_hop(DEST, resolver, 25, random.Random(1))  # type: ignore[arg-type]
    analysis = await analyse(resolver, DEST, hop, mode=DaneMode.MANDATORY)  # type: ignore[arg-type]
    assert analysis.policy is not None and analysis.policy.failure is None
    assert isinstance(hop, NextHop) and hop.mx_secure


# -- RFC-CHECKLIST 40: the TLSA base domain -----------------------------------------------------------------------


def _cname_table(expanded_tlsa: Row | None) -> dict[tuple[str, str], Row]:
    table: dict[tuple[str, str], Row] = {
        ("example.test", "MX"): (A, SEC, ["10 mx1.example.test."]),
        ("mx.provider.test", "A"): (A, SEC, ["192.0.2.7"]),
        ("mx.provider.test", "AAAA"): (NODATA, SEC, []),
        ("_25._tcp.mx1.example.test", "TLSA"): (A, SEC, [TLSA]),
    }
    if expanded_tlsa is not None:
        table[("_25._tcp.mx.provider.test", "TLSA")] = expanded_tlsa
    return table


@pytest.mark.parametrize(
    "expanded",
    [(A, INS, ["3 1 1 " + "cd" * 32]), (NX, INS, []), (NODATA, INS, []), (NX, SEC, [])],
    ids=["insecure-records", "insecure-nxdomain", "insecure-nodata", "secure-denial"],
)
async def test_rfc7672_s2_2_3_initial_name_tried_when_expanded_name_gives_no_secure_tlsa(expanded: Row) -> None:
    """RFC 7672 §2.2.3: when the CNAME-expanded name yields insecure records or a (secure or insecure) denial,
    the TLSA records of the initial name are used; the base domain (and SNI) is then the initial name."""
    resolver = TableResolver(_cname_table(expanded), cnames={"mx1.example.test": ("mx.provider.test", SEC)})
    hop = await mx_next_hop(DEST, resolver, 25, random.Random(1))  # type: ignore[arg-type]
    hd = await examine_host(resolver, hop.hosts[0], hop)  # type: ignore[arg-type]
    assert ("_25._tcp.mx.provider.test", "TLSA") in resolver.asked
    assert hd.state is HostState.DANE and hd.base_domain == "mx1.example.test"
    assert [r.text for r in hd.usable] == [TLSA]


async def test_rfc7672_s2_2_3_secure_tlsa_at_the_expanded_name_wins() -> None:
    """RFC 7672 §2.2.3 (control): secure records at the CNAME-expanded name: that name is the base domain."""
    other = "3 1 1 " + "cd" * 32
    resolver = TableResolver(_cname_table((A, SEC, [other])), cnames={"mx1.example.test": ("mx.provider.test", SEC)})
    hop = await mx_next_hop(DEST, resolver, 25, random.Random(1))  # type: ignore[arg-type]
    hd = await examine_host(resolver, hop.hosts[0], hop)  # type: ignore[arg-type]
    assert hd.state is HostState.DANE and hd.base_domain == "mx.provider.test"
    assert [r.text for r in hd.usable] == [other]
    assert ("_25._tcp.mx1.example.test", "TLSA") not in resolver.asked


# -- RFC-CHECKLIST 26a: TLS-RPT for tlsa results --------------------------------------------------------------------


async def test_rfc8460_s4_4_tlsa_policy_domain_is_the_base_domain_with_the_hosts_own_records() -> None:
    """RFC 8460 §4.4: for a ``tlsa`` result the policy-domain is the TLSA base domain of the host and the
    policy-string that host's own records, not every MX host's."""
    other = "3 1 1 " + "cd" * 32
    table = {
        **_mx_table(),
        ("example.test", "MX"): (A, SEC, ["10 mx1.example.test.", "20 mx2.example.test."]),
        ("mx2.example.test", "A"): (A, SEC, ["192.0.2.2"]),
        ("mx2.example.test", "AAAA"): (NODATA, SEC, []),
        ("_25._tcp.mx2.example.test", "TLSA"): (A, SEC, [other]),
    }
    resolver = TableResolver(table)
    hop = await mx_next_hop(DEST, resolver, 25, random.Random(1))  # type: ignore[arg-type]
    analysis = await analyse(resolver, DEST, hop, mode=DaneMode.OPPORTUNISTIC)  # type: ignore[arg-type]
    assert analysis.policy is not None
    one, two = analysis.policy.for_host("mx1.example.test"), analysis.policy.for_host("mx2.example.test")
    assert (one.policy_domain, one.policy_strings) == ("mx1.example.test", (TLSA,))
    assert (two.policy_domain, two.policy_strings) == ("mx2.example.test", (other,))


def test_rfc8461_s5_a_failed_policy_governing_a_host_makes_it_unusable_not_weaker() -> None:
    """RFC 8461 §5 / RFC-CHECKLIST 37: with mandatory MTA-STS whose policy could not be fetched, the host DANE
    does not govern is unusable (the failure's result type), never handed to the connector's opportunistic level;
    the DANE host is still usable, so the destination is not deferred as a whole."""
    from mxgate.core.delivery.plan import plan_destination

    failed = TlsPolicy(
        "mta_sts", PolicyType.STS, "example.test", TlsLevel.SECURE, 200, failure=TlsRptResult.STS_POLICY_FETCH_ERROR
    )
    hop = NextHop(DEST, (MX1, MX2), "mx", mx_secure=True)
    dplan = plan_destination(hop, [CONNECTOR, failed, _dane(mx1=DANE_HOST, mx2=NO_DANE)], CONNECTOR)
    assert dplan.failure is None and dplan.hosts == (MX1, MX2)
    one, one_hp, _ = dplan.decide(MX1)
    assert one.enforce.source == "dane" and one_hp.usable
    two, two_hp, _ = dplan.decide(MX2)
    assert two.enforce.source == "mta_sts" and not two_hp.usable
    assert two_hp.failure is TlsRptResult.STS_POLICY_FETCH_ERROR
