"""Inbound: serving our own policies at ``https://mta-sts.<domain>/.well-known/mta-sts.txt``, and the TXT record
that announces them (``mxgate sts record DOMAIN``).

What to answer is decided by :class:`PolicyResponder` without sockets. The HTTP side (h11 over an asyncio TLS
server) is all in :class:`PolicyServer`: the one class to change for another HTTP server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Sequence
from typing import Any

import h11

from mxgate import Config, MxgateError, server_context, split_hostport
from mxgate.plugins.mta_sts.config import MtaStsConfig, ServedPolicy, norm_domain
from mxgate.plugins.mta_sts.engine import EventSink
from mxgate.plugins.mta_sts.policy import WELL_KNOWN_PATH

__all__ = ["PolicyResponder", "PolicyServer", "served_record", "start_policy_server"]

log = logging.getLogger(__name__)

_SERVE_REQUEST_TIMEOUT = 10.0
_SERVE_MAX_HEADER = 8192


def served_record(policy: ServedPolicy) -> str:
    """The TXT record to publish for a served policy."""
    return f'_mta-sts.{norm_domain(policy.domain)}. IN TXT "v=STSv1; id={policy.record_id}"'


class PolicyResponder:
    """The answer to one request for a served policy: pure, so it is testable without sockets."""

    def __init__(self, policies: Sequence[ServedPolicy]) -> None:
        self._bodies = {f"mta-sts.{norm_domain(p.domain)}": p.render().encode() for p in policies}

    def respond(self, method: str, target: str, host: str | None) -> tuple[int, bytes, str]:
        """(status, body, label) for a request; the label is the ``result`` of the ``sts_policy_served`` event."""
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", "bad_request"
        name = (host or "").rsplit(":", 1)[0] if host and not host.startswith("[") else ""
        body = self._bodies.get(name.lower().rstrip("."))
        if target != WELL_KNOWN_PATH or body is None:
            return 404, b"not found\n", "not_found"
        return 200, body, "ok"


# ------------------------------------------------------------------------------------------------------------
# the HTTP side: everything below knows h11 and sockets
# ------------------------------------------------------------------------------------------------------------


class PolicyServer:
    """A small HTTPS server: ``GET /.well-known/mta-sts.txt`` with ``Host: mta-sts.<domain>`` for each served
    domain, ``404`` otherwise. HTTP parsing is h11's; one request per connection, bounded in size and time."""

    def __init__(self, policies: Sequence[ServedPolicy], ssl_context: ssl.SSLContext, sink: EventSink) -> None:
        self._responder = PolicyResponder(policies)
        self._ssl = ssl_context
        self._sink = sink
        self._server: asyncio.Server | None = None

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self._server.sockets) if self._server is not None else ()

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, ssl=self._ssl)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
            self._server = None

    def respond(self, method: str, target: str, host: str | None) -> tuple[int, bytes, str]:
        return self._responder.respond(method, target, host)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_SERVE_MAX_HEADER)
        label = "bad_request"
        try:
            async with asyncio.timeout(_SERVE_REQUEST_TIMEOUT):
                request = await self._read_request(conn, reader)
                if request is None:
                    return
                host = next((v.decode("latin-1") for k, v in request.headers if k == b"host"), None)
                method = request.method.decode("ascii", "replace")
                status, body, label = self.respond(method, request.target.decode("latin-1"), host)
                headers = [
                    ("Content-Type", "text/plain" if status == 200 else "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(body))),
                    ("Connection", "close"),
                ]
                writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
                if method != "HEAD":
                    writer.write(conn.send(h11.Data(data=body)) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
        except (h11.RemoteProtocolError, h11.LocalProtocolError, TimeoutError, OSError, ssl.SSLError):
            label = "bad_request"
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            await self._sink.on_event("sts_policy_served", result=label)

    @staticmethod
    async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
        for _ in range(64):  # bounded: at most 64 reads of up to 4 KiB before the request line and headers
            event = conn.next_event()
            if isinstance(event, h11.Request):
                return event
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(4096))
                continue
            return None  # ConnectionClosed or anything else
        return None


async def start_policy_server(config: Config, conf: MtaStsConfig, sink: EventSink) -> PolicyServer:
    if not (conf.serve_cert and conf.serve_key):
        raise MxgateError("plugins.mta_sts.serve_listen needs serve_cert and serve_key")
    if not conf.serve_policies:
        raise MxgateError("plugins.mta_sts.serve_listen is set but serve_policies is empty")
    cert, key = config.path(conf.serve_cert), config.path(conf.serve_key)
    try:
        ctx = await asyncio.to_thread(server_context, cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise MxgateError(f"plugins.mta_sts.serve_cert/serve_key: cannot load {cert} / {key}: {exc}") from exc
    server = PolicyServer(conf.serve_policies, ctx, sink)
    host, port = split_hostport(conf.serve_listen or "")
    try:
        await server.start(host, port)
    except OSError as exc:
        raise MxgateError(f"plugins.mta_sts.serve_listen {conf.serve_listen}: {exc.strerror or exc}") from exc
    log.info("serving MTA-STS policies", extra={"address": conf.serve_listen, "domains": len(conf.serve_policies)})
    return server
