"""The hook implementations: :class:`MtaStsPlugin` wires the engine, the policy server and the commands to the
gateway's lifecycle and delivery hooks."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from cryptography import x509

from mxgate import (
    AttemptContext,
    ConfigRegistry,
    Destination,
    MigrationRegistry,
    NextHop,
    PeerVerification,
    PolicyType,
    Resolver,
    Runtime,
    TlsOutcome,
    TlsPolicy,
    hookimpl,
    resolver_from_config,
)
from mxgate.plugins.mta_sts.cache import CLUSTER_SCHEMA
from mxgate.plugins.mta_sts.commands import register_cli
from mxgate.plugins.mta_sts.config import MTA_STS_MODE, PLUGIN_NAME, MtaStsConfig, is_policy_domain, section
from mxgate.plugins.mta_sts.engine import StsEngine, build_engine, build_tls_policy, trust_paths, verify_mx_certificate
from mxgate.plugins.mta_sts.policy import mx_matches
from mxgate.plugins.mta_sts.serve import PolicyServer, start_policy_server

__all__ = ["MtaStsPlugin"]


class MtaStsPlugin:
    """MTA-STS (RFC 8461): the fallback where DANE is absent."""

    name = PLUGIN_NAME
    priority = 45

    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        self.engine: StsEngine | None = None
        self.server: PolicyServer | None = None
        self._resolver: Resolver | None = None
        self._trust: tuple[str, ...] | None = None

    # -- lifecycle

    @hookimpl
    def mxgate_lifecycle_register_config(self, registry: ConfigRegistry) -> None:
        registry.add_connector_setting(MTA_STS_MODE, owner=self.name)
        registry.add_section(self.name, MtaStsConfig, owner=self.name)

    @hookimpl
    def mxgate_lifecycle_register_commands(self, subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        register_cli(subparsers)

    @hookimpl
    def mxgate_lifecycle_register_migrations(self, migrations: MigrationRegistry) -> None:
        migrations.add(PLUGIN_NAME, 1, "MTA-STS policy cache shared by the nodes", CLUSTER_SCHEMA)

    @hookimpl
    async def mxgate_lifecycle_on_startup(self, runtime: Runtime) -> None:
        self.runtime = runtime
        if not runtime.delivers:  # policies serve delivery: not a receive worker's job
            return
        config = runtime.config
        conf = section(config)
        self._trust = trust_paths(config, conf)
        shared = runtime.cluster.database(PLUGIN_NAME, schema="mta_sts") if runtime.cluster is not None else None
        self.engine = await build_engine(
            config, self._get_resolver, clock=runtime.clock, sink=runtime.hooks, shared=shared
        )
        if not runtime.runs_services:  # a command delivers once: policies yes, refresher and policy server no
            return
        runtime.tasks.append(asyncio.ensure_future(self.engine.run_refresher(conf.refresh_interval)))
        if conf.serve_listen:
            self.server = await start_policy_server(config, conf, runtime.hooks)

    @hookimpl
    async def mxgate_lifecycle_on_preflight(self, runtime: Runtime) -> list[str]:
        """``mxgate check``: every policy we serve names our host and every MX its domain publishes."""
        conf = section(runtime.config)
        hostname = runtime.config.server.hostname
        problems: list[str] = []
        for i, policy in enumerate(conf.serve_policies):
            if policy.mode == "none":
                continue
            where = f"plugins.mta_sts.serve_policies[{i}] ({policy.domain})"
            if not any(mx_matches(p, hostname) for p in policy.mx):
                problems.append(f"{where}: our host name {hostname} matches none of the mx patterns {list(policy.mx)}")
            if runtime.resolver is None:
                continue
            answer = await runtime.resolver.resolve(policy.domain, "MX")
            if answer.is_failure:
                problems.append(f"{where}: MX lookup failed ({answer.status}): {answer.error}")
                continue
            for rd in answer.records if answer.exists else ():
                mx = str(getattr(rd, "exchange", "")).rstrip(".").lower()
                if mx and not any(mx_matches(p, mx) for p in policy.mx):
                    problems.append(
                        f"{where}: MX {mx} matches none of the mx patterns {list(policy.mx)}: senders that honour "
                        f"the policy ({policy.mode}) will not deliver to it"
                    )
        return problems

    @hookimpl
    async def mxgate_lifecycle_on_shutdown(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None
        if self.engine is not None:
            await self.engine.cache.close()
            self.engine = None

    def _get_resolver(self) -> Resolver:
        if self.runtime is not None and self.runtime.resolver is not None:
            return self.runtime.resolver
        if self._resolver is None:
            assert self.runtime is not None
            self._resolver = resolver_from_config(self.runtime.config.dns)
        return self._resolver

    # -- delivery

    @hookimpl
    async def mxgate_delivery_resolve_tls_policy(self, destination: Destination, next_hop: NextHop) -> TlsPolicy | None:
        if self.runtime is None or self.engine is None:
            return None
        mode = destination.connector.get(MTA_STS_MODE)
        if mode == "none" or not is_policy_domain(destination.domain):
            return None  # an IP-literal smart host has no policy domain
        resolution = await self.engine.resolve(destination.domain)
        policy = build_tls_policy(resolution, mode, next_hop)
        mode_label = str(resolution.policy.mode) if resolution.policy is not None else "absent"
        await self.runtime.hooks.on_event("sts_policy", mode=mode_label, origin=resolution.origin)
        if resolution.fetch is not None and not resolution.fetch.ok and policy.failure is None:
            # The core reports a policy's own failure; a failed fetch behind a policy without one (no policy, or
            # the cached policy) is reported here, once per fetch, so TLS-RPT counts it.
            await self.runtime.hooks.on_tls_outcome(
                TlsOutcome(
                    connector=destination.connector.name,
                    policy_type=PolicyType.STS,
                    policy_domain=resolution.domain,
                    success=False,
                    result_type=resolution.fetch.status.result_type,
                    detail=resolution.fetch.detail,
                    at=self.runtime.clock(),
                )
            )
        return policy

    @hookimpl
    async def mxgate_delivery_on_tls_verify(
        self, attempt: AttemptContext, policy: TlsPolicy, chain: Sequence[x509.Certificate]
    ) -> PeerVerification | None:
        if policy.source != PLUGIN_NAME:
            return None  # DANE or the connector decided: not ours to judge
        clock = self.runtime.clock if self.runtime is not None else time.time
        now = datetime.fromtimestamp(clock(), UTC)
        return await asyncio.to_thread(
            verify_mx_certificate,
            attempt.host.name.rstrip(".").lower(),
            policy.mx_patterns,
            tuple(chain),
            now=now,
            trust_store_paths=self._trust,
        )

    @hookimpl
    def mxgate_delivery_on_tls_outcome(self, outcome: TlsOutcome) -> None:
        if self.engine is not None and outcome.policy_type is PolicyType.STS and not outcome.success:
            self.engine.recheck(outcome.policy_domain)
