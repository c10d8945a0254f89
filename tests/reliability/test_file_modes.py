"""Mail is readable only by mxgate (issue 18, item 5): a real ``mxgate run`` started under umask 022 creates its
state directory 0700 and every file in it 0600 -- queue database, its WAL and shared memory, tracking log, TLS-RPT
store, MTA-STS cache, users file -- and warns at start when the state directory is group- or world-accessible.

Figures printed: every path under the state directory with its mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability_kit import RawClient, free_port, gateway_document, gateway_process, write_config

from mxgate.core.auth import UsersFile
from mxgate.testing.sinks import ThreadedSmtpSink

pytestmark = [pytest.mark.integration]


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in sorted(root.rglob("*")):
        out[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return out


async def _queue_one(port: int) -> None:
    client = await RawClient.connect("127.0.0.1", port)
    try:
        assert (await client.reply()).code == "220"
        await client.send(
            b"EHLO client.example\r\nMAIL FROM:<secret-sender@example.net>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n"
        )
        assert [(await client.reply()).code for _ in range(4)] == ["250", "250", "250", "354"]
        await client.send(b"Subject: quarterly figures\r\nMessage-ID: <m1@example.net>\r\n\r\nconfidential\r\n.\r\n")
        assert (await client.reply()).code == "250"
        await client.send(b"QUIT\r\n")
        await client.reply()
    finally:
        await client.close()


def _run_and_queue(tmp_path: Path, state: Path, *, users: bool = False) -> tuple[dict[str, int], str]:
    """Start under umask 022, queue one message, let it be delivered (a TLS outcome for TLS-RPT), stop. The modes
    are sampled while running (the WAL and shared-memory files exist then) and after the stop."""
    port = free_port()
    with ThreadedSmtpSink(starttls=False) as sink:
        doc = gateway_document(
            state, port=port, smart_host=f"{sink.host}:{sink.port}", extra_connector={"tls": "opportunistic"}
        )
        doc["plugins"] = {"tlsrpt": {"organization_name": "Example", "contact_info": "tlsrpt@example.org"}}
        config = write_config(tmp_path / "mxgate.toml", doc)
        log = tmp_path / "gw.log"
        with umask(0o022):
            if users:
                UsersFile(state / "users").add("alice", "pw")
            with gateway_process(config, port, log) as gw:
                asyncio.run(_queue_one(port))
                deadline = time.monotonic() + 30
                while not sink.messages and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert sink.messages, gw.tail()
                running = _modes(state)
                assert gw.stop() == 0, gw.tail()
    return {**running, **_modes(state)}, log.read_text(encoding="utf-8", errors="replace")


def _wrong(state: Path, modes: dict[str, int]) -> dict[str, str]:
    return {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != (0o700 if name == "." or (state / name).is_dir() else 0o600)
    }


def test_state_created_under_umask_022_is_private(tmp_path: Path) -> None:
    state = tmp_path / "var"
    modes, log = _run_and_queue(tmp_path, state)
    print("\nstate under umask 022:", {k: oct(v) for k, v in modes.items()})
    names = set(modes)
    wanted = {"queue.sqlite3", "queue.sqlite3-wal", "queue.sqlite3-shm", "tracking.jsonl", "tlsrpt.sqlite3"}
    assert wanted | {"sts-cache.sqlite3"} <= names, names
    assert not _wrong(state, modes), f"group/world-accessible under the state directory: {_wrong(state, modes)}"
    assert "group- or world-accessible" not in log


def test_open_state_dir_is_named_at_start_and_old_files_are_tightened(tmp_path: Path) -> None:
    """An existing state directory that others can enter is left as the operator made it, but named in a start-up
    warning; files created in it are 0600, and a tracking log an older version left 0644 is tightened."""
    state = tmp_path / "var"
    state.mkdir()
    os.chmod(state, 0o755)
    (state / "tracking.jsonl").write_text("")
    os.chmod(state / "tracking.jsonl", 0o644)
    modes, log = _run_and_queue(tmp_path, state, users=True)
    print("\nstate dir 0755 beforehand:", {k: oct(v) for k, v in modes.items()})
    assert "state directory" in log and "group- or world-accessible" in log, log[-2000:]
    assert modes["."] == 0o755
    files = {name: oct(mode) for name, mode in modes.items() if name != "." and mode != 0o600}
    assert not files, files
    assert modes["users"] == modes["tracking.jsonl"] == 0o600
