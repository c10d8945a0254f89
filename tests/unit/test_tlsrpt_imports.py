"""The TLS-RPT agent is a plugin like a third party's: every module of ``mxgate/plugins/tlsrpt/`` imports, of
mxgate, only the public API (the root ``mxgate``) and its own package — no ``mxgate.core.*``, no other plugin."""

from __future__ import annotations

import ast
from pathlib import Path

import mxgate.plugins.tlsrpt

PACKAGE = "mxgate.plugins.tlsrpt"
ROOT = Path(mxgate.plugins.tlsrpt.__file__).resolve().parent


def offenders(source: str, where: str) -> list[str]:
    """``file:line name`` of every import of an mxgate module other than ``mxgate`` or this package, wherever it
    is (module level, in a function, under ``TYPE_CHECKING``). Relative imports stay in the package."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] != "mxgate" or name == "mxgate":
                continue
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                continue
            found.append(f"{where}:{node.lineno} {name}")
    return sorted(found, key=lambda o: int(o.split(":")[1].split()[0]))


def test_every_module_imports_only_the_public_api_and_its_own_package() -> None:
    modules = sorted(ROOT.glob("*.py"))
    assert {p.name for p in modules} >= {"__init__.py", "plugin.py", "collect.py", "report.py", "send.py"}
    bad = [o for p in modules for o in offenders(p.read_text(encoding="utf-8"), f"{p.name}")]
    assert not bad, "imports of mxgate internals or other plugins:\n" + "\n".join(bad)


def test_the_check_names_file_and_line_of_an_offender() -> None:
    source = "import json\nfrom mxgate import Runtime\nif True:\n    from mxgate.core.tls import server_context\n"
    source += "import mxgate.plugins.dane\nfrom mxgate.plugins.tlsrpt.report import utc_day\n"
    assert offenders(source, "x.py") == ["x.py:4 mxgate.core.tls", "x.py:5 mxgate.plugins.dane"]


def test_no_module_is_above_600_lines() -> None:
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in ROOT.glob("*.py")}
    assert all(n <= 600 for n in sizes.values()), sizes
