"""Plugin loading (entry point, path, disable, priority) and the async dispatcher."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from mxgate import Accept, Address, Envelope, Reject, Reply, Session, TempFail, hookimpl
from mxgate.core import bootstrap
from mxgate.core.errors import ConfigError, PluginError
from mxgate.core.plugins import Dispatcher, HookCallError, Hooks, build_plugins

ROOT = Path(__file__).resolve().parents[2]


def session() -> Session:
    return Session(id="s1", listener="smtp", peer_ip="192.0.2.1", peer_port=1234, local_ip="127.0.0.1", local_port=25)


class Recorder:
    def __init__(self, name: str, priority: int, calls: list[str], verdict: object = None) -> None:
        self.name, self.priority, self.calls, self.verdict = name, priority, calls, verdict

    @hookimpl
    async def mxgate_receive_on_rcpt_command(self, rcpt: Address) -> object:
        self.calls.append(self.name)
        return self.verdict


async def test_priority_orders_calls_and_firstresult_stops() -> None:
    calls: list[str] = []
    reject = Reject(Reply(550, "5.7.1", "no"))
    plugins = build_plugins(
        entry_points=False,
        extra=[
            ("late", Recorder("late", 90, calls)),
            ("first", Recorder("first", 1, calls)),
            ("middle", Recorder("middle", 20, calls, reject)),
            ("never", Recorder("never", 80, calls)),
        ],
    )
    hooks = Hooks(Dispatcher(plugins))
    verdict = await hooks.on_rcpt_command(session(), Envelope(), Address("a", "example.org"))
    assert verdict == reject
    assert calls == ["first", "middle"]


async def test_priority_override_from_config() -> None:
    calls: list[str] = []
    plugins = build_plugins(
        entry_points=False,
        priority={"b": 1},
        extra=[("a", Recorder("a", 5, calls)), ("b", Recorder("b", 50, calls))],
    )
    await Hooks(Dispatcher(plugins)).on_rcpt_command(session(), Envelope(), Address("a", "x.org"))
    assert calls == ["b", "a"]


async def test_sync_and_async_implementations_mix_and_get_only_their_arguments() -> None:
    seen: list[tuple[str, object]] = []

    class SyncOne:
        @hookimpl
        def mxgate_receive_on_mail_command(self, sender: Address) -> None:
            seen.append(("sync", sender))

    class AsyncOne:
        @hookimpl
        async def mxgate_receive_on_mail_command(self, session: Session, envelope: Envelope) -> object:
            seen.append(("async", session.id))
            return TempFail(Reply(451, "4.7.1", "later"))

    plugins = build_plugins(entry_points=False, extra=[("s", SyncOne()), ("a", AsyncOne())])
    verdict = await Hooks(Dispatcher(plugins)).on_mail_command(session(), Envelope(), Address("x", "y.org"))
    assert isinstance(verdict, TempFail) and verdict.reply.code == 451
    assert ("sync", Address("x", "y.org")) in seen and ("async", "s1") in seen


async def test_raising_plugin_is_reported_with_its_name() -> None:
    errors: list[tuple[str, str]] = []

    class Broken:
        name = "broken"

        @hookimpl
        def mxgate_receive_on_connect(self) -> None:
            raise RuntimeError("boom")

    class Watcher:
        @hookimpl
        def mxgate_report_on_plugin_error(self, plugin: str, hook: str) -> None:
            errors.append((plugin, hook))

    plugins = build_plugins(entry_points=False, extra=[("broken", Broken()), ("watcher", Watcher())])
    dispatcher = Dispatcher(plugins)
    with pytest.raises(HookCallError) as info:
        await Hooks(dispatcher).on_connect(session())
    assert info.value.plugin == "broken"
    assert errors == [("broken", "mxgate_receive_on_connect")]
    assert dispatcher.stats[("broken", "mxgate_receive_on_connect")].errors == 1
    # notification hooks log and carry on
    await Hooks(dispatcher).on_disconnect(session())


async def test_bad_return_type_is_refused() -> None:
    class Stringy:
        @hookimpl
        def mxgate_receive_on_connect(self) -> str:
            return "250 ok"

    plugins = build_plugins(entry_points=False, extra=[("stringy", Stringy())])
    with pytest.raises(PluginError, match="expected Accept, Reject"):
        await Hooks(Dispatcher(plugins)).on_connect(session())


def test_wrappers_and_unknown_hooks_are_refused() -> None:
    class Wrapper:
        @hookimpl(wrapper=True)
        def mxgate_receive_on_connect(self) -> object:
            return (yield)

    with pytest.raises(PluginError, match="wrapper"):
        build_plugins(entry_points=False, extra=[("w", Wrapper())])

    class Typo:
        @hookimpl
        def mxgate_receive_on_rcpt(self) -> None: ...

    with pytest.raises(PluginError, match="not an mxgate hook"):
        build_plugins(entry_points=False, extra=[("t", Typo())])


def test_verdicts_are_checked() -> None:
    with pytest.raises(ValueError):
        Reject(Reply(451, "4.7.1", "x"))
    with pytest.raises(ValueError):
        Reply(550, "4.1.1", "class mismatch")
    with pytest.raises(ValueError):
        Reply(250, "2.0.0", "two\r\nlines")
    assert str(Accept(Reply(250, "2.1.5", "ok")).reply) == "250 2.1.5 ok"


def test_disable_builtin_and_unknown(tmp_path: Path) -> None:
    plugins = build_plugins(entry_points=False, disable=["tlsrpt"])
    info = plugins.info("tlsrpt")
    assert info is not None and not info.enabled
    assert plugins.pm.get_plugin("tlsrpt") is None
    with pytest.raises(PluginError, match="unknown plugins: nope"):
        build_plugins(entry_points=False, disable=["nope"])
    with pytest.raises(PluginError, match="essential plugins cannot be disabled"):
        build_plugins(entry_points=False, disable=["core"])


def test_disabled_plugin_section_becomes_unknown(tmp_path: Path) -> None:
    path = tmp_path / "mx.toml"
    path.write_text('[plugins]\ndisable = ["tlsrpt"]\n[plugins.tlsrpt]\norganization_name = "x"\n')
    with pytest.raises(ConfigError, match=r"no loaded plugin declares a \[plugins.tlsrpt\] section"):
        bootstrap.load(path)


def test_load_from_path_with_section(tmp_path: Path) -> None:
    example = ROOT / "examples" / "header-stamp" / "mxgate_header_stamp.py"
    path = tmp_path / "mx.toml"
    path.write_text(
        f'[plugins]\nload = ["{example}:HeaderStamp"]\n[plugins.header_stamp]\nreject_pattern = "(unclosed"\n'
    )
    with pytest.raises(ConfigError) as info:
        bootstrap.load(path)
    assert "plugins.header_stamp.reject_pattern: '(unclosed': not a regular expression" in str(info.value)
    path.write_text(f'[plugins]\nload = ["{example}:HeaderStamp"]\n[plugins.header_stamp]\nheader = "X-T"\n')
    config, plugins = bootstrap.load(path)
    info2 = plugins.info("header_stamp")
    assert info2 is not None and info2.source.startswith("config: ") and info2.priority == 10
    assert config.plugin_section("header_stamp", type(config.plugin_sections["header_stamp"])).header == "X-T"


def test_load_errors_name_the_plugin(tmp_path: Path) -> None:
    path = tmp_path / "mx.toml"
    path.write_text('[plugins]\nload = ["no_such_module_xyz:Thing"]\n')
    with pytest.raises(ConfigError, match="plugins: plugin module 'no_such_module_xyz' failed to import"):
        bootstrap.load(path)
    path.write_text('[plugins]\nload = ["missing.py"]\n')
    with pytest.raises(ConfigError, match=r"missing\.py' does not exist"):
        bootstrap.load(path)


def test_entry_point_discovery(tmp_path: Path) -> None:
    """A real distribution with an entry point in group "mxgate" is found by `mxgate plugins`."""
    site = tmp_path / "site"
    (site / "ep_demo-1.0.dist-info").mkdir(parents=True)
    (site / "ep_demo-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-demo\nVersion: 1.0\n")
    (site / "ep_demo-1.0.dist-info" / "entry_points.txt").write_text("[mxgate]\nep_demo = ep_demo:Demo\n")
    (site / "ep_demo.py").write_text(
        textwrap.dedent("""
        from mxgate import hookimpl
        class Demo:
            '''Demo plugin from an entry point.'''
            priority = 7
            @hookimpl
            def mxgate_receive_on_connect(self):
                return None
    """)
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "mxgate", "plugins", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=tmp_path,
    ).stdout
    import json

    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["ep_demo"]["source"] == "entry point ep-demo"
    assert rows["ep_demo"]["priority"] == "7"
    assert rows["ep_demo"]["hooks"] == "receive_on_connect"


def test_the_public_api_exports_every_type_a_hook_passes_or_returns() -> None:
    """A plugin imports what its hooks see from ``mxgate`` alone (issue 20, item 8)."""
    import typing

    from cryptography import x509

    import mxgate
    from mxgate.core import hookspecs

    assert sorted(mxgate.__all__) == sorted(set(mxgate.__all__))
    assert all(hasattr(mxgate, name) for name in mxgate.__all__)
    seen: set[str] = set()
    for name in dir(hookspecs):
        if name.startswith("mxgate_"):
            hints = typing.get_type_hints(
                getattr(hookspecs, name),
                localns=vars(hookspecs) | vars(mxgate) | {"x509": x509},
            )
            for hint in hints.values():
                stack = [hint]
                while stack:
                    item = stack.pop()
                    stack.extend(typing.get_args(item))
                    if isinstance(item, type) and item.__module__.startswith("mxgate."):
                        seen.add(item.__name__)
    missing = seen - set(mxgate.__all__)
    assert not missing
    assert {"Runtime", "QueuedMessage", "AttemptContext", "AuthResult", "TlsOutcome"} <= seen
    for name in ("ConfigError", "QueuedRecipient", "MessageOptions", "RecipientStatus", "HostPolicy"):
        assert name in mxgate.__all__
    from mxgate.core.errors import ConfigError as InternalConfigError

    assert mxgate.ConfigError is InternalConfigError  # one class: a plugin's raise is caught as mxgate's own


async def test_a_categorizer_or_delivery_hook_that_raises_is_skipped(mxgate_gateway: Any, smtp_sink: Any) -> None:
    """docs/hooks.md, "When a hook raises": the error is logged and counted, the implementation is skipped as if
    it had answered None, and the message goes on (here: routed, resolved and delivered by the core's defaults)."""
    import asyncio
    import smtplib

    from mxgate import DeliveryReport, Destination, QueuedMessage, Route, TlsPolicy

    errors: list[tuple[str, str]] = []
    delivered: list[str] = []

    class Broken:
        name = "broken"
        priority = 1

        @hookimpl
        def mxgate_categorizer_resolve_recipient(self, recipient: Address) -> None:
            raise RuntimeError("alias table gone")

        @hookimpl
        def mxgate_categorizer_resolve_route(self, message: QueuedMessage) -> Route:
            raise RuntimeError("routing table gone")

        @hookimpl
        def mxgate_delivery_resolve_next_hop(self, destination: Destination) -> None:
            raise RuntimeError("no hops")

        @hookimpl
        def mxgate_delivery_resolve_tls_policy(self) -> TlsPolicy:
            raise RuntimeError("no policy")

        @hookimpl
        def mxgate_delivery_on_delivered(self, report: DeliveryReport) -> None:
            raise RuntimeError("audit log full")

        @hookimpl
        def mxgate_report_on_plugin_error(self, plugin: str, hook: str) -> None:
            errors.append((plugin, hook))

    class Later:
        @hookimpl
        def mxgate_delivery_on_delivered(self, report: DeliveryReport) -> None:
            delivered.append(report.recipient)

    sink = await smtp_sink()
    gw = await mxgate_gateway(
        f"""
        [server]
        accepted_domains = ["example.org"]
        [[outbound_connector]]
        name = "mailstore"
        recipient_domains = ["example.org"]
        smart_hosts = ["{sink.host}:{sink.port}"]
        tls = "none"
        """,
        extra_plugins=[("broken", Broken()), ("later", Later())],
    )

    def send() -> None:
        with smtplib.SMTP(gw.smtp_host, gw.smtp_port, timeout=30) as client:
            client.sendmail("a@example.net", ["user@example.org"], b"Subject: x\r\n\r\nhi\r\n")

    await asyncio.to_thread(send)
    (received,) = await sink.wait_for(1, timeout=30)
    assert received.rcpt_tos == ("user@example.org",)
    async with asyncio.timeout(30):
        while not delivered:
            await asyncio.sleep(0.05)
    assert delivered == ["user@example.org"]  # a later implementation of the same hook still runs
    hooks = (
        "mxgate_categorizer_resolve_recipient",
        "mxgate_categorizer_resolve_route",
        "mxgate_delivery_resolve_next_hop",
        "mxgate_delivery_resolve_tls_policy",
        "mxgate_delivery_on_delivered",
    )
    assert sorted(errors) == sorted(("broken", hook) for hook in hooks)
    stats = gw.runtime.hooks.dispatcher.stats
    assert all(stats[("broken", hook)].errors == 1 for hook in hooks)


async def test_mxgate_gateway_loads_a_plugin_file_as_its_docstring_says(mxgate_gateway: Any, tmp_path: Path) -> None:
    """mxgate.testing.gateway's example: an absolute ``.py`` path in ``load`` (or the object in extra_plugins);
    a relative one is refused with the reason, not "plugin file ... does not exist" in a temporary directory."""
    from mxgate.testing import gateway

    assert 'load = ["{Path(__file__).with_name("my_plugin.py")}:MyPlugin"]' in (gateway.__doc__ or "")
    plugin_file = tmp_path / "my_plugin.py"
    plugin_file.write_text(
        "from mxgate import hookimpl\n\n"
        "class MyPlugin:\n"
        "    name = 'my_plugin'\n\n"
        "    @hookimpl\n"
        "    def mxgate_receive_on_connect(self):\n"
        "        return None\n"
    )
    gw = await mxgate_gateway(f'[plugins]\nload = ["{plugin_file}:MyPlugin"]\n')
    assert "my_plugin" in gw.runtime.plugins.names()
    # the defaults the docstring lists
    assert [c.name for c in gw.runtime.config.inbound_connector] == ["localhost"]
    assert [c.name for c in gw.runtime.config.outbound_connector] == ["internet"]
    with pytest.raises(ValueError, match=r"plugin path 'my_plugin.py' is relative.*absolute path"):
        await mxgate_gateway('[plugins]\nload = ["my_plugin.py:MyPlugin"]\n')


@pytest.mark.parametrize(
    ("name", "a_test"),
    [
        ("header-stamp", "test_accepted_mail_arrives_stamped"),
        ("route-by-header", "test_trusted_mail_goes_where_its_header_says"),
    ],
)
def test_the_pytest_plugin_registers_the_integration_marker(name: str, a_test: str) -> None:
    """The example plugins' tests use ``@pytest.mark.integration``; run on their own (its pyproject, not mxgate's)
    under --strict-markers, they collect because mxgate's pytest plugin registers the marker."""
    example = ROOT / "examples" / name
    args = ["-c", "pyproject.toml", "--rootdir", ".", "--strict-markers", "-p", "no:cacheprovider", "--collect-only"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *args, "-q", "tests"],
        cwd=example,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert a_test in proc.stdout


ARCHIVE_PLUGIN = """
from dataclasses import dataclass

from mxgate import setting, hookimpl


@dataclass(frozen=True)
class ArchiveConfig:
    connector: str = setting("archive", desc="The outbound connector archived copies go through.")


def check(section, config):
    if config.outbound(section.connector) is None:
        yield ("connector", f"{section.connector!r} is not an outbound connector")
    if section.connector == "boom":
        raise RuntimeError("bad check")


class Archive:
    name = "archive"

    @hookimpl
    def mxgate_lifecycle_register_config(self, registry):
        registry.add_section("archive", ArchiveConfig, owner=self.name, validate=check)
"""


def test_a_section_level_check_runs_in_config_check_and_at_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A setting that names another section: ``add_section(..., validate=)`` finds the mistake in ``config check``
    (one line naming file and key) and ``bootstrap.load`` refuses it the same way, instead of a start-up traceback."""
    from mxgate.core.cli import main

    plugin = tmp_path / "archive.py"
    plugin.write_text(ARCHIVE_PLUGIN)
    path = tmp_path / "mx.toml"
    head = f'[server]\nstate_dir = "{tmp_path / "var"}"\n[plugins]\nload = ["{plugin}:Archive"]\n'
    connector = '[[outbound_connector]]\nname = "vault"\nrecipient_domains = ["*"]\nuse_mx = true\n'
    path.write_text(head + '[plugins.archive]\nconnector = "valut"\n' + connector)
    assert main(["config", "check", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    problem = f"{path}: plugins.archive.connector: 'valut' is not an outbound connector"
    assert err == [f"error: {problem}", "mxgate: 1 configuration error(s)"]
    with pytest.raises(ConfigError, match=r"plugins\.archive\.connector: 'valut' is not an outbound connector"):
        bootstrap.load(path)
    # the default is checked too when the section is absent ("archive" does not exist either)
    path.write_text(head + connector)
    with pytest.raises(ConfigError, match=r"plugins\.archive\.connector: 'archive' is not an outbound connector"):
        bootstrap.load(path)
    # a check that raises is one problem, not a traceback
    path.write_text(head + '[plugins.archive]\nconnector = "boom"\n' + connector)
    with pytest.raises(ConfigError, match=r"plugins\.archive: its check failed: RuntimeError\('bad check'\)"):
        bootstrap.load(path)
    path.write_text(head + '[plugins.archive]\nconnector = "vault"\n' + connector)
    config, _ = bootstrap.load(path)
    assert config.plugin_sections["archive"].connector == "vault"
    assert main(["config", "check", str(path)]) == 0
