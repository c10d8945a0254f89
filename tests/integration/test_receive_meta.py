"""Receive-time metadata reaches the queue typed: what the gateway knows about the transaction (``MessageMeta``)
and what receive hooks keep with the message (``IncomingMessage.set_meta``), in one process and through a receive
worker (the pipe to the main process carries it)."""

from __future__ import annotations

import asyncio
import os
import smtplib
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import tomli_w
from smtp_raw import queued

from mxgate import MessageMeta
from mxgate.core.queue.store import QueueStore
from mxgate.testing.gateway import TestGateway, free_port

pytestmark = [pytest.mark.integration]

Start = Callable[..., Awaitable[TestGateway]]
REPO = Path(__file__).resolve().parents[2]

PLUGIN = textwrap.dedent(
    """
    from mxgate import hookimpl


    class Tagger:
        name = "tagger"

        @hookimpl
        def mxgate_receive_on_end_of_headers(self, message):
            message.set_meta("tagger.subject", message.get_header("Subject") or "")
            message.set_meta("tagger.stage", "headers")

        @hookimpl
        async def mxgate_receive_on_end_of_data(self, session, message):
            message.set_meta("tagger.stage", "data")  # replaces the value set at end of headers
            message.set_meta("tagger.connector", session.connector or "")
    """
)


def send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.example")
        client.sendmail(
            "a@example.net", ["b@example.org"], b"Subject: tagged\r\n\r\n\xc3\xa9\r\n", mail_options=["BODY=8BITMIME"]
        )


def check(meta: MessageMeta) -> None:
    assert isinstance(meta, MessageMeta)
    assert (meta.listener, meta.inbound_connector, meta.client_ip, meta.helo) == (
        "smtp",
        "localhost",
        "127.0.0.1",
        "client.example",
    )
    assert meta.body_8bit and not meta.smtputf8 and meta.auth_user is None and meta.tls_version is None
    assert meta.session and meta.dsn_for is None and not meta.categorized
    assert meta.extra == {"tagger.subject": "tagged", "tagger.stage": "data", "tagger.connector": "localhost"}


async def test_in_one_process(mxgate_gateway: Start, tmp_path: Path) -> None:
    plugin = tmp_path / "tagger.py"
    plugin.write_text(PLUGIN)
    gw = await mxgate_gateway(f'[server]\naccepted_domains = ["example.org"]\n[plugins]\nload = ["{plugin}:Tagger"]\n')
    await asyncio.to_thread(send, gw.smtp_port)
    async with asyncio.timeout(10):
        while not (msgs := await queued(gw)):
            await asyncio.sleep(0.02)
    (msg,) = msgs
    check(msg.meta)


@pytest.mark.timeout(120)
async def test_through_a_receive_worker(tmp_path: Path) -> None:
    """``mxgate run`` with one receive worker: the worker receives, the main process queues what it sent over."""
    plugin = tmp_path / "tagger.py"
    plugin.write_text(PLUGIN)
    port, state = free_port(), tmp_path / "state"
    doc = {
        "server": {"hostname": "mx.gateway.test", "state_dir": str(state), "accepted_domains": ["example.org"],
                   "receive_workers": 1},
        "listener": [{"name": "smtp", "address": f"127.0.0.1:{port}"}],
        "inbound_connector": [{"name": "localhost", "sender_ips": ["127.0.0.0/8"], "may_relay": True}],
        "outbound_connector": [{"name": "inside", "recipient_domains": ["*"], "tls": "none", "retry_first": 600.0,
                                "smart_hosts": [f"127.0.0.1:{free_port()}"]}],  # closed: the message stays queued
        "plugins": {"load": [f"{plugin}:Tagger"]},
        "dns": {"resolvers": [f"127.0.0.1:{free_port()}"], "timeout": 0.5},
        "metrics": {"listen": ""},
    }  # fmt: skip
    config = tmp_path / "mxgate.toml"
    config.write_text(tomli_w.dumps(doc))
    log = tmp_path / "gateway.log"
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mxgate", "run", "-c", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environ,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:  # the worker's greeting
            assert proc.poll() is None, log.read_text()
            try:
                await asyncio.to_thread(send, port)
                break
            except (OSError, smtplib.SMTPException):
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.1)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 60)
    store = await QueueStore.open(state, release_leases=False)
    try:
        (msg,) = await store.list()
        check(msg.meta)
    finally:
        await store.close()
