"""What a command needs, for the core's own commands and plugins' alike (``mxgate_lifecycle_register_commands``).

A leaf of the command line: command modules import this (and :mod:`mxgate.core.bootstrap`, which loads a
configuration), never the command line (:mod:`mxgate.core.cli`) that calls them.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Final

from mxgate.core import bootstrap

if TYPE_CHECKING:
    from mxgate.core.config import Config
    from mxgate.core.plugins import PluginSet

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
    return bootstrap.load(config_path(args))
