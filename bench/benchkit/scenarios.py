"""Scenarios: what is started, how it is driven, what is measured. Every wait is bounded."""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchkit import drivers, postfix
from benchkit.procs import MemSampler
from benchkit.sinks import CountingSink
from benchkit.systems import SYSTEMS, Options, System, mxgate_available

MB = 1024 * 1024


def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of one process so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _split_cpu(system: System) -> dict[str, float] | None:
    """mxgate's CPU so far by process: ``main`` (``mxgate run`` itself) and ``workers`` (its children: the receive
    workers), from /proc; ``None`` for other systems."""
    proc = system.proc
    if proc is None or not system.name.startswith("mxgate"):
        return None
    children: list[int] = []
    for task in Path(f"/proc/{proc.pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return {"main": _process_cpu(proc.pid), "workers": sum(_process_cpu(c) for c in children)}


def throughput(
    system: System,
    sink: CountingSink | None,
    args: argparse.Namespace,
    *,
    driver: str,
    messages: int,
    starttls: bool = False,
    reconnect: bool = True,
    rcpt: str = drivers.RCPT,
) -> dict[str, Any]:
    """Drive ``messages`` into the system; acceptance and end-to-end rates, CPU and memory of its group."""
    group = system.group
    base = sink.count if sink is not None else 0
    with MemSampler(group) as mem:
        cpu0 = group.cpu_seconds()
        split0 = _split_cpu(system)
        if driver == "smtp-source":
            d = drivers.smtp_source(
                system.host, system.port, messages=messages, sessions=args.sessions, size=args.size,
                reuse=not reconnect, timeout=args.timeout, rcpt=rcpt,
            )  # fmt: skip
        else:
            d = drivers.loadgen(
                system.host, system.port, messages=messages, sessions=args.sessions, size=args.size,
                reconnect=reconnect, starttls=starttls, timeout=args.timeout, python=args.python, rcpt=rcpt,
            )  # fmt: skip
        cpu_accept = group.cpu_seconds() - cpu0
        t_done: float | None = None
        cpu_total = cpu_accept
        if d.get("ok") and sink is not None and system.relays:
            t_done = sink.wait_for(base + messages, args.timeout)
            cpu_total = group.cpu_seconds() - cpu0
        split1 = _split_cpu(system)
    accepted = d.get("accepted") or 0
    out: dict[str, Any] = {
        "driver": d["tool"],
        "messages": messages,
        "ok": bool(d.get("ok")),
        "error": d.get("error"),
        "accept_rate": _r(accepted / d["elapsed_s"]) if d.get("ok") else None,
        "e2e_rate": None,
        "delivered": (sink.count - base) if sink is not None else None,
        "cpu_s_per_1000": _r((cpu_total if system.relays else cpu_accept) / messages * 1000, 3),
        "cpu_accept_s_per_1000": _r(cpu_accept / messages * 1000, 3),
        "peak_rss_mb": _r(mem.peak_rss / MB),
        "peak_pss_mb": _r(mem.peak_pss / MB),
        "cpu_method": group.method,
    }
    if t_done is not None:
        out["e2e_rate"] = _r(messages / (t_done - d["t0"]))
    elif sink is not None and system.relays and d.get("ok"):
        out["ok"] = False
        out["error"] = f"sink got {sink.count - base} of {messages} within {args.timeout}s"
    if split0 is not None and split1 is not None:
        # by process: the receive worker(s) and the main process (queue, delivery), ms of CPU per message
        out["worker_cpu_ms_per_msg"] = _r((split1["workers"] - split0["workers"]) / messages * 1000, 3)
        out["main_cpu_ms_per_msg"] = _r((split1["main"] - split0["main"]) / messages * 1000, 3)
    if "latency_ms" in d:
        out["latency_ms"] = d["latency_ms"]
    if "setup_ms" in d:
        out["setup_ms"] = d["setup_ms"]
    if d.get("driver_cpu_s") is not None:
        out["driver_cpu_s_per_1000"] = _r(d["driver_cpu_s"] / messages * 1000, 3)  # the load generator's own
    return out


def _systems(args: argparse.Namespace, allowed: tuple[str, ...]) -> list[str]:
    return [s for s in args.systems if s in allowed]


def _skip_reason(name: str) -> str | None:
    if name.startswith("mxgate"):
        return mxgate_available()
    if name == "postfix" and not postfix.available():
        return "needs root and /usr/sbin/postfix"
    return None


def _with_system(name: str, args: argparse.Namespace, body: Callable[[System], dict[str, Any]]) -> dict[str, Any]:
    reason = _skip_reason(name)
    if reason:
        return {"skipped": reason}
    system = SYSTEMS[name](args.workdir, args.python)
    system.loop = args.mxgate_loop
    if name == "mxgate":
        system.receive_workers = args.mxgate_workers
    try:
        return body(system)
    except Exception as exc:  # one system's failure must not hide the others' figures
        return {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "log": system.log_tail(),
            "tb": traceback.format_exc(),
        }
    finally:
        system.close()


# -- plain relay: smtp-source headline + loadgen latency ---------------------------------------------------------


def relay(args: argparse.Namespace) -> dict[str, Any]:
    """Each system measured ``--repeat`` times, interleaved (floor, postfix, mxgate, floor, ...); medians."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.repeat):
        for name in _systems(args, ("floor", "postfix", "mxgate", "mxgate-default")):
            first = rep == 0
            result = _with_system(name, args, lambda system, first=first: _relay_once(system, args, profile=first))
            runs.setdefault(name, []).append(result)
            _progress(args, f"relay #{rep + 1}", name, result)
    return {name: _median(results) for name, results in runs.items()}


def _relay_once(system: System, args: argparse.Namespace, *, profile: bool) -> dict[str, Any]:
    sink = CountingSink("smtp-sink").start() if system.relays else None
    try:
        system.start(Options(sink_port=sink.port if sink else None, workers=args.floor_workers))
        reconnect = not args.reuse
        head = throughput(system, sink, args, driver="smtp-source", messages=args.messages, reconnect=reconnect)
        if not head["ok"]:
            return head  # no latency pass or profile on a system that does not work
        lat = throughput(system, sink, args, driver="loadgen", messages=args.latency_messages, reconnect=reconnect)
        head["latency_ms"] = lat.get("latency_ms")
        head["loadgen_accept_rate"] = lat.get("accept_rate")
        head["ok"] = head["ok"] and lat["ok"]
        head["error"] = head["error"] or lat["error"]
        if profile and args.profile and system.name in ("floor", "mxgate") and system.proc is not None:
            from benchkit.profile import Profiler, summarize

            args.profile.mkdir(parents=True, exist_ok=True)
            raw = args.profile / f"{system.name}-relay.txt"
            with Profiler(system.proc.pid, raw):
                prof = throughput(system, sink, args, driver="smtp-source", messages=args.messages, reconnect=reconnect)
            head["profile"] = {**summarize(raw), "accept_rate_while_profiled": prof["accept_rate"]}
        return head
    finally:
        system.stop()
        if sink is not None:
            sink.stop()


def _interleaved(args: argparse.Namespace, arms: tuple[str, ...]) -> list[str]:
    """``--repeat`` passes of each arm, interleaved (plain, tls, plain, tls, ...), so that drift hits both."""
    return [arm for _ in range(args.repeat) for arm in arms]


def _median(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run's record with every numeric figure replaced by the median over runs; runs kept."""
    if len(results) == 1:
        return results[0]
    good = [r for r in results if r.get("ok")]
    if not good:
        return {**results[0], "runs": results}
    out = dict(good[0])
    for key, value in good[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            vals = [r[key] for r in good if isinstance(r.get(key), int | float)]
            out[key] = statistics.median(vals) if vals else None
    lat = [r["latency_ms"] for r in good if r.get("latency_ms")]
    if lat:
        out["latency_ms"] = {k: statistics.median(x[k] for x in lat if x.get(k) is not None) for k in lat[0]}
    out["runs"] = [{k: v for k, v in r.items() if k not in ("profile", "runs")} for r in results]
    out["ok"] = len(good) == len(results)
    if not out["ok"]:
        out["error"] = "; ".join(str(r.get("error")) for r in results if not r.get("ok"))
    return out


# -- STARTTLS on both legs vs the same path in clear, both driven by loadgen ------------------------------------


def _certs(args: argparse.Namespace) -> dict[str, Any]:
    from mxgate.testing.ca import TestCA

    if "certs" not in args.cache:
        ca = TestCA.create(Path(args.workdir) / "ca")
        args.cache["certs"] = {
            "ca": ca,
            "server": ca.issue(["mx.bench.test", "postfix.bench.test", "mxgate.bench.test", "localhost"]),
            "sink": ca.issue(["mx.dane.test", "sink.bench.test", "localhost"]),
        }
    return dict(args.cache["certs"])


def _warm_pair(
    system: System, args: argparse.Namespace, opts: Options, sink: CountingSink, *, starttls: bool, rcpt: str
) -> dict[str, Any]:
    system.start(opts)
    try:
        warm = max(args.sessions * 4, args.messages // 10)
        w = throughput(
            system, sink, args, driver="loadgen", messages=warm, starttls=starttls, reconnect=False, rcpt=rcpt
        )
        if not w["ok"]:
            return {**w, "error": f"warm-up failed: {w['error']}"}
        return throughput(
            system, sink, args, driver="loadgen", messages=args.messages, starttls=starttls, reconnect=False, rcpt=rcpt
        )
    finally:
        system.stop()


def tls(args: argparse.Namespace) -> dict[str, Any]:
    certs = _certs(args)
    server, sink_cert = certs["server"], certs["sink"]
    results: dict[str, Any] = {}
    for name in _systems(args, ("postfix", "mxgate")):

        def body(system: System) -> dict[str, Any]:
            arms: dict[str, list[dict[str, Any]]] = {}
            for arm in _interleaved(args, ("plain", "starttls")):
                secure = arm == "starttls"
                sink = CountingSink(
                    "countsink",
                    tls_cert=str(sink_cert.chain_path) if secure else None,
                    tls_key=str(sink_cert.key_path) if secure else None,
                    python=args.python,
                    tickets=args.sink_tickets,
                ).start()
                try:
                    opts = Options(
                        sink_port=sink.port,
                        tls_cert=str(server.chain_path) if secure else None,
                        tls_key=str(server.key_path) if secure else None,
                        outbound_tls=secure,
                        ca_file=str(certs["ca"].cert_path) if secure else None,
                    )
                    arms.setdefault(arm, []).append(
                        _warm_pair(system, args, opts, sink, starttls=secure, rcpt=drivers.RCPT)
                    )
                finally:
                    sink.stop()
            return {arm: _median(runs) for arm, runs in arms.items()}

        results[name] = _with_system(name, args, body)
        _progress(args, "tls", name, results[name])
    return results


# -- DANE on the outbound leg (DNS lab), mxgate only -------------------------------------------------------------


def _spki_sha256(cert_path: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def _port_free(port: int) -> bool:
    import socket

    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _dane_lab(args: argparse.Namespace, domain: str) -> tuple[Any, CountingSink, bool]:
    """A DNS lab (not started yet) where ``domain``'s MX is 127.0.0.1 with a TLSA 3 1 1 record for the started
    TLS sink's key, and whether its unbound gets 127.0.0.1:53 (for Postfix's libc resolver)."""
    from benchkit.procs import free_port
    from mxgate.testing.dnslab import DnsLab

    sink_cert = _certs(args)["sink"]
    lab = DnsLab(Path(args.workdir) / "dnslab")
    port53 = os.geteuid() == 0 and _port_free(53)
    if port53:
        lab.nsd_port, lab.unbound_port = free_port(), 53
    sink = CountingSink(
        "countsink",
        tls_cert=str(sink_cert.chain_path),
        tls_key=str(sink_cert.key_path),
        python=args.python,
        tickets=args.sink_tickets,
    ).start()
    try:
        z = lab.zone(domain)
        z.add("@", "MX", "10 mx").add("mx", "A", "127.0.0.1")
        # for mxgate's start-up self-test (a name that must validate, one that must fail)
        lab.zone("bogus.test", corrupt="signature").add("@", "A", "127.0.0.1")
        digest = _spki_sha256(Path(sink_cert.cert_path))
        for port in sorted({25, sink.port}):
            z.add(f"_{port}._tcp.mx", "TLSA", f"3 1 1 {digest}")
    except BaseException:
        sink.stop()
        raise
    return lab, sink, port53


def dane(args: argparse.Namespace) -> dict[str, Any]:
    """Plain smart-host relay vs DANE-verified delivery by MX, per system. The DNS lab's unbound listens on
    127.0.0.1:53 when that is free, so that Postfix (libc resolver, port 53 only, given its own resolv.conf in a
    private mount namespace) can take part; otherwise on a free port and Postfix is skipped."""
    domain = "dane.test"
    rcpt = f"rcpt@{domain}"
    results: dict[str, Any] = {}
    lab, sink, port53 = _dane_lab(args, domain)
    try:
        endpoint = lab.start()
        for name in _systems(args, ("postfix", "mxgate")):
            if name == "postfix" and not port53:
                results[name] = {"skipped": "127.0.0.1:53 is taken: Postfix's libc resolver cannot reach the lab"}
                continue

            def body(system: System) -> dict[str, Any]:
                arms: dict[str, list[dict[str, Any]]] = {}
                for arm in _interleaved(args, ("plain", "dane")):
                    if arm == "plain":
                        plain = CountingSink("countsink", python=args.python).start()
                        try:
                            opts = Options(sink_port=plain.port)
                            result = _warm_pair(system, args, opts, plain, starttls=False, rcpt=rcpt)
                        finally:
                            plain.stop()
                    else:
                        dane = {"resolver": f"{endpoint.host}:{endpoint.port}", "domain": domain, "bogus": "bogus.test"}
                        opts = Options(sink_port=sink.port, dane=dane)
                        result = _warm_pair(system, args, opts, sink, starttls=False, rcpt=rcpt)
                    arms.setdefault(arm, []).append(result)
                return {arm: _median(runs) for arm, runs in arms.items()}

            results[name] = _with_system(name, args, body)
            _progress(args, "dane", name, results[name])
    finally:
        lab.stop()
        sink.stop()
    return results


# -- edge: every client connects anew with STARTTLS, delivery by MX with DANE; CPU by stage ----------------------


def edge(args: argparse.Namespace) -> dict[str, Any]:
    """What an edge MTA carries: each message on a new inbound connection with STARTTLS (a full handshake:
    loadgen keeps no TLS sessions), delivered by MX lookup to a DANE-verified (TLSA 3 1 1) sink through the DNS
    lab, outbound TLS sessions reused on both sides (mxgate's pool; Postfix's ``smtp_tls_connection_reuse`` via
    tlsproxy). After a warm-up (DNS caches, outbound sessions), one measured pass per run with the CPU of every
    process and thread sampled from /proc and ``perf record`` alongside, split by stage (benchkit/stages.py)."""
    from benchkit import stages
    from benchkit.procs import PerfRecord, StageSampler

    certs = _certs(args)
    server = certs["server"]
    domain = "dane.test"
    rcpt = f"rcpt@{domain}"
    results: dict[str, Any] = {}
    lab, sink, port53 = _dane_lab(args, domain)
    try:
        endpoint = lab.start()
        dane = {"resolver": f"{endpoint.host}:{endpoint.port}", "domain": domain, "bogus": "bogus.test"}
        opts = Options(
            sink_port=sink.port,
            tls_cert=str(server.chain_path),
            tls_key=str(server.key_path),
            dane=dane,
            # tlsproxy keeps outbound TLS for reuse; sessions are cached for the destination always (Postfix caches
            # on demand only, when a backlog exists: then most deliveries paid a handshake), as mxgate keeps them
            postfix_extra={"smtp_tls_connection_reuse": "yes", "smtp_connection_cache_destinations": domain},
        )
        runs: dict[str, list[dict[str, Any]]] = {}
        for rep in range(args.repeat):  # systems interleaved (postfix, mxgate, postfix, ...), so drift hits both
            for name in _systems(args, ("postfix", "mxgate")):
                if name == "postfix" and not port53:
                    results[name] = {"skipped": "127.0.0.1:53 is taken: Postfix's libc resolver cannot reach the lab"}
                    continue

                def body(system: System, rep: int = rep) -> dict[str, Any]:
                    system.start(opts)
                    try:
                        warm = max(args.sessions * 4, args.messages // 10)
                        w = throughput(system, sink, args, driver="loadgen", messages=warm, starttls=True, rcpt=rcpt)
                        if not w["ok"]:
                            return {**w, "error": f"warm-up failed: {w['error']}"}
                        perf_out = Path(args.workdir) / f"perf-edge-{system.name}-{rep}.data"
                        with StageSampler(system.group) as sampler, PerfRecord(perf_out) as perf:
                            r = throughput(
                                system, sink, args, driver="loadgen", messages=args.messages, starttls=True, rcpt=rcpt
                            )
                        r["outbound_tls"] = _outbound_tls(system)
                        main_pid = system.proc.pid if system.proc is not None else None
                        r["stages"] = stages.split(system.name, sampler, perf, args.messages, main_pid=main_pid)
                        r["stages"]["ceilings"] = stages.ceilings(r["stages"], os.cpu_count() or 1)
                        perf_out.unlink(missing_ok=True)
                        if rep == 0 and args.profile and system.name == "mxgate" and main_pid is not None:
                            from benchkit.profile import Profiler, by_module

                            args.profile.mkdir(parents=True, exist_ok=True)
                            raw = args.profile / f"{system.name}-edge.txt"
                            with Profiler(main_pid, raw):
                                p = throughput(
                                    system, sink, args, driver="loadgen", messages=args.messages, starttls=True,
                                    rcpt=rcpt,
                                )  # fmt: skip
                            r["profile"] = {**by_module(raw, main_pid), "accept_rate_while_profiled": p["accept_rate"]}
                        return r
                    finally:
                        system.stop()

                runs.setdefault(name, []).append(_with_system(name, args, body))
                _progress(args, f"edge #{rep + 1}", name, runs[name][-1])
        for name, results_of in runs.items():
            # the median run's figures; stages, set-up times and the profile are the first good run's
            results[name] = _median(results_of)
    finally:
        lab.stop()
        sink.stop()
    return results


def _outbound_tls(system: System) -> dict[str, int]:
    """How the system's outbound TLS went so far (warm-up included): Postfix's smtp_tls_loglevel 1 lines
    ("Verified TLS connection established/reused"), mxgate's ``mxgate_tls_outcomes_total`` by policy and result."""
    import re
    import tomllib
    import urllib.request

    counts: dict[str, int] = {}
    if system.name == "postfix":
        instance = getattr(system, "instance", None)
        log = Path(instance.dir / "maillog") if instance is not None else None
        if log is not None and log.exists():
            for m in re.finditer(r"(\w+) TLS connection (established|reused) to ", log.read_text(errors="replace")):
                key = f"{m.group(1).lower()} {m.group(2)}"
                counts[key] = counts.get(key, 0) + 1
        return counts
    run_dir = getattr(system, "run_dir", None)
    if run_dir is None:
        return counts
    listen = tomllib.loads((Path(run_dir) / "mxgate.toml").read_text())["metrics"]["listen"]
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for m in re.finditer(r"^mxgate_tls_outcomes_total\{([^}]*)\} ([0-9.e+]+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        key = f"{labels.get('policy_type')} {labels.get('result')}"
        counts[key] = counts.get(key, 0) + int(float(m.group(2)))
    return counts


# -- idle sessions: memory per connection ------------------------------------------------------------------------


def idle(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in _systems(args, ("floor", "postfix", "mxgate")):
        per_count: dict[str, Any] = {}
        for count in args.idle_counts:

            def body(system: System, count: int = count) -> dict[str, Any]:
                sink = CountingSink("smtp-sink").start() if system.relays else None
                try:
                    system.start(Options(sink_port=sink.port if sink else None, max_sessions=count))
                    time.sleep(1.0)
                    base_rss, base_pss = system.group.memory()
                    with drivers.IdleSessions(
                        system.host, system.port, count, starttls=False, timeout=args.timeout
                    ) as held:
                        time.sleep(1.0)
                        sampler = MemSampler(system.group)
                        for _ in range(3):
                            sampler.sample()
                            time.sleep(0.3)
                        ready = held.ready
                    n = int(ready.get("ready") or 0)
                    return {
                        "connections": count,
                        "ready": n,
                        "failed": ready.get("failed"),
                        "connect_s": ready.get("elapsed_s"),
                        "base_rss_mb": _r(base_rss / MB),
                        "rss_mb": _r(sampler.peak_rss / MB),
                        "pss_mb": _r(sampler.peak_pss / MB),
                        "rss_kb_per_conn": _r((sampler.peak_rss - base_rss) / 1024 / n, 2) if n else None,
                        "pss_kb_per_conn": _r((sampler.peak_pss - base_pss) / 1024 / n, 2) if n else None,
                        "ok": n == count,
                        "error": None if n == count else f"only {n} of {count} sessions got an EHLO reply",
                    }
                finally:
                    system.stop()
                    if sink is not None:
                        sink.stop()

            per_count[str(count)] = _with_system(name, args, body)
            _progress(args, f"idle {count}", name, per_count[str(count)])
        results[name] = per_count
    return results


# -- backlog: relay while the queue holds many deferred messages -------------------------------------------------


def backlog(args: argparse.Namespace) -> dict[str, Any]:
    """mxgate relaying to a healthy sink while its queue holds 0, 50,000, 250,000 ... messages deferred for a
    destination that refuses with 4xx (written through the store API before the gateway starts, due 2-3 h
    later: the figures are the cost of carrying the backlog, not of retrying it; ``--backlog-due``: due at
    start). The empty queue is measured before and after each depth, so drift over the scenario shows. Per
    depth: acceptance and end-to-end rates, CPU of the main process per delivery (it queues, schedules and
    delivers; receiving is in the worker), RSS of the main process once started and at the peak, start-up time,
    and the wall time of ``queue list`` / ``queue show`` run as an operator would while the gateway holds the
    backlog."""
    from benchkit import backlog as bk

    # every deep pass between two empty-queue passes, so that a change of the machine's load during the scenario
    # shows (and each depth is compared with its neighbours): 0, 50000, 0, 250000, 0
    depths = [0]
    for d in args.backlog_depths:
        if d:
            depths += [d, 0]
    healthy = CountingSink("smtp-sink").start()
    down = CountingSink("smtp-sink", extra_args=("-r", "rcpt")).start()
    down_connector = {
        "name": "down",
        "recipient_domains": [bk.DOWN_DOMAIN],
        "smart_hosts": [f"127.0.0.1:{down.port}"],
        "tls": "none",
    }
    results: dict[str, Any] = {}
    try:
        for n, depth in enumerate(depths):
            label = f"{depth} #{n // 2 + 1}" if depth == 0 else str(depth)

            def body(system: System, depth: int = depth) -> dict[str, Any]:
                info: dict[str, Any] = {}

                def fill(state_dir: Path) -> None:
                    if depth:
                        info.update(bk.prefill(state_dir, depth, retry_in=-3600.0 if args.backlog_due else 7200.0))

                t0 = time.monotonic()
                system.start(Options(sink_port=healthy.port, extra_outbound=[down_connector], prefill=fill))
                startup = time.monotonic() - t0 - float(info.get("prefill_s", 0.0))
                assert system.proc is not None
                main = system.proc.pid
                rss_started = bk.proc_rss_mb(main)
                cpu0 = bk.proc_cpu(main)
                head = throughput(system, healthy, args, driver="smtp-source", messages=args.messages)
                main_cpu = bk.proc_cpu(main) - cpu0
                config = system.run_dir / "mxgate.toml"
                cli: dict[str, Any] = {"version": bk.timed_cli(args.python, ["version"], system.workdir)}
                cli["queue list"] = bk.timed_cli(
                    args.python, ["queue", "list", "--config", str(config)], system.workdir
                )
                for what, ids in (
                    ("queue list --after", info.get("ids", [])[1:2]),
                    ("queue show", info.get("ids", [])[1:2]),
                ):
                    if ids:
                        argv = (
                            ["queue", "list", "--after", ids[0]]
                            if what.endswith("after")
                            else ["queue", "show", ids[0]]
                        )
                        cli[what] = bk.timed_cli(args.python, [*argv, "--config", str(config)], system.workdir)
                mid = (info.get("ids") or [None, None])[1]
                store_ms = bk.store_timings(system.run_dir / "var", mid)
                return {
                    **head,
                    "store_ms": store_ms,
                    "deferred": info.get("deferred", 0),
                    "prefill_s": info.get("prefill_s"),
                    "startup_s": _r(startup, 2),
                    "main_cpu_ms_per_delivery": _r(main_cpu / args.messages * 1000, 3),
                    "main_rss_started_mb": rss_started,
                    "main_rss_end_mb": bk.proc_rss_mb(main),
                    "cli": cli,
                    "ok": head["ok"] and all(c.get("ok") for c in cli.values()),
                    "error": head["error"]
                    or next((f"{k}: {c['error']}" for k, c in cli.items() if not c.get("ok")), None),
                }

            results[label] = _with_system("mxgate", args, body)
            _progress(args, f"backlog {label}", "mxgate", results[label])
    finally:
        healthy.stop()
        down.stop()
    return results


SCENARIOS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "relay": relay,
    "tls": tls,
    "dane": dane,
    "edge": edge,
    "idle": idle,
    "backlog": backlog,
}


def _progress(args: argparse.Namespace, scenario: str, name: str, result: dict[str, Any]) -> None:
    """A line on stderr per measurement (the full record with -v), so a long run shows where it is."""
    import json
    import sys

    if args.verbose:
        print(f"# {scenario} / {name}: {json.dumps({k: v for k, v in result.items() if k != 'tb'})}", flush=True)
    records = [result] if "ok" in result or "skipped" in result else list(result.values())
    for r in records:
        if not isinstance(r, dict):
            continue
        if "skipped" in r:
            state = "skipped"
        elif r.get("ok"):
            state = f"ok, {r.get('accept_rate') or r.get('ready')} / e2e {r.get('e2e_rate')}"
            if r.get("worker_cpu_ms_per_msg") is not None:
                state += f" / CPU ms/msg worker {r['worker_cpu_ms_per_msg']} main {r['main_cpu_ms_per_msg']}"
        else:
            state = "FAILED: " + " ".join(str(r.get("error")).split())[:160]
        print(f"bench: {scenario} / {name}: {state}", file=sys.stderr, flush=True)
