"""A scripted DNS server for unit tests: a real UDP server on loopback whose every reply a test decides
(flags, rcode, RFC 8914 extended errors), and :func:`make_reply` to build those replies. Re-exported by
:mod:`mxgate.testing.dnslab`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, cast

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rrset

from mxgate.core.dns import ResolverEndpoint

__all__ = ["Handler", "ScriptedDnsServer", "make_reply"]


Handler = Callable[[dns.message.Message], dns.message.Message | None]


def make_reply(
    query: dns.message.Message,
    *,
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR,
    ad: bool = False,
    answer: Sequence[str] = (),
    authority: Sequence[str] = (),
    ede: Sequence[tuple[int, str]] = (),
) -> dns.message.Message:
    """A response to ``query``; ``answer``/``authority`` hold RR lines: ``"mx.test. 300 IN A 127.0.0.1"``."""
    r = dns.message.make_response(query)
    r.set_rcode(rcode)
    r.flags |= dns.flags.RA
    if ad:
        r.flags |= dns.flags.AD
    for section, lines in ((r.answer, answer), (r.authority, authority)):
        for line in lines:
            rrset = dns.rrset.from_text(*_split_rr(line))
            section.append(rrset)
    if ede:
        options: list[dns.edns.Option] = [
            dns.edns.EDEOption(dns.edns.EDECode(code), text or None) for code, text in ede
        ]
        r.use_edns(0, r.ednsflags, r.payload, options=options)
    return r


def _split_rr(line: str) -> tuple[str, int, str, str, str]:
    owner, ttl, rdclass, rdtype, rest = line.split(None, 4)
    return owner, int(ttl), rdclass, rdtype, rest


class ScriptedDnsServer:
    """A real UDP DNS server on loopback whose every reply is decided by ``handler`` (None: stay silent).

    ::

        def handler(q): return make_reply(q, ad=True, answer=[f"{q.question[0].name} 60 IN A 127.0.0.1"])
        async with ScriptedDnsServer(handler) as server:
            answer = await Resolver([server.endpoint()]).resolve("x.test", "A")
        assert server.queries[0].ednsflags & dns.flags.DO
    """

    def __init__(self, handler: Handler, *, host: str = "127.0.0.1") -> None:
        self.handler = handler
        self.host = host
        self.port = 0
        self.queries: list[dns.message.Message] = []
        self._transport: asyncio.DatagramTransport | None = None

    def endpoint(self, *, trusted: bool | None = None) -> ResolverEndpoint:
        return ResolverEndpoint(self.host, self.port, trusted)

    async def __aenter__(self) -> ScriptedDnsServer:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _ScriptedProtocol(self), local_addr=(self.host, 0))
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


class _ScriptedProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: ScriptedDnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return
        self.server.queries.append(query)
        reply = self.server.handler(query)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply.to_wire(), addr)
