"""The gateway's lifecycle (aiohttp's Application/Runner/Site): load and freeze config and plugins, start
services, serve, drain on stop, then ``on_shutdown``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from mxgate.core.config import (
    BUILTIN_SOURCE,
    DEFAULT_DOCUMENT,
    Config,
    build_config,
    plugins_section,
    read_toml,
)
from mxgate.core.errors import ConfigError, PluginError, StateError
from mxgate.core.plugins import Dispatcher, PluginSet, build_plugins, collect_registry
from mxgate.core.runtime import Runtime

log = logging.getLogger(__name__)


def load(
    path: str | Path | None,
    *,
    entry_points: bool = True,
    extra_plugins: Sequence[tuple[str, Any]] = (),
    check_files: bool = True,
) -> tuple[Config, PluginSet]:
    """Read a config file (or the built-in default), load the plugins it names, validate it with their schema."""
    if path is None:
        document, file, base = DEFAULT_DOCUMENT, BUILTIN_SOURCE, Path(".")
    else:
        p = Path(path)
        document, file, base = read_toml(p), str(p), p.parent
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
        path.mkdir(parents=True, exist_ok=True)
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


class Gateway:
    """One running mxgate: listeners, queue, scheduler, plugins."""

    def __init__(self, config: Config, plugins: PluginSet) -> None:
        self.config = config
        self.plugins = plugins
        self.runtime: Runtime | None = None
        self.servers: list[Any] = []
        self.scheduler: Any = None
        self._stopping = asyncio.Event()

    async def start(self) -> Runtime:
        from mxgate.core.dns import resolver_from_config
        from mxgate.core.queue.scheduler import Scheduler
        from mxgate.core.queue.store import QueueStore
        from mxgate.core.smtp.server import start_listeners

        check_state_dir(self.config.state_path)
        runtime = Runtime.create(self.config, self.plugins)
        self.runtime = runtime
        try:
            runtime.resolver = resolver_from_config(
                self.config.dns,
                observer=lambda answer, seconds: runtime.hooks.emit(
                    "dns_lookup", seconds, rdtype=answer.rdtype, status=str(answer.status), result=str(answer.kind)
                ),
            )
        except ValueError as exc:
            raise ConfigError.single(self.config.source, "dns.resolvers", str(exc)) from exc
        runtime.queue = await QueueStore.open(self.config.state_path)
        scheduler = Scheduler(runtime)
        self.scheduler = scheduler
        runtime.wakeup = scheduler.wakeup
        runtime.enqueue = scheduler.enqueue
        await runtime.hooks.on_startup(runtime)
        runtime.tasks.append(asyncio.ensure_future(scheduler.run()))
        self.servers = await start_listeners(runtime)
        for lst in self.config.listener:
            log.info("listening", extra={"listener": lst.name, "address": lst.address})
        return runtime

    async def stop(self, timeout: float = 30.0) -> None:
        runtime = self.runtime
        for server in self.servers:
            server.close()
        for server in self.servers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), timeout)
        self.servers = []
        if runtime is None:
            return
        if self.scheduler is not None:
            # In-flight attempts finish (bounded) before anything is cancelled: no duplicate after a clean stop.
            await self.scheduler.stop(timeout)
            self.scheduler = None
        for task in runtime.tasks:
            task.cancel()
        await asyncio.gather(*runtime.tasks, return_exceptions=True)
        await runtime.hooks.on_shutdown(runtime)
        if runtime.queue is not None:
            await runtime.queue.close()
        runtime.tracking.close()
        self.runtime = None

    async def serve_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        try:
            await self._stopping.wait()
        finally:
            log.info("stopping")
            await self.stop()


# Young-generation threshold for the cyclic garbage collector while serving (CPython's default is 700). Mail
# handling allocates many short-lived objects that reference counting frees; with the default, collections took
# ~5% of the event loop's time under load (bench/RESULTS.md), and about a tenth of that with this and gc.freeze().
GC_THRESHOLD: Final = (7000, 20, 100)


def run(config: Config, plugins: PluginSet) -> None:
    """``mxgate run``: uvloop when installed, else asyncio. What start-up built (modules, configuration, plugins)
    is moved out of the collector's sight (``gc.freeze``) and the collector runs less often: the objects of a
    running gateway are short-lived and acyclic, freed by reference counting."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(Gateway(config, plugins).serve_forever())
