"""The MTA-STS built-in is written against the public API: every module of ``mxgate/plugins/mta_sts/`` imports
from mxgate only the root ``mxgate`` or its own package (``mxgate.plugins.mta_sts...``), as a third-party plugin
would. Imports inside functions and under ``TYPE_CHECKING`` count too."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mxgate" / "plugins" / "mta_sts"
OWN = "mxgate.plugins.mta_sts"


def _mxgate_imports(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for every import of an ``mxgate`` module in ``path``; relative imports resolved."""
    package = OWN if path.name == "__init__.py" else f"{OWN}.{path.stem}"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mxgate":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: counted from this module's package
                base = (package if path.name == "__init__.py" else package.rpartition(".")[0]).split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module.split(".")[0] == "mxgate":
                yield node.lineno, module


def _allowed(module: str) -> bool:
    return module in ("mxgate", OWN) or module.startswith(f"{OWN}.")


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_package_has_its_modules() -> None:
    names = {p.name for p in _modules()}
    assert {"__init__.py", "policy.py", "cache.py", "fetch.py", "engine.py", "serve.py", "plugin.py"} <= names
    assert "commands.py" in names


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_module_imports_only_the_public_api_or_its_own_package(path: Path) -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {module}" for line, module in _mxgate_imports(path) if not _allowed(module)
    ]
    assert offenders == [], "import these names from `mxgate` (export them there if needed):\n" + "\n".join(offenders)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_no_module_is_too_long(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 600, f"{path.relative_to(ROOT)}: split it by concern"


def test_the_checker_finds_an_offender(tmp_path: Path) -> None:
    """The check itself: a core import, nested in a function or under TYPE_CHECKING, is found with its line."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from typing import TYPE_CHECKING\n"
        "from mxgate import Runtime\n"
        "from mxgate.plugins.mta_sts.policy import StsPolicy\n"
        "if TYPE_CHECKING:\n"
        "    from mxgate.core.dns import Resolver\n"
        "def f():\n"
        "    import mxgate.core.tls\n"
        "    from mxgate.plugins.dane import DanePlugin\n"
    )
    found = [(line, module) for line, module in _mxgate_imports(bad) if not _allowed(module)]
    assert found == [(5, "mxgate.core.dns"), (7, "mxgate.core.tls"), (8, "mxgate.plugins.dane")]


def test_the_entry_point_still_resolves() -> None:
    from importlib import import_module

    from mxgate.core.plugins import BUILTIN_PLUGINS

    module, _, attr = BUILTIN_PLUGINS["mta_sts"].partition(":")
    assert getattr(import_module(module), attr).name == "mta_sts"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'mta_sts = "mxgate.plugins.mta_sts:MtaStsPlugin"' in pyproject


def test_runtime_says_what_a_process_does() -> None:
    """The plugin asks ``runtime.delivers`` / ``runtime.runs_services`` rather than comparing role constants."""
    from types import SimpleNamespace

    from mxgate import Runtime

    expected = {"main": (True, True), "command": (True, False), "receiver": (False, False)}
    for role, (delivers, services) in expected.items():
        probe = SimpleNamespace(role=role)
        assert Runtime.delivers.fget(probe) is delivers, role  # type: ignore[attr-defined]
        assert Runtime.runs_services.fget(probe) is services, role  # type: ignore[attr-defined]
