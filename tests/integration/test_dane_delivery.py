"""DANE in the DNS lab (nsd + unbound, signed zones) against real SMTP sinks with lab certificates.

Two layers: the plugin's hooks on their own (policy from real DNS, verification of a real handshake's chain), and
end to end through the core's delivery path (``Deliverer``): the sink receives the message or it does not.
RFC-CHECKLIST items 4-17.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import tomli_w

from mxgate import DNSSEC_SELF_TEST, hookimpl
from mxgate.core import bootstrap
from mxgate.core.dns import Resolver
from mxgate.core.dns_answers import DnssecStatus
from mxgate.core.outcomes import (
    Destination,
    NextHop,
    PolicyType,
    TlsLevel,
    TlsPolicy,
    TlsRptResult,
)
from mxgate.core.runtime import Runtime
from mxgate.plugins.dane import DanePlugin, HostState, dane_status, make_tlsa, starttls_probe
from mxgate.testing.ca import IssuedCert, TestCA, self_signed
from mxgate.testing.dnslab import DnsLab, DnsLabError
from mxgate.testing.recorder import Recorder
from mxgate.testing.sinks import SmtpSink

pytestmark = pytest.mark.integration

ZONE = "dane.test"
PLAIN = "plain-dane.test"  # unsigned
BOGUS_TCP = "_tcp.mxbogus.dane.test"  # a signed child zone with broken signatures: its TLSA is bogus
DEAD_TCP = "_tcp.mxdead.dane.test"  # delegated to nowhere: the TLSA lookup fails
WRONG = "ee" * 32


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Lab:
    """The running lab: resolver endpoint, the SMTP port every MX uses, hosts -> (ip, certificate)."""

    lab: DnsLab
    port: int
    hosts: dict[str, tuple[str, IssuedCert]]
    ca: TestCA
    inter: TestCA
    workdir: Path
    resolver_text: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def ip(self, host: str) -> str:
        return self.hosts[host][0]

    def cert(self, host: str) -> IssuedCert:
        return self.hosts[host][1]

    def resolver(self) -> Resolver:
        return Resolver([self.lab.endpoint], timeout=2.0)


def fqdn(label: str, zone: str = ZONE) -> str:
    return f"{label}.{zone}"


def _build(workdir: Path) -> Lab:
    port = _free_port()
    ca = TestCA.create(workdir / "ca")
    inter = ca.intermediate()
    certs = workdir / "certs"

    def leaf(*names: str, **kw: Any) -> IssuedCert:
        return inter.issue(list(names), directory=certs, **kw)

    lab = DnsLab(workdir / "dns")
    z = lab.zone(ZONE)
    z.add("@", "A", "127.0.0.99")
    hosts: dict[str, tuple[str, IssuedCert]] = {}
    tcp = f"_{port}._tcp"

    def host(label: str, ip: str, cert: IssuedCert, *tlsa: str) -> None:
        z.add(label, "A", ip)
        for rec in tlsa:
            z.add(f"{tcp}.{label}", "TLSA", rec)
        hosts[fqdn(label)] = (ip, cert)

    def domain(label: str, *mx: tuple[int, str]) -> None:
        for pref, target in mx:
            z.add(label, "MX", f"{pref} {target}.")

    # one scenario per line: domain -> MX host(s) -> TLSA
    c = leaf(fqdn("mx311"))
    host("mx311", "127.0.1.1", c, make_tlsa(c.cert, 3, 1, 1).text)
    domain("d311", (10, fqdn("mx311")))
    c = leaf(fqdn("mx312"))
    host("mx312", "127.0.1.2", c, make_tlsa(c.cert, 3, 1, 2).text)
    domain("d312", (10, fqdn("mx312")))
    c = leaf(fqdn("mx301"), key_type="rsa")
    host("mx301", "127.0.1.3", c, make_tlsa(c.cert, 3, 0, 1).text)
    domain("d301", (10, fqdn("mx301")))
    c = leaf(fqdn("mx201"))
    host("mx201", "127.0.1.4", c, make_tlsa(inter.cert, 2, 0, 1).text)
    domain("d201", (10, fqdn("mx201")))
    c = leaf(fqdn("mx211"))  # anchored at the root: the server must present it (served fullchain)
    host("mx211", "127.0.1.5", dataclasses.replace(c, chain_path=c.fullchain_path), make_tlsa(ca.cert, 2, 1, 1).text)
    domain("d211", (10, fqdn("mx211")))
    c = leaf(fqdn("mxwrong"))
    host("mxwrong", "127.0.1.6", c, f"3 1 1 {WRONG}")
    domain("dwrong", (10, fqdn("mxwrong")))
    c = self_signed(certs, ["anything.example"])
    host("mxpkix", "127.0.1.7", c, make_tlsa(c.cert, 1, 1, 1).text, make_tlsa(c.cert, 0, 0, 1).text)
    domain("dpkix", (10, fqdn("mxpkix")))
    c = leaf(fqdn("mxnotls"))
    host("mxnotls", "127.0.1.8", c, make_tlsa(c.cert).text)
    domain("dnotls", (10, fqdn("mxnotls")))
    c = leaf("not-the-mx.example")  # issued under our DANE-TA, but for another name
    host("mxtaname", "127.0.1.9", c, make_tlsa(inter.cert, 2, 0, 1).text)
    domain("dtaname", (10, fqdn("mxtaname")))
    host("mxtaee", "127.0.1.10", c, make_tlsa(c.cert, 3, 1, 1).text)
    domain("dtaee", (10, fqdn("mxtaee")))
    c = leaf(fqdn("mxexp"), not_after=datetime.now(UTC) - timedelta(days=3))
    host("mxexp", "127.0.1.11", c, make_tlsa(c.cert).text)
    domain("dexpired", (10, fqdn("mxexp")))
    # bogus TLSA (its own broken child zone) and a failing TLSA lookup (delegated to a dead server)
    c = leaf(fqdn("mxbogus"))
    z.add("mxbogus", "A", "127.0.1.12")
    hosts[fqdn("mxbogus")] = ("127.0.1.12", c)
    lab.zone(BOGUS_TCP, corrupt="signature").add("@", "A", "127.0.0.98").add(f"_{port}", "TLSA", make_tlsa(c.cert).text)
    domain("dbogus", (10, fqdn("mxbogus")))
    domain("dbogusfb", (10, fqdn("mxbogus")), (20, fqdn("mx311")))
    c = leaf(fqdn("mxdead"))
    z.add("mxdead", "A", "127.0.1.13")
    hosts[fqdn("mxdead")] = ("127.0.1.13", c)
    lab.unreachable(DEAD_TCP)
    domain("ddead", (10, fqdn("mxdead")))
    # first MX fails DANE, the second passes
    domain("dfirst", (10, fqdn("mxwrong")), (20, fqdn("mx311")))
    # no TLSA at all (secure denial)
    c = leaf(fqdn("mxnone"))
    host("mxnone", "127.0.1.14", c)
    domain("dnone", (10, fqdn("mxnone")))
    # a smart host that is a CNAME of a DANE host: the TLSA base domain is the expanded name
    z.add("relay", "CNAME", f"{fqdn('mx311')}.")
    # DANE-EE 3 1 1 with digest agility: a wrong SHA2-256 next to the right SHA2-512 must not matter
    c = leaf(fqdn("mxagile"))
    host("mxagile", "127.0.1.15", c, f"3 1 1 {WRONG}", make_tlsa(c.cert, 3, 1, 2).text)
    domain("dagile", (10, fqdn("mxagile")))
    # an unsigned zone: its TLSA (wrong on purpose) must be ignored; and an insecure MX RRset pointing at a DANE host
    p = lab.zone(PLAIN, signed=False)
    c = leaf(fqdn("mx", PLAIN))
    p.add("@", "MX", "10 mx").add("mx", "A", "127.0.1.16").add(f"{tcp}.mx", "TLSA", f"3 1 1 {WRONG}")
    hosts[fqdn("mx", PLAIN)] = ("127.0.1.16", c)
    p.add("ins", "MX", f"10 {fqdn('mx311')}.")
    # RFC 7671 §5.2: 2 0 0 publishes the whole root; the server sends leaf + intermediate only
    c = leaf(fqdn("mx200"))
    host("mx200", "127.0.1.17", c, make_tlsa(ca.cert, 2, 0, 0).text)
    domain("d200", (10, fqdn("mx200")))
    # DANE-TA is RFC 5280, not WebPKI: a private CA without keyUsage and without key identifiers (openssl req -x509)
    private = TestCA.create(workdir / "private-ca", key_usage=False, key_identifiers=False)
    private_inter = private.intermediate(key_usage=False, key_identifiers=False)
    c = private_inter.issue([fqdn("mxpriv")], directory=certs)
    host("mxpriv", "127.0.1.18", c, make_tlsa(private_inter.cert, 2, 0, 1).text)
    domain("dpriv", (10, fqdn("mxpriv")))
    c = private_inter.issue([fqdn("mxpriv200")], directory=certs)
    host("mxpriv200", "127.0.1.19", c, make_tlsa(private.cert, 2, 0, 0).text)
    domain("dpriv200", (10, fqdn("mxpriv200")))
    return Lab(lab, port, hosts, ca, inter, workdir)


@pytest.fixture(scope="module")
def dane_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = _build(tmp_path_factory.mktemp("dane-lab"))
    try:
        lab.lab.start()
    except DnsLabError as exc:
        pytest.fail(f"DNS lab could not start: {exc}", pytrace=False)
    lab.resolver_text = str(lab.lab.endpoint)
    try:
        lab.lab.wait_validating(ZONE, BOGUS_TCP)
    except DnsLabError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield lab
    finally:
        lab.lab.stop()


@contextlib.asynccontextmanager
async def sinks(lab: Lab, *names: str, **kwargs: Any) -> AsyncIterator[dict[str, SmtpSink]]:
    """A sink on each named host's address and the lab's SMTP port, serving that host's certificate."""
    started: dict[str, SmtpSink] = {}
    try:
        for name in names:
            ip, cert = lab.hosts[name]
            started[name] = await SmtpSink(ip, lab.port, tls=cert, hostname=name, **kwargs).start()
        yield started
    finally:
        for sink in started.values():
            await sink.stop()


