"""Processes under measurement: CPU seconds of a whole process tree (exited children included), peak memory.

CPU comes from a control group made for the system under test (cgroup v1 ``cpuacct`` or cgroup v2 ``cpu.stat``):
every process it forks is charged there, including Postfix's short-lived smtpd/cleanup/smtp children after they
exit. Without a writable cgroup hierarchy (not root), the fallback sums ``/proc`` times of the processes seen
while sampling -- an underestimate for process-per-task designs, and the report says which method was used.

Memory is sampled (``VmRSS`` summed over the group's processes, and ``Pss`` from ``smaps_rollup``, which shares
libraries and copy-on-write pages fairly between Postfix's processes) every ``interval`` seconds; the peak is kept.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
_V1_ROOT = Path("/sys/fs/cgroup/cpuacct")
_V2_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(
    host: str, port: int, timeout: float, *, banner: bool = True, proc: subprocess.Popen[bytes] | None = None
) -> bool:
    """True once something accepts on host:port (and sends its first byte when ``banner``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=1.0) as s:
                if banner:
                    s.settimeout(2.0)
                    if not s.recv(1):
                        raise OSError("closed")
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _v2_root() -> Path | None:
    for root in _V2_ROOTS:
        if (root / "cgroup.procs").exists() and (root / "cgroup.controllers").exists():
            return root
    return None


class ProcGroup:
    """A set of processes measured together; start children with ``preexec_fn=group.join``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.method = "proc-sampling"
        self.path: Path | None = None
        self._cpu_file: Path | None = None
        self._roots: list[int] = []
        self._seen: dict[int, float] = {}  # pid -> last seen CPU seconds (fallback)
        self._lock = threading.Lock()
        tag = f"mxbench-{os.getpid()}-{name}"
        if os.geteuid() == 0 and (_V1_ROOT / "cpuacct.usage").exists():
            with contextlib.suppress(OSError):
                self.path = _V1_ROOT / tag
                self.path.mkdir(exist_ok=True)
                self._cpu_file = self.path / "cpuacct.usage"
                self.method = "cgroup-v1-cpuacct"
        if self._cpu_file is None and os.geteuid() == 0:
            root = _v2_root()
            if root is not None:
                with contextlib.suppress(OSError):
                    self.path = root / tag
                    self.path.mkdir(exist_ok=True)
                    self._cpu_file = self.path / "cpu.stat"
                    self.method = "cgroup-v2"
        if self._cpu_file is None:
            self.path = None
        atexit.register(self.close)

    # -- membership

    def join(self) -> None:
        """``preexec_fn``: put the calling (child) process into the group before it execs."""
        if self.path is not None:
            with contextlib.suppress(OSError):
                (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def add_root(self, pid: int) -> None:
        """A process whose descendants belong to the group (used by the fallback)."""
        self._roots.append(pid)

    def pids(self) -> list[int]:
        if self.path is not None:
            try:
                return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
            except OSError:
                return []
        return self._descendants()

    def _descendants(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                ppid = _stat_fields(int(entry))
                if ppid is not None:
                    children.setdefault(ppid[0], []).append(int(entry))
        out, todo = [], list(self._roots)
        while todo:
            pid = todo.pop()
            if Path(f"/proc/{pid}").exists():
                out.append(pid)
            todo.extend(children.get(pid, ()))
        return out

    # -- CPU

    def cpu_seconds(self) -> float:
        if self._cpu_file is not None:
            text = self._cpu_file.read_text()
            if self.method == "cgroup-v1-cpuacct":
                return int(text.strip()) / 1e9
            for line in text.splitlines():
                if line.startswith("usage_usec"):
                    return int(line.split()[1]) / 1e6
            return 0.0
        with self._lock:
            for pid in self._descendants():
                fields = _stat_fields(pid)
                if fields is not None:
                    self._seen[pid] = fields[1]
            return sum(self._seen.values())

    # -- memory

    def memory(self, *, pss: bool = True) -> tuple[int, int]:
        """(sum of VmRSS, sum of Pss) in bytes over the group's processes right now."""
        rss = pss_total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
                        break
                if pss:
                    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                        if line.startswith("Pss:"):
                            pss_total += int(line.split()[1]) * 1024
                            break
        return rss, pss_total

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def close(self) -> None:
        """Kill whatever is left in the group and remove the cgroup. Idempotent."""
        if self.path is None:
            return
        deadline = time.monotonic() + 5.0
        while self.pids() and time.monotonic() < deadline:
            self.kill_all()
            time.sleep(0.05)
        with contextlib.suppress(OSError):
            self.path.rmdir()
        self.path = None


def _stat_fields(pid: int) -> tuple[int, float] | None:
    """(ppid, utime+stime+cutime+cstime in seconds) from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2 :].split()
    ppid = int(rest[1])
    ticks = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
    return ppid, ticks / CLK_TCK


class MemSampler:
    """Samples a group's memory in a thread; ``peak_rss``/``peak_pss`` in bytes. ``with MemSampler(group):``."""

    def __init__(self, group: ProcGroup, interval: float = 0.1, pss_every: int = 5) -> None:
        self.group = group
        self.interval = interval
        self.pss_every = pss_every
        self.peak_rss = 0
        self.peak_pss = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"mem-{group.name}", daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            self.sample(pss=n % self.pss_every == 0)
            n += 1
            self._stop.wait(self.interval)

    def sample(self, *, pss: bool = True) -> None:
        rss, pss_value = self.group.memory(pss=pss)
        self.peak_rss = max(self.peak_rss, rss)
        if pss:
            self.peak_pss = max(self.peak_pss, pss_value)
        self.samples += 1

    def __enter__(self) -> MemSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.sample()


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Signal a child we started (its own process group), wait, then SIGKILL the group."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5.0)


