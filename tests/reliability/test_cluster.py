"""Cluster mode against a real PostgreSQL (mxgate.testing.postgres): schema steps by `mxgate cluster migrate`,
three `mxgate run` nodes heartbeating into one database, `mxgate cluster status` showing them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import smtplib
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from reliability_kit import REPO, GatewayProcess, RawClient, free_port, gateway_document, write_config

from mxgate.core.auth import UsersFile
from mxgate.testing.postgres import PostgresServer
from mxgate.testing.sinks import ThreadedSmtpSink

pytestmark = pytest.mark.integration

psycopg = pytest.importorskip("psycopg", reason="cluster tests need the mxgate[cluster] extra")


def mxgate(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mxgate", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False
    )


def poll(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def node_config(
    directory: Path, name: str, url: str, sink: ThreadedSmtpSink, *, extra: dict[str, Any] | None = None
) -> tuple[Path, int]:
    port = free_port()
    state = directory / name
    state.mkdir(mode=0o700)
    doc = gateway_document(state, port=port, smart_host=f"127.0.0.1:{sink.port}")
    doc["server"]["hostname"] = f"{name}.gateway.test"
    doc["inbound_connector"] = [{"name": "loopback", "sender_ips": ["127.0.0.0/8"], "may_relay": True}]
    doc["cluster"] = {
        "database": url,
        "node": name,
        "heartbeat_interval": 0.5,
        "connect_timeout": 2.0,
        "auth_sync_interval": 0.2,
    }
    for section, values in (extra or {}).items():
        doc.setdefault(section, {}).update(values)
    return write_config(directory / f"{name}.toml", doc), port


@contextlib.contextmanager
def nodes(configs: list[tuple[Path, int]]) -> Iterator[list[GatewayProcess]]:
    procs = [GatewayProcess(path, path.with_suffix(".log")) for path, _ in configs]
    try:
        for proc, (_, port) in zip(procs, configs, strict=True):
            proc.start(port, timeout=40)
        yield procs
    finally:
        for proc in procs:
            proc.stop(timeout=30)


def send(port: int, rcpt: str, subject: str) -> str:
    """One message by SMTP; returns the reply to the end of DATA ("250 ...")."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("sender@client.test")
        code, _ = client.rcpt(rcpt)
        assert code == 250, code
        code, text = client.data(f"Subject: {subject}\r\n\r\nhi\r\n".encode())
        return f"{code} {text.decode()}"


def subjects(messages: Any) -> list[str]:
    return sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for m in messages)


def test_migrate_is_versioned_and_status_shows_the_schema(tmp_path: Path, postgresql_url: str) -> None:
    config = write_config(
        tmp_path / "a.toml",
        {"server": {"state_dir": str(tmp_path / "var")}, "cluster": {"database": postgresql_url, "node": "a"}},
    )
    before = mxgate("cluster", "status", "-c", str(config))
    assert before.returncode == 1
    assert "core         0/4  MIGRATE" in before.stdout
    first = mxgate("cluster", "migrate", "-c", str(config))
    assert first.returncode == 0, first.stderr
    assert "applied core 1: nodes and their heartbeats" in first.stdout
    assert "applied core 2: AUTH failures of every node" in first.stdout
    assert "applied core 3: tracking log of every node" in first.stdout
    assert "applied tlsrpt 1:" in first.stdout and "applied mta_sts 1:" in first.stdout
    again = mxgate("cluster", "migrate", "-c", str(config))
    assert again.returncode == 0 and "schema up to date" in again.stdout
    with psycopg.connect(postgresql_url) as conn:
        rows = conn.execute("SELECT component, version FROM mxgate_schema ORDER BY 1, 2").fetchall()
    assert {("core", 1), ("core", 2), ("core", 3), ("core", 4), ("mta_sts", 1), ("tlsrpt", 1)} <= set(rows)
    assert len(rows) == len(set(rows))
    after = mxgate("cluster", "status", "-c", str(config))
    assert after.returncode == 0, after.stdout + after.stderr
    assert "core         4/4  ok" in after.stdout
    assert "postgres:" not in after.stdout  # no password is ever printed (there is none here either)


