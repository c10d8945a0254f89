"""Backscatter (issue 18, item 6), against a real ``mxgate run`` and a real inside server (an aiosmtpd sink that
refuses unknown users with ``550 5.1.1``).

The attack: a message from a forged sender (the victim) to a made-up local part at an accepted domain, carrying
the attacker's content. Without recipient validation the gateway accepts it, the inside server refuses the
recipient, and the gateway sends the victim a DSN with the attacker's text. With the ``recipients`` agent the
unknown recipient gets ``550 5.1.1`` at RCPT (before DATA), the known one is delivered, and no DSN is ever made;
a dictionary attack gets ``421`` after ``max_unknown_recipients``; a recipients file is reloaded while the gateway
runs. With callouts the inside server is asked once per address (the answer is cached: the second RCPT makes no
new session), and an unreachable smart host gives the configured answer (451 4.4.3, or accept).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from reliability_kit import REPO, RawClient, free_port, gateway_document, gateway_process, write_config

from mxgate.testing.sinks import ThreadedSmtpSink

pytestmark = [pytest.mark.integration]

PAYLOAD = "Subject: ATTACKER-CONTENT cheap pills\r\n\r\nVisit http://attacker.test/ now\r\n"
UNKNOWN = {"ghost@example.org": "550 5.1.1 <ghost@example.org>: no such user", "nobody@example.org": "550 5.1.1 no"}


async def _session(port: int, commands: list[bytes]) -> list[str]:
    """Each command's reply (its last line); after a 421, ``EOF`` when the server then closed (nothing more is
    sent); bounded by the kit's timeouts."""
    client = await RawClient.connect("127.0.0.1", port)
    try:
        assert (await client.reply()).code == "220"
        replies = []
        for command in commands:
            await client.send(command)
            reply = await client.reply()
            replies.append(reply.lines[-1].decode("utf-8", "replace") if reply.lines else reply.code)
            if reply.code == "421":
                replies.append((await client.reply()).code)
            if reply.code in ("421", "EOF"):
                break
        return replies
    finally:
        await client.close()


def session(port: int, *commands: str) -> list[str]:
    return asyncio.run(_session(port, [c.encode() + b"\r\n" for c in commands]))


def message(port: int, sender: str, recipients: list[str]) -> list[str]:
    replies = asyncio.run(
        _session(
            port,
            [
                b"EHLO attacker.test\r\n",
                f"MAIL FROM:<{sender}>\r\n".encode(),
                *(f"RCPT TO:<{r}>\r\n".encode() for r in recipients),
                b"DATA\r\n",
                PAYLOAD.encode() + b".\r\n",
                b"QUIT\r\n",
            ],
        )
    )
    return replies[2:]


