"""Attacker text on the operator's terminal (issue 18, item 4), against a real ``mxgate run`` and the real CLI.

A message arrives with ESC/BEL/C1 sequences and a bidi override in its Subject and Message-ID; another from a
sender whose quoted local part reads like trace fields (``"pad client=10.9.8.7 auth_user=admin"@ext.test``), with
the first message's queue id as its Message-ID. ``mxgate queue list``, ``queue show`` and ``trace`` must print no
control, bidi or other invisible character; ``trace`` fields must parse back to what the gateway recorded; a queue
id and a Message-ID are looked up separately. SMTPUTF8 addresses carrying C0/C1 or bidi controls are refused at
MAIL (553 5.1.7) and RCPT (553 5.1.3).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from reliability_kit import REPO, RawClient, free_port, gateway_document, gateway_process, write_config

pytestmark = [pytest.mark.integration]

FORGED = '"pad client=10.9.8.7 auth_user=admin"@ext.test'
SUBJECT = "\x1b]0;owned\x07 \x1b[2J\u009b31m invoice \u202egpj.exe"
FIELD = re.compile(r' ([a-z_]+)=("(?:[^"\\]|\\.)*"|[^ "]*)(?= |$)')


def unsafe(text: str) -> list[str]:
    """Characters a terminal would act on or hide: controls (but newline), format, separators, surrogates."""
    return [f"U+{ord(c):04X}" for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")]


async def _session(port: int, commands: list[bytes]) -> list[str]:
    client = await RawClient.connect("127.0.0.1", port)
    try:
        assert (await client.reply()).code == "220"
        replies = []
        for command in commands:
            await client.send(command)
            reply = await client.reply()
            replies.append(reply.lines[-1].decode("utf-8", "replace") if reply.lines else reply.code)
        return replies
    finally:
        await client.close()


async def _message(port: int, sender: str, headers: str) -> str:
    replies = await _session(
        port,
        [
            b"EHLO client.example\r\n",
            f"MAIL FROM:<{sender}> SMTPUTF8\r\n".encode(),
            b"RCPT TO:<u@example.org>\r\n",
            b"DATA\r\n",
            (headers + "\r\nhello\r\n.\r\n").encode("utf-8"),
            b"QUIT\r\n",
        ],
    )
    assert replies[4].startswith("250 2.0.0"), replies
    return replies[4].rsplit(" ", 1)[1]


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "mxgate", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="surrogateescape",
        timeout=60,
        env=env,
        check=False,
    )


def test_hostile_text_never_reaches_the_terminal_and_cannot_forge_trace_fields(tmp_path: Path) -> None:
    port = free_port()
    doc = gateway_document(
        tmp_path / "var", port=port, smart_host=f"127.0.0.1:{free_port()}", extra_connector={"retry_first": 3600.0}
    )
    config = write_config(tmp_path / "mxgate.toml", doc)
    with gateway_process(config, port, tmp_path / "gw.log"):
        qa = asyncio.run(
            _message(port, "a@ext.test", f"Subject: {SUBJECT}\r\nMessage-ID: <\x1b[2J\u202e@evil.test>\r\n")
        )
        qb = asyncio.run(_message(port, FORGED, f"Subject: second\r\nMessage-ID: {qa}\r\n"))
        refused = asyncio.run(
            _session(
                port,
                [
                    b"EHLO client.example\r\n",
                    "MAIL FROM:<\u202eevil@ext.test> SMTPUTF8\r\n".encode(),
                    b"MAIL FROM:<bell\x07@ext.test> SMTPUTF8\r\n",
                    "MAIL FROM:<c1\u0085@ext.test> SMTPUTF8\r\n".encode(),
                    "MAIL FROM:<ok@b\u00fccher.test> SMTPUTF8\r\n".encode(),
                    "RCPT TO:<u\u202e@example.org>\r\n".encode(),
                    "RCPT TO:<u@exa\u2066mple.org>\r\n".encode(),
                    "RCPT TO:<j\u00fcrgen@example.org>\r\n".encode(),
                    b"QUIT\r\n",
                ],
            )
        )
        outputs = {
            "queue list": cli(config, "queue", "list"),
            "queue show A": cli(config, "queue", "show", qa),
            "queue show B": cli(config, "queue", "show", qb),
            "trace A": cli(config, "trace", qa),
            "trace B": cli(config, "trace", qb),
            "trace --message-id A": cli(config, "trace", "--message-id", qa),
        }
    figures = {name: (out.returncode, len(unsafe(out.stdout + out.stderr))) for name, out in outputs.items()}
    print(f"\n(exit code, control/bidi characters printed) per command: {figures}")
    print(f"SMTPUTF8 MAIL/RCPT with controls: {refused[1:8]}")
    stories = {line.split()[3] for line in outputs["trace A"].stdout.splitlines() if len(line.split()) > 3}
    print(f"`mxgate trace {qa}` shows the stories of {len(stories)} message(s)")
    for name, out in outputs.items():
        assert out.returncode == 0, (name, out.stderr)
        assert not unsafe(out.stdout + out.stderr), (name, unsafe(out.stdout), out.stdout)
    assert "\\x1b]0;owned\\x07" in outputs["queue show A"].stdout and "\\u202e" in outputs["queue show A"].stdout
    # refused at MAIL (553 5.1.7) and RCPT (553 5.1.3); a plain UTF-8 address still accepted
    assert [r[:9] for r in refused[1:4]] == ["553 5.1.7"] * 3, refused
    assert refused[4].startswith("250"), refused
    assert [r[:9] for r in refused[5:7]] == ["553 5.1.3"] * 2, refused
    assert refused[7].startswith("250"), refused
    # trace by queue id: A's story only (B's Message-ID is A's queue id); by Message-ID: B's only
    assert {line.split()[3] for line in outputs["trace A"].stdout.splitlines()} == {qa}
    assert {line.split()[3] for line in outputs["trace --message-id A"].stdout.splitlines()} == {qb}
    # the forged sender stays one quoted value: B's RECEIVE line has one client, ours, and no auth_user
    receive = next(line for line in outputs["trace B"].stdout.splitlines() if " RECEIVE " in line)
    fields = FIELD.findall(receive)
    keys = [k for k, _ in fields]
    assert keys.count("client") == 1 and dict(fields)["client"] == "127.0.0.1", receive
    assert "auth_user" not in keys, receive
    assert dict(fields)["sender"] == '"\\"pad client=10.9.8.7 auth_user=admin\\"@ext.test"', receive
