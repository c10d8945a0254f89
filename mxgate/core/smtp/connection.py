"""One SMTP client on the receive side: :class:`Connection`, the session of one client (its listener:
:mod:`mxgate.core.smtp.server`).

Why not aiosmtpd's ``SMTP`` class: everything it does per command had to change here -- enhanced status codes
on every reply, our own EHLO list, bare CR/LF rejection in its line reader, bulk DATA reading, discard of input
pipelined before STARTTLS, AUTH against a hook, bounded reading of over-long lines, idle *and* session timeouts,
its per-connection ``inspect`` command table. A subclass would have overridden its reader loop and every
``smtp_*`` method and kept only its ``StreamReaderProtocol`` plumbing (and its private ``sslproto`` STARTTLS
swap). So a session is a thin driver of socket-free parts, in layers:

- :class:`~mxgate.core.smtp.channel.Channel` (:mod:`mxgate.core.smtp.channel`), its base class: the transport
  -- reading, writing, flow control, timeouts, the STARTTLS upgrade;
- :class:`Connection` (here): the session's life (connect, banner, the command loop, disconnect), the command
  dialogue (EHLO, STARTTLS, AUTH, MAIL, RCPT, RSET, ...), the hook calls and their verdicts, the rejections'
  tracking, the client's reverse DNS;
- :mod:`mxgate.core.smtp.data`: DATA and BDAT, the end-of-data hook and the queue hand-off.

Socket-free: :mod:`mxgate.core.smtp.wire` frames the input, :mod:`mxgate.core.smtp.session` decides,
:mod:`mxgate.core.smtp.sasl` runs AUTH exchanges, :mod:`mxgate.core.smtp.transaction` turns a message into a
queue submission.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Final

from mxgate.core.errors import PluginError
from mxgate.core.model import (
    Accept,
    AuthResult,
    Disconnect,
    IncomingMessage,
    Reject,
    Reply,
    Session,
    Stash,
    TempFail,
    Verdict,
)
from mxgate.core.plugins import HookCallError
from mxgate.core.smtp import data, sasl, wire
from mxgate.core.smtp.channel import HANDSHAKE_TIMEOUT, LINE_REFUSALS, Channel, Close, Gone, tls_state
from mxgate.core.smtp.parse import ParseError, parse_mail, parse_rcpt
from mxgate.core.smtp.rdns import ReverseDns
from mxgate.core.smtp.rdns import lookup as rdns_lookup
from mxgate.core.smtp.session import R, ReceiveState, reject_reason
from mxgate.core.tracking import TrackEvent

if TYPE_CHECKING:
    from mxgate.core.smtp.server import Listener

__all__ = ["HANDSHAKE_TIMEOUT", "Connection", "tls_state"]

log = logging.getLogger(__name__)

# Distinct kinds of rejection (stage, reason, code) one session's tracking events are aggregated by; past this
# many, further kinds are counted under the last one.
MAX_REJECT_KINDS: Final = 16
# Commands allowed before STARTTLS on a require_tls listener.
_BEFORE_TLS = frozenset({b"EHLO", b"HELO", b"STARTTLS", b"NOOP", b"RSET", b"QUIT"})
PLUGIN_FAILED = TempFail(R.PLUGIN_ERROR)  # what a failing receive hook turns into
# Requests of other protocols sent to an SMTP port (Postfix's smtpd_forbidden_commands: CONNECT, GET, POST):
# cross-protocol attacks, from a browser or a proxy. The session ends at the first one.
_FOREIGN_VERBS: Final = frozenset({b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"CONNECT"})


Handler = Callable[["Connection", str | None], Awaitable[None]]


class Connection(Channel):
    """One SMTP client. I/O in :class:`Channel`; decisions in :class:`ReceivePolicy`; hooks through
    ``runtime.hooks``; DATA and BDAT in :mod:`mxgate.core.smtp.data`."""

    COMMANDS: ClassVar[dict[bytes, Handler]] = {}  # filled once, after the class body

    def __init__(self, listener: Listener, *, release: Callable[[], None] | None = None) -> None:
        super().__init__(listener.policy.limits)
        self.listener = listener
        self._release = release  # gives back the admission slot (see Listener._admit)
        self.runtime = listener.runtime
        self.hooks = listener.runtime.hooks
        self.policy = listener.policy
        self.stash = Stash()
        self.state = ReceiveState(peer_ip="")
        self.session_id = listener.next_session_id()
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)
        self._transactions = 0
        self._headers_msg: IncomingMessage | None = None
        self._headers_parsed: tuple[bytes, tuple[tuple[str, str], ...]] | None = None  # (block, its headers)
        self._snapshot: tuple[tuple[Any, ...], Session] | None = None  # (what it was made of, the last snapshot)
        # the client's reverse DNS: started at connect, awaited (bounded) at EHLO -- never before the banner
        self._rdns_task: asyncio.Task[ReverseDns] | None = None
        self._rdns_deadline = 0.0
        self.rdns: ReverseDns | None = None
        # rejections of this session already in the tracking log, by kind: the first of a kind is written at
        # once, the repeats are counted and written as one event when the session ends
        self._rejects: dict[tuple[str, str, str], tuple[dict[str, Any], int]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.listener.connections.add(self)
        super().connection_made(transport)

    # -- reverse DNS -------------------------------------------------------------------------------------------

    def _start_rdns(self) -> None:
        timeout = self.listener.config.reverse_dns_timeout
        resolver = self.runtime.resolver
        if timeout <= 0 or resolver is None or not self.state.peer_ip:
            return
        listener = self.listener
        if listener.rdns_running >= listener.rdns_slots:
            # each lookup holds a socket: under a connection flood the lookups must stay inside the descriptor
            # reserve, so a client beyond the bound is simply "unknown" (as when the lookup fails)
            self.rdns = ReverseDns.failed()
            return
        listener.rdns_running += 1
        self._rdns_deadline = self.loop.time() + timeout
        self._rdns_task = self.loop.create_task(rdns_lookup(resolver, self.state.peer_ip))
        self._rdns_task.add_done_callback(listener.rdns_done)

    def _rdns_known(self) -> ReverseDns | None:
        """The result if the lookup has finished (never waits)."""
        task = self._rdns_task
        if self.rdns is None and task is not None and task.done():
            self._rdns_task = None
            if task.cancelled() or task.exception() is not None:
                if not task.cancelled():
                    log.info("reverse DNS lookup failed", extra={"error": repr(task.exception())})
                self.rdns = ReverseDns.failed()
            else:
                self.rdns = task.result()
        return self.rdns

    async def _await_rdns(self) -> ReverseDns | None:
        """The result, waiting at most until ``reverse_dns_timeout`` after the connection; then ``FAILED``."""
        if self._rdns_known() is not None or self._rdns_task is None:
            return self.rdns
        task = self._rdns_task
        remaining = max(0.0, self._rdns_deadline - self.loop.time())
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), remaining)
        if not task.done():
            task.cancel()
            self._rdns_task = None
            self.rdns = ReverseDns.failed()
        return self._rdns_known()

    def snapshot(self) -> Session:
        """What hooks see of the session now. The same (immutable) object while nothing in it changed: a session
        calls several hooks per message."""
        st = self.state
        conn = st.tx_connector if st.envelope.mail_from is not None else st.connector
        rdns = self._rdns_known()
        key = (conn, st.helo, st.tls, st.auth_user, rdns, st.peer_ip, self.peer, self.local, self.listener.config.name)
        if self._snapshot is not None and key == self._snapshot[0]:
            return self._snapshot[1]
        session = Session(
            id=self.session_id,
            listener=self.listener.config.name,
            peer_ip=st.peer_ip,
            peer_port=self.peer[1],
            local_ip=self.local[0],
            local_port=self.local[1],
            connector=conn.name if conn else None,
            ehlo=st.helo,
            tls=st.tls,
            auth_user=st.auth_user,
            reverse_dns=rdns.name if rdns else None,
            reverse_dns_status=rdns.status if rdns else None,
            stash=self.stash,
        )
        self._snapshot = (key, session)
        return session

    async def _veto(self, call: Awaitable[Verdict | None]) -> Verdict | None:
        """A receive veto hook; a plugin that raises or returns junk becomes 451 4.3.0 (logged with its name)."""
        try:
            return await call
        except HookCallError as exc:
            log.warning("receive hook failed: answering 451 4.3.0", extra={"plugin": exc.plugin, "hook": exc.hook})
            return PLUGIN_FAILED
        except PluginError as exc:
            log.error("receive hook broke the contract: %s", exc)
            return PLUGIN_FAILED

    @staticmethod
    def _outcome(verdict: Verdict | None, default: Reply) -> tuple[Reply, bool, bool]:
        """(reply, accepted, disconnect)."""
        if verdict is None:
            return default, True, False
        if isinstance(verdict, Accept):
            reply = verdict.reply if verdict.reply is not None and verdict.reply.is_positive else default
            return reply, True, False
        if isinstance(verdict, Disconnect):
            return verdict.reply, False, True
        return verdict.reply, False, False

    def _label_connector(self) -> str:
        conn = self.state.tx_connector or self.state.connector
        return conn.name if conn else "anonymous"

    async def _rejected(self, stage: str, reply: Reply, reason: str, **fields: Any) -> None:
        """Record a rejection: the first of its kind in this session goes to the tracking log at once, repeats
        are counted and summed up in one event at the end of the session (a client sending thousands of
        refused RCPTs writes a few lines, not thousands)."""
        key = (stage, reason, f"{reply.code} {reply.enhanced}")
        seen = self._rejects.get(key)
        if seen is None and len(self._rejects) >= MAX_REJECT_KINDS:
            key = next(reversed(self._rejects))
            seen = self._rejects[key]
        if seen is not None:
            self._rejects[key] = (seen[0], seen[1] + 1)
        else:
            rdns = self._rdns_known()
            record = dict(
                stage=stage,
                reply=str(reply),
                connector=self._label_connector(),
                client=self.state.peer_ip,
                client_name=rdns.name if rdns else None,
                helo=self.state.helo,
                tls=self.state.tls.version if self.state.tls else None,
            )
            self._rejects[key] = (record, 0)
            self.runtime.tracking.write(TrackEvent.REJECT, **record, **fields)
        await self.hooks.on_event("message_rejected", listener=self.listener.config.name, reason=reason)

    def _write_repeated_rejections(self) -> None:
        for record, repeated in self._rejects.values():
            if repeated:
                self.runtime.tracking.write(TrackEvent.REJECT, **record, repeated=repeated, session=self.session_id)
        self._rejects.clear()

    # -- the session -----------------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self.transport is not None
        transport = self.transport
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.peer, self.local = (str(peer[0]), int(peer[1])), (str(local[0]), int(local[1]))
        self.state.peer_ip = self.peer[0]
        self._deadline = self.loop.time() + self.policy.limits.session_timeout
        self._start_rdns()
        started = False
        try:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                self.state.tls = tls_state(ssl_object, self.listener.client_verifier, now=self.runtime.clock())
            self.state.connector = self.policy.select_connector(self.state)
            started = True
            await self._session()
        except Close as close:
            if close.reply is not None:
                self._reply(close.reply)
        except (Gone, ConnectionError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("receive session failed", extra={"session": self.session_id})
            self._reply(Reply(421, "4.3.0", "Local error, closing connection"))
        finally:
            self._flush()
            if self._rdns_task is not None:
                self._rdns_task.cancel()
            if self.transport is not None:
                self.transport.close()
            self.listener.connections.discard(self)
            if self._release is not None:
                self._release()
            self._write_repeated_rejections()
            if started:
                with contextlib.suppress(Exception):
                    conn = self.state.connector  # the one in force at the end (after STARTTLS or AUTH chose)
                    label = conn.name if conn else "anonymous"
                    await self.hooks.on_event("disconnection", listener=self.listener.config.name, connector=label)
                    await self.hooks.on_disconnect(self.snapshot())

    async def _session(self) -> None:
        listener = self.listener.config.name
        await self.hooks.on_event("connection", listener=listener, connector=self._label_connector())
        if self.state.tls is not None:
            await self.hooks.on_event("tls_session", listener=listener, version=self.state.tls.version)
        if self.listener.stopping:
            raise Close(R.SHUTDOWN)
        verdict = await self._veto(self.hooks.on_connect(self.snapshot()))
        if verdict is PLUGIN_FAILED:
            self.state.deferred = R.PLUGIN_ERROR  # greet, but no transaction gets through
        elif isinstance(verdict, Reject | TempFail | Disconnect):
            await self._rejected("connect", verdict.reply, "plugin")
            raise Close(verdict.reply)
        self._reply(self.policy.banner())
        limits = self.policy.limits
        while True:
            # the reader's line limit is AUTH's (an initial response up to RFC 4954's 12,288 octets); others: 512
            event = await self._next()
            if type(event) is not wire.Command:
                await self._bad(LINE_REFUSALS[type(event)])
                continue
            line = event.line
            verb, _, rest = line.partition(b" ")
            verb = verb.upper()
            if verb == b"BDAT":  # its chunk follows at once: it must be read (or the session ends), whatever we say
                await data.cmd_bdat(self, rest if len(line) + 2 <= limits.command_line else b"?")
                continue
            if len(line) + 2 > limits.command_line and verb != b"AUTH":
                await self._bad(R.LINE_TOO_LONG)
                continue
            handler = self.COMMANDS.get(verb)
            if handler is None:
                if verb in _FOREIGN_VERBS:  # an HTTP or proxy request at the SMTP port: not a confused client
                    await self._rejected("connect", R.FOREIGN_PROTOCOL, "protocol", command=verb.decode("ascii"))
                    raise Close(R.FOREIGN_PROTOCOL)
                await self._bad(R.UNKNOWN)
                continue
            try:
                arg = rest.decode("utf-8").strip() or None
            except UnicodeDecodeError:
                await self._bad(R.BAD_UTF8)
                continue
            if self.listener.config.require_tls and self.state.tls is None and verb not in _BEFORE_TLS:
                await self._bad(R.NEED_TLS)
                continue
            await handler(self, arg)

    async def _bad(self, reply: Reply) -> None:
        """A bad command: answer (later and later past the soft error limit), count, and close after too many."""
        if self.policy.error(self.state):
            self._reply(reply)
            raise Close(R.TOO_MANY_ERRORS)
        delay = self.policy.error_delay(self.state)
        if delay > 0:
            self._flush()
            await asyncio.sleep(delay)
        self._reply(reply)

    async def _refuse(self, reply: Reply) -> None:
        """A refused MAIL or RCPT: counted as an error (see :meth:`ReceivePolicy.counts_as_error`) or not."""
        if self.policy.counts_as_error(self.state, reply):
            await self._bad(reply)
        else:
            self._reply(reply)

    # -- commands --------------------------------------------------------------------------------------------

    async def cmd_helo(self, arg: str | None, *, esmtp: bool = False) -> None:
        if not arg or " " in arg or len(arg) > 255 or not arg.isprintable():  # no NUL or controls echoed back
            await self._bad(R.EHLO_SYNTAX)
            return
        st = self.state
        st.reset_transaction()
        st.helo, st.esmtp = arg, esmtp
        await self._await_rdns()
        verdict = await self._veto(self.hooks.on_ehlo_command(self.snapshot(), arg))
        if verdict is not None and not isinstance(verdict, Accept):
            st.helo = None
            if isinstance(verdict, Disconnect):
                raise Close(verdict.reply)
            self._reply(verdict.reply)
            return
        if esmtp:
            self._reply_lines(250, self.policy.ehlo_lines(st))
        else:
            self._reply(f"250 {self.policy.hostname}")

    async def cmd_ehlo(self, arg: str | None) -> None:
        await self.cmd_helo(arg, esmtp=True)

    async def cmd_noop(self, arg: str | None) -> None:
        self._reply(R.OK)

    async def cmd_rset(self, arg: str | None) -> None:
        if arg:
            await self._bad(R.NO_ARGS)
            return
        self.state.reset_transaction()
        self._reply(R.RESET)

    async def cmd_quit(self, arg: str | None) -> None:
        raise Close(R.BYE)

    async def cmd_vrfy(self, arg: str | None) -> None:
        self._reply(R.VRFY)

    async def cmd_help(self, arg: str | None) -> None:
        self._reply(R.HELP)

    async def cmd_not_implemented(self, arg: str | None) -> None:
        await self._bad(R.NOT_IMPLEMENTED)

    async def cmd_starttls(self, arg: str | None) -> None:
        ctx = self.listener.tls_context
        if arg:
            await self._bad(R.NO_ARGS)
            return
        if ctx is None:
            await self._bad(R.NOT_IMPLEMENTED)
            return
        if self.state.tls is not None:
            await self._bad(R.TLS_ACTIVE)
            return
        self._reply(R.TLS_READY)
        failure = await self._start_tls(ctx)
        if failure is not None:
            log.info("STARTTLS handshake failed", extra={"session": self.session_id, "error": repr(failure)})
            await self.hooks.on_event("tls_handshake_failed", listener=self.listener.config.name)
            raise Gone()
        assert self.transport is not None
        st = self.state
        st.reset_after_tls()
        ssl_object = self.transport.get_extra_info("ssl_object")
        st.tls = tls_state(ssl_object, self.listener.client_verifier, now=self.runtime.clock())
        st.connector = self.policy.select_connector(st)
        await self.hooks.on_starttls(self.snapshot())
        await self.hooks.on_event("tls_session", listener=self.listener.config.name, version=st.tls.version)

    async def cmd_auth(self, arg: str | None) -> None:
        st = self.state
        problem = self.policy.check_auth(st)
        if problem is not None:
            await self._bad(problem)
            return
        parsed = sasl.parse_auth(arg)
        if isinstance(parsed, Reply):
            await self._bad(parsed)
            return
        limiter = self.listener.auth_failures
        if limiter.blocked(st.peer_ip):
            await self.hooks.on_event("auth", result="rate_limited")
            self._reply(R.AUTH_RATE)
            return
        mech, initial = parsed
        exchange = sasl.new_exchange(mech)
        if exchange is None:
            await self._bad(R.AUTH_MECH)
            return
        creds = await self._sasl(exchange, initial)
        if isinstance(creds, Reply):
            await self._bad(creds)
            return
        username, password = creds.username, creds.password
        # reserved before the (slow) check: parallel connections cannot all slip under the limit
        if not limiter.reserve(st.peer_ip):
            await self.hooks.on_event("auth", result="rate_limited")
            self._reply(R.AUTH_RATE)
            return
        try:
            result: AuthResult | None = await self.hooks.resolve_credentials(self.snapshot(), username, password)
        except (HookCallError, PluginError) as exc:
            log.warning("credentials hook failed: answering 451 4.3.0", extra={"error": repr(exc)})
            self._reply(R.PLUGIN_ERROR)
            return
        finally:
            limiter.release(st.peer_ip)
        if result is not None and result.ok:
            limiter.succeeded(st.peer_ip)
            st.auth_user = result.user or username
            st.connector = self.policy.select_connector(st)  # re-evaluated after AUTH
            await self.hooks.on_event("auth", result="ok")
            self._reply(R.AUTH_OK)
            return
        if result is not None and result.temporary:
            await self.hooks.on_event("auth", result="tempfail")
            self._reply(R.AUTH_TEMP)
            return
        limiter.failed(st.peer_ip)
        await self.hooks.on_event("auth", result="failed")
        await self._bad(R.AUTH_FAILED)

    async def _sasl(self, exchange: sasl.Exchange, initial: str | None) -> sasl.Credentials | Reply:
        """Run an AUTH exchange (:mod:`mxgate.core.smtp.sasl`): its challenges sent, the client's lines fed to it,
        ``on_auth_command`` asked before it (LOGIN) or once the username is known (PLAIN)."""
        mech = exchange.mechanism
        if exchange.veto_first:
            refused = await self._auth_veto(mech, None)
            if refused is not None:
                return refused
        step = exchange.start(initial)
        while isinstance(step, sasl.Challenge):
            self._reply(f"334 {step.text}")
            line = await self._read_line()
            if isinstance(line, Reply):
                return line
            step = exchange.respond(line)
        if isinstance(step, Reply):
            return step
        if not exchange.veto_first:
            refused = await self._auth_veto(mech, step.username)
            if refused is not None:
                return refused
        return step if step.authzid_ok else R.AUTH_FAILED

    async def _auth_veto(self, mechanism: str, username: str | None) -> Reply | None:
        verdict = await self._veto(self.hooks.on_auth_command(self.snapshot(), mechanism, username))
        reply, ok, _ = self._outcome(verdict, R.OK)
        return None if ok else reply

    async def cmd_mail(self, arg: str | None) -> None:
        st = self.state
        if st.helo is None:
            await self._bad(R.NEED_EHLO)
            return
        try:
            mail = parse_mail(arg or "", esmtp=st.esmtp)
        except ParseError as exc:
            await self._bad(exc.reply)
            return
        problem = self.policy.check_mail(st, mail)
        if problem is not None:
            if problem.code == 503:
                await self._bad(problem)
            else:
                await self._rejected("mail", problem, reject_reason(problem), sender=str(mail.sender))
                await self._refuse(problem)
            return
        if st.deferred is not None:
            st.tx_connector = None
            self._reply(st.deferred)
            return
        verdict = await self._veto(self.hooks.on_mail_command(self.snapshot(), st.envelope, mail.sender))
        reply, ok, close = self._outcome(verdict, R.SENDER_OK)
        if not ok:
            st.tx_connector = None
            await self._rejected("mail", reply, "plugin", sender=str(mail.sender))
            if close:
                raise Close(reply)
            await self._refuse(reply)
            return
        st.envelope = dataclasses.replace(
            st.envelope,
            mail_from=mail.sender,
            mail_options=mail.options,
            smtputf8=mail.smtputf8,
            body=mail.body,
            declared_size=mail.size,
            dsn_ret=mail.ret,
            envid=mail.envid,
            requiretls=mail.requiretls,
        )
        self._reply(reply)

    async def cmd_rcpt(self, arg: str | None) -> None:
        st = self.state
        if st.envelope.mail_from is None:
            await self._bad(R.NEED_MAIL)
            return
        try:
            parsed = parse_rcpt(
                arg or "", smtputf8=st.envelope.smtputf8, postmaster_domain=self.policy.postmaster_domain
            )
        except ParseError as exc:
            await self._bad(exc.reply)
            return
        rcpt = parsed.recipient
        problem = self.policy.check_rcpt(st, rcpt)
        if problem is not None:
            await self._rejected(
                "rcpt", problem, reject_reason(problem), sender=str(st.envelope.mail_from), recipient=str(rcpt)
            )
            await self._refuse(problem)
            return
        verdict = await self._veto(self.hooks.on_rcpt_command(self.snapshot(), st.envelope, rcpt))
        reply, ok, close = self._outcome(verdict, R.RCPT_OK)
        if not ok:
            await self._rejected("rcpt", reply, "plugin", sender=str(st.envelope.mail_from), recipient=str(rcpt))
            if close:
                raise Close(reply)
            await self._refuse(reply)
            return
        st.envelope = dataclasses.replace(
            st.envelope, rcpt_tos=(*st.envelope.rcpt_tos, rcpt), rcpt_dsn=(*st.envelope.rcpt_dsn, parsed.dsn)
        )
        self._reply(reply)


Connection.COMMANDS = {
    b"HELO": Connection.cmd_helo,
    b"EHLO": Connection.cmd_ehlo,
    b"STARTTLS": Connection.cmd_starttls,
    b"AUTH": Connection.cmd_auth,
    b"MAIL": Connection.cmd_mail,
    b"RCPT": Connection.cmd_rcpt,
    b"DATA": data.cmd_data,
    b"RSET": Connection.cmd_rset,
    b"NOOP": Connection.cmd_noop,
    b"QUIT": Connection.cmd_quit,
    b"VRFY": Connection.cmd_vrfy,
    b"HELP": Connection.cmd_help,
    b"EXPN": Connection.cmd_not_implemented,
    b"TURN": Connection.cmd_not_implemented,
    b"ETRN": Connection.cmd_not_implemented,
}
