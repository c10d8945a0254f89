"""The engine feeds DNS lookups to observers as events (kind ``dns_lookup``, value = seconds)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mxgate import ReportEvent, hookimpl
from mxgate.testing.gateway import running_gateway

pytestmark = pytest.mark.integration


class Events:
    def __init__(self) -> None:
        self.seen: list[ReportEvent] = []

    @hookimpl
    def mxgate_report_on_event(self, event: ReportEvent) -> None:
        self.seen.append(event)


async def test_dns_lookups_are_reported(tmp_path: Path) -> None:
    events = Events()
    async with running_gateway("", tmp_path, extra_plugins=[("events", events)]) as gw:
        assert gw.runtime.resolver is not None
        answer = await gw.runtime.resolver.resolve("nowhere.test", "MX")  # the test resolver port is closed
        await asyncio.sleep(0.05)
    lookups = [e for e in events.seen if e.kind == "dns_lookup" and e.label("rdtype") == "MX"]
    assert lookups, [e.kind for e in events.seen]
    assert lookups[0].label("result") == str(answer.kind) == "error"
    assert lookups[0].label("status") == str(answer.status)
    assert lookups[0].value >= 0
