"""An AUTH flood against a real ``mxgate run`` (issue 18, item 1): 200 parallel connections from one address, each
trying one wrong password at once. The per-address failure limit must hold under that race (the attempt is reserved
before the password is checked), attempts over the limit get ``454 4.7.0`` without running the KDF, and the checks
that do run leave the event loop free: a NOOP on a parallel session stays fast, the process does not balloon.

Figures printed: KDF runs (``mxgate_smtp_auth_total`` ok + failed), replies by code, RSS before/after, the worst NOOP
round trip during the flood.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
import urllib.request
from pathlib import Path

import pytest
from reliability_kit import RawClient, free_port, gateway_document, gateway_process, rss_kib, write_config

from mxgate.core.auth import UsersFile

pytestmark = [pytest.mark.integration]

FLOOD = 200
LIMIT = 5  # FailureLimiter's default


def _auth_counts(metrics_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r'^mxgate_smtp_auth_total\{result="([a-z_]+)"\} ([0-9.e+]+)$', text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


async def _one_auth(port: int, token: bytes, source: str | None = None) -> str:
    client = await RawClient.connect("127.0.0.1", port, source=source, timeout=30)
    try:
        if (await client.reply(30)).code != "220":
            return "banner"
        await client.send(b"EHLO flood.example\r\n")
        if (await client.reply(30)).code != "250":
            return "ehlo"
        await client.send(b"AUTH PLAIN " + token + b"\r\n")
        reply = await client.reply(60)
        return reply.lines[-1][:9].decode("ascii", "replace") if reply.lines else reply.code
    finally:
        await client.close()


async def _noop_probe(port: int, stop: asyncio.Event) -> list[float]:
    client = await RawClient.connect("127.0.0.1", port, source="127.0.0.9")
    times: list[float] = []
    try:
        assert (await client.reply()).code == "220"
        while not stop.is_set():
            t0 = time.monotonic()
            await client.send(b"NOOP\r\n")
            reply = await client.reply(30)
            assert reply.code == "250", reply
            times.append(time.monotonic() - t0)
            await asyncio.sleep(0.02)
    finally:
        await client.close()
    return times


def _config(tmp_path: Path) -> tuple[Path, int, int]:
    state = tmp_path / "var"
    state.mkdir()
    UsersFile(state / "users").add("alice", "right horse battery staple")
    port, metrics_port = free_port(), free_port()
    doc = gateway_document(
        state,
        port=port,
        smart_host=f"127.0.0.1:{free_port()}",
        extra_listener={"allow_plaintext_auth": True, "max_errors": 50},
    )
    doc["metrics"]["listen"] = f"127.0.0.1:{metrics_port}"
    return write_config(tmp_path / "mxgate.toml", doc), port, metrics_port


TOKEN = base64.b64encode(b"\0alice\0wrong password")


@pytest.mark.asyncio
async def test_parallel_auth_flood_from_one_address_runs_the_kdf_at_most_limit_times(tmp_path: Path) -> None:
    config, port, metrics_port = _config(tmp_path)
    token = TOKEN
    with gateway_process(config, port, tmp_path / "gw.log") as gw:
        rss_before = rss_kib(gw.pid)
        stop = asyncio.Event()
        probe = asyncio.ensure_future(_noop_probe(port, stop))
        try:
            replies = await asyncio.wait_for(asyncio.gather(*(_one_auth(port, token) for _ in range(FLOOD))), 180)
        finally:
            stop.set()
        noop = await asyncio.wait_for(probe, 60)
        rss_after = rss_kib(gw.pid)
        counts = _auth_counts(metrics_port)
    by_code: dict[str, int] = {}
    for r in replies:
        by_code[r] = by_code.get(r, 0) + 1
    kdf_runs = counts.get("ok", 0) + counts.get("failed", 0)
    print(
        f"\nAUTH flood: {FLOOD} parallel connections from 127.0.0.1; replies {by_code}; metrics {counts}; "
        f"KDF runs {kdf_runs:.0f}; RSS {rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MiB; "
        f"NOOP round trip max {max(noop) * 1000:.0f} ms over {len(noop)} probes"
    )
    assert kdf_runs <= LIMIT, counts
    assert by_code.get("535 5.7.8", 0) <= LIMIT, by_code
    assert by_code.get("454 4.7.0", 0) >= FLOOD - LIMIT, by_code
    assert sum(by_code.values()) == FLOOD
    assert max(noop) < 1.0, f"a parallel NOOP waited {max(noop):.2f} s"
    assert rss_after - rss_before < 48 * 1024, f"RSS grew by {(rss_after - rss_before) / 1024:.0f} MiB"


@pytest.mark.asyncio
async def test_auth_flood_from_many_addresses_is_bounded_by_the_password_check_pool(tmp_path: Path) -> None:
    """40 addresses x 5 attempts, all at once: every address is within its limit, so only the pool's bound
    (a few threads, a bounded queue; full = 454 4.7.0 at once) keeps memory and the loop in check."""
    config, port, metrics_port = _config(tmp_path)
    sources = [f"127.0.1.{i}" for i in range(1, 41)]
    with gateway_process(config, port, tmp_path / "gw.log") as gw:
        rss_before = rss_kib(gw.pid)
        stop = asyncio.Event()
        probe = asyncio.ensure_future(_noop_probe(port, stop))
        try:
            replies = await asyncio.wait_for(
                asyncio.gather(*(_one_auth(port, TOKEN, src) for src in sources for _ in range(LIMIT))), 180
            )
        finally:
            stop.set()
        noop = await asyncio.wait_for(probe, 60)
        rss_after = rss_kib(gw.pid)
        counts = _auth_counts(metrics_port)
    by_code: dict[str, int] = {}
    for r in replies:
        by_code[r] = by_code.get(r, 0) + 1
    print(
        f"\nAUTH flood: {len(replies)} parallel connections from {len(sources)} addresses; replies {by_code}; "
        f"metrics {counts}; RSS {rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MiB; "
        f"NOOP round trip max {max(noop) * 1000:.0f} ms over {len(noop)} probes"
    )
    assert set(by_code) <= {"535 5.7.8", "454 4.7.0"}, by_code
    assert counts.get("tempfail", 0) >= 1, counts  # the pool was full and said so at once
    assert counts.get("failed", 0) + counts.get("tempfail", 0) == len(replies), counts
    assert max(noop) < 1.0, f"a parallel NOOP waited {max(noop):.2f} s"
    assert rss_after - rss_before < 48 * 1024, f"RSS grew by {(rss_after - rss_before) / 1024:.0f} MiB"
