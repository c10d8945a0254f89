"""Configuration: every kind of mistake gives file, key path, bad value and what is allowed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import tomli_w

from mxgate.core import bootstrap, checks, engine
from mxgate.core.config import BUILTIN_SOURCE, load_config
from mxgate.core.errors import ConfigError
from mxgate.testing.ca import TestCA
from mxgate.testing.gateway import build_document


def write(tmp_path: Path, text: str, name: str = "mx.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        bootstrap.load(path)
    return [str(p) for p in info.value.problems]


BASE = """
[[listener]]
name = "smtp"
address = "127.0.0.1:2525"
[[outbound_connector]]
name = "internet"
recipient_domains = ["*"]
use_mx = true
"""


def test_builtin_default_is_valid() -> None:
    config, plugins = bootstrap.load(None)
    assert config.source == BUILTIN_SOURCE
    assert [lst.address for lst in config.listener] == ["127.0.0.1:2525"]
    assert config.metrics.listen == "127.0.0.1:9925"
    assert config.server.state_dir == "./var"
    assert {"dane", "mta_sts", "tlsrpt", "prometheus", "dnssec", "core"} <= set(plugins.names())


def test_unknown_key_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nhostnme = 'mx.example.org'\n" + BASE)
    assert problems(path) == [f"{path}: server.hostnme: unknown key 'hostnme'; did you mean 'hostname'?"]


def test_unknown_section(tmp_path: Path) -> None:
    path = write(tmp_path, "[listeners]\nx=1\n" + BASE)
    (msg,) = problems(path)
    assert "listeners: unknown key 'listeners'; did you mean 'listener'?" in msg


def test_wrong_type_names_value_and_expectation(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nmax_message_size = 'big'\n" + BASE)
    assert problems(path) == [f"{path}: server.max_message_size: expected a whole number, got a string ('big')"]


def test_bad_choice_in_array_of_tables_has_index(tmp_path: Path) -> None:
    text = (
        BASE
        + """
