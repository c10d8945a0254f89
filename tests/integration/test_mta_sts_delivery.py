"""MTA-STS end to end through the delivery core: MX records and ``_mta-sts`` TXT in the DNS lab, the policies
served by the plugin's own HTTPS listener, aiosmtpd sinks with test-CA certificates as MX hosts on 127.0.0.x
(RFC-CHECKLIST 23-25: MX filtered before connecting, certificate matched to the MX dialled)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from mxgate.core import bootstrap
from mxgate.core.delivery import Deliverer, DeliveryResult, OutgoingMessage
from mxgate.core.dns import Resolver
from mxgate.core.outcomes import Destination, PolicyType, TlsRptResult
from mxgate.core.runtime import Runtime
from mxgate.plugins.mta_sts import ServedPolicy
from mxgate.testing.ca import IssuedCert, TestCA
from mxgate.testing.dnslab import DnsLab
from mxgate.testing.gateway import free_port
from mxgate.testing.recorder import Recorder
from mxgate.testing.sinks import SmtpSink

pytestmark = pytest.mark.integration

ROGUE_IP, GOOD_IP, BADCERT_IP, POLICY_IP = "127.0.0.91", "127.0.0.92", "127.0.0.93", "127.0.0.94"
BODY = b"From: a@sender.test\r\nTo: b@enf.test\r\nSubject: sts\r\n\r\nHello.\r\n"

SERVED = [
    ServedPolicy(domain="enf.test", mode="enforce", mx=("mx.enf.test",), max_age=86400),
    ServedPolicy(domain="badc.test", mode="enforce", mx=("mx.badc.test",), max_age=86400),
    ServedPolicy(domain="tbadc.test", mode="testing", mx=("mx.tbadc.test",), max_age=86400),
    ServedPolicy(domain="bare.test", mode="enforce", mx=("mx.enf.test",), max_age=86400),
]


@dataclass
class World:
    dns: DnsLab
    ca: TestCA
    certs: dict[str, IssuedCert]
    smtp_port: int
    https_port: int
    tmp: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("sts-e2e")
    ca = TestCA.create(tmp / "ca")
    certs = {
        "good": ca.issue(["mx.enf.test"]),
        "rogue": ca.issue(["rogue.enf.test"]),
        "wrong": ca.issue(["somewhere.else.test"]),
        "policy": ca.issue([f"mta-sts.{p.domain}" for p in SERVED]),
    }
    dns = DnsLab(tmp / "dns")
    enf = dns.zone("enf.test", signed=False)
    enf.add("@", "MX", "10 rogue").add("@", "MX", "20 mx")  # the rogue MX is preferred, but not in the policy
    enf.add("rogue", "A", ROGUE_IP).add("mx", "A", GOOD_IP)
    for name in ("badc.test", "tbadc.test"):
        dns.zone(name, signed=False).add("@", "MX", "10 mx").add("mx", "A", BADCERT_IP)
    # RFC 8461 §3.1: a bare "v=STSv1" (no ";") beside the valid record is discarded before counting
    dns.zone("bare.test", signed=False).add("@", "MX", "10 rogue.enf.test.").add("@", "MX", "20 mx.enf.test.")
    dns.get("bare.test").add("_mta-sts", "TXT", '"v=STSv1"')
    for served in SERVED:
        zone = dns.get(served.domain)
        zone.add("_mta-sts", "TXT", f'"v=STSv1; id={served.record_id}"')
        zone.add("mta-sts", "A", POLICY_IP)
    dns.start()
    try:
        yield World(dns, ca, certs, free_port(ROGUE_IP, GOOD_IP, BADCERT_IP), free_port(POLICY_IP), tmp)
    finally:
        dns.stop()


@pytest.fixture
async def gateway(world: World, tmp_path: Path) -> AsyncIterator[tuple[Runtime, Recorder]]:
    document: dict[str, Any] = {
        "server": {"hostname": "gw.sender.test", "state_dir": str(tmp_path / "var")},
        "listener": [{"name": "smtp", "address": "127.0.0.1:1"}],
        "outbound_connector": [
            {
                "name": "internet",
                "recipient_domains": ["*"],
                "use_mx": True,
                "tls": "opportunistic",
                "mta_sts": "opportunistic",
                "mx_port": world.smtp_port,
                "connect_timeout": 5.0,
                "command_timeout": 5.0,
            }
        ],
        "dns": {"resolvers": [str(world.dns.endpoint)], "timeout": 2.0},
        "plugins": {
            "disable": ["dnssec", "dane", "tlsrpt", "prometheus"],
            "mta_sts": {
                "ca_file": str(world.ca.cert_path),
                "fetch_port": world.https_port,
                "fetch_timeout": 3.0,
                "serve_listen": f"{POLICY_IP}:{world.https_port}",
                "serve_cert": str(world.certs["policy"].chain_path),
                "serve_key": str(world.certs["policy"].key_path),
                "serve_policies": [
                    {"domain": p.domain, "mode": p.mode, "mx": list(p.mx), "max_age": p.max_age} for p in SERVED
                ],
            },
        },
    }
    path = tmp_path / "mxgate.toml"
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    recorder = Recorder()
    config, plugins = bootstrap.load(path, entry_points=False, extra_plugins=[("recorder", recorder)])
    runtime = Runtime.create(config, plugins)
    runtime.resolver = Resolver([world.dns.endpoint], timeout=2.0)
    await runtime.hooks.on_startup(runtime)
    try:
        yield runtime, recorder
    finally:
        for task in runtime.tasks:
            task.cancel()
        await runtime.hooks.on_shutdown(runtime)
        runtime.tracking.close()


async def deliver(runtime: Runtime, domain: str) -> DeliveryResult:
    message = OutgoingMessage("Q1", "a@sender.test", (f"b@{domain}",), BODY)
    return await Deliverer(runtime).deliver(Destination(runtime.config.outbound("internet"), domain), message)


async def test_enforce_skips_mx_not_in_policy(world: World, gateway: tuple[Runtime, Recorder]) -> None:
    runtime, recorder = gateway
    async with (
        SmtpSink(ROGUE_IP, world.smtp_port, tls=world.certs["rogue"], hostname="rogue.enf.test") as rogue,
        SmtpSink(GOOD_IP, world.smtp_port, tls=world.certs["good"], hostname="mx.enf.test") as good,
    ):
        result = await deliver(runtime, "enf.test")
        assert [o.result for o in result.outcomes] == ["delivered"], result.steps
        assert result.mx_host == "mx.enf.test"
        assert rogue.connections == 0  # filtered BEFORE connecting
        assert len(good.messages) == 1
    sessions = [o for o in recorder.outcomes if o.mx_host == "mx.enf.test"]
    assert [(o.policy_type, o.success, o.verification) for o in sessions] == [(PolicyType.STS, True, "verified")]
    assert sessions[0].mx_patterns == ("mx.enf.test",)


async def test_bare_version_record_does_not_switch_the_policy_off_rfc8461_3_1(
    world: World, gateway: tuple[Runtime, Recorder]
) -> None:
    """RFC 8461 §3.1: TXT records not beginning "v=STSv1;" are discarded before counting: a bare ``v=STSv1`` beside
    the valid record leaves exactly one record, so the enforce policy applies and the preferred MX that the
    policy does not name gets nothing (counting first made it "two records, no policy": opportunistic TLS)."""
    runtime, recorder = gateway
    async with (
        SmtpSink(ROGUE_IP, world.smtp_port, tls=world.certs["rogue"], hostname="rogue.enf.test") as rogue,
        SmtpSink(GOOD_IP, world.smtp_port, tls=world.certs["good"], hostname="mx.enf.test") as good,
    ):
        result = await deliver(runtime, "bare.test")
        assert [o.result for o in result.outcomes] == ["delivered"], result.steps
        assert result.mx_host == "mx.enf.test"
        assert rogue.connections == 0
        assert len(good.messages) == 1
    sessions = [o for o in recorder.outcomes if o.mx_host == "mx.enf.test"]
    assert [(o.policy_type, o.policy_domain, o.success) for o in sessions] == [(PolicyType.STS, "bare.test", True)]


async def test_enforce_refuses_certificate_not_valid_for_the_mx(
    world: World, gateway: tuple[Runtime, Recorder]
) -> None:
    runtime, recorder = gateway
    async with SmtpSink(BADCERT_IP, world.smtp_port, tls=world.certs["wrong"], hostname="mx.badc.test") as sink:
        result = await deliver(runtime, "badc.test")
        assert [o.result for o in result.outcomes] == ["deferred"], result.steps
        assert result.outcomes[0].status == "4.7.5"
        assert sink.messages == ()
    (outcome,) = [o for o in recorder.outcomes if o.mx_host == "mx.badc.test"]
    assert (outcome.policy_type, outcome.success, outcome.result_type) == (
        PolicyType.STS,
        False,
        TlsRptResult.CERTIFICATE_HOST_MISMATCH,
    )


async def test_testing_delivers_and_reports_bad_certificate(world: World, gateway: tuple[Runtime, Recorder]) -> None:
    runtime, recorder = gateway
    async with SmtpSink(BADCERT_IP, world.smtp_port, tls=world.certs["wrong"], hostname="mx.tbadc.test") as sink:
        result = await deliver(runtime, "tbadc.test")
        assert [o.result for o in result.outcomes] == ["delivered"], result.steps
        assert len(sink.messages) == 1
    (outcome,) = [o for o in recorder.outcomes if o.mx_host == "mx.tbadc.test"]
    assert (outcome.policy_type, outcome.policy_domain, outcome.success, outcome.result_type) == (
        PolicyType.STS,
        "tbadc.test",
        False,
        TlsRptResult.CERTIFICATE_HOST_MISMATCH,
    )


async def test_running_gateway_serves_policies_and_stops_cleanly(world: World, mxgate_gateway: Any) -> None:
    policy = world.certs["policy"]
    gw = await mxgate_gateway(
        f"""
        [dns]
        resolvers = ["{world.dns.endpoint}"]
        timeout = 2.0
        [plugins.mta_sts]
        ca_file = "{world.ca.cert_path}"
        fetch_port = {world.https_port}
        serve_listen = "{POLICY_IP}:{world.https_port}"
        serve_cert = "{policy.chain_path}"
        serve_key = "{policy.key_path}"
        [[plugins.mta_sts.serve_policies]]
        domain = "enf.test"
        mx = ["mx.enf.test"]
        max_age = 86400
        """
    )
    plugin = gw.runtime.plugins.pm.get_plugin("mta_sts")
    assert plugin.engine is not None and plugin.server is not None
    assert any(not t.done() for t in gw.runtime.tasks)  # the refresher
    fetched = await plugin.engine.fetcher.fetch("enf.test")  # its own listener, through the fetcher
    assert fetched.ok and fetched.policy is not None and fetched.policy.mx == ("mx.enf.test",)
    await gw.gateway.stop(timeout=5.0)
    assert plugin.engine is None and plugin.server is None
    assert all(t.done() for t in gw.runtime.tasks)