def test_a_node_refuses_a_schema_older_than_its_own(tmp_path: Path, postgresql_url: str) -> None:
    config = write_config(
        tmp_path / "a.toml",
        {
            "server": {"state_dir": str(tmp_path / "var"), "hostname": "a.gateway.test"},
            "listener": [{"name": "smtp", "address": f"127.0.0.1:{free_port()}"}],
            "metrics": {"listen": ""},
            "dns": {"resolvers": [f"127.0.0.1:{free_port()}"]},
            "cluster": {"database": postgresql_url, "node": "a"},
        },
    )
    proc = mxgate("run", "-c", str(config), timeout=60)
    assert proc.returncode == 1
    assert "run `mxgate cluster migrate`" in proc.stderr


def test_the_driver_is_an_extra_named_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from mxgate.core import cluster_db
    from mxgate.core.errors import MxgateError

    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(MxgateError, match=r"pip install 'mxgate\[cluster\]'"):
        cluster_db.import_psycopg()


@pytest.mark.timeout(180)
def test_three_nodes_take_mail_and_heartbeat(
    tmp_path: Path, postgresql_url: str, threaded_smtp_sink: Callable[..., ThreadedSmtpSink]
) -> None:
    sink = threaded_smtp_sink()
    configs = [node_config(tmp_path, name, postgresql_url, sink) for name in ("mx1", "mx2")]
    # mx3 receives in a worker process (server.receive_workers): the worker joins the cluster too
    configs.append(node_config(tmp_path, "mx3", postgresql_url, sink, extra={"server": {"receive_workers": 1}}))
    assert mxgate("cluster", "migrate", "-c", str(configs[0][0])).returncode == 0
    with nodes(configs) as procs:
        replies = []
        for i, (_, port) in enumerate(configs):
            for j in range(3):
                reply = send(port, f"user{j}@example.org", f"node {i} message {j}")
                assert reply.startswith("250"), reply
                replies.append(reply)
        first_reply = replies[0]
        received = sink.wait_for(9, timeout=60)
        assert subjects(received) == sorted(f"node {i} message {j}" for i in range(3) for j in range(3))

        # the story of a message taken in by mx1, told on mx3 (each record names its node)
        queue_id = first_reply.split()[-1]

        def traced() -> str | None:
            out = mxgate("trace", queue_id, "-c", str(configs[2][0])).stdout
            return out if "DELIVER" in out else None

        story = poll(traced, 30, "mx1's records in the cluster").splitlines()
        assert {"RECEIVE", "ROUTE", "DELIVER"} <= {line.split()[2] for line in story}
        assert all(f" {queue_id} " in line and "node=mx1" in line for line in story)
        by_mid = mxgate("trace", "--message-id", "<nothing@here>", "-c", str(configs[1][0]))
        assert by_mid.returncode == 1 and "the cluster's tracking records" in by_mid.stderr

        def all_up() -> str | None:
            out = mxgate("cluster", "status", "-c", str(configs[1][0])).stdout
            up = [line for line in out.splitlines() if line.startswith("mx") and " up " in line]
            return out if len(up) == 3 else None

        status = poll(all_up, 30, "three nodes up")
        assert "PostgreSQL 1" in status
        procs[2].kill()

        def mx3_stale() -> str | None:
            out = mxgate("cluster", "status", "-c", str(configs[0][0])).stdout
            line = next(line for line in out.splitlines() if line.startswith("mx3"))
            return out if " stale " in line else None

        status = poll(mx3_stale, 30, "mx3 stale after it was killed")
        assert sum(" up " in line for line in status.splitlines()) == 2


def test_a_node_starts_and_takes_mail_while_the_database_is_away(
    tmp_path: Path, postgresql_server: PostgresServer, threaded_smtp_sink: Callable[..., ThreadedSmtpSink]
) -> None:
    sink = threaded_smtp_sink()
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    config, port = node_config(tmp_path, "mx1", dead, sink)
    with nodes([(config, port)]):
        reply = send(port, "user@example.org", "no database")
        assert reply.startswith("250"), reply
        assert len(sink.wait_for(1, timeout=30)) == 1


