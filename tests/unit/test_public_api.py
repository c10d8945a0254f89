"""The plugin API is one module: built-in plugins and the example plugins import ``mxgate`` and nothing deeper.

DESIGN.md: "Built-ins get no private door". A third party can write any built-in with what ``mxgate`` exports; this
test keeps it so. It reads every import statement of the source — inside functions, under ``TYPE_CHECKING`` (a type
reached from an internal module is reaching in all the same) and relative ones — and names offenders as
``file:line``.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

import mxgate
from mxgate.core.plugins import BUILTIN_PLUGINS

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "mxgate" / "plugins"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, source: str | None = None, module: str | None = None) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for every import in ``path``; relative imports resolved against ``module``."""
    module = module or _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source if source is not None else path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                yield node.lineno, f"{base}.{node.module}" if node.module else base
            elif node.module:
                yield node.lineno, node.module


def _plugin_offenders(path: Path, source: str | None = None, module: str | None = None) -> list[str]:
    module = module or _module_name(path)
    own = ".".join(module.split(".")[:3])  # mxgate.plugins.<name>: the plugin's package (or its single file)
    return [
        f"{path.relative_to(ROOT)}:{line}: {imported}"
        for line, imported in _imports(path, source, module)
        if imported.startswith("mxgate.") and not (imported == own or imported.startswith(f"{own}."))
    ]


def _plugin_modules() -> list[Path]:
    return sorted(p for p in PLUGINS.rglob("*.py") if p != PLUGINS / "__init__.py")


@pytest.mark.parametrize("path", _plugin_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_builtin_plugin_imports_only_the_public_api(path: Path) -> None:
    offenders = _plugin_offenders(path)
    assert not offenders, "import these names from `mxgate` (export them there if a plugin needs them):\n" + (
        "\n".join(offenders)
    )


def test_the_check_finds_every_kind_of_reaching_in() -> None:
    """Nested in a function, under TYPE_CHECKING, relative into another plugin: all found, with their lines."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from mxgate import Runtime\n"
        "from mxgate.plugins.dane.records import Tlsa\n"
        "from . import verify\n"
        "if TYPE_CHECKING:\n"
        "    from mxgate.core.dns import Resolver\n"
        "def f():\n"
        "    import mxgate.core.tls\n"
        "    from ..dnssec import SELF_TEST\n"
        "    from mxgate.plugins.mta_sts import MtaStsPlugin\n"
    )
    path = PLUGINS / "dane" / "probe.py"
    assert _plugin_offenders(path, source, "mxgate.plugins.dane.probe") == [
        "mxgate/plugins/dane/probe.py:6: mxgate.core.dns",
        "mxgate/plugins/dane/probe.py:8: mxgate.core.tls",
        "mxgate/plugins/dane/probe.py:9: mxgate.plugins.dnssec",
        "mxgate/plugins/dane/probe.py:10: mxgate.plugins.mta_sts",
    ]


def _example_modules() -> list[Path]:
    return sorted(p for p in (ROOT / "examples").rglob("*.py") if ".venv" not in p.parts)


@pytest.mark.parametrize("path", _example_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_example_plugins_import_only_the_public_api(path: Path) -> None:
    in_tests = "tests" in path.parts  # an example's tests may also use the fixtures plugin authors get
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for line, module in _imports(path, module=path.stem)
        if module.startswith("mxgate.") and not (in_tests and module.startswith("mxgate.testing"))
    ]
    assert not offenders, "an example reaches past the public API:\n" + "\n".join(offenders)


def test_builtin_plugins_are_found_by_the_same_entry_points_a_third_party_uses() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["mxgate"]
    assert declared == BUILTIN_PLUGINS
    for name, spec in BUILTIN_PLUGINS.items():
        module, _, attr = spec.partition(":")
        loaded = importlib.import_module(module)
        assert getattr(loaded, attr).name == name if attr else loaded.__name__ == module


def test_every_exported_name_resolves() -> None:
    assert [name for name in mxgate.__all__ if not hasattr(mxgate, name)] == []
    assert len(set(mxgate.__all__)) == len(mxgate.__all__)


def test_importing_the_api_loads_no_plugin_and_no_test_fixture() -> None:
    probe = (
        "import sys, mxgate; "
        "print(sorted(m for m in sys.modules if m.startswith(('mxgate.plugins', 'mxgate.testing', 'mxgate.demo'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
