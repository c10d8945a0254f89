"""``mxgate queue ...``: look at and steer a (possibly running) gateway's queue.

The CLI opens the same SQLite store as the gateway with ``release_leases=False``: WAL lets it read while the
gateway writes, every change is one short transaction, and the gateway's leases are left alone. ``flush`` only
makes recipients due; the running scheduler notices within its poll interval.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any, TypeVar

from mxgate.core.cluster_cli import cmd_queue_list_cluster
from mxgate.core.commands import ENV_CONFIG, add_config_arg, load_from_args
from mxgate.core.config import Config
from mxgate.core.errors import StateError
from mxgate.core.messages import QueuedMessage
from mxgate.core.queue.errors import MessageNotFoundError
from mxgate.core.queue.store import DB_NAME, QueueStore
from mxgate.core.textsafe import escape
from mxgate.core.tracking import TrackEvent, TrackingLog

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
    return _run_in(_config(args), fn)


def _config(args: argparse.Namespace) -> Config:
    config, _ = load_from_args(args)
    db = config.state_path / DB_NAME
    if not db.is_file():  # never create a queue (or ./var) where no gateway ever ran
        raise StateError(
            f"no queue at {db.absolute()} (server.state_dir of {config.source}): name the gateway's configuration with "
            f"-c FILE or ${ENV_CONFIG}"
        )
    return config


def _run_in(config: Config, fn: Callable[[QueueStore], Awaitable[T]]) -> T:
    async def main() -> T:
        store = await QueueStore.open(config.state_path, release_leases=False)
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(main())


def _parse_age(text: str) -> float:
    t = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if len(t) > 1 and t[-1] in units and t[:-1].isdigit():
        return float(int(t[:-1]) * units[t[-1]])
    raise argparse.ArgumentTypeError(f"{text!r} is not an age such as 90s, 30m, 2h or 7d")


def _plain_address(text: str) -> str:
    t = text.strip()
    return "" if t in ("", "<>") else t.strip("<>")


def _filters(args: argparse.Namespace, now: float) -> dict[str, Any]:
    """The store's selection from ``--from/--to/--older-than`` (those given)."""
    found: dict[str, Any] = {}
    if args.sender is not None:
        found["sender"] = _plain_address(args.sender)
    if args.recipient is not None:
        found["recipient"] = _plain_address(args.recipient)
    if args.older_than is not None:
        found["received_before"] = now - args.older_than
    return found


def operator() -> dict[str, str]:
    """Who runs this command, for the ADMIN tracking record: the effective user, and the one sudo names (what
    the environment says: a hint, not proof)."""
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid {uid}"
    who = {"by": name}
    sudo = os.environ.get("SUDO_USER")
    if sudo and sudo != name:
        who["sudo_user"] = sudo
    return who


