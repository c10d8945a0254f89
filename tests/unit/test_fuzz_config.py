"""Fuzzing configuration loading: whatever a TOML file holds, loading it either succeeds or raises
:class:`ConfigError` whose every problem names the file, a key path and a message -- never a traceback.

Three generators: arbitrary bytes and TOML-looking text (the reader), schema-shaped documents with random keys
and values of every TOML type (the validator), and single mutations of a complete valid document (the cross
checks, which only run when the sections themselves are valid). Loading goes through
:func:`mxgate.core.bootstrap.load`, the path ``mxgate run`` and ``mxgate config check`` take, with the built-in
plugins' sections and connector settings registered.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import os
import subprocess
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mxgate.core import bootstrap
from mxgate.core.config import SECTIONS, Config
from mxgate.core.errors import ConfigError
from mxgate.core.plugins import Dispatcher, build_plugins, collect_registry

QUICK = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SOAK = settings(
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

REGISTRY = collect_registry(Dispatcher(build_plugins(entry_points=False)))


def _fields(cls: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]


def _item_class(hint: Any) -> Any:
    return typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else hint


# Every key the schema knows, per table, so that generated documents hit real validation paths.
KEYS: dict[str, list[str]] = {name: _fields(_item_class(hint)) for name, hint in SECTIONS.items()}
for _kind in ("inbound_connector", "outbound_connector"):
    KEYS[_kind] += [s.name for s in REGISTRY.settings_for(_kind)]
ALL_KEYS = sorted({key for keys in KEYS.values() for key in keys})
PLUGIN_SECTIONS: dict[str, list[str]] = {name: _fields(cls) for name, cls in REGISTRY.sections.items()}

# Values a careful operator might write (so documents get past type checks into the deeper checks) ...
PLAUSIBLE = st.sampled_from(
    [
        "127.0.0.1:2525",
        "[::1]:2525",
        "[::]:25",
        "0.0.0.0:25",
        "127.0.0.1:9925",
        "host:0",
        "host:65536",
        "host:²",
        "[::1",
        "[zz]:1",
        ":25",
        "mx.example.org",
        "example.org",
        "*.example.org",
        "*",
        "-bad-.example",
        "a" * 64 + ".example",
        "ex\u00e4mple.org",
        "xn--",
        "192.0.2.0/24",
        "192.0.2.0/33",
        "::1/128",
        "not-a-net",
        "none",
        "opportunistic",
        "encryption_only",
        "certificate_validation",
        "domain_validation",
        "mandatory",
        "enforce",
        "testing",
        "validating_resolver",
        "in_process",
        "logfmt",
        "json",
        "debug",
        "smtp",
        "internet",
        "./var",
        "/nonexistent/file.pem",
        "/dev/null",
        "/etc",
        "a\x00b",
        "",
        " ",
        "mailto:tlsrpt@example.org",
        "https://example.org/report",
        0,
        1,
        -1,
        25,
        65535,
        2**63 - 1,
        -(2**63),
        0.0,
        -0.5,
        0.001,
        float("inf"),
        float("-inf"),
        float("nan"),
        1e308,
        True,
        False,
        [],
        ["127.0.0.1:53"],
        [{"address": "127.0.0.1:53", "trusted": True}],
        [{"address": 5}],
        ["mx.example.org", "*.example.org"],
        ["192.0.2.0/24", "2001:db8::/32"],
        {},
        {"x": 1},
        dt.datetime(2026, 1, 1, 12, 0),
        dt.date(2026, 1, 1),
        dt.time(12, 0),
    ]
)
_TEXT = st.text(max_size=40)
SCALARS = st.one_of(
    PLAUSIBLE,
    _TEXT,
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.booleans(),
    st.datetimes(),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(_TEXT, children, max_size=4)),
    max_leaves=12,
)


def _table(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    key = st.one_of(st.sampled_from(keys), _TEXT) if keys else _TEXT
    return st.dictionaries(key, VALUES, max_size=len(keys) + 2)


def _section(name: str) -> st.SearchStrategy[Any]:
    hint = SECTIONS[name]
    table = _table(KEYS[name])
    if typing.get_origin(hint) is tuple:
        return st.one_of(st.lists(table, max_size=3), VALUES)
    if name == "plugins":
        plugin_tables = st.fixed_dictionaries(
            {}, optional={n: st.one_of(_table(keys), VALUES) for n, keys in PLUGIN_SECTIONS.items()}
        )
        # [plugins] load/disable are left out: importing random module names could import anything
        own = st.fixed_dictionaries(
            {},
            optional={
                "priority": st.one_of(st.dictionaries(_TEXT, VALUES, max_size=3), VALUES),
                "hook_trace": VALUES,
                "disable": st.lists(st.sampled_from(["dane", "mta_sts", "tlsrpt", "x"]), max_size=3),
            },
        )
        return st.builds(lambda a, b: {**a, **b}, own, plugin_tables)
    return st.one_of(table, VALUES)


DOCUMENTS = st.fixed_dictionaries(
    {},
    optional={**{name: _section(name) for name in SECTIONS}, "extra_top": VALUES, "": VALUES},
)

# A complete valid document: every section, both connector kinds, plugin sections -- the base for mutations.
BASE: dict[str, Any] = {
    "server": {
        "hostname": "mx.example.org",
        "state_dir": "./var",
        "max_message_size": 1048576,
        "max_recipients": 100,
        "accepted_domains": ["example.org", "*.example.org"],
        "log_format": "json",
        "log_level": "warning",
        "tracking_log": True,
    },
    "listener": [
        {"name": "smtp", "address": "127.0.0.1:2525", "idle_timeout": 60.0, "max_errors": 5},
        {"name": "submission", "address": "127.0.0.1:2587", "allow_plaintext_auth": True, "max_recipients": 10},
    ],
    "inbound_connector": [
        {"name": "office", "sender_ips": ["192.0.2.0/24"], "may_relay": True},
        {
            "name": "partner",
            "sender_ips": ["198.51.100.0/24"],
            "sender_domains": ["partner.example"],
            "restrict_domains_to_ips": True,
            "accepted_domains": ["partner-only.example"],
        },
    ],
    "outbound_connector": [
        {"name": "inside", "recipient_domains": ["example.org"], "smart_hosts": ["127.0.0.1:2526"], "tls": "none"},
        {
            "name": "internet",
            "recipient_domains": ["*"],
            "use_mx": True,
            "tls": "opportunistic",
            "dane": "opportunistic",
            "mta_sts": "opportunistic",
            "retry_first": 60.0,
            "give_up_after": 86400.0,
        },
    ],
    "dns": {"resolvers": ["127.0.0.1:53", {"address": "[::1]:53", "trusted": True}], "timeout": 2.0},
    "plugins": {
        "priority": {"dane": 5},
        "tlsrpt": {"organization_name": "Example Org", "contact_info": "tlsrpt@example.org"},
        "mta_sts": {"fetch_timeout": 5.0},
    },
    "metrics": {"listen": "127.0.0.1:9925"},
}


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


BASE_PATHS = _paths(BASE)


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(BASE_PATHS))
        parent: Any = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            last = path[-1]
            action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
            if action == "delete":
                del parent[last]
            elif action == "add" and isinstance(parent, dict):
                parent[draw(st.one_of(st.sampled_from(ALL_KEYS), _TEXT))] = draw(VALUES)
            else:
                parent[last] = draw(VALUES)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed the path
    return doc


def _load_text(directory: Path, data: bytes) -> Config | None:
    path = directory / "fuzz.toml"
    path.write_bytes(data)
    try:
        config, _plugins = bootstrap.load(path, entry_points=False)
    except ConfigError as exc:
        assert exc.problems, "a ConfigError without problems"
        for problem in exc.problems:
            assert problem.file == str(path)
            assert problem.message, problem
            assert str(problem).startswith(str(path))
        return None
    return config


def _load_document(directory: Path, doc: dict[str, Any]) -> Config | None:
    try:
        text = tomli_w.dumps(doc)
    except (TypeError, ValueError):
        return None  # not representable in TOML (tomli_w refused): nothing to test
    return _load_text(directory, text.encode("utf-8", "surrogatepass"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-config")


def test_base_document_is_valid(workdir: Path) -> None:
    """The mutation base must itself load, or the mutations would only ever test one error."""
    assert _load_document(workdir, BASE) is not None


TOMLISH = st.lists(
    st.one_of(
        st.sampled_from(
            ["[server]\n", "[[listener]]\n", "[plugins.tlsrpt]\n", "[dns]\n", "name = ", "address = ", '"', "'''",
             "=", "[", "]", "{", "}", ",", "\n", "\r\n", "\\u0000", "\\", "1e999", "nan", "inf", "0x", "1979-05-27",
             "true", "a.b.c = 1\n", "\x00", "\udcff", "\ufeff"]
        ),
        st.text(max_size=10),
    ),
    max_size=30,
).map("".join)  # fmt: skip


@QUICK
@given(st.one_of(st.binary(max_size=400), TOMLISH.map(lambda t: t.encode("utf-8", "surrogatepass"))))
@example(b"\xff\xfe")
@example(b"[server]\nstate_dir = '\x00'\n")
@example(b"[[listener]]\n" * 3)
def test_fuzz_config_bytes(workdir: Path, data: bytes) -> None:
    _load_text(workdir, data)


@QUICK
@given(DOCUMENTS)
@example({"listener": [{"name": "a", "address": "[::1]:99999999999999999999999"}]})
@example({"dns": {"resolvers": [7, None, {"address": []}]}})
@example({"plugins": {"priority": {"dane": 2**70}}})
@example({"server": {"hostname": [], "user": "a\x00b", "group": "\x00"}, "dns": {"resolvers": ["127.0.0.1\x00:53"]}})
def test_fuzz_config_documents(workdir: Path, doc: dict[str, Any]) -> None:
    _load_document(workdir, doc)


@QUICK
@given(mutated())
def test_fuzz_config_mutations(workdir: Path, doc: dict[str, Any]) -> None:
    _load_document(workdir, doc)


@pytest.mark.parametrize("data", [b"a = " + b"[" * 5000, b"a = " + b"{b = " * 5000], ids=["array", "table"])
def test_deeply_nested_toml_is_a_config_error(tmp_path: Path, data: bytes) -> None:
    """Found by this fuzzing: tomllib's RecursionError used to escape as a traceback."""
    path = tmp_path / "deep.toml"
    path.write_bytes(data)
    with pytest.raises(ConfigError):
        bootstrap.load(path, entry_points=False)


