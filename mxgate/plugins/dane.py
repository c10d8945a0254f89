"""Built-in agent: DANE for SMTP (RFC 7672). Declares the ``dane`` connector setting; verification lands with
the DANE issue."""

from __future__ import annotations

from mxgate.core.hookspecs import hookimpl
from mxgate.core.settings import ConfigRegistry, ConnectorSetting

DANE_MODE = ConnectorSetting(
    "outbound_connector",
    "dane",
    str,
    "opportunistic",
    "DANE (RFC 7672): none | opportunistic (use TLSA where published) | mandatory (no usable TLSA, no delivery).",
    ("none", "opportunistic", "mandatory"),
)


class DanePlugin:
    """DANE for SMTP (RFC 7672): TLSA-authenticated delivery."""

    name = "dane"
    priority = 40

    @hookimpl
    def mxgate_lifecycle_register_config(self, registry: ConfigRegistry) -> None:
        registry.add_connector_setting(DANE_MODE, owner=self.name)
