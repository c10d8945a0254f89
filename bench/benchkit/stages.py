"""CPU per relayed message split by stage (receive, queue, deliver, TLS), for Postfix and for mxgate.

Two measurements of the same pass are combined:

* :class:`~benchkit.procs.StageSampler`: CPU seconds per process and thread from ``/proc`` (exact for what it
  sees; the rest against the group's cgroup total is reported as ``unattributed``);
* :class:`~benchkit.procs.PerfRecord`: ``perf`` samples per thread by shared object, which split a thread's CPU
  into TLS (libssl, libcrypto, ``_ssl``), SQLite, kernel and the rest.

A thread's CPU goes to the stage of its process (Postfix: by daemon name; mxgate: receive worker, the main
process's event-loop thread, its other threads) except the share its perf samples spend in TLS libraries (TLS)
and, in mxgate's event-loop thread, in SQLite (queue). Kernel time stays with its stage and is also reported
on its own (the room a "fewer system calls" change has).
"""

from __future__ import annotations

import collections
from typing import Any

from benchkit.procs import PerfRecord, StageSampler

STAGES = ("receive", "queue", "deliver", "tls", "other")

# Postfix daemons by stage; anything else (master, postlogd, pickup, showq, ...) is "other"
POSTFIX_STAGE = {
    "smtpd": "receive",
    "anvil": "receive",
    "cleanup": "queue",
    "qmgr": "queue",
    "trivial-rewrite": "queue",
    "proxymap": "queue",
    "smtp": "deliver",
    "scache": "deliver",
    "tlsproxy": "tls",
    "tlsmgr": "tls",
}


def _mxgate_unit(pid: int, tid: int, main_pid: int | None) -> tuple[str, str]:
    """(unit label, base stage) of one mxgate thread."""
    if pid != main_pid:
        return ("worker", "receive")
    if tid == pid:
        return ("main: event loop", "deliver")
    return ("main: other threads (queue writer, reader)", "queue")


def split(
    system: str,
    sampler: StageSampler,
    perf: PerfRecord | None,
    messages: int,
    *,
    main_pid: int | None = None,
) -> dict[str, Any]:
    """Stage table in ms of CPU per message, plus the per-unit figures it was made from."""
    samples = perf.samples() if perf is not None else collections.Counter()
    per_thread = sampler.per_thread()
    kinds: dict[tuple[int, int], collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for (pid, tid, kind), n in samples.items():
        kinds[(pid, tid)][kind] += n
    stage_s: collections.Counter[str] = collections.Counter()
    kernel_s: collections.Counter[str] = collections.Counter()
    unit_s: collections.Counter[str] = collections.Counter()
    unit_kind_s: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    thread_s: collections.Counter[str] = collections.Counter()  # single threads: the busiest bounds the rate
    unseen_s = 0.0
    for (pid, tid, comm), cpu in per_thread.items():
        if cpu <= 0:
            continue
        if system == "mxgate":
            unit, base = _mxgate_unit(pid, tid, main_pid)
        else:
            unit, base = comm, POSTFIX_STAGE.get(comm, "other")
        unit_s[unit] += cpu
        thread_s[f"{unit} [{pid}/{tid}]"] += cpu
        k = kinds.get((pid, tid))
        n = sum(k.values()) if k else 0
        if not n:
            stage_s[base] += cpu
            unseen_s += cpu
            continue
        for kind, count in k.items():
            unit_kind_s[unit][kind] += cpu * count / n
        tls = cpu * k["tls"] / n
        sqlite = cpu * k["sqlite"] / n if (system == "mxgate" and base == "deliver") else 0.0
        stage_s["tls"] += tls
        stage_s["queue"] += sqlite
        stage_s[base] += cpu - tls - sqlite
        kernel_s[base] += cpu * k["kernel"] / n  # the TLS libraries run in user space
    attributed = sum(stage_s.values())
    per_msg = 1000.0 / messages if messages else 0.0

    def ms(v: float) -> float:
        return round(v * per_msg, 3)

    busiest = thread_s.most_common(1)
    out: dict[str, Any] = {
        "total_ms_per_msg": ms(sampler.total),
        "attributed_ms_per_msg": ms(attributed),
        "unattributed_ms_per_msg": ms(max(0.0, sampler.total - attributed)),
        "stages_ms_per_msg": {s: ms(stage_s[s]) for s in STAGES},
        "kernel_ms_per_msg": {s: ms(kernel_s[s]) for s in STAGES},
        "units_ms_per_msg": {u: ms(v) for u, v in unit_s.most_common()},
        # each unit's CPU by where perf found it: tls, sqlite, kernel, interpreter, event loop, libc, other
        "units_by_kind_ms_per_msg": {
            u: {kind: ms(v) for kind, v in kinds_s.most_common()} for u, kinds_s in unit_kind_s.items()
        },
        "perf": perf.error if perf is not None and perf.error else ("perf samples" if samples else "none"),
        "perf_samples": sum(sum(kinds[(pid, tid)].values()) for pid, tid, _c in per_thread if (pid, tid) in kinds),
        "without_perf_samples_ms_per_msg": ms(unseen_s),
    }
    if busiest:
        name, cpu = busiest[0]
        out["busiest_thread"] = {"thread": name, "ms_per_msg": ms(cpu)}
    return out


def ceilings(split_result: dict[str, Any], cores: int) -> dict[str, float | None]:
    """msg/s the measured CPU implies: all cores for the gateway alone; one core for its busiest thread."""
    total = split_result.get("total_ms_per_msg") or 0.0
    busiest = (split_result.get("busiest_thread") or {}).get("ms_per_msg") or 0.0
    return {
        "cores_msgs": round(cores * 1000.0 / total, 1) if total else None,
        "busiest_thread_msgs": round(1000.0 / busiest, 1) if busiest else None,
    }
