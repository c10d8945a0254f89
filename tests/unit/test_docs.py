"""Docs coverage (datasette's test_docs): every hook, every config key and every built-in plugin documented."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from mxgate.core import hookspecs
from mxgate.core.plugins import BUILTIN_PLUGINS

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def test_every_hook_is_in_hooks_md() -> None:
    text = (DOCS / "hooks.md").read_text()
    hooks = sorted(n for n in dir(hookspecs) if n.startswith("mxgate_"))
    assert hooks, "no hooks found"
    missing = [h for h in hooks if f"`{h}`" not in text]
    assert missing == []
    documented = set(re.findall(r"`(mxgate_[a-z_]+)`", text))
    assert documented - set(hooks) == set(), "hooks.md names hooks that do not exist"


def test_every_hook_has_a_docstring_saying_when_it_fires() -> None:
    for name in dir(hookspecs):
        if name.startswith("mxgate_"):
            doc = getattr(hookspecs, name).__doc__ or ""
            assert len(doc.strip()) > 40, name


def test_configuration_reference_is_current() -> None:
    generated = subprocess.run(
        [sys.executable, "-m", "mxgate", "config", "reference"], capture_output=True, text=True, check=True
    ).stdout
    assert (DOCS / "configuration.md").read_text() == generated, "run: mxgate config reference > docs/configuration.md"


def test_every_builtin_plugin_has_a_page() -> None:
    pages = {p.stem for p in (DOCS / "plugins").glob("*.md")}
    assert set(BUILTIN_PLUGINS) <= pages, f"missing docs/plugins/<name>.md for {set(BUILTIN_PLUGINS) - pages}"


ARCHITECTURE = DOCS / "architecture.md"
_PATH = re.compile(r"`((?:mxgate|tests|examples|bench|docs)/[\w./-]*)`")
# the test helpers and the demo are one room each: their folder stands for their files
_ROOMS = {"mxgate/testing/", "mxgate/demo/"}


def test_architecture_names_only_paths_that_exist() -> None:
    text = ARCHITECTURE.read_text()
    named = set(_PATH.findall(text))
    assert len(named) > 50, "docs/architecture.md names too few paths: the pattern no longer matches"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert missing == [], f"docs/architecture.md names paths that do not exist: {missing}"
    links = re.findall(r"\]\(([\w./-]+\.md)(?:#[\w-]*)?\)", text)
    assert [link for link in links if not (DOCS / link).exists()] == []


def test_architecture_names_every_module() -> None:
    named = set(_PATH.findall(ARCHITECTURE.read_text()))
    unnamed = []
    for path in sorted((ROOT / "mxgate").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if path.name == "__main__.py" or (path.name == "__init__.py" and not path.read_text().strip()):
            continue
        folder = rel.rsplit("/", 1)[0] + "/"
        if rel not in named and not (folder in _ROOMS and folder in named):
            unnamed.append(rel)
    assert unnamed == [], f"add these modules to docs/architecture.md (the map): {unnamed}"


def test_every_tls_outcome_field_is_described() -> None:
    """A plugin author reading ``TlsOutcome`` (``on_tls_outcome``) learns what each field holds."""
    import dataclasses
    import inspect

    from mxgate import TlsOutcome

    lines = inspect.getsource(TlsOutcome).splitlines()
    undescribed = []
    for field in dataclasses.fields(TlsOutcome):
        (i,) = (n for n, line in enumerate(lines) if line.strip().startswith(f"{field.name}:"))
        described = "  # " in lines[i] and len(lines[i].split("  # ", 1)[1]) > 5
        if not (described or lines[i - 1].strip().startswith("#")):
            undescribed.append(field.name)
    assert undescribed == []
