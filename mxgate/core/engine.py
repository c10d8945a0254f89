"""The gateway's lifecycle (aiohttp's Application/Runner/Site): load and freeze config and plugins, start
services, serve, drain on stop, then ``on_shutdown``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from mxgate.core import service
from mxgate.core.config import (
    BUILTIN_SOURCE,
    DEFAULT_DOCUMENT,
    Config,
    advisories,
    build_config,
    parse_toml,
    plugins_section,
    read_text,
)
from mxgate.core.errors import ConfigError, MxgateError, PluginError, StartupError, StateError
from mxgate.core.files import private_dir, state_dir_problem
from mxgate.core.plugins import Dispatcher, HookCallError, PluginSet, build_plugins, collect_registry
from mxgate.core.runtime import Runtime

log = logging.getLogger(__name__)


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
    from mxgate.core.dns import resolver_from_config
    from mxgate.core.queue.store import QueueStore

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
        from mxgate.core.cluster import Cluster, collect_migrations

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
        from mxgate.core.smtp.server import AUTH_FAILURES

        limiter = cluster.start_auth_limiter()  # AUTH failures count on every node (receive workers too)
        runtime.stash[AUTH_FAILURES] = limiter
        runtime.tasks.append(asyncio.ensure_future(limiter.run_sync()))


def startup_failure(exc: HookCallError) -> StartupError:
    """A plugin that could not start, in one line: an OS error (a busy port, a missing file) says what and where;
    anything else is a bug, whose traceback goes to the log."""
    error = exc.error
    if isinstance(error, OSError):
        reason = str(error) if error.errno is None or not error.strerror else error.strerror.lower()
        where = error.filename or ""
        text = str(error)
        if "address" in text:  # asyncio's bind errors name the address only in their text
            reason = text.split("] ", 1)[-1]
        return StartupError(f"plugin {exc.plugin}: cannot start: {where + ': ' if where else ''}{reason}")
    if isinstance(error, MxgateError):
        return StartupError(f"plugin {exc.plugin}: cannot start: {error}")
    log.error("plugin failed to start", exc_info=error, extra={"plugin": exc.plugin})
    return StartupError(f"plugin {exc.plugin}: cannot start: {error!r} (traceback in the log)")


class Gateway:
    """One running mxgate: listeners, queue, scheduler, plugins; and its receive workers when configured
    (``server.receive_workers``; they are started from ``source``, the configuration text this process read)."""

    def __init__(self, config: Config, plugins: PluginSet, *, source: Source | None = None) -> None:
        self.config = config
        self.plugins = plugins
        self.source = source
        self.runtime: Runtime | None = None
        self.servers: list[Any] = []
        self.scheduler: Any = None
        self.workers: Any = None
        self.lock: service.StateLock | None = None
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[Any]] = set()
        self._shipper: Any = None  # cluster mode: ships the tracking log
        self._stopping = asyncio.Event()

    async def start(self) -> Runtime:
        from mxgate.core.queue.scheduler import Scheduler
        from mxgate.core.smtp.server import start_listeners
        from mxgate.core.workers import ReceiveWorkers

        server = self.config.server
        # "auto" in a gateway built in-process (tests, embedding) means none: only `mxgate run` can start workers
        count = 0 if server.receive_workers == "auto" and self.source is None else server.receive_worker_count
        if count and self.source is None:
            raise ConfigError.single(
                self.config.source,
                "server.receive_workers",
                "receive workers are started by `mxgate run` (this gateway was built in-process); expected 0",
            )
        check_state_dir(self.config.state_path)
        problem = state_dir_problem(self.config.state_path)
        if problem:
            log.warning(problem)
        for advice in advisories(self.config):
            log.warning(advice)
        lock = service.StateLock(self.config.state_path)
        lock.acquire()
        self.lock = lock
        try:
            # systemd's sockets; as root with server.user: bound, state directory handed over, root dropped
            sockets = service.prepare(self.config)
        except BaseException:
            lock.release()
            raise
        runtime = Runtime.create(self.config, self.plugins)
        self.runtime = runtime
        await open_services(runtime)
        scheduler = Scheduler(runtime)
        self.scheduler = scheduler
        runtime.wakeup = scheduler.wakeup
        runtime.enqueue = scheduler.enqueue
        if runtime.cluster is not None:
            from mxgate.core.cluster_tracking import TrackingShipper

            queue = runtime.queue
            if queue is not None:
                from mxgate.core.cluster import queue_summary

                async def summary() -> dict[str, Any]:
                    return queue_summary(await queue.counts(now=runtime.clock()))

                runtime.cluster.queue_summary = summary
            await runtime.cluster.heartbeat()
            runtime.tasks.append(asyncio.ensure_future(runtime.cluster.run_heartbeat()))
            if self.config.server.tracking_log:
                shipper = TrackingShipper(
                    runtime.cluster.database("tracking"),
                    self.config.state_path,
                    retention_days=self.config.cluster.tracking_retention_days,
                )
                self._shipper = shipper
                runtime.tasks.append(asyncio.ensure_future(shipper.run()))
        try:
            await runtime.hooks.on_startup(runtime)
        except HookCallError as exc:
            raise startup_failure(exc) from None
        runtime.tasks.append(asyncio.ensure_future(scheduler.run()))
        # With receive workers the main process binds the listeners and hands them over: it accepts nothing
        # itself (measured: when it did, the kernel gave it most connections and its loop, which also delivers,
        # was the bottleneck while the worker idled at a third of a core).
        self.servers = await start_listeners(runtime, sockets, serve=not count)
        if count and self.source is not None:
            self.workers = ReceiveWorkers(runtime, self.source, self.servers, count)
            await self.workers.start()
        for lst in self.config.listener:
            log.info(
                "listening",
                extra={
                    "listener": lst.name,
                    "address": lst.address,
                    "processes": 1 + count,
                    "receive_workers": f"{count} ({server.receive_workers})",
                },
            )
        return runtime

    async def stop(self, timeout: float = 30.0) -> None:
        runtime = self.runtime
        if self.workers is not None:  # first: they drain their sessions, whose messages this process queues
            await self.workers.stop(timeout)
            self.workers = None
        for server in self.servers:
            server.close()
        for server in self.servers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), timeout)
        self.servers = []
        if runtime is None:
            self._unlock()
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
        if self._shipper is not None:  # the last lines, while the database is there (else: at the next start)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._shipper.ship(), 10.0)
            await self._shipper.db.close()
            self._shipper = None
        if runtime.cluster is not None:
            await runtime.cluster.close()
        self.runtime = None
        self._unlock()

    def _unlock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    async def reload(self) -> dict[str, Any]:
        """Re-read the configuration file and apply it, all or nothing (:mod:`mxgate.core.reload`); the outcome is
        logged, written to the state directory and returned."""
        from mxgate.core import reload as rl

        async with self._reload_lock:
            ok, problems, applied = await self._reload()
            state = self.config.state_path
            if ok:
                log.info("configuration reloaded", extra={"file": self.config.source, "applied": applied})
                for advice in advisories(self.config):
                    log.warning(advice)
            else:
                log.warning("reload refused; running on the previous configuration", extra={"problems": problems})
            return rl.write_status(state, ok, problems, applied)

    async def _reload(self) -> tuple[bool, list[str], str]:
        from mxgate.core import reload as rl

        runtime = self.runtime
        if runtime is None or not self.servers:
            return False, ["the gateway is starting or stopping; try again"], ""
        if self.source is None or self.source.file == BUILTIN_SOURCE:
            return False, ["this gateway runs the built-in default (no file to re-read)"], ""
        try:
            source = read_source(self.source.file)
            document = parse_toml(source.text or "", source.file)
            registry = collect_registry(Dispatcher(self.plugins))
            new = build_config(document, file=source.file, registry=registry, base_dir=source.base_dir)
        except ConfigError as exc:
            return False, [str(p) for p in exc.problems], ""
        except MxgateError as exc:
            return False, [str(exc)], ""
        restart = rl.restart_needed(self.config, new)
        if restart:
            return False, [f"{key}: changed, and needs a restart (nothing was applied)" for key in restart], ""
        try:
            apply = [lst.prepare_reload(new, lc) for lst, lc in zip(self.servers, new.listener, strict=True)]
        except StartupError as exc:
            return False, [str(exc)], ""
        # from here on nothing can fail half-way: the new configuration is everyone's at once
        self.config = new
        runtime.config = new
        for step in apply:
            step()
        runtime.wakeup()  # deliveries that a changed route or connector concerns get their chance now
        if self.workers is not None:
            await self.workers.reload(source)
        self.source = source
        return (
            True,
            [],
            f"{len(new.listener)} listeners, {len(new.inbound_connector)} inbound and "
            + (
                f"{len(new.outbound_connector)} outbound connectors"
                + (f", {self.workers.count} receive workers replaced" if self.workers is not None else "")
            ),
        )

    def _on_sighup(self) -> None:
        task = asyncio.ensure_future(self.reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        try:
            await self.start()
            await self._stopping.wait()
        finally:
            log.info("stopping")
            await self.stop()


# Young-generation threshold for the cyclic garbage collector while serving (CPython's default is 700). Mail
# handling allocates many short-lived objects that reference counting frees; with the default, collections took
# ~5% of the event loop's time under load (bench/RESULTS.md), and about a tenth of that with this and gc.freeze().
GC_THRESHOLD: Final = (7000, 20, 100)


def run(config: Config, plugins: PluginSet, *, source: Source | None = None) -> None:
    """``mxgate run``: uvloop when installed, else asyncio. What start-up built (modules, configuration, plugins)
    is moved out of the collector's sight (``gc.freeze``) and the collector runs less often: the objects of a
    running gateway are short-lived and acyclic, freed by reference counting. RLIMIT_NOFILE's soft limit is
    raised to the hard limit first (receive workers inherit it)."""
    from mxgate.core.smtp.admission import raise_descriptor_limit

    raise_descriptor_limit()
    run_loop(Gateway(config, plugins, source=source).serve_forever())


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run a process's main coroutine (the gateway's or a receive worker's) as described for :func:`run`."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(main)
