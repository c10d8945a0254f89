"""Inbound: serving our own policies at ``https://mta-sts.<domain>/.well-known/mta-sts.txt``, and the TXT record
that announces them (``mxgate sts record DOMAIN``).

What to answer is decided by :class:`PolicyResponder` without sockets; :class:`PolicyServer` puts it on mxgate's
shared HTTP server (:class:`mxgate.HttpServer`: h11, TLS with the configured certificate, one request per
connection, bounded in head size and time) and reports each answer as the ``sts_policy_served`` event.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence

from mxgate import (
    Config,
    HttpLimits,
    HttpRequest,
    HttpResponse,
    HttpServer,
    MxgateError,
    server_context,
    split_hostport,
)
from mxgate.plugins.mta_sts.config import MtaStsConfig, ServedPolicy, norm_domain
from mxgate.plugins.mta_sts.engine import EventSink
from mxgate.plugins.mta_sts.policy import WELL_KNOWN_PATH

__all__ = ["PolicyResponder", "PolicyServer", "served_label", "served_record", "start_policy_server"]

log = logging.getLogger(__name__)

_SERVE_REQUEST_TIMEOUT = 10.0
_SERVE_MAX_HEADER = 8192
#: One request per connection; its head within 10 s and 8 KiB (more: 408 / 431).
LIMITS = HttpLimits(max_requests=1, header_timeout=_SERVE_REQUEST_TIMEOUT, max_header_bytes=_SERVE_MAX_HEADER)
_ALLOW = (("Allow", "GET, HEAD"),)


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

    def response(self, request: HttpRequest) -> HttpResponse:
        """The HTTP response to ``request`` (the policy as ``text/plain``, RFC 8461 3.2)."""
        status, body, _label = self.respond(request.method, request.target, request.header("host") or None)
        if status == 200:
            return HttpResponse(200, body, "text/plain")
        return HttpResponse(status, body, headers=_ALLOW if status == 405 else ())


def served_label(status: int) -> str:
    """The ``result`` label of the ``sts_policy_served`` event for a response status."""
    return {200: "ok", 404: "not_found"}.get(status, "bad_request")


class PolicyServer:
    """A small HTTPS server: ``GET /.well-known/mta-sts.txt`` with ``Host: mta-sts.<domain>`` for each served
    domain, ``404`` otherwise; other methods ``405`` (the body is not read). On :class:`mxgate.HttpServer`."""

    def __init__(self, policies: Sequence[ServedPolicy], ssl_context: ssl.SSLContext, sink: EventSink) -> None:
        self._responder = PolicyResponder(policies)
        self._sink = sink
        self.http = HttpServer(
            self._responder.response,
            name="mta-sts",
            ssl=ssl_context,
            limits=LIMITS,
            before_body=self._refuse_early,
            on_response=self._served,
        )

    @property
    def sockets(self) -> tuple[object, ...]:
        return self.http.sockets

    @property
    def port(self) -> int | None:
        return self.http.port

    async def start(self, host: str, port: int) -> None:
        await self.http.start(host, port)

    async def close(self) -> None:
        await self.http.close()

    def respond(self, method: str, target: str, host: str | None) -> tuple[int, bytes, str]:
        return self._responder.respond(method, target, host)

    def _refuse_early(self, request: HttpRequest) -> HttpResponse | None:
        """A method other than GET/HEAD gets its 405 before any body is read."""
        return None if request.method in ("GET", "HEAD") else self._responder.response(request)

    async def _served(self, _request: HttpRequest | None, response: HttpResponse) -> None:
        await self._sink.on_event("sts_policy_served", result=served_label(response.status))


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
