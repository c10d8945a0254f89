"""A plugin that records what a gateway did, for tests and ``mxgate demo``: every TLS outcome (what TLS-RPT and
metrics see), every recipient's fate (delivered / deferred / failed) and every reported event.

::

    recorder = Recorder()
    config, plugins = bootstrap.load(path, extra_plugins=[("recorder", recorder)])
    ...
    report = await recorder.wait_for_fate("Q1", timeout=10)      # the first delivered/deferred/failed report
    [o for o in recorder.outcomes if o.mx_host == "mx.example.test"]
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

from mxgate import DeliveryReport, ReportEvent, TlsOutcome, hookimpl

T = TypeVar("T")


class Recorder:
    """Records TLS outcomes, delivery reports and events in the order the gateway reported them."""

    name = "recorder"

    def __init__(self) -> None:
        self.outcomes: list[TlsOutcome] = []
        self.reports: list[DeliveryReport] = []
        self.events: list[ReportEvent] = []

    @hookimpl
    def mxgate_delivery_on_tls_outcome(self, outcome: TlsOutcome) -> None:
        self.outcomes.append(outcome)

    @hookimpl
    def mxgate_delivery_on_delivered(self, report: DeliveryReport) -> None:
        self.reports.append(report)

    @hookimpl
    def mxgate_delivery_on_deferred(self, report: DeliveryReport) -> None:
        self.reports.append(report)

    @hookimpl
    def mxgate_delivery_on_failed(self, report: DeliveryReport) -> None:
        self.reports.append(report)

    @hookimpl
    def mxgate_report_on_event(self, event: ReportEvent) -> None:
        self.events.append(event)

    # -- waiting (polled, bounded) ---------------------------------------------------------------------------

    async def wait(self, find: Callable[[], T | None], timeout: float = 10.0, what: str = "a record") -> T:
        """Poll ``find()`` until it returns something other than None; :class:`TimeoutError` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (found := find()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} within {timeout:g} s")
            await asyncio.sleep(0.02)
        return found

    async def wait_for_fate(self, queue_id: str, timeout: float = 10.0) -> DeliveryReport:
        """The first delivered, deferred or failed report for ``queue_id``."""
        return await self.wait(
            lambda: next((r for r in self.reports if r.message_id == queue_id), None),
            timeout,
            f"delivery report for {queue_id}",
        )

    async def wait_for_event(self, kind: str, timeout: float = 10.0) -> ReportEvent:
        """The first event of ``kind`` (e.g. ``dns_self_test``)."""
        return await self.wait(lambda: next((e for e in self.events if e.kind == kind), None), timeout, kind)
