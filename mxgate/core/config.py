"""TOML configuration -> frozen dataclasses, with precise errors.

Every error names the file, the key path (``outbound_connector[2].tls``), the bad value and what is allowed;
unknown keys are errors with a "did you mean"; every problem of a file is reported at once.
Sections are declared with :func:`mxgate.core.settings.setting`, so defaults, validation, ``config init`` and the
docs all come from one place. Plugins add sections and connector keys through :class:`ConfigRegistry`.

The code is split by concern; this module builds and loads a configuration and re-exports the rest:
:mod:`mxgate.core.config_schema` (the section dataclasses, :class:`Config`), :mod:`mxgate.core.config_builder`
(TOML tables -> dataclasses, problems collected), :mod:`mxgate.core.config_checks` (cross-checks, advisories).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mxgate.core.config_builder import _Builder, _describe
from mxgate.core.config_checks import _cross_check, _validate_plugin_sections
from mxgate.core.config_checks import advisories as advisories
from mxgate.core.config_schema import (
    BUILTIN_SOURCE,
    Config,
    DnsConfig,
    ListenerConfig,
    MetricsConfig,
    PluginsConfig,
    ServerConfig,
)
from mxgate.core.config_schema import (
    DEFAULT_DOCUMENT as DEFAULT_DOCUMENT,
)
from mxgate.core.config_schema import (
    SECTIONS as SECTIONS,
)
from mxgate.core.config_schema import (
    ClusterConfig as ClusterConfig,
)
from mxgate.core.config_schema import (
    ResolverEndpointConfig as ResolverEndpointConfig,
)
from mxgate.core.config_schema import (
    SniCertificate as SniCertificate,
)
from mxgate.core.errors import ConfigError
from mxgate.core.settings import ConfigRegistry, ConnectorSetting


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
