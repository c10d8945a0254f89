"""Issue 17: the per-host transport-security policy, end to end — no downgrade an on-path attacker can choose.

Real parts only: the DNS lab (nsd + unbound, a signed zone and unsigned ones), MTA-STS policies served over HTTPS by
the plugin's own listener with test-CA certificates, SMTP sinks with real certificates as MX hosts on 127.0.2.x,
and for the dropped-AAAA attack a :class:`~mxgate.testing.dnsproxy.DnsProxy` between the gateway and unbound.

* (1a) RFC 8461 §4.1 / RFC-CHECKLIST 36: an enforce policy filters ALL MX hosts, also when one of them has DANE.
* (1b) RFC 8461 §4.2 + RFC 7672 §2.2 / RFC-CHECKLIST 37: a host without TLSA is checked by MTA-STS (WebPKI for
  its MX name), not by the connector, even when another MX host has DANE.
* (2) RFC 7672 §2.2.3 / RFC-CHECKLIST 38: a dropped or SERVFAILed AAAA query next to a secure A RRset does not
  switch DANE off.
* (3) RFC 7672 §2.2.1 / RFC-CHECKLIST 39: mandatory DANE holds mail for a destination whose MX RRset is insecure.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from mxgate.connectors.outbound import OutboundConnector
from mxgate.core import bootstrap
from mxgate.core.delivery import Deliverer, DeliveryResult, OutgoingMessage
from mxgate.core.delivery.explain import destination_for, explain_destination, format_transport
from mxgate.core.dns import Resolver, ResolverEndpoint
from mxgate.core.hookspecs import hookimpl
from mxgate.core.outcomes import Destination, PolicyType, TlsOutcome, TlsRptResult
from mxgate.core.runtime import Runtime
from mxgate.plugins.dane import make_tlsa
from mxgate.plugins.mta_sts import ServedPolicy
from mxgate.testing.ca import IssuedCert, TestCA
from mxgate.testing.dnslab import DnsLab, DnsLabError
from mxgate.testing.dnsproxy import DnsProxy, Sabotage
from mxgate.testing.sinks import SmtpSink

pytestmark = pytest.mark.integration

SIGNED = "pol.test"
WRONG = "ee" * 32
IPS = {
    "mxd": "127.0.2.1",  # DANE host (secure TLSA matching its certificate)
    "forged": "127.0.2.2",  # the attacker's MX in an unsigned zone, WebPKI-valid for its own name
    "mxw": "127.0.2.3",  # signed zone, no TLSA, certificate for another name
    "mxa": "127.0.2.4",  # signed zone, secure A only, TLSA that its certificate does NOT match
    "policy": "127.0.2.50",  # the MTA-STS policy server
}
SERVED = [
    ServedPolicy(domain="u1a.test", mode="enforce", mx=(f"mxd.{SIGNED}",), max_age=86400),
    ServedPolicy(domain=f"d1b.{SIGNED}", mode="enforce", mx=(f"*.{SIGNED}",), max_age=86400),
]


def _free_port(*hosts: str) -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        ok = True
        for host in hosts[1:]:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no port free on every address")


@dataclass
class World:
    dns: DnsLab
    ca: TestCA
    certs: dict[str, IssuedCert]
    smtp_port: int
    https_port: int


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("policy-downgrades")
    ca = TestCA.create(tmp / "ca")
    smtp_port = _free_port(*(ip for name, ip in IPS.items() if name != "policy"))
    https_port = _free_port(IPS["policy"])
    certs = {
        "mxd": ca.issue([f"mxd.{SIGNED}"]),
        "forged": ca.issue(["forged.u1a.test"]),
        "mxw": ca.issue(["somewhere.else.test"]),
        "mxa": ca.issue([f"mxa.{SIGNED}"]),
        "policy": ca.issue([f"mta-sts.{p.domain}" for p in SERVED]),
    }
    other = ca.issue(["not-served.test"])  # mxa's TLSA names this certificate, which mxa does not serve
    tcp = f"_{smtp_port}._tcp"
    dns = DnsLab(tmp / "dns")
    z = dns.zone(SIGNED)
    z.add("@", "A", "127.0.0.99")
    z.add("mxd", "A", IPS["mxd"]).add(f"{tcp}.mxd", "TLSA", make_tlsa(certs["mxd"].cert).text)
    z.add("mxw", "A", IPS["mxw"])  # no TLSA: a secure denial
    z.add("mxa", "A", IPS["mxa"]).add(f"{tcp}.mxa", "TLSA", make_tlsa(other.cert).text)
    # (1b) signed domain, both hosts in the STS policy; the preferred one has no TLSA and a wrong-name certificate
    z.add("d1b", "MX", f"10 mxw.{SIGNED}.").add("d1b", "MX", f"20 mxd.{SIGNED}.")
    z.add("mta-sts.d1b", "A", IPS["policy"])
    # (2) a signed domain whose only MX has a secure A RRset, no AAAA, and TLSA its certificate does not match
    z.add("d2", "MX", f"10 mxa.{SIGNED}.")
    z.add("d2ok", "MX", f"10 mxd.{SIGNED}.")
    # (3) control: a secure MX RRset to the DANE host
    z.add("d3ok", "MX", f"10 mxd.{SIGNED}.")
    # (1a) unsigned domain, STS enforce naming only the DANE host; a forged MX is preferred
    u = dns.zone("u1a.test", signed=False)
    u.add("@", "MX", "5 forged").add("@", "MX", f"10 mxd.{SIGNED}.").add("forged", "A", IPS["forged"])
    u.add("mta-sts", "A", IPS["policy"])
    # (3) an insecure MX RRset pointing at a host with valid, signed TLSA
    dns.zone("u3.test", signed=False).add("@", "MX", f"10 mxd.{SIGNED}.")
    for served in SERVED:
        zone = u if served.domain == "u1a.test" else z
        owner = "_mta-sts" if served.domain == "u1a.test" else "_mta-sts.d1b"
        zone.add(owner, "TXT", f'"v=STSv1; id={served.record_id}"')
    try:
        dns.start()
    except DnsLabError as exc:
        pytest.fail(f"DNS lab could not start: {exc}", pytrace=False)
    try:
        yield World(dns, ca, certs, smtp_port, https_port)
    finally:
        dns.stop()


@dataclass
class Recorder:
    outcomes: list[TlsOutcome] = field(default_factory=list)
    name: str = "recorder"

    @hookimpl
    def mxgate_delivery_on_tls_outcome(self, outcome: TlsOutcome) -> None:
        self.outcomes.append(outcome)


@contextlib.asynccontextmanager
async def gateway(
    world: World, tmp_path: Path, *, resolver: ResolverEndpoint | None = None, dns_timeout: float = 2.0
) -> AsyncIterator[tuple[Runtime, Recorder]]:
    """mxgate with DANE and MTA-STS on (connector ``internet``: both opportunistic; ``strict``: dane mandatory)."""
    common: dict[str, Any] = {
        "use_mx": True,
        "tls": "opportunistic",
        "mx_port": world.smtp_port,
        "connect_timeout": 5.0,
        "command_timeout": 5.0,
    }
    document: dict[str, Any] = {
        "server": {"hostname": "gw.sender.test", "state_dir": str(tmp_path / "var")},
        "listener": [{"name": "smtp", "address": "127.0.0.1:1"}],
        "outbound_connector": [
            {"name": "internet", "recipient_domains": ["*"], "dane": "opportunistic", **common},
            {"name": "strict", "recipient_domains": ["strict.invalid"], "dane": "mandatory", **common},
            {
                "name": "relay",
                "recipient_domains": ["relay.invalid"],
                "smart_hosts": [f"mxw.{SIGNED}"],
                "port": world.smtp_port,
                "tls": "domain_validation",
                "tls_domain": "somewhere.else.test",
                "tls_ca_file": str(world.ca.cert_path),
                "connect_timeout": 5.0,
                "command_timeout": 5.0,
            },
        ],
        "dns": {"resolvers": [str(resolver or world.dns.endpoint)], "timeout": dns_timeout},
        "plugins": {
            "disable": ["dnssec", "tlsrpt", "prometheus"],
            "mta_sts": {
                "ca_file": str(world.ca.cert_path),
                "fetch_port": world.https_port,
                "fetch_timeout": 3.0,
                "serve_listen": f"{IPS['policy']}:{world.https_port}",
                "serve_cert": str(world.certs["policy"].chain_path),
                "serve_key": str(world.certs["policy"].key_path),
                "serve_policies": [
                    {"domain": p.domain, "mode": p.mode, "mx": list(p.mx), "max_age": p.max_age} for p in SERVED
                ],
            },
        },
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "mxgate.toml"
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    recorder = Recorder()
    config, plugins = bootstrap.load(path, entry_points=False, extra_plugins=[("recorder", recorder)])
    runtime = Runtime.create(config, plugins)
    runtime.resolver = Resolver([resolver or world.dns.endpoint], timeout=dns_timeout)
    await runtime.hooks.on_startup(runtime)
    try:
        yield runtime, recorder
    finally:
        for task in runtime.tasks:
            task.cancel()
        await runtime.hooks.on_shutdown(runtime)
        runtime.tracking.close()


@contextlib.asynccontextmanager
async def sinks(world: World, *names: str) -> AsyncIterator[dict[str, SmtpSink]]:
    started: dict[str, SmtpSink] = {}
    try:
        for name in names:
            host = "forged.u1a.test" if name == "forged" else f"{name}.{SIGNED}"
            started[name] = await SmtpSink(IPS[name], world.smtp_port, tls=world.certs[name], hostname=host).start()
        yield started
    finally:
        for sink in started.values():
            await sink.stop()


def outbound(runtime: Runtime, name: str = "internet") -> OutboundConnector:
    connector = runtime.config.outbound(name)
    assert connector is not None
    return connector


async def deliver(runtime: Runtime, domain: str, connector: str = "internet") -> DeliveryResult:
    message = OutgoingMessage(
        "q" + os.urandom(4).hex(),
        "a@sender.test",
        (f"b@{domain}",),
        b"From: a@sender.test\r\nSubject: policy\r\n\r\nHello.\r\n",
    )
    return await Deliverer(runtime, reuse=False).deliver(Destination(outbound(runtime, connector), domain), message)


# ============================================================================================================
# (1) DANE on one MX host must not switch MTA-STS off for the others
# ============================================================================================================


async def test_1a_sts_enforce_filters_forged_mx_even_when_another_host_has_dane(world: World, tmp_path: Path) -> None:
    """RFC 8461 §4.1, RFC-CHECKLIST 36: a forged MX injected into an unsigned MX RRset, outside the enforce
    policy's ``mx`` patterns, gets nothing — also when the policy's host is DANE-protected."""
    async with gateway(world, tmp_path) as (runtime, recorder), sinks(world, "forged", "mxd") as s:
        result = await deliver(runtime, "u1a.test")
        assert [o.result for o in result.outcomes] == ["delivered"], result.steps
        assert result.mx_host == f"mxd.{SIGNED}"
        assert s["forged"].connections == 0  # filtered before connecting
        assert s["forged"].messages == () and len(s["mxd"].messages) == 1
    session = [o for o in recorder.outcomes if o.mx_host == f"mxd.{SIGNED}"]
    assert [(o.policy_type, o.success, o.matched) for o in session] == [(PolicyType.TLSA, True, "3 1 1")]


async def test_1b_host_without_tlsa_is_checked_by_sts_not_the_connector(world: World, tmp_path: Path) -> None:
    """RFC 8461 §4.2 + RFC 7672 §2.2, RFC-CHECKLIST 37: in a signed domain where mx2 has TLSA and the preferred
    mx1 has none, mx1 needs a WebPKI certificate for its MX name (enforce); a wrong-name certificate means the
    mail goes to the DANE host instead."""
    async with gateway(world, tmp_path) as (runtime, recorder), sinks(world, "mxw", "mxd") as s:
        result = await deliver(runtime, f"d1b.{SIGNED}")
        assert [o.result for o in result.outcomes] == ["delivered"], result.steps
        assert result.mx_host == f"mxd.{SIGNED}"
        assert s["mxw"].messages == () and len(s["mxd"].messages) == 1
    mxw = [o for o in recorder.outcomes if o.mx_host == f"mxw.{SIGNED}"]
    assert [(o.policy_type, o.success, o.result_type) for o in mxw] == [
        (PolicyType.STS, False, TlsRptResult.CERTIFICATE_HOST_MISMATCH)
    ]
    mxd = [o for o in recorder.outcomes if o.mx_host == f"mxd.{SIGNED}"]
    assert [(o.policy_type, o.success) for o in mxd] == [(PolicyType.TLSA, True)]
    # RFC 8460 §4.4: a tlsa result is reported under the host's TLSA base domain, with that host's own records
    assert (mxd[0].policy_domain, mxd[0].policy_strings) == (
        f"mxd.{SIGNED}",
        (make_tlsa(world.certs["mxd"].cert).text,),
    )
    assert (mxw[0].policy_domain, mxw[0].policy_strings[:1]) == (f"d1b.{SIGNED}", ("version: STSv1",))


# ============================================================================================================
# (2) a failed AAAA lookup must not disable DANE
# ============================================================================================================


@pytest.mark.parametrize("sabotage", [Sabotage.DROP, Sabotage.SERVFAIL])
async def test_2_failed_aaaa_lookup_does_not_disable_dane(world: World, tmp_path: Path, sabotage: Sabotage) -> None:
    """RFC 7672 §2.2.3, RFC-CHECKLIST 38: with a secure A RRset and an AAAA query dropped or SERVFAILed (no
    DNSSEC verdict), TLSA is still looked up and enforced: a host whose certificate does not match its TLSA gets
    nothing, and a matching host is authenticated by DANE (not merely encrypted)."""
    async with (
        DnsProxy(world.dns.endpoint, sabotage={"AAAA": sabotage}, upstream_timeout=3.0) as proxy,
        gateway(world, tmp_path, resolver=proxy.endpoint(), dns_timeout=1.0) as (runtime, recorder),
        sinks(world, "mxa", "mxd") as s,
    ):
        held = await deliver(runtime, f"d2.{SIGNED}")
        assert [o.result for o in held.outcomes] == ["deferred"], held.steps
        assert s["mxa"].messages == ()
        ok = await deliver(runtime, f"d2ok.{SIGNED}")
        assert [o.result for o in ok.outcomes] == ["delivered"], ok.steps
        assert len(s["mxd"].messages) == 1
        assert (f"mxa.{SIGNED}", "AAAA") in proxy.sabotaged and (f"mxd.{SIGNED}", "AAAA") in proxy.sabotaged
    mxa = [o for o in recorder.outcomes if o.mx_host == f"mxa.{SIGNED}"]
    assert [(o.policy_type, o.success) for o in mxa] == [(PolicyType.TLSA, False)]
    mxd = [o for o in recorder.outcomes if o.mx_host == f"mxd.{SIGNED}"]
    assert [(o.policy_type, o.success, o.verification, o.matched) for o in mxd] == [
        (PolicyType.TLSA, True, "verified", "3 1 1")
    ]


async def test_2_every_address_lookup_failed_skips_the_host_and_defers(world: World, tmp_path: Path) -> None:
    """RFC-CHECKLIST 38: when both the A and the AAAA lookup of the only MX host fail, the host is skipped for this
    attempt and the message deferred (4.4.x) — never dialled at a weaker level, never bounced."""
    sabotage = {"A": Sabotage.SERVFAIL, "AAAA": Sabotage.SERVFAIL}
    async with (
        DnsProxy(world.dns.endpoint, sabotage=sabotage, upstream_timeout=3.0) as proxy,
        gateway(world, tmp_path, resolver=proxy.endpoint(), dns_timeout=1.0) as (runtime, recorder),
        sinks(world, "mxd") as s,
    ):
        held = await deliver(runtime, f"d2ok.{SIGNED}")
        assert [o.result for o in held.outcomes] == ["deferred"], held.steps
        assert held.outcomes[0].status.startswith("4.4."), held.outcomes[0]
        assert s["mxd"].connections == 0
        assert (f"mxd.{SIGNED}", "A") in proxy.sabotaged
    assert [o for o in recorder.outcomes if o.mx_host == f"mxd.{SIGNED}"] == []  # no TLS was attempted


# ============================================================================================================
# (3) mandatory DANE needs a DNSSEC-secure MX RRset
# ============================================================================================================


async def test_3_mandatory_dane_holds_mail_for_an_insecure_mx_rrset(world: World, tmp_path: Path) -> None:
    """RFC 7672 §2.2.1, RFC-CHECKLIST 39: with ``dane = "mandatory"`` a host learnt from an insecure MX RRset is
    never used, even though its own TLSA is signed and matches: deferred with a 4.7.x reply naming the reason.
    The same host behind a secure MX RRset gets the mail (control)."""
    async with gateway(world, tmp_path) as (runtime, _recorder), sinks(world, "mxd") as s:
        held = await deliver(runtime, "u3.test", connector="strict")
        assert [o.result for o in held.outcomes] == ["deferred"], held.steps
        assert held.outcomes[0].status.startswith("4.7."), held.outcomes[0]
        assert "MX RRset" in held.outcomes[0].reply and "DNSSEC" in held.outcomes[0].reply
        assert s["mxd"].connections == 0 and s["mxd"].messages == ()
        ok = await deliver(runtime, f"d3ok.{SIGNED}", connector="strict")
        assert [o.result for o in ok.outcomes] == ["delivered"], ok.steps
        assert len(s["mxd"].messages) == 1


# ============================================================================================================
# `mxgate explain`: the same per-host decisions, shown
# ============================================================================================================


async def test_explain_shows_per_host_mechanism_as_delivery_decides(world: World, tmp_path: Path) -> None:
    """``mxgate explain`` per MX host, from the code delivery runs: the forged MX is not dialled (RFC 8461 §4.1),
    the DANE host is governed by DANE, a host without TLSA by MTA-STS (RFC 8461 §4.2); mandatory DANE with an
    insecure MX RRset is deferred before connecting (RFC 7672 §2.2.1); ``--connect`` verifies like delivery."""
    async with gateway(world, tmp_path) as (runtime, recorder), sinks(world, "mxd", "mxw") as s:
        u1a = await explain_destination(runtime, Destination(outbound(runtime), "u1a.test"), connect=True)
        by = {h.host: h for h in u1a.hosts}
        assert not by["forged.u1a.test"].dialled and not by["forged.u1a.test"].usable
        mxd = by[f"mxd.{SIGNED}"]
        assert (mxd.mechanism, mxd.level, mxd.usable) == ("dane", "SECURE", True)
        (session,) = mxd.sessions
        assert session.ok and (session.verification, session.matched) == ("trusted", "3 1 1")  # insecure MX RRset
        assert "NOT DIALLED" in format_transport(u1a)

        d1b = {
            h.host: h
            for h in (await explain_destination(runtime, Destination(outbound(runtime), f"d1b.{SIGNED}"))).hosts
        }
        assert (d1b[f"mxw.{SIGNED}"].mechanism, d1b[f"mxw.{SIGNED}"].level) == ("mta_sts", "SECURE")
        assert any("dane: no opinion on this host" in w for w in d1b[f"mxw.{SIGNED}"].why)
        assert d1b[f"mxd.{SIGNED}"].mechanism == "dane"

        u3 = await explain_destination(runtime, Destination(outbound(runtime, "strict"), "u3.test"), connect=True)
        assert u3.destination_failure is not None and "not DNSSEC-secure" in u3.destination_failure
        assert all(h.sessions == () for h in u3.hosts)
        assert s["mxd"].messages == () and s["mxw"].messages == ()  # explaining never sends
    assert recorder.outcomes == []  # a test connection is not a session TLS-RPT counts


async def test_explain_smart_host_shows_connector_level_names_and_trust(world: World, tmp_path: Path) -> None:
    """Smart hosts (issue 17: it printed "next hop mx"): host, port, the connector's TLS level, ``tls_domain`` as
    the reference identifier and its trust anchors; ``--connect`` runs the connector's certificate check."""
    async with gateway(world, tmp_path) as (runtime, _recorder), sinks(world, "mxw"):
        connector = runtime.config.outbound("relay")
        assert connector is not None
        ex = await explain_destination(runtime, destination_for(connector, "anything.test"), connect=True)
    assert ex.next_hop == "smart_host" and ex.trust_anchors == str(world.ca.cert_path)
    (host,) = ex.hosts
    assert (host.host, host.port, host.mechanism, host.level) == (
        f"mxw.{SIGNED}",
        world.smtp_port,
        "connector",
        "SECURE",
    )
    assert host.reference_ids == ("somewhere.else.test",)
    (session,) = host.sessions
    assert session.ok and session.verification == "verified" and session.matched == "somewhere.else.test"
    text = format_transport(ex)
    assert "tls domain_validation, tls_domain somewhere.else.test" in text and "next hop smart_host" in text
