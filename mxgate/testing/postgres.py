"""A real PostgreSQL server for tests: ``initdb`` and ``pg_ctl`` in a temporary directory, on a free loopback port,
its Unix socket in that directory, run as an unprivileged user (PostgreSQL refuses to run as root; CI runs as root,
so the server runs as ``nobody`` through ``setpriv``). Debian's ``postgresql`` package provides the binaries
(``make deps``).

Fixtures: ``postgresql_server`` (one server per test session; ``stop()``/``start()`` for fault tests) and
``postgresql_url`` (a fresh, empty database on it per test)::

    def test_cluster(postgresql_url):
        # "postgresql://postgres@127.0.0.1:PORT/t_..."
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

FIXTURES = ("postgresql_server", "postgresql_url")

UNPRIVILEGED = ("nobody", "nogroup")
START_TIMEOUT = 60


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in ``directory``, listening on 127.0.0.1:``port`` only, trust authentication (a
    test server: nothing but this machine's loopback reaches it)."""

    def __init__(self, directory: Path, bindir: Path) -> None:
        self.directory = directory
        self.bindir = bindir
        self.data = directory / "data"
        self.sockets = directory / "sockets"
        self.log = directory / "server.log"
        self.port = _free_port()
        self.user = "postgres"

    def _cmd(self, *args: str) -> list[str]:
        if os.geteuid() != 0:
            return list(args)
        user, group = UNPRIVILEGED
        return ["setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups", "--", *args]

    def _run(self, *args: str, timeout: float = START_TIMEOUT) -> None:
        proc = subprocess.run(self._cmd(*args), capture_output=True, timeout=timeout, check=False, cwd=self.directory)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")

    def init(self) -> None:
        self.sockets.mkdir()
        if os.geteuid() == 0:
            import grp
            import pwd

            uid, gid = pwd.getpwnam(UNPRIVILEGED[0]).pw_uid, grp.getgrnam(UNPRIVILEGED[1]).gr_gid
            for path in (self.directory, self.sockets):
                os.chown(path, uid, gid)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: clients are disconnected, as when an operator restarts the server; ``immediate``: a crash."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        proc = subprocess.run(
            self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"),
            capture_output=True,
            timeout=30,
            check=False,
        )
        return proc.returncode == 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    bindir = _bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (Debian package postgresql: `make deps`)")
    directory = Path(tempfile.mkdtemp(prefix="mxgate-pg-"))
    server = PostgresServer(directory, bindir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(Exception):
            if server.running():
                server.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[PostgresServer]:
    pytest.importorskip("psycopg", reason="cluster tests need the mxgate[cluster] extra")
    with postgres_server() as server:
        yield server


@pytest.fixture
def postgresql_url(postgresql_server: PostgresServer) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    if not postgresql_server.running():  # a fault test left it stopped
        postgresql_server.start()
    while True:
        try:
            return postgresql_server.create_database()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
