"""Reload (``mxgate reload``, SIGHUP, ``systemctl reload``): re-read the configuration and apply it while mail flows.

All or nothing. The file is read and validated with the plugins already loaded; if it is invalid, or changes a
setting that only a restart can change, or a listener's new certificates do not load, the gateway keeps running
on the configuration it has and says exactly why. Otherwise it applies the new one at once: new SMTP sessions get
the new listener and inbound connector settings and certificates (open sessions finish under the old ones), new
delivery attempts the new outbound connectors and routes, and receive workers are replaced one by one by workers
running the new configuration (each old one drains its sessions; the listening sockets never close).

Settings that need a restart (:func:`restart_needed`): ``server.state_dir``, ``server.receive_workers``,
``server.user``/``group``, the listeners' names, order, addresses and ``implicit_tls``, ``[dns]`` (the resolver
is built once), ``[metrics]``, and ``[plugins]`` — which plugins load and their own sections (built-in plugins
read them at start). Connector settings that plugins declare (``dane``, ``mta_sts``) are connector settings and
apply.

The outcome is logged and written to ``<state_dir>/reload-status.json`` (``at``, ``ok``, ``problems``), which
``mxgate reload`` waits for and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Final

from mxgate.core import config as cfg
from mxgate.core.commands import add_config_arg, load_from_args
from mxgate.core.preflight import running_pid

STATUS_FILE: Final = "reload-status.json"
WAIT: Final = 60.0  # how long `mxgate reload` waits for the gateway's answer


def restart_needed(old: cfg.Config, new: cfg.Config) -> list[str]:
    """The settings that differ between ``old`` and ``new`` and that only a restart applies (key paths)."""
    out: list[str] = []
    for key in ("state_dir", "receive_workers", "user", "group"):
        if getattr(old.server, key) != getattr(new.server, key):
            out.append(f"server.{key}")
    if old.state_path != new.state_path and "server.state_dir" not in out:
        out.append("server.state_dir")
    if [lc.name for lc in old.listener] != [lc.name for lc in new.listener]:
        out.append("listener (names or order)")
    else:
        for i, (a, b) in enumerate(zip(old.listener, new.listener, strict=True)):
            for key in ("address", "implicit_tls"):
                if getattr(a, key) != getattr(b, key):
                    out.append(f"listener[{i}].{key}")
    old_doc, new_doc = cfg.to_document(old), cfg.to_document(new)
    for section in ("dns", "metrics", "plugins"):
        if old_doc.get(section) != new_doc.get(section):
            out.append(f"[{section}]")
    return out


def write_status(state: Path, ok: bool, problems: list[str], applied: str = "") -> dict[str, Any]:
    status = {"at": time.time(), "pid": os.getpid(), "ok": ok, "problems": problems, "applied": applied}
    path = state / STATUS_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(status, f)
    os.replace(tmp, path)
    return status


def read_status(state: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((state / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data


# --- mxgate reload ------------------------------------------------------------------------------------------------


def cmd_reload(args: argparse.Namespace) -> int:
    config, _ = load_from_args(args)  # an invalid file: its errors, and the gateway is not disturbed
    state = config.state_path
    pid = running_pid(state) if state.is_dir() else None
    if pid is None or not pid.isdigit():
        print(f"mxgate: no gateway runs on {state.absolute()} (server.state_dir of {config.source})", file=sys.stderr)
        return 1
    before = read_status(state)
    os.kill(int(pid), signal.SIGHUP)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        status = read_status(state)
        if status is not None and status != before and status.get("pid") == int(pid):
            for problem in status["problems"]:
                print(f"error: {problem}", file=sys.stderr)
            if status["ok"]:
                print(f"mxgate: reloaded {config.source} (pid {pid}): {status['applied']}")
                return 0
            print(f"mxgate: reload refused; the gateway (pid {pid}) keeps its configuration", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"mxgate: the gateway (pid {pid}) did not answer within {args.wait:g} s (see its log)", file=sys.stderr)
    return 1


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "reload",
        help="make the running gateway re-read its configuration (SIGHUP), and say what happened",
        description="Validate the configuration, then send SIGHUP to the gateway running on its state_dir and "
        "print its answer. All or nothing: an invalid file, a setting that needs a restart (listener addresses, "
        "receive_workers, [dns], [metrics], [plugins]) or certificates that do not load leave the gateway on its "
        "current configuration, with the reason. Open sessions and queued mail are not touched.",
    )
    p.add_argument("--wait", type=float, default=WAIT, help=f"seconds to wait for the answer (default {WAIT:g})")
    add_config_arg(p)
    p.set_defaults(func=cmd_reload)
