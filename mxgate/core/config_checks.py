"""Checks across a whole configuration, after each section parsed: unique names, listeners on distinct
addresses, keys that go together, files that must exist, connectors that cannot be told apart, plugins' own
section checks; and :func:`advisories` (valid, but probably not meant)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import TYPE_CHECKING

from mxgate.connectors.inbound import shadowed
from mxgate.core import checks
from mxgate.core.config_builder import _Builder
from mxgate.core.settings import ConfigRegistry

if TYPE_CHECKING:
    from mxgate.connectors.inbound import InboundConnector
    from mxgate.core.config_schema import Config

__all__ = ["advisories"]


def _validate_plugin_sections(b: _Builder, config: Config, registry: ConfigRegistry) -> None:
    """The plugins' section-level checks (``ConfigRegistry.add_section(..., validate=...)``)."""
    for name, validate in registry.validators.items():
        section = config.plugin_sections.get(name)
        if section is None:
            continue
        try:
            found = list(validate(section, config) or ())
        except Exception as exc:
            b.problem(f"plugins.{name}", f"its check failed: {exc!r}")
            continue
        for item in found:
            if isinstance(item, tuple):
                key, message = item
                b.problem(f"plugins.{name}.{key}" if key else f"plugins.{name}", str(message))
            else:
                b.problem(f"plugins.{name}", str(item))


def _cross_check(b: _Builder, config: Config, *, check_files: bool) -> None:
    for section in ("listener", "inbound_connector", "outbound_connector"):
        seen: dict[str, int] = {}
        for i, item in enumerate(getattr(config, section)):
            if item.name in seen:
                b.problem(
                    f"{section}[{i}].name",
                    f"{item.name!r} is already the name of {section}[{seen[item.name]}]",
                )
            seen[item.name] = i

    bound: dict[tuple[str, int], str] = {}
    for i, lst in enumerate(config.listener):
        key = (lst.host, lst.port)
        if _overlaps(key, bound):
            b.problem(f"listener[{i}].address", f"{lst.address} is also used by {_overlaps(key, bound)}")
        bound[key] = f"listener[{i}]"
        if bool(lst.tls_cert) != bool(lst.tls_key):
            b.problem(f"listener[{i}]", "tls_cert and tls_key go together: set both or neither")
        if (lst.implicit_tls or lst.require_tls) and not lst.tls_cert:
            what = "implicit_tls" if lst.implicit_tls else "require_tls"
            b.problem(f"listener[{i}].{what}", "needs tls_cert and tls_key")
        if check_files:
            for key_name in ("tls_cert", "tls_key", "tls_client_ca"):
                _file_exists(b, config, f"listener[{i}].{key_name}", getattr(lst, key_name))
            for j, sni in enumerate(lst.sni_certificates):
                _file_exists(b, config, f"listener[{i}].sni_certificates[{j}].cert", sni.cert)
                _file_exists(b, config, f"listener[{i}].sni_certificates[{j}].key", sni.key)
    if config.metrics.listen:
        host, port = checks.split_hostport(config.metrics.listen)
        if _overlaps((host, port), bound):
            b.problem("metrics.listen", f"{config.metrics.listen} is also used by {_overlaps((host, port), bound)}")

    for i, conn in enumerate(config.inbound_connector):
        if not conn.sender_ips and not conn.tls_sender_certificate_name:
            b.problem(f"inbound_connector[{i}]", "needs sender_ips or tls_sender_certificate_name to match clients")
        if conn.restrict_domains_to_ips and not conn.sender_ips:
            b.problem(f"inbound_connector[{i}].restrict_domains_to_ips", "needs sender_ips")
        if conn.restrict_domains_to_certificate and not conn.tls_sender_certificate_name:
            b.problem(f"inbound_connector[{i}].restrict_domains_to_certificate", "needs tls_sender_certificate_name")
        if (conn.restrict_domains_to_ips or conn.restrict_domains_to_certificate) and not conn.sender_domains:
            b.problem(f"inbound_connector[{i}]", "restrict_domains_to_* needs sender_domains to restrict")
        if check_files:
            _file_exists(b, config, f"inbound_connector[{i}].tls_client_ca", conn.tls_client_ca)
        for j in range(i):
            other = config.inbound_connector[j]
            if _indistinguishable(other, conn):
                b.problem(
                    f"inbound_connector[{i}]",
                    f"overlaps inbound_connector[{j}] ({other.name!r}) with the same sender_ips and "
                    "certificate name: no way to tell them apart",
                )

    for i, out in enumerate(config.outbound_connector):
        if bool(out.smart_hosts) == bool(out.use_mx):
            b.problem(f"outbound_connector[{i}]", "set exactly one of smart_hosts or use_mx = true")
        for j, host in enumerate(out.smart_hosts):
            try:
                h, _ = checks.split_hostport(host, out.port)
                if not checks.is_hostname(h):
                    ipaddress.ip_address(h)
            except ValueError as exc:
                b.problem(f"outbound_connector[{i}].smart_hosts[{j}]", f"{host!r}: {exc}")
        if out.auth_username and out.tls in ("none",):
            b.problem(f"outbound_connector[{i}].auth_username", 'AUTH is only ever sent under TLS; tls = "none"')
        if out.auth_username and not out.auth_password_file:
            b.problem(f"outbound_connector[{i}].auth_password_file", "needed with auth_username")
        if check_files:
            _file_exists(b, config, f"outbound_connector[{i}].tls_ca_file", out.tls_ca_file)
            _file_exists(b, config, f"outbound_connector[{i}].auth_password_file", out.auth_password_file)

    if config.dns.dnssec == "in_process":
        b.problem("dns.dnssec", '"in_process" validation is not available yet; use "validating_resolver"')
    for i, res in enumerate(config.dns.resolvers):
        try:
            checks.split_hostport(res.address, 53)
        except ValueError as exc:
            b.problem(f"dns.resolvers[{i}].address", f"{res.address!r}: {exc}")


def _overlaps(key: tuple[str, int], bound: Mapping[tuple[str, int], str]) -> str | None:
    host, port = key
    for (h, p), who in bound.items():
        if p == port and (h == host or h in ("0.0.0.0", "::") or host in ("0.0.0.0", "::")):
            return who
    return None


def advisories(config: Config) -> list[str]:
    """What is valid but probably not meant, one line each: ``mxgate run`` logs them at start and ``mxgate config
    check`` prints them as warnings (neither refuses the configuration)."""
    out: list[str] = []
    for i, lst in enumerate(config.listener):
        try:
            port = checks.split_hostport(lst.address)[1]
        except ValueError:
            continue
        if port == 25 and lst.auth and (lst.tls_cert or lst.implicit_tls):
            out.append(
                f"listener[{i}] {lst.name!r} on port 25 offers AUTH (under TLS): an MX should not (auth = false; "
                "submission belongs on its own listener, 587 or 465)"
            )
    out.extend(shadowed(config.inbound_connector))
    return out


def _indistinguishable(a: InboundConnector, b: InboundConnector) -> bool:
    if (a.tls_sender_certificate_name or "").lower() != (b.tls_sender_certificate_name or "").lower():
        return False
    nets_a, nets_b = set(a.networks), set(b.networks)
    return nets_a == nets_b


def _file_exists(b: _Builder, config: Config, path: str, value: str | None) -> None:
    if value and not config.path(value).is_file():
        b.problem(path, f"file {value!r} does not exist (looked at {config.path(value)})")
