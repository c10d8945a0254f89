"""Resolver.host_addresses / HostAddresses: the one host -> addresses lookup (AAAA first, per-RRset security)."""

from __future__ import annotations

import dns.message
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest

from mxgate.core.dns import Resolver
from mxgate.core.dns_answers import AnswerKind, DnsAnswer, DnssecStatus, HostAddresses
from mxgate.testing.dnslab import ScriptedDnsServer, make_reply

A, NODATA, NX, ERR = AnswerKind.ANSWER, AnswerKind.NODATA, AnswerKind.NXDOMAIN, AnswerKind.ERROR
SEC, INS, BOGUS, IND = DnssecStatus.SECURE, DnssecStatus.INSECURE, DnssecStatus.BOGUS, DnssecStatus.INDETERMINATE


def ans(rdtype: str, kind: AnswerKind, status: DnssecStatus, *texts: str) -> DnsAnswer:
    records = tuple(dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), t) for t in texts)
    error = "timeout" if kind is ERR else None
    return DnsAnswer("mx.example.test", rdtype, kind, status, records, 60, "mx.example.test", (), error)


def host(aaaa: DnsAnswer, a: DnsAnswer) -> HostAddresses:
    return HostAddresses("mx.example.test", aaaa=aaaa, a=a)


def test_aaaa_first_then_a() -> None:
    h = host(ans("AAAA", A, SEC, "::1", "::2"), ans("A", A, SEC, "127.0.0.1"))
    assert h.addresses == ("::1", "::2", "127.0.0.1")
    assert h.answers == (h.aaaa, h.a) and h.is_secure and not h.failures and h.error == ""


def test_dropped_aaaa_gives_fewer_addresses_not_a_weaker_policy() -> None:
    h = host(ans("AAAA", ERR, IND), ans("A", A, SEC, "127.0.0.1"))
    assert h.addresses == ("127.0.0.1",)
    assert h.is_secure  # the answered RRset decides
    assert h.failures == (h.aaaa,) and h.error == "AAAA indeterminate: timeout"
    assert not h.is_negative and not h.all_failed


@pytest.mark.parametrize(
    ("aaaa", "a", "secure"),
    [
        (ans("AAAA", NODATA, SEC), ans("A", A, SEC, "127.0.0.1"), True),
        (ans("AAAA", A, INS, "::1"), ans("A", A, SEC, "127.0.0.1"), False),
        (ans("AAAA", ERR, BOGUS), ans("A", A, SEC, "127.0.0.1"), False),  # bogus forbids
        (ans("AAAA", NODATA, SEC), ans("A", NODATA, SEC), False),  # no addresses
        (ans("AAAA", ERR, IND), ans("A", ERR, IND), False),  # nothing answered
    ],
)
def test_security_per_rrset(aaaa: DnsAnswer, a: DnsAnswer, secure: bool) -> None:
    assert host(aaaa, a).is_secure is secure


def test_failures_are_never_no_record() -> None:
    failed = host(ans("AAAA", ERR, IND), ans("A", ERR, IND))
    assert failed.all_failed and not failed.is_negative and failed.addresses == ()
    half = host(ans("AAAA", NX, INS), ans("A", ERR, IND))
    assert not half.is_negative
    none = host(ans("AAAA", NX, INS), ans("A", NX, INS))
    assert none.is_negative and not none.failures


def test_bogus_names_the_first_bogus_rrset() -> None:
    h = host(ans("AAAA", A, SEC, "::1"), ans("A", ERR, BOGUS))
    assert h.bogus is h.a and h.addresses == ("::1",)


async def test_host_addresses_on_loopback_asks_both_and_caches() -> None:
    def handler(q: dns.message.Message) -> dns.message.Message:
        name = q.question[0].name.to_text()
        rdtype = dns.rdatatype.to_text(q.question[0].rdtype)
        if rdtype == "A":
            return make_reply(q, ad=True, answer=[f"{name} 60 IN A 127.0.0.8"])
        return make_reply(q, ad=True, answer=[f"{name} 60 IN AAAA ::8"])

    async with ScriptedDnsServer(handler) as server:
        resolver = Resolver([server.endpoint()])
        found = await resolver.host_addresses("MX.Example.Test.")
        again = await resolver.host_addresses("MX.Example.Test.")
    assert found.name == "mx.example.test"
    assert found.addresses == ("::8", "127.0.0.8") and found.is_secure
    assert again.addresses == found.addresses and (found.a.rdtype, found.aaaa.rdtype) == ("A", "AAAA")
    assert len(server.queries) == 2
