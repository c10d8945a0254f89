"""The receive worker's end of its channel to the main process (``mxgate.core.workers._Channel``): what it sends is
batched -- messages submitted in one loop iteration go out in one write, reports within ``REPORT_DELAY``, and a
message's frame follows the reports made before it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from mxgate.core import workers
from mxgate.core.workers import FRAME, HEAD, REPORT_DELAY, _Channel


class FakeWriter:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def writelines(self, parts: list[bytes]) -> None:
        self.writes.append(b"".join(parts))


def frames(data: bytes) -> list[tuple[bytes, Any]]:
    out: list[tuple[bytes, Any]] = []
    while data:
        length, kind = FRAME.unpack_from(data)
        payload, data = data[FRAME.size : FRAME.size + length], data[FRAME.size + length :]
        if kind == b"P":
            (size,) = HEAD.unpack_from(payload)
            out.append((kind, (json.loads(payload[HEAD.size : HEAD.size + size]), payload[HEAD.size + size :])))
        else:
            out.append((kind, json.loads(payload)))
    return out


def test_submissions_of_one_iteration_share_a_write_after_earlier_reports() -> None:
    async def scenario() -> tuple[FakeWriter, list[str]]:
        writer = FakeWriter()
        channel = _Channel(asyncio.StreamReader(), writer)  # type: ignore[arg-type]
        channel.event("connection", 1.0, {"listener": "smtp"})
        one = asyncio.ensure_future(channel.submit("a@x", ["b@y"], b"one\r\n", now=1.0))
        two = asyncio.ensure_future(channel.submit("a@x", ["c@y"], b"two\r\n", now=1.0))
        await asyncio.sleep(0)  # both submitted
        await asyncio.sleep(0)  # written
        assert len(writer.writes) == 1
        for request, (kind, payload) in zip((1, 2), frames(writer.writes[0])[1:], strict=True):
            assert kind == b"P" and payload[0]["r"] == request
            channel._answers[request].set_result(f"Q{request}")
        return writer, [await one, await two]

    writer, ids = asyncio.run(scenario())
    assert ids == ["Q1", "Q2"]
    kinds = [kind for kind, _ in frames(writer.writes[0])]
    assert kinds == [b"J", b"P", b"P"]  # the report made before the messages comes first
    assert frames(writer.writes[0])[0][1] == [{"e": "connection", "v": 1.0, "l": {"listener": "smtp"}}]


def test_reports_are_sent_together_within_the_delay() -> None:
    async def scenario() -> FakeWriter:
        writer = FakeWriter()
        channel = _Channel(asyncio.StreamReader(), writer)  # type: ignore[arg-type]
        channel.event("connection", 1.0, {})
        await asyncio.sleep(0)
        channel.event("disconnection", 1.0, {})
        assert writer.writes == []
        await asyncio.sleep(REPORT_DELAY * 3)
        return writer

    writer = asyncio.run(scenario())
    assert [kind for kind, _ in frames(b"".join(writer.writes))] == [b"J"]
    assert [item["e"] for item in frames(writer.writes[0])[0][1]] == ["connection", "disconnection"]
    assert workers.REPORT_DELAY <= 0.1  # metrics stay current
