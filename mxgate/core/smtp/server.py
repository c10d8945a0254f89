"""The receive side's listeners: one :class:`Listener` per ``[[listener]]`` -- its sockets, our own accept loop,
admission (:mod:`mxgate.core.smtp.admission`), its TLS certificates (watched and reloaded) -- and, per accepted
client, a :class:`~mxgate.core.smtp.connection.Connection` (the per-client driver).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import itertools
import logging
import os
import secrets
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from mxgate.core import tls as tlsmod
from mxgate.core.auth import AUTH_FAILURES, FailureLimiter
from mxgate.core.config import Config, ListenerConfig
from mxgate.core.errors import StartupError
from mxgate.core.model import StashKey
from mxgate.core.smtp.admission import ACCEPT_BACKOFF, TOO_MANY_FROM_CLIENT, ClientLimits, DescriptorBudget
from mxgate.core.smtp.connection import HANDSHAKE_TIMEOUT, Connection
from mxgate.core.smtp.session import ReceivePolicy

if TYPE_CHECKING:
    from mxgate.core.runtime import Runtime

__all__ = ["Listener", "start_listeners"]

log = logging.getLogger(__name__)

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
