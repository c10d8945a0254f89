"""``mxgate queue ...``: look at and steer a (possibly running) gateway's queue.

The CLI opens the same SQLite store as the gateway with ``release_leases=False``: WAL lets it read while the
gateway writes, every change is one short transaction, and the gateway's leases are left alone. ``flush`` only
makes recipients due; the running scheduler notices within its poll interval.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any, TypeVar

from mxgate.core.queue.store import MessageNotFoundError, QueuedMessage, QueueStore
from mxgate.core.textsafe import escape

T = TypeVar("T")


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _when(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    if ts <= now:
        return "now"
    return "in " + _age(ts - now)


def _state(msg: QueuedMessage, now: float) -> str:
    if msg.finished_at is not None:
        return "finished"
    if msg.held:
        return "held"
    if msg.leased_until > now:
        return "active"
    if any(r.status == "deferred" for r in msg.recipients):
        return "deferred"
    return "queued"


def _last_error(msg: QueuedMessage) -> str:
    return next((r.last_error for r in msg.recipients if r.last_error and not r.is_final), "") or next(
        (r.last_error for r in msg.recipients if r.last_error), ""
    )


def _run(args: argparse.Namespace, fn: Callable[[QueueStore], Awaitable[T]]) -> T:
    from mxgate.core.cli import load_from_args

    config, _ = load_from_args(args)

    async def main() -> T:
        store = await QueueStore.open(config.state_path, release_leases=False)
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(main())


def message_row(msg: QueuedMessage, now: float) -> dict[str, Any]:
    return {
        "id": msg.id,
        "age": _age(now - msg.received_at),
        "received_at": msg.received_at,
        "sender": msg.sender or "<>",
        "recipients": [{"address": r.address, "status": str(r.status)} for r in msg.recipients],
        "state": _state(msg, now),
        "next_attempt": msg.next_attempt,
        "last_error": _last_error(msg),
        "size": msg.size,
    }


def cmd_list(args: argparse.Namespace) -> int:
    if args.cluster:
        from mxgate.core.cluster import cmd_queue_list_cluster

        return cmd_queue_list_cluster(args)
    now = time.time()
    messages = _run(args, lambda s: s.list(limit=args.limit, include_finished=args.all))
    rows = [message_row(m, now) for m in messages]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("queue is empty")
        return 0
    head = ("ID", "AGE", "SENDER", "RECIPIENTS", "STATE", "NEXT", "LAST ERROR")
    table = [  # sender, recipients and the remote's reply came from the network: escaped for the terminal
        (
            escape(r["id"]),
            r["age"],
            escape(r["sender"]),
            ",".join(f"{escape(x['address'])}({x['status']})" for x in r["recipients"]),
            r["state"],
            _when(r["next_attempt"], now),
            escape(r["last_error"]),
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in [head, *table]) for i in range(6)]
    for row in [head, *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row[:6], widths, strict=True)) + "  " + str(row[6]))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    now = time.time()

    async def fetch(store: QueueStore) -> tuple[QueuedMessage | None, bytes, list[Any]]:
        msg = await store.get(args.id)
        if msg is None:
            return None, b"", []
        return msg, await store.headers(args.id), await store.attempts(args.id)

    msg, headers, attempts = _run(args, fetch)
    if msg is None:
        print(f"mxgate: no message {args.id!r} in the queue", file=sys.stderr)
        return 1
    # Everything but our own counters and dates came from the network (or from a remote server's reply):
    # escaped, so ESC/C1 sequences, BEL and bidi overrides reach the terminal as text.
    print(f"id:          {escape(msg.id)}")
    print(f"state:       {_state(msg, now)}")
    received = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(msg.received_at))
    print(f"received:    {received} ({_age(now - msg.received_at)} ago)")
    print(f"sender:      {escape(msg.sender or '<>')}")
    print(f"size:        {msg.size}")
    print(f"message-id:  {escape(msg.message_id or '-')}")
    for key, value in msg.meta:
        print(f"meta:        {escape(key)}={escape(value)}")
    print("recipients:")
    for r in msg.recipients:
        extra = f" via {escape(r.route)}" if r.route else ""
        nxt = "" if r.is_final else f", next {_when(r.next_attempt, now)}"
        err = f" -- {escape(r.last_error)}" if r.last_error else ""
        print(f"  {escape(r.address)}: {r.status}, {r.attempts} attempt(s){extra}{nxt}{err}")
    print("headers:")
    parsed = BytesHeaderParser(policy=compat32).parsebytes(headers)
    for name, value in parsed.items():
        print(f"  {escape(name)}: {escape(' '.join(str(value).split()))}")
    print("attempts:")
    if not attempts:
        print("  (none)")
    for a in attempts:
        when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(a.at))
        print(f"  {when} {escape(a.recipient)} {a.result} mx={escape(a.mx or '-')}: {escape(a.reply)}")
    return 0


def _by_id(args: argparse.Namespace, action: str, fn: Callable[[QueueStore], Awaitable[Any]]) -> int:
    try:
        result = _run(args, fn)
    except MessageNotFoundError:
        print(f"mxgate: no message {args.id!r} in the queue", file=sys.stderr)
        return 1
    if result is False:
        print(f"mxgate: no message {args.id!r} in the queue", file=sys.stderr)
        return 1
    print(f"{args.id}: {action}")
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    try:
        count = _run(args, lambda s: s.flush(args.id, now=time.time()))
    except MessageNotFoundError:
        print(f"mxgate: no message {args.id!r} in the queue", file=sys.stderr)
        return 1
    print(f"{count} recipient(s) due now" + (f" in {args.id}" if args.id else ""))
    return 0


def cmd_hold(args: argparse.Namespace) -> int:
    return _by_id(args, "held", lambda s: s.hold(args.id))


def cmd_release(args: argparse.Namespace) -> int:
    return _by_id(args, "released", lambda s: s.release(args.id))


def cmd_delete(args: argparse.Namespace) -> int:
    return _by_id(args, "deleted", lambda s: s.delete(args.id))


def register_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from mxgate.core.cli import add_config_arg

    p_queue = subparsers.add_parser("queue", help="list, show, flush, hold, release or delete queued messages")
    qsub = p_queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)

    p = qsub.add_parser("list", help="id, age, sender, recipients, state, next attempt, last error")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.add_argument("--all", action="store_true", help="include finished messages (tombstones)")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--cluster", action="store_true", help="every node's queue summary, as published with its heartbeat")
    add_config_arg(p)
    p.set_defaults(func=cmd_list)

    p = qsub.add_parser("show", help="envelope, headers and attempt history of one message")
    p.add_argument("id")
    add_config_arg(p)
    p.set_defaults(func=cmd_show)

    p = qsub.add_parser("flush", help="make pending recipients due now (one message, or all)")
    p.add_argument("id", nargs="?")
    add_config_arg(p)
    p.set_defaults(func=cmd_flush)

    for name, func, text in (
        ("hold", cmd_hold, "keep a message from delivery"),
        ("release", cmd_release, "let a held message be delivered again"),
        ("delete", cmd_delete, "remove a message without a DSN"),
    ):
        p = qsub.add_parser(name, help=text)
        p.add_argument("id")
        add_config_arg(p)
        p.set_defaults(func=func)
