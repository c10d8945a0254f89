"""``mxgate ...``: the command line. Plugins add subcommands through ``mxgate_lifecycle_register_commands``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import time
import typing
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w

from mxgate._version import __version__
from mxgate.core import bootstrap, checks, engine, logs, tracking
from mxgate.core import config as cfg
from mxgate.core.cluster_db import SharedDb
from mxgate.core.cluster_tracking import trace as cluster_trace
from mxgate.core.commands import ENV_CONFIG, add_config_arg, load_from_args
from mxgate.core.commands import config_path as _config_path
from mxgate.core.errors import ConfigError, MxgateError
from mxgate.core.files import PRIVATE_UMASK
from mxgate.core.plugins import Dispatcher, PluginSet, build_plugins, collect_registry
from mxgate.core.preflight import check_certificates
from mxgate.core.textsafe import escape

Command = Callable[[argparse.Namespace], int]


# --- commands ---------------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    source = bootstrap.read_source(_config_path(args))
    config, plugins = bootstrap.load_source(source)
    logs.configure(config.server.log_format, config.server.log_level)
    os.umask(PRIVATE_UMASK)  # whatever the gateway or a plugin creates is its own (0600 files, 0700 directories)
    engine.run(config, plugins, source=source)
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:

    config, plugins = load_from_args(args)
    # What `run` needs of the listeners' certificates: readable, PEM, a matching pair (run refuses those in one
    # line too; other commands do not read keys). `run` serves an expired certificate (better than no TLS for
    # opportunistic senders) with a warning; this says it as an error. Near expiry, DNS and ports: `mxgate check`.
    outdated = check_certificates(config, now=datetime.now(UTC), days=0)
    if outdated:
        for problem in outdated:
            print(f"error: {problem}", file=sys.stderr)
        print(f"mxgate: {len(outdated)} configuration error(s)", file=sys.stderr)
        return 1
    for advice in cfg.advisories(config):
        print(f"warning: {advice}", file=sys.stderr)
    print(
        f"{config.source}: OK ({len(config.listener)} listeners, {len(config.inbound_connector)} inbound and "
        f"{len(config.outbound_connector)} outbound connectors, {len(plugins.names())} plugins)"
    )
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    config, _ = load_from_args(args)
    if args.json:
        print(json.dumps(cfg.to_document(config), indent=2))
    else:
        sys.stdout.write(f"# effective configuration of {config.source}, defaults included\n")
        sys.stdout.write(_with_choices(tomli_w.dumps(cfg.to_document(config)), config))
    return 0


def _with_choices(text: str, config: cfg.Config) -> str:
    """``receive_workers = "auto"`` with what it decided on this machine, as a comment on its line."""
    if config.server.receive_workers != "auto":
        return text
    note = (
        f"  # {config.server.receive_worker_count} on this machine: one per spare core "
        f"({checks.usable_cpus()} usable), at most {checks.RECEIVE_WORKERS_AUTO_MAX}"
    )
    out, in_server = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("["):
            in_server = line.strip() == "[server]"
        elif in_server and line.startswith("receive_workers = "):
            line = line.rstrip("\n") + note + "\n"
        out.append(line)
    return "".join(out)


def cmd_config_init(args: argparse.Namespace) -> int:
    plugins = build_plugins()

    text = render_default(collect_registry(Dispatcher(plugins)))
    if args.file in (None, "-"):
        sys.stdout.write(text)
        return 0
    target = Path(args.file)
    if target.exists() and not args.force:
        print(f"mxgate: {target} exists; use --force to overwrite", file=sys.stderr)
        return 1
    target.write_text(text, encoding="utf-8")
    print(f"wrote {target}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    _config, plugins = load_from_args(args)
    rows = [
        (
            i.name,
            i.source,
            str(i.priority),
            "yes" if i.enabled else "no",
            ", ".join(h.removeprefix("mxgate_") for h in i.hooks) or "-",
        )
        for i in plugins.infos
    ]
    if args.json:
        print(
            json.dumps(
                [dict(zip(("name", "source", "priority", "enabled", "hooks"), r, strict=True)) for r in rows],
                indent=2,
            )
        )
        return 0
    head = ("NAME", "SOURCE", "PRIORITY", "ENABLED", "HOOKS")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    for row in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    given = [x is not None for x in (args.id, args.message_id)]
    try:
        flt = tracking.TraceFilter(
            sender=args.sender,
            recipient=args.recipient,
            client=args.client,
            since=None if args.since is None else tracking.parse_since(args.since, now=time.time()),
        )
    except ValueError as exc:
        print(f"mxgate trace: --since: {escape(exc)}", file=sys.stderr)
        return 2
    if sum(given) + bool(flt) != 1:
        print(
            "mxgate trace: give a queue id, --message-id MESSAGE-ID, or search criteria "
            "(--from, --to, --client, --since) -- one of them",
            file=sys.stderr,
        )
        return 2
    config, _ = load_from_args(args)
    if flt:
        found = 0
        for record in tracking.search(config.state_path, flt):
            print(tracking.format_record(record))
            found += 1
        if not found:
            print(f"mxgate: no tracking records match in {config.state_path / tracking.FILE_NAME}", file=sys.stderr)
            return 1
        return 0
    by_mid = args.message_id is not None
    ident = args.message_id if by_mid else args.id
    where = str(config.state_path / tracking.FILE_NAME)
    if config.cluster.database:  # every node's records, each with its node name
        cl = config.cluster
        db = SharedDb(cl.database, name="trace", node=cl.node, connect_timeout=cl.connect_timeout)
        records = cluster_trace(db, ident, message_id=by_mid)
        where = "the cluster's tracking records"
    else:
        records = tracking.trace(config.state_path, ident, message_id=by_mid)
    if not records:
        what = "Message-ID" if by_mid else "queue id"
        print(
            f"mxgate: no tracking records for {what} {escape(ident)!r} in {where}",
            file=sys.stderr,
        )
        if not by_mid and ("@" in ident or ident.startswith("<")):
            print("mxgate: that looks like a Message-ID: mxgate trace --message-id ID", file=sys.stderr)
        return 1
    for record in records:
        print(tracking.format_record(record))
    return 0


def cmd_version(_args: argparse.Namespace) -> int:
    print(f"mxgate {__version__}")
    return 0


# --- config init --------------------------------------------------------------------------------------------------


def render_default(registry: cfg.ConfigRegistry) -> str:
    """The built-in default as a complete, commented TOML file: every key with its description; keys left at
    their default are commented out, so the file says exactly what the built-in default says."""
    out = [
        "# mxgate configuration. `mxgate config check FILE` validates it; `mxgate config show FILE` prints",
        "# the effective configuration. Keys that are commented out show their default.",
        "",
    ]
    for name, hint in cfg.SECTIONS.items():
        is_array = typing.get_origin(hint) is tuple
        cls = typing.get_args(hint)[0] if is_array else hint
        doc_value = cfg.DEFAULT_DOCUMENT.get(name)
        items = doc_value if is_array else [doc_value or {}]
        kind = name if "connector" in name else None
        for item in items or [{}]:
            out.append(f"[[{name}]]" if is_array else f"[{name}]")
            out.extend(_render_fields(cls, item, registry, kind, commented_all=is_array and not doc_value))
            out.append("")
    for section, cls in registry.sections.items():
        out.append(f"[plugins.{section}]")
        out.extend(_render_fields(cls, {}, registry, None))
        out.append("")
    return "\n".join(out)


def _render_fields(
    cls: type,
    values: dict[str, Any],
    registry: cfg.ConfigRegistry,
    kind: str | None,
    *,
    commented_all: bool = False,
) -> list[str]:
    lines: list[str] = []
    for f in dataclasses.fields(cls):
        if f.name == "extra":
            continue
        meta = f.metadata
        desc = meta.get("desc", "")
        if meta.get("choices"):
            desc += f" One of: {', '.join(meta['choices'])}."
        lines.append(f"# {desc}")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name in values and not commented_all:
            lines.append(_toml_line(f.name, values[f.name]))
            continue
        if required:
            lines.append("# " + _toml_line(f.name, meta.get("example") or ""))
            continue
        factory = f.default_factory
        default = f.default if factory is dataclasses.MISSING else factory()
        shown = meta.get("example") if default is None else default
        if dataclasses.is_dataclass(shown) or (
            isinstance(shown, tuple) and shown and dataclasses.is_dataclass(shown[0])
        ):
            shown = cfg._plain(shown)
        if shown is None:
            lines.append(f"# {f.name} = (unset)")
        else:
            lines.append("# " + _toml_line(f.name, cfg._plain(shown)))
    if kind:
        for spec in registry.settings_for(kind):
            lines.append(f"# {spec.desc} (plugin {registry.owners.get(spec.name, '?')})")
            lines.append("# " + _toml_line(spec.name, spec.default))
    return lines


def _toml_line(key: str, value: Any) -> str:
    return f"{key} = {_toml_value(value)}"


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(_toml_line(k, v) for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).strip()[len("v = ") :]


def render_reference(registry: cfg.ConfigRegistry) -> str:
    """Markdown reference of every configuration key, from the same declarations the loader uses."""
    out = [
        "# Configuration reference",
        "",
        "Generated by `mxgate config reference` from the declarations in the code; a test keeps it current.",
        "",
    ]

    def table(title: str, cls: type, kind: str | None) -> None:
        out.extend([f"## `{title}`", "", "| key | type | default | description |", "|---|---|---|---|"])
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            desc = f.metadata.get("desc", "")
            if f.metadata.get("choices"):
                desc += f" One of: {', '.join(f.metadata['choices'])}."
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                default = "required"
            else:
                factory = f.default_factory
                value = f.default if factory is dataclasses.MISSING else factory()
                default = "unset" if value is None else f"`{_toml_value(cfg._plain(value))}`"
                if factory is socket.getfqdn:
                    default = "this host's FQDN"
                if factory is socket.gethostname:
                    default = "this host's name"
            out.append(f"| `{f.name}` | {_type_name(hints[f.name])} | {default} | {desc} |")
        for spec in registry.settings_for(kind) if kind else []:
            owner = registry.owners.get(spec.name, "?")
            out.append(
                f"| `{spec.name}` | {spec.type.__name__} | `{_toml_value(spec.default)}` | {spec.desc} "
                f"(plugin `{owner}`) |"
            )
        out.append("")

    for name, hint in cfg.SECTIONS.items():
        is_array = typing.get_origin(hint) is tuple
        cls = typing.get_args(hint)[0] if is_array else hint
        table(f"[[{name}]]" if is_array else f"[{name}]", cls, name if "connector" in name else None)
    table("[[listener]] sni_certificates", cfg.SniCertificate, None)
    table("[dns] resolvers (table form)", cfg.ResolverEndpointConfig, None)
    for section, cls in sorted(registry.sections.items()):
        table(f"[plugins.{section}]", cls, None)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):  # arrays of tables inside a plugin's section
            args = typing.get_args(hints[f.name])
            if (
                typing.get_origin(hints[f.name]) is tuple
                and args
                and isinstance(args[0], type)
                and dataclasses.is_dataclass(args[0])
            ):
                table(f"[[plugins.{section}.{f.name}]]", args[0], None)
    return "\n".join(out)


def _type_name(hint: object) -> str:
    text = str(hint).replace("typing.", "").replace("collections.abc.", "")
    for qual in ("mxgate.core.config_schema.", "mxgate.core.config.", "<class '", "'>"):
        text = text.replace(qual, "")
    return text.replace("|", "\\|")


def cmd_config_reference(_args: argparse.Namespace) -> int:
    sys.stdout.write(render_reference(collect_registry(Dispatcher(build_plugins()))) + "\n")
    return 0


# --- parser -------------------------------------------------------------------------------------------------------


def build_parser(
    plugins: PluginSet | None = None, *, commands: Sequence[Callable[[Any], None]] = ()
) -> argparse.ArgumentParser:
    """The ``mxgate`` parser: the commands here, then ``commands`` (each called with the subparsers; the program
    adds ``mxgate demo``, which lives outside the core), then every plugin's, the core's own first."""
    parser = argparse.ArgumentParser(
        prog="mxgate",
        description="SMTP gateway with Exchange-style connectors and transport agents, DNSSEC, DANE, MTA-STS, "
        "TLS-RPT and Prometheus metrics.",
        epilog=f"Without --config (or ${ENV_CONFIG}), mxgate uses its built-in default: SMTP on 127.0.0.1:2525, "
        "metrics on 127.0.0.1:9925, state under ./var.",
    )
    parser.add_argument("--version", action="version", version=f"mxgate {__version__}")
    add_config_arg(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="run the gateway (foreground)",
        description="Run the gateway in the foreground until SIGTERM or SIGINT (then drain and stop); SIGHUP "
        "re-reads the configuration (see `mxgate reload`). With "
        "server.receive_workers = N it starts N receive worker processes, restarts any that dies and stops them "
        "with itself.",
    )
    add_config_arg(p)
    p.set_defaults(func=cmd_run)

    p_config = sub.add_parser("config", help="check, show or create a configuration file")
    csub = p_config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    p = csub.add_parser("check", help="validate FILE (exit 0 valid, 1 invalid)")
    p.add_argument("file", nargs="?", help="configuration file (default: --config or the built-in default)")
    add_config_arg(p)
    p.set_defaults(func=cmd_config_check)
    p = csub.add_parser("show", help="print the effective configuration, defaults included")
    p.add_argument("file", nargs="?")
    p.add_argument("--json", action="store_true", help="JSON instead of TOML")
    add_config_arg(p)
    p.set_defaults(func=cmd_config_show)
    p = csub.add_parser("init", help="write a complete, commented default configuration")
    p.add_argument("file", nargs="?", help="target file (default: standard output)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_config_init)
    p = csub.add_parser("reference", help="print the Markdown reference of every configuration key")
    p.set_defaults(func=cmd_config_reference)

    p = sub.add_parser("plugins", help="list plugins: name, source, priority, enabled, hooks")
    p.add_argument("--json", action="store_true")
    add_config_arg(p)
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser(
        "trace",
        help="a message's story from the tracking log: by queue id, --message-id, or --from/--to/--client/--since",
        description="Print tracking records in log order: one message's story by its queue id (or the id in the "
        "Received: header mxgate added), every message with a Message-ID, or every message (and rejection) that "
        "matches all the criteria given. In a cluster, every node's records.",
    )
    p.add_argument("id", nargs="?", help="queue id (as in '250 2.0.0 Ok: queued as ID') or our Received: id")
    p.add_argument(
        "--message-id", metavar="MESSAGE-ID", help="every message with this Message-ID (angle brackets optional)"
    )
    p.add_argument("--from", dest="sender", metavar="ADDRESS", help="envelope sender (<> for bounces)")
    p.add_argument("--to", dest="recipient", metavar="ADDRESS", help="envelope recipient")
    p.add_argument("--client", metavar="IP", help="the sending client's IP address")
    p.add_argument("--since", metavar="WHEN", help="records since an age (30m, 2h, 7d) or an ISO time (UTC)")
    add_config_arg(p)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)

    for register in commands:
        register(sub)
    # the core's own commands come from the essential plugin, like a plugin's: without a usable configuration
    # file, from the essential plugin alone
    if plugins is None:
        plugins = build_plugins(entry_points=False, builtin=False)
    Dispatcher(plugins).call_sync("mxgate_lifecycle_register_commands", subparsers=sub)
    return parser


def _plugins_for_cli(argv: Sequence[str]) -> PluginSet | None:
    """Plugins may add commands; load them from the config named on the command line, quietly."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config")
    known, _ = pre.parse_known_args(argv)
    try:
        _, plugins = bootstrap.load(known.config or os.environ.get(ENV_CONFIG) or None)
    except MxgateError:
        return None
    return plugins


def main(argv: Sequence[str] | None = None, *, commands: Sequence[Callable[[Any], None]] = ()) -> int:
    """Run one command; ``commands`` as for :func:`build_parser` (``mxgate.__main__.main`` gives ``mxgate demo``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_plugins_for_cli(argv), commands=commands)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"mxgate: {len(exc.problems)} configuration error(s)", file=sys.stderr)
        return 1
    except MxgateError as exc:
        print(f"mxgate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
