"""Built-ins get no private door (DESIGN.md): the DANE and DNSSEC agents import from ``mxgate`` only the public
API (the root package) and their own package, as a third party's plugin would."""

from __future__ import annotations

import ast
from pathlib import Path

import mxgate

ROOT = Path(mxgate.__file__).parent
PUBLIC_API_ONLY = {
    "mxgate/plugins/dnssec.py": "mxgate.plugins.dnssec",
    **{
        str(p.relative_to(ROOT.parent)): "mxgate.plugins.dane" for p in sorted((ROOT / "plugins" / "dane").glob("*.py"))
    },
}


def _imported(tree: ast.Module, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, in functions and under TYPE_CHECKING too."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return sorted(found)


def offenders(source: str, rel: str, own: str) -> list[str]:
    """``file:line: imports NAME`` for every ``mxgate`` import of ``source`` (the file ``rel``, relative to the
    directory holding ``mxgate/``) that is neither the root ``mxgate`` nor inside ``own``."""
    parts = list(Path(rel).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    module = ".".join(parts[:-1] if is_package else parts)
    bad = []
    for line, name in _imported(ast.parse(source, rel), module, is_package):
        if name.split(".")[0] != "mxgate" or name == "mxgate":
            continue
        if name == own or name.startswith(own + "."):
            continue
        bad.append(f"{rel}:{line}: imports {name}")
    return bad


def test_the_dane_package_is_found() -> None:
    assert "mxgate/plugins/dane/__init__.py" in PUBLIC_API_ONLY
    assert "mxgate/plugins/dane/plugin.py" in PUBLIC_API_ONLY


def test_dane_and_dnssec_import_only_the_public_api_and_their_own_package() -> None:
    bad = [
        line for rel, own in PUBLIC_API_ONLY.items() for line in offenders((ROOT.parent / rel).read_text(), rel, own)
    ]
    assert not bad, "\n".join(bad)


def test_the_check_names_each_offender_with_file_and_line() -> None:
    """Core imports are caught inside functions and under TYPE_CHECKING; relative imports of the own package and
    the root ``mxgate`` are fine; another plugin is not."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from mxgate import Tlsa\n"
        "from . import verify\n"
        "if TYPE_CHECKING:\n"
        "    from mxgate.core.runtime import Runtime\n"
        "def f():\n"
        "    from mxgate.core.dns import Resolver\n"
        "    import mxgate.plugins.dnssec\n"
        "    from ..dnssec import SELF_TEST\n"
    )
    assert offenders(source, "mxgate/plugins/dane/records.py", "mxgate.plugins.dane") == [
        "mxgate/plugins/dane/records.py:5: imports mxgate.core.runtime",
        "mxgate/plugins/dane/records.py:7: imports mxgate.core.dns",
        "mxgate/plugins/dane/records.py:8: imports mxgate.plugins.dnssec",
        "mxgate/plugins/dane/records.py:9: imports mxgate.plugins.dnssec",
    ]
