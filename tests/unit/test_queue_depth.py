"""The queue as it grows: the hot path, the figures and a page of ``queue list`` cost the same with a deep backlog
of deferred mail as with none. Pinned without timing: SQLite's query plans (no full scan) and the number of
virtual-machine steps SQLite runs, which does not depend on the machine's speed. Speed itself: bench/ (backlog)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from mxgate.core.messages import RecipientStatus
from mxgate.core.queue import QueueStore
from mxgate.core.queue.store import DB_NAME

NOW = 1_700_000_000.0
BODY = b"From: a@example.org\r\nSubject: deferred\r\n\r\n" + b"x" * 500 + b"\r\n"
LATER = NOW + 3600  # deferred mail comes due long after the test's clock


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[QueueStore]:
    s = await QueueStore.open(tmp_path)
    yield s
    await s.close()


async def defer_many(store: QueueStore, count: int, *, start: int = 0) -> None:
    """``count`` messages to a destination that answered 4xx: queued, attempted once, deferred until LATER."""

    async def one(i: int) -> None:
        rcpt = f"u{i}@down.test"
        msg = await store.put_leased("a@example.net", [rcpt], BODY, now=NOW, lease_seconds=900)
        await store.record_results(
            msg.id, [(rcpt, RecipientStatus.DEFERRED, "451 4.3.0 try later", LATER + i)], now=NOW, known=msg
        )

    for first in range(start, start + count, 500):
        await asyncio.gather(*(one(i) for i in range(first, min(first + 500, start + count))))


class Probe:
    """SQL statements and SQLite VM steps on both of a store's connections (the writer and the reader thread)."""

    STEP = 10  # the progress handler runs every STEP virtual-machine instructions

    def __init__(self, store: QueueStore) -> None:
        self.conns = [store._writer._conn, store._reader_conn]
        self.statements: list[str] = []
        self.ticks = 0
        self._lock = threading.Lock()

    def _tick(self) -> int:
        with self._lock:
            self.ticks += 1
        return 0

    def _trace(self, sql: str) -> None:
        with self._lock:
            self.statements.append(sql)

    def __enter__(self) -> Probe:
        for c in self.conns:
            c.set_progress_handler(self._tick, self.STEP)
            c.set_trace_callback(self._trace)
        return self

    def __exit__(self, *exc: object) -> None:
        for c in self.conns:
            c.set_progress_handler(None, 0)
            c.set_trace_callback(None)

    @property
    def steps(self) -> int:
        return self.ticks * self.STEP


async def steps_of(store: QueueStore, work: Callable[[], Awaitable[Any]]) -> tuple[int, list[str]]:
    with Probe(store) as probe:
        await work()
    return probe.steps, probe.statements


def full_scans(path: Path, statements: list[str]) -> list[tuple[str, str]]:
    """(statement, plan line) for every plan step that walks a whole table or index (a SCAN, unless the statement
    stops after LIMIT rows) or sorts every row it reads (a temporary B-tree)."""
    found = []
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for sql in dict.fromkeys(statements):
            if not re.match(r"\s*(SELECT|UPDATE|DELETE|INSERT)", sql, re.I):
                continue  # BEGIN, COMMIT, PRAGMA
            limited = re.search(r"\bLIMIT \d+\s*$", sql) is not None
            for row in conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall():
                detail = str(row[3])
                if (detail.startswith("SCAN ") and not limited) or "TEMP B-TREE" in detail:
                    found.append((sql, detail))
    return found


async def hot_path(store: QueueStore, n: int) -> None:
    """What one relayed message and one deferral cost the store, a scheduler round, and the figures."""
    ok = await store.put_leased("a@example.net", [f"ok{n}@good.test"], BODY, now=NOW + 1, lease_seconds=900)
    await store.record_results(
        ok.id, [(f"ok{n}@good.test", RecipientStatus.DELIVERED, "250 2.0.0 ok", None)], now=NOW + 1, known=ok
    )
    down = await store.put_leased("a@example.net", [f"d{n}@down.test"], BODY, now=NOW + 1, lease_seconds=900)
    await store.record_results(
        down.id, [(f"d{n}@down.test", RecipientStatus.DEFERRED, "451 4.3.0 later", LATER)], now=NOW + 1, known=down
    )
    assert await store.lease_due(NOW + 2, 100, 900) == []  # nothing due: the backlog waits for LATER
    assert await store.lease_due(NOW + 2, 100, 900, retry_limit=50) == []  # as the scheduler asks
    await store.counts(now=NOW + 2)


