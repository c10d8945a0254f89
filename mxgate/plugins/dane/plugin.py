"""The DANE agent's hooks: its connector setting, the per-destination TLS policy (with a short reuse of each
analysis), verification of the presented chain, preflight of our own TLSA, and the ``mxgate dane`` commands."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

from cryptography import x509

from mxgate import (
    DNSSEC_SELF_TEST,
    AttemptContext,
    ConfigRegistry,
    Destination,
    NextHop,
    PeerVerification,
    Runtime,
    TlsPolicy,
    hookimpl,
)
from mxgate.plugins.dane.commands import register_commands
from mxgate.plugins.dane.examine import HostDane, HostState, is_ip
from mxgate.plugins.dane.inbound import preflight_own_tlsa
from mxgate.plugins.dane.policy import DANE_MODE, DaneAnalysis, DaneMode, analyse
from mxgate.plugins.dane.verify import verify_chain

__all__ = ["ANALYSIS_REUSE_MAX", "ANALYSIS_REUSE_SECONDS", "DanePlugin"]


# One analysis serves every message to the same destination over the same next hop (same MX answer, same host
# order) with the same resolver self-test result for this long: under load it was one examination of every MX
# host per message (~10% of the delivering process's time in the dane benchmark), while the DNS answers it rests
# on come from the resolver's cache anyway. A TLSA or address record that changes is seen at most this much later
# than its TTL says; the examination (and its dane_tlsa_lookup events) then runs again.
ANALYSIS_REUSE_SECONDS: Final = 1.0
ANALYSIS_REUSE_MAX: Final = 4096  # destinations remembered at once (expired ones are dropped when it is full)


class DanePlugin:
    """DANE for SMTP (RFC 7672): TLSA-authenticated delivery, and tools for publishing our own TLSA."""

    name = "dane"
    priority = 40

    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        # (destination, next hop, self-test) -> (good until, analysis): see ANALYSIS_REUSE_SECONDS
        self._recent: dict[tuple[Destination, NextHop, object], tuple[float, DaneAnalysis]] = {}

    @hookimpl
    def mxgate_lifecycle_register_config(self, registry: ConfigRegistry) -> None:
        registry.add_connector_setting(DANE_MODE, owner=self.name)

    @hookimpl
    def mxgate_lifecycle_on_startup(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @hookimpl
    async def mxgate_lifecycle_on_preflight(self, runtime: Runtime) -> list[str]:
        return await preflight_own_tlsa(runtime)

    @hookimpl
    async def mxgate_delivery_resolve_tls_policy(self, destination: Destination, next_hop: NextHop) -> TlsPolicy | None:
        runtime = self.runtime
        if runtime is None or runtime.resolver is None or not next_hop.hosts:
            return None
        mode = DaneMode.of(destination.connector)
        if mode is DaneMode.NONE:
            return None
        if mode is DaneMode.OPPORTUNISTIC and all(is_ip(h.name) for h in next_hop.hosts):
            return None  # smart hosts by IP address: no TLSA to look up, nothing to say (every message asks)
        # Stash.get's default must have the key's type, hence no .get(DNSSEC_SELF_TEST, None)
        self_test = runtime.stash[DNSSEC_SELF_TEST] if DNSSEC_SELF_TEST in runtime.stash else None  # noqa: SIM401
        key = (destination, next_hop, self_test)
        now = asyncio.get_running_loop().time()
        recent = self._recent.get(key)
        if recent is not None and recent[0] > now:
            return recent[1].policy
        analysis = await analyse(runtime.resolver, destination, next_hop, mode=mode, self_test=self_test)
        if len(self._recent) >= ANALYSIS_REUSE_MAX:
            self._recent = {k: v for k, v in self._recent.items() if v[0] > now}
        if len(self._recent) < ANALYSIS_REUSE_MAX:
            self._recent[key] = (now + ANALYSIS_REUSE_SECONDS, analysis)
        for hd in analysis.hosts:
            await runtime.hooks.on_event("dane_tlsa_lookup", state=str(hd.state))
        return analysis.policy

    @hookimpl
    async def mxgate_delivery_on_tls_verify(
        self, attempt: AttemptContext, policy: TlsPolicy, chain: Sequence[x509.Certificate]
    ) -> PeerVerification | None:
        if policy.source != "dane":
            return None
        runtime = self.runtime
        hp = attempt.host_policy if attempt.host_policy is not None else policy.for_host(attempt.host.name)
        hd = hp.data if isinstance(hp.data, HostDane) else None
        now = datetime.fromtimestamp(runtime.clock() if runtime is not None else datetime.now(UTC).timestamp(), UTC)
        if hd is None or hd.state is not HostState.DANE:
            if hd is not None and hd.state is HostState.NO_USABLE:
                return PeerVerification(True, "untrusted", detail="TLSA present but none usable: encrypted only")
            # DANE does not govern this host (the core asks the policy that does): not ours to judge.
            return None
        check = await asyncio.to_thread(verify_chain, tuple(chain), hd.usable, hd.reference_ids, now)
        if runtime is not None:
            await runtime.hooks.on_event(
                "dane_verification",
                result="ok" if check.ok else "failed",
                result_type=str(check.result_type or ""),
                usage=str(check.matched.usage) if check.matched is not None else "",
            )
        if check.ok:
            return PeerVerification(
                True, hd.label, matched=check.matched.params if check.matched else None, detail=check.detail
            )
        return PeerVerification(
            False,
            "untrusted",
            check.result_type,
            matched=check.matched.params if check.matched else None,
            detail=check.detail,
        )

    @hookimpl
    def mxgate_lifecycle_register_commands(self, subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        register_commands(subparsers)
