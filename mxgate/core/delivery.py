"""Delivery attempts through outbound connectors: "what to do" apart from "doing it" (STYLE.md).

What to do (pure functions, tested without sockets):

* :func:`combine_policies`: the TLS opinions of the policy plugins (DANE, MTA-STS, the connector's own ``tls``)
  combined by precedence (RFC 8461 §2: DANE > MTA-STS > connector): the applicable opinion of the highest
  ``precedence`` decides; a ``report_only`` one (MTA-STS "testing") is verified and reported, while the next
  applicable, enforcing opinion is what the attempt must satisfy.
* :func:`filter_hosts`: MTA-STS ``mx`` patterns filter the MX candidates BEFORE connecting (RFC 8461 §4.1).
* :func:`needs_smtputf8`, :func:`needs_8bitmime`: what the message needs of the peer.

Doing it (:class:`Deliverer`): resolve the next hop (hook), ask for TLS policies (hook), try the hosts in order
(every address, IPv6 and IPv4), EHLO, STARTTLS as the level demands (outbound, whatever the peer sent after its
220 is discarded), call ``on_tls_verify`` with the policy that decided, emit one ``on_tls_outcome`` per TLS
attempt, MAIL/RCPT/DATA pipelined where offered, and report one :class:`RecipientOutcome` per recipient. After a
transaction the session is kept, idle, for the next message with the same :class:`SessionKey` (connector,
destination, host, TLS requirements), which checks it with RSET and skips connect, EHLO, STARTTLS and AUTH.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from mxgate.core.outcomes import (
    Destination,
    HopHost,
    HostPolicy,
    NextHop,
    PeerVerification,
    PolicyType,
    TlsLevel,
    TlsOutcome,
    TlsPolicy,
    TlsRptResult,
)
from mxgate.core.smtp.client import SmtpClient, SmtpClientError, SmtpConnectionError
from mxgate.core.tls import client_context, describe, peer_chain

if TYPE_CHECKING:
    from cryptography import x509

    from mxgate.connectors.outbound import OutboundConnector
    from mxgate.core.runtime import Runtime

__all__ = [
    "AttemptContext",
    "Deliverer",
    "DeliveryResult",
    "OutgoingMessage",
    "RecipientOutcome",
    "SessionKey",
    "TlsDecision",
    "combine_policies",
    "connector_level",
    "filter_hosts",
    "mx_pattern_matches",
    "needs_8bitmime",
    "needs_smtputf8",
]

log = logging.getLogger(__name__)

DELIVERED = "delivered"
DEFERRED = "deferred"
FAILED = "failed"

CONNECTOR_PRECEDENCE = 100
#: Longest wait for the reply to the RSET that checks a pooled session before reuse (Postfix's smtp_rset_timeout).
RSET_TIMEOUT = 20.0
#: Longest wait for the reply to QUIT when pooled sessions are closed by :meth:`Deliverer.close`.
QUIT_TIMEOUT = 2.0
_LEVELS = {
    "none": TlsLevel.NONE,
    "opportunistic": TlsLevel.MAY,
    "encryption_only": TlsLevel.ENCRYPT,
    "certificate_validation": TlsLevel.VERIFY,
    "domain_validation": TlsLevel.SECURE,
}


# ============================================================================================================
# records
# ============================================================================================================


@dataclass(frozen=True, slots=True)
class AttemptContext:
    """One connection attempt as ``on_tls_verify`` sees it (after the TLS handshake)."""

    connector: str
    destination: Destination
    next_hop: NextHop
    host: HopHost  # the MX or smart host dialled
    peer_ip: str
    peer_port: int
    sni: str | None  # the server name we sent
    peer_helo: str | None = None  # the name in the peer's banner / EHLO reply
    tls_version: str | None = None
    cipher: str | None = None
    mx_secure: bool = False  # the MX RRset was DNSSEC-secure (RFC 7672 §2.2.1)
    host_policy: HostPolicy | None = None  # the deciding policy's refinement for this host
    at: float = 0.0  # unix time of the attempt

    @property
    def host_secure(self) -> bool:
        return self.host.secure


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """What one transaction carries."""

    queue_id: str
    sender: str  # "" = null reverse-path
    recipients: tuple[str, ...]
    data: bytes
    received_at: float = 0.0
    envid: str | None = None
    smtputf8: bool = False  # the client asked for SMTPUTF8 when it gave us the message
    body_8bit: bool = False  # BODY=8BITMIME was declared
    tls_optional: bool = False  # RFC 8689 "TLS-Required: No": recipient-side policies (DANE, MTA-STS) do not bind


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    recipient: str
    result: str  # "delivered" | "deferred" | "failed"
    reply: str  # "250 2.0.0 Ok", or our own text for local failures
    status: str  # RFC 3463 code
    mx_host: str | None = None
    remote: bool = False  # the reply came from the remote server (DSN Diagnostic-Code)


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    destination: Destination
    outcomes: tuple[RecipientOutcome, ...]
    mx_host: str | None = None
    peer_ip: str | None = None
    tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384" when the transaction ran under TLS
    verification: str | None = None
    steps: tuple[str, ...] = ()  # what happened, for `connector validate` and logs
    transcript: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TlsDecision:
    """``policy`` decided (and is reported); ``enforce`` is what an attempt must satisfy (the same policy unless
    the deciding one is report-only)."""

    policy: TlsPolicy
    enforce: TlsPolicy

    @property
    def report_only(self) -> bool:
        return self.policy.report_only and self.policy is not self.enforce


@dataclass(frozen=True, slots=True)
class SessionKey:
    """When an idle session may carry another message: only for a delivery that would have set up an equivalent
    session — same connector (its settings, AUTH user included), destination, host and port, and the same TLS
    requirements. The address dialled does not matter (any address of the host would do)."""

    connector: OutboundConnector  # name, tls settings, CA file, source address, AUTH user
    destination: Destination
    host: str  # lower case, without the final dot
    port: int
    host_secure: bool  # how the host was found (DNSSEC): DANE's "verified" vs "trusted"
    mx_secure: bool
    host_policy: HostPolicy  # the enforced refinement: level, SNI, reference ids, usable
    host_policy_data: str  # repr of its ``data`` (DANE: the TLSA RRset), which HostPolicy does not compare
    enforce_source: str
    enforce_level: TlsLevel
    enforce_type: PolicyType
    mx_patterns: tuple[str, ...]
    reference_ids: tuple[str, ...]
    policy_strings: tuple[str, ...]  # MTA-STS: the policy text, so a new policy is a new key
    report_source: str | None  # the report-only policy (MTA-STS testing), if any
    tls_optional: bool  # RFC 8689 TLS-Required: No
    auth_username: str | None

    @classmethod
    def of(
        cls,
        connector: OutboundConnector,
        destination: Destination,
        next_hop: NextHop,
        decision: TlsDecision,
        host: HopHost,
        enforce_hp: HostPolicy,
        message: OutgoingMessage,
    ) -> SessionKey:
        enforce = decision.enforce
        return cls(
            connector=connector,
            destination=destination,
            host=host.name.lower().rstrip("."),
            port=host.port,
            host_secure=host.secure,
            mx_secure=next_hop.mx_secure,
            host_policy=enforce_hp,
            host_policy_data=repr(enforce_hp.data),
            enforce_source=enforce.source,
            enforce_level=enforce.level,
            enforce_type=enforce.policy_type,
            mx_patterns=enforce.mx_patterns,
            reference_ids=enforce.reference_ids,
            policy_strings=enforce.policy_strings,
            report_source=decision.policy.source if decision.report_only else None,
            tls_optional=message.tls_optional,
            auth_username=connector.auth_username,
        )


# ============================================================================================================
# what to do
# ============================================================================================================


def connector_level(tls: str) -> TlsLevel:
    """The :class:`TlsLevel` of an outbound connector's ``tls`` setting."""
    try:
        return _LEVELS[tls]
    except KeyError:
        raise ValueError(f"unknown connector tls mode {tls!r}") from None


