"""nsd and unbound as processes for the DNS lab: their config files, start (own process group, log file),
waiting until they answer, and stopping them with everything they forked. :class:`~mxgate.testing.dnslab.DnsLab`
decides what they serve."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype

from mxgate.testing.dnszones import DnsLabError

if TYPE_CHECKING:
    from mxgate.testing.dnszones import LabZone

__all__ = ["Daemon", "find_binary", "free_port", "spawn_nsd", "spawn_unbound", "terminate", "wait_answering"]

_START_TIMEOUT = 10.0  # seconds a daemon gets to answer its first query
_STOP_TIMEOUT = 5.0


@dataclass(slots=True)
class Daemon:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


def find_binary(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin directories (often missing from a user's PATH)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (bounded attempts)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise DnsLabError("no free loopback port for UDP and TCP")


def spawn_nsd(workdir: Path, port: int, zone_files: Sequence[tuple[LabZone, Path]]) -> Daemon:
    """Write nsd's config for ``zone_files`` (already written), check it, start nsd; not waited for."""
    d = workdir / "nsd"
    d.mkdir(exist_ok=True)
    conf = d / "nsd.conf"
    log = d / "nsd.log"
    lines = [
        "server:",
        f"  ip-address: 127.0.0.1@{port}",
        f"  port: {port}",
        "  do-ip4: yes",
        "  do-ip6: no",
        '  username: ""',
        '  chroot: ""',
        '  database: ""',
        f'  zonesdir: "{workdir / "zones"}"',
        f'  pidfile: "{d / "nsd.pid"}"',
        f'  logfile: "{log}"',
        f'  xfrdfile: "{d / "xfrd.state"}"',
        f'  zonelistfile: "{d / "zone.list"}"',
        f'  xfrdir: "{d}"',
        "  server-count: 1",
        "  verbosity: 1",
        "  hide-version: yes",
        "  refuse-any: yes",
        "  reuseport: no",
        "remote-control:",
        "  control-enable: no",
    ]
    for z, path in zone_files:
        lines += ["zone:", f'  name: "{z.origin}"', f'  zonefile: "{path}"']
    conf.write_text("\n".join(lines) + "\n")
    _check([_bin("nsd-checkconf"), str(conf)], "nsd-checkconf")
    log.write_text("")
    proc = _spawn([_bin("nsd"), "-d", "-c", str(conf)], log, d)
    return Daemon("nsd", proc, log)


