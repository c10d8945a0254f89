"""Private state files: 0700 directories and 0600 files whatever the umask (mxgate.core.files)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from mxgate.core.files import open_private, private_dir, private_file, state_dir_problem
from mxgate.core.queue.store import DB_NAME, QueueStore
from mxgate.core.tracking import TrackingLog


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_private_dir_and_file_under_umask_022(tmp_path: Path, open_umask: None) -> None:
    target = private_dir(tmp_path / "a" / "b")
    assert _mode(tmp_path / "a") == _mode(target) == 0o700
    f = private_file(target / "x.sqlite3")
    assert _mode(f) == 0o600
    os.close(open_private(target / "log"))
    assert _mode(target / "log") == 0o600


def test_private_dir_when_the_umask_takes_the_owners_bits(tmp_path: Path) -> None:
    old = os.umask(0o277)
    try:
        d = private_dir(tmp_path / "d")
    finally:
        os.umask(old)
    assert _mode(d) == 0o700


def test_existing_files_are_tightened_with_their_companions(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite3"
    for p in (db, tmp_path / "s.sqlite3-wal"):
        p.write_bytes(b"")
        os.chmod(p, 0o644)
    private_file(db, companions=("-wal", "-shm"))
    assert _mode(db) == _mode(tmp_path / "s.sqlite3-wal") == 0o600
    assert not (tmp_path / "s.sqlite3-shm").exists()  # companions are never created


def test_state_dir_problem(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    assert state_dir_problem(tmp_path) is None
    os.chmod(tmp_path, 0o750)
    problem = state_dir_problem(tmp_path)
    assert problem is not None and "0750" in problem and "group- or world-accessible" in problem
    assert state_dir_problem(tmp_path / "missing") is None


@pytest.mark.asyncio
async def test_queue_and_tracking_log_are_private_under_umask_022(tmp_path: Path, open_umask: None) -> None:
    store = await QueueStore.open(tmp_path)
    try:
        await store.put("a@example.net", ("u@example.org",), b"Subject: s\r\n\r\nbody\r\n", now=1000.0)
        log = TrackingLog(tmp_path)
        log.close()
        found = {p.name: _mode(p) for p in tmp_path.iterdir()}
    finally:
        await store.close()
    assert found[DB_NAME] == found[f"{DB_NAME}-wal"] == found["tracking.jsonl"] == 0o600, found


def test_a_dkim_key_others_may_read_is_named_in_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from mxgate.plugins.tlsrpt.send import load_dkim_key

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "dkim.key"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(path, 0o600)
    with caplog.at_level("WARNING"):
        assert load_dkim_key(path).startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert "DKIM key" not in caplog.text
    os.chmod(path, 0o644)
    with caplog.at_level("WARNING"):
        load_dkim_key(path)
    assert "DKIM key" in caplog.text and "0644" in caplog.text
