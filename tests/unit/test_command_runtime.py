"""``command_runtime``: the runtime a one-shot command gets — ``ROLE_COMMAND``, plugins started unless told not to
(their tasks cancelled and ``on_shutdown`` run on the way out), the queue open only when asked (and then ``submit``
is the same door the gateway uses), DNS from ``[dns]`` unless told not to, everything closed on exit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import tomli_w

from mxgate import ROLE_COMMAND, Resolver, Runtime, command_runtime, hookimpl
from mxgate.core import bootstrap
from mxgate.core.config import Config
from mxgate.core.plugins import PluginSet
from mxgate.core.queue.store import QueueStore
from mxgate.testing.gateway import build_document


def load(tmp_path: Path) -> tuple[Config, PluginSet]:
    path = tmp_path / "mxgate.toml"
    path.write_text(tomli_w.dumps(build_document("", tmp_path)), encoding="utf-8")
    return bootstrap.load(path, entry_points=False)


def test_submit_puts_into_the_queue_and_everything_is_closed(tmp_path: Path) -> None:
    config, plugins = load(tmp_path)

    async def run() -> str:
        async with command_runtime(config, plugins, start=False, queue=True, clock=lambda: 1e9) as runtime:
            assert runtime.role == ROLE_COMMAND
            assert runtime.resolver is not None and runtime.cluster is None
            queue_id = await runtime.submit("a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n", now=1e9)
            queue = runtime.queue
        assert queue is not None
        with pytest.raises(Exception):  # noqa: B017 - closed: any use fails
            await queue.list()
        return queue_id

    queue_id = asyncio.run(run())

    async def check() -> None:
        queue = await QueueStore.open(config.state_path)
        try:
            (queued,) = await queue.list()
            assert queued.id == queue_id and queued.sender == "a@example.org"
        finally:
            await queue.close()

    asyncio.run(check())


def test_without_a_queue_submit_refuses(tmp_path: Path) -> None:
    config, plugins = load(tmp_path)

    async def run() -> None:
        async with command_runtime(config, plugins, start=False, resolver=False) as runtime:
            assert runtime.queue is None and runtime.resolver is None
            with pytest.raises(RuntimeError, match="no queue store"):
                await runtime.submit("a@example.org", ["b@example.net"], b"x\r\n", now=1.0)

    asyncio.run(run())


class Watch:
    name = "watch"

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.task: asyncio.Future[None] | None = None

    @hookimpl
    def mxgate_lifecycle_on_startup(self, runtime: Runtime) -> None:
        self.seen.append(f"startup {runtime.role}")
        self.task = asyncio.ensure_future(asyncio.sleep(3600))
        runtime.tasks.append(self.task)

    @hookimpl
    def mxgate_lifecycle_on_shutdown(self, runtime: Runtime) -> None:
        self.seen.append(f"shutdown, task cancelled: {self.task is not None and self.task.cancelled()}")


async def test_a_command_runtime_starts_and_stops_the_plugins(tmp_path: Path) -> None:
    (tmp_path / "mx.toml").write_text(
        f'[server]\nstate_dir = "{tmp_path / "var"}"\n[dns]\nresolvers = ["127.0.0.1:5399"]\n'
    )
    watch = Watch()
    config, plugins = bootstrap.load(tmp_path / "mx.toml", entry_points=False, extra_plugins=[("watch", watch)])
    with pytest.raises(LookupError):
        async with command_runtime(config, plugins) as runtime:
            assert runtime.role == ROLE_COMMAND
            assert isinstance(runtime.resolver, Resolver)
            assert [str(ep) for ep in runtime.resolver.endpoints] == ["127.0.0.1:5399"]
            assert watch.seen == [f"startup {ROLE_COMMAND}"]
            raise LookupError("the command failed")  # shut down all the same
    assert watch.seen == [f"startup {ROLE_COMMAND}", "shutdown, task cancelled: True"]


def test_runtime_says_what_a_process_does() -> None:
    """The plugin asks ``runtime.delivers`` / ``runtime.runs_services`` rather than comparing role constants."""
    from types import SimpleNamespace

    from mxgate import Runtime

    expected = {"main": (True, True), "command": (True, False), "receiver": (False, False)}
    for role, (delivers, services) in expected.items():
        probe = SimpleNamespace(role=role)
        assert Runtime.delivers.fget(probe) is delivers, role  # type: ignore[attr-defined]
        assert Runtime.runs_services.fget(probe) is services, role  # type: ignore[attr-defined]
