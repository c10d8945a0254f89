"""Running in production (issue 23): ``mxgate run`` as an operator starts it — as root on a privileged port with
``server.user`` set, and under systemd socket activation (the test plays systemd) — then real mail through it.

The gateway runs as a real process in its own process group, killed by id in ``finally``. Every wait is a bounded
poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from mxgate.testing.sinks import SmtpSink

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_privileged_port() -> int:
    """A port below 1024 that nothing listens on at 127.0.0.1 (needs root to try)."""
    for port in range(741, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free privileged port on 127.0.0.1")


def document(state: Path, listeners: list[dict[str, Any]], sink_port: int, **server: Any) -> dict[str, Any]:
    return {
        "server": {
            "hostname": "mx.gateway.test",
            "state_dir": str(state),
            "accepted_domains": ["example.org"],
            **server,
        },
        "listener": listeners,
        "outbound_connector": [
            {
                "name": "inside",
                "recipient_domains": ["*"],
                "smart_hosts": [f"127.0.0.1:{sink_port}"],
                "tls": "none",
                "retry_first": 1.0,
            }
        ],
        "dns": {"resolvers": [f"127.0.0.1:{free_port()}"], "timeout": 0.5},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
    }


def env() -> dict[str, str]:
    out = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        out.pop(name, None)
    return out


@contextlib.contextmanager
def gateway(argv: list[str], log: Path, **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env(), start_new_session=True, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def wait_banner(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(5)
            if s.recv(512).startswith(b"220"):
                return
        time.sleep(0.05)
    raise AssertionError(f"no banner on {port} in {START_TIMEOUT} s:\n{log.read_text(errors='replace')[-3000:]}")


def send(port: int, rcpt: str = "alice@example.org") -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        code, text = client.mail("bob@sender.test")
        assert code == 250, text
        code, text = client.rcpt(rcpt)
        assert code == 250, text
        code, text = client.data(b"Subject: hi\r\n\r\nhello\r\n")
        assert code == 250, text
        return text.decode()


def problems(stderr: str) -> list[str]:
    """What ``mxgate`` said on stderr apart from its log lines (logfmt: ``ts=...``); never a traceback."""
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("ts=")]


def ids(pid: int, field: str) -> list[int]:
    """The real, effective, saved and file-system ids (``Uid:``/``Gid:``) of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def groups(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Groups:"):
            return [int(x) for x in line.split()[1:]]
    return []


def _reachable_by_others(path: Path) -> bool:
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in [path, *path.parents])