async def auth(port: int, password: str, source: str) -> str:
    """One AUTH PLAIN on a new connection from ``source``; returns the reply's code and enhanced code."""
    token = base64.b64encode(f"\0alice\0{password}".encode())
    client = await RawClient.connect("127.0.0.1", port, source=source, timeout=30)
    try:
        assert (await client.reply(30)).code == "220"
        await client.send(b"EHLO brute.example\r\n")
        assert (await client.reply(30)).code == "250"
        await client.send(b"AUTH PLAIN " + token + b"\r\n")
        reply = await client.reply(60)
        return reply.lines[-1][:9].decode("ascii", "replace") if reply.lines else reply.code
    finally:
        await client.close()


@pytest.mark.timeout(240)
def test_auth_failure_limit_is_cluster_wide(
    tmp_path: Path, postgresql_url: str, threaded_smtp_sink: Callable[..., ThreadedSmtpSink]
) -> None:
    sink = threaded_smtp_sink()
    configs = []
    for name in ("mx1", "mx2", "mx3"):
        path, port = node_config(tmp_path, name, postgresql_url, sink)
        UsersFile(tmp_path / name / "users").add("alice", "right horse battery staple")
        doc = tomllib.loads(path.read_text())
        doc["listener"][0].update({"allow_plaintext_auth": True, "max_errors": 50})
        configs.append((write_config(path, doc), port))
    assert mxgate("cluster", "migrate", "-c", str(configs[0][0])).returncode == 0
    with nodes(configs):
        # a brute-forcer goes round the three nodes: 15 attempts each, what three separate limits of 5 would allow
        replies = [asyncio.run(auth(configs[i % 3][1], f"guess {i}", "127.0.0.50")) for i in range(45)]
        failed = replies.count("535 5.7.8")
        limited = replies.count("454 4.7.0")
        assert failed + limited == 45, replies
        # the limit (5) plus what the nodes let through while their 0.2 s syncs catch up; alone, each would allow 5
        assert 5 <= failed <= 9, replies
        assert replies[-15:] == ["454 4.7.0"] * 15
        # another address is not punished for it, on any node
        assert asyncio.run(auth(configs[2][1], "right horse battery staple", "127.0.0.51")) == "235 2.7.0"


@pytest.mark.timeout(180)
def test_queue_list_cluster_shows_every_nodes_queue(
    tmp_path: Path, postgresql_url: str, threaded_smtp_sink: Callable[..., ThreadedSmtpSink]
) -> None:
    sink = threaded_smtp_sink()
    good, good_port = node_config(tmp_path, "mx1", postgresql_url, sink)
    stuck, stuck_port = node_config(tmp_path, "mx2", postgresql_url, sink)
    doc = tomllib.loads(stuck.read_text())
    doc["outbound_connector"][0]["smart_hosts"] = [f"127.0.0.1:{free_port()}"]  # nothing listens: deferred
    write_config(stuck, doc)
    assert mxgate("cluster", "migrate", "-c", str(good)).returncode == 0
    with nodes([(good, good_port), (stuck, stuck_port)]):
        assert send(good_port, "a@example.org", "goes through").startswith("250")
        for i in range(2):
            assert send(stuck_port, f"b{i}@example.org", "waits").startswith("250")
        sink.wait_for(1, timeout=30)

        def summaries() -> dict[str, Any] | None:
            proc = mxgate("queue", "list", "--cluster", "--json", "-c", str(good))
            assert proc.returncode == 0, proc.stderr
            rows = {r["node"]: r["queue"] for r in json.loads(proc.stdout)}
            ok = rows.get("mx1") and rows["mx1"]["messages"] == 0
            waiting = rows.get("mx2") and rows["mx2"]["messages"] == 2 and rows["mx2"]["deferred"] == 2
            return rows if ok and waiting else None

        rows = poll(summaries, 60, "both nodes' queue summaries")
        assert rows["mx2"]["recipients"]["deferred"] == 2
        table = mxgate("queue", "list", "--cluster", "-c", str(stuck)).stdout.splitlines()
        assert table[0].split()[:4] == ["NODE", "STATE", "MESSAGES", "ACTIVE"]
        assert [line.split()[:3] for line in table[1:]] == [["mx1", "up", "0"], ["mx2", "up", "2"]]


def heartbeats(config: Path) -> dict[str, float]:
    """A node's ``mxgate_cluster_heartbeats_total`` by result, from its metrics endpoint."""
    listen = tomllib.loads(config.read_text())["metrics"]["listen"]
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    found = re.findall(r'^mxgate_cluster_heartbeats_total\{result="(\w+)"\} ([0-9.e+]+)$', metrics, re.M)
    return {k: float(v) for k, v in found}


