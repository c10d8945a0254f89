"""The plugin API is one module: built-in plugins and the example plugins import ``mxgate`` and nothing deeper.

DESIGN.md: "Built-ins get no private door". A third party can write any built-in with what ``mxgate`` exports; this
test keeps it so. It reads import statements (inside functions and under ``TYPE_CHECKING`` too: a type reached from
an internal module is reaching in all the same).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import mxgate

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "mxgate" / "plugins"


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for every absolute ``mxgate`` import in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def _own_package(path: Path) -> str:
    """``mxgate.plugins.<name>`` for a module of a built-in plugin (a package or a single file)."""
    name = path.relative_to(PLUGINS).parts[0].removesuffix(".py")
    return f"mxgate.plugins.{name}"


def _plugin_modules() -> list[Path]:
    return sorted(p for p in PLUGINS.rglob("*.py") if p.name != "__init__.py" or p.parent != PLUGINS)


@pytest.mark.parametrize("path", _plugin_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_builtin_plugin_imports_only_the_public_api(path: Path) -> None:
    own = _own_package(path)
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for line, module in _imports(path)
        if module.startswith("mxgate.") and not (module == own or module.startswith(f"{own}."))
    ]
    assert not offenders, "a built-in plugin reaches past the public API (import from `mxgate`):\n" + "\n".join(
        offenders
    )


def _example_modules() -> list[Path]:
    return sorted(p for p in (ROOT / "examples").rglob("*.py") if ".venv" not in p.parts)


@pytest.mark.parametrize("path", _example_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_example_plugins_import_only_the_public_api(path: Path) -> None:
    in_tests = "tests" in path.parts  # an example's tests may also use the fixtures plugin authors get
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for line, module in _imports(path)
        if module.startswith("mxgate.") and not (in_tests and module.startswith("mxgate.testing"))
    ]
    assert not offenders, "an example reaches past the public API:\n" + "\n".join(offenders)


def test_every_exported_name_resolves() -> None:
    missing = [name for name in mxgate.__all__ if not hasattr(mxgate, name)]
    assert not missing


def test_importing_the_api_loads_no_plugin_and_no_test_fixture() -> None:
    probe = (
        "import sys, mxgate; "
        "print(sorted(m for m in sys.modules if m.startswith(('mxgate.plugins', 'mxgate.testing', 'mxgate.demo'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
