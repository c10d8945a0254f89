"""A real gateway for tests: write a config, start :class:`mxgate.core.engine.Gateway` in the test's event loop,
stop it afterwards.

Fixture ``mxgate_gateway`` (async factory; the test is ``async def``, run by pytest-asyncio: mark it
``@pytest.mark.asyncio`` unless your project sets ``asyncio_mode = "auto"``)::

    from pathlib import Path

    from my_plugin import MyPlugin

    async def test_stamp(mxgate_gateway):
        gw = await mxgate_gateway(extra_plugins=[("my_plugin", MyPlugin())])   # the plugin object, or:
        gw = await mxgate_gateway(f'''
            [plugins]
            load = ["{Path(__file__).with_name("my_plugin.py")}:MyPlugin"]
        ''')
        # gw.smtp_host, gw.smtp_port, gw.metrics_port, gw.runtime, gw.state_dir, gw.config_path

A ``.py`` path in ``[plugins] load`` must be absolute: the config is written to a temporary directory, which is
what a relative path would be resolved against (a relative one is refused with that explanation).

The config text is merged over these defaults (tables merge key by key; an array of tables you give, such as
``[[outbound_connector]]``, replaces the default one):

- ``[server]``: ``hostname = "mx.gateway.test"``, ``state_dir`` in the test's ``tmp_path``, ``receive_workers = 0``
  (one process);
- ``[[listener]]`` ``smtp`` on ``127.0.0.1`` and a free port;
- ``[[inbound_connector]]`` ``localhost``: ``sender_ips = ["127.0.0.0/8"]``, ``may_relay = true`` (the test
  client may relay);
- ``[[outbound_connector]]`` ``internet``: ``recipient_domains = ["*"]``, ``use_mx = true``;
- ``[dns] resolvers``: a closed loopback port, ``timeout = 0.5`` (nothing leaves the machine unless the test
  points it at the DNS lab);
- ``[metrics] listen``: a free loopback port.

Entry-point plugins are not loaded (only the built-ins, ``load`` and ``extra_plugins``).
"""

from __future__ import annotations

import contextlib
import socket
import textwrap
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_asyncio
import tomli_w

from mxgate.core import bootstrap, engine
from mxgate.core.runtime import Runtime

FIXTURES = ("mxgate_gateway",)


def free_port(host: str = "127.0.0.1", *also: str) -> int:
    """A TCP port free on ``host`` and on every address in ``also`` (several MX hosts on 127.0.0.x that share one
    SMTP port, as a connector's ``mx_port`` wants)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if all(_bindable(other, port) for other in also):
            return port
    raise RuntimeError(f"no TCP port free on every address of {[host, *also]}")


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class TestGateway:
    """A started gateway and where to reach it."""

    __test__ = False

    gateway: engine.Gateway
    runtime: Runtime
    config_path: Path
    smtp_host: str
    smtp_port: int
    metrics_port: int | None
    state_dir: Path


def delivery_config(directory: Path, connectors: str, *, hostname: str = "gw.sender.test") -> Path:
    """Write ``directory/mxgate.toml`` for tests that drive the queue and delivery without serving: state in
    ``directory/var``, a listener that is never started, metrics off, ``connectors`` (TOML) appended."""
    path = directory / "mxgate.toml"
    head = f"""
        [server]
        hostname = "{hostname}"
        state_dir = "{directory / "var"}"
        receive_workers = 0
        [[listener]]
        name = "smtp"
        address = "127.0.0.1:1"
        [metrics]
        listen = ""
        """
    path.write_text(textwrap.dedent(head) + textwrap.dedent(connectors), encoding="utf-8")
    return path


def build_document(extra_toml: str, tmp_path: Path) -> dict[str, Any]:
    """The test defaults merged under ``extra_toml`` (tables merge; arrays of tables in extra replace).

    One process unless a test asks for receive workers (``[server] receive_workers = N``): the default "auto"
    depends on the machine, and a test must mean the same everywhere."""
    smtp_port = free_port()
    base: dict[str, Any] = {
        "server": {"hostname": "mx.gateway.test", "state_dir": str(tmp_path / "var"), "receive_workers": 0},
        "listener": [{"name": "smtp", "address": f"127.0.0.1:{smtp_port}"}],
        "inbound_connector": [{"name": "localhost", "sender_ips": ["127.0.0.0/8"], "may_relay": True}],
        "outbound_connector": [{"name": "internet", "recipient_domains": ["*"], "use_mx": True}],
        "dns": {"resolvers": [f"127.0.0.1:{free_port()}"], "timeout": 0.5},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
    }
    extra = tomllib.loads(textwrap.dedent(extra_toml))
    for spec in extra.get("plugins", {}).get("load", ()):
        target = str(spec).partition(":")[0]
        if target.endswith(".py") and not Path(target).is_absolute():
            raise ValueError(
                f"mxgate_gateway: plugin path {target!r} is relative, and the test config is written to {tmp_path}: "
                'give an absolute path (e.g. Path(__file__).with_name("my_plugin.py")) or pass the plugin object '
                "with extra_plugins"
            )
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


@contextlib.asynccontextmanager
async def running_gateway(
    extra_toml: str, tmp_path: Path, *, extra_plugins: Sequence[tuple[str, Any]] = ()
) -> AsyncIterator[TestGateway]:
    document = build_document(extra_toml, tmp_path)
    path = tmp_path / "mxgate.toml"
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    config, plugins = bootstrap.load(path, entry_points=False, extra_plugins=extra_plugins)
    gateway = engine.Gateway(config, plugins)
    runtime = await gateway.start()
    listener = config.listener[0]
    metrics = config.metrics.listen
    try:
        yield TestGateway(
            gateway,
            runtime,
            path,
            listener.host,
            listener.port,
            int(metrics.rsplit(":", 1)[1]) if metrics else None,
            config.state_path,
        )
    finally:
        await gateway.stop(timeout=5.0)


@pytest_asyncio.fixture
async def mxgate_gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[TestGateway]]]:
    """Async factory: ``await mxgate_gateway(extra_toml, extra_plugins=[...])`` returns a started gateway."""
    stack = contextlib.AsyncExitStack()
    counter = 0

    async def start(extra_toml: str = "", *, extra_plugins: Sequence[tuple[str, Any]] = ()) -> TestGateway:
        nonlocal counter
        counter += 1
        directory = tmp_path / f"gw{counter}"
        directory.mkdir()
        return await stack.enter_async_context(running_gateway(extra_toml, directory, extra_plugins=extra_plugins))

    async with stack:
        yield start
