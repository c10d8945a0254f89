"""`mxgate connector validate NAME --to ADDRESS` against a real sink.

Cleartext here: the CLI runs its own event loop in a worker thread, and aiosmtpd's hand-built STARTTLS on
Python 3.11 intermittently stalls when client and server live in different loops (see the issue note). The TLS
lines of the same step list are asserted in test_delivery_sinks.py."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest

from mxgate.core.cli import main as cli_main
from mxgate.testing.ca import TestCA
from mxgate.testing.sinks import SmtpSink

pytestmark = pytest.mark.integration


async def test_connector_validate_prints_tls_and_replies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = TestCA.create(tmp_path / "ca")
    async with SmtpSink(tls=ca.issue(["relay.example.test"]), dsn=True) as sink:
        config = tmp_path / "mxgate.toml"
        config.write_text(
            textwrap.dedent(
                f"""
                [server]
                hostname = "gw.sender.test"
                state_dir = "{tmp_path / "var"}"
                [[listener]]
                name = "smtp"
                address = "127.0.0.1:1"
                [metrics]
                listen = ""
                [dns]
                resolvers = ["127.0.0.1:1"]
                [plugins]
                disable = ["dnssec"]
                [[outbound_connector]]
                name = "relay"
                recipient_domains = ["*"]
                smart_hosts = ["127.0.0.1:{sink.port}"]
                tls = "none"
                """
            ),
            encoding="utf-8",
        )
        argv = ["connector", "validate", "relay", "--to", "b@x.test", "-v", "-c", str(config)]
        code = await asyncio.to_thread(cli_main, argv)
        out = capsys.readouterr().out
        assert code == 0, out
        assert "TLS policy: connector (no-policy-found, level NONE)" in out
        # which of the extensions delivery uses the peer offered (aiosmtpd: no CHUNKING, no PIPELINING)
        assert f"127.0.0.1]:{sink.port}: extensions DSN SIZE=33554432 SMTPUTF8 8BITMIME" in out
        assert "(not offered: CHUNKING REQUIRETLS PIPELINING)" in out
        assert "250 2.0.0" in out and "C: RCPT TO:<b@x.test>" in out and "result: delivered" in out
        assert len(sink.messages) == 1 and sink.messages[0].rcpt_tos == ("b@x.test",)
        assert (
            await asyncio.to_thread(cli_main, ["connector", "validate", "nope", "--to", "b@x.test", "-c", str(config)])
            == 1
        )


async def test_connector_validate_escapes_the_remote_reply(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with SmtpSink(rcpt_replies={"b": "550 5.1.1 \x1b]0;pwned\x07 no \u202eresu"}) as sink:
        config = tmp_path / "mxgate.toml"
        config.write_text(
            f'[server]\nhostname = "gw.sender.test"\nstate_dir = "{tmp_path / "var"}"\n'
            '[[listener]]\nname = "smtp"\naddress = "127.0.0.1:1"\n[metrics]\nlisten = ""\n'
            '[dns]\nresolvers = ["127.0.0.1:1"]\n[plugins]\ndisable = ["dnssec"]\n'
            f'[[outbound_connector]]\nname = "relay"\nrecipient_domains = ["*"]\n'
            f'smart_hosts = ["127.0.0.1:{sink.port}"]\ntls = "none"\n',
            encoding="utf-8",
        )
        argv = ["connector", "validate", "relay", "--to", "b@x.test", "-v", "-c", str(config)]
        code = await asyncio.to_thread(cli_main, argv)
        out = capsys.readouterr().out
        assert code == 1 and "result: failed (550 5.1.1" in out
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
        assert "\\x1b]0;pwned\\x07" in out and "\\u202eresu" in out