async def test_hot_path_uses_indexes_and_costs_the_same_at_any_depth(store: QueueStore, tmp_path: Path) -> None:
    await defer_many(store, 300)
    shallow, statements = await steps_of(store, lambda: hot_path(store, 1))
    assert any("queue_stats" in s for s in statements)  # counts reads the kept figures
    assert full_scans(tmp_path / DB_NAME, statements) == []
    await defer_many(store, 2700, start=300)  # ten times deeper
    deep, statements = await steps_of(store, lambda: hot_path(store, 2))
    assert full_scans(tmp_path / DB_NAME, statements) == []
    # the same work: SQLite's VM steps do not grow with the 2,700 extra deferred messages (a scan would add
    # thousands per statement); a little slack for the B-tree pages a seek walks through
    assert deep <= shallow * 1.1 + 200, (shallow, deep)
    assert await store.integrity_check() == []


async def test_lease_due_gives_retries_their_share(store: QueueStore, tmp_path: Path) -> None:
    """Due retries come first, most overdue first, up to ``retry_limit``; mail not attempted yet fills the rest;
    both through their own due index."""
    await defer_many(store, 20)  # due at LATER + i
    fresh = [await store.put("a@example.net", [f"n{i}@good.test"], BODY, now=LATER + 100 + i) for i in range(8)]
    now = LATER + 1000
    with Probe(store) as probe:
        first = await store.lease_due(now, 10, 900, retry_limit=4)
    assert full_scans(tmp_path / DB_NAME, probe.statements) == []
    retries = [m for m in first if m.recipients[0].status == RecipientStatus.DEFERRED]
    assert [m.recipients[0].address for m in retries] == [f"u{i}@down.test" for i in range(4)]  # most overdue
    assert [m.id for m in first if m not in retries] == fresh[:6]
    second = await store.lease_due(now, 10, 900, retry_limit=0)
    assert [m.id for m in second] == fresh[6:]  # no retry at all, and only 2 new messages were left
    third = await store.lease_due(now, 10, 900)  # no limit: due order over both
    assert [m.recipients[0].address for m in third] == [f"u{i}@down.test" for i in range(4, 14)]


async def test_a_page_of_the_list_costs_its_own_rows(store: QueueStore, tmp_path: Path) -> None:
    await defer_many(store, 300)
    first = await store.list(limit=50)
    assert len(first) == 50 and [m.id for m in first] == sorted(m.id for m in first)
    second = await store.list(limit=50, after=first[-1].id)
    assert len(second) == 50 and second[0].id > first[-1].id
    pages, after = [], None
    while page := await store.list(limit=120, after=after):
        pages.append(page)
        after = page[-1].id
    assert [len(p) for p in pages] == [120, 120, 60]
    assert len({m.id for p in pages for m in p}) == 300  # every message once
    mid = pages[1][0].id
    shallow, statements = await steps_of(store, lambda: store.list(limit=20, after=mid))
    assert full_scans(tmp_path / DB_NAME, statements) == []
    await defer_many(store, 2700, start=300)
    deep, statements = await steps_of(store, lambda: store.list(limit=20, after=mid))
    assert full_scans(tmp_path / DB_NAME, statements) == []
    assert deep <= shallow * 1.1 + 200, (shallow, deep)


