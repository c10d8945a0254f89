"""Real SMTP servers on loopback for delivery tests.

:class:`SmtpSink`
    an aiosmtpd server in the test's own event loop (``async with SmtpSink(...) as sink``). It offers STARTTLS
    (or implicit TLS) with a test-CA certificate, answers RCPT/DATA with injected replies, can drop the
    connection in the middle of DATA, and records every accepted message with what TLS was negotiated and
    which server name (SNI) the client asked for.
:class:`ThreadedSmtpSink`
    the same server running in its own thread and loop, for synchronous tests (``with ThreadedSmtpSink()``).
:class:`PostfixSink`
    Postfix's C ``smtp-sink`` (``/usr/sbin/smtp-sink``) on a loopback port, with its stage-wise reject
    options; fast and independent of our Python stack (a second opinion on what "a real MTA" does).

Pytest fixtures: ``smtp_sink`` (async factory: ``sink = await smtp_sink(tls=cert)``), ``threaded_smtp_sink``
(sync factory) and ``postfix_sink`` (sync factory; fails clearly when smtp-sink is not installed). Everything they
start is stopped after the test.

Only loopback addresses are accepted: these are test servers.

The sinks live in :mod:`mxgate.testing.sinks_aiosmtpd` (:class:`SmtpSink`, :class:`ThreadedSmtpSink`) and
:mod:`mxgate.testing.sinks_postfix` (:class:`PostfixSink`); this module re-exports them and holds the fixtures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Protocol

import pytest
import pytest_asyncio

from mxgate.testing.sinks_aiosmtpd import ReceivedMessage, SmtpSink, ThreadedSmtpSink
from mxgate.testing.sinks_postfix import SMTP_SINK_BINARY as SMTP_SINK_BINARY
from mxgate.testing.sinks_postfix import PostfixSink

__all__ = [
    "FIXTURES",
    "PostfixSink",
    "ReceivedMessage",
    "SinkFactory",
    "SmtpSink",
    "ThreadedSmtpSink",
    "postfix_sink",
    "smtp_sink",
    "threaded_smtp_sink",
]

# Fixture names the ``mxgate`` pytest plugin (mxgate/testing/pytest_plugin.py) re-exports.
FIXTURES = ("smtp_sink", "threaded_smtp_sink", "postfix_sink")


# -- pytest fixtures -----------------------------------------------------------------------------


class SinkFactory(Protocol):
    def __call__(self, **kwargs: Any) -> Awaitable[SmtpSink]: ...


@pytest_asyncio.fixture
async def smtp_sink() -> AsyncIterator[SinkFactory]:
    """Factory of started :class:`SmtpSink` servers: ``sink = await smtp_sink(tls=cert, ...)``."""
    sinks: list[SmtpSink] = []

    async def factory(**kwargs: Any) -> SmtpSink:
        sink = SmtpSink(**kwargs)
        await sink.start()
        sinks.append(sink)
        return sink

    yield factory
    for sink in reversed(sinks):
        await sink.stop()


@pytest.fixture
def threaded_smtp_sink() -> Iterator[Callable[..., ThreadedSmtpSink]]:
    """Factory of started :class:`ThreadedSmtpSink` servers for synchronous tests."""
    sinks: list[ThreadedSmtpSink] = []

    def factory(**kwargs: Any) -> ThreadedSmtpSink:
        sink = ThreadedSmtpSink(**kwargs).start()
        sinks.append(sink)
        return sink

    yield factory
    for sink in reversed(sinks):
        sink.stop()


@pytest.fixture
def postfix_sink() -> Iterator[Callable[..., PostfixSink]]:
    """Factory of started :class:`PostfixSink` processes; fails the test when smtp-sink is not installed."""
    if not PostfixSink.available():
        pytest.fail(f"{SMTP_SINK_BINARY} not installed: `make deps` installs postfix")
    sinks: list[PostfixSink] = []

    def factory(**kwargs: Any) -> PostfixSink:
        sink = PostfixSink(**kwargs).start()
        sinks.append(sink)
        return sink

    yield factory
    for sink in reversed(sinks):
        sink.stop()