def connector_policy(connector: OutboundConnector, destination: Destination) -> TlsPolicy:
    """The connector's own opinion (precedence 100)."""
    return TlsPolicy(
        source="connector",
        policy_type=PolicyType.NO_POLICY,
        policy_domain=destination.domain,
        level=connector_level(connector.tls),
        precedence=CONNECTOR_PRECEDENCE,
        reference_ids=(connector.tls_domain,) if connector.tls_domain else (),
        detail=f"connector {connector.name} tls={connector.tls}",
        data=connector,
    )


def combine_policies(policies: Sequence[TlsPolicy], fallback: TlsPolicy) -> TlsDecision:
    """Highest ``precedence`` applicable opinion decides (file order among equals); ``fallback`` when none
    applies. A report-only deciding policy is enforced by the next applicable enforcing one.

    This is the destination-wide view (whose lookup failure defers the whole destination); each host is decided
    by :func:`decide_host`."""
    applying = sorted((p for p in policies if p.applies), key=lambda p: -p.precedence)
    if not applying:
        return TlsDecision(fallback, fallback)
    deciding = applying[0]
    if not deciding.report_only:
        return TlsDecision(deciding, deciding)
    enforce = next((p for p in applying[1:] if not p.report_only), fallback)
    return TlsDecision(deciding, enforce)


def decide_host(policies: Sequence[TlsPolicy], fallback: TlsPolicy, host: HopHost | str) -> TlsDecision:
    """The per-host policy (RFC 7672 §2.2, RFC 8461 §2; RFC-CHECKLIST 37): among the applicable policies that
    have an opinion on THIS host (:attr:`HostPolicy.applies`), the highest ``precedence`` decides — DANE where
    it applies to the host, else MTA-STS, else the connector (``fallback``). A report-only deciding policy (MTA-STS
    testing) is enforced by the next one with an opinion on the host. One host's TLSA records never change
    another host's policy, and a host DANE governs is never rescued by MTA-STS."""
    name = host if isinstance(host, str) else host.name
    governing = [p for p in policies if p.applies and p.for_host(name).applies]
    return combine_policies(governing, fallback)


def enforced_mx_patterns(policies: Sequence[TlsPolicy]) -> tuple[tuple[TlsPolicy, tuple[str, ...]], ...]:
    """The ``mx`` patterns every candidate MX host must match: those of each applicable, enforcing policy that
    has them (MTA-STS ``enforce``), whichever policy later governs the host (RFC 8461 §4.1, RFC-CHECKLIST 36)."""
    return tuple((p, p.mx_patterns) for p in policies if p.applies and not p.report_only and p.mx_patterns)


def filter_hosts_by_policies(
    hosts: Sequence[HopHost], policies: Sequence[TlsPolicy]
) -> tuple[tuple[HopHost, ...], TlsPolicy | None]:
    """``hosts`` filtered by :func:`enforced_mx_patterns` (all of them, DANE or not), and the first policy that
    filtered any host out (for the outcome record when none is left)."""
    kept = tuple(hosts)
    first: TlsPolicy | None = None
    for policy, patterns in enforced_mx_patterns(policies):
        left = filter_hosts(kept, patterns)
        if len(left) != len(kept) and first is None:
            first = policy
        kept = left
    return kept, first


