"""``mxgate tlsrpt show|send|received``: a day's report, sending it now, the reports others sent us.

Each command runs on a command runtime (:func:`mxgate.command_runtime`): ``send`` queues mailed reports
through :meth:`mxgate.Runtime.submit` like the running gateway, and in a cluster every command reads the shared
store. Text that came from the network (reporters' names, remote errors) is escaped before it is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import sys
import time
from collections.abc import Awaitable, Callable

import mxgate.plugins.tlsrpt.report as rpt
from mxgate import add_config_arg, command_runtime, escape, load_from_args
from mxgate.plugins.tlsrpt.collect import DAY
from mxgate.plugins.tlsrpt.service import TlsRptService, service_for

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``mxgate tlsrpt`` and its subcommands."""
    p = subparsers.add_parser("tlsrpt", help="TLS-RPT (RFC 8460): show and send reports, list received ones")
    sub = p.add_subparsers(dest="tlsrpt_command", required=True)
    show = sub.add_parser("show", help="print the report that would be sent for a day")
    add_config_arg(show)
    show.add_argument("--date", help="UTC day YYYY-MM-DD (default: yesterday)")
    show.add_argument("--domain", help="policy domain (default: every domain with data)")
    show.set_defaults(func=_cmd_show)
    send = sub.add_parser("send", help="send a day's reports now")
    add_config_arg(send)
    send.add_argument("--date", required=True, help="UTC day YYYY-MM-DD (a full day in the past)")
    send.add_argument("--domain", help="only this policy domain")
    send.set_defaults(func=_cmd_send)
    received = sub.add_parser("received", help="reports others sent us: failures per reporter")
    add_config_arg(received)
    received.add_argument("--days", type=int, default=7, help="look back this many days (default 7)")
    received.set_defaults(func=_cmd_received)


def _run(args: argparse.Namespace, body: Callable[[TlsRptService], Awaitable[int]], *, send: bool = False) -> int:
    """Run ``body`` with the configured service on a command runtime (``send``: with the queue and DNS)."""
    config, plugins = load_from_args(args)

    async def run() -> int:
        async with command_runtime(config, plugins, start=False, queue=send, resolver=send) as runtime:
            service = service_for(runtime)
            try:
                return await body(service)
            finally:
                await service.close()

    return asyncio.run(run())


def _day_arg(value: str | None) -> str:
    if value is None:
        return rpt.utc_day(time.time() - DAY)
    return _dt.date.fromisoformat(value).isoformat()


def _json_for_terminal(doc: object) -> str:
    """``doc`` as indented JSON that is safe on a terminal and still valid JSON: ``ensure_ascii`` writes every
    control and non-ASCII character (bidi overrides included) as ``\\uXXXX``, except DEL, which is done here. MX
    names and remote errors in a report come from the network."""
    return json.dumps(doc, indent=2, ensure_ascii=True).replace("\x7f", "\\u007f")


def _cmd_show(args: argparse.Namespace) -> int:
    day = _day_arg(args.date)

    async def show(service: TlsRptService) -> int:
        domains = [args.domain.lower().rstrip(".")] if args.domain else await service.domains(day)
        shown = 0
        for domain in domains:
            doc = await service.preview(day, domain)
            if doc is None:
                continue
            print(escape(f"# {rpt.report_filename(service.submitter, domain, day)}"))
            print(_json_for_terminal(doc))
            shown += 1
        if not shown:
            print(f"no TLS outcomes recorded for {day}", file=sys.stderr)
        return 0

    return _run(args, show)


def _cmd_send(args: argparse.Namespace) -> int:
    day = _day_arg(args.date)
    only = args.domain.lower().rstrip(".") if args.domain else None

    async def send(service: TlsRptService) -> int:
        await service.send_day(day, domain=only)
        rows = [r for r in await service.status(day) if only is None or r[0] == only]
        if not rows:
            print(f"no TLS outcomes recorded for {day}", file=sys.stderr)
        for domain, scope, uri, state, attempts, error in rows:
            where = f"{domain}" + (f" (MX {scope})" if scope else "")
            # the URI comes from a TXT record, the error from a remote server
            print(escape(f"{where}  {uri or '-'}  {state}  attempts={attempts}  {error}".rstrip()))
        # exit 1 when something is still owed: a delivery not done, or a record lookup that failed
        return 0 if all(r[3] in ("sent", "no-rua", "empty") for r in rows) else 1

    try:
        return _run(args, send, send=True)
    except ValueError as exc:
        print(f"mxgate: {escape(exc)}", file=sys.stderr)
        return 2


def _cmd_received(args: argparse.Namespace) -> int:
    async def received(service: TlsRptService) -> int:
        rows = await service.reporter_failures(days=args.days, top=1000)
        print(f"{'REPORTER':40}  {'SUCCESSFUL':>10}  {'FAILED':>8}")
        for org, ok, bad in rows:
            name = escape(org)  # the reporter names itself (organization-name in its report)
            print(f"{name[:40]:40}  {ok:>10}  {bad:>8}")
        return 0

    return _run(args, received)
