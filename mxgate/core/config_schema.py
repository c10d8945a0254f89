"""The configuration schema: one frozen dataclass per section (``[server]``, ``[[listener]]``, ``[dns]``, ...),
each key declared with :func:`mxgate.core.settings.setting` (type, default, one-line description), the
:class:`Config` that holds them, and the built-in default document. Part of :mod:`mxgate.core.config`, which
re-exports these names."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from mxgate.connectors.inbound import InboundConnector
from mxgate.connectors.outbound import OutboundConnector
from mxgate.core import checks
from mxgate.core.settings import setting

__all__ = [
    "BUILTIN_SOURCE",
    "DEFAULT_DOCUMENT",
    "SECTIONS",
    "ClusterConfig",
    "Config",
    "DnsConfig",
    "ListenerConfig",
    "MetricsConfig",
    "PluginsConfig",
    "ResolverEndpointConfig",
    "ServerConfig",
    "SniCertificate",
]

T = TypeVar("T")

BUILTIN_SOURCE = "<built-in default>"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    hostname: str = setting(
        factory=socket.getfqdn,
        desc="Our host name: EHLO, banner, Received headers, DSNs.",
        check=checks.check_hostname,
        example="mx.example.org",
    )
    state_dir: str = setting("./var", desc="Queue, caches, TLS-RPT data and tracking log live here.")
    max_message_size: int = setting(
        52428800, desc="Largest message accepted, in bytes (advertised as SIZE).", check=checks.check_positive
    )
    max_recipients: int = setting(1000, desc="Most recipients per message.", check=checks.check_positive)
    accepted_domains: tuple[str, ...] = setting(
        (),
        desc="Domains we accept mail for from anyone on the internet.",
        check=checks.check_domain_patterns,
        example=["example.org"],
    )
    log_format: str = setting("logfmt", desc="Log line format.", choices=("logfmt", "json"))
    log_level: str = setting("info", desc="Least severe level logged.", choices=("debug", "info", "warning", "error"))
    tracking_log: bool = setting(True, desc="Write the message-tracking log (JSON lines) behind `mxgate trace`.")
    tracking_log_max_size: int = setting(
        104857600, desc="Rotate the tracking log when it reaches this many bytes.", check=checks.check_positive
    )
    tracking_log_files: int = setting(
        10,
        desc="Rotated tracking logs kept (tracking.jsonl.1 is the newest); older ones are deleted. 0: none kept.",
        check=checks.check_non_negative,
    )
    users_file: str | None = setting(
        None, desc="SMTP AUTH users (scrypt hashes; `mxgate user add`); default: <state_dir>/users."
    )
    descriptor_reserve: int = setting(
        100,
        desc="File descriptors SMTP clients may not take (the queue, deliveries, DNS and logs need them): past "
        "RLIMIT_NOFILE minus this many, a new connection gets 421 4.3.2. `mxgate run` raises RLIMIT_NOFILE's soft "
        "limit to the hard limit at start.",
        check=checks.check_non_negative,
    )
    receive_workers: int | str = setting(
        "auto",
        desc="Receive worker processes: they accept on the listeners the main process binds and run the receive "
        "stage; the main process queues, delivers, runs plugins' background services and serves metrics. "
        '"auto": one per spare core (usable cores - 1, by CPU affinity and cgroup quota; at most 8; 0 on one '
        "core); `mxgate config show` prints the choice. A number overrides it; 0: one process does everything. "
        "Gateways built in-process (not `mxgate run`) start none.",
        check=checks.check_receive_workers,
    )
    certificate_check_interval: float = setting(
        10.0,
        desc="Seconds between checks of the listeners' certificate and key files; changed files are loaded "
        "without a restart (the old pair keeps serving if the new one does not load).",
        check=checks.check_positive,
    )
    user: str | None = setting(
        None,
        desc="Started as root: bind the listeners, then run as this user (the state directory becomes its own). "
        "Unset under systemd socket activation (examples/systemd).",
        check=checks.check_user,
        example="mxgate",
    )
    group: str | None = setting(
        None, desc="Group to run as with server.user (default: that user's group).", check=checks.check_group
    )

    @property
    def receive_worker_count(self) -> int:
        """``receive_workers`` as a number: ``"auto"`` decided on this machine (:func:`checks.auto_receive_workers`)."""
        value = self.receive_workers
        return checks.auto_receive_workers() if value == "auto" else int(value)


@dataclass(frozen=True, slots=True)
class SniCertificate:
    name: str = setting(desc="Server name (exact, or '*.example.org').")
    cert: str = setting(desc="Certificate chain file (PEM).")
    key: str = setting(desc="Private key file (PEM).")


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str = setting(desc="Listener name, used in logs and metrics.", check=checks.check_name)
    address: str = setting(desc='Address to listen on: "127.0.0.1:2525", "[::]:25".', check=checks.check_hostport)
    tls_cert: str | None = setting(None, desc="Certificate chain (PEM); STARTTLS is offered when set.")
    tls_key: str | None = setting(None, desc="Private key (PEM) for tls_cert.")
    sni_certificates: tuple[SniCertificate, ...] = setting((), desc="Other certificates chosen by SNI name.")
    tls_client_ca: str | None = setting(
        None, desc="CA bundle for verifying client certificates (inbound connectors by certificate)."
    )
    require_tls: bool = setting(False, desc="Refuse MAIL until STARTTLS (530 5.7.0).")
    implicit_tls: bool = setting(False, desc="TLS from the first byte (port 465 style).")
    auth: bool = setting(True, desc="Offer AUTH on this listener (under TLS); false on a port-25 MX.")
    allow_plaintext_auth: bool = setting(False, desc="Offer AUTH without TLS (only for trusted networks).")
    max_message_size: int | None = setting(
        None, desc="Override server.max_message_size here.", check=checks.check_optional_positive
    )
    max_recipients: int | None = setting(
        None, desc="Override server.max_recipients here.", check=checks.check_optional_positive
    )
    idle_timeout: float = setting(300.0, desc="Seconds a client may stay silent.", check=checks.check_positive)
    command_timeout: float = setting(
        60.0,
        desc="Seconds a client may take to send one command line once it has begun (a client dribbling bytes "
        "is cut here, not at session_timeout); also the grace period of min_data_rate.",
        check=checks.check_positive,
    )
    reverse_dns_timeout: float = setting(
        2.0,
        desc="Seconds, counted from the connection, the client's reverse DNS (PTR, then forward-confirmed) may "
        "take: it never delays the banner, and is awaited at EHLO at most until then; past it the client is "
        "'unknown'. 0: no lookup.",
        check=checks.check_non_negative,
    )
    min_data_rate: int = setting(
        500,
        desc="Bytes per second a DATA transfer must average after its first command_timeout seconds (Postfix's "
        "smtpd_min_data_rate); slower: 421 4.4.2. 0: no minimum.",
        check=checks.check_non_negative,
    )
    max_connections_per_client: int = setting(
        20,
        desc="Concurrent connections from one IPv4 address or IPv6 /64 (counted per receive process); beyond: "
        "421 4.7.0. 0: no limit.",
        check=checks.check_non_negative,
    )
    max_connections_per_network: int = setting(
        100,
        desc="Concurrent connections from one IPv4 /24 (counted per receive process); beyond: 421 4.7.0. 0: no limit.",
        check=checks.check_non_negative,
    )
    connection_limit_exceptions: tuple[str, ...] = setting(
        ("127.0.0.0/8", "::1/128"),
        desc="Client networks the per-client connection limits do not apply to (Postfix's "
        "smtpd_client_event_limit_exceptions).",
        check=checks.check_networks,
    )
    session_timeout: float = setting(1800.0, desc="Longest session, in seconds.", check=checks.check_positive)
    max_errors: int = setting(
        10,
        desc="Errors before 421 and close: bad commands, and rejected MAIL/RCPT (relay denied, unknown or too many "
        "recipients; Postfix's smtpd_hard_error_limit). A delivered message resets the count.",
        check=checks.check_positive,
    )
    soft_error_limit: int = setting(
        5,
        desc="Errors after which each further error reply is delayed, by error_sleep more each time "
        "(Postfix's smtpd_soft_error_limit).",
        check=checks.check_positive,
    )
    error_sleep: float = setting(
        1.0,
        desc="Seconds added to the delay of each error reply past soft_error_limit (error_sleep_time); 0: none.",
        check=checks.check_non_negative,
    )
    recipient_overshoot_limit: int = setting(
        1000,
        desc="RCPTs past max_recipients answered 452 before each further one counts as an error "
        "(Postfix's smtpd_recipient_overshoot_limit).",
        check=checks.check_non_negative,
    )
    banner: str | None = setting(None, desc="Banner text after '220 <hostname>' (default: 'ESMTP mxgate').")

    @property
    def host(self) -> str:
        return checks.split_hostport(self.address)[0]

    @property
    def port(self) -> int:
        return checks.split_hostport(self.address)[1]


@dataclass(frozen=True, slots=True)
class ResolverEndpointConfig:
    address: str = setting(desc='Resolver "host:port" (port 53 when omitted).')
    trusted: bool = setting(False, desc="Trust its AD bit though it is not on loopback (a secured path).")


def _parse_resolver(value: Any) -> Any:
    if isinstance(value, str):
        return {"address": value}
    return value


@dataclass(frozen=True, slots=True)
class DnsConfig:
    resolvers: tuple[ResolverEndpointConfig, ...] = setting(
        (),
        desc='Validating resolvers: "host:port" or {address, trusted}; empty = /etc/resolv.conf. '
        "AD is trusted only from loopback or trusted = true.",
        parse=_parse_resolver,
        example=["127.0.0.1:53"],
    )
    dnssec: str = setting(
        "validating_resolver",
        desc="Where DNSSEC validation happens.",
        choices=("validating_resolver", "in_process"),
    )
    timeout: float = setting(5.0, desc="Seconds per DNS query.", check=checks.check_positive)
    cache_size: int = setting(10000, desc="Most cached answers.", check=checks.check_positive)
    self_test_secure: str = setting("ietf.org", desc="A name that must validate as secure (start-up self-test).")
    self_test_bogus: str = setting("dnssec-failed.org", desc="A name that must fail validation (start-up self-test).")


@dataclass(frozen=True, slots=True)
class PluginsConfig:
    load: tuple[str, ...] = setting((), desc='Extra plugins: "package.module:object" or "path/to/file.py".')
    disable: tuple[str, ...] = setting((), desc="Plugins turned off by name (built-ins included, but not core).")
    priority: Mapping[str, int] = setting(
        factory=lambda: MappingProxyType({}),
        desc="Call order by plugin name: 1 runs first (Exchange's agent priority).",
    )
    hook_trace: bool = setting(False, desc="Log every hook call with its duration (debugging).")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str | None = setting(
        "127.0.0.1:9925",
        desc='Prometheus endpoint "host:port"; unset turns it off.',
        check=checks.check_optional_hostport,
    )


def _check_database_url(value: Any) -> str | None:
    if not value:
        return None
    if not str(value).startswith(("postgresql://", "postgres://")):
        return 'expected a PostgreSQL URL "postgresql://user@host:port/dbname" (or "" for no cluster)'
    return None


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    database: str = setting(
        "",
        desc='Cluster mode: PostgreSQL URL ("postgresql://mxgate@db.example.org/mxgate") shared by every node for '
        "TLS-RPT, the MTA-STS cache, AUTH failure limits, tracking and queue summaries (docs/cluster.md); empty: "
        "this node alone, state in SQLite under state_dir. Keep the password out of this file: libpq reads "
        "~/.pgpass and PGPASSFILE.",
        check=_check_database_url,
        example="postgresql://mxgate@db.example.org/mxgate",
    )
    node: str = setting(
        factory=socket.gethostname,
        desc="This node's name in the cluster (heartbeats, `mxgate cluster status`); unique per node.",
        check=checks.check_name,
        example="mx1",
    )
    heartbeat_interval: float = setting(
        10.0, desc="Seconds between this node's heartbeats in the cluster database.", check=checks.check_positive
    )
    connect_timeout: float = setting(
        5.0, desc="Seconds to wait for the cluster database before working without it.", check=checks.check_positive
    )
    tracking_retention_days: int = setting(
        30,
        desc="Days the shared tracking records (`mxgate trace` across nodes) are kept in the cluster database.",
        check=checks.check_positive,
    )
    auth_sync_interval: float = setting(
        1.0,
        desc="Seconds between exchanges of AUTH failures with the other nodes (a brute-forcer spread over the nodes "
        "gets the limit plus what they let through in one interval).",
        check=checks.check_positive,
    )


@dataclass(frozen=True, slots=True)
class Config:
    """The effective configuration: what a file said, completed with defaults."""

    server: ServerConfig
    listener: tuple[ListenerConfig, ...]
    inbound_connector: tuple[InboundConnector, ...]
    outbound_connector: tuple[OutboundConnector, ...]
    dns: DnsConfig
    plugins: PluginsConfig
    metrics: MetricsConfig
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    source: str = BUILTIN_SOURCE
    base_dir: str = "."
    plugin_sections: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), compare=False)

    def plugin_section(self, name: str, cls: type[T]) -> T:
        """A plugin's ``[plugins.<name>]`` section, parsed into the dataclass it registered."""
        value = self.plugin_sections.get(name)
        if value is None:
            return cls()
        if not isinstance(value, cls):
            raise TypeError(f"plugins.{name} is a {type(value).__name__}, not {cls.__name__}")
        return value

    def path(self, value: str) -> Path:
        """A file named in this config, relative to the config file's directory."""
        p = Path(value)
        return p if p.is_absolute() else Path(self.base_dir) / p

    @property
    def state_path(self) -> Path:
        return self.path(self.server.state_dir)

    def outbound(self, name: str) -> OutboundConnector | None:
        return next((c for c in self.outbound_connector if c.name == name), None)


SECTIONS: dict[str, Any] = {
    "server": ServerConfig,
    "listener": tuple[ListenerConfig, ...],
    "inbound_connector": tuple[InboundConnector, ...],
    "outbound_connector": tuple[OutboundConnector, ...],
    "dns": DnsConfig,
    "plugins": PluginsConfig,
    "metrics": MetricsConfig,
    "cluster": ClusterConfig,
}

# The embedded default: what `make run` and `mxgate run` without a file use. It must itself be valid.
DEFAULT_DOCUMENT: dict[str, Any] = {
    "server": {"state_dir": "./var"},
    "listener": [{"name": "smtp", "address": "127.0.0.1:2525"}],
    "inbound_connector": [
        {"name": "localhost", "sender_ips": ["127.0.0.0/8", "::1/128"], "may_relay": True},
    ],
    "outbound_connector": [
        {"name": "internet", "recipient_domains": ["*"], "use_mx": True, "tls": "opportunistic"},
    ],
    "metrics": {"listen": "127.0.0.1:9925"},
}
