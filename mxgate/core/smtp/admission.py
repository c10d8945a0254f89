"""Who gets a connection slot: per-client concurrency limits, a process-wide cap that keeps descriptors in reserve,
and what to do when ``accept()`` runs out of descriptors anyway. Decisions only; the listener's accept loop
(:mod:`mxgate.core.smtp.server`) asks and acts.

* One client may hold at most ``max_connections_per_client`` connections (an IPv4 address, or an IPv6 /64: one
  host usually gets a whole /64) and one IPv4 /24 at most ``max_connections_per_network``, as Postfix's
  ``smtpd_client_connection_count_limit`` and Exchange's ``MaxInboundConnectionPerSource`` do. Beyond: ``421 4.7.0``
  and close. ``connection_limit_exceptions`` (loopback by default, like Postfix's ``$mynetworks``) are exempt.
* The process never lets SMTP connections take its last ``server.descriptor_reserve`` descriptors: the queue,
  deliveries, DNS and the tracking log need some. Past that: ``421 4.3.2``.
* ``EMFILE``/``ENFILE`` at ``accept()`` (something else took the descriptors): stop accepting for
  :data:`ACCEPT_BACKOFF` seconds and log once per :data:`LOG_INTERVAL` (asyncio retries at once and logs each
  time: 555,000 lines in a minute were seen).
"""

from __future__ import annotations

import ipaddress
import logging
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Final

from mxgate.core.model import Reply

__all__ = [
    "ACCEPT_BACKOFF",
    "TOO_MANY_CONNECTIONS",
    "TOO_MANY_FROM_CLIENT",
    "TOO_MANY_FROM_NETWORK",
    "ClientLimits",
    "DescriptorBudget",
    "raise_descriptor_limit",
]

log = logging.getLogger(__name__)

ACCEPT_BACKOFF: Final = 0.25  # seconds without accept() after EMFILE/ENFILE
LOG_INTERVAL: Final = 60.0  # at most one log line about failing accept() per this many seconds

TOO_MANY_FROM_CLIENT = Reply(421, "4.7.0", "Too many connections from your address, try again later")
TOO_MANY_FROM_NETWORK = Reply(421, "4.7.0", "Too many connections from your network, try again later")
TOO_MANY_CONNECTIONS = Reply(421, "4.3.2", "Too many connections, try again later")


def client_keys(ip: str) -> tuple[str, str | None]:
    """(the client: an IPv4 address or an IPv6 /64, its IPv4 /24 or ``None``). IPv4-mapped IPv6 is IPv4."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        return str(addr), str(ipaddress.IPv4Network((int(addr) & 0xFFFFFF00, 24)))
    return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64))), None


class ClientLimits:
    """One listener's per-client connection counts."""

    def __init__(self, per_client: int, per_network: int, exceptions: Iterable[str]) -> None:
        self.per_client = per_client
        self.per_network = per_network
        self.exceptions = tuple(ipaddress.ip_network(n, strict=False) for n in exceptions)
        self.clients: Counter[str] = Counter()
        self.networks: Counter[str] = Counter()
        self.refused = 0

    def _exempt(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.exceptions)

    def admit(self, ip: str) -> tuple[Reply | None, Callable[[], None]]:
        """(``None`` and a release function to call when the connection ends) or (the refusal, a no-op)."""
        if (not self.per_client and not self.per_network) or self._exempt(ip):
            return None, _nothing
        client, network = client_keys(ip)
        if self.per_client and self.clients[client] >= self.per_client:
            self.refused += 1
            return TOO_MANY_FROM_CLIENT, _nothing
        if self.per_network and network is not None and self.networks[network] >= self.per_network:
            self.refused += 1
            return TOO_MANY_FROM_NETWORK, _nothing
        self.clients[client] += 1
        if network is not None:
            self.networks[network] += 1

        def release() -> None:
            _decrement(self.clients, client)
            if network is not None:
                _decrement(self.networks, network)

        return None, release


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def _nothing() -> None:
    return None


class DescriptorBudget:
    """The process's connections, all listeners together, against its descriptor limit minus the reserve; and
    the rate-limited log of ``accept()`` failures."""

    def __init__(self, reserve: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.capacity = max(1, soft - reserve) if soft != resource.RLIM_INFINITY else 1 << 30
        self.open = 0
        self.refused = 0
        self.clock = clock
        self._logged_at: float | None = None
        self._unlogged = 0

    def admit(self) -> Reply | None:
        if self.open >= self.capacity:
            self.refused += 1
            return TOO_MANY_CONNECTIONS
        self.open += 1
        return None

    def release(self) -> None:
        self.open -= 1

    def accept_failed(self, listener: str, exc: OSError) -> None:
        """Log the first failure at once, then at most one summary line per :data:`LOG_INTERVAL`."""
        now = self.clock()
        if self._logged_at is not None and now - self._logged_at < LOG_INTERVAL:
            self._unlogged += 1
            return
        count, self._unlogged, self._logged_at = self._unlogged + 1, 0, now
        log.warning(
            "accept() failed: not accepting for a moment (logged at most once a minute)",
            extra={
                "listener": listener,
                "error": exc.strerror or str(exc),
                "failures": count,
                "open_connections": self.open,
                "backoff": ACCEPT_BACKOFF,
            },
        )


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (a gateway holds a descriptor per client, per delivery
    and per DNS query); returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:  # Linux refuses an infinite descriptor limit: take fs.nr_open's default
        hard = 1 << 20
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit", extra={"soft": soft, "hard": hard, "error": str(exc)})
            return soft, soft
        log.info("raised the descriptor limit (RLIMIT_NOFILE) to the hard limit", extra={"before": soft, "after": hard})
        return soft, hard
    return soft, soft
