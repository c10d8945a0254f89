"""The layering contract (issue #20, docs/architecture.md "Layering"): contract <- core <- plugins.

The imports are read from the source (an AST walk, as ``grimp``/import-linter cannot: they do not tell imports
inside functions from module-level ones, and cannot say "no cycle at all"). Every import of an ``mxgate`` module
counts, inside functions too; imports under ``if TYPE_CHECKING:`` do not make a cycle (they never run), but the
contract's are checked too. A failure names the offending import as ``file:line``.
"""

from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The contract: what hooks are declared with and pass around. They import only each other (and the stdlib or
#: third-party packages).
CONTRACT = frozenset(
    {
        "mxgate.core.errors",
        "mxgate.core.hookspecs",
        "mxgate.core.messages",
        "mxgate.core.metadata",
        "mxgate.core.migrations",
        "mxgate.core.model",
        "mxgate.core.outcomes",
        "mxgate.core.settings",
    }
)
#: Implementations the contract may name as types only (under ``TYPE_CHECKING``): the objects a hook is given
#: that are services, not values.
CONTRACT_TYPE_ONLY = frozenset({"mxgate.core.runtime", "mxgate.core.config", "mxgate.connectors.outbound"})
#: What the core (and the connectors, which are core-level) never import.
ABOVE_CORE = ("mxgate.plugins", "mxgate.demo", "mxgate.testing")


@dataclass(frozen=True, slots=True)
class Import:
    source: str  # importing module
    target: str  # imported mxgate module
    where: str  # file:line
    in_function: bool
    type_checking: bool

    def __str__(self) -> str:
        flags = " (in a function)" if self.in_function else ""
        flags += " (TYPE_CHECKING)" if self.type_checking else ""
        return f"{self.where}: {self.source} imports {self.target}{flags}"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted((ROOT / "mxgate").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports_of(module: str, path: Path) -> list[Import]:
    found: list[Import] = []
    where = path.relative_to(ROOT).as_posix()

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        base = node.module or ""
        if node.level:
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        # ``from a import b``: b may be a module (a.b) or a name in a
        return [f"{base}.{alias.name}" for alias in node.names]

    def walk(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            func = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            tc = type_checking or _is_type_checking(child)
            if isinstance(child, ast.Import | ast.ImportFrom):
                seen = set()
                for name in targets(child):
                    target = _resolve(name)
                    if target and target != module and target.startswith("mxgate") and target not in seen:
                        seen.add(target)
                        found.append(Import(module, target, f"{where}:{child.lineno}", func, tc))
            walk(child, func, tc)

    walk(ast.parse(path.read_text(encoding="utf-8")), False, False)
    return found


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports_of(module, path)]


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        graph[imp.source].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_every_kind_of_import() -> None:
    """The contract below is only as good as this reading of the source: spot-check each kind."""
    kinds = {(i.source, i.target): i for i in IMPORTS}
    assert not kinds[("mxgate.core.engine", "mxgate.core.bootstrap")].in_function
    assert kinds[("mxgate.demo", "mxgate.demo.story")].in_function  # from mxgate.demo import story, in a function
    assert kinds[("mxgate.core.hookspecs", "mxgate.core.runtime")].type_checking
    assert ("mxgate.core.queue.cli", "mxgate.core.commands") in kinds  # absolute import in a subpackage
    assert len(IMPORTS) > 300


def test_no_import_cycle() -> None:
    """No cycle among mxgate's modules, imports inside functions included (``TYPE_CHECKING`` ones excluded):
    each module can be understood, imported and tested after the ones it uses."""
    running = [i for i in IMPORTS if not i.type_checking]
    problems = []
    for component in _cycles(running):
        members = set(component)
        edges = [str(i) for i in running if i.source in members and i.target in members]
        problems.append(f"cycle among {', '.join(component)}:\n  " + "\n  ".join(edges))
    assert not problems, "\n".join(problems)


def test_the_core_imports_neither_the_public_api_nor_plugins_demo_or_testing() -> None:
    """The core (and the connectors) never import ``mxgate`` (the public API re-exports the core: it is above
    it), built-in plugins, the demo or the test helpers; not even for types."""
    bad = [
        str(i)
        for i in IMPORTS
        if _in(i.source, "mxgate.core", "mxgate.connectors") and (i.target == "mxgate" or _in(i.target, *ABOVE_CORE))
    ]
    assert not bad, "the core imports above itself:\n" + "\n".join(bad)


def test_the_contract_imports_only_the_contract() -> None:
    """hookspecs, model, outcomes, settings, errors, messages, migrations: at run time only each other; as
    types (``TYPE_CHECKING``) also the runtime, the configuration and the outbound connector."""
    assert set(CONTRACT) <= set(MODULES)
    bad = [
        str(i)
        for i in IMPORTS
        if i.source in CONTRACT
        and i.target not in CONTRACT
        and not (i.type_checking and i.target in CONTRACT_TYPE_ONLY)
    ]
    assert not bad, "a contract module imports an implementation:\n" + "\n".join(bad)


def test_only_the_demo_imports_mxgate_testing_and_only_when_it_runs() -> None:
    """``mxgate.testing`` (pytest and the DNS lab behind it) is imported by nothing in mxgate but the demo's
    story, and the story only inside the function that runs ``mxgate demo``; only the program imports the demo."""
    outside = [i for i in IMPORTS if not _in(i.source, "mxgate.testing")]
    bad = [str(i) for i in outside if _in(i.target, "mxgate.testing") and i.source != "mxgate.demo.story"]
    bad += [
        str(i) for i in outside if i.target == "mxgate.demo.story" and not (i.source == "mxgate.demo" and i.in_function)
    ]
    bad += [str(i) for i in outside if i.target == "mxgate.demo" and i.source not in ("mxgate.__main__",)]
    assert not bad, "\n".join(bad)


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(actions[0].choices)


CORE_COMMANDS = {
    "run",
    "config",
    "plugins",
    "trace",
    "version",
    "user",
    "queue",
    "connector",
    "explain",
    "check",
    "reload",
    "cluster",
}


def test_the_core_commands_come_through_register_commands_even_without_a_configuration() -> None:
    """The core's own commands are the essential plugin's ``mxgate_lifecycle_register_commands``; with no usable
    configuration (``plugins=None``) the command line still has every one of them."""
    from mxgate.core import cli
    from mxgate.core.plugins import build_plugins

    assert _subcommands(cli.build_parser(None)) == CORE_COMMANDS
    essential = build_plugins(entry_points=False, builtin=False)
    assert essential.names() == ["core"]
    assert "mxgate_lifecycle_register_commands" in essential.info("core").hooks  # type: ignore[union-attr]


def test_mxgate_help_lists_the_same_commands_as_before(capsys: pytest.CaptureFixture[str]) -> None:
    """``mxgate --help`` with the built-in default: the core's commands, the demo, the built-in plugins'."""
    from mxgate.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ") and not line.startswith("     ")}
    assert listed == CORE_COMMANDS | {"demo", "dane", "sts", "tlsrpt"}


#: Modules allowed past MAX_LINES, each with the one concern it holds (issue #20: "no module above 600 lines mixes
#: concerns"). Empty today; an entry needs a reason a reviewer agrees with.
LONG_MODULES: dict[str, str] = {}
MAX_LINES = 600


def test_no_module_is_long_enough_to_mix_concerns() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in sorted((ROOT / "mxgate").rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > MAX_LINES and str(path.relative_to(ROOT)) not in LONG_MODULES
    }
    assert not long, f"split these by concern (or name their one concern in LONG_MODULES): {long}"
