"""Built-in agent: TLS-RPT (RFC 8460) — collects TLS outcomes, sends daily reports. Declares the
``[plugins.tlsrpt]`` section; aggregation and sending land with the TLS-RPT issue."""

from __future__ import annotations

from dataclasses import dataclass

from mxgate.core.hookspecs import hookimpl
from mxgate.core.settings import ConfigRegistry, setting


@dataclass(frozen=True, slots=True)
class TlsRptConfig:
    enabled: bool = setting(True, desc="Collect TLS outcomes and send reports.")
    organization_name: str = setting("", desc="organization-name in reports we send.")
    contact_info: str = setting("", desc="contact-info in reports we send (a mailbox or URL).")
    submitter: str = setting("", desc="Submitter domain (TLS-Report-Submitter); default: server.hostname.")


class TlsRptPlugin:
    """TLS-RPT (RFC 8460): collects TLS outcomes, sends daily reports."""

    name = "tlsrpt"
    priority = 90

    @hookimpl
    def mxgate_lifecycle_register_config(self, registry: ConfigRegistry) -> None:
        registry.add_section(self.name, TlsRptConfig, owner=self.name)
