"""Built-in agent: MTA-STS (RFC 8461), the fallback where DANE is absent. Declares the ``mta_sts`` connector
setting; policy discovery and enforcement land with the MTA-STS issue."""

from __future__ import annotations

from mxgate.core.hookspecs import hookimpl
from mxgate.core.settings import ConfigRegistry, ConnectorSetting

MTA_STS_MODE = ConnectorSetting(
    "outbound_connector",
    "mta_sts",
    str,
    "opportunistic",
    "MTA-STS (RFC 8461): none | opportunistic (honour the published mode) | mandatory (no valid policy, no delivery).",
    ("none", "opportunistic", "mandatory"),
)


class MtaStsPlugin:
    """MTA-STS (RFC 8461): the fallback where DANE is absent."""

    name = "mta_sts"
    priority = 45

    @hookimpl
    def mxgate_lifecycle_register_config(self, registry: ConfigRegistry) -> None:
        registry.add_connector_setting(MTA_STS_MODE, owner=self.name)
