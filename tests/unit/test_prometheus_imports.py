"""The prometheus plugin needs only what a third party has: every module of its package imports from mxgate only
the public API (``mxgate``) or its own package (anything else is named as file:line)."""

from __future__ import annotations

import ast
from pathlib import Path

import mxgate.plugins.prometheus as package

PACKAGE = "mxgate.plugins.prometheus"
ROOT = Path(package.__file__).parent


def _imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in ``path``, relative ones resolved; function-level and TYPE_CHECKING too."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = PACKAGE.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            out.append((node.lineno, module))
    return out


def test_package_imports_only_the_public_api() -> None:
    modules = sorted(ROOT.glob("*.py"))
    assert {p.name for p in modules} >= {"__init__.py", "plugin.py", "endpoint.py", "metrics.py"}
    bad = [
        f"{path.relative_to(ROOT.parents[2])}:{line}: {module}"
        for path in modules
        for line, module in _imported(path)
        if (module == "mxgate" or module.startswith("mxgate."))
        and module != "mxgate"
        and module != PACKAGE
        and not module.startswith(PACKAGE + ".")
    ]
    assert bad == []


def test_the_check_sees_a_private_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from mxgate import hookimpl\nfrom . import metrics\nimport mxgate.core.runtime\n")
    assert _imported(probe) == [(1, "mxgate"), (2, PACKAGE), (3, "mxgate.core.runtime")]


def test_documented_names_stay() -> None:
    assert callable(package.add_event_counter)
    assert package.PrometheusPlugin.__module__ == f"{PACKAGE}.plugin"
    assert set(package.__all__) >= {"EVENT_METRICS", "EventMetric", "PrometheusPlugin", "metric_names", "sample_names"}
