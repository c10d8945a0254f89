"""``mxgate dane explain`` decides through the hooks delivery calls: the connector from ``resolve_route`` and the
next hop from ``resolve_next_hop`` (a plugin that overrides either is what the view shows), then DANE's own
analysis. No sockets: the next hop is an IP literal (no TLSA lookup) and the resolver only answers the self-test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mxgate import (
    Address,
    Destination,
    DnssecStatus,
    HopHost,
    NextHop,
    QueuedMessage,
    Route,
    Runtime,
    SelfTestResult,
    hookimpl,
)
from mxgate.core import engine
from mxgate.plugins.dane import explain_dane, format_explain

CONFIG = """
[server]
state_dir = "{state}"

[[outbound_connector]]
name = "internet"
recipient_domains = ["*"]
use_mx = true
dane = "opportunistic"

[[outbound_connector]]
name = "partners"
recipient_domains = ["partner.example"]
use_mx = true
dane = "mandatory"
mx_port = 2525
"""


class Steer:
    """Routes every recipient to ``partners`` and answers the next hop itself; records what it was asked."""

    name = "steer"

    def __init__(self) -> None:
        self.routed: list[tuple[str, str]] = []
        self.destinations: list[Destination] = []

    @hookimpl(tryfirst=True)
    def mxgate_categorizer_resolve_route(self, message: QueuedMessage, recipient: Address) -> Route:
        self.routed.append((message.id, str(recipient)))
        return Route("partners")

    @hookimpl(tryfirst=True)
    def mxgate_delivery_resolve_next_hop(self, destination: Destination) -> NextHop:
        self.destinations.append(destination)
        host = HopHost("192.0.2.7", destination.connector.mx_port, 10, ("192.0.2.7",), False)
        return NextHop(destination, (host,), "smart_host")


class SelfTestOnly:
    async def self_test(self, secure: str, bogus: str) -> SelfTestResult:
        S, B = DnssecStatus.SECURE, DnssecStatus.BOGUS
        return SelfTestResult(True, secure, bogus, S, B, "resolver validates")


async def explained(tmp_path: Path, **kwargs: Any) -> tuple[dict[str, Any], Steer]:
    (tmp_path / "mx.toml").write_text(CONFIG.format(state=tmp_path / "var"))
    steer = Steer()
    config, plugins = engine.load(tmp_path / "mx.toml", entry_points=False, extra_plugins=[("steer", steer)])
    runtime = Runtime.create(config, plugins)
    runtime.resolver = SelfTestOnly()  # type: ignore[assignment]
    await runtime.hooks.on_startup(runtime)
    try:
        return await explain_dane(runtime, "Example.ORG.", **kwargs), steer
    finally:
        await runtime.hooks.on_shutdown(runtime)
        runtime.tracking.close()


async def test_the_connector_comes_from_resolve_route_and_the_hosts_from_resolve_next_hop(tmp_path: Path) -> None:
    ex, steer = await explained(tmp_path)
    assert steer.routed == [("dane-explain", "postmaster@example.org")]
    assert [(d.connector.name, d.domain) for d in steer.destinations] == [("partners", "example.org")]
    assert ex["connector"] == "partners" and ex["dane"] == "mandatory"
    assert ex["next_hop"] == "smart_host"
    assert [(h["host"], h["state"], h["addresses"]) for h in ex["hosts"]] == [
        ("192.0.2.7", "not_applicable", ["192.0.2.7"])
    ]
    # mandatory DANE and no host with usable TLSA: what delivery would do, deferral with dane-required
    assert ex["policy_failure"] == "dane-required"
    assert ex["self_test"]["validating"]
    assert "connector partners, dane = mandatory, next hop smart_host" in format_explain(ex)


async def test_port_overrides_the_connectors_mx_port(tmp_path: Path) -> None:
    _ex, steer = await explained(tmp_path, port=2600)
    assert [d.connector.mx_port for d in steer.destinations] == [2600]
    _ex, steer = await explained(tmp_path)
    assert [d.connector.mx_port for d in steer.destinations] == [2525]
