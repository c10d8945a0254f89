"""A UDP DNS proxy on loopback that forwards to a real resolver and can sabotage chosen queries.

It plays the on-path attacker of RFC-CHECKLIST item 38 in front of the DNS lab's unbound: queries of the chosen
types are dropped (the client times out) or answered SERVFAIL without an extended error (no DNSSEC verdict), while
every other query gets the resolver's own answer, AD bit and all::

    async with DnsProxy(lab.endpoint, sabotage={"AAAA": Sabotage.DROP}) as proxy:
        resolver = Resolver([proxy.endpoint()], timeout=1.0)

Every upstream exchange is bounded by ``upstream_timeout``; a query the upstream does not answer is not answered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from mxgate.core.dns import ResolverEndpoint

__all__ = ["DnsProxy", "Sabotage"]


class Sabotage(StrEnum):
    DROP = "drop"  # no reply at all: the client's query times out
    SERVFAIL = "servfail"  # SERVFAIL without an extended DNS error, also with CD set: no DNSSEC verdict


class DnsProxy:
    """Forwards each UDP query to ``upstream`` and relays the reply, unless its type is in ``sabotage``.

    :param sabotage: query type (``"AAAA"``) -> what to do instead of forwarding.
    """

    def __init__(
        self,
        upstream: ResolverEndpoint,
        *,
        sabotage: Mapping[str, Sabotage] | None = None,
        host: str = "127.0.0.1",
        upstream_timeout: float = 2.0,
    ) -> None:
        self.upstream = upstream
        self.sabotage = {k.upper(): v for k, v in (sabotage or {}).items()}
        self.host = host
        self.port = 0
        self.upstream_timeout = upstream_timeout
        self.sabotaged: list[tuple[str, str]] = []  # (name, type) of every query not forwarded
        self.forwarded = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def endpoint(self, *, trusted: bool | None = None) -> ResolverEndpoint:
        return ResolverEndpoint(self.host, self.port, trusted)

    async def __aenter__(self) -> DnsProxy:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _ProxyProtocol(self), local_addr=(self.host, 0))
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    def _received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return
        if not query.question:
            return
        question = query.question[0]
        rdtype = dns.rdatatype.to_text(question.rdtype)
        action = self.sabotage.get(rdtype)
        if action is not None:
            self.sabotaged.append((str(question.name).rstrip(".").lower(), rdtype))
            if action is Sabotage.SERVFAIL and self._transport is not None:
                reply = dns.message.make_response(query)
                reply.set_rcode(dns.rcode.SERVFAIL)
                reply.flags |= dns.flags.RA
                self._transport.sendto(reply.to_wire(), addr)
            return
        task = asyncio.ensure_future(self._forward(data, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[bytes] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UpstreamProtocol(answered), remote_addr=(self.upstream.host, self.upstream.port)
        )
        try:
            transport.sendto(data)
            with contextlib.suppress(TimeoutError):
                reply = await asyncio.wait_for(answered, self.upstream_timeout)
                if self._transport is not None:
                    self.forwarded += 1
                    self._transport.sendto(reply, addr)
        finally:
            transport.close()


class _ProxyProtocol(asyncio.DatagramProtocol):
    def __init__(self, proxy: DnsProxy) -> None:
        self.proxy = proxy

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.proxy._received(data, addr)


class _UpstreamProtocol(asyncio.DatagramProtocol):
    def __init__(self, answered: asyncio.Future[bytes]) -> None:
        self.answered = answered

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if not self.answered.done():
            self.answered.set_result(data)
