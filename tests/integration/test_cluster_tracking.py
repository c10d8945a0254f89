"""Shipping the tracking log to the cluster database (real PostgreSQL): across rotations, nothing shipped twice
however often a round is repeated, nothing lost while the database is down, and `trace` across nodes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mxgate.core import cluster_db
from mxgate.core.cluster_tracking import TrackingShipper, trace
from mxgate.core.tracking import TrackEvent, TrackingLog
from mxgate.testing.postgres import PostgresServer

pytestmark = pytest.mark.integration

psycopg = pytest.importorskip("psycopg", reason="cluster tests need the mxgate[cluster] extra")


def shared(url: str, node: str) -> cluster_db.SharedDb:
    return cluster_db.SharedDb(url, name="tracking", node=node, connect_timeout=2.0)


def rows(url: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(url) as conn:
        return [
            (str(n), str(q), str(e))
            for n, q, e in conn.execute("SELECT node, queue_id, event FROM mxgate_tracking ORDER BY ts").fetchall()
        ]


@pytest.mark.timeout(120)
async def test_the_log_is_shipped_once_across_rotation_and_a_database_outage(
    tmp_path: Path, postgresql_url: str, postgresql_server: PostgresServer
) -> None:
    cluster_db.migrate(postgresql_url, cluster_db.collect_migrations(None))
    state = tmp_path / "mx1"
    state.mkdir()
    log = TrackingLog(state, max_size=2000, files=10)  # rotates every dozen lines or so
    shipper = TrackingShipper(shared(postgresql_url, "mx1"), state)
    try:
        for i in range(40):
            log.write(TrackEvent.RECEIVE, queue_id=f"Q{i:03d}", sender="a@b.example", recipients=1)
            log.flush()
        assert len(list(state.glob("tracking.jsonl.*"))) >= 2
        assert await shipper.ship() == 40
        assert await shipper.ship() == 0
        (state / "tracking.shipped").unlink()  # as if the node crashed before noting where it was: all again ...
        await shipper.ship()
        assert len(rows(postgresql_url)) == 40  # ... and nothing twice
        await asyncio.to_thread(postgresql_server.stop)
        try:
            for i in range(40, 60):
                log.write(TrackEvent.DELIVER, queue_id=f"Q{i:03d}")
                log.flush()
            assert await shipper.ship() == 0  # kept in the log meanwhile
        finally:
            await asyncio.to_thread(postgresql_server.start)
        assert await shipper.ship() == 20
        got = rows(postgresql_url)
        assert len(got) == 60 and {q for _, q, _ in got} == {f"Q{i:03d}" for i in range(60)}
    finally:
        log.close()
        await shipper.db.close()


async def test_trace_tells_the_story_across_nodes(tmp_path: Path, postgresql_url: str) -> None:
    cluster_db.migrate(postgresql_url, cluster_db.collect_migrations(None))
    for name, event in (("mx1", TrackEvent.RECEIVE), ("mx2", TrackEvent.DSN)):
        state = tmp_path / name
        state.mkdir()
        log = TrackingLog(state)
        log.write(event, queue_id="QID1", message_id="<m1@example.org>")
        log.write(TrackEvent.RECEIVE, queue_id="OTHER")
        log.close()
        shipper = TrackingShipper(shared(postgresql_url, name), state)
        assert await shipper.ship() == 2
        await shipper.db.close()
    db = shared(postgresql_url, "mx3")
    story = await asyncio.to_thread(trace, db, "QID1")
    assert [(r.event, r.get("node")) for r in story] == [("RECEIVE", "mx1"), ("DSN", "mx2")]
    by_mid = await asyncio.to_thread(trace, db, "m1@example.org", message_id=True)
    assert [r.queue_id for r in by_mid] == ["QID1", "QID1"]
    assert await asyncio.to_thread(trace, db, "QID1", message_id=True) == []  # a queue id is not a Message-ID
    await db.close()
