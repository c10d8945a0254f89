"""``mxgate connector validate NAME --to ADDRESS``: send a test message through one outbound connector now and
print what happened (next hop chosen, TLS version and cipher, verification result, SMTP replies)."""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from email.utils import formatdate

from mxgate.core import checks
from mxgate.core.commands import add_config_arg, load_from_args
from mxgate.core.delivery import Deliverer, OutgoingMessage
from mxgate.core.dns import resolver_from_config
from mxgate.core.outcomes import Destination
from mxgate.core.runtime import ROLE_COMMAND, Runtime
from mxgate.core.textsafe import escape


def _message(sender: str, to: str, connector: str, hostname: str) -> bytes:
    lines = [
        f"From: <{sender}>",
        f"To: <{to}>",
        f"Subject: mxgate connector validate {connector}",
        f"Date: {formatdate(localtime=False)}",
        f"Message-ID: <{uuid.uuid4().hex}@{hostname}>",
        "Auto-Submitted: auto-generated",
        "",
        f"Test message sent by `mxgate connector validate {connector}` from {hostname}.",
        "",
    ]
    return "\r\n".join(lines).encode("utf-8")


def cmd_validate(args: argparse.Namespace) -> int:
    config, plugins = load_from_args(args)
    connector = config.outbound(args.name)
    if connector is None:
        names = ", ".join(c.name for c in config.outbound_connector) or "none"
        print(f"mxgate: no outbound connector {args.name!r} (configured: {names})")
        return 1
    to = args.to
    domain = to.rpartition("@")[2].lower()
    sender = args.sender if args.sender is not None else f"postmaster@{config.server.hostname}"

    async def run() -> int:
        # not the gateway: plugins start no listener or service (a running gateway may hold the metrics port)
        runtime = Runtime.create(config, plugins, role=ROLE_COMMAND)
        runtime.resolver = resolver_from_config(config.dns)
        await runtime.hooks.on_startup(runtime)

        if connector.smart_hosts:
            dest = Destination(
                connector,
                checks.split_hostport(connector.smart_hosts[0], connector.port)[0],
                connector.smart_hosts,
            )
        else:
            dest = Destination(connector, domain)
        data = _message(sender, to, connector.name, config.server.hostname)
        msg = OutgoingMessage("validate", sender, (to,), data, received_at=time.time())
        try:
            result = await Deliverer(runtime, reuse=False).deliver(dest, msg)
        finally:
            for task in runtime.tasks:
                task.cancel()
            await asyncio.gather(*runtime.tasks, return_exceptions=True)
            await runtime.hooks.on_shutdown(runtime)
            runtime.tracking.close()
        print(
            f"connector {connector.name}: destination {escape(dest.domain)}"
            + (" (smart hosts)" if dest.smart_hosts else "")
        )
        for step in result.steps:
            print(f"  {escape(step)}")  # steps and transcript carry the remote server's words
        if args.verbose:
            print("transcript:")
            for line in result.transcript:
                print(f"  {escape(line)}")
        ok = all(o.result == "delivered" for o in result.outcomes)
        print(
            "result: " + ("delivered" if ok else ", ".join(f"{o.result} ({escape(o.reply)})" for o in result.outcomes))
        )
        return 0 if ok else 1

    return asyncio.run(run())


def register_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]

    p_conn = subparsers.add_parser("connector", help="outbound connector tools")
    csub = p_conn.add_subparsers(dest="connector_command", metavar="ACTION", required=True)
    p = csub.add_parser("validate", help="send a test message through a connector now and show what happened")
    p.add_argument("name", help="outbound connector name")
    p.add_argument("--to", required=True, help="recipient address of the test message")
    p.add_argument("--from", dest="sender", default=None, help="envelope sender (default postmaster@hostname)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the SMTP transcript too")
    add_config_arg(p)
    p.set_defaults(func=cmd_validate)
