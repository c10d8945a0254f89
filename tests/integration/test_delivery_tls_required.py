"""RFC 8689 TLS-Required: No — recipient-side policies (DANE, MTA-STS) do not block such a message; the
connector's own TLS setting still holds. TLS-RPT reports depend on this."""

from __future__ import annotations

from pathlib import Path

import pytest

from mxgate.core import bootstrap
from mxgate.core.delivery import Deliverer, OutgoingMessage
from mxgate.core.hookspecs import hookimpl
from mxgate.core.outcomes import Destination, NextHop, PolicyType, TlsLevel, TlsPolicy, TlsRptResult
from mxgate.core.queue.scheduler import tls_required_no
from mxgate.core.runtime import Runtime
from mxgate.testing.sinks import SmtpSink

pytestmark = pytest.mark.integration

BODY = b"From: r@sender.test\r\nTo: x@example.test\r\nSubject: report\r\n\r\nbody\r\n"


class StrictPolicy:
    """A recipient policy that always fails (as DANE does with dane-required)."""

    name = "strict"

    @hookimpl
    def mxgate_delivery_resolve_tls_policy(self, destination: Destination, next_hop: NextHop) -> TlsPolicy:
        return TlsPolicy(
            source="strict",
            policy_type=PolicyType.TLSA,
            policy_domain=destination.domain,
            level=TlsLevel.SECURE,
            precedence=300,
            failure=TlsRptResult.DANE_REQUIRED,
            detail="no usable TLSA",
        )


async def runtime_for(tmp_path: Path, sink: SmtpSink) -> Runtime:
    path = tmp_path / "mx.toml"
    path.write_text(
        f'[server]\nstate_dir = "{tmp_path / "var"}"\n[metrics]\nlisten = ""\n'
        "[[listener]]\nname = 'smtp'\naddress = '127.0.0.1:1'\n"
        '[[outbound_connector]]\nname = "relay"\nrecipient_domains = ["*"]\n'
        f'smart_hosts = ["{sink.host}:{sink.port}"]\n'
        'tls = "opportunistic"\nconnect_timeout = 5\ncommand_timeout = 5\n'
    )
    config, plugins = bootstrap.load(path, entry_points=False, extra_plugins=[("strict", StrictPolicy())])
    runtime = Runtime.create(config, plugins)
    await runtime.hooks.on_startup(runtime)
    return runtime


async def test_recipient_policy_failure_blocks_ordinary_mail_but_not_tls_required_no(tmp_path: Path) -> None:
    async with SmtpSink() as sink:
        runtime = await runtime_for(tmp_path, sink)
        dest = Destination(runtime.config.outbound("relay"), f"{sink.host}", (f"{sink.host}:{sink.port}",))
        blocked = await Deliverer(runtime).deliver(
            dest, OutgoingMessage("Q1", "r@sender.test", ("x@example.test",), BODY)
        )
        assert [o.result for o in blocked.outcomes] == ["deferred"]
        assert blocked.outcomes[0].status == "4.7.5"
        assert len(sink.messages) == 0
        optional = OutgoingMessage("Q2", "r@sender.test", ("x@example.test",), BODY, tls_optional=True)
        passed = await Deliverer(runtime).deliver(dest, optional)
        assert [o.result for o in passed.outcomes] == ["delivered"]
        assert len(sink.messages) == 1
        for task in runtime.tasks:
            task.cancel()
        runtime.tracking.close()


def test_tls_required_header_and_meta() -> None:
    assert tls_required_no(True, b"")
    assert tls_required_no(False, b"Subject: x\r\nTLS-Required:  No\r\n\r\nTLS-Required: yes\r\n")
    assert not tls_required_no(False, b"Subject: x\r\n\r\nTLS-Required: No\r\n")  # in the body: not a header
    assert not tls_required_no(False, b"TLS-Required: yes\r\n\r\n")
