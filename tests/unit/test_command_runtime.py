"""``command_runtime``: the runtime a one-shot command gets — ``ROLE_COMMAND``, the queue open only when asked (and
then ``submit`` is the same door the gateway uses), DNS only when asked, everything closed on exit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import tomli_w

from mxgate import ROLE_COMMAND, command_runtime
from mxgate.core import engine
from mxgate.core.config import Config
from mxgate.core.plugins import PluginSet
from mxgate.core.queue.store import QueueStore
from mxgate.testing.gateway import build_document


def load(tmp_path: Path) -> tuple[Config, PluginSet]:
    path = tmp_path / "mxgate.toml"
    path.write_text(tomli_w.dumps(build_document("", tmp_path)), encoding="utf-8")
    return engine.load(path, entry_points=False)


def test_submit_puts_into_the_queue_and_everything_is_closed(tmp_path: Path) -> None:
    config, plugins = load(tmp_path)

    async def run() -> str:
        async with command_runtime(config, plugins, queue=True, resolver=True, clock=lambda: 1e9) as runtime:
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
        async with command_runtime(config, plugins) as runtime:
            assert runtime.queue is None and runtime.resolver is None
            with pytest.raises(RuntimeError, match="no queue store"):
                await runtime.submit("a@example.org", ["b@example.net"], b"x\r\n", now=1.0)

    asyncio.run(run())