def mx_pattern_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: exact, or ``*.example.com`` = exactly one label in front of ``example.com``."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return host == pattern


def filter_hosts(hosts: Sequence[HopHost], patterns: Sequence[str]) -> tuple[HopHost, ...]:
    """The hosts whose names match one of ``patterns`` (all hosts when there are no patterns)."""
    if not patterns:
        return tuple(hosts)
    return tuple(h for h in hosts if any(mx_pattern_matches(p, h.name) for p in patterns))


def needs_smtputf8(message: OutgoingMessage) -> bool:
    return message.smtputf8 or not message.sender.isascii() or not all(r.isascii() for r in message.recipients)


def needs_8bitmime(message: OutgoingMessage) -> bool:
    return message.body_8bit or not message.data.isascii()


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def _local(code: int, status: str, text: str) -> str:
    return f"{code} {status} {text}"


# ============================================================================================================
# doing it
# ============================================================================================================


@dataclass
class _HostFailure:
    reply: str  # what to tell the queue ("451 4.4.1 ...")
    status: str
    permanent: bool = False
    remote: bool = False


@dataclass
class _Attempt:
    """Mutable bookkeeping of one delivery (several hosts, several addresses)."""

    steps: list[str] = field(default_factory=list)
    transcript: list[str] = field(default_factory=list)
    failures: list[_HostFailure] = field(default_factory=list)


@dataclass(eq=False)
class _Session:
    """An established session (banner, EHLO, STARTTLS, verification, AUTH done) and what its first delivery
    learnt, kept with it so that a reuse reports the same TLS and verification."""

    client: SmtpClient
    where: str  # "host[ip]:port"
    tls_info: str | None
    verification: PeerVerification | None
    opened: float  # loop time of the connect
    messages: int = 0  # transactions started on it
    timer: asyncio.TimerHandle | None = None  # idle expiry while pooled


AddressResolver = Callable[[str], Awaitable[tuple[str, ...]]]