def as_other_user(argv: list[str], scratch: Path) -> list[str]:
    """``argv`` such that the interpreter stays readable by an unprivileged user after the drop. Where this
    machine's Python lives under a directory only root may enter (/root/.pyenv), the gateway runs in a private
    mount namespace in which that directory is replaced by one that others may traverse, holding only the Python
    installation (bind-mounted, read-only as before)."""
    for code in (REPO, Path(sys.prefix).resolve()):  # mxgate's source and its virtual environment
        if not _reachable_by_others(code):
            pytest.skip(f"{code} is closed to other users: the gateway could not import itself after the drop")
    base = Path(sys.base_prefix).resolve()
    if _reachable_by_others(base):
        return argv
    blocked = next(p for p in reversed([base, *base.parents]) if not p.stat().st_mode & stat.S_IXOTH)
    if shutil.which("unshare") is None:
        pytest.skip(f"{blocked} is closed to other users and unshare(1) is missing")
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"{blocked} is closed to other users and this machine allows no mount namespace")
    rel = base.relative_to(blocked)
    script = (
        'set -e; keep="$4"; mkdir "$keep"; mount --bind "$1" "$keep"; '
        'mount -t tmpfs -o mode=0711 tmpfs "$2"; mkdir -p "$2/$3"; mount --bind "$keep" "$2/$3"; '
        'shift 4; exec "$@"'
    )
    where = [str(base), str(blocked), str(rel), str(scratch / "python")]
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *where, *argv]


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is 0700 under root)."""
    path = Path(tempfile.mkdtemp(prefix="mxgate-prod-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="binding a privileged port and dropping to a user needs root")
async def test_root_binds_a_privileged_port_then_serves_as_server_user(open_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    port = free_privileged_port()
    state = open_dir / "state"
    state.mkdir(mode=0o700)
    (state / "left-by-root").write_bytes(b"")  # a file an earlier root run left: handed over too
    config = open_dir / "mxgate.toml"
    async with SmtpSink() as sink:
        doc = document(state, [{"name": "smtp", "address": f"127.0.0.1:{port}"}], sink.port, user="nobody")
        config.write_text(tomli_w.dumps(doc))
        log = open_dir / "gateway.log"
        argv = as_other_user([sys.executable, "-m", "mxgate", "run", "--config", str(config)], open_dir)
        with gateway(argv, log) as proc:
            await asyncio.to_thread(wait_banner, proc, port, log)
            pid = proc.pid  # unshare and sh exec: the gateway is the process we started
            assert ids(pid, "Uid") == [nobody.pw_uid] * 4
            assert ids(pid, "Gid") == [nobody.pw_gid] * 4
            assert groups(pid) == [nobody.pw_gid]
            reply = await asyncio.to_thread(send, port)
            assert "queued as" in reply
            (message,) = await sink.wait_for(1, timeout=20)
            assert list(message.rcpt_tos) == ["alice@example.org"]
            for path in [state, *state.rglob("*")]:
                assert path.lstat().st_uid == nobody.pw_uid, path
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 30) == 0


def test_server_user_without_root_is_refused(tmp_path: Path) -> None:
    """Not root and not that user: one line, no traceback, nothing bound."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    other = "nobody" if me != "nobody" else "root"
    port = free_port()
    doc = document(tmp_path / "state", [{"name": "smtp", "address": f"127.0.0.1:{port}"}], 1, user=other)
    config = tmp_path / "mxgate.toml"
    config.write_text(tomli_w.dumps(doc))
    if os.geteuid() == 0:
        pytest.skip("root may switch to any user")
    out = subprocess.run(
        [sys.executable, "-m", "mxgate", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
    )
    assert out.returncode == 1
    (line,) = problems(out.stderr)
    assert "server.user" in line


# --- socket activation ------------------------------------------------------------------------------------------

# What systemd does for a service with sockets: descriptors from 3 on, LISTEN_FDS, LISTEN_FDNAMES, and LISTEN_PID
# set to the pid of the process it executes (so the launcher sets it after fork, then execs in the same process).
LAUNCHER = """
import os, sys
fds = [int(x) for x in sys.argv[1].split(",")]
for i, fd in enumerate(fds):
    os.dup2(fd, 1000 + i)
for i in range(len(fds)):
    os.dup2(1000 + i, 3 + i)
    os.close(1000 + i)
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_FDNAMES"] = sys.argv[2]
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "mxgate", *sys.argv[3:]])
"""


def listening(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(16)
    return sock


def activated(socks: list[socket.socket], names: str, args: list[str]) -> list[str]:
    return [sys.executable, "-c", LAUNCHER, ",".join(str(s.fileno()) for s in socks), names, *args]


@pytest.mark.parametrize("workers", [0, 1])
async def test_socket_activation_serves_on_the_sockets_systemd_passed(tmp_path: Path, workers: int) -> None:
    """Two listeners: one socket named after its listener, one under the unit's name (matched by address). The
    test keeps its own copies of the sockets listening, so a gateway that bound the addresses itself would fail
    with "address in use": what it serves on is what it was given."""
    by_name, by_address = free_port(), free_port()
    socks = [listening(by_name), listening(by_address)]
    listeners = [
        {"name": "smtp", "address": f"127.0.0.1:{by_name}"},
        {"name": "submission", "address": f"127.0.0.1:{by_address}"},
    ]
    async with SmtpSink() as sink:
        doc = document(tmp_path / "state", listeners, sink.port, receive_workers=workers)
        config = tmp_path / "mxgate.toml"
        config.write_text(tomli_w.dumps(doc))
        log = tmp_path / "gateway.log"
        argv = activated(socks, "smtp:mxgate", ["run", "-c", str(config)])
        with gateway(argv, log, pass_fds=[s.fileno() for s in socks]) as proc:
            await asyncio.to_thread(wait_banner, proc, by_name, log)
            await asyncio.to_thread(wait_banner, proc, by_address, log)
            for port in (by_name, by_address):
                assert "queued as" in await asyncio.to_thread(send, port)
            await sink.wait_for(2, timeout=20)
            text = log.read_text()
            assert "listener=smtp" in text and "listener=submission" in text and "socket from systemd" in text
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 30) == 0
    for sock in socks:
        sock.close()


def test_socket_activation_refuses_a_socket_no_listener_claims(tmp_path: Path) -> None:
    stray = listening(free_port())
    port = free_port()
    doc = document(tmp_path / "state", [{"name": "smtp", "address": f"127.0.0.1:{port}"}], 1)
    config = tmp_path / "mxgate.toml"
    config.write_text(tomli_w.dumps(doc))
    try:
        out = subprocess.run(
            activated([stray], "other", ["run", "-c", str(config)]),
            capture_output=True,
            text=True,
            env=env(),
            pass_fds=[stray.fileno()],
            timeout=60,
        )
    finally:
        stray.close()
    assert out.returncode == 1
    lines = problems(out.stderr)
    assert len(lines) == 1 and "matches no [[listener]]" in lines[0] and "descriptor 3" in lines[0], out.stderr


def test_a_busy_port_is_one_line_naming_listener_and_port(tmp_path: Path) -> None:
    """Socket activation meant for another process (LISTEN_PID differs) is ignored: the gateway binds itself and
    the port is taken — one line naming the listener and the address."""
    busy = listening(free_port())
    port = busy.getsockname()[1]
    doc = document(tmp_path / "state", [{"name": "smtp", "address": f"127.0.0.1:{port}"}], 1)
    config = tmp_path / "mxgate.toml"
    config.write_text(tomli_w.dumps(doc))
    try:
        out = subprocess.run(
            [sys.executable, "-m", "mxgate", "run", "-c", str(config)],
            capture_output=True,
            text=True,
            env={**env(), "LISTEN_PID": "1", "LISTEN_FDS": "1"},
            timeout=60,
        )
    finally:
        busy.close()
    assert out.returncode == 1
    lines = problems(out.stderr)
    assert len(lines) == 1, out.stderr
    assert "listener smtp" in lines[0] and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0]


