"""The running gateway as plugins see it (``mxgate_lifecycle_on_startup``): config, hooks, DNS, queue, clock.

Built by :mod:`mxgate.core.engine`; tests build one directly with :func:`Runtime.create`, commands with
:func:`mxgate.core.commands.command_runtime`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from mxgate.core.callout import callout
from mxgate.core.config import Config
from mxgate.core.files import private_dir
from mxgate.core.metadata import MessageMeta, MetaInput
from mxgate.core.model import Address, Stash, StashKey
from mxgate.core.plugins import Dispatcher, Hooks, PluginSet
from mxgate.core.tracking import TrackingLog

if TYPE_CHECKING:
    from mxgate.core.cluster import Cluster
    from mxgate.core.dns import Resolver
    from mxgate.core.messages import MessageOptions, NewRecipient
    from mxgate.core.outcomes import CalloutResult
    from mxgate.core.queue.store import QueueStore


# The process a plugin's ``on_startup`` runs in. The main process binds the listeners, receives, delivers and runs
# the plugins' background services; a receive worker (``server.receive_workers``) only receives, on the same
# listening sockets, and its report events, plugin errors and hook figures go to the main process's hooks.
ROLE_MAIN: Final = "main"
ROLE_RECEIVER: Final = "receiver"
# A command that delivers or inspects once (`mxgate connector validate`), possibly next to a running gateway:
# plugins set up what delivery needs but start no listener, endpoint or background service.
ROLE_COMMAND: Final = "command"
# In the main process's ``runtime.stash``: slot -> pid of each receive worker running now (metrics read their
# CPU, memory and descriptors from /proc).
RECEIVE_WORKER_PIDS: Final = StashKey[dict[int, int]]()


@dataclass(eq=False)
class Runtime:
    """Shared services. ``resolver`` and ``queue`` are set during start-up, before ``on_startup`` runs (``queue``
    stays None in a receive worker, whose ``submit`` goes through the main process)."""

    config: Config
    plugins: PluginSet
    hooks: Hooks
    tracking: TrackingLog
    clock: Callable[[], float] = time.time
    role: str = ROLE_MAIN  # ROLE_MAIN, ROLE_RECEIVER or ROLE_COMMAND
    resolver: Resolver | None = None
    queue: QueueStore | None = None
    stash: Stash = field(default_factory=Stash)  # process-wide plugin state, keyed by StashKey
    tasks: list[Any] = field(default_factory=list)  # background tasks the engine cancels at shutdown
    wakeup: Callable[[], None] = lambda: None  # pokes the delivery scheduler (set by the engine)
    # queues a received message (set by the engine: the scheduler's ``enqueue``, which hands it straight to
    # delivery); None: ``queue.put`` then ``wakeup``
    enqueue: Callable[..., Awaitable[str]] | None = None
    # cluster mode ([cluster] database): this node's name, the shared database (``cluster.database(name)`` opens a
    # store connection of one's own); None when this gateway runs alone
    cluster: Cluster | None = None

    async def submit(
        self,
        sender: str,
        recipients: Sequence[str | NewRecipient],
        data: bytes,
        *,
        meta: MetaInput = None,
        message_id: str | None = None,
        now: float,
        options: MessageOptions | None = None,
    ) -> str:
        """Queue a message; returns its queue id once it is on disk. The one door into the queue: the receive
        side, the scheduler's DSNs and expansions, and plugins that send mail of their own (reports) all come here.

        ``recipients`` are addresses (``"user@example.org"``) or ``NewRecipient`` with their DSN parameters;
        ``data`` the message, headers included, CRLF line ends; ``meta`` a :class:`~mxgate.MessageMeta` (e.g.
        ``MessageMeta(origin="myplugin", tls_required_no=True)``), or ``None``; ``options`` the message's RET,
        ENVID and REQUIRETLS (:class:`~mxgate.MessageOptions`); ``now`` the arrival time (``runtime.clock()``).
        ``meta`` also takes the queue's ``(key, value)`` pairs (:meth:`MessageMeta.from_pairs`), for callers
        written before the type."""
        meta = MessageMeta.of(meta)
        if self.enqueue is not None:
            queue_id: str = await self.enqueue(
                sender, recipients, data, meta=meta, message_id=message_id, now=now, options=options
            )
            return queue_id
        if self.queue is None:
            raise RuntimeError("no queue store")
        queue_id = await self.queue.put(
            sender, recipients, data, meta=meta, message_id=message_id, now=now, options=options
        )
        self.wakeup()
        return queue_id

    async def callout(
        self, recipient: Address, *, sender: Address | None = None, timeout: float = 10.0
    ) -> CalloutResult:
        """Ask the next hop whether it takes ``recipient`` (MAIL FROM, RCPT TO, RSET/QUIT; never DATA), routed
        and secured like a delivery; at most ``timeout`` seconds. See :mod:`mxgate.core.callout`."""
        return await callout(self, recipient, sender=sender, timeout=timeout)

    @property
    def state_dir(self) -> Path:
        return self.config.state_path

    @property
    def delivers(self) -> bool:
        """This process delivers (the main process, or a command that delivers once); a receive worker does not,
        so a plugin sets up what delivery needs only when this is true."""
        return self.role in (ROLE_MAIN, ROLE_COMMAND)

    @property
    def runs_services(self) -> bool:
        """This process runs the plugins' listeners, endpoints and background tasks: the main process only (not a
        receive worker, not a command)."""
        return self.role == ROLE_MAIN

    @classmethod
    def create(
        cls, config: Config, plugins: PluginSet, *, clock: Callable[[], float] = time.time, role: str = ROLE_MAIN
    ) -> Runtime:
        state = config.state_path
        private_dir(state)
        dispatcher = Dispatcher(plugins, trace=config.plugins.hook_trace)
        return cls(
            config=config,
            plugins=plugins,
            hooks=Hooks(dispatcher),
            tracking=TrackingLog(
                state,
                enabled=config.server.tracking_log,
                clock=clock,
                max_size=config.server.tracking_log_max_size,
                files=config.server.tracking_log_files,
            ),
            clock=clock,
            role=role,
        )
