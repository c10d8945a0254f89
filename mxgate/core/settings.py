"""Declaring configuration once: type, default and description side by side (tox's ``add_config``).

A configuration section is a frozen dataclass whose fields are made with :func:`setting`. The loader, the
``config init`` writer and the docs test all read the same declarations. Plugins declare their own sections and
their own connector settings through :class:`ConfigRegistry` (hook ``mxgate_lifecycle_register_config``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from mxgate.core.config import Config

T = TypeVar("T")

Check = Callable[[Any], "str | None"]  # returns an error message, or None when the value is fine
# A section-level check (``add_section(..., validate=...)``): the section and the whole configuration in, one
# problem per item out: ``"message"`` (about the section) or ``("key", "message")``.
SectionCheck = Callable[[Any, "Config"], "Iterable[str | tuple[str, str]] | None"]


def setting(
    default: Any = dataclasses.MISSING,
    *,
    desc: str,
    factory: Callable[[], Any] | None = None,
    choices: Sequence[str] | None = None,
    check: Check | None = None,
    example: Any = None,
    parse: Callable[[Any], Any] | None = None,
    expects: str | None = None,
) -> Any:
    """A configuration field: ``default`` (MISSING = required) or ``factory``, one-line ``desc``, optional
    ``choices``/``check``.

    ``parse`` converts a raw TOML value before type conversion (it raises ``ValueError`` with the expectation);
    ``expects`` describes the accepted shape for error messages when the type alone does not say it.
    """
    meta = {
        "desc": desc,
        "choices": tuple(choices) if choices else None,
        "check": check,
        "example": example,
        "parse": parse,
        "expects": expects,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class ConnectorSetting(Generic[T]):
    """A key a plugin adds to ``[[outbound_connector]]`` or ``[[inbound_connector]]`` (e.g. ``dane``).

    Read it back with ``connector.get(SETTING)``; the value is validated by the core like any built-in key.
    """

    kind: str  # "inbound_connector" | "outbound_connector"
    name: str
    type: type[T]
    default: T
    desc: str
    choices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("inbound_connector", "outbound_connector"):
            raise ValueError(f"connector setting kind must be inbound_connector or outbound_connector, not {self.kind}")


class ConfigRegistry:
    """What plugins contribute to the configuration schema, collected before a file is read."""

    def __init__(self) -> None:
        self.sections: dict[str, type[Any]] = {}
        self.connector_settings: dict[tuple[str, str], ConnectorSetting[Any]] = {}
        self.owners: dict[str, str] = {}  # section or setting name -> plugin name, for messages
        self.validators: dict[str, SectionCheck] = {}  # section name -> its section-level check

    def add_section(self, name: str, cls: type[Any], *, owner: str = "?", validate: SectionCheck | None = None) -> None:
        """Declare ``[plugins.<name>]`` as the frozen dataclass ``cls`` (fields made with :func:`setting`).

        ``validate(section, config)``, when given, checks what one key cannot check alone — a value that names
        another section (an outbound connector, a listener) or two keys together. It runs after the whole file
        was read and cross-checked (by ``mxgate config check`` and at start-up alike), on the section's values
        or its defaults; each item it returns is one problem: ``"message"`` for the section, ``("key",
        "message")`` for one key. If it raises, that is one problem too."""
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"plugin section {name!r} must be a dataclass, got {cls!r}")
        if name in self.sections and self.sections[name] is not cls:
            raise ValueError(f"plugin section {name!r} declared twice ({self.owners[name]} and {owner})")
        self.sections[name] = cls
        self.owners[name] = owner
        if validate is not None:
            self.validators[name] = validate

    def add_connector_setting(self, spec: ConnectorSetting[Any], *, owner: str = "?") -> None:
        key = (spec.kind, spec.name)
        if key in self.connector_settings and self.connector_settings[key] != spec:
            raise ValueError(f"{spec.kind}.{spec.name} declared twice ({self.owners[spec.name]} and {owner})")
        self.connector_settings[key] = spec
        self.owners[spec.name] = owner

    def settings_for(self, kind: str) -> list[ConnectorSetting[Any]]:
        return [s for (k, _), s in self.connector_settings.items() if k == kind]
