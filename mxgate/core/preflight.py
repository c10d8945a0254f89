"""``mxgate check``: the preflight an operator runs before (re)starting the gateway, and after renewing a
certificate. It checks what ``mxgate run`` needs and what the rest of the world sees, and starts nothing:

- the configuration (every error, as ``config check`` prints them);
- the state directory: there or creatable, writable by this user, not open to group or others (mxgate keeps mail
  and logs readable only by itself); whether a gateway already runs on it (its lock);
- every listener certificate and key: readable, a matching pair, valid now and not expiring within ``--days``;
- the listener and metrics ports: free (unless the gateway that holds the state directory runs);
- then each plugin's own checks (``mxgate_lifecycle_on_preflight``): the built-ins prove that the resolver
  validates (DNSSEC self-test), that the TLSA records of our MX cover the certificate we serve, and that the
  MTA-STS policies we serve name our MX hosts.

One line per problem on standard output, exit 1 when there is any; a summary line and exit 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import fcntl
import os
import socket
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mxgate.core import tls as tlsmod
from mxgate.core.bootstrap import open_services
from mxgate.core.checks import split_hostport
from mxgate.core.commands import add_config_arg, load_from_args
from mxgate.core.config import Config
from mxgate.core.plugins import Dispatcher, Hooks
from mxgate.core.runtime import Runtime
from mxgate.core.service import LOCK_NAME
from mxgate.core.tracking import TrackingLog

EXPIRY_DAYS = 14  # the default of --days; the example alert (MxgateCertificateExpiring) uses the same


def _certificate_pairs(config: Config) -> Iterator[tuple[str, str, str]]:
    """(what, cert file, key file) for every listener certificate."""
    for lc in config.listener:
        if lc.tls_cert and lc.tls_key:
            yield f"listener {lc.name}", str(config.path(lc.tls_cert)), str(config.path(lc.tls_key))
        for sni in lc.sni_certificates:
            yield f"listener {lc.name} ({sni.name})", str(config.path(sni.cert)), str(config.path(sni.key))


def check_certificates(config: Config, *, now: datetime, days: int) -> list[str]:
    problems = []
    for what, cert, key in _certificate_pairs(config):
        problem = tlsmod.pair_problem(cert, key)
        if problem:
            problems.append(f"{what}: {problem}")
            continue
        leaf = tlsmod.leaf_certificate(cert)
        end, start = leaf.not_valid_after_utc, leaf.not_valid_before_utc
        if end <= now:
            problems.append(f"{what}: {cert} expired on {end:%Y-%m-%d %H:%M} UTC")
        elif end - now < timedelta(days=days):
            left = (end - now).total_seconds() / 86400
            problems.append(f"{what}: {cert} expires in {left:.1f} days ({end:%Y-%m-%d %H:%M} UTC)")
        if start > now:
            problems.append(f"{what}: {cert} is not valid before {start:%Y-%m-%d %H:%M} UTC")
    return problems


def running_pid(state: Path) -> str | None:
    """The pid recorded by the gateway that holds the state directory's lock, or None when none holds it."""
    try:
        fd = os.open(state / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
    finally:
        os.close(fd)
    return None


def check_state_dir(state: Path, *, handed_over: bool = False) -> list[str]:
    """``handed_over``: root runs this with ``server.user`` set, and `run` gives the directory to that user
    before it drops root: its owner now does not matter."""
    if not state.exists():
        parent = next((p for p in state.parents if p.exists()), Path("/"))
        if not os.access(parent, os.W_OK | os.X_OK):
            return [f"state directory {state} does not exist and cannot be created here ({parent} is not writable)"]
        return []
    if not state.is_dir():
        return [f"state directory {state} is not a directory"]
    problems = []
    st = state.stat()
    if st.st_uid != os.geteuid() and not handed_over:
        problems.append(f"state directory {state} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})")
    if not os.access(state, os.R_OK | os.W_OK | os.X_OK):
        problems.append(f"state directory {state} is not readable and writable by this user")
    if stat.S_IMODE(st.st_mode) & 0o077:
        problems.append(
            f"state directory {state} is mode {stat.S_IMODE(st.st_mode):04o}: mail and logs would be readable by "
            "others; expected 0700"
        )
    loose = []
    for root, _dirs, files in os.walk(state):
        for name in files:
            path = Path(root) / name
            try:
                mode = stat.S_IMODE(path.lstat().st_mode)
            except OSError:
                continue
            if mode & 0o077 and not path.is_symlink():
                loose.append(f"{path} ({mode:04o})")
    if loose:
        more = f" and {len(loose) - 1} more" if len(loose) > 1 else ""
        problems.append(f"state directory {state}: files open to group or others: {loose[0]}{more}; expected 0600")
    return problems


def port_problem(what: str, address: str) -> str | None:
    """None when ``address`` can be bound now (or only privileges are missing: root or systemd bind it)."""
    host, port = split_hostport(address)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return f"{what}: {address}: cannot resolve {host!r}: {exc}"
    for family, type_, proto, _, addr in dict.fromkeys(infos):
        with socket.socket(family, type_, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EPERM):
                    continue
                if exc.errno == errno.EADDRINUSE:
                    return f"{what}: {address} is in use by another program"
                return f"{what}: {address}: {(exc.strerror or str(exc)).lower()}"
    return None


def check_ports(config: Config) -> list[str]:
    found = [port_problem(f"listener {lc.name}", lc.address) for lc in config.listener]
    if config.metrics.listen:
        found.append(port_problem("metrics.listen", config.metrics.listen))
    return [p for p in found if p]


async def run_checks(
    config: Config, plugins: Any, *, days: int = EXPIRY_DAYS, now: datetime | None = None
) -> list[str]:
    """Every problem, one line each (empty: ready to run)."""
    when = now or datetime.now(UTC)
    state = config.state_path
    problems = check_state_dir(state, handed_over=os.geteuid() == 0 and bool(config.server.user))
    pid = running_pid(state) if state.is_dir() else None
    problems += check_certificates(config, now=when, days=days)
    if pid is None:
        problems += check_ports(config)
    hooks = Hooks(Dispatcher(plugins))
    runtime = Runtime(config=config, plugins=plugins, hooks=hooks, tracking=TrackingLog(state, enabled=False))
    try:
        await open_services(runtime, queue=False)
    except Exception as exc:  # a resolver that cannot be built: the plugins' checks cannot run either
        return [*problems, f"dns.resolvers: {exc}"]
    problems += await hooks.on_preflight(runtime, pid is not None)
    return problems


def cmd_check(args: argparse.Namespace) -> int:
    config, plugins = load_from_args(args)
    problems = asyncio.run(run_checks(config, plugins, days=args.days))
    for line in problems:
        print(line)
    pid = running_pid(config.state_path) if config.state_path.is_dir() else None
    running = f"; a gateway runs on this state directory (pid {pid})" if pid else ""
    if problems:
        print(f"mxgate check: {len(problems)} problem(s) in {config.source}{running}")
        return 1
    print(f"mxgate check: {config.source} is ready to run{running}")
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "check",
        help="preflight: config, state directory, certificates, ports, resolver, our TLSA and MTA-STS records",
        description="Check what `mxgate run` needs and what senders see, without starting anything: the "
        "configuration, the state directory (writable, mode 0700), every listener certificate (a matching pair, "
        "not expiring within --days), the listener and metrics ports (free), and each plugin's own checks: the "
        "resolver validates DNSSEC, the TLSA records of our MX cover the certificate we serve, the MTA-STS "
        "policies we serve name our MX hosts. One line per problem; exit 1 when there is any.",
    )
    p.add_argument("--days", type=int, default=EXPIRY_DAYS, help=f"certificate expiry margin (default {EXPIRY_DAYS})")
    add_config_arg(p)
    p.set_defaults(func=cmd_check)
