"""Every CLI command through a subprocess, as an operator runs it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mxgate.core.tracking import TrackEvent, TrackingLog

ROOT = Path(__file__).resolve().parents[2]


def mxgate(*args: str, cwd: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mxgate", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        input=stdin,
        timeout=60,
    )


def test_help_lists_commands() -> None:
    out = mxgate("--help")
    assert out.returncode == 0
    for command in ("run", "config", "plugins", "trace", "version"):
        assert command in out.stdout
    assert "127.0.0.1:2525" in out.stdout and "127.0.0.1:9925" in out.stdout


def test_version() -> None:
    out = mxgate("version")
    assert out.returncode == 0 and out.stdout.startswith("mxgate 0.")


def test_config_check_valid_and_invalid(tmp_path: Path) -> None:
    good = mxgate("config", "check")
    assert good.returncode == 0, good.stderr
    assert "<built-in default>: OK" in good.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nmax_recipients = "many"\n[[listener]]\nname = "x"\nadress = "1.2.3.4:25"\n')
    out = mxgate("config", "check", str(bad))
    assert out.returncode == 1
    assert f"error: {bad}: server.max_recipients: expected a whole number, got a string ('many')" in out.stderr
    assert f"error: {bad}: listener[0].adress: unknown key 'adress'; did you mean 'address'?" in out.stderr
    assert f"error: {bad}: listener[0].address: missing;" in out.stderr
    assert "3 configuration error(s)" in out.stderr


def test_config_init_writes_a_valid_commented_default(tmp_path: Path) -> None:
    target = tmp_path / "mxgate.toml"
    out = mxgate("config", "init", str(target))
    assert out.returncode == 0, out.stderr
    text = target.read_text()
    assert "# Our host name" in text and '# dane = "opportunistic"' in text and "[plugins.tlsrpt]" in text
    assert mxgate("config", "check", str(target)).returncode == 0
    again = mxgate("config", "init", str(target))
    assert again.returncode == 1 and "exists" in again.stderr
    # the written file says what the built-in default says
    shown_file = mxgate("config", "show", "--json", str(target))
    shown_builtin = mxgate("config", "show", "--json")
    doc_file, doc_builtin = json.loads(shown_file.stdout), json.loads(shown_builtin.stdout)
    assert doc_file == doc_builtin


def test_config_show_prints_defaults(tmp_path: Path) -> None:
    path = tmp_path / "mx.toml"
    path.write_text(
        '[server]\nhostname = "mx.example.org"\n[[outbound_connector]]\nname = "p"\n'
        'recipient_domains = ["partner.example"]\nsmart_hosts = ["mx.partner.example"]\ndane = "mandatory"\n'
    )
    out = mxgate("config", "show", str(path))
    assert out.returncode == 0, out.stderr
    doc = tomllib.loads(out.stdout)
    assert doc["server"]["hostname"] == "mx.example.org"
    assert doc["server"]["max_message_size"] == 52428800
    assert doc["outbound_connector"][0]["tls"] == "opportunistic"
    assert doc["outbound_connector"][0]["dane"] == "mandatory"


def test_plugins_lists_builtins(tmp_path: Path) -> None:
    path = tmp_path / "mx.toml"
    path.write_text('[plugins]\ndisable = ["prometheus"]\n[plugins.priority]\ntlsrpt = 3\n')
    out = mxgate("plugins", "--config", str(path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "SOURCE", "PRIORITY", "ENABLED"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["tlsrpt"][1:4] == ["builtin", "3", "yes"]
    assert rows["prometheus"][3] == "no"
    assert rows["core"][1] == "essential"
    assert lines[1].split()[0] == "tlsrpt"  # priority 3 sorts first


async def test_tracking_log_writes_one_loop_iteration_together(tmp_path: Path) -> None:
    log = TrackingLog(tmp_path)
    try:
        log.write(TrackEvent.RECEIVE, queue_id="Q1")
        log.write(TrackEvent.ROUTE, queue_id="Q1")
        assert log.path.read_text() == ""  # inside the loop: written when this iteration ends
        await asyncio.sleep(0)
        assert [json.loads(x)["event"] for x in log.path.read_text().splitlines()] == ["RECEIVE", "ROUTE"]
        log.write(TrackEvent.DELIVER, queue_id="Q1")
    finally:
        log.close()  # closing writes what is pending
    assert [json.loads(x)["event"] for x in log.path.read_text().splitlines()] == ["RECEIVE", "ROUTE", "DELIVER"]


def test_tracking_log_outside_a_loop_writes_at_once(tmp_path: Path) -> None:
    log = TrackingLog(tmp_path)
    log.write(TrackEvent.RECEIVE, queue_id="Q1")
    assert json.loads(log.path.read_text())["queue_id"] == "Q1"
    log.close()


def test_trace_by_queue_id_and_message_id(tmp_path: Path) -> None:
    state = tmp_path / "var"
    state.mkdir()
    log = TrackingLog(state, clock=iter([1.0, 2.0, 3.0]).__next__)
    log.write(TrackEvent.RECEIVE, queue_id="Q1", message_id="<m1@example.org>", client="192.0.2.1")
    log.write(TrackEvent.RECEIVE, queue_id="Q2", message_id="<m2@example.org>")
    log.write(TrackEvent.DELIVER, queue_id="Q1", recipient="a@example.net", mx="mx.example.net")
    log.close()
    path = tmp_path / "mx.toml"
    path.write_text(f'[server]\nstate_dir = "{state}"\n')
    by_id = mxgate("trace", "Q1", "--config", str(path))
    assert by_id.returncode == 0, by_id.stderr
    assert [line.split()[2] for line in by_id.stdout.splitlines()] == ["RECEIVE", "DELIVER"]
    by_mid = mxgate("trace", "--message-id", "m1@example.org", "--config", str(path))
    assert by_mid.stdout == by_id.stdout
    by_mid = mxgate("trace", "--message-id", "<m1@example.org>", "--config", str(path))
    assert by_mid.stdout == by_id.stdout
    not_a_qid = mxgate("trace", "m1@example.org", "--config", str(path))  # a Message-ID is not a queue id
    assert not_a_qid.returncode == 1 and "--message-id" in not_a_qid.stderr
    missing = mxgate("trace", "nope", "--config", str(path))
    assert missing.returncode == 1 and "no tracking records" in missing.stderr
    assert mxgate("trace", "--config", str(path)).returncode == 2
    assert mxgate("trace", "Q1", "--message-id", "m1@example.org", "--config", str(path)).returncode == 2


def test_trace_escapes_and_quotes_what_came_from_the_network(tmp_path: Path) -> None:
    state = tmp_path / "var"
    state.mkdir()
    log = TrackingLog(state, clock=iter([1.0, 2.0, 3.0]).__next__)
    forged = '"pad client=10.9.8.7 auth_user=admin"@ext.test'
    log.write(
        TrackEvent.RECEIVE, queue_id="Q1", message_id="Q2", client="192.0.2.1", sender=forged, helo="a\x1b]0;pwned\x07b"
    )
    log.write(TrackEvent.RECEIVE, queue_id="Q2", message_id="<m2@example.org>", sender="\u202egro.elpmaxe@x")
    log.close()
    path = tmp_path / "mx.toml"
    path.write_text(f'[server]\nstate_dir = "{state}"\n')
    q1 = mxgate("trace", "Q1", "--config", str(path)).stdout
    assert "\x1b" not in q1 and "\x07" not in q1 and "\\x1b]0;pwned\\x07" in q1
    assert 'sender="\\"pad client=10.9.8.7 auth_user=admin\\"@ext.test"' in q1
    fields = re.findall(r' ([a-z_]+)=("(?:[^"\\]|\\.)*"|[^ "]*)(?= |$)', q1.strip())
    assert [k for k, _ in fields] == ["client", "sender", "helo"]  # the sender did not add fields
    assert dict(fields)["client"] == "192.0.2.1"
    q2 = mxgate("trace", "Q2", "--config", str(path)).stdout  # Q1's Message-ID is "Q2": not Q2's story
    assert len(q2.splitlines()) == 1 and "\u202e" not in q2 and "\\u202e" in q2
    by_mid = mxgate("trace", "--message-id", "Q2", "--config", str(path)).stdout
    assert len(by_mid.splitlines()) == 1 and " Q1 " in by_mid


def test_invalid_config_for_any_command(tmp_path: Path) -> None:
    path = tmp_path / "mx.toml"
    path.write_text("[server\n")
    out = mxgate("plugins", "--config", str(path))
    assert out.returncode == 1 and "TOML syntax error" in out.stderr


EXAMPLE_CONFIGS = sorted(p for p in (ROOT / "examples").rglob("*.toml") if p.name != "pyproject.toml")


def test_there_are_example_configs() -> None:
    assert len(EXAMPLE_CONFIGS) >= 1


@pytest.mark.parametrize("config", EXAMPLE_CONFIGS, ids=lambda p: p.name)
def test_examples_pass_config_check(config: Path) -> None:
    out = mxgate("config", "check", str(config), cwd=config.parent)
    assert out.returncode == 0, out.stderr


def test_trace_searches_by_sender_recipient_client_and_time(tmp_path: Path) -> None:
    state = tmp_path / "var"
    state.mkdir()
    day = 1_796_601_600.0  # 2026-12-07T00:00:00Z
    log = TrackingLog(state, clock=iter([day + 60 * n for n in range(20)]).__next__)
    log.write(TrackEvent.RECEIVE, queue_id="Q1", sender="alice@ext.test", client="192.0.2.1", received_id="s1.1")
    log.write(TrackEvent.RECEIVE, queue_id="Q2", sender="bob@ext.test", client="192.0.2.2", received_id="s2.1")
    log.write(TrackEvent.ROUTE, queue_id="Q1", recipient="carol@contoso.test", connector="exo")
    log.write(TrackEvent.ROUTE, queue_id="Q2", recipient="dave@contoso.test", connector="exo")
    log.write(TrackEvent.REJECT, stage="rcpt", client="192.0.2.1", sender="alice@ext.test", recipient="x@contoso.test")
    log.write(TrackEvent.DELIVER, queue_id="Q2", recipient="dave@contoso.test", mx="mx.contoso.test")
    log.write(TrackEvent.RECEIVE, queue_id="Q3", sender="", client="192.0.2.1")  # a bounce, at 00:06
    log.write(TrackEvent.RECEIVE, queue_id="Q4", sender="x@ext.test", client="2001:db8::1")
    log.close()
    path = tmp_path / "mx.toml"
    path.write_text(f'[server]\nstate_dir = "{state}"\n')

    def search(*args: str) -> list[tuple[str, str]]:
        res = mxgate("trace", *args, "--config", str(path))
        assert res.returncode in (0, 1), res.stderr
        return [(line.split()[2], line.split()[3]) for line in res.stdout.splitlines()]

    assert search("--from", "<Alice@Ext.test>") == [
        ("RECEIVE", "Q1"), ("ROUTE", "Q1"), ("REJECT", "-")
    ]  # fmt: skip
    assert search("--to", "dave@contoso.test") == [("RECEIVE", "Q2"), ("ROUTE", "Q2"), ("DELIVER", "Q2")]
    assert search("--client", "192.0.2.1", "--to", "carol@contoso.test") == [("RECEIVE", "Q1"), ("ROUTE", "Q1")]
    assert search("--client", "192.0.2.1", "--since", "2026-12-07T00:04") == [("REJECT", "-"), ("RECEIVE", "Q3")]
    assert search("--from", "<>") == [("RECEIVE", "Q3")]
    assert search("--client", "[IPv6:2001:DB8::0:1]") == [("RECEIVE", "Q4")]  # one spelling of an address
    assert search("--from", "alice@ext.test", "--to", "dave@contoso.test") == []
    assert search("s2.1") == [("RECEIVE", "Q2"), ("ROUTE", "Q2"), ("DELIVER", "Q2")]  # the Received: header's id
    none = mxgate("trace", "--from", "nobody@ext.test", "--config", str(path))
    assert none.returncode == 1 and "no tracking records match" in none.stderr
    bad = mxgate("trace", "--since", "yesterday", "--config", str(path))
    assert bad.returncode == 2 and "ISO time" in bad.stderr
    assert mxgate("trace", "Q1", "--from", "alice@ext.test", "--config", str(path)).returncode == 2
    assert mxgate("trace", "--message-id", "m", "--to", "a@b", "--config", str(path)).returncode == 2


def _queue_with(state: Path, messages: list[tuple[str, list[str], float]]) -> list[str]:
    from mxgate.core.queue.store import QueueStore

    async def fill() -> list[str]:
        store = await QueueStore.open(state)
        try:
            return [await store.put(s, r, b"Subject: x\r\n\r\nx\r\n", now=at) for s, r, at in messages]
        finally:
            await store.close()

    return asyncio.run(fill())


def test_queue_commands_take_filters_and_record_who_did_what(tmp_path: Path) -> None:
    import pwd
    import time

    from mxgate.core.tracking import read_records

    state = tmp_path / "var"
    now = time.time()
    old, new, bounce = _queue_with(
        state,
        [
            ("spam@ext.test", ["a@contoso.test"], now - 3 * 3600),
            ("Spam@Ext.test", ["b@contoso.test", "a@contoso.test"], now - 60),
            ("", ["c@contoso.test"], now - 60),
        ],
    )
    path = tmp_path / "mx.toml"
    path.write_text(f'[server]\nstate_dir = "{state}"\n')

    def queue(*args: str) -> subprocess.CompletedProcess[str]:
        return mxgate("queue", *args, "--config", str(path))

    listed = queue("list", "--to", "A@contoso.test", "--json")
    assert [r["id"] for r in json.loads(listed.stdout)] == [old, new]
    assert "no queued message matches" in queue("list", "--from", "nobody@ext.test").stdout
    held = queue("hold", "--from", "spam@ext.test", "--older-than", "1h")
    assert held.returncode == 0, held.stderr
    assert held.stdout.splitlines() == [f"{old}: held", "1 message(s) held"]
    rows = {r["id"]: r["state"] for r in json.loads(queue("list", "--json").stdout)}
    assert rows == {old: "held", new: "queued", bounce: "queued"}
    assert queue("release", old).returncode == 0
    deleted = queue("delete", "--from", "<>")
    assert deleted.returncode == 0 and deleted.stdout.splitlines()[0] == f"{bounce}: deleted"
    assert queue("flush", "--to", "b@contoso.test").stdout.startswith(f"{new}: ")
    assert queue("delete", "--from", "<>").returncode == 1  # nothing matches any more
    refused = queue("delete")  # no ids, no filter: refused, nothing deleted
    assert refused.returncode == 2 and "--all" in refused.stderr
    assert queue("hold", old, "--all").returncode == 2
    missing = queue("hold", "NOPE")
    assert missing.returncode == 1 and "no message 'NOPE'" in missing.stderr
    assert len(json.loads(queue("list", "--json").stdout)) == 2

    admin = [r for r in read_records(state) if r.event == "ADMIN"]
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert [(r.queue_id, r.get("action")) for r in admin] == [
        (old, "held"), (old, "released"), (bounce, "deleted"), (new, "flushed")
    ]  # fmt: skip
    assert all(r.get("by") == me and r.get("via") == "mxgate queue" for r in admin)
    story = mxgate("trace", old, "--config", str(path)).stdout
    assert "ADMIN" in story and f"by={me}" in story and "action=held" in story


def test_trace_shows_times_and_counts_in_words(tmp_path: Path) -> None:
    state = tmp_path / "var"
    state.mkdir()
    log = TrackingLog(state, clock=iter([1_796_601_600.0, 1_796_601_601.5]).__next__)
    log.write(TrackEvent.ATTEMPT, queue_id="Q1", results={"failed": 1, "delivered": 2}, mx="mx.contoso.test")
    log.write(TrackEvent.DEFER, queue_id="Q1", recipient="a@contoso.test", next_attempt=1_796_602_500.25)
    log.close()
    path = tmp_path / "mx.toml"
    path.write_text(f'[server]\nstate_dir = "{state}"\n')
    out = mxgate("trace", "Q1", "--config", str(path)).stdout
    assert 'results="1 failed, 2 delivered"' in out and "{" not in out
    assert "next_attempt=2026-12-07T00:15:00Z" in out and "1796602500" not in out
    assert out.startswith("2026-12-07 00:00:00.000Z ATTEMPT")


def test_config_check_warns_about_connectors_that_match_the_same_clients(tmp_path: Path) -> None:
    path = tmp_path / "mx.toml"
    connectors = (
        '[[inbound_connector]]\nname = "exo"\nsender_ips = ["10.1.0.0/16", "192.0.2.0/24"]\nmay_relay = true\n'
        '[[inbound_connector]]\nname = "exo-copy"\nsender_ips = ["10.1.0.0/16"]\n'
        '[[inbound_connector]]\nname = "partner"\nsender_ips = ["10.1.0.0/16"]\n'
        'tls_sender_certificate_name = "mail.partner.test"\n'  # a certificate match ranks above: no tie
        '[[inbound_connector]]\nname = "cert-a"\ntls_sender_certificate_name = "mx.other.test"\n'
        '[[inbound_connector]]\nname = "cert-b"\ntls_sender_certificate_name = "MX.other.test."\n'
        '[[inbound_connector]]\nname = "narrow"\nsender_ips = ["10.1.2.0/24"]\n'  # more specific: wins its /24
    )
    path.write_text(f'[server]\nstate_dir = "{tmp_path / "var"}"\n' + connectors)
    res = mxgate("config", "check", str(path))
    assert res.returncode == 0 and ": OK (" in res.stdout
    assert res.stderr.splitlines() == [
        "warning: inbound_connector[0] 'exo' and inbound_connector[1] 'exo-copy' both match clients from "
        "10.1.0.0/16: 'exo' (listed first) always wins, 'exo-copy' never applies to them",
        "warning: inbound_connector[3] 'cert-a' and inbound_connector[4] 'cert-b' both match clients presenting "
        "certificate mx.other.test: 'cert-a' (listed first) always wins, 'cert-b' never applies to them",
    ]


def test_config_check_warns_about_auth_on_port_25(tmp_path: Path) -> None:
    certs = ROOT / "examples" / "edge-exchange-online" / "certs"
    listener = (
        f'[[listener]]\nname = "mx"\naddress = "[::]:25"\ntls_cert = "{certs / "mx1.example.org.pem"}"\n'
        f'tls_key = "{certs / "mx1.example.org.key"}"\n'
    )
    path = tmp_path / "mx.toml"
    path.write_text(f'[server]\nstate_dir = "{tmp_path / "var"}"\n' + listener)
    res = mxgate("config", "check", str(path))
    assert res.returncode == 0 and res.stderr.startswith("warning: listener[0] 'mx' on port 25 offers AUTH"), res
    path.write_text(f'[server]\nstate_dir = "{tmp_path / "var"}"\n' + listener + "auth = false\n")
    res = mxgate("config", "check", str(path))
    assert res.returncode == 0 and res.stderr == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a command as root on another user's state")
def test_queue_command_as_root_leaves_the_tracking_log_to_the_gateways_user(tmp_path: Path) -> None:
    state = tmp_path / "var"
    [qid] = _queue_with(state, [("a@ext.test", ["b@contoso.test"], 1_796_601_600.0)])
    os.chown(state, 65534, 65534)  # the gateway runs as server.user (nobody here); no tracking log yet
    path = tmp_path / "mx.toml"
    path.write_text(f'[server]\nstate_dir = "{state}"\n')
    assert mxgate("queue", "hold", qid, "--config", str(path)).returncode == 0
    log = state / "tracking.jsonl"
    assert (log.stat().st_uid, log.stat().st_gid) == (65534, 65534)
    assert log.stat().st_mode & 0o777 == 0o600


def test_config_show_says_what_receive_workers_auto_decided(tmp_path: Path) -> None:
    from mxgate.core import checks

    out = mxgate("config", "show")
    assert out.returncode == 0, out.stderr
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("receive_workers")]
    decided = checks.auto_receive_workers()
    assert line == (
        f'receive_workers = "auto"  # {decided} on this machine: one per spare core '
        f"({checks.usable_cpus()} usable), at most {checks.RECEIVE_WORKERS_AUTO_MAX}"
    )
    assert tomllib.loads(out.stdout)["server"]["receive_workers"] == "auto"  # still valid TOML, still portable
    path = tmp_path / "two.toml"
    path.write_text("[server]\nreceive_workers = 2\n")
    out = mxgate("config", "show", str(path))
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("receive_workers")]
    assert line == "receive_workers = 2"


def test_receive_workers_auto_is_none_on_one_core() -> None:
    """Pinned to one core (CPU affinity, as `taskset -c 0` or a container's cpuset would), "auto" starts no worker."""
    import os

    one = min(os.sched_getaffinity(0))
    out = subprocess.run(
        [sys.executable, "-m", "mxgate", "config", "show"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=lambda: os.sched_setaffinity(0, {one}),
    )
    assert out.returncode == 0, out.stderr
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("receive_workers")]
    assert '"auto"  # 0 on this machine: one per spare core (1 usable)' in line
