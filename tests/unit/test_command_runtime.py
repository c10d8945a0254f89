"""``mxgate.command_runtime``: the Runtime a plugin's command works with (role ``command``, a resolver from
``[dns]``, plugins started and, on the way out, their tasks cancelled and ``on_shutdown`` run)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mxgate import ROLE_COMMAND, Resolver, Runtime, command_runtime, hookimpl
from mxgate.core import engine


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
    config, plugins = engine.load(tmp_path / "mx.toml", entry_points=False, extra_plugins=[("watch", watch)])
    with pytest.raises(LookupError):
        async with command_runtime(config, plugins) as runtime:
            assert runtime.role == ROLE_COMMAND
            assert isinstance(runtime.resolver, Resolver)
            assert [str(ep) for ep in runtime.resolver.endpoints] == ["127.0.0.1:5399"]
            assert watch.seen == [f"startup {ROLE_COMMAND}"]
            raise LookupError("the command failed")  # shut down all the same
    assert watch.seen == [f"startup {ROLE_COMMAND}", "shutdown, task cancelled: True"]