def tlsrpt_local(state: Path) -> int:
    """The sessions a node counted in its own TLS-RPT file (ground truth of what it recorded)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(state / "tlsrpt.sqlite3")) as conn:
        row = conn.execute("SELECT COALESCE(SUM(success + failure), 0) FROM policy").fetchone()
    return int(row[0])


def tlsrpt_cluster(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT COALESCE(SUM(success + failure), 0) FROM tlsrpt.policy").fetchone()
    return int(row[0])


def tracked(url: str, event: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT queue_id FROM mxgate_tracking WHERE event = %s", (event,)).fetchall()
    return [str(r[0]) for r in rows]


@pytest.mark.timeout(300)
def test_postgresql_stopped_mid_load_stops_no_mail_and_loses_no_count(
    tmp_path: Path,
    postgresql_url: str,
    postgresql_server: PostgresServer,
    threaded_smtp_sink: Callable[..., ThreadedSmtpSink],
    issue_cert: Any,
) -> None:
    sink = threaded_smtp_sink(tls=issue_cert(["sink.mxgate.test"]))
    configs = []
    for name in ("mx1", "mx2", "mx3"):
        path, port = node_config(tmp_path, name, postgresql_url, sink)
        doc = tomllib.loads(path.read_text())
        # TLS to the sink (a self-signed-to-us chain: opportunistic), no session reuse: one TLS outcome per message
        doc["outbound_connector"][0].update({"tls": "opportunistic", "connection_reuse": False})
        doc["plugins"] = {"tlsrpt": {"flush_interval": 0.5}}
        configs.append((write_config(path, doc), port))
    assert mxgate("cluster", "migrate", "-c", str(configs[0][0])).returncode == 0
    replies: list[str] = []
    with nodes(configs):

        def load(n: int, tag: str) -> None:
            for i in range(n):
                replies.append(send(configs[i % 3][1], f"user{i}@example.org", f"{tag} {i}"))

        load(15, "before")
        postgresql_server.stop()
        try:
            load(15, "during")  # the database is gone: mail flows on
            sink.wait_for(30, timeout=60)
            poll(lambda: heartbeats(configs[0][0]).get("failed"), 30, "mx1 to notice the outage")
        finally:
            postgresql_server.start()
        load(15, "after")
        assert [r[:3] for r in replies] == ["250"] * 45, replies
        received = sink.wait_for(45, timeout=90)
        assert len(received) == 45 and len(set(subjects(received))) == 45
        states = [tmp_path / name for name in ("mx1", "mx2", "mx3")]

        def caught_up() -> bool:
            local = sum(tlsrpt_local(s) for s in states)
            return local == 45 and tlsrpt_cluster(postgresql_url) == local

        poll(caught_up, 60, "TLS-RPT counts published after the outage")
        queue_ids = {r.split()[-1] for r in replies}

        def tracked_all() -> bool:
            return set(tracked(postgresql_url, "DELIVER")) == queue_ids

        poll(tracked_all, 60, "tracking records shipped after the outage")
        received_ids = tracked(postgresql_url, "RECEIVE")
        assert sorted(received_ids) == sorted(queue_ids)  # every message once: nothing lost, nothing twice
        beats = heartbeats(configs[0][0])  # the outage was visible to Prometheus; ok heartbeats again after
        assert beats.get("failed", 0) >= 1 and beats.get("ok", 0) >= 2, beats
    assert tlsrpt_cluster(postgresql_url) == 45  # and still exact after the nodes stopped (final flushes)
    # one report for the policy domain, whichever node is asked, with the sum of the three nodes' sessions
    today = time.strftime("%Y-%m-%d", time.gmtime())
    show = mxgate("tlsrpt", "show", "--date", today, "-c", str(configs[1][0]))
    assert show.returncode == 0, show.stderr
    assert show.stdout.count("# ") == 1  # one policy domain: the smart host's (RFC 8460 4.3), "127.0.0.1" here
    doc = json.loads(show.stdout.split("\n", 1)[1])
    assert (
        sum(p["summary"]["total-successful-session-count"] for p in doc["policies"])
        + sum(p["summary"]["total-failure-session-count"] for p in doc["policies"])
        == 45
    )