class Cleanup:
    """LIFO cleanups that run on normal exit, exceptions, SIGTERM/SIGINT and atexit -- exactly once each."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], object]]] = []
        atexit.register(self.run)

    def add(self, name: str, action: Callable[[], object]) -> None:
        self._actions.append((name, action))

    def run(self) -> None:
        while self._actions:
            _name, action = self._actions.pop()
            with contextlib.suppress(Exception):
                action()


def install_signal_exit(signals: Iterable[int] = (signal.SIGTERM, signal.SIGHUP)) -> None:
    """Turn termination signals into SystemExit so ``finally`` blocks and atexit run."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in signals:
        signal.signal(sig, handler)


def _task_cpu(pid: int, tid: int) -> float | None:
    """utime+stime of one thread in seconds (children not included: they are sampled themselves)."""
    try:
        text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


class StageSampler:
    """CPU seconds per process and thread of a group over a pass, from ``/proc/PID/task/TID/stat``.

    Every ``interval`` seconds each thread of each process in the group is read; the last value seen counts.
    A process that starts and exits between two samples, or the CPU it used after its last sample, is not seen:
    that is the ``unattributed`` rest against the group's exact total (cgroup). Keys are ``(pid, tid, comm)``;
    ``comm`` is the process's name (Postfix's daemons: smtpd, cleanup, qmgr, smtp, tlsproxy, ...).
    """

    def __init__(self, group: ProcGroup, interval: float = 0.1) -> None:
        self.group = group
        self.interval = interval
        self.base: dict[tuple[int, int], float] = {}
        self.last: dict[tuple[int, int], float] = {}
        self.comm: dict[int, str] = {}
        self.total = 0.0
        self._cpu0 = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"stages-{group.name}", daemon=True)

    def sample(self, *, first: bool = False) -> None:
        for pid in self.group.pids():
            if pid not in self.comm:
                with contextlib.suppress(OSError):
                    self.comm[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue
            for tid in tids:
                cpu = _task_cpu(pid, tid)
                if cpu is None:
                    continue
                if first:
                    self.base[(pid, tid)] = cpu
                self.last[(pid, tid)] = cpu

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> StageSampler:
        self._cpu0 = self.group.cpu_seconds()
        self.sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.sample()
        self.total = self.group.cpu_seconds() - self._cpu0

    def per_thread(self) -> dict[tuple[int, int, str], float]:
        """CPU seconds used during the pass, per (pid, tid, process name)."""
        return {
            (pid, tid, self.comm.get(pid, "?")): cpu - self.base.get((pid, tid), 0.0)
            for (pid, tid), cpu in self.last.items()
        }


class PerfRecord:
    """``perf record -a`` (cpu-clock samples of every CPU) during a pass, for the shared object each sample was in.

    Used to split a process's CPU into TLS (libssl, libcrypto, Python's ``_ssl``), SQLite, the kernel (system
    calls, TCP, interrupts charged to the process) and the rest. The whole machine is sampled; :meth:`shares`
    keeps the samples of the threads it is asked about. Not available: ``self.error`` says why.
    """

    def __init__(self, out: Path, freq: int = 199) -> None:
        self.out = out
        self.freq = freq
        self.proc: subprocess.Popen[bytes] | None = None
        self.error: str | None = None

    def __enter__(self) -> PerfRecord:
        import shutil

        exe = shutil.which("perf")
        if exe is None:
            self.error = "perf is not installed (linux-perf)"
            return self
        cmd = [exe, "record", "-e", "cpu-clock", "-F", str(self.freq), "-a", "-q", "-o", str(self.out)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        time.sleep(0.3)  # perf opens its events before the pass starts
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            self.error = f"perf record failed: {err.strip()[-200:]}"
            self.proc = None
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc, sig=signal.SIGINT, timeout=30.0)  # SIGINT: perf writes its file and exits
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def samples(self) -> collections.Counter[tuple[int, int, str]]:
        """Samples per (pid, tid, kind); kind: tls, sqlite, kernel, interpreter (libpython), event loop (uvloop,
        _asyncio), libc or other (the program's own code, other libraries)."""
        counts: collections.Counter[tuple[int, int, str]] = collections.Counter()
        if self.error is not None or not self.out.exists():
            return counts
        res = subprocess.run(
            ["perf", "script", "-i", str(self.out), "-F", "comm,pid,tid,ip,dso"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        for line in res.stdout.splitlines():
            parts = line.rsplit(None, 3)  # comm (may hold spaces), pid/tid, ip, (dso)
            if len(parts) < 4 or "/" not in parts[1]:
                continue
            pid_text, _, tid_text = parts[1].partition("/")
            if not (pid_text.isdigit() and tid_text.isdigit()):
                continue
            counts[(int(pid_text), int(tid_text), _dso_kind(parts[3]))] += 1
        return counts


def _dso_kind(dso: str) -> str:
    if "kernel" in dso or dso.startswith("([k"):
        return "kernel"
    name = dso.rsplit("/", 1)[-1]
    if name.startswith(("libssl", "libcrypto", "_ssl.")):
        return "tls"
    if name.startswith(("libsqlite3", "_sqlite3.")):
        return "sqlite"
    if name.startswith(("libpython", "python")):
        return "interpreter"
    if name.startswith(("loop.cpython", "_asyncio.", "_selectors", "select.")):
        return "event loop"
    if name.startswith("libc."):
        return "libc"
    return "other"
