"""The outbound session pool (Postfix's connection cache): idle sessions kept under a :class:`SessionKey`.

After a transaction, a healthy session goes into the pool instead of QUIT; the next delivery with the same key
checks it with RSET and sends over it, skipping connect, EHLO, STARTTLS, verification and AUTH. A key holds
everything that makes sessions different — the per-host policy included — so a session set up under one policy
never serves another. Limits per connector: ``connection_reuse``, ``connection_idle_timeout``,
``connection_reuse_limit``, ``connection_max_age`` and at most ``max_connections_per_destination`` idle sessions
per key. :meth:`SessionPool.close` QUITs what is pooled; if nobody calls it, a keeper task in the runtime's task
list closes the pooled sessions when the engine cancels it at shutdown (or the event loop ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import TYPE_CHECKING

from mxgate.core.delivery.model import OutgoingMessage
from mxgate.core.delivery.plan import Capabilities
from mxgate.core.delivery.policy import TlsDecision
from mxgate.core.outcomes import Destination, HopHost, HostPolicy, NextHop, PeerVerification, PolicyType, TlsLevel
from mxgate.core.smtp.client import SmtpClient, SmtpClientError

if TYPE_CHECKING:
    from mxgate.connectors.outbound import OutboundConnector

__all__ = ["QUIT_TIMEOUT", "RSET_TIMEOUT", "PooledSession", "SessionKey", "SessionPool"]

log = logging.getLogger(__name__)

#: Longest wait for the reply to the RSET that checks a pooled session before reuse (Postfix's smtp_rset_timeout).
RSET_TIMEOUT = 20.0
#: Longest wait for the reply to QUIT when pooled sessions are closed by :meth:`SessionPool.close`.
QUIT_TIMEOUT = 2.0


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
    # worked out once: a key is looked up twice per message (take, then pool), and hashing its connector and
    # policies field by field each time showed in profiles
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(_key_fields(self)))

    def __hash__(self) -> int:
        return self._hash

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


_key_fields = attrgetter(*(f.name for f in fields(SessionKey) if f.compare))


@dataclass(eq=False)
class PooledSession:
    """An established session (banner, EHLO, STARTTLS, verification, AUTH done) and what its first delivery
    learnt, kept with it so that a reuse reports the same TLS and verification."""

    client: SmtpClient
    where: str  # "host[ip]:port"
    tls_info: str | None
    verification: PeerVerification | None
    opened: float  # loop time of the connect
    messages: int = 0  # transactions started on it
    timer: asyncio.TimerHandle | None = None  # idle expiry while pooled
    capabilities: Capabilities | None = None  # what its EHLO offered, once worked out (fixed for the session)


class SessionPool:
    """Idle sessions by :class:`SessionKey`, most recently pooled last.

    :param tasks: where the keeper task goes (the runtime's task list, cancelled by the engine at shutdown).
    :param keep: ``False`` never keeps a session (one-shot deliveries such as ``connector validate``).
    """

    def __init__(self, tasks: list[asyncio.Task[None]], *, keep: bool = True) -> None:
        self._tasks = tasks
        self._idle: dict[SessionKey, list[PooledSession]] = {}
        self.closed = not keep
        self._keeper: asyncio.Task[None] | None = None

    @property
    def idle_sessions(self) -> int:
        """Sessions pooled now."""
        return sum(len(v) for v in self._idle.values())

    async def close(self) -> None:
        """QUIT every pooled session (concurrently, each bounded by :data:`QUIT_TIMEOUT`) and keep no more
        sessions from now on. Idempotent."""
        self.closed = True
        sessions = self._empty()
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
        if sessions:
            await asyncio.gather(*(quit_bounded(s.client) for s in sessions), return_exceptions=True)

    def _empty(self) -> list[PooledSession]:
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
            self._tasks.remove(keeper)
        self.closed = True
        for session in self._empty():
            session.client.quit_nowait()
            session.client.abort()

    def reusable(self, session: PooledSession, connector: OutboundConnector) -> bool:
        age = asyncio.get_running_loop().time() - session.opened
        return (
            not self.closed
            and not session.client.closed
            and not session.client.unread  # the peer said something unasked (e.g. 421 before closing)
            and session.messages < connector.connection_reuse_limit
            and age < connector.connection_max_age
        )

    async def finish(
        self, session: PooledSession, key: SessionKey | None, connector: OutboundConnector, *, reset: bool
    ) -> None:
        """After a transaction: into the pool when the session may carry another message (``reset``: RSET
        first, because the transaction was refused part-way), else QUIT."""
        client = session.client
        if key is None or not self.reusable(session, connector):
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

    def _pool(self, key: SessionKey, session: PooledSession, connector: OutboundConnector) -> None:
        if self._keeper is None:
            keeper = self._keeper = asyncio.ensure_future(self._keep())
            self._tasks.append(keeper)
            keeper.add_done_callback(self._kept)
        idle = self._idle.setdefault(key, [])
        idle.append(session)
        session.timer = asyncio.get_running_loop().call_later(
            connector.connection_idle_timeout, self._expire, key, session
        )
        while len(idle) > connector.max_connections_per_destination:
            self._drop(idle.pop(0))

    def _take(self, key: SessionKey) -> PooledSession | None:
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

    def _expire(self, key: SessionKey, session: PooledSession) -> None:
        """Idle timeout (a timer callback): out of the pool, QUIT without waiting."""
        idle = self._idle.get(key)
        if idle is not None and session in idle:
            idle.remove(session)
            if not idle:
                del self._idle[key]
        session.timer = None
        self._drop(session)

    def _drop(self, session: PooledSession) -> None:
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        session.client.quit_nowait()
        session.client.transcript.clear()

    def take(self, key: SessionKey, connector: OutboundConnector) -> PooledSession | None:
        """A pooled session that may carry another message, not checked yet: the caller sends RSET in front of
        its transaction (:func:`~mxgate.core.delivery.transaction.send_message` with ``reset``, pipelined where
        the peer offers PIPELINING) and, when that fails, takes the next one. Sessions the peer closed while idle,
        or too old or too used, are closed silently."""
        while (session := self._take(key)) is not None:
            if self.reusable(session, connector):
                return session
            self._drop(session)
        return None

    async def checkout(self, key: SessionKey, connector: OutboundConnector) -> PooledSession | None:
        """A pooled session that answers RSET with 250 (Postfix's liveness check). Sessions the peer closed
        while idle, or that fail the check, are closed silently: the caller then connects anew."""
        while (session := self.take(key, connector)) is not None:
            client = session.client
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


async def quit_bounded(client: SmtpClient) -> None:
    try:
        await client.quit(QUIT_TIMEOUT)
    finally:
        if not client.closed:
            client.abort()
