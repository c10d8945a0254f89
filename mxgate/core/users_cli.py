"""``mxgate user add / remove / list``: the built-in users file (:class:`mxgate.core.auth.UsersFile`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mxgate.core.auth import UsersFile, users_file_path
from mxgate.core.commands import add_config_arg, load_from_args


def _users_for(args: argparse.Namespace) -> UsersFile:
    if getattr(args, "users_file", None):
        return UsersFile(Path(args.users_file))
    config, _ = load_from_args(args)
    return UsersFile(users_file_path(config))


def _read_password(args: argparse.Namespace) -> str:
    text = Path(args.password_file).read_text(encoding="utf-8") if args.password_file else sys.stdin.readline()
    return text.rstrip("\r\n")


def cmd_user_add(args: argparse.Namespace) -> int:
    users = _users_for(args)
    try:
        password = _read_password(args)
        new = users.add(args.name, password)
    except (OSError, ValueError) as exc:
        print(f"mxgate user add: {exc}", file=sys.stderr)
        return 1
    print(f"{'added' if new else 'updated'} {args.name} in {users.path}")
    return 0


def cmd_user_remove(args: argparse.Namespace) -> int:
    users = _users_for(args)
    if not users.remove(args.name):
        print(f"mxgate user remove: no user {args.name!r} in {users.path}", file=sys.stderr)
        return 1
    print(f"removed {args.name} from {users.path}")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    for name in _users_for(args).users():
        print(name)
    return 0


def register_cli(subparsers: Any) -> None:
    """``mxgate user add NAME`` (password from stdin or --password-file), ``user remove NAME``, ``user list``."""
    user = subparsers.add_parser("user", help="manage SMTP AUTH users (the built-in users file)")
    sub = user.add_subparsers(dest="user_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        add_config_arg(p)
        p.add_argument("--users-file", metavar="FILE", help="users file (default: <state_dir>/users)")

    p = sub.add_parser("add", help="add a user or change its password (password read from stdin)")
    common(p)
    p.add_argument("name")
    p.add_argument("--password-file", metavar="FILE", help="read the password from this file instead of stdin")
    p.set_defaults(func=cmd_user_add)
    p = sub.add_parser("remove", help="remove a user")
    common(p)
    p.add_argument("name")
    p.set_defaults(func=cmd_user_remove)
    p = sub.add_parser("list", help="list user names")
    common(p)
    p.set_defaults(func=cmd_user_list)
