"""Operator tools against a running gateway: trace by the id of our Received: header (issue 23)."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from mxgate.testing.gateway import TestGateway

pytestmark = [pytest.mark.integration]

Start = Callable[..., Awaitable[TestGateway]]
BASE = '[server]\naccepted_domains = ["example.org"]\n'


async def run_mxgate(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mxgate", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def swaks(gw: TestGateway, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "swaks", "--server", f"{gw.smtp_host}:{gw.smtp_port}", "--timeout", "10", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out
    return out.decode("utf-8", "replace")


def cli_config(gw: TestGateway, tmp_path: Path) -> str:
    path = tmp_path / "cli.toml"
    path.write_text(f'[server]\nstate_dir = "{gw.state_dir}"\n')
    return str(path)


async def test_the_received_header_id_is_traceable(mxgate_gateway: Start, tmp_path: Path) -> None:
    gw = await mxgate_gateway(BASE)
    out = await swaks(gw, "--from", "a@example.net", "--to", "rcpt@example.org")
    await swaks(gw, "--from", "b@example.net", "--to", "rcpt@example.org")
    queue_id = re.search(r"queued as (\S+)", out).group(1)  # type: ignore[union-attr]
    body = await gw.runtime.queue.body(queue_id)  # type: ignore[union-attr]
    received_id = re.search(rb"with ESMTP id (\S+)", body).group(1).decode()  # type: ignore[union-attr]
    assert received_id != queue_id  # the header is written before the queue names the message
    conf = cli_config(gw, tmp_path)
    # the first delivery attempt (no MX here: deferred) writes its records in the background: let it finish, so
    # that the story does not grow between the commands compared below (bounded poll)
    deadline = time.monotonic() + 30
    while True:
        gw.runtime.tracking.flush()
        code, by_queue_id, _ = await run_mxgate("trace", queue_id, "-c", conf)
        if " DEFER " in by_queue_id:
            break
        assert time.monotonic() < deadline, by_queue_id
        await asyncio.sleep(0.1)
    code, by_received, err = await run_mxgate("trace", received_id, "-c", conf)
    assert code == 0, err
    code, by_queue_id, _ = await run_mxgate("trace", queue_id, "-c", conf)
    assert by_received == by_queue_id and f" RECEIVE  {queue_id} " in by_received
    assert "b@example.net" not in by_received
    code, by_from, _ = await run_mxgate("trace", "--from", "A@example.net", "--since", "1h", "-c", conf)
    assert code == 0 and by_from == by_queue_id


async def test_start_warns_about_connectors_that_match_the_same_clients(
    mxgate_gateway: Start, caplog: pytest.LogCaptureFixture
) -> None:
    twins = (  # not the same sender_ips (that is a configuration error), but a network in common
        '[[inbound_connector]]\nname = "a"\nsender_ips = ["10.9.0.0/16", "192.0.2.0/24"]\n'
        '[[inbound_connector]]\nname = "b"\nsender_ips = ["10.9.0.0/16"]\n'
    )
    with caplog.at_level("WARNING"):
        await mxgate_gateway(BASE + twins)
    warned = [r.getMessage() for r in caplog.records if "never applies" in r.getMessage()]
    assert warned == [
        "inbound_connector[0] 'a' and inbound_connector[1] 'b' both match clients from 10.9.0.0/16: "
        "'a' (listed first) always wins, 'b' never applies to them"
    ]


async def test_reload_warns_about_connectors_that_match_the_same_clients(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import tomli_w

    from mxgate.core import bootstrap, engine
    from mxgate.testing.gateway import free_port

    doc: dict[str, object] = {
        "server": {"state_dir": str(tmp_path / "state"), "accepted_domains": ["example.org"]},
        "listener": [{"name": "smtp", "address": f"127.0.0.1:{free_port()}"}],
        "dns": {"resolvers": [f"127.0.0.1:{free_port()}"], "timeout": 0.5},
        "metrics": {"listen": ""},
        "inbound_connector": [{"name": "a", "sender_ips": ["10.9.0.0/16", "192.0.2.0/24"]}],
    }
    path = tmp_path / "mxgate.toml"
    path.write_text(tomli_w.dumps(doc))
    source = bootstrap.read_source(path)
    config, plugins = bootstrap.load_source(source, entry_points=False)
    gateway = engine.Gateway(config, plugins, source=source)
    await gateway.start()
    try:
        doc["inbound_connector"] = [
            {"name": "a", "sender_ips": ["10.9.0.0/16", "192.0.2.0/24"]},
            {"name": "b", "sender_ips": ["10.9.0.0/16"]},  # shares a network with "a": valid, but shadowed
        ]
        path.write_text(tomli_w.dumps(doc))
        with caplog.at_level("WARNING"):
            status = await gateway.reload()
        assert status["ok"], status
        assert [r.getMessage() for r in caplog.records if "never applies" in r.getMessage()] == [
            "inbound_connector[0] 'a' and inbound_connector[1] 'b' both match clients from 10.9.0.0/16: "
            "'a' (listed first) always wins, 'b' never applies to them"
        ]
    finally:
        await gateway.stop(timeout=5.0)
