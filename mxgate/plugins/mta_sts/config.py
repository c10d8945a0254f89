"""The ``[plugins.mta_sts]`` section, the ``mta_sts`` connector setting, and the policies we publish."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Any

from mxgate import (
    Config,
    ConnectorSetting,
    check_optional_hostport,
    is_hostname,
    normalize_dns_name,
    setting,
)
from mxgate.plugins.mta_sts.policy import MAX_AGE_LIMIT, render_policy

__all__ = [
    "MTA_STS_MODE",
    "PLUGIN_NAME",
    "MtaStsConfig",
    "ServedPolicy",
    "is_policy_domain",
    "norm_domain",
    "section",
]

PLUGIN_NAME = "mta_sts"

MTA_STS_MODE = ConnectorSetting(
    "outbound_connector",
    "mta_sts",
    str,
    "opportunistic",
    "MTA-STS (RFC 8461): none | opportunistic (honour the published mode) | mandatory (no valid policy, no delivery).",
    ("none", "opportunistic", "mandatory"),
)


def _check_max_age(value: Any) -> str | None:
    return None if 0 < value <= MAX_AGE_LIMIT else f"must be between 1 and {MAX_AGE_LIMIT} seconds"


def _check_policy_id(value: Any) -> str | None:
    if value is None:
        return None
    ok = 1 <= len(value) <= 32 and value.isascii() and value.isalnum()
    return None if ok else "must be 1-32 letters and digits"


def _check_mx_patterns(value: Any) -> str | None:
    for pattern in value:
        base = pattern[2:] if pattern.startswith("*.") else pattern
        if not is_hostname(base) or "." not in base:
            return f"{pattern!r} is not a host name or *.domain pattern"
    return None


def _check_port(value: Any) -> str | None:
    return None if 0 < value < 65536 else "must be a port number (1-65535)"


def _check_positive(value: Any) -> str | None:
    return None if value > 0 else "must be positive"


def is_policy_domain(name: str) -> bool:
    """A name that can have a policy: not an IP literal (a smart host given by address), not a wildcard."""
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        norm = normalize_dns_name(name)
        return norm is not None and "*" not in norm and "." in norm and is_hostname(norm)
    return False


@dataclass(frozen=True, slots=True)
class ServedPolicy:
    domain: str = setting(desc="Policy domain we publish for (served as mta-sts.<domain>).", example="example.org")
    mode: str = setting("enforce", desc="Published mode.", choices=("enforce", "testing", "none"))
    mx: tuple[str, ...] = setting(
        (), desc="MX patterns: host names or '*.domain'.", check=_check_mx_patterns, example=["mx.example.org"]
    )
    max_age: int = setting(604800, desc="Seconds senders may cache the policy.", check=_check_max_age)
    id: str | None = setting(
        None,
        desc="TXT id to publish; default: derived from the policy text, so it changes with the policy.",
        check=_check_policy_id,
    )

    def render(self) -> str:
        return render_policy(self.mode, self.mx, self.max_age)

    @property
    def record_id(self) -> str:
        return self.id or hashlib.sha256(self.render().encode()).hexdigest()[:20]


@dataclass(frozen=True, slots=True)
class MtaStsConfig:
    ca_file: str | None = setting(
        None,
        desc="CA bundle (PEM) trusted for policy hosts and for MX certificates under MTA-STS; default: the system CAs.",
    )
    fetch_timeout: float = setting(
        10.0, desc="Seconds for one policy fetch (resolve, connect, TLS, response).", check=_check_positive
    )
    fetch_port: int = setting(
        443, desc="Port of policy hosts (RFC 8461: 443; tests point this elsewhere).", check=_check_port
    )
    refresh_interval: float = setting(
        3600.0, desc="Seconds between background scans for policies due a refresh.", check=_check_positive
    )
    refresh_after: float = setting(
        86400.0,
        desc="Refresh a cached policy this many seconds after its fetch, or this long before it expires.",
        check=_check_positive,
    )
    refresh_concurrency: int = setting(4, desc="Policies refreshed at the same time.", check=_check_positive)
    refresh_alert_after: int = setting(
        3,
        desc="Consecutive failed refreshes of an enforce/testing policy before the sts_refresh_failing event.",
        check=_check_positive,
    )
    serve_listen: str | None = setting(
        None,
        desc='Serve our own policies over HTTPS on "host:port" ("[::]:443" in production); unset: off.',
        check=check_optional_hostport,
    )
    serve_cert: str | None = setting(None, desc="Certificate chain (PEM) for mta-sts.<domain> of every served domain.")
    serve_key: str | None = setting(None, desc="Private key (PEM) for serve_cert.")
    serve_policies: tuple[ServedPolicy, ...] = setting((), desc="Policies we publish, one table per domain.")


def section(config: Config) -> MtaStsConfig:
    return config.plugin_section(PLUGIN_NAME, MtaStsConfig)


def norm_domain(domain: str) -> str:
    norm = normalize_dns_name(domain)
    if norm is None or "*" in norm:
        raise ValueError(f"not a usable domain name: {domain!r}")
    return norm
