"""The MTA-STS cache in cluster mode, against a real PostgreSQL, the DNS lab and a real HTTPS policy server: a
policy fetched by node A protects node B while the policy server is stopped; a background refresh is done by one
node per domain; with the database away a node works from its own last known policies."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from mxgate.core import bootstrap, cluster, cluster_db
from mxgate.core.dns import Resolver
from mxgate.core.plugins import Dispatcher, build_plugins
from mxgate.core.runtime import Runtime
from mxgate.plugins.mta_sts import MtaStsPlugin
from mxgate.testing.postgres import PostgresServer
from tests.integration import test_mta_sts_fetch
from tests.integration.test_mta_sts_fetch import (
    HTTPS_IP,
    Capture,
    Lab,
    _PolicyHttps,
    sts_policy,
    write_config,
)

pytestmark = pytest.mark.integration

sts_lab = test_mta_sts_fetch.lab  # the module's fixture (as "sts_lab"): DNS lab, test CA, HTTPS policy server

pytest.importorskip("psycopg", reason="cluster tests need the mxgate[cluster] extra")


def migrated(url: str) -> None:
    cluster_db.migrate(url, cluster_db.collect_migrations(Dispatcher(build_plugins())))


@contextlib.asynccontextmanager
async def node(lab: Lab, tmp: Path, name: str, url: str) -> AsyncIterator[tuple[Runtime, MtaStsPlugin, Capture]]:
    path = write_config(lab, tmp / name)
    doc: dict[str, Any] = tomllib.loads(path.read_text())
    doc["cluster"] = {"database": url, "node": name, "connect_timeout": 2.0}
    path.write_text(tomli_w.dumps(doc))
    capture = Capture()
    config, plugins = bootstrap.load(path, entry_points=False, extra_plugins=[("capture", capture)])
    runtime = Runtime.create(config, plugins)
    runtime.resolver = Resolver([lab.dns.endpoint], timeout=2.0)
    runtime.cluster = cluster.Cluster(config.cluster, cluster_db.collect_migrations(runtime.hooks.dispatcher))
    await runtime.hooks.on_startup(runtime)
    plugin = plugins.pm.get_plugin("mta_sts")
    assert isinstance(plugin, MtaStsPlugin)
    try:
        yield runtime, plugin, capture
    finally:
        for task in runtime.tasks:
            task.cancel()
        await runtime.hooks.on_shutdown(runtime)
        await runtime.cluster.close()


@contextlib.contextmanager
def policy_server_stopped(lab: Lab) -> Any:
    old = lab.https
    old.shutdown()
    old.server_close()
    try:
        yield
    finally:
        new = _PolicyHttps((HTTPS_IP, lab.port), old.ctx)
        new.requests = old.requests
        threading.Thread(target=new.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        lab.https = new


async def test_a_policy_fetched_by_one_node_protects_another_with_the_policy_server_stopped(
    sts_lab: Lab, tmp_path: Path, postgresql_url: str
) -> None:
    lab = sts_lab
    migrated(postgresql_url)
    async with node(lab, tmp_path, "mx1", postgresql_url) as (a, _plugin_a, _):
        first = await sts_policy(a, "enforce.test", "mx1.enforce.test", "rogue.enforce.test")
        assert first is not None and first.applies
    fetches = lab.hosts("enforce.test")
    assert fetches >= 1
    with policy_server_stopped(lab):
        async with node(lab, tmp_path, "mx2", postgresql_url) as (b, plugin_b, capture):
            policy = await sts_policy(b, "enforce.test", "mx1.enforce.test", "rogue.enforce.test")
            assert policy is not None and policy.applies and not policy.report_only
            assert policy.mx_patterns == ("mx1.enforce.test", "*.b.enforce.test")
            assert not policy.for_host("rogue.enforce.test").usable  # the downgrade a first contact would allow
            assert capture.results("sts_policy", "origin") == ["cache"]
            assert capture.results("sts_fetch", "result") == []  # node B fetched nothing
            assert plugin_b.engine is not None and plugin_b.engine.cache.get("enforce.test") is not None
    assert lab.hosts("enforce.test") == fetches
    # node B kept it in its own file: with the database gone, a restart of B still enforces it
    async with node(lab, tmp_path, "mx2", "postgresql://postgres@127.0.0.1:1/none") as (b, _plugin, _capture):
        policy = await sts_policy(b, "enforce.test", "mx1.enforce.test", "rogue.enforce.test")
        assert policy is not None and policy.applies


async def test_one_node_refreshes_a_domain_per_interval_and_the_others_take_its_fetch(
    sts_lab: Lab, tmp_path: Path, postgresql_url: str
) -> None:
    lab = sts_lab
    migrated(postgresql_url)
    async with (
        node(lab, tmp_path, "mx1", postgresql_url) as (a, plugin_a, _),
        node(lab, tmp_path, "mx2", postgresql_url) as (b, plugin_b, _),
        node(lab, tmp_path, "mx3", postgresql_url) as (c, plugin_c, _),
    ):
        for runtime in (a, b, c):
            assert await sts_policy(runtime, "testing.test", "mx1.testing.test") is not None
        engines = [p.engine for p in (plugin_a, plugin_b, plugin_c)]
        assert all(e is not None for e in engines)
        before = lab.hosts("testing.test")
        assert before == 1  # the first node fetched; the other two took its policy from the cluster
        later = time.time() + 86400 - 3600  # due: an hour before it expires (max_age 86400)
        for e in engines:
            assert e is not None
            e.clock = lambda: later
        await asyncio.gather(*(e.refresh_due() for e in engines if e is not None))  # all three at once
        assert lab.hosts("testing.test") == before + 1  # one node fetched it
        for e in engines:  # the next pass takes the fresh fetch in everywhere
            assert e is not None
            await e.cache.pull(later)
        fetched = {e.cache.get("testing.test").fetched_at for e in engines if e is not None}  # type: ignore[union-attr]
        assert len(fetched) == 1


async def test_the_cache_works_on_while_the_database_is_down(
    sts_lab: Lab, tmp_path: Path, postgresql_url: str, postgresql_server: PostgresServer
) -> None:
    lab = sts_lab
    migrated(postgresql_url)
    async with node(lab, tmp_path, "mx1", postgresql_url) as (a, plugin, capture):
        assert await sts_policy(a, "split.test", "mx.split.test") is not None
        await asyncio.to_thread(postgresql_server.stop)
        try:
            policy = await sts_policy(a, "split.test", "mx.split.test", "rogue.split.test")
            assert policy is not None and policy.applies and not policy.for_host("rogue.split.test").usable
            fresh = await sts_policy(a, "none.test", "mx.none.test")  # a new fetch is kept locally
            assert fresh is not None
            assert plugin.engine is not None and plugin.engine.cache.get("none.test") is not None
        finally:
            await asyncio.to_thread(postgresql_server.start)
        assert capture.results("sts_fetch", "result").count("ok") == 2
        await plugin.engine.cache.pull(time.time())  # back: the policy fetched meanwhile reaches the cluster
    async with node(lab, tmp_path, "mx2", postgresql_url) as (b, _plugin_b, capture_b):
        assert await sts_policy(b, "none.test", "mx.none.test") is not None
        assert capture_b.results("sts_policy", "origin") == ["cache"]
        assert capture_b.results("sts_fetch", "result") == []
