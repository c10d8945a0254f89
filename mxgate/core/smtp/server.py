"""The receive side's I/O: one asyncio server per ``[[listener]]``, one :class:`Connection` per client.

Why not aiosmtpd's ``SMTP`` class: everything it does per command had to change here -- enhanced status codes
on every reply, our own EHLO list, bare CR/LF rejection in its line reader, bulk DATA reading, discard of input
pipelined before STARTTLS, AUTH against a hook, bounded reading of over-long lines, idle *and* session timeouts,
its per-connection ``inspect`` command table. A subclass would have overridden its reader loop and every
``smtp_*`` method and kept only its ``StreamReaderProtocol`` plumbing (and its private ``sslproto`` STARTTLS
swap). So this module is a small ``asyncio.Protocol`` (PERF-NOTES' "bare Protocol": one buffer, ``find()`` for
CRLF and CRLF.CRLF) driving the decisions of :mod:`mxgate.core.smtp.session`; STARTTLS uses ``loop.start_tls``.

Flow control: input is paused above a high-water mark; replies to pipelined commands are written in one batch
when the server next waits for input. Over-long lines are discarded as they arrive, never held.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import errno
import itertools
import logging
import os
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Final

from cryptography import x509
from cryptography.x509.oid import NameOID

from mxgate.core import tls as tlsmod
from mxgate.core.auth import AuthResult, FailureLimiter
from mxgate.core.config import Config, ListenerConfig
from mxgate.core.errors import PluginError, StartupError
from mxgate.core.metadata import MessageMeta
from mxgate.core.model import (
    Accept,
    Disconnect,
    IncomingMessage,
    RecipientDsn,
    Reject,
    Reply,
    Session,
    Stash,
    StashKey,
    TempFail,
    TlsState,
    Verdict,
)
from mxgate.core.plugins import HookCallError
from mxgate.core.smtp.admission import ACCEPT_BACKOFF, TOO_MANY_FROM_CLIENT, ClientLimits, DescriptorBudget
from mxgate.core.smtp.parse import ParseError, parse_bdat, parse_mail, parse_rcpt
from mxgate.core.smtp.rdns import ReverseDns
from mxgate.core.smtp.rdns import lookup as rdns_lookup
from mxgate.core.smtp.session import R, ReceivePolicy, ReceiveState
from mxgate.core.tracking import TrackEvent

if TYPE_CHECKING:
    from mxgate.core.runtime import Runtime

__all__ = ["Connection", "Listener", "parse_headers", "received_header", "start_listeners"]

log = logging.getLogger(__name__)

HIGH_WATER = 256 * 1024  # pause reading above this much unprocessed input
HANDSHAKE_TIMEOUT = 30.0
# Distinct kinds of rejection (stage, reason, code) one session's tracking events are aggregated by; past this
# many, further kinds are counted under the last one.
MAX_REJECT_KINDS: Final = 16
AUTH_FAILURES = StashKey[FailureLimiter]()
DESCRIPTORS = StashKey[DescriptorBudget]()  # one per process: every listener's connections count
ACCEPT_BATCH: Final = 64  # connections accepted per readiness event before other work gets a turn
# accept() errors after which the same socket is tried again at once (the connection is gone, not the listener)
_ACCEPT_TRANSIENT: Final = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
        errno.EPERM,
        errno.EINTR,
    }
)
_ACCEPT_EXHAUSTED: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Commands allowed before STARTTLS on a require_tls listener.
_BEFORE_TLS = frozenset({b"EHLO", b"HELO", b"STARTTLS", b"NOOP", b"RSET", b"QUIT"})
PLUGIN_FAILED = TempFail(R.PLUGIN_ERROR)  # what a failing receive hook turns into


class _Gone(Exception):
    """The client went away (EOF, reset, failed handshake)."""


# Requests of other protocols sent to an SMTP port (Postfix's smtpd_forbidden_commands: CONNECT, GET, POST):
# cross-protocol attacks, from a browser or a proxy. The session ends at the first one.
_FOREIGN_VERBS: Final = frozenset({b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"CONNECT"})


class _Close(Exception):
    """We are done with this client; the reply (if any) has been queued."""

    def __init__(self, reply: Reply | None = None) -> None:
        super().__init__(str(reply))
        self.reply = reply


# --- helpers ----------------------------------------------------------------------------------------------------


def parse_headers(block: bytes) -> tuple[tuple[str, str], ...]:
    """``Name: value`` pairs of a header block, unfolded; lines without a colon are ignored."""
    out: list[tuple[str, str]] = []
    for line in block.decode("utf-8", "surrogateescape").split("\r\n"):
        if not line:
            continue
        if line[0] in " \t":
            if out:
                name, value = out[-1]
                out[-1] = (name, f"{value} {line.strip()}")
            continue
        name, sep, value = line.partition(":")
        if sep and name and name == name.rstrip():
            out.append((name, value.strip()))
    return tuple(out)


def _clean(text: str, limit: int = 255) -> str:
    return "".join(c if c.isprintable() and c not in "()" else "?" for c in text[:limit])


def received_header(
    *,
    helo: str | None,
    ip: str,
    hostname: str,
    esmtp: bool,
    tls: TlsState | None,
    auth: bool,
    ident: str,
    recipients: tuple[str, ...],
    when: datetime,
    reverse_dns: str | None = None,
) -> bytes:
    """RFC 5321 §4.4 trace header; protocol names per RFC 3848; TLS details in Postfix's style."""
    literal = f"IPv6:{ip}" if ":" in ip else ip
    name = _clean(reverse_dns) if reverse_dns else "unknown"  # only a forward-confirmed name (FCrDNS)
    lines = [f"Received: from {_clean(helo or 'unknown')} ({name} [{literal}])"]
    if tls is not None:
        lines.append(f"\t(using {tls.version} with cipher {tls.cipher} ({tls.bits}/{tls.bits} bits))")
    proto = "ESMTP" if esmtp else "SMTP"
    if esmtp and tls is not None:
        proto += "S"
    if esmtp and auth:
        proto += "A"
    by = f"\tby {hostname} (mxgate) with {proto} id {ident}"
    if len(recipients) == 1:
        by += f"\r\n\tfor <{recipients[0]}>"
    lines.append(by + ";")
    lines.append(f"\t{email.utils.format_datetime(when)}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def _certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """DNS SANs, or the subject CN when the certificate has no DNS SAN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(n.lower() for n in san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    if names:
        return names
    return tuple(str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))


def tls_state(
    ssl_object: ssl.SSLObject, verifier: tlsmod.ClientCertificateVerifier | None = None, *, now: float | None = None
) -> TlsState:
    """What the handshake gave. A client certificate never failed it (see :func:`tlsmod.ask_for_client_certificate`):
    it is verified here by the listener's ``verifier`` (``None``: certificates were not asked for), and the result
    only decides whether a certificate-pinned connector matches."""
    info = tlsmod.describe(ssl_object)
    chain = tlsmod.peer_chain(ssl_object)
    verified = False
    if chain and verifier is not None:
        when = datetime.fromtimestamp(time.time() if now is None else now, UTC)
        result = verifier.verify(chain, now=when, resumed=bool(ssl_object.session_reused))
        verified = result.ok
        if not result.ok:
            log.info(
                "client certificate not verified",
                extra={"subject": chain[0].subject.rfc4514_string()[:200], "reason": str(result.reason)},
            )
    return TlsState(
        version=info.version or "?",
        cipher=info.cipher or "?",
        bits=info.bits or 0,
        sni=info.server_name,
        peer_certificate_names=_certificate_names(chain[0]) if chain else (),
        peer_certificate_verified=verified,
    )


def client_ca_paths(cfg: Config, lc: ListenerConfig) -> tuple[str, ...] | None:
    """What client certificates are verified against: the listener's ``tls_client_ca`` plus every connector's
    (``()``: the system store); ``None`` when no connector needs a client certificate (none is asked for)."""
    connectors = [c for c in cfg.inbound_connector if c.enabled]
    cas = [str(cfg.path(lc.tls_client_ca))] if lc.tls_client_ca else []
    cas += [str(cfg.path(c.tls_client_ca)) for c in connectors if c.tls_client_ca]
    if not cas and not any(c.tls_sender_certificate_name for c in connectors):
        return None
    return tuple(dict.fromkeys(cas))


def client_verifier(cfg: Config, lc: ListenerConfig, tls: bool) -> tlsmod.ClientCertificateVerifier | None:
    """What verifies a client's certificate after the handshake (``None``: none is asked for)."""
    cas = client_ca_paths(cfg, lc) if tls else None
    return None if cas is None else tlsmod.ClientCertificateVerifier(cas or None)


@dataclasses.dataclass(frozen=True, slots=True)
class TlsFiles:
    """What a listener's server context is built from (a configuration's paths, made absolute)."""

    cert: str
    key: str
    sni: dict[str, tuple[str, str]]
    want_client: bool  # ask for a client certificate (never required, never fatal: verified after the handshake)

    def kwargs(self) -> dict[str, Any]:
        return {"sni": self.sni, "request_client_cert": self.want_client}


def tls_files(lc: ListenerConfig, cfg: Config) -> TlsFiles | None:
    """The listener's TLS files under ``cfg``: default certificate, SNI map, and whether client certificates are
    asked for (:func:`client_ca_paths`). A pair that does not load is one line naming the files
    (:class:`StartupError`)."""
    if not lc.tls_cert or not lc.tls_key:
        return None
    sni = {s.name: (str(cfg.path(s.cert)), str(cfg.path(s.key))) for s in lc.sni_certificates}
    want_client = client_ca_paths(cfg, lc) is not None
    cert, key = str(cfg.path(lc.tls_cert)), str(cfg.path(lc.tls_key))
    for c, k in [(cert, key), *sni.values()]:
        problem = tlsmod.pair_problem(c, k)
        if problem:
            raise StartupError(f"listener {lc.name}: {problem}")
    return TlsFiles(cert, key, sni, want_client)


def build_tls_context(runtime: Runtime, lc: ListenerConfig) -> tlsmod.RotatingServerContext | None:
    """The listener's server context (:func:`tls_files`). Its certificates are re-read when their files change
    (:meth:`Listener.watch_certificates`) and on reload (:meth:`Listener.prepare_reload`)."""
    files = tls_files(lc, runtime.config)
    if files is None:
        return None
    try:
        rotating = tlsmod.RotatingServerContext(files.cert, files.key, **files.kwargs())
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise StartupError(f"listener {lc.name}: {lc.tls_cert}: {exc}") from None
    _warn_expired(runtime, lc, rotating)
    return rotating


def _warn_expired(runtime: Runtime, lc: ListenerConfig, rotating: tlsmod.RotatingServerContext) -> None:
    for name, leaf in rotating.current.leaves.items():
        if leaf.not_valid_after_utc.timestamp() < runtime.clock():
            log.warning(
                "serving an expired certificate",
                extra={"listener": lc.name, "certificate": name or "default", "not_after": leaf.not_valid_after_utc},
            )


# --- the listener -----------------------------------------------------------------------------------------------


# Connections the kernel completes before we accept them. A full queue drops the client's handshake ACK: it
# believes it is connected and waits for a banner that comes seconds later (seen as banner timeouts when 500
# clients arrived at once on asyncio's default of 100).
BACKLOG: Final = 1024
# Reverse DNS lookups one listener runs at once, at the most (see ``Listener.rdns_slots``).
RDNS_MAX_CONCURRENT: Final = 64


class Listener:
    """One ``[[listener]]``: its listening sockets, our own accept loop, its connections. ``close()`` /
    ``wait_closed()`` drain it: clients waiting for a command get ``421 4.3.2``; transactions in progress finish
    first.

    Why our own accept loop and not the server's: admission (:mod:`mxgate.core.smtp.admission`) is decided on the
    address ``accept()`` returns, before a transport or a task exists, and at EMFILE/ENFILE we stop accepting
    for a moment instead of retrying at once (uvloop retried and logged 9,000 times a second). The asyncio server
    still binds the sockets (address resolution, dual stack, ``reuse_address``) but never serves."""

    def __init__(self, runtime: Runtime, config: ListenerConfig) -> None:
        self.runtime = runtime
        self.config = config
        self.certificates = build_tls_context(runtime, config)
        self.tls_context = None if self.certificates is None else self.certificates.context
        self._watch: asyncio.Task[None] | None = None
        self.client_verifier = client_verifier(runtime.config, config, self.tls_context is not None)
        self.policy = ReceivePolicy(runtime.config, config, tls_available=self.tls_context is not None)
        self.auth_failures = runtime.stash.setdefault(AUTH_FAILURES, FailureLimiter())
        self.descriptors = runtime.stash.setdefault(
            DESCRIPTORS, DescriptorBudget(runtime.config.server.descriptor_reserve)
        )
        # reverse DNS lookups in flight (each holds a socket): at most half the descriptor reserve, at most 64
        self.rdns_slots = max(1, min(RDNS_MAX_CONCURRENT, runtime.config.server.descriptor_reserve // 2))
        self.rdns_running = 0
        self.client_limits = ClientLimits(
            config.max_connections_per_client, config.max_connections_per_network, config.connection_limit_exceptions
        )
        self.connections: set[Connection] = set()
        self.stopping = False
        self.servers: list[asyncio.Server] = []
        self._accepting: list[socket.socket] = []
        self._accept_paused: asyncio.TimerHandle | None = None
        self._starting: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(3)

    def rdns_done(self, _task: asyncio.Future[Any]) -> None:
        self.rdns_running -= 1

    def next_session_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):x}"

    async def start(self, sockets: Sequence[socket.socket] = (), *, serve: bool = True) -> None:
        """Bind and listen; or, in a receive worker, serve on the listening ``sockets`` the main process bound.
        ``serve=False`` binds and listens without accepting (the main process when receive workers accept)."""
        loop = asyncio.get_running_loop()
        if self.certificates is not None:
            self.report_certificates()
            self._watch = asyncio.ensure_future(self.watch_certificates())
        if sockets:
            self._accepting += sockets
        else:
            try:
                server = await loop.create_server(
                    lambda: Connection(self),
                    self.config.host,
                    self.config.port,
                    reuse_address=True,
                    backlog=BACKLOG,
                    start_serving=False,
                )
            except OSError as exc:
                reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
                raise StartupError(
                    f"listener {self.config.name}: cannot listen on {self.config.address}: {reason}"
                ) from None
            self.servers.append(server)
            if serve:  # our accept loop works on duplicates of the server's sockets (uvloop's are not sockets)
                self._accepting += [socket.socket(fileno=os.dup(s.fileno())) for s in server.sockets]
        if serve:
            for sock in self._accepting:
                sock.listen(BACKLOG)  # (a server made with start_serving=False has not listened yet)
                sock.setblocking(False)
            self._resume_accepting()

    # -- accepting --------------------------------------------------------------------------------------------

    def _resume_accepting(self) -> None:
        self._accept_paused = None
        if self.stopping:
            return
        loop = asyncio.get_running_loop()
        for sock in self._accepting:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def _pause_accepting(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._accepting:
            loop.remove_reader(sock.fileno())
        if self._accept_paused is None:
            self._accept_paused = loop.call_later(seconds, self._resume_accepting)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_TRANSIENT:
                    continue
                self.descriptors.accept_failed(self.config.name, exc)
                self._pause_accepting(ACCEPT_BACKOFF)
                return
            self._admit(conn, str(addr[0]) if isinstance(addr, tuple) else "")

    def _admit(self, conn: socket.socket, ip: str) -> None:
        refusal = self.descriptors.admit()
        release_client = None
        reason = "descriptors"
        if refusal is None:
            try:
                refusal, release_client = self.client_limits.admit(ip)
            except ValueError:  # not an IP address (a test's Unix socket): no per-client limit
                refusal = None
            if refusal is not None:
                self.descriptors.release()
                reason = "client" if refusal is TOO_MANY_FROM_CLIENT else "network"
        if refusal is not None:
            self.runtime.hooks.emit("connection_refused", listener=self.config.name, reason=reason)
            # a plain listener says why (best effort, never waits); an implicit-TLS one can only hang up
            if not (self.config.implicit_tls and self.tls_context is not None):
                with contextlib.suppress(OSError):
                    conn.setblocking(False)
                    conn.send(f"{refusal}\r\n".encode())
            conn.close()
            return
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.descriptors.release()
                if release_client is not None:
                    release_client()

        conn.setblocking(False)
        task = asyncio.get_running_loop().create_task(self._start_connection(conn, release))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start_connection(self, conn: socket.socket, release: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        implicit = self.config.implicit_tls and self.tls_context is not None
        tls: dict[str, Any] = {"ssl": self.tls_context, "ssl_handshake_timeout": HANDSHAKE_TIMEOUT} if implicit else {}
        protocol: Connection | None = None

        def factory() -> Connection:
            nonlocal protocol
            protocol = Connection(self, release=release)
            return protocol

        try:
            await loop.connect_accepted_socket(factory, conn, **tls)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.debug("connection not started", extra={"listener": self.config.name, "error": repr(exc)})
            if protocol is None or protocol.task is None:
                release()
            with contextlib.suppress(OSError):
                conn.close()
        except BaseException:
            if protocol is None or protocol.task is None:
                release()
            with contextlib.suppress(OSError):
                conn.close()
            raise

    async def watch_certificates(self) -> None:
        """Every ``server.certificate_check_interval`` seconds: re-read the certificate and key files when they
        changed; new handshakes get the new set, or the old one when the new files do not load (logged once)."""
        assert self.certificates is not None
        interval = self.runtime.config.server.certificate_check_interval
        while True:
            await asyncio.sleep(interval)
            self.reload_certificates()

    def reload_certificates(self) -> bool:
        """Re-read the certificates if their files changed (also what a reload does). True when a new set serves."""
        rotating = self.certificates
        if rotating is None:
            return False
        before = rotating.current
        problem = rotating.refresh()
        name = self.config.name
        if problem:
            log.warning(
                "new certificate files refused; the previous certificate keeps serving",
                extra={"listener": name, "file": self.config.tls_cert, "error": problem},
            )
            self.runtime.hooks.emit("certificate_reload", listener=name, result="refused")
            return False
        if rotating.current is before:
            return False
        leaf = rotating.current.leaf
        log.info(
            "certificate reloaded",
            extra={"listener": name, "subject": leaf.subject.rfc4514_string(), "not_after": leaf.not_valid_after_utc},
        )
        self.runtime.hooks.emit("certificate_reload", listener=name, result="loaded")
        self.report_certificates()
        return True

    def report_certificates(self) -> None:
        """The expiry of every certificate this listener serves, as an event (a gauge in the metrics)."""
        if self.certificates is None:
            return
        for sni, leaf in self.certificates.current.leaves.items():
            self.runtime.hooks.emit(
                "certificate_expiry",
                leaf.not_valid_after_utc.timestamp(),
                listener=self.config.name,
                certificate=sni or "default",
            )

    def prepare_reload(self, config: Config, lc: ListenerConfig) -> Callable[[], None]:
        """Everything a reloaded configuration changes for this listener, loaded now (raises :class:`StartupError`
        when its certificates do not load: nothing changed then); returns what applies it. Sessions already open
        keep their policy; new sessions get the new one. The address and implicit TLS need a restart (the caller
        refuses those)."""
        files = tls_files(lc, config)
        rotating = self.certificates
        adopt_tls: Callable[[], None] | None = None
        fresh: tlsmod.RotatingServerContext | None = None
        try:
            if files is not None and rotating is not None:
                adopt_tls = rotating.prepare(files.cert, files.key, **files.kwargs())
            elif files is not None:
                fresh = tlsmod.RotatingServerContext(files.cert, files.key, **files.kwargs())
        except (OSError, ValueError, ssl.SSLError) as exc:
            raise StartupError(f"listener {lc.name}: {lc.tls_cert}: {exc}") from None
        tls_available = files is not None
        policy = ReceivePolicy(config, lc, tls_available=tls_available)

        def apply() -> None:
            self.config = lc
            if adopt_tls is not None:
                adopt_tls()
            elif fresh is not None or files is None:
                if self._watch is not None:
                    self._watch.cancel()
                    self._watch = None
                self.certificates = fresh
                self.tls_context = None if fresh is None else fresh.context
                if fresh is not None:
                    self._watch = asyncio.ensure_future(self.watch_certificates())
            self.policy = policy
            self.client_verifier = client_verifier(config, lc, self.tls_context is not None)
            if self.certificates is not None:
                _warn_expired(self.runtime, lc, self.certificates)
                self.report_certificates()

        return apply

    def stop_accepting(self) -> None:
        """Accept no more connections; open sessions go on. The listening sockets are closed here only (a
        retiring receive worker: the other processes keep theirs)."""
        if self._accept_paused is not None:
            self._accept_paused.cancel()
            self._accept_paused = None
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            for sock in self._accepting:
                loop.remove_reader(sock.fileno())
        for sock in self._accepting:
            sock.close()
        self._accepting = []

    def close(self) -> None:
        self.stopping = True
        self.stop_accepting()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.shutdown()

    async def wait_closed(self) -> None:
        try:
            for server in self.servers:
                await server.wait_closed()
            if self._starting:
                await asyncio.gather(*self._starting, return_exceptions=True)
            tasks = [c.task for c in list(self.connections) if c.task is not None]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:
            for conn in list(self.connections):
                conn.abort()
            raise

    @property
    def sockets(self) -> tuple[Any, ...]:
        if self.servers:
            return tuple(sock for server in self.servers for sock in server.sockets)
        return tuple(self._accepting)


async def start_listeners(
    runtime: Runtime, sockets: Mapping[str, Sequence[socket.socket]] | None = None, *, serve: bool = True
) -> list[Listener]:
    """Called by the engine: one started :class:`Listener` per ``[[listener]]`` (on the already listening
    ``sockets`` by listener name: a receive worker's, systemd's or those bound before root was dropped; a listener
    without sockets binds its address; bound but not accepting with ``serve=False``)."""
    listeners: list[Listener] = []
    try:
        for lc in runtime.config.listener:
            listener = Listener(runtime, lc)
            await listener.start(() if sockets is None else sockets.get(lc.name, ()), serve=serve)
            listeners.append(listener)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


# --- one connection ---------------------------------------------------------------------------------------------


Handler = Callable[["Connection", str | None], Awaitable[None]]


class Connection(asyncio.Protocol):
    """One SMTP client. I/O here; decisions in :class:`ReceivePolicy`; hooks through ``runtime.hooks``."""

    COMMANDS: ClassVar[dict[bytes, Handler]] = {}  # filled once, after the class body

    def __init__(self, listener: Listener, *, release: Callable[[], None] | None = None) -> None:
        self.listener = listener
        self._release = release  # gives back the admission slot (see Listener._admit)
        self.runtime = listener.runtime
        self.hooks = listener.runtime.hooks
        self.policy = listener.policy
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.stash = Stash()
        self.state = ReceiveState(peer_ip="")
        self.session_id = listener.next_session_id()
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)
        self._out: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._closed = False
        self._reading_paused = False
        self._writing_paused = False
        self._stopping = False
        self._idle_wait = False  # waiting for a command (a shutdown may interrupt)
        self._deadline = 0.0
        self._transactions = 0
        self._headers_msg: IncomingMessage | None = None
        # the client's reverse DNS: started at connect, awaited (bounded) at EHLO -- never before the banner
        self._rdns_task: asyncio.Task[ReverseDns] | None = None
        self._rdns_deadline = 0.0
        self.rdns: ReverseDns | None = None
        # rejections of this session already in the tracking log, by kind: the first of a kind is written at
        # once, the repeats are counted and written as one event when the session ends
        self._rejects: dict[tuple[str, str, str], tuple[dict[str, Any], int]] = {}

    # -- asyncio.Protocol ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        self.listener.connections.add(self)
        self.task = self.loop.create_task(self._run())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > HIGH_WATER and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return self.state.tls is None  # keep the TCP side open to answer; TLS transports cannot half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def shutdown(self) -> None:
        self._stopping = True
        if self._idle_wait:
            self._wake()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- output ----------------------------------------------------------------------------------------------

    def _reply(self, reply: Reply | str) -> None:
        self._out.append(f"{reply}\r\n".encode("utf-8", "surrogateescape"))

    def _reply_lines(self, code: int, lines: list[str]) -> None:
        last = len(lines) - 1
        self._out.append(
            "".join(f"{code}{' ' if i == last else '-'}{line}\r\n" for i, line in enumerate(lines)).encode()
        )

    def _flush(self) -> None:
        if self._out and not self._closed and self.transport is not None:
            self.transport.write(b"".join(self._out))
        self._out.clear()

    async def _drain(self) -> None:
        self._flush()
        if not self._writing_paused or self._closed:
            return
        waiter = self._drain_waiter = self.loop.create_future()
        timer = self.loop.call_later(self.policy.limits.idle_timeout, waiter.cancel)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled() and self.task is not None and not self.task.cancelling():
                raise _Gone() from None  # a client that does not read its replies
            raise
        finally:
            timer.cancel()
            self._drain_waiter = None

    # -- input -----------------------------------------------------------------------------------------------

    async def _wait(self, *, idle: bool = False, until: float | None = None) -> None:
        """Wait for more input. Raises _Close on timeout or shutdown (the reply queued), _Gone on EOF.

        ``until``: a deadline of the input being read (a command line's, or DATA's minimum rate), besides the
        idle and session timeouts."""
        await self._drain()
        if self._closed or self._eof:
            raise _Gone()
        if idle and self._stopping:
            raise _Close(R.SHUTDOWN)
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        now = self.loop.time()
        idle_deadline = now + self.policy.limits.idle_timeout
        deadline = min(idle_deadline, self._deadline, until if until is not None else self._deadline)
        waiter = self._waiter = self.loop.create_future()
        timer = self.loop.call_later(max(0.0, deadline - now), self._wake)
        self._idle_wait = idle
        before = len(self.buf)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
            self._idle_wait = False
        if len(self.buf) > before:
            return
        if self._closed or self._eof:
            raise _Gone()
        if idle and self._stopping:
            raise _Close(R.SHUTDOWN)
        now = self.loop.time()
        if now >= self._deadline:
            raise _Close(R.SESSION_TOO_LONG)
        if now >= idle_deadline:
            raise _Close(R.TIMEOUT)
        if until is not None and now >= until:
            raise _Close(R.TOO_SLOW)

    async def _read_line(self, limit: int, *, idle: bool = True) -> bytes | Reply:
        """One CRLF-terminated line without its CRLF, or the Reply for a bad line (too long, bare CR/LF).

        Over-long input is discarded as it arrives; nothing beyond ``limit`` octets is held. Once a line has
        begun it must end within ``command_timeout`` (input that trickles in does not reset a deadline).
        """
        scan = 0
        until: float | None = None
        while True:
            i = self.buf.find(b"\n", scan)
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                if i + 1 > limit:
                    return R.LINE_TOO_LONG
                if i == 0 or line[-2] != 0x0D or line.find(b"\r", 0, i - 1) >= 0:
                    return R.BARE_LF
                return line[:-2]
            if until is None and self.buf:
                until = self.loop.time() + self.policy.limits.command_timeout
            if len(self.buf) >= limit:
                self.buf.clear()
                while True:  # discard up to the end of this line
                    await self._wait(idle=False, until=until)
                    j = self.buf.find(b"\n")
                    if j >= 0:
                        del self.buf[: j + 1]
                        return R.LINE_TOO_LONG
                    self.buf.clear()
            scan = len(self.buf)
            await self._wait(idle=idle, until=until)

    async def _read_data(self) -> tuple[bytes | None, Reply | None]:
        """The DATA content up to CRLF.CRLF, read in bulk (``find`` over whole chunks, never line by line).

        Returns ``(raw content with dot-stuffing, None)`` or ``(None, reply)`` when it must be refused. Once the
        size limit is passed (or a header hook refused), input is only scanned for the end and dropped.
        """
        limits = self.policy.limits
        limit = self.policy.size_limit(self.state)
        started = self.loop.time()
        rate = limits.min_data_rate
        received = 0
        msg = bytearray(b"\r\n")  # the DATA line's CRLF: a first line of "." ends an empty message
        scan = 0
        hscan = 0
        headers_done = False
        refused: Reply | None = None
        discarding = False
        while True:
            if self.buf:
                received += len(self.buf)
                msg += self.buf
                self.buf.clear()
            end = msg.find(b"\r\n.\r\n", scan)
            if end >= 0:
                self.buf += msg[end + 5 :]  # commands pipelined after the message
                break
            if not discarding and not headers_done:
                j = msg.find(b"\r\n\r\n", hscan)
                if j >= 0:
                    headers_done = True
                    refused = await self._end_of_headers(bytes(msg[2 : j + 2]))
                    discarding = refused is not None
                else:
                    hscan = max(0, len(msg) - 3)
            if not discarding and len(msg) - 2 > limit:
                refused, discarding = R.TOO_BIG, True
            if discarding and len(msg) > 4:
                del msg[:-4]  # keep only what could start the terminator
            scan = max(0, len(msg) - 4)
            # the minimum rate: after a grace of command_timeout, min_data_rate bytes per second on average
            until = started + limits.command_timeout + received / rate if rate else None
            await self._wait(until=until)
        if refused is not None:
            return None, refused
        content_end = end + 2
        if content_end - 2 > limit:
            return None, R.TOO_BIG
        raw = bytes(msg[2:content_end])
        del msg
        lf = raw.count(b"\n")
        if lf != raw.count(b"\r\n") or raw.count(b"\r") != lf:
            return None, R.BARE_LF_DATA
        if not headers_done:
            j = raw.find(b"\r\n\r\n")
            refused = await self._end_of_headers(raw if j < 0 else raw[: j + 2])
            if refused is not None:
                return None, refused
        return raw, None

    # -- hooks -----------------------------------------------------------------------------------------------

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
        st = self.state
        conn = st.tx_connector if st.envelope.mail_from is not None else st.connector
        rdns = self._rdns_known()
        return Session(
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

    async def _end_of_headers(self, block: bytes) -> Reply | None:
        self._headers_msg = IncomingMessage(block, parse_headers(block))
        verdict = await self._veto(
            self.hooks.on_end_of_headers(self.snapshot(), self.state.envelope, self._headers_msg)
        )
        reply, ok, _ = self._outcome(verdict, R.OK)
        return None if ok else reply

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
        except _Close as close:
            if close.reply is not None:
                self._reply(close.reply)
        except (_Gone, ConnectionError):
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
            raise _Close(R.SHUTDOWN)
        verdict = await self._veto(self.hooks.on_connect(self.snapshot()))
        if verdict is PLUGIN_FAILED:
            self.state.deferred = R.PLUGIN_ERROR  # greet, but no transaction gets through
        elif isinstance(verdict, Reject | TempFail | Disconnect):
            await self._rejected("connect", verdict.reply, "plugin")
            raise _Close(verdict.reply)
        self._reply(self.policy.banner())
        limits = self.policy.limits
        while True:
            # AUTH may carry an initial response up to RFC 4954's 12,288 octets; every other command 512
            line = await self._read_line(limits.auth_line)
            if isinstance(line, Reply):
                await self._bad(line)
                continue
            verb, _, rest = line.partition(b" ")
            verb = verb.upper()
            if verb == b"BDAT":  # its chunk follows at once: it must be read (or the session ends), whatever we say
                await self.cmd_bdat(rest if len(line) + 2 <= limits.command_line else b"?")
                continue
            if len(line) + 2 > limits.command_line and verb != b"AUTH":
                await self._bad(R.LINE_TOO_LONG)
                continue
            handler = self.COMMANDS.get(verb)
            if handler is None:
                if verb in _FOREIGN_VERBS:  # an HTTP or proxy request at the SMTP port: not a confused client
                    await self._rejected("connect", R.FOREIGN_PROTOCOL, "protocol", command=verb.decode("ascii"))
                    raise _Close(R.FOREIGN_PROTOCOL)
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
            raise _Close(R.TOO_MANY_ERRORS)
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
                raise _Close(verdict.reply)
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
        raise _Close(R.BYE)

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
        await self._drain()
        # RFC 3207 §4.2: whatever the client pipelined after STARTTLS is discarded, never executed under TLS.
        self.buf.clear()
        assert self.transport is not None
        try:
            transport = await self.loop.start_tls(
                self.transport, self, ctx, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("STARTTLS handshake failed", extra={"session": self.session_id, "error": repr(exc)})
            self.transport.abort()
            await self.hooks.on_event("tls_handshake_failed", listener=self.listener.config.name)
            raise _Gone() from None
        if transport is None:
            raise _Gone()
        self.transport = transport  # (input that arrived during the handshake came over TLS: kept)
        st = self.state
        st.reset_after_tls()
        ssl_object = transport.get_extra_info("ssl_object")
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
        parts = (arg or "").split()
        if not parts or len(parts) > 2:
            await self._bad(Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
            return
        limiter = self.listener.auth_failures
        if limiter.blocked(st.peer_ip):
            await self.hooks.on_event("auth", result="rate_limited")
            self._reply(R.AUTH_RATE)
            return
        mech = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        if mech not in ("PLAIN", "LOGIN"):
            await self._bad(R.AUTH_MECH)
            return
        creds = await (self._auth_plain(initial) if mech == "PLAIN" else self._auth_login(initial))
        if isinstance(creds, Reply):
            await self._bad(creds)
            return
        username, password = creds
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

    async def _auth_line(self, challenge: str) -> str | Reply:
        self._reply(f"334 {challenge}")
        line = await self._read_line(self.policy.limits.auth_line)
        if isinstance(line, Reply):
            return line
        text = line.decode("ascii", "replace").strip()
        return R.AUTH_CANCELLED if text == "*" else text

    @staticmethod
    def _b64(text: str) -> bytes | None:
        import binascii

        if text == "=":
            return b""
        try:
            return binascii.a2b_base64(text.encode("ascii", "replace"), strict_mode=True)
        except (binascii.Error, ValueError):
            return None

    async def _auth_plain(self, initial: str | None) -> tuple[str, str] | Reply:
        text = initial if initial is not None else await self._auth_line("")
        if isinstance(text, Reply):
            return text
        if text == "*":
            return R.AUTH_CANCELLED
        raw = self._b64(text)
        if raw is None:
            return R.AUTH_BAD64
        parts = raw.split(b"\0")
        if len(parts) != 3:
            return Reply(501, "5.5.2", "PLAIN response must be authzid NUL authcid NUL password")
        try:
            authzid, username, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            return R.AUTH_BAD64
        verdict = await self._veto(self.hooks.on_auth_command(self.snapshot(), "PLAIN", username))
        reply, ok, _ = self._outcome(verdict, R.OK)
        if not ok:
            return reply
        if authzid and authzid != username:
            return R.AUTH_FAILED
        return username, password

    async def _auth_login(self, initial: str | None) -> tuple[str, str] | Reply:
        verdict = await self._veto(self.hooks.on_auth_command(self.snapshot(), "LOGIN", None))
        reply, ok, _ = self._outcome(verdict, R.OK)
        if not ok:
            return reply
        values: list[str] = []
        for given, challenge in ((initial, "VXNlcm5hbWU6"), (None, "UGFzc3dvcmQ6")):
            text = given if given is not None else await self._auth_line(challenge)
            if isinstance(text, Reply):
                return text
            raw = self._b64(text)
            if raw is None:
                return R.AUTH_BAD64
            try:
                values.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                return R.AUTH_BAD64
        return values[0], values[1]

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
                await self._rejected("mail", problem, _reason(problem), sender=str(mail.sender))
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
                raise _Close(reply)
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
                "rcpt", problem, _reason(problem), sender=str(st.envelope.mail_from), recipient=str(rcpt)
            )
            await self._refuse(problem)
            return
        verdict = await self._veto(self.hooks.on_rcpt_command(self.snapshot(), st.envelope, rcpt))
        reply, ok, close = self._outcome(verdict, R.RCPT_OK)
        if not ok:
            await self._rejected("rcpt", reply, "plugin", sender=str(st.envelope.mail_from), recipient=str(rcpt))
            if close:
                raise _Close(reply)
            await self._refuse(reply)
            return
        st.envelope = dataclasses.replace(
            st.envelope, rcpt_tos=(*st.envelope.rcpt_tos, rcpt), rcpt_dsn=(*st.envelope.rcpt_dsn, parsed.dsn)
        )
        self._reply(reply)

    async def cmd_data(self, arg: str | None) -> None:
        st = self.state
        if arg:
            await self._bad(R.NO_ARGS)
            return
        problem = self.policy.check_data(st)
        if problem is not None:
            await self._bad(problem)
            return
        self._reply("354 End data with <CR><LF>.<CR><LF>")
        self._transactions += 1
        raw, refused = await self._read_data()
        envelope = st.envelope
        sender = str(envelope.mail_from)
        try:
            if refused is not None or raw is None:
                reply = refused or R.QUEUE_ERROR
                self._reply(reply)
                await self._rejected("data", reply, _reason(reply), sender=sender, recipients=len(envelope.rcpt_tos))
                if (reply is R.BARE_LF_DATA or reply is R.TEXT_LINE_TOO_LONG) and self.policy.error(st):
                    raise _Close(R.TOO_MANY_ERRORS)
                return
            await self._accept_message(raw)
        finally:
            st.reset_transaction()

    async def _read_chunk(self, size: int, into: bytearray | None) -> None:
        """Exactly ``size`` octets of a BDAT chunk, appended to ``into`` (``None``: read and dropped). Nothing in
        them is a command; what follows them is. The minimum data rate applies as for DATA."""
        limits = self.policy.limits
        rate = limits.min_data_rate
        started = self.loop.time()
        remaining = size
        while True:
            take = min(remaining, len(self.buf))
            if take:
                if into is not None:
                    into += self.buf[:take]
                del self.buf[:take]
                remaining -= take
            if remaining == 0:
                return
            until = started + limits.command_timeout + (size - remaining) / rate if rate else None
            await self._wait(until=until)

    async def cmd_bdat(self, arg: bytes) -> None:
        """RFC 3030 ``BDAT <octets> [LAST]``: the chunk is read exactly, never dot-unstuffed, never parsed for
        commands; the assembled message meets DATA's rules (CRLF only, line length, size across chunks)."""
        st = self.state
        try:
            size, last = parse_bdat(arg.strip(b" "))
        except ParseError:
            # we cannot tell where the chunk ends: reading on would run its octets as commands
            await self._rejected("data", R.BDAT_SYNTAX, "syntax")
            raise _Close(R.BDAT_SYNTAX) from None
        problem = self.policy.check_bdat(st, size)
        if problem is not None:
            await self._read_chunk(size, None)
            sender = str(st.envelope.mail_from) if st.envelope.mail_from is not None else None
            st.reset_transaction()  # RFC 3030 §2: a failed chunk fails the transaction
            if problem.code in (503, 530):
                await self._bad(problem)
            else:
                await self._rejected("data", problem, _reason(problem), sender=sender)
                self._reply(problem)
            return
        if st.chunks is None:
            st.chunks = bytearray()
            self._transactions += 1
        await self._read_chunk(size, st.chunks)
        if not last:
            self._reply(Reply(250, "2.0.0", f"{size} octets received"))
            return
        raw = bytes(st.chunks)
        st.chunks = None
        envelope = st.envelope
        sender = str(envelope.mail_from)
        try:
            refused = self.policy.check_text(raw)
            if refused is None:
                j = raw.find(b"\r\n\r\n")
                refused = await self._end_of_headers(raw if j < 0 else raw[: j + 2])
            if refused is not None:
                self._reply(refused)
                await self._rejected(
                    "data", refused, _reason(refused), sender=sender, recipients=len(envelope.rcpt_tos)
                )
                if (refused is R.BARE_LF_DATA or refused is R.TEXT_LINE_TOO_LONG) and self.policy.error(st):
                    raise _Close(R.TOO_MANY_ERRORS)
                return
            if raw and not raw.endswith(b"\r\n"):
                raw += b"\r\n"  # a message ends with a line end (DATA's CRLF.CRLF guarantees one)
            await self._accept_message(raw, stuffed=False)
        finally:
            st.reset_transaction()

    async def _accept_message(self, raw: bytes, *, stuffed: bool = True) -> None:
        st = self.state
        envelope = st.envelope
        sender = str(envelope.mail_from)
        if stuffed:
            # RFC 5321 §4.5.2: remove the transparency dots
            if raw.startswith(b"."):
                raw = raw[1:]
            raw = raw.replace(b"\r\n.", b"\r\n")
            if len(raw) > self.policy.limits.text_line and max(map(len, raw.split(b"\r\n"))) > 998:
                self._reply(R.TEXT_LINE_TOO_LONG)
                await self._rejected("data", R.TEXT_LINE_TOO_LONG, "line_length", sender=sender)
                return
        j = raw.find(b"\r\n\r\n")
        headers = parse_headers(raw if j < 0 else raw[: j + 2])
        message = IncomingMessage(raw, headers)
        head = self._headers_msg
        if head is not None:  # headers a plugin added at end of headers
            for edit in head.added_headers:
                message.add_header(edit.name, edit.value)
            for key, value in head.meta.items():  # and metadata set then
                message.set_meta(key, value)
            self._headers_msg = None
        verdict = await self._veto(self.hooks.on_end_of_data(self.snapshot(), envelope, message))
        reply, ok, close = self._outcome(verdict, R.OK)
        if not ok:
            await self._rejected("data", reply, "plugin", sender=sender, recipients=len(envelope.rcpt_tos))
            if close:
                raise _Close(reply)
            self._reply(reply)
            return
        from mxgate.core.queue.store import MessageOptions, NewRecipient, QueueFullError

        recipients = tuple(str(r) for r in envelope.rcpt_tos)
        dsn = envelope.rcpt_dsn if len(envelope.rcpt_dsn) == len(recipients) else (RecipientDsn(),) * len(recipients)
        queued = [NewRecipient(r, d.notify_text, d.orcpt_text) for r, d in zip(recipients, dsn, strict=True)]
        options = MessageOptions(envelope.dsn_ret, envelope.envid, envelope.requiretls)
        rdns = await self._await_rdns()
        now = self.runtime.clock()
        ident = f"{self.session_id}.{self._transactions}"
        added = b"".join(f"{e.name}: {e.value}\r\n".encode("utf-8", "surrogateescape") for e in message.added_headers)
        received = received_header(
            helo=st.helo,
            ip=st.peer_ip,
            hostname=self.policy.hostname,
            esmtp=st.esmtp,
            tls=st.tls,
            auth=st.auth_user is not None,
            ident=ident,
            recipients=recipients,
            when=datetime.fromtimestamp(now, UTC),
            reverse_dns=rdns.name if rdns else None,
        )
        data = added + received + raw
        message_id = message.get_header("Message-ID")
        meta = self._meta(envelope, message)
        try:
            queue_id = await self.runtime.submit(
                sender, queued, data, meta=meta, message_id=message_id, now=now, options=options
            )
        except QueueFullError:
            self._reply(R.QUEUE_FULL)
            await self._rejected("data", R.QUEUE_FULL, "queue_full", sender=sender)
            return
        except Exception:
            log.exception("queueing failed", extra={"session": self.session_id})
            self._reply(R.QUEUE_ERROR)
            await self._rejected("data", R.QUEUE_ERROR, "queue_error", sender=sender)
            return
        tls = st.tls
        self.runtime.tracking.write(
            TrackEvent.RECEIVE,
            queue_id=queue_id,
            message_id=message_id,
            received_id=ident,
            listener=self.listener.config.name,
            connector=self._label_connector(),
            client=st.peer_ip,
            client_name=rdns.name if rdns else None,
            client_rdns=str(rdns.status) if rdns else None,
            helo=st.helo,
            tls=tls.version if tls else None,
            cipher=tls.cipher if tls else None,
            auth_user=st.auth_user,
            sender=sender,
            recipients=len(recipients),
            size=len(data),
        )
        self._reply(f"250 2.0.0 Ok: queued as {queue_id}")
        st.errors = 0  # a client that delivers mail starts over (max_errors counts errors "without delivering")
        await self.hooks.on_event(
            "message_received", listener=self.listener.config.name, connector=self._label_connector()
        )

    def _meta(self, envelope: Any, message: IncomingMessage) -> MessageMeta:
        """What the queue keeps about this transaction (``message.meta`` for categorizer and delivery hooks)."""
        st = self.state
        conn = st.tx_connector
        return MessageMeta(
            listener=self.listener.config.name,
            inbound_connector=conn.name if conn else "",
            session=self.session_id,
            client_ip=st.peer_ip,
            helo=st.helo or "",
            tls_version=st.tls.version if st.tls is not None else None,
            tls_cipher=st.tls.cipher if st.tls is not None else None,
            auth_user=st.auth_user,
            internal=conn is not None and conn.treat_as_internal,
            body_8bit=envelope.body.upper() == "8BITMIME",
            smtputf8=envelope.smtputf8,
            extra=message.meta,
        )


def _reason(reply: Reply) -> str:
    """A bounded label for ``message_rejected`` events."""
    if reply.enhanced == "5.7.1" and "Relay" in reply.text:
        return "relay"
    if reply.enhanced == "5.7.1":
        return "sender_restriction"
    if reply.code == 530:
        return "tls_required"
    if reply.enhanced == "5.3.4":
        return "size"
    if reply.enhanced == "5.6.0":
        return "smuggling"
    if reply.enhanced == "4.5.3":
        return "recipients"
    if reply.enhanced == "5.1.2":
        return "no_route"
    if reply.enhanced == "4.3.0":
        return "plugin"
    return "policy" if reply.code >= 500 else "tempfail"


Connection.COMMANDS = {
    b"HELO": Connection.cmd_helo,
    b"EHLO": Connection.cmd_ehlo,
    b"STARTTLS": Connection.cmd_starttls,
    b"AUTH": Connection.cmd_auth,
    b"MAIL": Connection.cmd_mail,
    b"RCPT": Connection.cmd_rcpt,
    b"DATA": Connection.cmd_data,
    b"RSET": Connection.cmd_rset,
    b"NOOP": Connection.cmd_noop,
    b"QUIT": Connection.cmd_quit,
    b"VRFY": Connection.cmd_vrfy,
    b"HELP": Connection.cmd_help,
    b"EXPN": Connection.cmd_not_implemented,
    b"TURN": Connection.cmd_not_implemented,
    b"ETRN": Connection.cmd_not_implemented,
}
