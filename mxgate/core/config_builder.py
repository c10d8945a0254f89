"""TOML tables -> dataclasses: type conversion, choices and checks per key, unknown keys with a "did you mean",
every problem of a document collected (not stopping at the first). Knows no section: the schema is in
:mod:`mxgate.core.config_schema`, the orchestration in :mod:`mxgate.core.config`."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from mxgate.core.errors import ConfigProblem
from mxgate.core.settings import ConfigRegistry

T = TypeVar("T")


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
        if hint is str and "\x00" in raw:
            # no user, path, host or name holds one, and the C library calls behind the checks refuse it
            self.problem(path, "expected a string without NUL characters (\\u0000)")
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
