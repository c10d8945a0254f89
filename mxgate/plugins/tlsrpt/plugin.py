"""The TLS-RPT agent's hook implementations: what the gateway calls, handed to the service."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence

from mxgate import (
    ROLE_MAIN,
    Address,
    ConfigRegistry,
    Envelope,
    IncomingMessage,
    MigrationRegistry,
    Runtime,
    TlsOutcome,
    Verdict,
    hookimpl,
)
from mxgate.plugins.tlsrpt.commands import register
from mxgate.plugins.tlsrpt.config import TlsRptConfig
from mxgate.plugins.tlsrpt.service import TlsRptService, service_for
from mxgate.plugins.tlsrpt.store import CLUSTER_SCHEMA

__all__ = ["TlsRptPlugin"]

log = logging.getLogger("mxgate.plugins.tlsrpt")


class TlsRptPlugin:
    """TLS-RPT (RFC 8460): collects TLS outcomes, sends daily reports, reads the reports others send us."""

    name = "tlsrpt"
    priority = 90

    def __init__(self) -> None:
        self.service: TlsRptService | None = None
        self.runtime: Runtime | None = None

    @hookimpl
    def mxgate_lifecycle_register_config(self, registry: ConfigRegistry) -> None:
        registry.add_section(self.name, TlsRptConfig, owner=self.name)

    @hookimpl
    def mxgate_lifecycle_register_migrations(self, migrations: MigrationRegistry) -> None:
        migrations.add("tlsrpt", 1, "TLS-RPT counts per node, reports, deliveries, received reports", CLUSTER_SCHEMA)

    @hookimpl
    async def mxgate_lifecycle_on_startup(self, runtime: Runtime) -> None:
        conf = runtime.config.plugin_section(self.name, TlsRptConfig)
        self.runtime = runtime
        if not conf.enabled:
            return
        service = service_for(runtime, emit=runtime.hooks.on_event)
        self.service = service
        if runtime.role != ROLE_MAIN:
            return  # a receive worker only takes in mailed reports (receive_on_end_of_data); the store is shared
        if conf.dkim_key_file and conf.dkim_selector:
            await asyncio.to_thread(service.dkim_key)  # a bad key is a start-up error, not a silent gap
        else:
            log.warning("TLS-RPT: no DKIM key configured; reports to mailto: addresses will not be sent")
        await service.load_report_messages()
        await service.start_receiver()
        runtime.tasks.append(asyncio.ensure_future(service.run_forever()))

    @hookimpl
    async def mxgate_lifecycle_on_shutdown(self) -> None:
        if self.service is not None:
            await self.service.close()
            self.service = None

    @hookimpl
    def mxgate_delivery_on_tls_outcome(self, outcome: TlsOutcome) -> None:
        if self.service is not None:
            self.service.record(outcome)

    @hookimpl
    def mxgate_receive_on_end_of_data(self, envelope: Envelope, message: IncomingMessage) -> Verdict | None:
        service = self.service
        if service is not None and service.is_report_recipient(envelope.rcpt_tos):
            service.receive_mail_later(message.data)
        return None

    @hookimpl
    def mxgate_categorizer_resolve_recipient(self, recipient: Address) -> Sequence[Address] | None:
        service = self.service
        if service is not None and not service.conf.receive_deliver and service.is_report_recipient([recipient]):
            return []
        return None

    @hookimpl
    def mxgate_lifecycle_register_commands(self, subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        register(subparsers)
