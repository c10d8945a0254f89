"""TLS-RPT in cluster mode against a real PostgreSQL: three services (three nodes, each with its own state
directory) share one database. Counts are summed over the nodes, one node sends each day's report with one
report-id, received reports are stored once, and a node that loses the database keeps its counts and publishes
them when it returns, counting nothing twice."""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest

from mxgate.core import cluster
from mxgate.core.plugins import Dispatcher, build_plugins
from mxgate.plugins.tlsrpt import SendResult, TlsRptConfig, TlsRptService
from mxgate.plugins.tlsrpt.parse import decode_report_bytes
from mxgate.testing.postgres import PostgresServer

pytest.importorskip("psycopg", reason="cluster tests need the mxgate[cluster] extra")

from tests.unit.test_tlsrpt_service import RUA_HTTPS, Clock, FakeResolver, outcome, ts

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "tlsrpt"
DAY = "2024-03-04"


def migrated(url: str) -> None:
    applied = cluster.migrate(url, cluster.collect_migrations(Dispatcher(build_plugins())))
    assert {(m.component, m.version) for m in applied} >= {("core", 1), ("tlsrpt", 1)}


def node(tmp_path: Path, name: str, url: str, clock: Clock, *, sent: list[tuple[str, str]]) -> TlsRptService:
    conf = replace(TlsRptConfig(), organization_name="Sender Org", contact_info="tlsrpt@sender.example")
    shared = cluster.SharedDb(url, name="tlsrpt", node=name, connect_timeout=2.0, schema="tlsrpt")
    svc = TlsRptService(
        replace(conf, send_window_hours=0.0),
        state_dir=tmp_path / name,
        submitter="mx.sender.example",
        clock=clock,
        resolver=FakeResolver(RUA_HTTPS),
        shared=shared,
    )

    async def post(uri: str, gz: bytes) -> SendResult:
        sent.append((name, decode_report_bytes(gz)["report-id"]))
        return SendResult(uri, "https", True, "200")

    svc.post_https = post  # type: ignore[method-assign]
    return svc


def totals(doc: dict[str, object]) -> tuple[int, int]:
    policies = doc["policies"]
    assert isinstance(policies, list)
    return (
        sum(p["summary"]["total-successful-session-count"] for p in policies),
        sum(p["summary"]["total-failure-session-count"] for p in policies),
    )


async def test_counts_of_three_nodes_make_one_report_sent_once(tmp_path: Path, postgresql_url: str) -> None:
    migrated(postgresql_url)
    clock = Clock(ts("2024-03-04T12:00:00"))
    sent: list[tuple[str, str]] = []
    nodes = [node(tmp_path, name, postgresql_url, clock, sent=sent) for name in ("mx1", "mx2", "mx3")]
    try:
        at = ts("2024-03-04T10:00:00")
        for i, svc in enumerate(nodes):  # mx1: 1 ok; mx2: 2 ok, 1 failed; mx3: 3 ok, 2 failed
            for _ in range(i + 1):
                svc.record(outcome(at))
            for _ in range(i):
                svc.record(outcome(at, success=False))
            await svc.flush()
        await nodes[0].flush()  # a publish repeated counts nothing twice
        nodes[1]._dirty = None  # a whole re-publish, as after a restart
        await nodes[1].flush()
        for svc in nodes:
            doc = await svc.preview(DAY, "example.org")
            assert doc is not None and totals(doc) == (6, 3)
        clock.now = ts("2024-03-05T06:00:00")
        for _ in range(3):  # three sending rounds on every node at once
            await asyncio.gather(*(svc.tick() for svc in nodes))
        assert len(sent) == 1, sent
        report_ids = set()
        for svc in nodes:
            doc = await svc.preview(DAY, "example.org")
            assert doc is not None and totals(doc) == (6, 3)
            report_ids.add(doc["report-id"])
            assert [r[3] for r in await svc.status(DAY)] == ["sent"]
        assert report_ids == {sent[0][1]}
    finally:
        for svc in nodes:
            await svc.close()


