"""Admission decisions (mxgate.core.smtp.admission), without sockets: who counts as one client, limits, release,
exceptions, and the once-per-interval log of failing accept()."""

from __future__ import annotations

import errno
import logging

import pytest

from mxgate.core.smtp.admission import (
    LOG_INTERVAL,
    TOO_MANY_FROM_CLIENT,
    TOO_MANY_FROM_NETWORK,
    ClientLimits,
    DescriptorBudget,
    client_keys,
)


def test_client_keys_ipv4_ipv6_and_mapped() -> None:
    assert client_keys("192.0.2.7") == ("192.0.2.7", "192.0.2.0/24")
    assert client_keys("::ffff:192.0.2.7") == ("192.0.2.7", "192.0.2.0/24")
    # an IPv6 host usually has a whole /64: addresses in it are one client, and there is no /24 analogue
    assert client_keys("2001:db8:1:2:aaaa::1") == ("2001:db8:1:2::/64", None)
    assert client_keys("2001:db8:1:2:ffff::9")[0] == client_keys("2001:db8:1:2::1")[0]
    assert client_keys("2001:db8:1:3::1")[0] != client_keys("2001:db8:1:2::1")[0]


def test_limits_per_client_and_per_network_with_release() -> None:
    limits = ClientLimits(2, 3, ())
    r1 = limits.admit("2001:db8::1")
    r2 = limits.admit("2001:db8::2")
    assert r1[0] is None and r2[0] is None
    assert limits.admit("2001:db8::3")[0] == TOO_MANY_FROM_CLIENT  # the same /64
    r1[1]()
    assert limits.admit("2001:db8::3")[0] is None
    held = [limits.admit(ip) for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3")]
    assert all(r is None for r, _ in held)
    assert limits.admit("192.0.2.4")[0] == TOO_MANY_FROM_NETWORK
    assert limits.admit("192.0.3.4")[0] is None
    for _, release in held:
        release()
    assert limits.networks["192.0.2.0/24"] == 0 and "192.0.2.1" not in limits.clients
    assert limits.refused == 2


def test_exceptions_and_zero_mean_no_limit() -> None:
    limits = ClientLimits(1, 1, ("127.0.0.0/8", "::1/128"))
    assert all(limits.admit("127.0.0.1")[0] is None for _ in range(5))
    assert all(limits.admit("::1")[0] is None for _ in range(5))
    assert all(ClientLimits(0, 0, ()).admit("192.0.2.1")[0] is None for _ in range(5))


def test_failing_accept_is_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    budget = DescriptorBudget(0, clock=lambda: now[0])
    exc = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level(logging.WARNING, logger="mxgate.core.smtp.admission"):
        for _ in range(10_000):
            budget.accept_failed("smtp", exc)
            now[0] += 0.001  # 10 s of failures
        assert len(caplog.records) == 1
        now[0] += LOG_INTERVAL
        budget.accept_failed("smtp", exc)
    assert len(caplog.records) == 2
    assert caplog.records[1].failures == 10_000  # type: ignore[attr-defined]