async def test_a_second_gateway_on_the_same_state_dir_is_refused(mxgate_gateway: Any) -> None:
    from mxgate.core import bootstrap, engine
    from mxgate.core.errors import StartupError

    first = await mxgate_gateway()
    config, plugins = bootstrap.load(first.config_path, entry_points=False)
    second = engine.Gateway(config, plugins)
    with pytest.raises(StartupError) as caught:
        await second.start()
    message = str(caught.value)
    assert f"in use by another mxgate (pid {os.getpid()}" in message and str(first.state_dir) in message
    assert "\n" not in message
    # the first one still serves
    assert "queued as" in await asyncio.to_thread(send, first.smtp_port, "x@example.net")


async def test_connector_validate_next_to_a_running_gateway(mxgate_gateway: Any) -> None:
    """Issue 23's stumble: the command bound the metrics port (two tracebacks). It delivers and starts nothing;
    the gateway keeps its metrics endpoint."""
    import urllib.request

    from mxgate.core.cli import main

    async with SmtpSink() as sink:
        gw = await mxgate_gateway(
            f"""
            [[outbound_connector]]
            name = "inside"
            recipient_domains = ["*"]
            smart_hosts = ["127.0.0.1:{sink.port}"]
            tls = "none"
            """
        )
        code = await asyncio.to_thread(
            main, ["connector", "validate", "inside", "--to", "alice@example.org", "-c", str(gw.config_path)]
        )
        assert code == 0
        (message,) = await sink.wait_for(1, timeout=20)
        assert list(message.rcpt_tos) == ["alice@example.org"]

        def scrape() -> bytes:
            with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=5) as resp:
                return bytes(resp.read())

        assert b"mxgate_start_time_seconds" in await asyncio.to_thread(scrape)


def test_queue_commands_without_a_gateways_config_create_nothing(tmp_path: Path) -> None:
    """Issue 23's stumble: `queue list` without -c in another directory said "queue is empty" and created ./var."""
    out = subprocess.run(
        [sys.executable, "-m", "mxgate", "queue", "list"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
    )
    assert out.returncode == 1
    (line,) = problems(out.stderr)
    assert "no queue at" in line and "-c FILE" in line and str(tmp_path / "var") in line
    assert list(tmp_path.iterdir()) == []


def test_a_busy_metrics_port_is_one_line_naming_the_port(tmp_path: Path) -> None:
    busy = listening(free_port())
    taken = busy.getsockname()[1]
    doc = document(tmp_path / "state", [{"name": "smtp", "address": f"127.0.0.1:{free_port()}"}], 1)
    doc["metrics"]["listen"] = f"127.0.0.1:{taken}"
    config = tmp_path / "mxgate.toml"
    config.write_text(tomli_w.dumps(doc))
    try:
        out = subprocess.run(
            [sys.executable, "-m", "mxgate", "run", "-c", str(config)],
            capture_output=True,
            text=True,
            env=env(),
            timeout=60,
        )
    finally:
        busy.close()
    assert out.returncode == 1
    (line,) = problems(out.stderr)
    assert "plugin prometheus: cannot start" in line and str(taken) in line and "in use" in line


def test_run_refuses_a_key_that_does_not_match_in_one_line(tmp_path: Path) -> None:
    from mxgate.testing.ca import TestCA

    ca = TestCA.create(tmp_path / "ca")
    ours, other = ca.issue(["mx.gateway.test"]), ca.issue(["mx.gateway.test"])
    listener = {
        "name": "smtp",
        "address": f"127.0.0.1:{free_port()}",
        "tls_cert": str(ours.chain_path),
        "tls_key": str(other.key_path),
    }
    config = tmp_path / "mxgate.toml"
    config.write_text(tomli_w.dumps(document(tmp_path / "state", [listener], 1)))
    out = subprocess.run(
        [sys.executable, "-m", "mxgate", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
    )
    assert out.returncode == 1
    (line,) = problems(out.stderr)
    assert line.startswith("mxgate: listener smtp: ") and str(other.key_path) in line and "does not match" in line
