"""The built-in credentials source, the failure limiter and `mxgate user`."""

from __future__ import annotations

import asyncio
import io
import stat
import sys
import threading
from pathlib import Path

import pytest

from mxgate.core.auth import FailureLimiter, KdfPool, KdfPoolFull, UsersFile, hash_password, verify_password
from mxgate.core.cli import main
from mxgate.core.model import AuthResult


def test_hash_roundtrip_and_salt() -> None:
    a, b = hash_password("s3cret", log2_n=10), hash_password("s3cret", log2_n=10)
    assert a != b and a.startswith("scrypt$10$8$1$")
    assert verify_password("s3cret", a) and not verify_password("S3cret", a)
    assert not verify_password("s3cret", "garbage") and not verify_password("x", "md5$1$2$3$4$5")


def test_users_file(tmp_path: Path) -> None:
    users = UsersFile(tmp_path / "users")
    assert users.verify("alice", "pw") is None  # unknown user: abstain
    assert users.add("alice", "pw") is True
    assert users.add("alice", "pw2") is False
    assert stat.S_IMODE((tmp_path / "users").stat().st_mode) == 0o600
    assert users.verify("alice", "pw2") == AuthResult.success("alice")
    bad = users.verify("alice", "pw")
    assert bad is not None and not bad.ok
    assert "pw2" not in (tmp_path / "users").read_text()
    assert users.users() == ["alice"]
    assert users.remove("alice") and not users.remove("alice")
    with pytest.raises(ValueError):
        users.add("bad:name", "x")
    with pytest.raises(ValueError):
        users.add("ok", "")


def test_limiter_window() -> None:
    now = [1000.0]
    lim = FailureLimiter(limit=3, window=60, clock=lambda: now[0], max_clients=2)
    for _ in range(3):
        assert not lim.blocked("1.2.3.4")
        lim.failed("1.2.3.4")
    assert lim.blocked("1.2.3.4") and not lim.blocked("5.6.7.8")
    now[0] += 61
    assert not lim.blocked("1.2.3.4")
    lim.failed("a")
    lim.failed("b")
    lim.failed("c")  # bounded memory: the oldest client is forgotten
    assert len(lim._fails) <= 2
    lim.succeeded("c")
    assert not lim.blocked("c")


def test_limiter_counts_attempts_in_progress() -> None:
    lim = FailureLimiter(limit=3, window=60, clock=lambda: 1000.0)
    assert [lim.reserve("ip") for _ in range(4)] == [True, True, True, False]  # the 4th races in: refused
    assert lim.blocked("ip")
    lim.failed("ip")
    lim.release("ip")
    assert lim.blocked("ip")  # one failure + two in progress
    lim.release("ip")
    lim.release("ip")
    assert not lim.blocked("ip") and lim.reserve("ip")
    lim.succeeded("ip")
    lim.release("ip")
    assert lim._pending == {} and lim._fails == {}


@pytest.mark.asyncio
async def test_kdf_pool_is_bounded() -> None:
    pool = KdfPool(workers=1, max_pending=2)
    gate = threading.Event()
    try:
        first = asyncio.ensure_future(pool.run(gate.wait, 10))
        second = asyncio.ensure_future(pool.run(lambda: "queued"))
        await asyncio.sleep(0)
        with pytest.raises(KdfPoolFull):
            await pool.run(lambda: "refused")
        gate.set()
        assert await first is True and await second == "queued"
        assert await pool.run(lambda: 42) == 42  # room again
        assert pool.runs == 3
    finally:
        gate.set()
        pool.shutdown()


def test_cli_user_add_list_remove(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "users"
    monkeypatch.setattr(sys, "stdin", io.StringIO("hunter2\n"))
    assert main(["user", "add", "bob", "--users-file", str(path)]) == 0
    pwfile = tmp_path / "pw"
    pwfile.write_text("other\n")
    assert main(["user", "add", "carol", "--users-file", str(path), "--password-file", str(pwfile)]) == 0
    capsys.readouterr()
    assert main(["user", "list", "--users-file", str(path)]) == 0
    assert capsys.readouterr().out.split() == ["bob", "carol"]
    result = UsersFile(path).verify("bob", "hunter2")
    assert result is not None and result.ok
    assert main(["user", "remove", "bob", "--users-file", str(path)]) == 0
    assert main(["user", "remove", "bob", "--users-file", str(path)]) == 1