@pytest.mark.parametrize(
    "text",
    [
        b"[server\n",
        b"\xff\xfe\x00",
        b"[server]\nstate_dir = 5\n",
        b"[[listener]]\nname = 'x'\naddress = '[::1'\n",
        b"[plugins.tlsrpt]\norganization_name = []\n",
        b"[[outbound_connector]]\nname='a'\nrecipient_domains=['*']\nsmart_hosts=['h:\xc2\xb2']\n",
    ],
)
def test_cli_config_check_never_prints_a_traceback(tmp_path: Path, text: bytes) -> None:
    """What an operator sees: exit status 1 and ``error: FILE: key: message`` lines, no Python traceback."""
    path = tmp_path / "bad.toml"
    path.write_bytes(text)
    proc = subprocess.run(
        [sys.executable, "-m", "mxgate", "config", "check", str(path)],
        capture_output=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert f"error: {path}" in err, err


# -- soak ------------------------------------------------------------------------------------------------------


def _soak(strategy: st.SearchStrategy[Any], fn: Callable[[Path, Any], Any]) -> Callable[..., None]:
    @pytest.mark.soak
    @SOAK
    @given(strategy)
    def run(workdir: Path, value: Any) -> None:
        fn(workdir, value)

    return run


test_soak_fuzz_config_bytes = _soak(st.binary(max_size=2000), _load_text)
test_soak_fuzz_config_documents = _soak(DOCUMENTS, _load_document)
test_soak_fuzz_config_mutations = _soak(mutated(), _load_document)
