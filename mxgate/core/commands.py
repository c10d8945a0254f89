"""What a command needs, for the core's own commands and plugins' alike (``mxgate_lifecycle_register_commands``).

A leaf of the command line: ``cli.py`` builds the parser and imports every command module; command modules import
only this, so no command module imports the command line that imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
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
async def command_runtime(config: Config, plugins: PluginSet) -> AsyncIterator[Runtime]:
    """The :class:`~mxgate.core.runtime.Runtime` a command works with, as delivery would see it: role
    ``command`` (plugins set up what delivery needs and start no listener, endpoint or background service), a
    resolver from ``[dns]``, every plugin's ``on_startup`` run; on exit their tasks are cancelled and
    ``on_shutdown`` runs. Commands that decide through hooks (``runtime.hooks.resolve_next_hop``...) use this.
    """
    from mxgate.core.dns import resolver_from_config
    from mxgate.core.runtime import ROLE_COMMAND, Runtime

    runtime = Runtime.create(config, plugins, role=ROLE_COMMAND)
    runtime.resolver = resolver_from_config(config.dns)
    await runtime.hooks.on_startup(runtime)
    try:
        yield runtime
    finally:
        for task in runtime.tasks:
            task.cancel()
        await asyncio.gather(*runtime.tasks, return_exceptions=True)
        await runtime.hooks.on_shutdown(runtime)
        runtime.tracking.close()
