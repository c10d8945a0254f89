"""The thin driver: runs the attempt plan with the SMTP client (STYLE.md: "make the decision a socket-free plan
and the I/O a thin driver").

:class:`Deliverer` resolves the next hop (hook), asks for the TLS policies (hook), filters the MX hosts by an
enforcing policy's patterns, decides each host's policy (:func:`~mxgate.core.delivery.policy.decide_host`), and
tries the hosts in order (every address, IPv6 and IPv4): connect, EHLO, STARTTLS as the host's level demands
(whatever the peer sent after its 220 is discarded), ``on_tls_verify`` with the policy governing that host, one
``on_tls_outcome`` per TLS attempt (:mod:`~mxgate.core.delivery.outcome`), AUTH, then the mail transaction
(:mod:`~mxgate.core.delivery.transaction`), reporting one :class:`~mxgate.core.delivery.model.RecipientOutcome`
per recipient. What to do at each step — and every failure
reply — comes from :class:`~mxgate.core.delivery.plan.AttemptPlan`; established sessions are kept for reuse by
:class:`~mxgate.core.delivery.pool.SessionPool`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from mxgate.core.delivery.model import (
    DEFERRED,
    DELIVERED,
    FAILED,
    DeliveryResult,
    OutgoingMessage,
)
from mxgate.core.delivery.outcome import tls_outcome
from mxgate.core.delivery.plan import (
    AttemptFailure,
    AttemptPlan,
    DestinationPlan,
    Next,
    Step,
    TlsReport,
    connect_failed,
    connection_lost,
    describe_host_policy,
    final_verdict,
    host_gate,
    judge,
    local_reply,
    no_address,
    plan_destination,
    requiretls_gate,
)
from mxgate.core.delivery.policy import TlsDecision, connector_policy, is_ip
from mxgate.core.delivery.pool import PooledSession, SessionKey, SessionPool
from mxgate.core.delivery.transaction import AttemptLog, capabilities_of, same_for_all, send_message
from mxgate.core.outcomes import (
    AttemptContext,
    Destination,
    HopHost,
    NextHop,
    PeerVerification,
    TlsPolicy,
    TlsRptResult,
)
from mxgate.core.smtp.client import SmtpClient, SmtpClientError, SmtpConnectionError, StaleSession
from mxgate.core.tls import client_context, describe, peer_chain

if TYPE_CHECKING:
    from cryptography import x509

    from mxgate.connectors.outbound import OutboundConnector
    from mxgate.core.runtime import Runtime

__all__ = ["Deliverer"]

log = logging.getLogger(__name__)


class Deliverer:
    """Delivers one destination's recipients of one message through its outbound connector.

    Keeps idle sessions for reuse (:class:`~mxgate.core.delivery.pool.SessionPool`); :meth:`close` QUITs what is
    pooled.

    :param reuse: ``False`` never keeps a session (one-shot deliveries such as ``connector validate``).
    :param probe: run attempts only up to the ready session (no AUTH, no transaction; QUIT instead) and record
        no TLS outcomes (``mxgate explain --connect``: a test is not a session TLS-RPT counts).
    :param timeout_cap: seconds; caps the connector's ``connect_timeout`` and ``command_timeout`` (recipient
        callouts, which a client is waiting on).
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        reuse: bool = True,
        probe: bool = False,
        timeout_cap: float | None = None,
    ) -> None:
        self.runtime = runtime
        self._probe = probe
        self._timeout_cap = timeout_cap
        self.pool = SessionPool(runtime.tasks, keep=reuse and not probe)
        # the connector's own policy per (connector, domain): the same for every message of a destination
        self._fallbacks: dict[tuple[int, str], TlsPolicy] = {}

    @property
    def idle_sessions(self) -> int:
        """Sessions pooled now."""
        return self.pool.idle_sessions

    async def close(self) -> None:
        """QUIT every pooled session and keep no more sessions from now on. Idempotent."""
        await self.pool.close()

    # -- entry point -------------------------------------------------------------------------------------

    async def deliver(self, destination: Destination, message: OutgoingMessage) -> DeliveryResult:
        runtime = self.runtime
        connector = destination.connector
        if self._timeout_cap is not None:
            cap = self._timeout_cap
            connector = replace(
                connector,
                connect_timeout=min(connector.connect_timeout, cap),
                command_timeout=min(connector.command_timeout, cap),
            )
        rec = AttemptLog()
        if connector.test_mode:
            rec.steps.append(f"connector {connector.name} is in test mode: nothing sent")
            reply = local_reply(250, "2.0.0", "test mode: not sent")
            return same_for_all(destination, message, DELIVERED, reply, "2.0.0", rec)

        next_hop = await runtime.hooks.resolve_next_hop(destination)
        if next_hop is None:
            reply = local_reply(451, "4.4.0", "no next hop resolver answered")
            return same_for_all(destination, message, DEFERRED, reply, "4.4.0", rec)
        rec.steps.append(f"next hop ({next_hop.kind}): " + (", ".join(_host_label(h) for h in next_hop.hosts) or "-"))
        if next_hop.kind == "null_mx":
            reply = local_reply(556, "5.1.10", f"recipient domain {destination.domain} accepts no mail (null MX)")
            return same_for_all(destination, message, FAILED, reply, "5.1.10", rec)
        if next_hop.kind == "error" or not next_hop.hosts:
            why = next_hop.error or "no hosts to deliver to"
            if next_hop.permanent:
                return same_for_all(destination, message, FAILED, local_reply(550, "5.1.2", why), "5.1.2", rec)
            return same_for_all(destination, message, DEFERRED, local_reply(451, "4.4.3", why), "4.4.3", rec)

        fallback = self._fallback(connector, destination)
        if message.tls_optional:
            # RFC 8689 section 5: the recipient's policies (DANE, MTA-STS) are ignored; the connector's own
            # setting, which is the operator's local policy, still holds.
            policies = []
            rec.steps.append("TLS-Required: No: DANE and MTA-STS policies do not apply to this message")
        else:
            policies = await runtime.hooks.resolve_tls_policy(destination, next_hop)
        dplan = plan_destination(next_hop, policies, fallback)
        decision = dplan.decision
        policy = decision.policy
        rec.steps.append(
            f"TLS policy: {policy.source} ({policy.policy_type}, level {policy.level.name}"
            + (", report only" if decision.report_only else "")
            + (
                f", enforced by {decision.enforce.source} level {decision.enforce.level.name}"
                if decision.report_only
                else ""
            )
            + ")"
        )
        if policy.failure is not None:
            # the destination-wide view: its highest-precedence applicable policy could not be established
            await self._outcome(
                connector.name,
                decision,
                None,
                None,
                TlsReport(False, policy.failure, policy.detail or f"{policy.source} policy lookup failed"),
                message.queue_id,
            )
        if dplan.failure is not None:
            status = policy.status_for(dplan.failure)
            why = f"TLS policy ({policy.source}) unavailable: {dplan.failure}"
            reply = local_reply(451, status, f"{why} ({policy.detail})" if policy.detail else why)
            rec.steps.append(reply)
            return same_for_all(destination, message, DEFERRED, reply, status, rec)

        # An enforcing policy's mx patterns filter ALL candidates, whether or not DANE governs a host (RFC 8461
        # §4.1). Report-only (MTA-STS testing): hosts outside the patterns are still dialled; the policy's own
        # on_tls_verify reports the mismatch for the session actually made, so it is counted once.
        for dropped in dplan.dropped:
            rec.steps.append(f"{dropped.name}: not in the mx patterns of the enforced policy: not dialled")
        if not dplan.hosts:
            filtering = dplan.filtering
            assert filtering is not None
            await self._outcome(
                connector.name,
                TlsDecision(filtering, filtering),
                None,
                None,
                TlsReport(False, TlsRptResult.VALIDATION_FAILURE, "no MX host matches the policy's mx patterns"),
                message.queue_id,
            )
            reply = local_reply(
                451, "4.7.5", f"no MX host of {destination.domain} matches the {filtering.source} policy"
            )
            rec.steps.append(reply)
            return same_for_all(destination, message, DEFERRED, reply, "4.7.5", rec)

        for host in dplan.hosts:
            outcome = await self._try_host(connector, destination, dplan, host, message, rec)
            if outcome is not None:
                return outcome
        verdict = final_verdict(rec.failures)
        return same_for_all(
            destination, message, verdict.result, verdict.reply, verdict.status, rec, remote=verdict.remote
        )

    # -- hosts and addresses -----------------------------------------------------------------------------

    async def plan(self, destination: Destination, message: OutgoingMessage | None = None) -> DestinationPlan | None:
        """The :class:`DestinationPlan` delivery would follow now (next hop and policies from the hooks), or
        ``None`` when no next hop resolver answered. ``mxgate explain`` shows it."""
        connector = destination.connector
        next_hop = await self.runtime.hooks.resolve_next_hop(destination)
        if next_hop is None:
            return None
        fallback = connector_policy(connector, destination)
        if message is not None and message.tls_optional:
            return plan_destination(next_hop, [], fallback)
        return plan_destination(next_hop, await self.runtime.hooks.resolve_tls_policy(destination, next_hop), fallback)

    async def probe_address(
        self, destination: Destination, dplan: DestinationPlan, host: HopHost, address: str
    ) -> tuple[DeliveryResult | None, AttemptFailure | None, PeerVerification | None, tuple[str, ...]]:
        """One connection to ``address`` of ``host`` under its per-host policy, exactly as delivery makes it, up
        to the ready session (a :class:`Deliverer` made with ``probe=True``): (the result when the session was
        ready, the failure otherwise, the verification, the steps)."""
        connector = destination.connector
        assert self._probe
        decision, enforce_hp, report_hp = dplan.decide(host)
        rec = AttemptLog()
        plan = AttemptPlan(f"{host.name}[{address}]:{host.port}", decision, enforce_hp, report_hp)
        probe = OutgoingMessage("probe", "", (), b"")
        result = await self._try_address(connector, destination, dplan.next_hop, host, address, probe, rec, plan, None)
        return result, rec.failures[-1] if rec.failures else None, rec.verification, tuple(rec.steps)

    async def addresses(self, host: HopHost) -> tuple[str, ...]:
        """The addresses to dial for ``host`` (those the next hop carries, else looked up now)."""
        return await self._addresses(host)

    async def _addresses(self, host: HopHost) -> tuple[str, ...]:
        if host.addresses:
            return host.addresses
        if is_ip(host.name):
            return (host.name.strip("[]"),)
        resolver = self.runtime.resolver
        if resolver is None:
            return ()
        return (await resolver.host_addresses(host.name)).addresses

    async def _try_host(
        self,
        connector: OutboundConnector,
        destination: Destination,
        dplan: DestinationPlan,
        host: HopHost,
        message: OutgoingMessage,
        rec: AttemptLog,
    ) -> DeliveryResult | None:
        next_hop = dplan.next_hop
        decision, enforce_hp, report_hp = dplan.decide(host)
        rec.steps.append(f"{host.name}: {describe_host_policy(decision, enforce_hp)}")
        gate = host_gate(decision, host, enforce_hp, report_hp)
        for report in gate.reports:
            await self._outcome(connector.name, decision, None, host, report, message.queue_id)
        if gate.failure is not None:
            rec.fail(gate.failure, gate.note)
            return None
        gate = requiretls_gate(message.requiretls, decision, host, enforce_hp)
        if gate.failure is not None:
            rec.fail(gate.failure, gate.note)
            return None
        key: SessionKey | None = None
        if connector.connection_reuse and not self.pool.closed:
            key = SessionKey.of(connector, destination, next_hop, decision, host, enforce_hp, message)
            # Postfix's liveness check of a cached session, RSET, goes in front of the transaction (pipelined
            # where the peer offers PIPELINING: one write and one round trip fewer per message); a session that
            # fails it is dropped silently and the next one tried, then a new connection.
            while (session := self.pool.take(key, connector)) is not None:
                mark = len(rec.steps)
                rec.steps.append(f"reusing session to {session.where} (message {session.messages + 1} on it)")
                try:
                    # None: this host cannot take the message (recorded); the same host on a new session could
                    # not either, so on to the next host.
                    result = await send_message(
                        self.pool, session, key, connector, destination, host, message, rec, reset=True
                    )
                except StaleSession as exc:
                    log.debug("pooled session unusable", extra={"peer": session.where, "error": str(exc)})
                    session.client.abort()
                    session.client.transcript.clear()
                    del rec.steps[mark:]
                    continue
                await self.runtime.hooks.on_event("outbound_session_reused", connector=connector.name)
                return result
        addresses = await self._addresses(host)
        if not addresses:
            rec.fail(no_address(host), f"{host.name}: no usable address")
            return None
        for address in addresses:
            plan = AttemptPlan(
                f"{host.name}[{address}]:{host.port}",
                decision,
                enforce_hp,
                report_hp,
                auth=bool(connector.auth_username),
            )
            result = await self._try_address(connector, destination, next_hop, host, address, message, rec, plan, key)
            if result is not None:
                return result
        return None

    async def _try_address(
        self,
        connector: OutboundConnector,
        destination: Destination,
        next_hop: NextHop,
        host: HopHost,
        address: str,
        message: OutgoingMessage,
        rec: AttemptLog,
        plan: AttemptPlan,
        key: SessionKey | None,
    ) -> DeliveryResult | None:
        """One connection, run by ``plan``: the driver does the I/O and records what the plan decides."""
        runtime = self.runtime
        where = plan.where
        decision = plan.decision
        opened = asyncio.get_running_loop().time()
        try:
            client = await SmtpClient.connect(
                address,
                host.port,
                timeout=connector.command_timeout,
                connect_timeout=connector.connect_timeout,
                source_address=connector.source_address,
            )
        except SmtpClientError as exc:
            rec.fail(connect_failed(where, exc), f"{where}: {exc}")
            return None
        rec.steps.append(f"connected to {where}")
        tls_info: str | None = None
        verification: PeerVerification | None = None
        try:
            assert client.banner is not None
            step = plan.greeting(client.banner)
            if step is None:
                ehlo = await client.ehlo(runtime.config.server.hostname)
                step = plan.ehlo(ehlo, capabilities_of(client))
            sni = plan.enforce_hp.sni or plan.report_hp.sni or (None if is_ip(host.name) else host.name.rstrip("."))
            while isinstance(step, Next):
                if step.note:
                    rec.steps.append(step.note)
                if step.report is not None:
                    await self._outcome(connector.name, decision, client, host, step.report, message.queue_id)
                if step.step is Step.STARTTLS:
                    try:
                        reply = await client.starttls(client_context(verify=False), sni)
                    except SmtpConnectionError as exc:
                        step = plan.starttls(None, str(exc))
                        continue
                    step = plan.starttls(reply)
                elif step.step is Step.RETRY_CLEARTEXT:
                    retry = replace(plan, cleartext=True)
                    return await self._try_address(
                        connector, destination, next_hop, host, address, message, rec, retry, key
                    )
                elif step.step is Step.VERIFY:
                    ssl_object = client.ssl_object
                    assert ssl_object is not None
                    info = describe(ssl_object)
                    tls_info = f"{info.version} {info.cipher}"
                    rec.steps.append(
                        f"{where}: TLS {tls_info} (SNI {sni or '-'})"
                        + (
                            f"; discarded {client.discarded_after_starttls} bytes sent after 220"
                            if client.discarded_after_starttls
                            else ""
                        )
                    )
                    peer_ip, peer_port = _peer(client)
                    attempt = AttemptContext(
                        connector=connector.name,
                        destination=destination,
                        next_hop=next_hop,
                        host=host,
                        peer_ip=peer_ip,
                        peer_port=peer_port,
                        sni=sni,
                        peer_helo=client.peer_ehlo_name,
                        tls_version=info.version,
                        cipher=info.cipher,
                        mx_secure=next_hop.mx_secure,
                        host_policy=plan.enforce_hp,
                        at=runtime.clock(),
                    )
                    verdict = judge(plan, *await self._verify(plan, attempt, tuple(peer_chain(ssl_object))))
                    verification = rec.verification = verdict.verification
                    step = plan.verified(verdict)
                elif step.step is Step.EHLO_AGAIN:
                    step = plan.ehlo_again(await client.ehlo(runtime.config.server.hostname))
                elif step.step is Step.AUTH:
                    auth = await client.auth(connector.auth_username or "", self._password(connector))
                    step = plan.authenticated(auth)
                elif self._probe:  # Step.SEND, but only testing: the session is ready, QUIT
                    await client.quit()
                    return DeliveryResult(
                        destination,
                        (),
                        mx_host=host.name,
                        peer_ip=client.host,
                        tls=tls_info,
                        verification=verification.label if verification is not None else None,
                        steps=tuple(rec.steps),
                    )
                else:  # Step.SEND
                    session = PooledSession(client, where, tls_info, verification, opened)
                    return await send_message(self.pool, session, key, connector, destination, host, message, rec)
            if step.report is not None:
                await self._outcome(connector.name, decision, client, host, step.report, message.queue_id)
            rec.fail(step.failure, step.note)
            await client.quit()
            return None
        except SmtpClientError as exc:
            rec.fail(connection_lost(where, exc), f"{where}: {exc}")
            client.abort()
            return None
        except asyncio.CancelledError:  # a caller's deadline (a callout) or shutdown: no half-open session left
            client.abort()
            raise
        finally:
            rec.transcript.extend(client.transcript)
            client.transcript.clear()

    async def _verify(
        self, plan: AttemptPlan, attempt: AttemptContext, chain: tuple[x509.Certificate, ...]
    ) -> tuple[PeerVerification | None, PeerVerification | None]:
        """Ask ``on_tls_verify`` what the plan needs: (the enforced policy's answer, the report-only one's)."""
        hooks = self.runtime.hooks
        enforce_asked, report_asked = plan.needs_verification()
        decision = plan.decision
        enforced = await hooks.on_tls_verify(attempt, decision.enforce, chain) if enforce_asked else None
        reported = None
        if report_asked:
            reported = await hooks.on_tls_verify(replace(attempt, host_policy=plan.report_hp), decision.policy, chain)
        return enforced, reported

    async def _outcome(
        self,
        connector: str,
        decision: TlsDecision,
        client: SmtpClient | None,
        host: HopHost | None,
        report: TlsReport,
        queue_id: str | None = None,
    ) -> None:
        if self._probe:
            return
        outcome = tls_outcome(connector, decision, client, host, report, queue_id, self.runtime.clock())
        await self.runtime.hooks.on_tls_outcome(outcome)

    def _fallback(self, connector: OutboundConnector, destination: Destination) -> TlsPolicy:
        """:func:`connector_policy`, made once per connector object and domain (keyed by identity: hashing a
        connector compares every setting; the policy carries the connector itself, which tells a reused id)."""
        key = (id(connector), destination.domain)
        policy = self._fallbacks.get(key)
        if policy is None or policy.data is not connector:
            if len(self._fallbacks) >= 4096:
                self._fallbacks.clear()
            policy = self._fallbacks[key] = connector_policy(connector, destination)
        return policy

    def _password(self, connector: OutboundConnector) -> str:
        if not connector.auth_password_file:
            return ""
        path = self.runtime.config.path(connector.auth_password_file)
        text = path.read_text(encoding="utf-8")
        return text.splitlines()[0] if text else ""


def _peer(client: SmtpClient) -> tuple[str, int]:
    return client.host, client.port


def _host_label(h: HopHost) -> str:
    addrs = ",".join(h.addresses) if h.addresses else "?"
    pref = f"{h.preference} " if h.preference else ""
    return f"{pref}{h.name}[{addrs}]:{h.port}{' (secure)' if h.secure else ''}"
