"""Small value checks shared by configuration declarations. Each returns an error message or None."""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)\Z", re.IGNORECASE)


def is_hostname(name: str) -> bool:
    name = name.rstrip(".")
    if not name or len(name) > 253:
        return False
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    return all(_LABEL.match(label) for label in name.split("."))


def split_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"``, or a bare host when ``default_port`` is given. Raises ValueError."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError("missing ']' after IPv6 address")
        host, rest = value[1:end], value[end + 1 :]
        ipaddress.IPv6Address(host)
        if not rest:
            if default_port is None:
                raise ValueError("missing ':port'")
            return host, default_port
        if not rest.startswith(":"):
            raise ValueError("expected ':port' after ']'")
        port_text = rest[1:]
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    elif ":" in value:  # a bare IPv6 address
        ipaddress.IPv6Address(value)
        if default_port is None:
            raise ValueError("IPv6 addresses need brackets: [::1]:25")
        return value, default_port
    else:
        if default_port is None:
            raise ValueError("missing ':port'")
        host, port_text = value, str(default_port)
    if not host:
        raise ValueError("missing host")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)


def check_hostport(value: Any) -> str | None:
    try:
        split_hostport(value)
    except ValueError as exc:
        return f'{exc}; expected "host:port", e.g. "127.0.0.1:2525" or "[::]:25"'
    return None


def check_optional_hostport(value: Any) -> str | None:
    return None if value in (None, "") else check_hostport(value)


def check_hostname(value: Any) -> str | None:
    return None if is_hostname(value) else "expected a DNS host name such as mx.example.org"


def check_domains(values: Any) -> str | None:
    bad = [v for v in values if not is_hostname(v)]
    return f"not a domain name: {', '.join(map(repr, bad))}" if bad else None


def check_domain_patterns(values: Any) -> str | None:
    """``"*"``, ``"example.org"`` or ``"*.example.org"``."""
    bad = [v for v in values if v != "*" and not is_hostname(v.removeprefix("*."))]
    if bad:
        return f'not a domain pattern: {", ".join(map(repr, bad))}; expected "example.org", "*.example.org" or "*"'
    return None


def check_networks(values: Any) -> str | None:
    bad = []
    for v in values:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            bad.append(v)
    return f'not an IP address or network: {", ".join(map(repr, bad))}; expected e.g. "192.0.2.0/24"' if bad else None


def check_positive(value: Any) -> str | None:
    return None if value > 0 else "expected a number greater than 0"


def check_non_negative(value: Any) -> str | None:
    return None if value >= 0 else "expected a number of 0 or more"


def check_optional_positive(value: Any) -> str | None:
    return None if value is None else check_positive(value)


def positive_at_most(limit: float) -> Callable[[Any], str | None]:
    """A check: greater than 0 and at most ``limit``."""

    def check(value: Any) -> str | None:
        return None if 0 < value <= limit else f"expected a number greater than 0 and at most {limit:g}"

    return check


RECEIVE_WORKERS_AUTO_MAX = 8  # the main process queues and delivers for all of them: more would wait on it


def check_receive_workers(value: Any) -> str | None:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 64):
        return None
    return 'expected "auto" or a whole number from 0 to 64'


def usable_cpus() -> int:
    """Cores this process may run on: its CPU affinity, lowered by a cgroup v2 CPU quota (``cpu.max`` of its
    cgroup or any parent) when one is set (a container limited to 1.5 CPUs counts 2)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    root = Path("/sys/fs/cgroup")
    try:
        own = next(
            (line[3:].strip() for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")),
            "/",
        )
    except OSError:
        own = "/"
    here = (root / own.lstrip("/")).resolve()
    for directory in [here, *here.parents]:
        if not directory.is_relative_to(root):
            break
        try:
            quota, period = (directory / "cpu.max").read_text().split()[:2]
            if quota != "max" and int(period) > 0:
                cpus = min(cpus, max(1, -(-int(quota) // int(period))))
        except (OSError, ValueError):
            pass
    return max(1, cpus)


def auto_receive_workers(cpus: int | None = None) -> int:
    """``receive_workers = "auto"``: one receive worker per spare core, the main process keeping one core for
    queueing and delivery: usable cores - 1 (0 on one core), at most :data:`RECEIVE_WORKERS_AUTO_MAX`."""
    cpus = usable_cpus() if cpus is None else cpus
    return max(0, min(cpus - 1, RECEIVE_WORKERS_AUTO_MAX))


def check_user(value: Any) -> str | None:
    if value is None:
        return None
    try:
        pwd.getpwnam(value)
    except KeyError:
        return f"no such user {value!r} on this host"
    return None


def check_group(value: Any) -> str | None:
    if value is None:
        return None
    try:
        grp.getgrnam(value)
    except KeyError:
        return f"no such group {value!r} on this host"
    return None


def check_name(value: Any) -> str | None:
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
        return None
    return "expected a short name of letters, digits, '-', '_' or '.'"


def domain_matches(pattern: str, domain: str) -> bool:
    """Connector-style domain pattern: exact, ``*.parent`` (any depth below parent), or ``*`` (anything)."""
    domain = domain.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


def pattern_specificity(pattern: str) -> int:
    """Higher is more specific: exact > ``*.sub.parent`` > ``*.parent`` > ``*``."""
    if pattern == "*":
        return 0
    labels = pattern.count(".") + 1
    return labels * 2 + (0 if pattern.startswith("*.") else 1)
