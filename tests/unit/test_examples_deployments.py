"""The deployment examples do what their READMEs say (``config check`` itself runs in test_cli.py)."""

from __future__ import annotations

from pathlib import Path

from mxgate.connectors.inbound import select_inbound
from mxgate.connectors.outbound import select_outbound
from mxgate.core import bootstrap
from mxgate.plugins.dane import DANE_MODE
from mxgate.plugins.mta_sts import MTA_STS_MODE

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_edge_exchange_online() -> None:
    config, plugins = bootstrap.load(EXAMPLES / "edge-exchange-online" / "mxgate.toml", entry_points=False)
    assert "prometheus" in plugins.names() and config.metrics.listen == "127.0.0.1:9925"
    inbound = config.inbound_connector
    exo = "mail.protection.outlook.com"
    # EXO's outbound traffic: its address range AND its verified certificate; neither alone is enough.
    chosen = select_inbound(inbound, "40.107.22.5", certificate_names=[exo], certificate_verified=True)
    assert chosen is not None and chosen.name == "from-exchange-online" and chosen.may_relay and chosen.require_tls
    assert select_inbound(inbound, "40.107.22.5") is None
    assert select_inbound(inbound, "40.107.22.5", certificate_names=[exo], certificate_verified=False) is None
    assert select_inbound(inbound, "198.51.100.7", certificate_names=[exo], certificate_verified=True) is None
    assert select_inbound(inbound, "2a01:111:f403:c000::1", certificate_names=[exo], certificate_verified=True)
    # Internet mail for the domain goes to EXO, authenticated; everything else by MX.
    to_exo = select_outbound(config.outbound_connector, "example.org")
    assert to_exo is not None and to_exo.name == "to-exchange-online"
    assert to_exo.tls == "domain_validation" and to_exo.tls_domain == exo
    assert to_exo.smart_hosts == ("example-org.mail.protection.outlook.com",)
    internet = select_outbound(config.outbound_connector, "example.net")
    assert internet is not None and internet.use_mx and internet.get(DANE_MODE) == "opportunistic"
    assert config.server.accepted_domains == ("example.org",)


def test_partner_dane() -> None:
    config, _ = bootstrap.load(EXAMPLES / "partner-dane" / "mxgate.toml", entry_points=False)
    for domain in ("fabrikam.example", "mx.fabrikam.example"):
        partner = select_outbound(config.outbound_connector, domain)
        assert partner is not None and partner.name == "partner-fabrikam"
        assert partner.use_mx and not partner.smart_hosts  # no pinned address any more
        assert partner.get(DANE_MODE) == "mandatory" and partner.get(MTA_STS_MODE) == "none"
    other = select_outbound(config.outbound_connector, "example.net")
    assert other is not None and other.name == "internet"


def _unit(path: Path) -> dict[str, list[str]]:
    """A systemd unit file as ``"Section.Key" -> [values]`` (keys may repeat; comments skipped)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def test_systemd_units_are_hardened_and_hand_over_the_listener() -> None:
    service = _unit(EXAMPLES / "systemd" / "mxgate.service")
    socket_unit = _unit(EXAMPLES / "systemd" / "mxgate.socket")
    assert service["Unit.Requires"] == ["mxgate.socket"]
    assert service.get("Service.User") == ["mxgate"] or service.get("Service.DynamicUser") == ["yes"]
    assert service["Service.ProtectSystem"] == ["strict"]
    assert service["Service.StateDirectory"] == ["mxgate"]
    assert service["Service.NoNewPrivileges"] == ["yes"]
    assert service["Service.CapabilityBoundingSet"] == [""] and service["Service.AmbientCapabilities"] == [""]
    assert any(cmd.split()[1:3] == ["run", "--config"] for cmd in service["Service.ExecStart"])
    assert any(cmd.split()[1:3] == ["reload", "--config"] for cmd in service["Service.ExecReload"])
    # the socket unit binds port 25 and names its sockets after the example's listener
    assert all(addr.endswith(":25") for addr in socket_unit["Socket.ListenStream"])
    config, _ = bootstrap.load(EXAMPLES / "edge-exchange-online" / "mxgate.toml", entry_points=False)
    assert socket_unit["Socket.FileDescriptorName"] == [config.listener[0].name]
    assert socket_unit["Socket.Service"] == ["mxgate.service"]


def _example_configs() -> list[Path]:
    return sorted(p for p in EXAMPLES.rglob("*.toml") if p.name != "pyproject.toml")


def test_examples_offer_no_auth_on_their_mx_listeners() -> None:
    from mxgate.core.config import advisories

    assert len(_example_configs()) >= 3
    for path in _example_configs():
        config, _ = bootstrap.load(path, entry_points=False)
        assert config.listener and all(not lst.auth for lst in config.listener), path  # "[::]:25" in production
        assert advisories(config) == [], path


def test_edge_example_mails_tls_rpt_reports_only_as_its_readme_says() -> None:
    config, _ = bootstrap.load(EXAMPLES / "edge-exchange-online" / "mxgate.toml", entry_points=False)
    tlsrpt = config.plugin_sections["tlsrpt"]
    readme = (EXAMPLES / "edge-exchange-online" / "README.md").read_text()
    reporting = " ".join(readme.split("**Reporting**")[1].split("\n- ")[0].split())
    if not (tlsrpt.dkim_key_file and tlsrpt.dkim_selector):  # mailto: reports are never sent unsigned (RFC 8460)
        assert "must be DKIM-signed" in reporting and "only once you add a DKIM key" in reporting