[[outbound_connector]]
name = "partner"
recipient_domains = ["partner.example"]
smart_hosts = ["mx.partner.example"]
tls = "domain_validaton"
"""
    )
    (msg,) = problems(write(tmp_path, text))
    assert "outbound_connector[1].tls: 'domain_validaton' is not allowed; expected one of: none, opportunistic" in msg
    assert "did you mean 'domain_validation'?" in msg


def test_plugin_connector_setting_validated(tmp_path: Path) -> None:
    text = BASE.replace("use_mx = true", 'use_mx = true\ndane = "always"')
    (msg,) = problems(write(tmp_path, text))
    assert "outbound_connector[0].dane: 'always' is not allowed; expected one of: none, opportunistic, mandatory" in msg


def test_connection_reuse_settings(tmp_path: Path) -> None:
    config, _ = bootstrap.load(write(tmp_path, BASE))
    (conn,) = config.outbound_connector
    assert (conn.connection_reuse, conn.connection_idle_timeout) == (True, 2.0)
    assert (conn.connection_reuse_limit, conn.connection_max_age) == (100, 300.0)
    text = BASE.replace(
        "use_mx = true",
        "use_mx = true\nconnection_idle_timeout = 301\nconnection_reuse_limit = 0\nconnection_max_age = 0",
    )
    msgs = "\n".join(problems(write(tmp_path, text, "bad.toml")))
    assert (
        "outbound_connector[0].connection_idle_timeout: 301.0: expected a number greater than 0 and at most 300" in msgs
    )
    assert "outbound_connector[0].connection_reuse_limit: 0: expected a number greater than 0" in msgs
    assert "outbound_connector[0].connection_max_age: 0.0: expected a number greater than 0" in msgs
    off = BASE.replace("use_mx = true", "use_mx = true\nconnection_reuse = false\nconnection_idle_timeout = 0.3")
    config, _ = bootstrap.load(write(tmp_path, off, "off.toml"))
    (conn,) = config.outbound_connector
    assert (conn.connection_reuse, conn.connection_idle_timeout) == (False, 0.3)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("-1", 'server.receive_workers: -1: expected "auto" or a whole number from 0 to 64'),
        ("65", 'server.receive_workers: 65: expected "auto" or a whole number from 0 to 64'),
        ("1.5", 'server.receive_workers: 1.5: expected "auto" or a whole number from 0 to 64'),
        ("true", 'server.receive_workers: True: expected "auto" or a whole number from 0 to 64'),
        ('"many"', "server.receive_workers: 'many': expected \"auto\" or a whole number from 0 to 64"),
    ],
)
def test_receive_workers_bounds(tmp_path: Path, value: str, expected: str) -> None:
    config, _ = bootstrap.load(write(tmp_path, BASE))
    assert config.server.receive_workers == "auto"  # decided by the machine unless a number is given
    assert config.server.receive_worker_count == checks.auto_receive_workers()
    config, _ = bootstrap.load(write(tmp_path, "[server]\nreceive_workers = 3\n" + BASE, "three.toml"))
    assert (config.server.receive_workers, config.server.receive_worker_count) == (3, 3)
    config, _ = bootstrap.load(write(tmp_path, "[server]\nreceive_workers = 0\n" + BASE, "zero.toml"))
    assert config.server.receive_worker_count == 0
    msgs = problems(write(tmp_path, f"[server]\nreceive_workers = {value}\n" + BASE, "bad.toml"))
    assert [m.split(": ", 1)[1] for m in msgs] == [expected]


@pytest.mark.parametrize(("cpus", "workers"), [(1, 0), (2, 1), (4, 3), (9, 8), (64, 8)])
def test_receive_workers_auto_is_one_per_spare_core(cpus: int, workers: int) -> None:
    assert checks.auto_receive_workers(cpus) == workers


def test_usable_cpus_follows_the_affinity_mask() -> None:
    """What "auto" counts: the cores this process may run on, not every core of the machine."""
    assert 1 <= checks.usable_cpus() <= len(os.sched_getaffinity(0))


async def test_auto_starts_no_workers_in_process(tmp_path: Path) -> None:
    """A gateway built in-process (tests, embedding) cannot start workers: "auto" means none there, one process
    that receives itself (a number still asks for workers and is refused, below)."""
    document = build_document("", tmp_path)  # loopback ports, DNS and metrics of the test gateways
    del document["server"]["receive_workers"]  # which set 0 explicitly
    path = tmp_path / "auto.toml"
    path.write_text(tomli_w.dumps(document))
    config, plugins = bootstrap.load(path, entry_points=False)
    assert config.server.receive_workers == "auto"
    gateway = engine.Gateway(config, plugins)
    runtime = await gateway.start()
    try:
        assert gateway.workers is None and runtime.role == "main"
        listener = config.listener[0]
        reader, writer = await asyncio.open_connection(listener.host, listener.port)
        try:  # this process accepts (with workers it would only bind)
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"220 ")
        finally:
            writer.close()
    finally:
        await gateway.stop(timeout=5.0)


async def test_receive_workers_need_the_mxgate_run_process(tmp_path: Path) -> None:
    """A gateway built in-process (tests, embedding) has no configuration text to start workers from: a clear
    configuration error, not a half-started gateway."""
    config, plugins = bootstrap.load(
        write(tmp_path, f"[server]\nreceive_workers = 1\nstate_dir = '{tmp_path}/var'\n" + BASE)
    )
    with pytest.raises(ConfigError, match=r"server.receive_workers: receive workers are started by `mxgate run`"):
        await engine.Gateway(config, plugins).start()


def test_plugin_section_unknown_and_typo(tmp_path: Path) -> None:
    text = BASE + "[plugins.tlsrp]\norganization_name = 'x'\n[plugins.tlsrpt]\norganisation_name = 'x'\n"
    msgs = problems(write(tmp_path, text))
    assert any(
        "plugins.tlsrp: no loaded plugin declares a [plugins.tlsrp] section; did you mean [plugins.tlsrpt]?" in m
        for m in msgs
    )
    assert any("plugins.tlsrpt.organisation_name: unknown key" in m and "'organization_name'" in m for m in msgs)


def test_all_errors_reported_at_once_including_cross_checks(tmp_path: Path) -> None:
    text = """
[server]
max_recipients = 0
[[listener]]
name = "a"
address = "127.0.0.1:2525"
[[listener]]
name = "b"
address = "0.0.0.0:2525"
tls_cert = "missing.pem"
tls_key = "missing.key"
[[outbound_connector]]
name = "x"
recipient_domains = ["*"]
"""
    msgs = problems(write(tmp_path, text))
    joined = "\n".join(msgs)
    assert "server.max_recipients: 0: expected a number greater than 0" in joined
    assert "listener[1].address: 0.0.0.0:2525 is also used by listener[0]" in joined
    assert "listener[1].tls_cert: file 'missing.pem' does not exist" in joined
    assert "outbound_connector[0]: set exactly one of smart_hosts or use_mx = true" in joined
    assert len(msgs) == 5


def test_metrics_port_clash(tmp_path: Path) -> None:
    text = BASE + '[metrics]\nlisten = "127.0.0.1:2525"\n'
    (msg,) = problems(write(tmp_path, text))
    assert "metrics.listen: 127.0.0.1:2525 is also used by listener[0]" in msg


def test_overlapping_inbound_connectors(tmp_path: Path) -> None:
    text = (
        BASE
        + """
