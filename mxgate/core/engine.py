"""The gateway's lifecycle (aiohttp's Application/Runner/Site): load and freeze config and plugins, start
services, serve, drain on stop, then ``on_shutdown``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from mxgate.core import reload as rl
from mxgate.core import service
from mxgate.core.bootstrap import Source, check_state_dir, open_services, read_source, run_loop
from mxgate.core.cluster import queue_summary
from mxgate.core.cluster_tracking import TrackingShipper
from mxgate.core.config import (
    BUILTIN_SOURCE,
    Config,
    advisories,
    build_config,
    parse_toml,
)
from mxgate.core.errors import ConfigError, MxgateError, StartupError
from mxgate.core.files import state_dir_problem
from mxgate.core.plugins import Dispatcher, HookCallError, PluginSet, collect_registry
from mxgate.core.queue.scheduler import Scheduler
from mxgate.core.runtime import Runtime
from mxgate.core.smtp.admission import raise_descriptor_limit
from mxgate.core.smtp.server import start_listeners
from mxgate.core.workers import ReceiveWorkers

log = logging.getLogger(__name__)


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
            queue = runtime.queue
            if queue is not None:

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


def run(config: Config, plugins: PluginSet, *, source: Source | None = None) -> None:
    """``mxgate run``: uvloop when installed, else asyncio. What start-up built (modules, configuration, plugins)
    is moved out of the collector's sight (``gc.freeze``) and the collector runs less often: the objects of a
    running gateway are short-lived and acyclic, freed by reference counting. RLIMIT_NOFILE's soft limit is
    raised to the hard limit first (receive workers inherit it)."""
    raise_descriptor_limit()
    run_loop(Gateway(config, plugins, source=source).serve_forever())
