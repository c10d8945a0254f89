#!/usr/bin/env python3
"""mxgate benchmarks against Postfix on the same machine (``make bench``).

Systems, each measured the same way and in the same run:

* ``floor``   -- bare aiosmtpd answering 250 without storing (what mxgate's front end costs by itself)
* ``postfix`` -- a Postfix 3.7 of our own from a temporary directory, relayhost = the sink, default durability
* ``mxgate``  -- ``mxgate run --config FILE`` relaying through a smart-host connector to the sink
  (``receive_workers = --mxgate-workers``)
* ``mxgate-default`` -- the same with ``receive_workers`` unset, as a new user runs it (relay scenario)

Scenarios: ``relay`` (default; smtp-source headline + loadgen latency), ``tls`` (STARTTLS on both legs vs the same
path in clear), ``dane`` (DANE-verified outbound via the DNS lab, mxgate), ``idle`` (memory per idle session),
``backlog`` (mxgate relaying while its queue holds 0 / 50,000 / 250,000 deferred messages).
Figures and how they are obtained: bench/RESULTS.md.

``edge``: a new connection with STARTTLS per message in, delivery by MX with DANE out, outbound TLS reused on both
sides; Postfix and mxgate, with CPU per message split by stage (receive, queue, deliver, TLS).

    .venv/bin/python bench/run.py                          # relay, 20,000 x 10 KiB over 50 sessions
    .venv/bin/python bench/run.py --scenario all
    .venv/bin/python bench/run.py --quick --json out.json   # smoke test: 200 messages
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import scenarios
from benchkit.procs import Cleanup, install_signal_exit

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="See bench/RESULTS.md.")
    p.add_argument("--messages", type=int, default=20_000, help="messages per measured pass (default 20000)")
    p.add_argument("--size", type=int, default=10_240, help="payload bytes per message (default 10240)")
    p.add_argument("--sessions", type=int, default=50, help="concurrent client sessions (default 50)")
    p.add_argument(
        "--scenario",
        action="append",
        choices=[*scenarios.SCENARIOS, "all"],
        help="relay (default), tls, dane, edge, idle, backlog or all; repeatable",
    )
    p.add_argument(
        "--systems",
        default="floor,postfix,mxgate,mxgate-default",
        help="comma-separated subset of floor,postfix,mxgate,mxgate-default (mxgate with receive_workers unset: "
        "the default configuration; relay scenario only)",
    )
    p.add_argument(
        "--latency-messages", type=int, default=None, help="messages of the loadgen latency pass (default messages/4)"
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="relay: keep sessions open (smtp-source -d); default: one message per connection",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="relay, tls, dane, edge: measure each system (each arm) N times, interleaved; medians",
    )
    p.add_argument(
        "--profile", type=Path, help="relay, edge: py-spy an extra pass of floor and mxgate, stacks to this dir"
    )
    p.add_argument("--floor-workers", type=int, default=1, help="relay: floor processes sharing one listener")
    p.add_argument(
        "--mxgate-workers",
        type=int,
        default=1,
        help="mxgate's server.receive_workers: extra processes that receive (default 1: both cores of the VM)",
    )
    p.add_argument(
        "--mxgate-loop",
        choices=("default", "asyncio"),
        default="default",
        help="event loop of mxgate: what `mxgate run` picks (uvloop when installed), or asyncio (uvloop hidden)",
    )
    p.add_argument(
        "--sink-tickets",
        type=int,
        default=2,
        help="tls/dane: TLS 1.3 session tickets the sink sends after each handshake (Python's default 2)",
    )
    p.add_argument("--idle-counts", default="1000,5000", help="idle: session counts (default 1000,5000)")
    p.add_argument(
        "--backlog-depths",
        default="0,50000,250000",
        help="backlog: deferred messages in the queue, one measurement each (default 0,50000,250000)",
    )
    p.add_argument(
        "--backlog-due",
        action="store_true",
        help="backlog: the deferred mail is due when the gateway starts (it retries it against the 4xx "
        "destination while the healthy mail is measured); default: due 2-3 h later",
    )
    p.add_argument("--timeout", type=float, default=None, help="bound on every pass, seconds")
    p.add_argument("--quick", action="store_true", help="smoke test: 200 messages, 10 sessions, idle 100")
    p.add_argument("--json", type=Path, help="also write the full results as JSON here")
    p.add_argument("--workdir", type=Path, help="where temporary state goes (default: a new directory in $TMPDIR)")
    p.add_argument("--python", default=sys.executable, help="interpreter for mxgate, the floor, sinks and loadgen")
    p.add_argument("-v", "--verbose", action="store_true", help="print each result as it comes")
    args = p.parse_args(argv)
    if args.quick:
        args.messages = min(args.messages, 200)
        args.sessions = min(args.sessions, 10)
        args.idle_counts = "100"
        args.backlog_depths = "0,500"
    args.scenarios = args.scenario or ["relay"]
    if "all" in args.scenarios:
        args.scenarios = list(scenarios.SCENARIOS)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - {"floor", "postfix", "mxgate", "mxgate-default"}
    if unknown:
        p.error(f"unknown systems: {', '.join(sorted(unknown))}")
    args.idle_counts = [int(x) for x in args.idle_counts.split(",") if x.strip()]
    args.backlog_depths = [int(x) for x in args.backlog_depths.split(",") if x.strip()]
    if args.latency_messages is None:
        args.latency_messages = max(args.messages // 4, min(args.messages, 200))
    if args.timeout is None:
        args.timeout = max(60.0, args.messages / 50)  # 50 msg/s would be pathological
    args.cache = {}
    return args


def _cmd(argv: list[str]) -> str:
    with contextlib.suppress(Exception):
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    return ""


def machine(workdir: Path) -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    versions = {"python": platform.python_version()}
    for mod in ("uvloop", "aiosmtpd"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[mod] = version(mod)
    versions["postfix"] = _cmd(["/usr/sbin/postconf", "-dh", "mail_version"])
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "filesystem": _cmd(["stat", "-f", "-c", "%T", str(workdir)]),
        "mxgate_commit": _cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "versions": versions,
    }


# -- report ---------------------------------------------------------------------------------------------------


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return round(a / b, 2)
    return None


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.1f}"
    return str(v)


METRICS = (
    ("accept_rate", "acceptance msg/s", True),
    ("e2e_rate", "end-to-end msg/s", True),
    ("cpu_s_per_1000", "CPU s / 1000 msgs", False),
    ("peak_rss_mb", "peak RSS MB (sum)", False),
    ("peak_pss_mb", "peak PSS MB (sum)", False),
    ("p50_ms", "p50 acceptance ms", False),
    ("p99_ms", "p99 acceptance ms", False),
)


def _flat(r: dict[str, Any]) -> dict[str, Any]:
    lat = r.get("latency_ms") or {}
    return {**r, "p50_ms": lat.get("p50"), "p99_ms": lat.get("p99")}


def _status(r: dict[str, Any]) -> str | None:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    if not r.get("ok", True):
        error = " ".join(str(r.get("error")).split())  # one line: it goes into table cells
        return f"FAILED: {error[:300]}{'...' if len(error) > 300 else ''}"
    return None


def table(columns: dict[str, dict[str, Any]], ratios: list[tuple[str, str, str]]) -> list[str]:
    """Markdown table: one row per metric, one column per system, then ratio columns (label, num, den)."""
    cols = {k: _flat(v) for k, v in columns.items()}
    head = ["metric", *cols, *(r[0] for r in ratios)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, _ in METRICS:
        row = [label] + [_fmt(c.get(key)) for c in cols.values()]
        row += [_fmt(_ratio(cols.get(n, {}).get(key), cols.get(d, {}).get(key))) for _, n, d in ratios]
        lines.append("| " + " | ".join(row) + " |")
    notes = [f"- {name}: {s}" for name, c in columns.items() if (s := _status(c))]
    return [*lines, *(["", *notes] if notes else [])]


def render_edge(edge: dict[str, Any]) -> list[str]:
    """The edge scenario: the two systems side by side, then CPU per message by stage."""
    out = ["## edge (loadgen: a new connection with STARTTLS per message; delivery by MX with DANE)", ""]
    ok = {name: r for name, r in edge.items() if not _status(r)}
    out += table(edge, [("mxgate/postfix", "mxgate", "postfix")] if len(ok) == 2 else [])
    setups = [
        f"{name} p50 {_fmt(r['setup_ms'].get('p50'))} / p99 {_fmt(r['setup_ms'].get('p99'))} ms"
        for name, r in ok.items()
        if r.get("setup_ms")
    ]
    if setups:
        out += ["", "Session set-up (connect to the EHLO reply after STARTTLS): " + "; ".join(setups)]
    drivers = [f"{name} {_fmt(r['driver_cpu_s_per_1000'])}" for name, r in ok.items() if r.get("driver_cpu_s_per_1000")]
    if drivers:
        out += ["", "The load generator's own CPU s / 1000 msgs (same two cores): " + "; ".join(drivers)]
    split = {name: r["stages"] for name, r in ok.items() if r.get("stages")}
    if split:
        from benchkit.stages import STAGES

        names = list(split)
        out += ["", "### CPU ms per relayed message by stage (/proc per thread + perf by shared object)", ""]
        out += ["| stage | " + " | ".join(f"{n} | {n} kernel" for n in names) + " |"]
        out += ["|---|" + "---|---|" * len(names)]
        for stage in STAGES:
            cells = [
                f"{_fmt(s['stages_ms_per_msg'][stage])} | {_fmt(s['kernel_ms_per_msg'][stage])}" for s in split.values()
            ]
            out.append(f"| {stage} | " + " | ".join(cells) + " |")
        for label, key in (
            ("unattributed (exited unseen)", "unattributed_ms_per_msg"),
            ("total (cgroup)", "total_ms_per_msg"),
        ):
            out.append(f"| {label} | " + " | ".join(f"{_fmt(s[key])} | " for s in split.values()) + " |")
        out.append("")
        for name, s in split.items():
            units = ", ".join(f"{u} {_fmt(v)}" for u, v in s["units_ms_per_msg"].items() if v >= 0.005)
            c = s.get("ceilings", {})
            b = s.get("busiest_thread", {})
            out.append(
                f"- {name}: by process/thread (ms/msg): {units}; perf: {s['perf']} ({s['perf_samples']} samples); "
                f"ceiling {_fmt(c.get('cores_msgs'))} msg/s on all cores, {_fmt(c.get('busiest_thread_msgs'))} "
                f"msg/s for the busiest thread ({b.get('thread')})"
            )
        out.append("")
        for name, r in ok.items():
            prof = r.get("profile")
            if not prof:
                continue
            out += [
                f"#### {name}: py-spy by module ({prof['samples']} busy samples of an extra pass at "
                f"{_fmt(prof['accept_rate_while_profiled'])} msg/s; innermost mxgate frame, else the leaf's file)",
                "",
                "| process | module | share |",
                "|---|---|---|",
            ]
            for role, rows in prof["by_process"].items():
                out += [f"| {role} | `{row['module']}` | {row['share']:.1%} |" for row in rows]
            out.append("")
        kinds = ("tls", "sqlite", "kernel", "interpreter", "event loop", "libc", "other")
        out += ["#### where each process spends it (ms per message, by perf's shared object)", ""]
        out += ["| system | process / thread | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
        for name, s in split.items():
            for unit, by_kind in s.get("units_by_kind_ms_per_msg", {}).items():
                out.append(f"| {name} | {unit} | " + " | ".join(_fmt(by_kind.get(k, 0.0)) for k in kinds) + " |")
        out.append("")
    return out


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    m = results["machine"]
    out = [
        f"# mxgate bench — {m['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Linux {m['kernel']}, {m['filesystem']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f"; mxgate {m['mxgate_commit']}",
        f"Load: {args.messages} msgs x {args.size} B over {args.sessions} sessions "
        f"({'sessions reused' if args.reuse else 'one message per connection'} in relay); "
        f"latency pass {args.latency_messages} msgs; CPU via {results.get('cpu_method', '?')}",
        "",
    ]
    sc = results["scenarios"]
    if "relay" in sc:
        r = sc["relay"]
        out += ["## relay (smtp-source: rates, CPU, memory; loadgen: latency)", ""]
        ratios = [("mxgate/postfix", "mxgate", "postfix"), ("mxgate/floor", "mxgate", "floor")]
        if "mxgate-default" in r:
            ratios.append(("default/postfix", "mxgate-default", "postfix"))
        out += table(r, ratios)
        out.append("")
    if "relay" in sc:
        for system, r in sc["relay"].items():
            prof = r.get("profile") if isinstance(r, dict) else None
            if not prof:
                continue
            out += [
                f"### profile: {system} (py-spy, {prof['samples']} samples of an extra pass at "
                f"{_fmt(prof['accept_rate_while_profiled'])} msg/s; share of busy samples)",
                "",
                "| self | function | inclusive | function |",
                "|---|---|---|---|",
            ]
            for a, b in zip(prof["self"][:12], prof["inclusive"][:12], strict=False):
                out.append(f"| {a['share']:.1%} | `{a['function']}` | {b['share']:.1%} | `{b['function']}` |")
            acts = ", ".join(f"{t['share']:.0%} `{t['function']}`" for t in prof.get("activities", []))
            out += ["", f"Samples by outermost project frame (thread loop or task): {acts}", ""]
    for name in ("tls", "dane"):
        if name in sc:
            out += [f"## {name} (loadgen, sessions kept open, after a warm-up; sink: countsink)", ""]
            for system, arms in sc[name].items():
                if "skipped" in arms or "error" in arms:
                    out += [f"- {system}: {_status(arms)}", ""]
                    continue
                other = "starttls" if name == "tls" else "dane"
                out += [f"### {system}", ""]
                out += table(arms, [(f"{other}/plain", other, "plain")])
                out.append("")
            if name == "tls":
                pf, mx = sc[name].get("postfix", {}), sc[name].get("mxgate", {})
                if "starttls" in pf and "starttls" in mx:
                    out += ["STARTTLS, mxgate vs Postfix:", ""]
                    out += table(
                        {"postfix": pf["starttls"], "mxgate": mx["starttls"]},
                        [("mxgate/postfix", "mxgate", "postfix")],
                    )
                    out.append("")
    if "backlog" in sc:
        out += render_backlog(sc["backlog"], args)
    if "idle" in sc:
        out += ["## idle sessions (loadgen --idle: connect + EHLO, then hold)", ""]
        out += ["| system | sessions | ready | RSS KB/session | PSS KB/session | RSS MB held | PSS MB held |"]
        out += ["|---|---|---|---|---|---|---|"]
        for system, counts in sc["idle"].items():
            for count, r in counts.items():
                if _status(r):
                    out.append(f"| {system} | {count} | {_status(r)} | | | | |")
                    continue
                out.append(
                    f"| {system} | {count} | {r['ready']} | {_fmt(r['rss_kb_per_conn'])} | "
                    f"{_fmt(r['pss_kb_per_conn'])} | {_fmt(r['rss_mb'])} | {_fmt(r['pss_mb'])} |"
                )
        out.append("")
    if "edge" in sc:
        out += render_edge(sc["edge"])
    return "\n".join(out)


def render_backlog(runs: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """One row per pass; a deep pass's rates and CPU also as ratios to the empty-queue passes just before and
    after it (their mean), an empty pass's to the mean of all empty passes."""
    out = [
        f"## backlog (smtp-source, {args.messages} msgs; deferred mail to a 4xx destination in the queue, "
        f"{'due at start' if args.backlog_due else 'not due'})",
        "",
        "| deferred | acceptance msg/s | end-to-end msg/s | accept / empty | e2e / empty | main CPU ms / delivery "
        "| CPU / empty | group CPU s / 1000 | main RSS MB started / end | peak RSS MB (sum) | start-up s "
        "| queue list s | list --after s | queue show s | mxgate version s "
        "| store ms: counts / list page / page --after / show | prefill s |",
        "|" + "---|" * 17,
    ]
    labels = list(runs)

    def base(key: str, i: int) -> float | None:
        if labels[i].startswith("0 "):
            around = [r for k, r in runs.items() if k.startswith("0 ")]
        else:
            around = [runs[labels[j]] for j in (i - 1, i + 1) if 0 <= j < len(labels) and labels[j].startswith("0 ")]
        vals = [r[key] for r in around if r.get("ok") and isinstance(r.get(key), int | float)]
        return sum(vals) / len(vals) if vals else None

    for i, (label, r) in enumerate(runs.items()):
        if _status(r):
            out.append(f"| {label} | {_status(r)} |" + " |" * 15)
            continue
        cli = r.get("cli", {})
        out.append(
            "| "
            + " | ".join(
                [
                    label,
                    _fmt(r.get("accept_rate")),
                    _fmt(r.get("e2e_rate")),
                    _fmt(_ratio(r.get("accept_rate"), base("accept_rate", i))),
                    _fmt(_ratio(r.get("e2e_rate"), base("e2e_rate", i))),
                    _fmt(r.get("main_cpu_ms_per_delivery")),
                    _fmt(_ratio(r.get("main_cpu_ms_per_delivery"), base("main_cpu_ms_per_delivery", i))),
                    _fmt(r.get("cpu_s_per_1000")),
                    f"{_fmt(r.get('main_rss_started_mb'))} / {_fmt(r.get('main_rss_end_mb'))}",
                    _fmt(r.get("peak_rss_mb")),
                    _fmt(r.get("startup_s")),
                    *(
                        _fmt(cli.get(k, {}).get("s"))
                        for k in ("queue list", "queue list --after", "queue show", "version")
                    ),
                    " / ".join(
                        _fmt(r.get("store_ms", {}).get(k)) for k in ("counts", "list page", "list page --after", "show")
                    ),
                    _fmt(r.get("prefill_s")),
                ]
            )
            + " |"
        )
    return [*out, ""]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_exit()
    cleanup = Cleanup()
    created = args.workdir is None
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mxbench-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(args.workdir, 0o755)  # Postfix's daemons walk into it
    if created:
        cleanup.add("workdir", lambda: shutil.rmtree(args.workdir, ignore_errors=True))
    results: dict[str, Any] = {"machine": machine(args.workdir), "args": {}, "scenarios": {}}
    results["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "cache"}
    started = time.monotonic()
    try:
        for name in args.scenarios:
            results["scenarios"][name] = scenarios.SCENARIOS[name](args)
    finally:
        cleanup.run()
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["cpu_method"] = next(iter(_methods(results["scenarios"])), "?")
    print(render(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    failed = [s for s in _statuses(results["scenarios"]) if s.startswith("FAILED")]
    return 1 if failed else 0


def _walk(obj: Any) -> Any:
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from _walk(v)


def _methods(sc: dict[str, Any]) -> list[str]:
    return [d["cpu_method"] for d in _walk(sc) if "cpu_method" in d]


def _statuses(sc: dict[str, Any]) -> list[str]:
    return [s for d in _walk(sc) if ("ok" in d or "skipped" in d) and (s := _status(d))]


if __name__ == "__main__":
    sys.exit(main())
