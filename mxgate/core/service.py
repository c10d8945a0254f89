"""What running as a system service needs before the gateway reads anything from the network: listening sockets
handed over by systemd (socket activation), binding privileged ports as root and then dropping to
``[server] user``/``group``, and one gateway per state directory (a lock).

Socket activation follows ``sd_listen_fds(3)``: ``LISTEN_PID`` must be our pid, ``LISTEN_FDS`` sockets start at
descriptor 3, and ``LISTEN_FDNAMES`` (colon-separated, from ``FileDescriptorName=``) names them. A socket goes to the
``[[listener]]`` of that name, else to the listener whose address it is bound to; a socket that matches no listener
is an error (it would be a port nobody answers). The variables are removed from the environment, so that no child
process (a receive worker) takes the sockets for its own. Listeners without an inherited socket bind as usual.

Without systemd, ``mxgate run`` started as root with ``server.user`` set binds every listener, hands the state
directory to that user, and drops to it (groups included) before the resolver, the queue, plugins' services or any
listener start: nothing from the network is read as root.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import ipaddress
import logging
import os
import pwd
import socket
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from mxgate.core.config import Config, ListenerConfig
from mxgate.core.errors import StartupError

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START: Final = 3
LOCK_NAME: Final = "mxgate.lock"
LISTEN_BACKLOG: Final = 1024  # as the listener's own (smtp.server.BACKLOG): asyncio listen()s again with it


# --- socket activation ------------------------------------------------------------------------------------------


def _address_key(host: str, port: int) -> tuple[str, int]:
    try:
        return str(ipaddress.ip_address(host.split("%", 1)[0])), port
    except ValueError:
        return host.lower(), port


def _sockname_key(sock: socket.socket) -> tuple[str, int] | None:
    try:
        name = sock.getsockname()
    except OSError:
        return None
    if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(name, tuple):
        return _address_key(str(name[0]), int(name[1]))
    return None


def inherited_sockets(
    config: Config, environ: MutableMapping[str, str] | None = None, *, pid: int | None = None
) -> dict[str, list[socket.socket]]:
    """The sockets systemd passed us, by listener name (empty without socket activation). Removes the
    ``LISTEN_*`` variables from ``environ`` (default: ``os.environ``). Raises :class:`StartupError` for a socket
    that matches no listener or is not a listening TCP socket."""
    env = os.environ if environ is None else environ
    listen_pid = env.pop("LISTEN_PID", None)
    count_text = env.pop("LISTEN_FDS", None)
    names_text = env.pop("LISTEN_FDNAMES", None)
    if listen_pid is None or count_text is None:
        return {}
    if listen_pid != str(os.getpid() if pid is None else pid):
        return {}  # meant for another process (we were started by the one systemd activated)
    try:
        count = int(count_text)
    except ValueError:
        raise StartupError(f"LISTEN_FDS={count_text!r} is not a number") from None
    names = names_text.split(":") if names_text else []
    by_name = {lc.name: lc for lc in config.listener}
    by_address = {_address_key(lc.host, lc.port): lc for lc in config.listener}
    found: dict[str, list[socket.socket]] = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise StartupError(f"socket activation: descriptor {fd} is not a socket: {exc.strerror}") from None
        sock.set_inheritable(False)
        name = names[i] if i < len(names) else ""
        key = _sockname_key(sock)
        lc: ListenerConfig | None = by_name.get(name) or (by_address.get(key) if key else None)
        where = f"{key[0]}:{key[1]}" if key else "?"
        if sock.type != socket.SOCK_STREAM or key is None:
            raise StartupError(f"socket activation: descriptor {fd} ({name or where}) is not a TCP socket")
        if lc is None:
            raise StartupError(
                f"socket activation: socket {name or '-'} on {where} (descriptor {fd}) matches no [[listener]] "
                "by name or address"
            )
        found.setdefault(lc.name, []).append(sock)
        log.info("socket from systemd", extra={"listener": lc.name, "address": where, "fd": fd})
    return found


# --- binding and dropping privileges ------------------------------------------------------------------------------


def bind_listener(lc: ListenerConfig) -> list[socket.socket]:
    """Bind and listen on one listener's address (every address the host name resolves to)."""
    out: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(lc.host or None, lc.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, type_, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        for sock in out:
            sock.close()
        raise StartupError(
            f"listener {lc.name}: cannot listen on {lc.address}: {(exc.strerror or str(exc)).lower()}"
        ) from None
    return out


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    uid: int
    gid: int


def identity(user: str, group: str | None) -> Identity:
    """``server.user``/``server.group`` as numbers (the user's primary group when ``group`` is unset)."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise StartupError(f"server.user: no such user {user!r}") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise StartupError(f"server.group: no such group {group!r}") from None
    return Identity(user, pw.pw_uid, gid)


def hand_over(path: Path, who: Identity) -> None:
    """Give the state directory and everything in it to ``who`` (symbolic links are not followed)."""
    for root, dirs, files in os.walk(path):
        for name in (root, *(os.path.join(root, n) for n in (*dirs, *files))):
            st = os.lstat(name)
            if (st.st_uid, st.st_gid) != (who.uid, who.gid):
                os.chown(name, who.uid, who.gid, follow_symlinks=False)


def drop_privileges(who: Identity) -> None:
    """setgroups, setgid, setuid; then prove root is gone for good."""
    os.setgroups([who.gid])
    os.setgid(who.gid)
    os.setuid(who.uid)
    with contextlib.suppress(PermissionError):
        os.setuid(0)
        raise StartupError(f"could not drop root privileges to {who.user!r}")
    os.environ["USER"] = os.environ["LOGNAME"] = who.user


def prepare(config: Config) -> dict[str, list[socket.socket]]:
    """Before anything else starts: the inherited sockets; as root with ``server.user``, every listener bound,
    the state directory handed over and privileges dropped. Returns listening sockets by listener name."""
    sockets = inherited_sockets(config)
    user = config.server.user
    if os.geteuid() != 0:
        if user and pwd.getpwuid(os.geteuid()).pw_name != user:
            raise StartupError(
                f"server.user is {user!r}, but mxgate runs as {pwd.getpwuid(os.geteuid()).pw_name!r}, not as root: "
                "start it as root (it drops to server.user after binding) or as that user"
            )
        return sockets
    if not user:
        log.warning("running as root: set server.user (or use the systemd units in examples/systemd)")
        return sockets
    who = identity(user, config.server.group)
    try:
        for lc in config.listener:
            if lc.name not in sockets:
                sockets[lc.name] = bind_listener(lc)
    except BaseException:
        close_all(sockets)
        raise
    hand_over(config.state_path, who)
    drop_privileges(who)
    log.info("dropped privileges", extra={"user": who.user, "uid": who.uid, "gid": who.gid})
    return sockets


def close_all(sockets: Mapping[str, Sequence[socket.socket]]) -> None:
    for socks in sockets.values():
        for sock in socks:
            sock.close()


# --- one gateway per state directory --------------------------------------------------------------------------


class StateLock:
    """An exclusive ``flock`` on ``<state_dir>/mxgate.lock``, held while the gateway runs; the file says whose."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StartupError(f"{self.path}: cannot open the lock file: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise StartupError(
                f"state directory {self.path.parent} is in use by another mxgate (pid {holder}; lock {self.path})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