[[inbound_connector]]
name = "a"
sender_ips = ["192.0.2.0/24"]
[[inbound_connector]]
name = "b"
sender_ips = ["192.0.2.0/24"]
[[inbound_connector]]
name = "c"
sender_ips = ["192.0.2.0/24"]
tls_sender_certificate_name = "mail.partner.example"
"""
    )
    (msg,) = problems(write(tmp_path, text))
    assert "inbound_connector[1]: overlaps inbound_connector[0] ('a')" in msg


def test_inbound_connector_needs_a_way_to_match_and_valid_networks(tmp_path: Path) -> None:
    text = (
        BASE
        + """
[[inbound_connector]]
name = "nothing"
[[inbound_connector]]
name = "badnet"
sender_ips = ["300.1.2.3/8"]
"""
    )
    msgs = problems(write(tmp_path, text))
    assert any("inbound_connector[0]: needs sender_ips or tls_sender_certificate_name" in m for m in msgs)
    assert any("inbound_connector[1].sender_ips: not an IP address or network: '300.1.2.3/8'" in m for m in msgs)


def test_duplicate_names_and_bad_address(tmp_path: Path) -> None:
    text = (
        BASE
        + """
[[outbound_connector]]
name = "internet"
recipient_domains = ["example.org"]
smart_hosts = ["[::1]:x"]
[[listener]]
name = "other"
address = "localhost"
"""
    )
    msgs = "\n".join(problems(write(tmp_path, text)))
    assert "listener[1].address: 'localhost': missing ':port'" in msgs
    assert "outbound_connector[1].name: 'internet' is already the name of outbound_connector[0]" in msgs
    assert "outbound_connector[1].smart_hosts[0]: '[::1]:x'" in msgs


def test_in_process_dnssec_not_available(tmp_path: Path) -> None:
    (msg,) = problems(write(tmp_path, BASE + '[dns]\ndnssec = "in_process"\n'))
    assert 'dns.dnssec: "in_process" validation is not available yet' in msg


def test_toml_syntax_error_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nx=1")
    (msg,) = problems(path)
    assert msg.startswith(f"{path}: TOML syntax error")


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config("/nonexistent/mx.toml")


def test_relative_paths_resolve_against_config_dir(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    pair = TestCA.create(tmp_path / "ca").issue(["mx.example.org"])  # a pair that loads (config check loads it)
    (tmp_path / "certs" / "mx.pem").write_bytes(pair.chain_path.read_bytes())
    (tmp_path / "certs" / "mx.key").write_bytes(pair.key_path.read_bytes())
    text = BASE.replace(
        'address = "127.0.0.1:2525"',
        'address = "127.0.0.1:2525"\ntls_cert = "certs/mx.pem"\ntls_key = "certs/mx.key"',
    )
    config, _ = bootstrap.load(write(tmp_path, text))
    assert config.path(config.listener[0].tls_cert or "") == tmp_path / "certs" / "mx.pem"


def test_resolvers_accept_strings_and_tables(tmp_path: Path) -> None:
    text = BASE + '[dns]\nresolvers = ["127.0.0.1:5353", {address = "192.0.2.53", trusted = true}]\n'
    config, _ = bootstrap.load(write(tmp_path, text))
    assert [(r.address, r.trusted) for r in config.dns.resolvers] == [
        ("127.0.0.1:5353", False),
        ("192.0.2.53", True),
    ]


def test_config_objects_are_frozen() -> None:
    config, _ = bootstrap.load(None)
    with pytest.raises(AttributeError):
        config.server.hostname = "evil"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.outbound_connector[0].extra["dane"] = "none"  # type: ignore[index]


def test_nul_in_a_string_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    # TOML allows "\u0000"; the C library behind pwd/grp/socket refuses it with ValueError (found by fuzzing)
    path = write(tmp_path, '[server]\nuser = "a\\u0000b"\nhostname = "mx\\u0000.example.org"\n' + BASE)
    found = problems(path)
    assert f"{path}: server.user: expected a string without NUL characters (\\u0000)" in found
    assert f"{path}: server.hostname: expected a string without NUL characters (\\u0000)" in found
