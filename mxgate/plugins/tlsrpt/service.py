"""The agent's one object: collecting, sending and receiving together, with its background loop. The plugin's
hooks and the ``mxgate tlsrpt`` commands both drive a :class:`TlsRptService`."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from mxgate import Resolver, Runtime, SharedDb
from mxgate.plugins.tlsrpt.collect import EventFn, no_event
from mxgate.plugins.tlsrpt.config import TlsRptConfig
from mxgate.plugins.tlsrpt.receive import Receiver
from mxgate.plugins.tlsrpt.send import Sender, SubmitFn

__all__ = ["TICK_SECONDS", "TlsRptService", "service_for"]

log = logging.getLogger("mxgate.plugins.tlsrpt")

TICK_SECONDS: Final = 30.0


class TlsRptService(Sender, Receiver):
    """Aggregation, scheduling, sending and receiving; everything the plugin and the CLI share. Inject the clock,
    resolver, the door into the queue (``submit``: :meth:`mxgate.Runtime.submit`), event sink and random source
    (tests do)."""

    def __init__(
        self,
        conf: TlsRptConfig,
        *,
        state_dir: Path,
        submitter: str,
        base_dir: Path = Path("."),
        clock: Callable[[], float] = time.time,
        resolver: Resolver | None = None,
        submit: SubmitFn | None = None,
        emit: EventFn = no_event,
        rng: random.Random | None = None,
        shared: SharedDb | None = None,
    ) -> None:
        super().__init__(
            conf,
            state_dir=state_dir,
            submitter=submitter,
            base_dir=base_dir,
            clock=clock,
            resolver=resolver,
            emit=emit,
            shared=shared,
        )
        self._init_sender(submit=submit, rng=rng)
        self._init_receiver()

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def run_forever(self) -> None:
        """The background loop: flush every ``flush_interval``, a sending round every ``TICK_SECONDS``."""
        last_tick = 0.0
        while True:
            await asyncio.sleep(self.conf.flush_interval)
            try:
                await self.flush()
                if time.monotonic() - last_tick >= TICK_SECONDS:
                    last_tick = time.monotonic()
                    await self.tick()
            except Exception:
                log.exception("TLS-RPT background round failed")

    async def close(self) -> None:
        await self.stop_receiving()
        await super().close()


def service_for(runtime: Runtime, *, emit: EventFn = no_event) -> TlsRptService:
    """The service of a gateway's or a command's runtime: its clock and resolver, its door into the queue, and in
    a cluster its own connection to the shared store."""
    config = runtime.config
    conf = config.plugin_section("tlsrpt", TlsRptConfig)
    return TlsRptService(
        conf,
        state_dir=runtime.state_dir,
        submitter=conf.submitter or config.server.hostname,
        base_dir=Path(config.base_dir),
        clock=runtime.clock,
        resolver=runtime.resolver,
        submit=runtime.submit,
        emit=emit,
        shared=runtime.cluster.database("tlsrpt", schema="tlsrpt") if runtime.cluster is not None else None,
    )