def spawn_unbound(
    workdir: Path,
    *,
    port: int,
    nsd_port: int,
    ede: bool,
    max_rtt_ms: int,
    root: dns.name.Name,
    trust_anchor: str,
    zones: Iterable[dns.name.Name],
    unreachable: Mapping[dns.name.Name, int],
    reverse: Collection[dns.name.Name],
) -> Daemon:
    """Write unbound's config (the lab root's trust anchor; every lab zone, ``unreachable`` delegation and
    ``reverse`` zone stubbed to nsd or its dead port), check it, start unbound; not waited for."""
    d = workdir / "unbound"
    d.mkdir(exist_ok=True)
    conf = d / "unbound.conf"
    log = d / "unbound.log"
    nsd = f"127.0.0.1@{nsd_port}"
    lines = [
        "server:",
        f"  interface: 127.0.0.1@{port}",
        f"  port: {port}",
        "  do-ip4: yes",
        "  do-ip6: no",
        "  do-udp: yes",
        "  do-tcp: yes",
        '  username: ""',
        '  chroot: ""',
        f'  directory: "{d}"',
        f'  pidfile: "{d / "unbound.pid"}"',
        f'  logfile: "{log}"',
        "  use-syslog: no",
        "  verbosity: 1",
        "  val-log-level: 2",
        "  log-servfail: yes",
        f"  ede: {'yes' if ede else 'no'}",
        "  num-threads: 1",
        "  so-reuseport: no",
        "  outgoing-range: 64",
        "  num-queries-per-thread: 32",
        "  access-control: 127.0.0.0/8 allow",
        '  module-config: "validator iterator"',
        "  do-not-query-localhost: no",
        "  qname-minimisation: no",
        "  prefetch: no",
        "  serve-expired: no",
        "  aggressive-nsec: no",
        # a dead authority fails within about a second instead of after many exponential back-offs
        f"  infra-cache-max-rtt: {max_rtt_ms}",
        "  infra-host-ttl: 60",
        f'  local-zone: "{root}" nodefault',
        f'  trust-anchor: "{trust_anchor}"',
        # "no network beyond loopback": even the DNS root is stubbed to nsd (which refuses it)
        "stub-zone:",
        '  name: "."',
        f"  stub-addr: {nsd}",
        "stub-zone:",
        f'  name: "{root}"',
        f"  stub-addr: {nsd}",
    ]
    for origin in zones:
        if origin != root:
            lines += ["stub-zone:", f'  name: "{origin}"', f"  stub-addr: {nsd}"]
    for origin, dead_port in unreachable.items():
        lines += ["stub-zone:", f'  name: "{origin}"', f"  stub-addr: 127.0.0.1@{dead_port}"]
    if reverse:
        # unbound answers reverse lookups of private and loopback space itself (RFC 6303 local zones):
        # "nodefault" switches that off for the lab's reverse zones (and the default zone above each one)
        local = ["server:"]
        for origin in reverse:
            for default in _RFC6303_PARENTS:
                if origin.is_subdomain(default):
                    local.append(f'  local-zone: "{default}" nodefault')
            local.append(f'  local-zone: "{origin}" nodefault')
            local.append(f'  domain-insecure: "{origin}"')
            lines += ["stub-zone:", f'  name: "{origin}"', f"  stub-addr: {nsd}"]
        lines = local + lines  # (server: options may come in several blocks)
    lines += ["remote-control:", "  control-enable: no"]
    conf.write_text("\n".join(lines) + "\n")
    _check([_bin("unbound-checkconf"), str(conf)], "unbound-checkconf")
    log.write_text("")
    proc = _spawn([_bin("unbound"), "-d", "-c", str(conf)], log, d)
    return Daemon("unbound", proc, log)


# unbound's built-in local zones (RFC 6303 and localhost) that may contain a lab reverse zone
_RFC6303_PARENTS: Final = tuple(
    dns.name.from_text(n)
    for n in (
        "127.in-addr.arpa.",
        "10.in-addr.arpa.",
        "168.192.in-addr.arpa.",
        "0.in-addr.arpa.",
        *(f"{i}.172.in-addr.arpa." for i in range(16, 32)),
    )
)


def _bin(name: str) -> str:
    path = find_binary(name)
    if path is None:
        raise DnsLabError(f"{name} not found")
    return path


def _check(argv: list[str], what: str) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if res.returncode != 0:
        raise DnsLabError(f"{what} rejected the generated config:\n{res.stdout}{res.stderr}")


def _spawn(argv: list[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )


def terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=_STOP_TIMEOUT)
    # children (nsd's server and xfrd processes) share the group: make sure none outlives the lab
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def wait_answering(daemon: Daemon, port: int, qname: dns.name.Name, *, want_ad: bool) -> None:
    """Poll with SOA queries until the daemon answers (bounded); raise with its log otherwise."""
    deadline = time.monotonic() + _START_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise DnsLabError(f"{daemon.name} exited with status {daemon.proc.returncode}:\n{_tail(daemon.log)}")
        q = dns.message.make_query(qname, dns.rdatatype.SOA, want_dnssec=True)
        try:
            r = dns.query.udp(q, "127.0.0.1", port=port, timeout=0.2)
        except (dns.exception.DNSException, OSError) as exc:
            last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
            continue
        if r.rcode() == dns.rcode.NOERROR:
            if want_ad and not r.flags & dns.flags.AD:
                raise DnsLabError(
                    f"{daemon.name} answers but does not validate the lab root (no AD):\n{_tail(daemon.log)}"
                )
            return
        last = f"rcode {dns.rcode.to_text(r.rcode())}"
        time.sleep(0.05)
    raise DnsLabError(f"{daemon.name} did not answer within {_START_TIMEOUT}s ({last}):\n{_tail(daemon.log)}")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"
