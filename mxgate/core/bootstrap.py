"""Starting a process of the gateway, shared by the main process (:mod:`mxgate.core.engine`), its receive workers
(:mod:`mxgate.core.workers`) and commands (:func:`mxgate.core.commands.load_from_args`): read the configuration,
load the plugins it names, check the state directory, open the services a :class:`Runtime` needs, run the loop.

A leaf of the lifecycle: it imports no module that starts listeners, workers or commands.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from mxgate.core.auth import AUTH_FAILURES
from mxgate.core.cluster import Cluster
from mxgate.core.cluster_db import collect_migrations
from mxgate.core.config import (
    BUILTIN_SOURCE,
    DEFAULT_DOCUMENT,
    Config,
    build_config,
    parse_toml,
    plugins_section,
    read_text,
)
from mxgate.core.dns import resolver_from_config
from mxgate.core.errors import ConfigError, PluginError, StateError
from mxgate.core.files import private_dir
from mxgate.core.plugins import Dispatcher, PluginSet, build_plugins, collect_registry
from mxgate.core.queue.store import QueueStore
from mxgate.core.runtime import Runtime


@dataclass(frozen=True, slots=True)
class Source:
    """A configuration as read once: its TOML text (None: the built-in default), the file name errors give, and
    the directory relative paths start from. Receive workers are started from the main process's Source, so every
    process of one gateway runs the same configuration even if the file changes on disk meanwhile."""

    text: str | None
    file: str = BUILTIN_SOURCE
    base_dir: str = "."


def read_source(path: str | Path | None) -> Source:
    if path is None:
        return Source(None)
    p = Path(path)
    return Source(read_text(p), str(p), str(p.parent))


def load(
    path: str | Path | None,
    *,
    entry_points: bool = True,
    extra_plugins: Sequence[tuple[str, Any]] = (),
    check_files: bool = True,
) -> tuple[Config, PluginSet]:
    """Read a config file (or the built-in default), load the plugins it names, validate it with their schema."""
    return load_source(
        read_source(path), entry_points=entry_points, extra_plugins=extra_plugins, check_files=check_files
    )


def load_source(
    source: Source,
    *,
    entry_points: bool = True,
    extra_plugins: Sequence[tuple[str, Any]] = (),
    check_files: bool = True,
) -> tuple[Config, PluginSet]:
    """:func:`load` from text already read."""
    file, base = source.file, Path(source.base_dir)
    document = DEFAULT_DOCUMENT if source.text is None else parse_toml(source.text, file)
    plugin_conf = plugins_section(document, file)
    try:
        plugins = build_plugins(
            load=plugin_conf.load,
            disable=plugin_conf.disable,
            priority=plugin_conf.priority,
            base_dir=base,
            entry_points=entry_points,
            extra=extra_plugins,
        )
    except PluginError as exc:
        raise ConfigError.single(file, "plugins", str(exc)) from exc
    registry = collect_registry(Dispatcher(plugins))
    config = build_config(document, file=file, registry=registry, base_dir=str(base), check_files=check_files)
    return config, plugins


def check_state_dir(path: Path) -> None:
    """A clear start-up error rather than a traceback deep in SQLite."""
    try:
        private_dir(path)
    except OSError as exc:
        raise StateError(f"state directory {str(path)!r} cannot be created: {exc.strerror}") from exc
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise StateError(f"state directory {str(path)!r} is not readable and writable by this user")
    probe = path / ".write-test"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise StateError(f"state directory {str(path)!r} is not writable: {exc.strerror}") from exc


async def open_services(runtime: Runtime, *, queue: bool = True) -> None:
    """The resolver and (unless ``queue`` is false: a receive worker, whose messages the main process queues)
    the queue store, before ``on_startup``."""
    try:
        runtime.resolver = resolver_from_config(
            runtime.config.dns,
            observer=lambda answer, seconds: runtime.hooks.emit(
                "dns_lookup", seconds, rdtype=answer.rdtype, status=str(answer.status), result=str(answer.kind)
            ),
        )
    except ValueError as exc:
        raise ConfigError.single(runtime.config.source, "dns.resolvers", str(exc)) from exc
    if queue:
        runtime.queue = await QueueStore.open(runtime.config.state_path)
    if runtime.config.cluster.database:
        cluster = Cluster(
            runtime.config.cluster,
            collect_migrations(runtime.hooks.dispatcher),
            clock=runtime.clock,
            emit=runtime.hooks.on_event,
        )
        try:
            await cluster.check_schema()
        except BaseException:
            await cluster.close()
            raise
        runtime.cluster = cluster
        limiter = cluster.start_auth_limiter()  # AUTH failures count on every node (receive workers too)
        runtime.stash[AUTH_FAILURES] = limiter
        runtime.tasks.append(asyncio.ensure_future(limiter.run_sync()))


# Young-generation threshold for the cyclic garbage collector while serving (CPython's default is 700). Mail
# handling allocates many short-lived objects that reference counting frees; with the default, collections took
# ~5% of the event loop's time under load (bench/RESULTS.md), and about a tenth of that with this and gc.freeze().
GC_THRESHOLD: Final = (7000, 20, 100)


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run a process's main coroutine (the gateway's or a receive worker's) as described for :func:`run`."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    try:
        import uvloop  # optional (the speed extra)

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(main)
