"""TOML configuration -> frozen dataclasses, with precise errors.

Every error names the file, the key path (``outbound_connector[2].tls``), the bad value and what is allowed;
unknown keys are errors with a "did you mean"; every problem of a file is reported at once.
Sections are declared with :func:`mxgate.core.settings.setting`, so defaults, validation, ``config init`` and the
docs all come from one place. Plugins add sections and connector keys through :class:`ConfigRegistry`.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import ipaddress
import socket
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from mxgate.connectors.inbound import InboundConnector, shadowed
from mxgate.connectors.outbound import OutboundConnector
from mxgate.core import checks
from mxgate.core.errors import ConfigError, ConfigProblem
from mxgate.core.settings import ConfigRegistry, ConnectorSetting, setting

T = TypeVar("T")

BUILTIN_SOURCE = "<built-in default>"


# --- sections ---------------------------------------------------------------------------------------------------


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


# --- the loader ------------------------------------------------------------------------------------------------


class _Builder:
    """Turns one TOML document into dataclasses, collecting every problem instead of stopping at the first."""

    def __init__(self, file: str, registry: ConfigRegistry) -> None:
        self.file = file
        self.registry = registry
        self.problems: list[ConfigProblem] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(ConfigProblem(self.file, path, message))

    def unknown_keys(self, table: Mapping[str, Any], known: list[str], path: str) -> None:
        for key in table:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                where = f"{path}.{key}" if path else key
                msg = f"unknown key {key!r}"
                msg += f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(sorted(known))}"
                self.problem(where, msg)

    def build(self, cls: type[T], table: Any, path: str, *, extra_kind: str | None = None) -> T | None:
        if not isinstance(table, dict):
            self.problem(path, f"expected a table, got {_describe(table)}")
            return None
        hints = typing.get_type_hints(cls)
        fields = [f for f in dataclasses.fields(cls) if f.name != "extra"]  # type: ignore[arg-type]
        extras = self.registry.settings_for(extra_kind) if extra_kind else []
        self.unknown_keys(table, [f.name for f in fields] + [s.name for s in extras], path)
        values: dict[str, Any] = {}
        ok = True
        for f in fields:
            where = f"{path}.{f.name}" if path else f.name
            if f.name not in table:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    self.problem(where, f"missing; {f.metadata.get('desc', 'required')}")
                    ok = False
                continue
            converted, good = self.value(hints[f.name], table[f.name], where, f.metadata)
            if good:
                values[f.name] = converted
            else:
                ok = False
        if extras:
            extra_values = {}
            for spec in extras:
                if spec.name in table:
                    converted, good = self.value(
                        spec.type, table[spec.name], f"{path}.{spec.name}", {"choices": spec.choices}
                    )
                    if good:
                        extra_values[spec.name] = converted
                    else:
                        ok = False
            values["extra"] = MappingProxyType(extra_values)
        if not ok:
            return None
        return cls(**values)

    def value(self, hint: Any, raw: Any, path: str, meta: Mapping[str, Any]) -> tuple[Any, bool]:
        parse = meta.get("parse")
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (types.UnionType, typing.Union) and type(None) in args:
            inner = next(a for a in args if a is not type(None))
            return self.value(inner, raw, path, meta)
        if origin is tuple:
            if not isinstance(raw, list):
                self.problem(path, f"expected a list, got {_describe(raw)}")
                return None, False
            items = []
            good = True
            for i, item in enumerate(raw):
                if parse is not None:
                    item = parse(item)
                converted, ok = self.value(args[0], item, f"{path}[{i}]", {**meta, "check": None, "parse": None})
                good = good and ok
                items.append(converted)
            if good:
                return self.checked(tuple(items), path, meta)
            return None, False
        if origin in (Mapping, dict) or hint is Mapping:
            if not isinstance(raw, dict):
                self.problem(path, f"expected a table, got {_describe(raw)}")
                return None, False
            converted_map = {}
            good = True
            for key, item in raw.items():
                converted, ok = self.value(args[1] if args else Any, item, f"{path}.{key}", {})
                good = good and ok
                converted_map[key] = converted
            return (MappingProxyType(converted_map), True) if good else (None, False)
        if dataclasses.is_dataclass(hint):
            built = self.build(hint, raw, path)  # type: ignore[arg-type]
            return built, built is not None
        return self.checked(self.scalar(hint, raw, path, meta), path, meta)

    def scalar(self, hint: Any, raw: Any, path: str, meta: Mapping[str, Any]) -> Any:
        if hint is Any:
            return raw
        expected = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            hint_choices = tuple(str(m.value) for m in hint)
            if raw not in hint_choices:
                self.problem(path, f"{raw!r} is not allowed; expected one of: {', '.join(hint_choices)}")
                return _BAD
            return hint(raw)
        if hint is float and isinstance(raw, int) and not isinstance(raw, bool):
            raw = float(raw)
        if hint in expected and (not isinstance(raw, hint) or (hint is int and isinstance(raw, bool))):
            self.problem(path, f"expected {meta.get('expects') or expected[hint]}, got {_describe(raw)}")
            return _BAD
        return raw

    def checked(self, value: Any, path: str, meta: Mapping[str, Any]) -> tuple[Any, bool]:
        if value is _BAD:
            return None, False
        choices = meta.get("choices")
        if choices and value not in choices:
            hint = difflib.get_close_matches(str(value), choices, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            self.problem(path, f"{value!r} is not allowed; expected one of: {', '.join(choices)}{extra}")
            return None, False
        check = meta.get("check")
        if check is not None and value is not None:
            message = check(value)
            if message:
                # list checks name the offending items themselves
                self.problem(path, message if isinstance(value, tuple) else f"{_short(value)}: {message}")
                return None, False
        return value, True


_BAD = object()


def _describe(value: Any) -> str:
    kind = {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)
    return f"{kind} ({_short(value)})"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_text(path: Path) -> str:
    """A configuration file's text; a missing or unreadable file becomes a ConfigError naming it."""
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError.single(str(path), "", "file not found") from None
    except PermissionError:
        raise ConfigError.single(str(path), "", "file not readable (permission denied)") from None
    except IsADirectoryError:
        raise ConfigError.single(str(path), "", "is a directory, expected a TOML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError.single(str(path), "", f"not UTF-8 text: {exc}") from None


def parse_toml(text: str, file: str) -> dict[str, Any]:
    """Parse TOML text; syntax errors become a ConfigError naming the file and line."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError.single(file, "", f"TOML syntax error: {exc}") from None
    except RecursionError:
        raise ConfigError.single(file, "", "TOML nested too deeply to read") from None


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; syntax errors become a ConfigError naming the file and line."""
    return parse_toml(read_text(path), str(path))


def plugins_section(document: Mapping[str, Any], file: str) -> PluginsConfig:
    """Just ``[plugins]`` (load/disable/priority), needed to know which plugins extend the schema."""
    raw = document.get("plugins", {})
    if not isinstance(raw, dict):
        raise ConfigError.single(file, "plugins", f"expected a table, got {_describe(raw)}")
    builder = _Builder(file, ConfigRegistry())
    own = {k: v for k, v in raw.items() if k in {f.name for f in dataclasses.fields(PluginsConfig)}}
    result = builder.build(PluginsConfig, own, "plugins")
    if result is None:
        raise ConfigError(builder.problems)
    return result


def build_config(
    document: Mapping[str, Any],
    *,
    file: str = BUILTIN_SOURCE,
    registry: ConfigRegistry | None = None,
    base_dir: str | None = None,
    check_files: bool = True,
) -> Config:
    """Validate a parsed TOML document against the schema (plus what plugins registered) and cross-check it."""
    registry = registry or ConfigRegistry()
    b = _Builder(file, registry)
    b.unknown_keys(document, list(SECTIONS), "")
    built: dict[str, Any] = {}
    for name, hint in SECTIONS.items():
        raw = document.get(name)
        if name == "plugins" and isinstance(raw, dict):
            raw = _split_plugin_sections(b, raw, registry, built)
        if typing.get_origin(hint) is tuple:
            item_cls = typing.get_args(hint)[0]
            if raw is None:
                built[name] = ()
                continue
            if not isinstance(raw, list):
                b.problem(name, f"expected an array of tables [[{name}]], got {_describe(raw)}")
                continue
            items = [
                b.build(item_cls, item, f"{name}[{i}]", extra_kind=name if "connector" in name else None)
                for i, item in enumerate(raw)
            ]
            built[name] = tuple(i for i in items if i is not None)
        else:
            item = b.build(hint, raw if raw is not None else {}, name)
            if item is not None:
                built[name] = item
    sections = built.pop("_plugin_sections", {})
    for name, cls in registry.sections.items():
        sections.setdefault(name, cls())  # every declared plugin section exists, at its defaults if unset
    for name, hint in SECTIONS.items():
        if name not in built:  # a section with errors: cross-check the rest against its defaults
            built[name] = () if typing.get_origin(hint) is tuple else hint()
    config = Config(**built, source=file, base_dir=base_dir or ".", plugin_sections=MappingProxyType(sections))
    _cross_check(b, config, check_files=check_files)
    _validate_plugin_sections(b, config, registry)
    if b.problems:
        raise ConfigError(b.problems)
    return config


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


def _split_plugin_sections(
    b: _Builder, raw: dict[str, Any], registry: ConfigRegistry, built: dict[str, Any]
) -> dict[str, Any]:
    own_keys = {f.name for f in dataclasses.fields(PluginsConfig)}
    own: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key in own_keys:
            own[key] = value
        elif key in registry.sections:
            section = b.build(registry.sections[key], value, f"plugins.{key}")
            if section is not None:
                sections[key] = section
        elif isinstance(value, dict):
            hint = difflib.get_close_matches(key, list(registry.sections), n=1)
            msg = f"no loaded plugin declares a [plugins.{key}] section"
            msg += (
                f"; did you mean [plugins.{hint[0]}]?"
                if hint
                else (f"; plugin sections: {', '.join(sorted(registry.sections)) or 'none'}")
            )
            b.problem(f"plugins.{key}", msg)
        else:
            b.unknown_keys({key: value}, sorted(own_keys), "plugins")
    built["_plugin_sections"] = sections
    return own


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


def load_config(path: str | Path | None, registry: ConfigRegistry | None = None, *, check_files: bool = True) -> Config:
    """Read and validate a file, or the built-in default when ``path`` is None."""
    if path is None:
        return build_config(DEFAULT_DOCUMENT, registry=registry, base_dir=".", check_files=check_files)
    p = Path(path)
    document = read_toml(p)
    return build_config(document, file=str(p), registry=registry, base_dir=str(p.parent), check_files=check_files)


# --- helpers for `config show` / `config init` --------------------------------------------------------------------


def to_document(config: Config) -> dict[str, Any]:
    """The effective configuration as a TOML-ready dict (None values left out: TOML has no null)."""
    out: dict[str, Any] = {}
    for name in SECTIONS:
        value = getattr(config, name)
        if isinstance(value, tuple):
            out[name] = [_plain(v) for v in value]
        else:
            out[name] = _plain(value)
    for name, section in config.plugin_sections.items():
        out["plugins"][name] = _plain(section)
    return out


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        result: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.name == "extra":
                result.update({k: _plain(x) for k, x in v.items()})
                continue
            if v is None:
                continue
            result[f.name] = _plain(v)
        return result
    if isinstance(obj, tuple | list):
        return [_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


__all__ = [
    "BUILTIN_SOURCE",
    "Config",
    "ConfigRegistry",
    "ConnectorSetting",
    "DnsConfig",
    "ListenerConfig",
    "MetricsConfig",
    "PluginsConfig",
    "ServerConfig",
    "build_config",
    "load_config",
    "to_document",
]
