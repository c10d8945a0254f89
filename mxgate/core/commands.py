"""What a command needs, for the core's own commands and plugins' alike (``mxgate_lifecycle_register_commands``).

A leaf of the command line: ``cli.py`` builds the parser and imports every command module; command modules import
only this, so no command module imports the command line that imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from mxgate.core.config import Config
    from mxgate.core.plugins import PluginSet
    from mxgate.core.runtime import Runtime

ENV_CONFIG: Final = "MXGATE_CONFIG"


def add_config_arg(p: argparse.ArgumentParser) -> None:
    """Give a (sub)command the ``-c/--config FILE`` option."""
    p.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"configuration file (default: ${ENV_CONFIG}, else the built-in default)",
    )


def config_path(args: argparse.Namespace) -> str | None:
    """The configuration file a command was given: ``-c``, a positional ``file``, else ``$MXGATE_CONFIG``."""
    path = getattr(args, "config", None) or getattr(args, "file", None) or os.environ.get(ENV_CONFIG)
    return path or None


def load_from_args(args: argparse.Namespace) -> tuple[Config, PluginSet]:
    """``(config, plugins)`` for the file the operator named; a bad file raises ``ConfigError`` naming the key."""
    from mxgate.core import engine  # the engine loads plugins, which may import this module

    return engine.load(config_path(args))


@contextlib.asynccontextmanager
async def command_runtime(
    config: Config,
    plugins: PluginSet,
    *,
    start: bool = True,
    resolver: bool = True,
    queue: bool = False,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[Runtime]:
    """The :class:`~mxgate.core.runtime.Runtime` a one-shot command works with, as delivery would see it: role
    ``command`` (plugins set up what delivery needs and start no listener, endpoint or background service),
    possibly next to a running gateway on the same state directory. What it opened is closed on exit, also when
    the command fails. Commands that decide through hooks (``runtime.hooks.resolve_next_hop``...) use this.

    :param start: run every plugin's ``on_startup`` now; on exit their ``runtime.tasks`` are cancelled and
        ``on_shutdown`` runs. A command that only reads its own plugin's store passes ``False``.
    :param resolver: set ``runtime.resolver`` from ``[dns]``.
    :param queue: open this node's queue, leases left alone (a running gateway's deliveries go on), so that
        ``runtime.submit`` puts into it: the same door the gateway's own messages take.

    In cluster mode ``runtime.cluster`` is set (``cluster.database(name)`` opens a store connection), with no
    heartbeat or schema check: the database may be away, and each store says so when used."""
    from mxgate.core.runtime import ROLE_COMMAND, Runtime

    runtime = Runtime.create(config, plugins, clock=clock, role=ROLE_COMMAND)
    started = False
    try:
        if resolver:
            from mxgate.core.dns import resolver_from_config

            runtime.resolver = resolver_from_config(config.dns)
        if queue:
            from mxgate.core.queue.store import QueueStore

            runtime.queue = await QueueStore.open(config.state_path, release_leases=False)
        if config.cluster.database:
            from mxgate.core.cluster import Cluster, collect_migrations

            runtime.cluster = Cluster(config.cluster, collect_migrations(runtime.hooks.dispatcher), clock=clock)
        if start:
            started = True
            await runtime.hooks.on_startup(runtime)
        yield runtime
    finally:
        if started:
            for task in runtime.tasks:
                task.cancel()
            await asyncio.gather(*runtime.tasks, return_exceptions=True)
            await runtime.hooks.on_shutdown(runtime)
        if runtime.cluster is not None:
            await runtime.cluster.close()
        if runtime.queue is not None:
            await runtime.queue.close()
        runtime.tracking.close()