def record_admin(config: Config, action: str, queue_ids: Sequence[str | None], **fields: Any) -> None:
    """One ADMIN record per message acted on, in the gateway's tracking log (``mxgate trace ID`` shows it)."""
    if not config.server.tracking_log:
        return
    # The gateway rotates its log, not this command (max_size: never); a file this command creates as root
    # goes to the state directory's owner, so the gateway (running as server.user) can go on appending to it.
    log = TrackingLog(config.state_path, max_size=sys.maxsize, files=config.server.tracking_log_files)
    try:
        who = operator()
        for queue_id in queue_ids:
            log.write(TrackEvent.ADMIN, queue_id=queue_id, action=action, via="mxgate queue", **who, **fields)
    finally:
        log.close()
    owner = config.state_path.stat()
    if os.geteuid() == 0 and owner.st_uid != 0:
        with contextlib.suppress(FileNotFoundError):
            os.chown(log.path, owner.st_uid, owner.st_gid)


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
    """One page of ``--limit`` messages after ``--after``; when the page is full, the command for the next page
    goes to stderr (a page costs its own rows, however deep the queue)."""
    if args.cluster:
        return cmd_queue_list_cluster(args)
    now = time.time()
    if args.limit < 1:
        print("mxgate: --limit must be at least 1", file=sys.stderr)
        return 2
    filters = _filters(args, now)

    async def fetch(store: QueueStore) -> list[QueuedMessage]:
        if not filters:
            return await store.list(limit=args.limit, include_finished=args.all, after=args.after)
        ids = await store.select(**filters, include_finished=args.all, limit=args.limit, after=args.after)
        return await store.get_many(ids)

    messages = _run(args, fetch)
    rows = [message_row(m, now) for m in messages]
    if len(rows) == args.limit:
        print(f"mxgate: {len(rows)} shown; for the next page add --after {rows[-1]['id']}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        if args.after:
            print("no more messages")
        else:
            print("no queued message matches" if filters else "queue is empty")
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
    for key, value in msg.meta.to_pairs():
        print(f"meta:        {escape(key)}={escape(value)}")
    opts = msg.options
    if opts.dsn_ret is not None or opts.envid is not None:
        ret = f"RET={opts.dsn_ret}" if opts.dsn_ret is not None else ""
        envid = f"ENVID={escape(opts.envid)}" if opts.envid is not None else ""
        print(f"dsn:         {' '.join(p for p in (ret, envid) if p)}")
    if opts.requiretls:
        print("requiretls:  yes (RFC 8689)")
    print("recipients:")
    for r in msg.recipients:
        extra = f" via {escape(r.route)}" if r.route else ""
        if r.dsn_notify or r.orcpt:
            dsn = [f"NOTIFY={escape(r.dsn_notify)}"] if r.dsn_notify else []
            dsn += [f"ORCPT={escape(r.orcpt)}"] if r.orcpt else []
            extra += f" [{' '.join(dsn)}]"
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


def _selection(args: argparse.Namespace, now: float) -> tuple[list[str], dict[str, Any]] | None:
    """The ids named, or the filters given (``--all``: no filter); ``None`` (after saying why) if neither or both."""
    filters = _filters(args, now)
    named = list(args.ids)
    if named and (filters or args.all):
        print("mxgate queue: give queue ids, or --from/--to/--older-than/--all, not both", file=sys.stderr)
        return None
    if not named and not filters and not args.all:
        print("mxgate queue: which messages? give queue ids, --from, --to, --older-than or --all", file=sys.stderr)
        return None
    return named, filters


def _act(args: argparse.Namespace, action: str, fn: Callable[[QueueStore, str], Awaitable[Any]]) -> int:
    """Apply ``fn`` to the selected messages; each one acted on gets an ADMIN record in the tracking log."""
    now = time.time()
    selection = _selection(args, now)
    if selection is None:
        return 2
    named, filters = selection
    config = _config(args)

    async def go(store: QueueStore) -> tuple[list[str], list[str]]:
        ids = named or await store.select(**filters)
        done: list[str] = []
        missing: list[str] = []
        for msg_id in ids:
            try:
                ok = await fn(store, msg_id)
            except MessageNotFoundError:
                ok = False
            (missing if ok is False else done).append(msg_id)
        return done, missing

    done, missing = _run_in(config, go)
    record_admin(config, action, done)
    for msg_id in done:
        print(f"{escape(msg_id)}: {action}")
    for msg_id in missing:
        print(f"mxgate: no message {escape(msg_id)!r} in the queue", file=sys.stderr)
    if not named and not done:
        print("mxgate: no queued message matches", file=sys.stderr)
    elif not named:
        print(f"{len(done)} message(s) {action}")
    return 1 if missing or not done else 0


def cmd_flush(args: argparse.Namespace) -> int:
    now = time.time()
    if not args.ids and not _filters(args, now):
        args.all = True  # `queue flush` alone flushes every message, as it always did
    selection = _selection(args, now)
    if selection is None:
        return 2
    named, filters = selection
    config = _config(args)
    if not named and not filters:
        count = _run_in(config, lambda s: s.flush(None, now=now))
        record_admin(config, "flushed", [None], recipients=count)
        print(f"{count} recipient(s) due now")
        return 0

    async def go(store: QueueStore) -> tuple[dict[str, int], list[str]]:
        ids = named or await store.select(**filters)
        counts: dict[str, int] = {}
        missing: list[str] = []
        for msg_id in ids:
            try:
                counts[msg_id] = await store.flush(msg_id, now=now)
            except MessageNotFoundError:
                missing.append(msg_id)
        return counts, missing

    counts, missing = _run_in(config, go)
    for msg_id, count in counts.items():
        record_admin(config, "flushed", [msg_id], recipients=count)
        print(f"{escape(msg_id)}: {count} recipient(s) due now")
    for msg_id in missing:
        print(f"mxgate: no message {escape(msg_id)!r} in the queue", file=sys.stderr)
    if not named and not counts:
        print("mxgate: no queued message matches", file=sys.stderr)
    return 1 if missing or not counts else 0


def cmd_hold(args: argparse.Namespace) -> int:
    return _act(args, "held", lambda s, i: s.hold(i))


def cmd_release(args: argparse.Namespace) -> int:
    return _act(args, "released", lambda s, i: s.release(i))


def cmd_delete(args: argparse.Namespace) -> int:
    return _act(args, "deleted", lambda s, i: s.delete(i))


def _add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="sender", metavar="ADDRESS", help="messages from this envelope sender (<>: bounces)")
    p.add_argument("--to", dest="recipient", metavar="ADDRESS", help="messages with this recipient")
    p.add_argument("--older-than", metavar="AGE", type=_parse_age, help="received more than AGE ago (30m, 2h, 7d)")


def register_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]

    p_queue = subparsers.add_parser("queue", help="list, show, flush, hold, release or delete queued messages")
    qsub = p_queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)

    p = qsub.add_parser("list", help="id, age, sender, recipients, state, next attempt, last error")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.add_argument("--all", action="store_true", help="include finished messages (tombstones)")
    p.add_argument("--limit", type=int, default=100, help="messages per page (default 100)")
    p.add_argument("--after", metavar="ID", help="start after this message id (the last of the previous page)")
    _add_filters(p)
    p.add_argument("--cluster", action="store_true", help="every node's queue summary, as published with its heartbeat")
    add_config_arg(p)
    p.set_defaults(func=cmd_list)

    p = qsub.add_parser("show", help="envelope, headers and attempt history of one message")
    p.add_argument("id")
    add_config_arg(p)
    p.set_defaults(func=cmd_show)

    for name, func, text in (
        ("flush", cmd_flush, "make pending recipients due now (without ids or filters: every message)"),
        ("hold", cmd_hold, "keep messages from delivery"),
        ("release", cmd_release, "let held messages be delivered again"),
        ("delete", cmd_delete, "remove messages without a DSN"),
    ):
        p = qsub.add_parser(
            name,
            help=text,
            description=f"{text[0].upper()}{text[1:]}: the messages named by queue id, or every active message "
            "matching all the filters given (--all: every active message). Each message acted on gets an ADMIN "
            "record (action, by whom) in the tracking log.",
        )
        p.add_argument("ids", nargs="*", metavar="ID", help="queue ids")
        _add_filters(p)
        p.add_argument("--all", action="store_true", help="every active message")
        add_config_arg(p)
        p.set_defaults(func=func)