class Deliverer:
    """Delivers one destination's recipients of one message through its outbound connector.

    Keeps idle sessions for reuse (Postfix's connection cache): after a transaction, a healthy session goes into
    a pool under its :class:`SessionKey` instead of QUIT; the next delivery with the same key checks it with RSET
    and sends over it. Limits per connector: ``connection_reuse``, ``connection_idle_timeout``,
    ``connection_reuse_limit``, ``connection_max_age``, and at most ``max_connections_per_destination`` idle
    sessions per key. :meth:`close` QUITs what is pooled; if nobody calls it, a keeper task in ``runtime.tasks``
    closes the pooled sessions when the engine cancels it at shutdown (or the event loop ends).

    :param reuse: ``False`` never keeps a session (one-shot deliveries such as ``connector validate``).
    """

    def __init__(
        self, runtime: Runtime, *, resolve_addresses: AddressResolver | None = None, reuse: bool = True
    ) -> None:
        self.runtime = runtime
        self._resolve_addresses = resolve_addresses
        self._idle: dict[SessionKey, list[_Session]] = {}  # most recently pooled last
        self._closed = not reuse
        self._keeper: asyncio.Task[None] | None = None

    @property
    def idle_sessions(self) -> int:
        """Sessions pooled now."""
        return sum(len(v) for v in self._idle.values())

    async def close(self) -> None:
        """QUIT every pooled session (concurrently, each bounded by :data:`QUIT_TIMEOUT`) and keep no more
        sessions from now on. Idempotent."""
        self._closed = True
        sessions = self._empty()
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
        if sessions:
            await asyncio.gather(*(_quit(s.client) for s in sessions), return_exceptions=True)

    def _empty(self) -> list[_Session]:
        """Every pooled session, out of the pool, timers cancelled."""
        sessions = [s for idle in self._idle.values() for s in idle]
        self._idle.clear()
        for session in sessions:
            if session.timer is not None:
                session.timer.cancel()
                session.timer = None
        return sessions

    @staticmethod
    async def _keep() -> None:
        """The keeper: waits to be cancelled (engine shutdown, end of the event loop); see :meth:`_kept`."""
        await asyncio.get_running_loop().create_future()

    def _kept(self, keeper: asyncio.Task[None]) -> None:
        """The keeper ended (a done callback, so also when it was cancelled before it ran): close what is pooled
        at once (QUIT written, connection dropped: nothing left to wait on) and keep nothing more."""
        with contextlib.suppress(ValueError):
            self.runtime.tasks.remove(keeper)
        self._closed = True
        for session in self._empty():
            session.client.quit_nowait()
            session.client.abort()

    # -- entry point -------------------------------------------------------------------------------------

    async def deliver(self, destination: Destination, message: OutgoingMessage) -> DeliveryResult:
        runtime = self.runtime
        connector = runtime.config.outbound(destination.connector)
        rec = _Attempt()
        if connector is None:
            reply = _local(451, "4.3.5", f"outbound connector {destination.connector!r} is not configured")
            return self._all(destination, message, DEFERRED, reply, "4.3.5", rec)
        if connector.test_mode:
            rec.steps.append(f"connector {connector.name} is in test mode: nothing sent")
            return self._all(destination, message, DELIVERED, _local(250, "2.0.0", "test mode: not sent"), "2.0.0", rec)

        next_hop = await runtime.hooks.resolve_next_hop(destination)
        if next_hop is None:
            reply = _local(451, "4.4.0", "no next hop resolver answered")
            return self._all(destination, message, DEFERRED, reply, "4.4.0", rec)
        rec.steps.append(f"next hop ({next_hop.kind}): " + (", ".join(_host_label(h) for h in next_hop.hosts) or "-"))
        if next_hop.kind == "null_mx":
            reply = _local(556, "5.1.10", f"recipient domain {destination.domain} accepts no mail (null MX)")
            return self._all(destination, message, FAILED, reply, "5.1.10", rec)
        if next_hop.kind == "error" or not next_hop.hosts:
            why = next_hop.error or "no hosts to deliver to"
            if next_hop.permanent:
                return self._all(destination, message, FAILED, _local(550, "5.1.2", why), "5.1.2", rec)
            return self._all(destination, message, DEFERRED, _local(451, "4.4.3", why), "4.4.3", rec)

        fallback = connector_policy(connector, destination)
        if message.tls_optional:
            # RFC 8689 section 5: the recipient's policies (DANE, MTA-STS) are ignored; the connector's own
            # setting, which is the operator's local policy, still holds.
            policies = []
            rec.steps.append("TLS-Required: No: DANE and MTA-STS policies do not apply to this message")
        else:
            policies = await runtime.hooks.resolve_tls_policy(destination, next_hop)
        decision = combine_policies(policies or [fallback], fallback)
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
                success=False,
                result=policy.failure,
                detail=policy.detail or f"{policy.source} policy lookup failed",
            )
            if not decision.report_only:
                status = policy.status_for(policy.failure)
                why = f"TLS policy ({policy.source}) unavailable: {policy.failure}"
                reply = _local(451, status, f"{why} ({policy.detail})" if policy.detail else why)
                rec.steps.append(reply)
                return self._all(destination, message, DEFERRED, reply, status, rec)

        # An enforcing policy's mx patterns filter ALL candidates, whether or not DANE governs a host (RFC 8461
        # §4.1). Report-only (MTA-STS testing): hosts outside the patterns are still dialled; the policy's own
        # on_tls_verify reports the mismatch for the session actually made, so it is counted once.
        candidates = policies or [fallback]
        hosts, filtering = filter_hosts_by_policies(next_hop.hosts, candidates)
        for dropped in (h for h in next_hop.hosts if h not in hosts):
            rec.steps.append(f"{dropped.name}: not in the mx patterns of the enforced policy: not dialled")
        if not hosts:
            assert filtering is not None
            await self._outcome(
                connector.name,
                TlsDecision(filtering, filtering),
                None,
                None,
                success=False,
                result=TlsRptResult.VALIDATION_FAILURE,
                detail="no MX host matches the policy's mx patterns",
            )
            reply = _local(451, "4.7.5", f"no MX host of {destination.domain} matches the {filtering.source} policy")
            rec.steps.append(reply)
            return self._all(destination, message, DEFERRED, reply, "4.7.5", rec)

        for host in hosts:
            host_decision = decide_host(candidates, fallback, host)
            governing = host_decision.policy
            rec.steps.append(
                f"{host.name}: governed by {governing.source} ({governing.policy_type}, level"
                f" {host_decision.enforce.for_host(host.name).level.name}"
                + (f", enforced by {host_decision.enforce.source}" if host_decision.report_only else "")
                + ")"
            )
            outcome = await self._try_host(connector, destination, next_hop, host_decision, host, message, rec)
            if outcome is not None:
                return outcome
        failures = rec.failures
        if failures and all(f.permanent for f in failures):
            last = failures[-1]
            return self._all(destination, message, FAILED, last.reply, last.status, rec, remote=last.remote)
        transient = next((f for f in reversed(failures) if not f.permanent), None)
        if transient is None:
            reply, status = _local(451, "4.4.1", "no host could be reached"), "4.4.1"
        else:
            reply, status = transient.reply, transient.status
            if reply[:1] == "5":  # a permanent-looking reply from one host while others failed transiently
                reply, status = _local(451, "4.4.1", reply), "4.4.1"
        return self._all(destination, message, DEFERRED, reply, status, rec, remote=False)

    # -- hosts and addresses -----------------------------------------------------------------------------

    async def _addresses(self, host: HopHost) -> tuple[str, ...]:
        if host.addresses:
            return host.addresses
        if _is_ip(host.name):
            return (host.name.strip("[]"),)
        if self._resolve_addresses is not None:
            return await self._resolve_addresses(host.name)
        resolver = self.runtime.resolver
        if resolver is None:
            return ()
        a, aaaa = await resolver.resolve_addresses(host.name)
        out: list[str] = []
        for ans in (aaaa, a):
            if not ans.is_failure and ans.exists:
                out.extend(str(getattr(r, "address", r)) for r in ans.records)
        return tuple(out)

    async def _try_host(
        self,
        connector: OutboundConnector,
        destination: Destination,
        next_hop: NextHop,
        decision: TlsDecision,
        host: HopHost,
        message: OutgoingMessage,
        rec: _Attempt,
    ) -> DeliveryResult | None:
        enforce_hp = decision.enforce.for_host(host.name)
        report_hp = decision.policy.for_host(host.name)
        if decision.enforce.failure is not None and enforce_hp.usable:
            # the policy governing this host could not be established (e.g. mandatory MTA-STS without a policy
            # for a host DANE does not govern): the host is unusable, never reached at a weaker level
            enforce_hp = replace(enforce_hp, usable=False, failure=decision.enforce.failure)
        for hp, pol in ((enforce_hp, decision.enforce), (report_hp, decision.policy)):
            if not hp.usable:
                if hp.failure is not None:  # None: nothing TLS-related failed (e.g. its address lookups did)
                    await self._outcome(
                        connector.name,
                        decision,
                        None,
                        host,
                        success=False,
                        result=hp.failure,
                        detail=hp.detail or f"{pol.source}: host unusable",
                    )
                if pol is decision.enforce:
                    rec.steps.append(f"{host.name}: unusable under the {pol.source} policy ({hp.detail or hp.failure})")
                    status = pol.status_for(hp.failure) if hp.failure is not None else "4.4.3"
                    why = hp.failure or hp.detail or "host unusable"
                    rec.failures.append(
                        _HostFailure(_local(451, status, f"{host.name}: {pol.source} policy: {why}"), status)
                    )
                    return None
        key: SessionKey | None = None
        if connector.connection_reuse and not self._closed:
            key = SessionKey.of(connector, destination, next_hop, decision, host, enforce_hp, message)
            session = await self._checkout(key, connector)
            if session is not None:
                rec.steps.append(f"reusing session to {session.where} (message {session.messages + 1} on it)")
                await self.runtime.hooks.on_event("outbound_session_reused", connector=connector.name)
                # None: this host cannot take the message (recorded); the same host on a new session could not
                # either, so on to the next host.
                return await self._send(session, key, connector, destination, host, message, rec)
        addresses = await self._addresses(host)
        if not addresses:
            rec.steps.append(f"{host.name}: no usable address")
            rec.failures.append(_HostFailure(_local(451, "4.4.4", f"{host.name}: no usable address"), "4.4.4"))
            return None
        for address in addresses:
            result = await self._try_address(
                connector, destination, next_hop, decision, host, address, message, rec, enforce_hp, report_hp, key
            )
            if result is not None:
                return result
        return None

    async def _try_address(
        self,
        connector: OutboundConnector,
        destination: Destination,
        next_hop: NextHop,
        decision: TlsDecision,
        host: HopHost,
        address: str,
        message: OutgoingMessage,
        rec: _Attempt,
        enforce_hp: HostPolicy,
        report_hp: HostPolicy,
        key: SessionKey | None,
        *,
        cleartext: bool = False,
    ) -> DeliveryResult | None:
        runtime = self.runtime
        level = enforce_hp.level
        where = f"{host.name}[{address}]:{host.port}"
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
            rec.steps.append(f"{where}: {exc}")
            rec.failures.append(_HostFailure(_local(451, "4.4.1", f"{where}: {exc}"), "4.4.1"))
            return None
        rec.steps.append(f"connected to {where}")
        tls_info: str | None = None
        verification: PeerVerification | None = None
        try:
            assert client.banner is not None
            if client.banner.code != 220:
                rec.failures.append(
                    _HostFailure(f"{client.banner} (greeting from {where})", client.banner.status, remote=True)
                )
                rec.steps.append(f"{where}: greeting {client.banner}")
                await client.quit()
                return None
            ehlo = await client.ehlo(runtime.config.server.hostname)
            if ehlo.code != 250:
                rec.failures.append(_HostFailure(f"{ehlo} (EHLO/HELO at {where})", ehlo.status, remote=True))
                await client.quit()
                return None

            # -- STARTTLS -------------------------------------------------------------------------------
            sni = enforce_hp.sni or report_hp.sni or (None if _is_ip(host.name) else host.name.rstrip("."))
            if level >= TlsLevel.MAY and not cleartext:
                if not client.supports("STARTTLS"):
                    await self._outcome(
                        connector.name,
                        decision,
                        client,
                        host,
                        success=False,
                        result=TlsRptResult.STARTTLS_NOT_SUPPORTED,
                        detail="STARTTLS not offered",
                    )
                    if level >= TlsLevel.ENCRYPT:
                        rec.steps.append(f"{where}: STARTTLS not offered; TLS is required")
                        status = decision.enforce.status_for(TlsRptResult.STARTTLS_NOT_SUPPORTED, "4.7.4")
                        rec.failures.append(
                            _HostFailure(
                                _local(
                                    451,
                                    status,
                                    f"{where} does not offer STARTTLS (required by {decision.enforce.source})",
                                ),
                                status,
                            )
                        )
                        await client.quit()
                        return None
                    rec.steps.append(f"{where}: STARTTLS not offered; continuing in cleartext (opportunistic)")
                else:
                    ctx = client_context(verify=False)
                    try:
                        reply = await client.starttls(ctx, sni)
                    except SmtpConnectionError as exc:
                        await self._outcome(
                            connector.name,
                            decision,
                            client,
                            host,
                            success=False,
                            result=TlsRptResult.VALIDATION_FAILURE,
                            detail=str(exc),
                        )
                        rec.steps.append(f"{where}: {exc}")
                        if level == TlsLevel.MAY:
                            rec.steps.append(f"{where}: retrying in cleartext (opportunistic)")
                            return await self._try_address(
                                connector,
                                destination,
                                next_hop,
                                decision,
                                host,
                                address,
                                message,
                                rec,
                                enforce_hp,
                                report_hp,
                                key,
                                cleartext=True,
                            )
                        rec.failures.append(_HostFailure(_local(451, "4.7.5", f"{where}: {exc}"), "4.7.5"))
                        return None
                    if reply.code != 220:
                        await self._outcome(
                            connector.name,
                            decision,
                            client,
                            host,
                            success=False,
                            result=TlsRptResult.STARTTLS_NOT_SUPPORTED,
                            detail=f"STARTTLS: {reply}",
                        )
                        if level >= TlsLevel.ENCRYPT:
                            status = decision.enforce.status_for(TlsRptResult.STARTTLS_NOT_SUPPORTED, "4.7.4")
                            rec.failures.append(
                                _HostFailure(_local(451, status, f"{where} refused STARTTLS: {reply}"), status)
                            )
                            await client.quit()
                            return None
                    else:
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
                        chain = peer_chain(ssl_object)
                        peer_ip, peer_port = _peer(client)
                        ctx_rec = AttemptContext(
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
                            host_policy=enforce_hp,
                            at=runtime.clock(),
                        )
                        ok, verification, failure = await self._verify(decision, enforce_hp, report_hp, ctx_rec, chain)
                        if verification is not None:
                            rec.steps.append(
                                f"{where}: peer {verification.label}"
                                + (f" ({verification.matched})" if verification.matched else "")
                                + (f": {verification.detail}" if verification.detail else "")
                            )
                        await self._outcome(
                            connector.name,
                            decision,
                            client,
                            host,
                            success=failure is None,
                            result=failure.result_type if failure is not None else None,
                            detail=failure.detail if failure is not None else "",
                            verification=verification,
                        )
                        if not ok:
                            result_type = failure.result_type if failure is not None else None
                            why = result_type or "verification failed"
                            status = decision.enforce.status_for(result_type)
                            rec.failures.append(
                                _HostFailure(
                                    _local(451, status, f"{where}: TLS peer verification failed ({why})"), status
                                )
                            )
                            await client.quit()
                            return None
                        ehlo = await client.ehlo(runtime.config.server.hostname)
                        if ehlo.code != 250:
                            rec.failures.append(
                                _HostFailure(f"{ehlo} (EHLO after STARTTLS at {where})", ehlo.status, remote=True)
                            )
                            await client.quit()
                            return None
            if level >= TlsLevel.ENCRYPT and not client.tls:  # defensive: never send under cleartext
                rec.failures.append(_HostFailure(_local(451, "4.7.4", f"{where}: TLS required"), "4.7.4"))
                await client.quit()
                return None

            # -- AUTH (smart hosts; only ever under TLS) -----------------------------------------------
            if connector.auth_username:
                if not client.tls:
                    rec.failures.append(
                        _HostFailure(
                            _local(451, "4.7.10", f"{where}: not sending AUTH credentials without TLS"), "4.7.10"
                        )
                    )
                    rec.steps.append(f"{where}: AUTH configured but the session is not encrypted")
                    await client.quit()
                    return None
                password = self._password(connector)
                auth = await client.auth(connector.auth_username, password)
                if auth.code != 235:
                    rec.failures.append(_HostFailure(f"{auth} (AUTH at {where})", auth.status, remote=True))
                    await client.quit()
                    return None

            session = _Session(client, where, tls_info, verification, opened)
            return await self._send(session, key, connector, destination, host, message, rec)
        except SmtpClientError as exc:
            rec.steps.append(f"{where}: {exc}")
            rec.failures.append(_HostFailure(_local(451, "4.4.2", f"{where}: {exc}"), "4.4.2"))
            client.abort()
            return None
        finally:
            rec.transcript.extend(client.transcript)
            client.transcript.clear()

    async def _send(
        self,
        session: _Session,
        key: SessionKey | None,
        connector: OutboundConnector,
        destination: Destination,
        host: HopHost,
        message: OutgoingMessage,
        rec: _Attempt,
    ) -> DeliveryResult | None:
        """The message over an established session: what it needs of the peer (SIZE, SMTPUTF8, 8BITMIME, from
        the session's EHLO), then the transaction. ``None`` when the peer cannot take it (recorded in ``rec``)."""
        client, where = session.client, session.where
        limit = client.size_limit
        utf8 = needs_smtputf8(message)
        eight = needs_8bitmime(message)
        unmet = [
            (code, status, why)
            for needed, code, status, why in (
                (
                    limit is not None and len(message.data) > limit,
                    552,
                    "5.3.4",
                    f"message size {len(message.data)} exceeds the limit of {where} ({limit})",
                ),
                (
                    utf8 and not client.supports("SMTPUTF8"),
                    553,
                    "5.6.7",
                    f"{where} does not support SMTPUTF8, which this message needs",
                ),
                (
                    eight and not client.supports("8BITMIME"),
                    554,
                    "5.6.3",
                    f"{where} does not support 8BITMIME, which this message needs",
                ),
            )
            if needed
        ]
        if unmet:
            code, status, why = unmet[0]
            rec.failures.append(_HostFailure(_local(code, status, why), status, permanent=True))
            await self._finish(session, key, connector, reset=False)  # nothing was started: still clean
            rec.transcript.extend(client.transcript)
            client.transcript.clear()
            return None
        params: list[str] = []
        if client.supports("SIZE"):
            params.append(f"SIZE={len(message.data)}")
        if eight:
            params.append("BODY=8BITMIME")
        if utf8:
            params.append("SMTPUTF8")
        session.messages += 1
        return await self._transaction(session, key, connector, destination, host, message, params, rec)

    async def _transaction(
        self,
        session: _Session,
        key: SessionKey | None,
        connector: OutboundConnector,
        destination: Destination,
        host: HopHost,
        message: OutgoingMessage,
        params: list[str],
        rec: _Attempt,
    ) -> DeliveryResult:
        client, tls_info, verification = session.client, session.tls_info, session.verification
        mx = host.name
        recipients = message.recipients
        outcomes: dict[str, RecipientOutcome] = {}
        accepted: list[str] = []
        try:
            mail, rcpts, data = await client.envelope(message.sender, params, recipients)
            if not mail.is_positive:
                result = FAILED if mail.is_permanent else DEFERRED
                for r in recipients:
                    outcomes[r] = RecipientOutcome(r, result, str(mail), mail.status, mx, True)
                if data is not None and data.code == 354:
                    await client.abort_data()
                    await client.quit()
                else:
                    await self._finish(session, key, connector, reset=True)
                return self._result(destination, message, outcomes, rec, client, host, tls_info, verification)
            for r, reply in zip(recipients, rcpts, strict=False):
                if reply.is_positive:
                    accepted.append(r)
                else:
                    outcomes[r] = RecipientOutcome(
                        r, FAILED if reply.is_permanent else DEFERRED, str(reply), reply.status, mx, True
                    )
            if not accepted:
                if data is not None and data.code == 354:
                    await client.abort_data()
                    await client.quit()
                else:
                    await self._finish(session, key, connector, reset=True)
                return self._result(destination, message, outcomes, rec, client, host, tls_info, verification)
            if data is None or data.code != 354:
                for r in accepted:
                    if data is None:
                        outcomes[r] = RecipientOutcome(r, DEFERRED, _local(451, "4.4.2", "DATA not sent"), "4.4.2", mx)
                    else:
                        outcomes[r] = RecipientOutcome(
                            r, FAILED if data.is_permanent else DEFERRED, str(data), data.status, mx, True
                        )
                await self._finish(session, key, connector, reset=True)
                return self._result(destination, message, outcomes, rec, client, host, tls_info, verification)
            final = await client.send_data(message.data)
            for r in accepted:
                if final.is_positive:
                    outcomes[r] = RecipientOutcome(r, DELIVERED, str(final), final.status, mx, True)
                else:
                    outcomes[r] = RecipientOutcome(
                        r, FAILED if final.is_permanent else DEFERRED, str(final), final.status, mx, True
                    )
            await self._finish(session, key, connector, reset=not final.is_positive)
        except SmtpClientError as exc:
            # Lost in the middle: whatever was not confirmed is deferred (at-least-once; RFC 5321 §6.1).
            client.abort()
            for r in recipients:
                if r not in outcomes:
                    outcomes[r] = RecipientOutcome(
                        r, DEFERRED, _local(451, "4.4.2", f"{host.name}: {exc}"), "4.4.2", mx
                    )
            rec.steps.append(f"{host.name}: {exc}")
        return self._result(destination, message, outcomes, rec, client, host, tls_info, verification)

    # -- the pool of idle sessions --------------------------------------------------------------------------

    def _reusable(self, session: _Session, connector: OutboundConnector) -> bool:
        age = asyncio.get_running_loop().time() - session.opened
        return (
            not self._closed
            and not session.client.closed
            and not session.client.unread  # the peer said something unasked (e.g. 421 before closing)
            and session.messages < connector.connection_reuse_limit
            and age < connector.connection_max_age
        )

    async def _finish(
        self, session: _Session, key: SessionKey | None, connector: OutboundConnector, *, reset: bool
    ) -> None:
        """After a transaction: into the pool when the session may carry another message (``reset``: RSET
        first, because the transaction was refused part-way), else QUIT."""
        client = session.client
        if key is None or not self._reusable(session, connector):
            await client.quit()
            return
        if reset:
            try:
                reply = await client.command("RSET", timeout=min(connector.command_timeout, RSET_TIMEOUT))
            except SmtpClientError:
                client.abort()
                return
            if reply.code != 250:
                await client.quit()
                return
        self._pool(key, session, connector)

    def _pool(self, key: SessionKey, session: _Session, connector: OutboundConnector) -> None:
        if self._keeper is None:
            keeper = self._keeper = asyncio.ensure_future(self._keep())
            self.runtime.tasks.append(keeper)
            keeper.add_done_callback(self._kept)
        idle = self._idle.setdefault(key, [])
        idle.append(session)
        session.timer = asyncio.get_running_loop().call_later(
            connector.connection_idle_timeout, self._expire, key, session
        )
        while len(idle) > connector.max_connections_per_destination:
            self._drop(idle.pop(0))

    def _take(self, key: SessionKey) -> _Session | None:
        """The most recently pooled session under ``key``, out of the pool."""
        idle = self._idle.get(key)
        if not idle:
            return None
        session = idle.pop()
        if not idle:
            del self._idle[key]
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        return session

    def _expire(self, key: SessionKey, session: _Session) -> None:
        """Idle timeout (a timer callback): out of the pool, QUIT without waiting."""
        idle = self._idle.get(key)
        if idle is not None and session in idle:
            idle.remove(session)
            if not idle:
                del self._idle[key]
        session.timer = None
        self._drop(session)

    def _drop(self, session: _Session) -> None:
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        session.client.quit_nowait()
        session.client.transcript.clear()

    async def _checkout(self, key: SessionKey, connector: OutboundConnector) -> _Session | None:
        """A pooled session that answers RSET with 250 (Postfix's liveness check). Sessions the peer closed
        while idle, or that fail the check, are closed silently: the caller then connects anew."""
        while (session := self._take(key)) is not None:
            client = session.client
            if not self._reusable(session, connector):
                self._drop(session)
                continue
            try:
                reply = await client.command("RSET", timeout=min(connector.command_timeout, RSET_TIMEOUT))
            except SmtpClientError as exc:
                log.debug("pooled session unusable", extra={"peer": session.where, "error": str(exc)})
                client.abort()
                client.transcript.clear()
                continue
            if reply.code != 250:
                log.debug("pooled session refused RSET", extra={"peer": session.where, "reply": str(reply)})
                self._drop(session)
                continue
            return session
        return None

    # -- verification and outcomes -------------------------------------------------------------------------

    async def _verify(
        self,
        decision: TlsDecision,
        enforce_hp: HostPolicy,
        report_hp: HostPolicy,
        attempt: AttemptContext,
        chain: Sequence[x509.Certificate],
    ) -> tuple[bool, PeerVerification | None, PeerVerification | None]:
        """(may deliver, the verification to report, the failure to report)."""
        hooks = self.runtime.hooks
        verification: PeerVerification | None = None
        failure: PeerVerification | None = None
        ok = True
        chain_certs = tuple(chain)
        if enforce_hp.level >= TlsLevel.VERIFY:
            verification = await hooks.on_tls_verify(attempt, decision.enforce, chain_certs)
            if verification is None:
                verification = PeerVerification(
                    False,
                    "untrusted",
                    TlsRptResult.VALIDATION_FAILURE,
                    detail=f"nobody verified for policy source {decision.enforce.source!r}",
                )
            if not verification.ok:
                ok = False
                failure = verification
        if decision.report_only and report_hp.level >= TlsLevel.VERIFY:
            reported = await hooks.on_tls_verify(replace(attempt, host_policy=report_hp), decision.policy, chain_certs)
            if reported is None:
                reported = PeerVerification(
                    False,
                    "untrusted",
                    TlsRptResult.VALIDATION_FAILURE,
                    detail=f"nobody verified for policy source {decision.policy.source!r}",
                )
            if not reported.ok and failure is None:
                failure = reported
            verification = verification or reported
        if verification is None:
            verification = PeerVerification(True, "untrusted", detail="encrypted, peer not authenticated")
        return ok, verification, failure

    async def _outcome(
        self,
        connector: str,
        decision: TlsDecision,
        client: SmtpClient | None,
        host: HopHost | None,
        *,
        success: bool,
        result: TlsRptResult | None = None,
        detail: str = "",
        verification: PeerVerification | None = None,
    ) -> None:
        policy = decision.policy
        version = cipher = None
        peer_ip = sending_ip = helo = None
        if client is not None:
            peer_ip = _peer(client)[0]
            sending_ip = client.local_address[0] if client.local_address else None
            helo = client.peer_ehlo_name
            obj = client.ssl_object
            if obj is not None:
                version = obj.version()
                c = obj.cipher()
                cipher = c[0] if c else None
        outcome = TlsOutcome(
            connector=connector,
            policy_type=policy.policy_type,
            policy_domain=policy.policy_domain,
            success=success,
            mx_host=host.name if host is not None else None,
            receiving_ip=peer_ip,
            receiving_helo=helo,
            sending_ip=sending_ip,
            tls_version=version,
            cipher=cipher,
            verification=verification.label if verification is not None else None,
            matched=verification.matched if verification is not None else None,
            result_type=result,
            policy_strings=policy.policy_strings,
            mx_patterns=policy.mx_patterns,
            detail=detail,
            at=self.runtime.clock(),
        )
        await self.runtime.hooks.on_tls_outcome(outcome)

    # -- helpers -------------------------------------------------------------------------------------------

    def _password(self, connector: OutboundConnector) -> str:
        if not connector.auth_password_file:
            return ""
        path = self.runtime.config.path(connector.auth_password_file)
        text = path.read_text(encoding="utf-8")
        return text.splitlines()[0] if text else ""

    def _all(
        self,
        destination: Destination,
        message: OutgoingMessage,
        result: str,
        reply: str,
        status: str,
        rec: _Attempt,
        *,
        remote: bool = False,
    ) -> DeliveryResult:
        outcomes = tuple(RecipientOutcome(r, result, reply, status, None, remote) for r in message.recipients)
        rec.steps.append(f"{result}: {reply}")
        return DeliveryResult(destination, outcomes, steps=tuple(rec.steps), transcript=tuple(rec.transcript))

    def _result(
        self,
        destination: Destination,
        message: OutgoingMessage,
        outcomes: dict[str, RecipientOutcome],
        rec: _Attempt,
        client: SmtpClient,
        host: HopHost,
        tls_info: str | None,
        verification: PeerVerification | None,
    ) -> DeliveryResult:
        ordered = tuple(outcomes[r] for r in message.recipients if r in outcomes)
        for o in ordered:
            rec.steps.append(f"<{o.recipient}>: {o.result}: {o.reply}")
        rec.transcript.extend(client.transcript)
        client.transcript.clear()
        return DeliveryResult(
            destination,
            ordered,
            mx_host=host.name,
            peer_ip=client.host,
            tls=tls_info,
            verification=verification.label if verification is not None else None,
            steps=tuple(rec.steps),
            transcript=tuple(rec.transcript),
        )


async def _quit(client: SmtpClient) -> None:
    try:
        await client.quit(QUIT_TIMEOUT)
    finally:
        if not client.closed:
            client.abort()


def _peer(client: SmtpClient) -> tuple[str, int]:
    return client.host, client.port


def _host_label(h: HopHost) -> str:
    addrs = ",".join(h.addresses) if h.addresses else "?"
    pref = f"{h.preference} " if h.preference else ""
    return f"{pref}{h.name}[{addrs}]:{h.port}{' (secure)' if h.secure else ''}"
