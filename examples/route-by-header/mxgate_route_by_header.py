"""An example routing agent: mail from trusted senders chooses its outbound connector with a header; every
delivery outcome is counted. A package of its own (see pyproject.toml: entry point group ``mxgate``), configured
with

    [plugins.route_by_header]
    header = "X-Route-To"
    inbound_connectors = ["internal"]
    authenticated = false

It imports nothing but ``mxgate``, the plugin author's API.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass

from mxgate import (
    ConfigRegistry,
    DeliveryReport,
    MessageHeaders,
    QueuedMessage,
    Route,
    Runtime,
    hookimpl,
    setting,
)

log = logging.getLogger(__name__)

_HEADER_NAME = re.compile(r"^[!-9;-~]+\Z")  # RFC 5322 ftext


def _header_error(name: str) -> str | None:
    return None if _HEADER_NAME.match(name) else "not a header name"


@dataclass(frozen=True, slots=True)
class RouteByHeaderConfig:
    header: str = setting("X-Route-To", desc="The header naming the outbound connector.", check=_header_error)
    inbound_connectors: tuple[str, ...] = setting(
        (), desc="Mail received under these inbound connectors may choose its route with the header."
    )
    authenticated: bool = setting(
        False, desc="Mail from clients that authenticated (SMTP AUTH) may choose its route with the header too."
    )


class RouteByHeader:
    """The routing override by header, for trusted senders only; counts delivery outcomes."""

    name = "route_by_header"
    priority = 20

    def __init__(self) -> None:
        self.config = RouteByHeaderConfig()
        self.runtime: Runtime | None = None
        self.counts: Counter[tuple[str, str]] = Counter()  # (outbound connector, result) -> recipients

    @hookimpl
    def mxgate_lifecycle_register_config(self, registry: ConfigRegistry) -> None:
        registry.add_section(self.name, RouteByHeaderConfig, owner=self.name)

    @hookimpl
    def mxgate_lifecycle_on_startup(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.config = runtime.config.plugin_section(self.name, RouteByHeaderConfig)

    def trusted(self, message: QueuedMessage) -> bool:
        """Who sent it, from the metadata the gateway kept when it received the message."""
        meta = message.meta
        if meta.inbound_connector and meta.inbound_connector in self.config.inbound_connectors:
            return True
        return self.config.authenticated and meta.auth_user is not None

    # -- categorizer -----------------------------------------------------------------------------------------

    @hookimpl
    def mxgate_categorizer_resolve_route(self, message: QueuedMessage, headers: MessageHeaders) -> Route | None:
        if self.runtime is None or not self.trusted(message):
            return None  # the default routing decides
        wanted = headers.get(self.config.header)
        if not wanted:
            return None
        connector = self.runtime.config.outbound(wanted)
        if connector is None or not connector.enabled:
            log.warning("route_by_header: %s names no enabled outbound connector: %r", self.config.header, wanted[:100])
            return None
        return Route(connector.name)

    # -- delivery --------------------------------------------------------------------------------------------

    def _count(self, report: DeliveryReport) -> None:
        self.counts[(report.connector, report.result)] += 1
        log.info("route_by_header: %s %s via %s: %s", report.message_id, report.result, report.connector, report.reply)

    @hookimpl
    def mxgate_delivery_on_delivered(self, report: DeliveryReport) -> None:
        self._count(report)

    @hookimpl
    def mxgate_delivery_on_deferred(self, report: DeliveryReport) -> None:
        self._count(report)

    @hookimpl
    def mxgate_delivery_on_failed(self, report: DeliveryReport) -> None:
        self._count(report)