async def test_counts_are_kept_through_every_change(store: QueueStore) -> None:
    """The figures kept by triggers equal a recount from the rows after each kind of change."""

    async def same() -> None:
        kept, counted = await store.stats_row(), await store.recount()
        assert kept == counted

    a = await store.put("s@x.test", ["b@y.test", "c@y.test", "d@y.test"], b"12345", now=NOW)
    b = await store.put("s@x.test", ["e@y.test"], b"123", now=NOW + 1)
    c = await store.put("s@x.test", ["f@y.test", "g@y.test"], b"1", now=NOW + 2)
    await same()
    await store.record_results(
        a,
        [("b@y.test", RecipientStatus.DELIVERED, "250", None), ("c@y.test", RecipientStatus.DEFERRED, "451", NOW + 9)],
        now=NOW,
    )
    await same()
    await store.record_results(a, [("d@y.test", RecipientStatus.DEFERRED, "451", NOW + 9)], now=NOW)
    await store.record_results(a, [("c@y.test", RecipientStatus.DEFERRED, "451", NOW + 20)], now=NOW + 9)
    await same()
    assert (await store.stats_row())["deferred_msgs"] == 1  # two deferred recipients, one message
    await store.record_results(a, [("c@y.test", RecipientStatus.FAILED, "550", None)], now=NOW + 20)
    await same()
    await store.hold(b)
    await same()
    await store.hold(b)  # again: no change
    await store.release(b)
    await store.hold(c)
    await same()
    await store.flush(None, now=NOW + 30)
    leased = await store.lease_due(NOW + 30, 10, 900)
    assert {m.id for m in leased} == {a, b}
    await store.record_results(a, [("d@y.test", RecipientStatus.DELIVERED, "250", None)], now=NOW + 31)  # finished
    await same()
    counts = await store.counts(now=NOW + 31)
    assert (counts.messages, counts.held, counts.finished, counts.deferred, counts.bytes) == (2, 1, 1, 0, 4)
    assert counts.leased == 1 and counts.oldest_age == 30.0  # b is still leased; b is the oldest active now
    assert await store.delete(c)  # held, active
    await store.record_results(b, [("e@y.test", RecipientStatus.DEFERRED, "451", NOW + 99)], now=NOW + 32)
    await same()
    assert await store.delete(b)  # deferred, active
    await same()
    assert await store.purge_finished(NOW + 1000) == 1
    await same()
    assert await store.stats_row() == dict.fromkeys(await store.stats_row(), 0)
    assert (await store.counts(now=NOW + 1000)).oldest_age is None
    assert await store.integrity_check() == []


async def test_a_schema_2_store_is_upgraded_with_its_figures(tmp_path: Path) -> None:
    """A store written before the kept figures (schema 2) is counted once when opened."""
    store = await QueueStore.open(tmp_path)
    await defer_many(store, 30)
    done = await store.put("s@x.test", ["z@y.test"], b"1", now=NOW)
    await store.record_results(done, [("z@y.test", RecipientStatus.DELIVERED, "250", None)], now=NOW)
    await store.put("s@x.test", ["q@y.test"], b"12", now=NOW)
    expected = await store.recount()
    await store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)) as raw:
        for kind, name in raw.execute(
            "SELECT type, name FROM sqlite_master WHERE name LIKE 'stats_%' OR name = 'queue_stats'"
            " OR name IN ('messages_active', 'messages_leased')"
        ).fetchall():
            raw.execute(f"DROP {kind.upper()} {name}")
        raw.execute("PRAGMA user_version = 2")
    store = await QueueStore.open(tmp_path)
    try:
        assert await store.stats_row() == expected
        assert expected["messages"] == 31 and expected["deferred_msgs"] == 30 and expected["finished"] == 1
        assert await store.integrity_check() == []
        later = await store.put("s@x.test", ["r@y.test"], b"1", now=NOW)  # and kept from then on
        assert (await store.stats_row())["messages"] == 32 and later
    finally:
        await store.close()


def test_queue_list_cli_pages(tmp_path: Path) -> None:
    config = tmp_path / "mxgate.toml"
    config.write_text(f'[server]\nstate_dir = "{tmp_path / "var"}"\n')

    async def fill() -> None:
        async with await QueueStore.open(tmp_path / "var") as s:
            await defer_many(s, 25)

    asyncio.run(fill())

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "mxgate", "queue", "list", "--config", str(config), "--json", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)

    first = run("--limit", "10")
    assert first.returncode == 0, first.stderr
    rows = json.loads(first.stdout)
    assert len(rows) == 10
    hint = re.search(r"10 shown; for the next page add --after (\S+)", first.stderr)
    assert hint and hint.group(1) == rows[-1]["id"]
    seen = [r["id"] for r in rows]
    after = hint.group(1)
    while True:
        page = run("--limit", "10", "--after", after)
        assert page.returncode == 0, page.stderr
        rows = json.loads(page.stdout)
        seen += [r["id"] for r in rows]
        if len(rows) < 10:
            assert "next page" not in page.stderr
            break
        after = rows[-1]["id"]
    assert len(seen) == len(set(seen)) == 25 and seen == sorted(seen)
    assert all(r["state"] == "deferred" for r in rows)
    default = run()
    assert len(json.loads(default.stdout)) == 25 and "next page" not in default.stderr  # under the default 100
