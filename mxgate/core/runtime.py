"""The running gateway as plugins see it (``mxgate_lifecycle_on_startup``): config, hooks, DNS, queue, clock.

Built by :mod:`mxgate.core.engine`; tests build one directly with :func:`Runtime.create`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mxgate.core.config import Config
from mxgate.core.model import Stash
from mxgate.core.plugins import Dispatcher, Hooks, PluginSet
from mxgate.core.tracking import TrackingLog

if TYPE_CHECKING:
    from mxgate.core.dns import Resolver
    from mxgate.core.queue.store import QueueStore


@dataclass(eq=False)
class Runtime:
    """Shared services. ``resolver`` and ``queue`` are set during start-up, before ``on_startup`` runs."""

    config: Config
    plugins: PluginSet
    hooks: Hooks
    tracking: TrackingLog
    clock: Callable[[], float] = time.time
    resolver: Resolver | None = None
    queue: QueueStore | None = None
    stash: Stash = field(default_factory=Stash)  # process-wide plugin state, keyed by StashKey
    tasks: list[Any] = field(default_factory=list)  # background tasks the engine cancels at shutdown
    wakeup: Callable[[], None] = lambda: None  # pokes the delivery scheduler (set by the engine)

    @property
    def state_dir(self) -> Path:
        return self.config.state_path

    @classmethod
    def create(cls, config: Config, plugins: PluginSet, *, clock: Callable[[], float] = time.time) -> Runtime:
        state = config.state_path
        state.mkdir(parents=True, exist_ok=True)
        dispatcher = Dispatcher(plugins, trace=config.plugins.hook_trace)
        return cls(
            config=config,
            plugins=plugins,
            hooks=Hooks(dispatcher),
            tracking=TrackingLog(state, enabled=config.server.tracking_log, clock=clock),
            clock=clock,
        )
