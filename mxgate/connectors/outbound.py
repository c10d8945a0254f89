"""Outbound connectors (Exchange's send connectors): where mail for a recipient domain goes, and how securely."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from mxgate.core import checks
from mxgate.core.settings import ConnectorSetting, setting

T = TypeVar("T")

TLS_MODES = ("none", "opportunistic", "encryption_only", "certificate_validation", "domain_validation")


@dataclass(frozen=True, slots=True)
class OutboundConnector:
    name: str = setting(desc="Connector name, used in logs, metrics and routing.", check=checks.check_name)
    recipient_domains: tuple[str, ...] = setting(
        desc="Recipient domains routed here: 'example.org', '*.example.org' or '*'. The most specific match wins.",
        check=checks.check_domain_patterns,
        example=["*"],
    )
    smart_hosts: tuple[str, ...] = setting(
        (), desc="Relay through these hosts (name, IP, 'host:port', '[v6]:port'), tried in order."
    )
    use_mx: bool = setting(False, desc="Deliver to the recipient domain's MX hosts (RFC 5321 section 5.1).")
    port: int = setting(25, desc="Port for smart hosts given without one.")
    mx_port: int = setting(25, desc="Port for MX delivery (tests point this elsewhere).")
    tls: str = setting("opportunistic", desc="TLS for this connector.", choices=TLS_MODES)
    tls_domain: str | None = setting(
        None, desc="Name the peer certificate must carry under domain_validation (default: the host dialled)."
    )
    tls_ca_file: str | None = setting(
        None, desc="CA bundle (PEM) for certificate checks on this connector; default: the system CAs."
    )
    auth_username: str | None = setting(None, desc="AUTH to the smart host as this user (only ever under TLS).")
    auth_password_file: str | None = setting(None, desc="File holding the smart host password (one line).")
    cost: int = setting(1, desc="Tie-breaker between equally specific connectors: lower cost wins.")
    max_connections: int = setting(
        20, desc="Concurrent connections through this connector.", check=checks.check_positive
    )
    max_connections_per_destination: int = setting(
        5,
        desc="Concurrent connections to one destination (domain or smart host).",
        check=checks.check_positive,
    )
    connection_reuse: bool = setting(
        True,
        desc="Keep a session open after a delivery and reuse it for the next message to the same destination, host "
        "and TLS policy (Postfix's connection cache); at most max_connections_per_destination idle ones.",
    )
    connection_idle_timeout: float = setting(
        2.0,
        desc="Seconds an idle session is kept for reuse before QUIT (at most 300).",
        check=checks.positive_at_most(300.0),
    )
    connection_reuse_limit: int = setting(100, desc="Most messages sent over one session.", check=checks.check_positive)
    connection_max_age: float = setting(
        300.0, desc="Seconds after connecting that a session is no longer reused.", check=checks.check_positive
    )
    connect_timeout: float = setting(
        30.0, desc="Seconds to wait for TCP connect and banner.", check=checks.check_positive
    )
    command_timeout: float = setting(
        300.0, desc="Seconds to wait for any reply (RFC 5321 4.5.3.2).", check=checks.check_positive
    )
    retry_first: float = setting(300.0, desc="Seconds before the first retry.", check=checks.check_positive)
    retry_max: float = setting(
        3600.0, desc="Longest gap between retries (exponential backoff).", check=checks.check_positive
    )
    give_up_after: float = setting(
        5 * 86400.0,
        desc="Seconds after receipt before a deferred message bounces.",
        check=checks.check_positive,
    )
    delay_warning_after: float | None = setting(
        None,
        desc="Send a delay warning DSN after this many seconds (unset: none).",
        check=checks.check_optional_positive,
    )
    chunking: bool = setting(
        True, desc="Send with BDAT (RFC 3030 CHUNKING) when the next hop offers it; false: always DATA."
    )
    test_mode: bool = setting(False, desc="Accept and log but do not deliver (connector dry run).")
    source_address: str | None = setting(None, desc="Local IP to send from.")
    enabled: bool = setting(True, desc="A disabled connector routes nothing.")
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), compare=False)

    def get(self, spec: ConnectorSetting[T]) -> T:
        """A plugin-declared setting of this connector (its default when the file does not set it)."""
        value = self.extra.get(spec.name, spec.default)
        return value  # type: ignore[no-any-return]

    def best_pattern(self, domain: str) -> str | None:
        """The most specific of this connector's patterns that matches ``domain``."""
        hits = [p for p in self.recipient_domains if checks.domain_matches(p, domain)]
        return max(hits, key=checks.pattern_specificity) if hits else None


def select_outbound(connectors: Sequence[OutboundConnector], domain: str) -> OutboundConnector | None:
    """Default routing: most specific ``recipient_domains`` match; ties by ``cost``, then file order."""
    best: tuple[int, int, int] | None = None
    chosen = None
    for index, conn in enumerate(connectors):
        if not conn.enabled:
            continue
        pattern = conn.best_pattern(domain)
        if pattern is None:
            continue
        rank = (checks.pattern_specificity(pattern), -conn.cost, -index)
        if best is None or rank > best:
            best, chosen = rank, conn
    return chosen
