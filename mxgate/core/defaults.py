"""The essential core plugin: the defaults every hook chain falls back to.

All implementations are ``trylast``, so any plugin answers before them (datasette's default pages). This
plugin cannot be disabled; it can be overridden.
"""

from __future__ import annotations

from mxgate.connectors.outbound import select_outbound
from mxgate.core.hookspecs import hookimpl
from mxgate.core.model import Address
from mxgate.core.outcomes import Route
from mxgate.core.runtime import Runtime


class CorePlugin:
    """Defaults: routing by connector, and (with their issues) next hop, connector TLS, credentials."""

    name = "core"
    priority = 1000

    def __init__(self) -> None:
        self.runtime: Runtime | None = None

    @hookimpl(tryfirst=True)
    def mxgate_lifecycle_on_startup(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @hookimpl(trylast=True)
    def mxgate_categorizer_resolve_route(self, recipient: Address) -> Route | None:
        """Most specific ``recipient_domains`` match; ties by cost, then file order."""
        if self.runtime is None:
            return None
        connector = select_outbound(self.runtime.config.outbound_connector, recipient.domain)
        return Route(connector.name) if connector else None
