"""A raw SMTP client for receive-side tests: exact bytes out, whole (multi-line) replies in, EOF shown as such."""

from __future__ import annotations

import asyncio
from typing import Any

from mxgate.testing.gateway import TestGateway


class Raw:
    """A raw SMTP client: send exact bytes, read whole (multi-line) replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, gw: TestGateway, *, greet: bool = True) -> Raw:
        r, w = await asyncio.open_connection(gw.smtp_host, gw.smtp_port)
        raw = cls(r, w)
        if greet:
            assert (await raw.reply()).startswith("220 ")
        return raw

    async def reply(self, timeout: float = 5.0) -> str:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                return "\n".join(lines) + ("\n" if lines else "") + "<EOF>"
            lines.append(line.decode().rstrip("\r\n"))
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(lines)

    async def cmd(self, data: bytes | str) -> str:
        self.send(data if isinstance(data, bytes) else data.encode() + b"\r\n")
        return await self.reply()

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), 5) == b""

    def close(self) -> None:
        self.writer.close()


async def queued(gw: TestGateway) -> list[Any]:
    assert gw.runtime.queue is not None
    return await gw.runtime.queue.list()
