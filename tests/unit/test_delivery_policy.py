"""Delivery decisions without sockets: TLS policy precedence, MTA-STS mx filtering, connector TLS levels,
MX ordering / implicit MX / null MX / failed DNS (with an injected resolver), and connector peer checks."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest

from mxgate.connectors.outbound import OutboundConnector
from mxgate.core.defaults import mx_next_hop, smart_host_next_hop, verify_connector_peer
from mxgate.core.delivery import (
    OutgoingMessage,
    SessionKey,
    combine_policies,
    connector_level,
    filter_hosts,
    mx_pattern_matches,
    needs_8bitmime,
    needs_smtputf8,
)
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
from mxgate.testing.ca import TestCA, self_signed


class FakeResolver:
    """(name, type) -> (kind, status, records as text)."""

    def __init__(self, table: dict[tuple[str, str], tuple[AnswerKind, DnssecStatus, list[str]]]) -> None:
        self.table = table
        self.asked: list[tuple[str, str]] = []

    async def resolve(self, name: str, rdtype: str) -> DnsAnswer:
        self.asked.append((name, rdtype))
        kind, status, texts = self.table.get((name, rdtype), (AnswerKind.NXDOMAIN, DnssecStatus.INSECURE, []))
        records = tuple(dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), t) for t in texts)
        return DnsAnswer(name, rdtype, kind, status, records, 300, name, ())

    async def host_addresses(self, name: str) -> HostAddresses:
        return HostAddresses(name, aaaa=await self.resolve(name, "AAAA"), a=await self.resolve(name, "A"))


A, NODATA, NX, ERR = AnswerKind.ANSWER, AnswerKind.NODATA, AnswerKind.NXDOMAIN, AnswerKind.ERROR
SEC, INS, BOGUS = DnssecStatus.SECURE, DnssecStatus.INSECURE, DnssecStatus.BOGUS
INTERNET = OutboundConnector(name="internet", recipient_domains=("*",), use_mx=True)
DEST = Destination(INTERNET, "example.test")


def _policy(source: str, prec: int, level: TlsLevel, **kw: object) -> TlsPolicy:
    return TlsPolicy(source, PolicyType.NO_POLICY, "example.test", level, prec, **kw)  # type: ignore[arg-type]


CONNECTOR = _policy("connector", 100, TlsLevel.MAY)


def test_precedence_dane_over_sts_over_connector() -> None:
    dane = _policy("dane", 300, TlsLevel.SECURE)
    sts = _policy("mta_sts", 200, TlsLevel.SECURE, mx_patterns=("*.example.test",))
    assert combine_policies([CONNECTOR, sts, dane], CONNECTOR).policy is dane
    assert combine_policies([CONNECTOR, sts], CONNECTOR).policy is sts
    not_applying = _policy("dane", 300, TlsLevel.SECURE, applies=False)
    assert combine_policies([not_applying, CONNECTOR], CONNECTOR).policy is CONNECTOR
    assert combine_policies([], CONNECTOR).policy is CONNECTOR


def test_report_only_policy_is_enforced_by_the_next_one() -> None:
    testing = _policy("mta_sts", 200, TlsLevel.SECURE, report_only=True)
    strict = _policy("connector", 100, TlsLevel.ENCRYPT)
    decision = combine_policies([testing, strict], CONNECTOR)
    assert decision.policy is testing and decision.enforce is strict and decision.report_only
    alone = combine_policies([testing], CONNECTOR)
    assert alone.enforce is CONNECTOR


def test_mx_patterns_one_label_wildcard() -> None:
    assert mx_pattern_matches("*.example.test", "mx1.example.test")
    assert not mx_pattern_matches("*.example.test", "example.test")
    assert not mx_pattern_matches("*.example.test", "a.b.example.test")
    assert mx_pattern_matches("mx.example.test", "MX.Example.Test.")
    hosts = [HopHost("mx1.example.test", 25), HopHost("evil.test", 25), HopHost("a.b.example.test", 25)]
    assert [h.name for h in filter_hosts(hosts, ("*.example.test",))] == ["mx1.example.test"]
    assert filter_hosts(hosts, ()) == tuple(hosts)


def test_connector_tls_levels() -> None:
    assert [connector_level(m) for m in ("none", "opportunistic", "encryption_only")] == [
        TlsLevel.NONE,
        TlsLevel.MAY,
        TlsLevel.ENCRYPT,
    ]
    assert connector_level("certificate_validation") is TlsLevel.VERIFY
    assert connector_level("domain_validation") is TlsLevel.SECURE
    with pytest.raises(ValueError):
        connector_level("maybe")


def test_message_needs() -> None:
    plain = OutgoingMessage("q", "a@x.test", ("b@y.test",), b"Subject: hi\r\n\r\nascii\r\n")
    assert not needs_smtputf8(plain) and not needs_8bitmime(plain)
    assert needs_smtputf8(OutgoingMessage("q", "a@x.test", ("bö@y.test",), b""))
    assert needs_8bitmime(OutgoingMessage("q", "a@x.test", ("b@y.test",), "Grüße".encode()))


async def test_mx_order_by_preference_random_among_equals() -> None:
    table = {
        ("example.test", "MX"): (A, SEC, ["20 c.example.test.", "10 a.example.test.", "10 b.example.test."]),
        ("a.example.test", "A"): (A, SEC, ["127.0.0.2"]),
        ("a.example.test", "AAAA"): (NODATA, SEC, []),
        ("b.example.test", "A"): (A, SEC, ["127.0.0.3"]),
        ("b.example.test", "AAAA"): (A, SEC, ["::1"]),
        ("c.example.test", "A"): (A, INS, ["127.0.0.4"]),
        ("c.example.test", "AAAA"): (NODATA, INS, []),
    }
    resolver = FakeResolver(table)
    firsts = set()
    for seed in range(20):
        hop = await mx_next_hop(DEST, resolver, 2525, random.Random(seed))  # type: ignore[arg-type]
        assert hop.kind == "mx" and hop.mx_secure
        names = [h.name for h in hop.hosts]
        assert sorted(names[:2]) == ["a.example.test", "b.example.test"] and names[2] == "c.example.test"
        firsts.add(names[0])
        by_name = {h.name: h for h in hop.hosts}
        assert by_name["b.example.test"].addresses == ("::1", "127.0.0.3")  # IPv6 and IPv4
        assert by_name["a.example.test"].secure and not by_name["c.example.test"].secure
        assert all(h.port == 2525 for h in hop.hosts)
    assert firsts == {"a.example.test", "b.example.test"}


async def test_implicit_mx_null_mx_and_nonexistent_domain() -> None:
    resolver = FakeResolver(
        {
            ("example.test", "MX"): (NODATA, INS, []),
            ("example.test", "A"): (A, INS, ["127.0.0.5"]),
            ("null.test", "MX"): (A, SEC, ["0 ."]),
        }
    )
    hop = await mx_next_hop(DEST, resolver, 25, random.Random(1))  # type: ignore[arg-type]
    assert hop.kind == "implicit_mx" and [h.addresses for h in hop.hosts] == [("127.0.0.5",)]
    null = await mx_next_hop(
        Destination(INTERNET, "null.test"),
        resolver,
        25,
        random.Random(1),
    )  # type: ignore[arg-type]
    assert null.kind == "null_mx" and null.permanent
    gone = await mx_next_hop(
        Destination(INTERNET, "gone.test"),
        resolver,
        25,
        random.Random(1),
    )  # type: ignore[arg-type]
    assert gone.kind == "error" and gone.permanent


@pytest.mark.parametrize(("kind", "status"), [(ERR, DnssecStatus.INDETERMINATE), (ERR, BOGUS)])
async def test_failed_mx_lookup_defers_without_address_fallback(kind: AnswerKind, status: DnssecStatus) -> None:
    resolver = FakeResolver(
        {("example.test", "MX"): (kind, status, []), ("example.test", "A"): (A, INS, ["127.0.0.5"])}
    )
    hop = await mx_next_hop(DEST, resolver, 25, random.Random(1))  # type: ignore[arg-type]
    assert hop.kind == "error" and not hop.permanent and not hop.hosts
    assert resolver.asked == [("example.test", "MX")]  # never asked for A/AAAA


async def test_smart_hosts_names_ips_and_ports() -> None:
    resolver = FakeResolver({("relay.test", "A"): (A, INS, ["127.0.0.7"])})
    hop = await smart_host_next_hop(
        Destination(
            replace(INTERNET, name="out"),
            "relay.test",
            ("relay.test", "127.0.0.8:2526", "[::1]:2527"),
        ),
        ("relay.test", "127.0.0.8:2526", "[::1]:2527"),
        587,
        resolver,  # type: ignore[arg-type]
    )
    assert hop.kind == "smart_host"
    assert [(h.name, h.port, h.addresses) for h in hop.hosts] == [
        ("relay.test", 587, ("127.0.0.7",)),
        ("127.0.0.8", 2526, ("127.0.0.8",)),
        ("::1", 2527, ("::1",)),
    ]


def test_connector_verification(tmp_path: Path) -> None:
    ca = TestCA.create(tmp_path / "ca")
    now = datetime.now(UTC)
    good = ca.issue(["mx.example.test"])
    wild = ca.issue(["*.example.test"])
    expired = ca.issue(["mx.example.test"], not_after=now - timedelta(days=1))
    selfie = self_signed(tmp_path / "self", ["mx.example.test"])
    trust = (str(ca.cert_path),)

    def check(cert: object, level: TlsLevel, names: tuple[str, ...] = ("mx.example.test",)) -> object:
        return verify_connector_peer(cert.chain, level=level, names=names, now=now, trust_store_paths=trust)  # type: ignore[attr-defined]

    ok = check(good, TlsLevel.SECURE)
    assert ok.ok and ok.label == "verified" and ok.matched == "mx.example.test"  # type: ignore[attr-defined]
    assert check(good, TlsLevel.VERIFY, ("other.test",)).ok  # type: ignore[attr-defined]
    mismatch = check(good, TlsLevel.SECURE, ("other.test",))
    assert not mismatch.ok and mismatch.result_type is TlsRptResult.CERTIFICATE_HOST_MISMATCH  # type: ignore[attr-defined]
    assert check(wild, TlsLevel.SECURE).ok  # type: ignore[attr-defined]
    deep = check(wild, TlsLevel.SECURE, ("a.mx.example.test",))
    assert not deep.ok  # type: ignore[attr-defined]
    old = check(expired, TlsLevel.VERIFY)
    assert not old.ok and old.result_type is TlsRptResult.CERTIFICATE_EXPIRED  # type: ignore[attr-defined]
    alone = check(selfie, TlsLevel.VERIFY)
    assert not alone.ok and alone.result_type is TlsRptResult.CERTIFICATE_NOT_TRUSTED  # type: ignore[attr-defined]


def test_session_key_tells_apart_what_makes_sessions_different() -> None:
    """Equal keys only for deliveries that would set up equivalent sessions (connection reuse)."""
    conn = INTERNET
    host = HopHost("mx.example.test", 25, 10)
    hop = NextHop(DEST, (host,), "mx")
    msg = OutgoingMessage("Q1", "a@example.org", ("b@example.test",), b"x")
    sts_testing = _policy("mta_sts", 200, TlsLevel.SECURE, report_only=True)

    def dane(tlsa: str) -> TlsPolicy:
        return _policy("dane", 300, TlsLevel.SECURE, hosts={host.name: HostPolicy(TlsLevel.SECURE, data=(tlsa,))})

    def key(
        policy: TlsPolicy, *, message: OutgoingMessage = msg, connector: OutboundConnector = conn, at: HopHost = host
    ) -> SessionKey:
        decision = combine_policies([policy], CONNECTOR)
        return SessionKey.of(connector, DEST, hop, decision, at, decision.enforce.for_host(at.name), message)

    base = key(dane("3 1 1 aa"))
    assert key(dane("3 1 1 aa")) == base and hash(key(dane("3 1 1 aa"))) == hash(base)  # a new but equal RRset
    assert key(dane("3 1 1 aa"), at=HopHost("MX.Example.test.", 25, 20)) == base  # the name, not the preference
    different = [
        key(dane("3 1 1 bb")),  # HostPolicy.data does not compare: its repr is in the key
        key(CONNECTOR),  # level MAY: a session that may have fallen back to cleartext never serves SECURE
        key(sts_testing),  # the connector enforces, MTA-STS testing reports
        key(dane("3 1 1 aa"), message=replace(msg, tls_optional=True)),
        key(dane("3 1 1 aa"), connector=replace(conn, auth_username="relay-user")),
        key(dane("3 1 1 aa"), connector=replace(conn, name="other")),
        key(dane("3 1 1 aa"), at=HopHost("mx2.example.test", 25, 10)),
        key(dane("3 1 1 aa"), at=HopHost("mx.example.test", 2525, 10)),
    ]
    assert all(k != base for k in different) and len(set(different)) == len(different)
    # the hash is worked out once, from every compared field: a pooled session is found under an equal new key
    assert {base: "pooled"}[key(dane("3 1 1 aa"))] == "pooled" and not {k for k in different} & {base}
    assert (key(sts_testing).report_source, key(sts_testing).enforce_source) == ("mta_sts", "connector")
