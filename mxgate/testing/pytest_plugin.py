"""mxgate's fixtures for plugin authors' own tests (registered as the ``pytest11`` entry point ``mxgate``).

Fixtures: ``test_ca`` (a test CA issuing certificates), ``smtp_sink`` (real SMTP servers on loopback),
``dnslab`` (signed zones served by nsd, validated by unbound), ``mxgate_gateway`` (a running gateway from a
config text), ``postgresql_server`` and ``postgresql_url`` (a real PostgreSQL for cluster mode).

The fixtures that start servers are async (pytest-asyncio, installed with mxgate): a test that uses them is an
``async def`` test, marked ``@pytest.mark.asyncio`` unless the project sets ``asyncio_mode = "auto"``.

Marker: ``integration`` (a test that talks to real servers on loopback) is registered here, so a plugin's tests
may use it under ``--strict-markers`` without declaring it.
"""

from __future__ import annotations

import importlib

import pytest

MARKERS = ("integration: talks to real servers on loopback (nsd, unbound, SMTP sinks, HTTPS)",)


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)


_FIXTURE_MODULES = (
    "mxgate.testing.ca",
    "mxgate.testing.sinks",
    "mxgate.testing.dnslab",
    "mxgate.testing.gateway",
    "mxgate.testing.postgres",
)

for _module in _FIXTURE_MODULES:
    try:
        _mod = importlib.import_module(_module)
    except ModuleNotFoundError as _exc:  # pragma: no cover - only while a module is being written
        if _exc.name != _module:
            raise
        continue
    for _name in getattr(_mod, "FIXTURES", ()):
        globals()[_name] = getattr(_mod, _name)