def queue_empty(config: Path, timeout: float = 60.0) -> None:
    """Poll ``mxgate queue list`` until nothing is left in the queue (delivered, failed and DSNs sent)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = subprocess.run(
            [sys.executable, "-m", "mxgate", "queue", "list", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=True,
        ).stdout
        if "queue is empty" in out:
            return
        time.sleep(0.2)
    raise AssertionError(f"queue not empty within {timeout} s:\n{out}")


def dsns(sink: ThreadedSmtpSink) -> list[Any]:
    return [m for m in sink.messages if m.mail_from in ("", "<>")]


def test_unknown_recipient_refused_at_rcpt_and_never_bounced(tmp_path: Path) -> None:
    with ThreadedSmtpSink(rcpt_replies=UNKNOWN) as sink:
        # before: no validation. The gateway takes ghost@, the inside server refuses it, the victim gets a DSN
        # carrying the attacker's content.
        port = free_port()
        doc = gateway_document(tmp_path / "var0", port=port, smart_host=f"127.0.0.1:{sink.port}")
        before = write_config(tmp_path / "before.toml", doc)
        with gateway_process(before, port, tmp_path / "before.log"):
            replies = message(port, "victim@forged.test", ["ghost@example.org"])
            assert [r[:3] for r in replies[:3]] == ["250", "354", "250"], replies
            sink.wait_for(1, timeout=30)
            queue_empty(before)
        (dsn,) = dsns(sink)
        assert dsn.rcpt_tos == ("victim@forged.test",)
        assert b"ATTACKER-CONTENT" in dsn.data
        print("\nbefore: RCPT ghost@ accepted; DSNs to the forged sender: 1, carrying the attacker's content")

        # after: a recipients file for example.org
        listing = tmp_path / "recipients.txt"
        listing.write_text("alice@example.org\n*-list@example.org\n")
        port = free_port()
        doc = gateway_document(tmp_path / "var1", port=port, smart_host=f"127.0.0.1:{sink.port}")
        doc["plugins"] = {
            "recipients": {
                "reload_interval": 0.2,
                "max_unknown_recipients": 3,
                "domain": [{"name": "example.org", "file": str(listing)}],
            }
        }
        after = write_config(tmp_path / "after.toml", doc)
        rcpts_before = len(sink.sink.rcpt_commands)
        with gateway_process(after, port, tmp_path / "after.log") as gw:
            replies = message(port, "victim@forged.test", ["ghost@example.org", "alice@example.org"])
            assert replies[0].startswith("550 5.1.1"), replies  # before DATA
            assert [r[:3] for r in replies[1:4]] == ["250", "354", "250"], replies
            delivered = sink.wait_for(2, timeout=30)[1]
            assert delivered.rcpt_tos == ("alice@example.org",)
            queue_empty(after)

            # a dictionary attack: three unknown names, then 421 and the connection is closed
            probe = session(
                port,
                "EHLO attacker.test",
                "MAIL FROM:<victim@forged.test>",
                *(f"RCPT TO:<guess{i}@example.org>" for i in range(10)),
            )
            assert [r[:9] for r in probe[2:5]] == ["550 5.1.1"] * 3, probe
            assert probe[5].startswith("421 4.7.0") and probe[6:] == ["EOF"], probe

            # the file changes while the gateway runs: the new name is known within the reload interval
            assert session(port, "EHLO a.test", "MAIL FROM:<>", "RCPT TO:<carol@example.org>")[2].startswith("550")
            listing.write_text("alice@example.org\n*-list@example.org\ncarol@example.org\n")
            deadline = time.monotonic() + 20
            answer = ""
            while time.monotonic() < deadline:
                answer = session(port, "EHLO a.test", "MAIL FROM:<>", "RCPT TO:<carol@example.org>")[2]
                if answer.startswith("250"):
                    break
                time.sleep(0.1)
            assert answer.startswith("250 2.1.5"), answer
            assert session(port, "EHLO a.test", "MAIL FROM:<>", "RCPT TO:<sales-list@example.org>")[2][:3] == "250"
            assert gw.proc is not None and gw.proc.poll() is None
        assert len(dsns(sink)) == 1  # still only the one from before
        assert sink.sink.rcpt_commands[rcpts_before:] == ["alice@example.org"]  # ghost@ never went inside
        print("after: RCPT ghost@ -> 550 5.1.1 before DATA; DSNs: 0; dictionary probe cut off after 3 unknowns")


@pytest.mark.parametrize("workers", [0, 1], ids=["one-process", "receive-worker"])
def test_callout_is_cached_and_an_unreachable_smart_host_gets_the_configured_answer(
    tmp_path: Path, workers: int
) -> None:
    closed = free_port()  # nothing listens there
    with ThreadedSmtpSink(rcpt_replies=UNKNOWN) as sink:
        port = free_port()
        doc = gateway_document(
            tmp_path / "var",
            port=port,
            smart_host=f"127.0.0.1:{sink.port}",
            accepted=("example.org", "down.example", "open.example"),
            extra_server={"receive_workers": workers},
        )
        down = {**doc["outbound_connector"][0], "name": "down", "recipient_domains": ["down.example", "open.example"]}
        doc["outbound_connector"].append({**down, "smart_hosts": [f"127.0.0.1:{closed}"]})
        doc["plugins"] = {
            "recipients": {
                "callout_timeout": 3.0,
                "domain": [
                    {"name": "example.org", "callout": True},
                    {"name": "down.example", "callout": True},
                    {"name": "open.example", "callout": True, "on_unavailable": "accept"},
                ],
            }
        }
        config = write_config(tmp_path / "mxgate.toml", doc)
        with gateway_process(config, port, tmp_path / "gw.log"):
            timings = []
            for _ in range(2):  # two connections: the second RCPT is answered from the cache
                started = time.monotonic()
                replies = session(port, "EHLO a.test", "MAIL FROM:<victim@forged.test>", "RCPT TO:<nobody@example.org>")
                timings.append(time.monotonic() - started)
                # our own text: what the inside server said is not for the internet
                assert replies[2] == "550 5.1.1 Recipient address rejected: user unknown", replies
            assert sink.connections == 1, sink.connections  # one callout session for two RCPTs
            assert sink.sink.rcpt_commands == ["nobody@example.org"]
            assert sink.sink.mail_commands == ["<>"]

            replies = session(
                port,
                "EHLO a.test",
                "MAIL FROM:<someone@ext.test>",
                "RCPT TO:<alice@example.org>",
                "RCPT TO:<bob@down.example>",
                "RCPT TO:<bob@open.example>",
                "RCPT TO:<alice@example.org>",
                "QUIT",
            )
            assert replies[2].startswith("250"), replies
            assert replies[3].startswith("451 4.4.3"), replies  # unreachable: tempfail (the default)
            assert replies[4].startswith("250"), replies  # unreachable, but this domain says accept
            assert replies[5].startswith("250"), replies
            assert sink.connections == 2  # alice@ asked once, though she was named twice
            assert sink.sink.rcpt_commands == ["nobody@example.org", "alice@example.org"]
        assert sink.messages == ()  # a callout never sends DATA
        assert sink.sink.quits == 2
        print(f"\ncallout RCPT {timings[0] * 1000:.1f} ms (session to the inside), cached {timings[1] * 1000:.1f} ms")
