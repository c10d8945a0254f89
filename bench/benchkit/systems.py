"""The systems under test, behind one small interface: the floor, Postfix, mxgate.

Each runs in its own :class:`~benchkit.procs.ProcGroup` (CPU and memory are measured per group); sinks and load
drivers run outside it.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchkit import postfix
from benchkit.procs import ProcGroup, free_port, stop_process, wait_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
NOFILE = 65536


def raise_nofile() -> None:
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = NOFILE if os.geteuid() == 0 else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), max(hard, target)))


@dataclass
class Options:
    """How one system is set up for one measurement."""

    sink_port: int | None = None  # None: nothing to relay to (the floor)
    tls_cert: str | None = None  # inbound STARTTLS
    tls_key: str | None = None
    outbound_tls: bool = False  # STARTTLS to the sink
    ca_file: str | None = None  # the sink's CA (for certificate checks outbound)
    dane: dict[str, Any] | None = None  # {"resolver": "127.0.0.1:port", "domain": "dane.test"}
    max_sessions: int | None = None  # inbound sessions the system must hold (idle scenario)
    workers: int = 1  # the floor: processes sharing its listener
    postfix_extra: dict[str, str] = field(default_factory=dict)  # more main.cf settings (Postfix only)
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_outbound: list[dict[str, Any]] = field(default_factory=list)  # mxgate: connectors before the bench one
    prefill: Callable[[Path], None] | None = None  # mxgate: called with the state directory before it starts


class System:
    name = "?"
    relays = True

    def __init__(self, workdir: Path, python: str = sys.executable) -> None:
        self.workdir = workdir
        self.python = python
        self.group = ProcGroup(self.name)
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.loop = "default"  # mxgate: "default" (what `mxgate run` picks: uvloop when installed) or "asyncio"
        self.receive_workers: int | None = 1  # mxgate: server.receive_workers; None: not set (the default)

    def _preexec(self) -> None:
        self.group.join()
        raise_nofile()

    def start(self, opts: Options) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        stop_process(self.proc, timeout=20.0)
        self.proc = None
        self.group.kill_all()

    def close(self) -> None:
        self.stop()
        self.group.close()

    def log_tail(self, lines: int = 8) -> str:
        if self.log_path is None:
            return ""
        with contextlib.suppress(OSError):
            return "\n".join(x[:300] for x in self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def _spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.log_path = Path(tempfile.mkstemp(prefix=f"mxbench-{self.name}-", suffix=".log", dir=self.workdir)[1])
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(REPO),
                env={**os.environ, **(env or {})},
                preexec_fn=self._preexec,
                start_new_session=True,
            )
        self.group.add_root(self.proc.pid)
        if not wait_port(self.host, self.port, 60.0, proc=self.proc):
            tail = self.log_tail()
            self.stop()
            raise RuntimeError(f"{self.name} did not start listening on {self.host}:{self.port}:\n{tail}")


class Floor(System):
    """Bare aiosmtpd answering 250 without storing (benchkit/floor.py)."""

    name = "floor"
    relays = False

    def start(self, opts: Options) -> None:
        self.port = free_port()
        cmd = [self.python, str(HERE / "floor.py"), "--port", str(self.port), "--max-seconds", "7200"]
        cmd += ["--workers", str(opts.workers)]
        if opts.tls_cert:
            cmd += ["--tls-cert", opts.tls_cert, "--tls-key", str(opts.tls_key)]
        self._spawn(cmd)


class Postfix(System):
    name = "postfix"

    def __init__(self, workdir: Path, python: str = sys.executable) -> None:
        super().__init__(workdir, python)
        self.instance: postfix.PostfixInstance | None = None

    def start(self, opts: Options) -> None:
        smtp_tls = "encrypt" if opts.outbound_tls else None
        self.instance = postfix.PostfixInstance(
            self.group,
            relay_port=opts.sink_port,
            tls_cert=opts.tls_cert,
            tls_key=opts.tls_key,
            smtp_tls=smtp_tls,
            smtpd_maxproc=(opts.max_sessions + 10) if opts.max_sessions else None,
            workdir=self.workdir,
            dane_nexthop=f"{opts.dane['domain']}:{opts.sink_port}" if opts.dane else None,
            resolver=opts.dane["resolver"].split(":")[0] if opts.dane else None,
            extra=opts.postfix_extra,
        )
        try:
            self.instance.start()
        except BaseException:
            self.instance.stop()
            self.instance = None
            raise
        self.port = self.instance.port

    def stop(self) -> None:
        if self.instance is not None:
            self.instance.stop()
            self.instance = None
        self.group.kill_all()

    def log_tail(self, lines: int = 30) -> str:
        return self.instance.log_tail(lines) if self.instance else ""


def mxgate_available() -> str | None:
    """None when ``mxgate run`` can accept and relay mail; else why not."""
    core = REPO / "mxgate" / "core"
    missing = [p for p in ("smtp/server.py", "delivery.py") if not (core / p).exists() and not (core / p[:-3]).is_dir()]
    if missing:
        return f"not built yet: mxgate/core/{', mxgate/core/'.join(missing)} missing"
    return None


class Mxgate(System):
    """``mxgate run --config FILE`` with a smart-host (or DANE/MX) outbound connector."""

    name = "mxgate"

    def config(self, opts: Options, state_dir: Path) -> dict[str, Any]:
        listener: dict[str, Any] = {"name": "smtp", "address": f"{self.host}:{self.port}"}
        if opts.tls_cert:
            listener.update(tls_cert=opts.tls_cert, tls_key=opts.tls_key)
        outbound: dict[str, Any] = {
            "name": "bench",
            "recipient_domains": ["*"],
            # Postfix's default_destination_concurrency_limit is 20: the same concurrency towards the sink
            "max_connections": 20,
            "max_connections_per_destination": 20,
            "tls": "encryption_only" if opts.outbound_tls else "none",
            "retry_first": 5.0,
        }
        dns: dict[str, Any] = {"resolvers": [f"127.0.0.1:{free_port()}"], "timeout": 0.5}  # nobody listens
        if opts.dane:
            outbound.update(use_mx=True, mx_port=opts.sink_port, dane="mandatory", tls="opportunistic")
            outbound["recipient_domains"] = [opts.dane["domain"]]
            dns = {
                "resolvers": [opts.dane["resolver"]],
                "timeout": 2.0,
                "self_test_secure": opts.dane["domain"],
                "self_test_bogus": opts.dane["bogus"],
            }
        else:
            outbound["smart_hosts"] = [f"127.0.0.1:{opts.sink_port}"]
        server: dict[str, Any] = {"hostname": "mxgate.bench.test", "state_dir": str(state_dir)}
        if self.receive_workers is not None:
            server["receive_workers"] = self.receive_workers
        return {
            "server": server,
            "listener": [listener],
            "inbound_connector": [{"name": "bench", "sender_ips": ["127.0.0.0/8"], "may_relay": True}],
            "outbound_connector": [*opts.extra_outbound, outbound],
            "dns": dns,
            "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        }

    def start(self, opts: Options) -> None:
        """Ports are picked free but may be taken before mxgate binds them (the idle scenario's thousands of
        client sockets use the same ephemeral range): up to three attempts with fresh ports."""
        for attempt in range(3):
            try:
                self._start_once(opts)
                return
            except RuntimeError as exc:
                if "address already in use" not in str(exc) or attempt == 2:
                    raise

    def _start_once(self, opts: Options) -> None:
        import tomli_w

        self.stop()
        self.port = free_port()
        run_dir = Path(tempfile.mkdtemp(prefix="mxbench-mxgate-", dir=self.workdir))
        self.run_dir = run_dir
        path = run_dir / "mxgate.toml"
        path.write_text(tomli_w.dumps(self.config(opts, run_dir / "var")))
        if opts.prefill is not None:
            opts.prefill(run_dir / "var")
        if self.loop == "asyncio":  # hide uvloop: engine.run falls back to asyncio.run
            cmd = [self.python, str(HERE / "mxgate_asyncio.py")]
        else:
            cmd = [self.python, "-m", "mxgate"]
        self._spawn([*cmd, "run", "--config", str(path)], env=opts.extra_env)

    def stop(self) -> None:
        super().stop()
        run_dir = getattr(self, "run_dir", None)
        if run_dir is not None:
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
            self.run_dir = None


class MxgateDefault(Mxgate):
    """mxgate as a new user runs it: ``server.receive_workers`` left at its default (``"auto"``)."""

    name = "mxgate-default"

    def __init__(self, workdir: Path, python: str = sys.executable) -> None:
        super().__init__(workdir, python)
        self.receive_workers = None


SYSTEMS: dict[str, type[System]] = {
    "floor": Floor,
    "postfix": Postfix,
    "mxgate": Mxgate,
    "mxgate-default": MxgateDefault,
}