async def test_received_reports_are_stored_once_for_the_cluster(tmp_path: Path, postgresql_url: str) -> None:
    migrated(postgresql_url)
    clock = Clock(ts("2024-03-05T06:00:00"))
    nodes = [node(tmp_path, name, postgresql_url, clock, sent=[]) for name in ("mx1", "mx2", "mx3")]
    try:
        data = (DATA / "google-shaped.json").read_bytes()
        results = [r for r, _ in await asyncio.gather(*(svc.accept_report(data, method="https") for svc in nodes))]
        assert sorted(results) == ["duplicate", "duplicate", "ok"]
        result, _ = await nodes[0].accept_report((DATA / "microsoft-shaped.json").read_bytes(), method="mailto")
        assert result == "ok"
        for svc in nodes:
            assert await svc.reporter_failures() == [("Microsoft Corporation", 47, 7), ("Google Inc.", 1520, 3)]
        assert await nodes[2].store_size() > 0
    finally:
        for svc in nodes:
            await svc.close()


@pytest.mark.timeout(120)
async def test_counts_wait_locally_while_the_database_is_down_and_are_published_once(
    tmp_path: Path, postgresql_url: str, postgresql_server: PostgresServer
) -> None:
    migrated(postgresql_url)
    clock = Clock(ts("2024-03-04T12:00:00"))
    a, b = (node(tmp_path, name, postgresql_url, clock, sent=[]) for name in ("mx1", "mx2"))
    try:
        a.record(outcome(ts("2024-03-04T10:00:00")))
        b.record(outcome(ts("2024-03-04T10:00:00")))
        await a.flush()
        await b.flush()
        await asyncio.to_thread(postgresql_server.stop)
        try:
            for i in range(5):  # the database is away: counts go on, on disk
                a.record(outcome(ts("2024-03-04T11:00:00"), success=i % 2 == 0))
                await a.flush()
            assert a.pending == 0  # written to the local file, not held in memory
        finally:
            await asyncio.to_thread(postgresql_server.start)
        for _ in itertools.repeat(None, 3):  # back: published (once, however often it is repeated)
            await a.flush()
        doc = await b.preview(DAY, "example.org")
        assert doc is not None and totals(doc) == (5, 2)
        local = await a.local.run(lambda c: c.execute("SELECT SUM(success), SUM(failure) FROM policy").fetchone())
        assert tuple(local) == (4, 2)
    finally:
        await a.close()
        await b.close()


def test_cli_show_on_any_node_prints_the_clusters_report(tmp_path: Path, postgresql_url: str) -> None:
    import subprocess
    import sys

    import tomli_w

    migrated(postgresql_url)
    clock = Clock(ts("2024-03-04T12:00:00"))

    async def fill() -> None:
        for name, n in (("mx1", 2), ("mx2", 3)):
            svc = node(tmp_path, name, postgresql_url, clock, sent=[])
            for _ in range(n):
                svc.record(outcome(ts("2024-03-04T10:00:00")))
            await svc.close()  # flushes and publishes

    asyncio.run(fill())
    config = tmp_path / "mx3.toml"
    config.write_text(
        tomli_w.dumps(
            {"server": {"state_dir": str(tmp_path / "mx3")}, "cluster": {"database": postgresql_url, "node": "mx3"}}
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mxgate", "tlsrpt", "show", "-c", str(config), "--date", DAY],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.split("\n", 1)[1])
    assert totals(doc) == (5, 0)


async def test_tlsrpt_send_waits_for_no_one_but_refuses_beside_a_sending_round(
    tmp_path: Path, postgresql_url: str
) -> None:
    migrated(postgresql_url)
    clock = Clock(ts("2024-03-05T06:00:00"))
    sent: list[tuple[str, str]] = []
    a, b = (node(tmp_path, name, postgresql_url, clock, sent=sent) for name in ("mx1", "mx2"))
    try:
        b.record(outcome(ts("2024-03-04T10:00:00")))
        async with a.db.exclusive("tlsrpt-send") as ours:  # mx1 is in its sending round
            assert ours
            with pytest.raises(ValueError, match="another node is in its TLS-RPT sending round"):
                await b.send_day(DAY)
        assert sent == []
        await b.send_day(DAY)  # the round is over: the operator's send goes through, once
        assert [node for node, _ in sent] == ["mx2"]
        await a.send_day(DAY)
        assert len(sent) == 1
    finally:
        await a.close()
        await b.close()