class FakeSts:
    """An MTA-STS-like opinion that would accept any MX with any certificate (precedence 200)."""

    name = "fake_sts"

    @hookimpl
    def mxgate_delivery_resolve_tls_policy(self, destination: Destination) -> TlsPolicy:
        return TlsPolicy("mta_sts", PolicyType.STS, destination.domain, TlsLevel.ENCRYPT, 200)


@contextlib.asynccontextmanager
async def gateway_runtime(
    lab: Lab, tmp_path: Path, *, dane: str = "opportunistic", extra: tuple[tuple[str, Any], ...] = (), **conn: Any
) -> AsyncIterator[tuple[Runtime, Recorder]]:
    document = {
        "server": {"hostname": "gw.dane.test", "state_dir": str(tmp_path / "var")},
        "dns": {
            "resolvers": [lab.resolver_text],
            "timeout": 2.0,
            "self_test_secure": ZONE,
            "self_test_bogus": BOGUS_TCP,
        },
        "outbound_connector": [
            {
                "name": "internet",
                "recipient_domains": ["*"],
                "use_mx": True,
                "mx_port": lab.port,
                "port": lab.port,
                "dane": dane,
                "connect_timeout": 3.0,
                "command_timeout": 5.0,
                **conn,
            }
        ],
        "plugins": {"disable": ["tlsrpt", "prometheus", "mta_sts"]},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "mxgate.toml"
    path.write_text(tomli_w.dumps(document))
    capture = Recorder()
    config, plugins = bootstrap.load(path, entry_points=False, extra_plugins=(("capture", capture), *extra))
    runtime = Runtime.create(config, plugins)
    runtime.resolver = lab.resolver()
    await runtime.hooks.on_startup(runtime)
    try:
        yield runtime, capture
    finally:
        for task in runtime.tasks:
            task.cancel()
        for task in runtime.tasks:
            with contextlib.suppress(BaseException):
                await task
        runtime.tracking.close()


async def deliver(runtime: Runtime, domain: str, smart_hosts: tuple[str, ...] = (), *, requiretls: bool = False) -> Any:
    from mxgate.core.delivery import Deliverer, OutgoingMessage

    message = OutgoingMessage(
        queue_id="q" + os.urandom(4).hex(),
        sender="sender@gw.dane.test",
        recipients=(f"rcpt@{domain}",),
        data=b"From: sender@gw.dane.test\r\nSubject: dane\r\n\r\nhello\r\n",
        requiretls=requiretls,
    )
    return await Deliverer(runtime).deliver(
        Destination(runtime.config.outbound("internet"), domain, smart_hosts), message
    )


def result_of(res: Any) -> str:
    return str(res.outcomes[0].result)


# ============================================================================================================
# the hooks on their own: policy from real DNS, verification of a real handshake
# ============================================================================================================


async def _policy(runtime: Runtime, domain: str) -> tuple[NextHop, TlsPolicy | None, DanePlugin]:
    plugin = next(p for p in runtime.plugins.pm.get_plugins() if isinstance(p, DanePlugin))
    dest = Destination(runtime.config.outbound("internet"), domain)
    next_hop = await runtime.hooks.resolve_next_hop(dest)
    assert next_hop is not None
    return next_hop, await plugin.mxgate_delivery_resolve_tls_policy(dest, next_hop), plugin


async def test_policy_for_secure_tlsa(dane_lab: Lab, tmp_path: Path) -> None:
    async with gateway_runtime(dane_lab, tmp_path) as (runtime, _):
        next_hop, policy, _plugin = await _policy(runtime, fqdn("d311"))
    assert next_hop.mx_secure and policy is not None and policy.applies and policy.failure is None
    assert (policy.source, policy.policy_type, policy.precedence) == ("dane", PolicyType.TLSA, 300)
    hp = policy.for_host(fqdn("mx311"))
    assert hp.level is TlsLevel.SECURE and hp.usable and hp.sni == fqdn("mx311")
    assert hp.reference_ids == (fqdn("mx311"), fqdn("d311"))
    assert policy.policy_strings == (make_tlsa(dane_lab.cert(fqdn("mx311")).cert).text,)


async def test_policy_states(dane_lab: Lab, tmp_path: Path) -> None:
    async with gateway_runtime(dane_lab, tmp_path) as (runtime, _):
        cases = {
            fqdn("dpkix"): (fqdn("mxpkix"), HostState.NO_USABLE, TlsLevel.ENCRYPT, True, None),
            fqdn("dbogus"): (fqdn("mxbogus"), HostState.FAILED, TlsLevel.SECURE, False, TlsRptResult.DNSSEC_INVALID),
            fqdn("ddead"): (fqdn("mxdead"), HostState.FAILED, TlsLevel.SECURE, False, TlsRptResult.DNSSEC_INVALID),
        }
        for domain, (host, state, level, usable, failure) in cases.items():
            _, policy, _ = await _policy(runtime, domain)
            assert policy is not None, domain
            hp = policy.for_host(host)
            assert isinstance(hp.data, object) and getattr(hp.data, "state", None) is state, (domain, hp.detail)
            assert (hp.level, hp.usable, hp.failure) == (level, usable, failure), domain
        # no TLSA (secure denial) and an unsigned zone: DANE has no opinion
        for domain in (fqdn("dnone"), PLAIN):
            _, policy, _ = await _policy(runtime, domain)
            assert policy is None, domain


async def test_insecure_mx_uses_the_hosts_secure_tlsa_as_trusted(dane_lab: Lab, tmp_path: Path) -> None:
    async with gateway_runtime(dane_lab, tmp_path) as (runtime, _):
        next_hop, policy, _ = await _policy(runtime, fqdn("ins", PLAIN))
    assert not next_hop.mx_secure and policy is not None
    hp = policy.for_host(fqdn("mx311"))
    assert hp.level is TlsLevel.SECURE and hp.reference_ids == (fqdn("mx311"),)  # no nexthop domain
    assert getattr(hp.data, "label", None) == "trusted"


async def test_mandatory_without_tlsa_fails_with_dane_required(dane_lab: Lab, tmp_path: Path) -> None:
    async with gateway_runtime(dane_lab, tmp_path, dane="mandatory") as (runtime, _):
        _, policy, _ = await _policy(runtime, fqdn("dnone"))
    assert policy is not None and policy.applies and policy.failure is TlsRptResult.DANE_REQUIRED


async def test_not_validating_resolver_turns_dane_off_or_defers(dane_lab: Lab, tmp_path: Path) -> None:
    from mxgate.core.dns_answers import SelfTestResult

    broken = SelfTestResult(False, ZONE, BOGUS_TCP, DnssecStatus.INSECURE, DnssecStatus.INSECURE, "not validating")
    for mode, expect in (("opportunistic", None), ("mandatory", TlsRptResult.DNSSEC_INVALID)):
        async with gateway_runtime(dane_lab, tmp_path / mode, dane=mode) as (runtime, _):
            for task in runtime.tasks:
                task.cancel()  # the real self-test would pass: pin the failing one
            runtime.stash[DNSSEC_SELF_TEST] = broken
            _, policy, _ = await _policy(runtime, fqdn("d311"))
        assert (policy.failure if policy is not None else None) is expect, mode
        assert (policy is None) is (expect is None)


async def _recording(events: list[str], emit: Any, kind: str, *args: Any, **labels: Any) -> None:
    events.append(kind)
    await emit(kind, *args, **labels)


async def test_smart_hosts_by_address_have_no_tlsa(dane_lab: Lab, tmp_path: Path) -> None:
    """Opportunistic: nothing to examine, no opinion, no lookup counted. Mandatory: still a dane-required failure."""
    for mode in ("opportunistic", "mandatory"):
        events: list[str] = []
        async with gateway_runtime(dane_lab, tmp_path / mode, dane=mode) as (runtime, _):
            plugin = next(p for p in runtime.plugins.pm.get_plugins() if isinstance(p, DanePlugin))
            dest = Destination(
                runtime.config.outbound("internet"),
                "127.0.0.1",
                (f"127.0.0.1:{dane_lab.port}", f"[::1]:{dane_lab.port}"),
            )
            next_hop = await runtime.hooks.resolve_next_hop(dest)
            assert next_hop is not None and len(next_hop.hosts) == 2
            runtime.hooks.on_event = functools.partial(_recording, events, runtime.hooks.on_event)  # type: ignore[method-assign]
            policy = await plugin.mxgate_delivery_resolve_tls_policy(dest, next_hop)
        if mode == "opportunistic":
            assert policy is None and "dane_tlsa_lookup" not in events
        else:
            assert policy is not None and policy.failure is TlsRptResult.DANE_REQUIRED
            assert events.count("dane_tlsa_lookup") == 2


async def test_one_analysis_serves_a_destination_for_a_second(dane_lab: Lab, tmp_path: Path) -> None:
    """Messages to the same destination over the same next hop reuse the analysis for ANALYSIS_REUSE_SECONDS (the
    MX hosts are examined, and counted, once); after that it is examined again; another self-test result or another
    next hop is another analysis."""
    from mxgate.plugins.dane import ANALYSIS_REUSE_SECONDS

    events: list[str] = []
    async with gateway_runtime(dane_lab, tmp_path) as (runtime, _):
        runtime.hooks.on_event = functools.partial(_recording, events, runtime.hooks.on_event)  # type: ignore[method-assign]
        next_hop, first, plugin = await _policy(runtime, fqdn("d311"))
        examined = events.count("dane_tlsa_lookup")
        assert examined == len(next_hop.hosts) >= 1
        dest = next_hop.destination
        for _ in range(20):
            assert await plugin.mxgate_delivery_resolve_tls_policy(dest, next_hop) is first
        assert events.count("dane_tlsa_lookup") == examined
        other = dataclasses.replace(next_hop, hosts=next_hop.hosts[:0] + next_hop.hosts)  # equal: still reused
        assert await plugin.mxgate_delivery_resolve_tls_policy(dest, other) is first
        runtime.stash[DNSSEC_SELF_TEST] = dataclasses.replace(runtime.stash[DNSSEC_SELF_TEST], detail="re-run")
        again = await plugin.mxgate_delivery_resolve_tls_policy(dest, next_hop)
        assert again is not first and again == first
        assert events.count("dane_tlsa_lookup") == 2 * examined
        await asyncio.sleep(ANALYSIS_REUSE_SECONDS + 0.1)
        later = await plugin.mxgate_delivery_resolve_tls_policy(dest, next_hop)
        assert later is not again and later is not None and later.failure is None
        assert events.count("dane_tlsa_lookup") == 3 * examined


async def test_cname_smart_host_uses_expanded_base_domain(dane_lab: Lab, tmp_path: Path) -> None:
    relay = fqdn("relay")
    async with gateway_runtime(dane_lab, tmp_path) as (runtime, _):
        plugin = next(p for p in runtime.plugins.pm.get_plugins() if isinstance(p, DanePlugin))
        dest = Destination(runtime.config.outbound("internet"), relay, (f"{relay}:{dane_lab.port}",))
        next_hop = await runtime.hooks.resolve_next_hop(dest)
        assert next_hop is not None and next_hop.kind == "smart_host"
        policy = await plugin.mxgate_delivery_resolve_tls_policy(dest, next_hop)
    assert policy is not None
    hp = policy.for_host(relay)
    assert hp.sni == fqdn("mx311")
    assert hp.reference_ids == (fqdn("mx311"), relay)


@pytest.mark.parametrize(
    ("domain", "host", "ok", "matched", "result_type"),
    [
        ("d311", "mx311", True, "3 1 1", None),
        ("d312", "mx312", True, "3 1 2", None),
        ("d301", "mx301", True, "3 0 1", None),
        ("d201", "mx201", True, "2 0 1", None),
        ("d211", "mx211", True, "2 1 1", None),
        ("dexpired", "mxexp", True, "3 1 1", None),
        ("dagile", "mxagile", True, "3 1 2", None),
        ("dwrong", "mxwrong", False, None, TlsRptResult.TLSA_INVALID),
        ("dtaname", "mxtaname", False, "2 0 1", TlsRptResult.CERTIFICATE_HOST_MISMATCH),
        ("dtaee", "mxtaee", True, "3 1 1", None),
    ],
)
async def test_verify_real_handshake(
    dane_lab: Lab,
    tmp_path: Path,
    domain: str,
    host: str,
    ok: bool,
    matched: str | None,
    result_type: TlsRptResult | None,
) -> None:
    name = fqdn(host)
    async with gateway_runtime(dane_lab, tmp_path) as (runtime, _), sinks(dane_lab, name) as started:
        next_hop, policy, plugin = await _policy(runtime, fqdn(domain))
        assert policy is not None
        hp = policy.for_host(name)
        probe = await starttls_probe(dane_lab.ip(name), dane_lab.port, sni=hp.sni)
        assert probe.error is None and probe.chain
        hop = next(h for h in next_hop.hosts if h.name == name)
        attempt = SimpleNamespace(
            host=hop, destination=next_hop.destination, next_hop=next_hop, peer_ip=dane_lab.ip(name), host_policy=hp
        )
        verdict = await plugin.mxgate_delivery_on_tls_verify(attempt, policy, probe.chain)  # type: ignore[arg-type]
        other = await plugin.mxgate_delivery_on_tls_verify(  # type: ignore[arg-type]
            attempt, dataclasses.replace(policy, source="connector"), probe.chain
        )
    assert other is None  # only DANE's own policies are DANE's business
    assert verdict is not None
    assert (verdict.ok, verdict.matched, verdict.result_type) == (ok, matched, result_type), verdict.detail
    assert verdict.label == ("verified" if ok else "untrusted")
    assert started[name].connections == 1


# ============================================================================================================
# end to end through the core's delivery path
# ============================================================================================================


@pytest.mark.parametrize(
    ("domain", "host", "matched"),
    [
        ("d311", "mx311", "3 1 1"),
        ("d312", "mx312", "3 1 2"),
        ("d301", "mx301", "3 0 1"),
        ("d201", "mx201", "2 0 1"),
        ("d211", "mx211", "2 1 1"),
        ("dexpired", "mxexp", "3 1 1"),
        ("dtaee", "mxtaee", "3 1 1"),
        ("d200", "mx200", "2 0 0"),  # RFC 7671 §5.2: the anchor is not sent
        ("dpriv", "mxpriv", "2 0 1"),  # RFC 7672 §3.1.2: RFC 5280 path validation, no keyUsage / AKI needed
        ("dpriv200", "mxpriv200", "2 0 0"),
    ],
)
async def test_delivered_under_dane(dane_lab: Lab, tmp_path: Path, domain: str, host: str, matched: str) -> None:
    name = fqdn(host)
    async with gateway_runtime(dane_lab, tmp_path) as (runtime, capture), sinks(dane_lab, name) as started:
        res = await deliver(runtime, fqdn(domain))
    assert result_of(res) == "delivered", res.steps
    (msg,) = started[name].messages
    assert msg.tls_version is not None and msg.sni == name
    tls = [o for o in capture.outcomes if o.mx_host == name]
    assert tls and tls[-1].success and tls[-1].verification == "verified" and tls[-1].matched == matched
    assert tls[-1].policy_type is PolicyType.TLSA


@pytest.mark.parametrize(
    ("domain", "host", "result_type", "sink_kwargs"),
    [
        ("dwrong", "mxwrong", TlsRptResult.TLSA_INVALID, {}),
        ("dtaname", "mxtaname", TlsRptResult.CERTIFICATE_HOST_MISMATCH, {}),
        ("dnotls", "mxnotls", TlsRptResult.STARTTLS_NOT_SUPPORTED, {"starttls": False}),
    ],
)
async def test_dane_failure_defers(
    dane_lab: Lab, tmp_path: Path, domain: str, host: str, result_type: TlsRptResult, sink_kwargs: dict[str, Any]
) -> None:
    name = fqdn(host)
    async with gateway_runtime(dane_lab, tmp_path) as (runtime, capture), sinks(dane_lab, name, **sink_kwargs) as s:
        res = await deliver(runtime, fqdn(domain))
    assert result_of(res) == "deferred", res.steps
    assert s[name].messages == ()
    assert [o.result_type for o in capture.outcomes if not o.success] == [result_type]
    # the deferral carries the documented DANE code (Exchange's 4.7.32x family), transient form
    assert {o.status for o in res.outcomes} == {dane_status(result_type, permanent=False)}


async def test_unusable_records_require_tls_but_accept_any_certificate(dane_lab: Lab, tmp_path: Path) -> None:
    name = fqdn("mxpkix")
    async with gateway_runtime(dane_lab, tmp_path) as (runtime, _), sinks(dane_lab, name) as s:
        res = await deliver(runtime, fqdn("dpkix"))
        assert result_of(res) == "delivered", res.steps
        assert s[name].messages[0].tls_version is not None
    async with gateway_runtime(dane_lab, tmp_path / "b") as (runtime, _), sinks(dane_lab, name, starttls=False) as s:
        res = await deliver(runtime, fqdn("dpkix"))
        assert result_of(res) == "deferred", res.steps
        assert s[name].messages == ()


async def test_requiretls_under_dane(dane_lab: Lab, tmp_path: Path) -> None:
    """RFC 8689 §4.2.1 with DANE: a host whose certificate DANE verifies takes a REQUIRETLS message (passed on
    with MAIL ... REQUIRETLS); a host DANE does not authenticate -- usable records absent (only PKIX usages: TLS
    required, peer unauthenticated) or TLSA insecure (opportunistic) -- is never dialled for it: 550 5.7.30."""
    good, pkix, plain = fqdn("mx311"), fqdn("mxpkix"), fqdn("mx", PLAIN)
    async with (
        gateway_runtime(dane_lab, tmp_path) as (runtime, _),
        sinks(dane_lab, good, pkix, plain, requiretls=True) as s,
    ):
        res = await deliver(runtime, fqdn("d311"), requiretls=True)
        assert result_of(res) == "delivered", res.steps
        (msg,) = s[good].messages
        assert msg.tls_version is not None and "REQUIRETLS" in msg.mail_options
        for domain, name in ((fqdn("dpkix"), pkix), (PLAIN, plain)):
            res = await deliver(runtime, domain, requiretls=True)
            assert [(o.result, o.status) for o in res.outcomes] == [("failed", "5.7.30")], res.steps
            assert s[name].connections == 0
        # without REQUIRETLS the same hosts take the message
        assert result_of(await deliver(runtime, fqdn("dpkix"))) == "delivered"


async def test_bogus_tlsa_skips_that_mx(dane_lab: Lab, tmp_path: Path) -> None:
    bogus, good = fqdn("mxbogus"), fqdn("mx311")
    async with gateway_runtime(dane_lab, tmp_path) as (runtime, capture), sinks(dane_lab, bogus, good) as s:
        alone = await deliver(runtime, fqdn("dbogus"))
        fallback = await deliver(runtime, fqdn("dbogusfb"))
    assert result_of(alone) == "deferred", alone.steps
    assert result_of(fallback) == "delivered", fallback.steps
    assert s[bogus].connections == 0 and len(s[good].messages) == 1
    assert {o.result_type for o in capture.outcomes if o.mx_host == bogus} == {TlsRptResult.DNSSEC_INVALID}


async def test_tlsa_lookup_failure_defers(dane_lab: Lab, tmp_path: Path) -> None:
    name = fqdn("mxdead")
    async with gateway_runtime(dane_lab, tmp_path) as (runtime, _), sinks(dane_lab, name) as s:
        res = await deliver(runtime, fqdn("ddead"))
    assert result_of(res) == "deferred", res.steps
    assert s[name].connections == 0


async def test_insecure_tlsa_means_opportunistic_tls(dane_lab: Lab, tmp_path: Path) -> None:
    name = fqdn("mx", PLAIN)
    async with gateway_runtime(dane_lab, tmp_path) as (runtime, capture), sinks(dane_lab, name) as s:
        res = await deliver(runtime, PLAIN)
    assert result_of(res) == "delivered", res.steps  # the (wrong) insecure TLSA was ignored
    assert s[name].messages[0].tls_version is not None
    assert all(o.policy_type is not PolicyType.TLSA for o in capture.outcomes)


async def test_insecure_mx_delivers_as_trusted(dane_lab: Lab, tmp_path: Path) -> None:
    name = fqdn("mx311")
    async with gateway_runtime(dane_lab, tmp_path) as (runtime, capture), sinks(dane_lab, name) as s:
        res = await deliver(runtime, fqdn("ins", PLAIN))
    assert result_of(res) == "delivered", res.steps
    assert s[name].messages[0].sni == name
    assert capture.outcomes[-1].verification == "trusted"


async def test_first_mx_fails_dane_second_delivers(dane_lab: Lab, tmp_path: Path) -> None:
    bad, good = fqdn("mxwrong"), fqdn("mx311")
    async with gateway_runtime(dane_lab, tmp_path) as (runtime, capture), sinks(dane_lab, bad, good) as s:
        res = await deliver(runtime, fqdn("dfirst"))
    assert result_of(res) == "delivered", res.steps
    assert s[bad].connections == 1 and s[bad].messages == () and len(s[good].messages) == 1
    assert [(o.mx_host, o.success) for o in capture.outcomes] == [(bad, False), (good, True)]


async def test_mandatory_without_tlsa_defers(dane_lab: Lab, tmp_path: Path) -> None:
    name = fqdn("mxnone")
    async with gateway_runtime(dane_lab, tmp_path, dane="mandatory") as (runtime, capture), sinks(dane_lab, name) as s:
        res = await deliver(runtime, fqdn("dnone"))
    assert result_of(res) == "deferred", res.steps
    assert s[name].connections == 0
    assert [o.result_type for o in capture.outcomes] == [TlsRptResult.DANE_REQUIRED]
    async with gateway_runtime(dane_lab, tmp_path / "opp") as (runtime, _), sinks(dane_lab, name) as s:
        assert result_of(await deliver(runtime, fqdn("dnone"))) == "delivered"


async def test_mta_sts_never_rescues_a_dane_failure(dane_lab: Lab, tmp_path: Path) -> None:
    name = fqdn("mxwrong")
    async with (
        gateway_runtime(dane_lab, tmp_path, extra=(("fake_sts", FakeSts()),)) as (runtime, _),
        sinks(dane_lab, name) as s,
    ):
        res = await deliver(runtime, fqdn("dwrong"))
    assert result_of(res) == "deferred", res.steps
    assert s[name].messages == ()


async def test_cname_smart_host_delivered_with_expanded_sni(dane_lab: Lab, tmp_path: Path) -> None:
    relay, target = fqdn("relay"), fqdn("mx311")
    async with gateway_runtime(dane_lab, tmp_path) as (runtime, capture), sinks(dane_lab, target) as s:
        res = await deliver(runtime, relay, (f"{relay}:{dane_lab.port}",))
    assert result_of(res) == "delivered", res.steps
    assert s[target].messages[0].sni == target
    assert capture.outcomes[-1].matched == "3 1 1"
