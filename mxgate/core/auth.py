"""SMTP AUTH: results, the built-in users file (scrypt), the per-address failure limiter, ``mxgate user ...``.

The users file holds one ``name:scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>`` line per user; it is written
atomically with mode 0600. Checking a password costs a deliberately slow scrypt (~50 ms), so callers run
:meth:`UsersFile.verify` off the event loop (the core plugin does, with :func:`asyncio.to_thread`).
Unknown users cost the same time as known ones, so timing does not reveal who exists.

An AUTH flood must not buy KDF runs: the server reserves each attempt in the :class:`FailureLimiter` before the
check (failures plus attempts in progress count against the limit, so parallel connections cannot race past it),
and the checks themselves run in a :class:`KdfPool` -- a few threads of their own with a bounded queue -- so they
neither take every core from the event loop nor pile up memory (16 MiB per running scrypt).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from mxgate.core.files import private_dir
from mxgate.core.model import AuthResult, StashKey

__all__ = [
    "AuthResult",
    "FailureLimiter",
    "KdfPool",
    "KdfPoolFull",
    "UsersFile",
    "hash_password",
    "verify_password",
]

_T = TypeVar("_T")

USERS_FILE_NAME = "users"
# scrypt cost: n = 2**14, r = 8, p = 1 (16 MiB, tens of ms) - the standard library's hashlib.scrypt.
SCRYPT_LOG2_N = 14
SCRYPT_R = 8
SCRYPT_P = 1
_MAXMEM = 64 * 1024 * 1024


def hash_password(password: str, *, log2_n: int = SCRYPT_LOG2_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=1 << log2_n, r=r, p=p, maxmem=_MAXMEM, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${log2_n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, log2_n, r, p, salt_b64, digest_b64 = encoded.split("$")
        if scheme != "scrypt":
            return False
        salt, want = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
        got = hashlib.scrypt(
            password.encode("utf-8"), salt=salt, n=1 << int(log2_n), r=int(r), p=int(p), maxmem=_MAXMEM, dklen=len(want)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


_DUMMY_HASH: str | None = None


def _dummy_hash() -> str:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(secrets.token_hex(8))
    return _DUMMY_HASH


def _check_name(name: str) -> str | None:
    if not name or len(name) > 256:
        return "a user name is 1 to 256 characters"
    if any(c in name for c in ":\r\n\0") or name != name.strip():
        return "a user name may not contain ':', control characters or surrounding spaces"
    return None


class UsersFile:
    """The built-in credentials source. Re-read when the file changes (mtime/size), so ``mxgate user add``
    takes effect without a restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[float, int] | None = None
        self._users: dict[str, str] = {}

    def _load(self) -> dict[str, str]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_mtime, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                users: dict[str, str] = {}
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    name, sep, encoded = line.partition(":")
                    if sep and name and not name.startswith("#"):
                        users[name] = encoded.strip()
                self._users, self._stamp = users, stamp
            return self._users

    def users(self) -> list[str]:
        return sorted(self._load())

    def verify(self, username: str, password: str) -> AuthResult | None:
        """Blocking (scrypt). ``None`` = this file does not know the user (after a dummy hash, for timing)."""
        encoded = self._load().get(username)
        if encoded is None:
            verify_password(password, _dummy_hash())
            return None
        if verify_password(password, encoded):
            return AuthResult.success(username)
        return AuthResult.failure("wrong password")

    def _write(self, users: dict[str, str]) -> None:
        private_dir(self.path.parent)
        fd, tmp = tempfile.mkstemp(prefix=".users.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                os.fchmod(fh.fileno(), 0o600)
                fh.write("# mxgate users: name:scrypt$log2n$r$p$salt$hash (managed by `mxgate user`)\n")
                for name in sorted(users):
                    fh.write(f"{name}:{users[name]}\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def add(self, name: str, password: str) -> bool:
        """Add or replace a user; True when the user is new."""
        problem = _check_name(name)
        if problem:
            raise ValueError(problem)
        if not password:
            raise ValueError("empty password")
        users = dict(self._load())
        new = name not in users
        users[name] = hash_password(password)
        self._write(users)
        return new

    def remove(self, name: str) -> bool:
        users = dict(self._load())
        if users.pop(name, None) is None:
            return False
        self._write(users)
        return True


class FailureLimiter:
    """Failed AUTH attempts per client address in a sliding window; blocked once ``limit`` is reached.

    An attempt is reserved (:meth:`reserve`) before its password is checked and released after it: failures plus
    attempts in progress count against the limit, so 200 parallel connections get at most ``limit`` checks.
    Memory is bounded: at most ``max_clients`` addresses are tracked (the oldest forgotten first); attempts in
    progress are bounded by the connections open.
    """

    def __init__(
        self,
        limit: int = 5,
        window: float = 300.0,
        *,
        max_clients: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit, self.window, self.max_clients, self.clock = limit, window, max_clients, clock
        self._fails: dict[str, deque[float]] = {}
        self._pending: dict[str, int] = {}

    def _recent(self, key: str) -> deque[float] | None:
        q = self._fails.get(key)
        if q is None:
            return None
        cutoff = self.clock() - self.window
        while q and q[0] <= cutoff:
            q.popleft()
        if not q:
            del self._fails[key]
            return None
        return q

    def blocked(self, key: str) -> bool:
        q = self._recent(key)
        return (len(q) if q is not None else 0) + self._pending.get(key, 0) >= self.limit

    def reserve(self, key: str) -> bool:
        """Take one attempt for ``key``; False (and nothing taken) when it is blocked. Pair with :meth:`release`."""
        if self.blocked(key):
            return False
        self._pending[key] = self._pending.get(key, 0) + 1
        return True

    def release(self, key: str) -> None:
        """The reserved attempt is over (record its outcome with :meth:`failed` / :meth:`succeeded` as well)."""
        n = self._pending.get(key, 0) - 1
        if n > 0:
            self._pending[key] = n
        else:
            self._pending.pop(key, None)

    def failed(self, key: str) -> None:
        q = self._recent(key)
        if q is None:
            if len(self._fails) >= self.max_clients:
                self._fails.pop(next(iter(self._fails)))
            q = self._fails[key] = deque(maxlen=self.limit)
        q.append(self.clock())

    def succeeded(self, key: str) -> None:
        self._fails.pop(key, None)


class KdfPoolFull(Exception):
    """Every slot of the password-check pool is taken: answer "try later"."""


class KdfPool:
    """Password checks in ``workers`` threads of their own, at most ``max_pending`` queued or running.

    The default executor is shared with the rest of the process (and sized for I/O); a flood of AUTH there would
    take every core from the event loop and delay every other ``to_thread`` caller. Here a full pool answers at
    once (:meth:`run` returns ``None``: the caller says "try later") instead of queueing without end.
    """

    def __init__(self, workers: int | None = None, max_pending: int | None = None) -> None:
        # half the cores at most: the event loop keeps one to itself
        self.workers = workers or max(1, (os.cpu_count() or 2) // 2)
        self.max_pending = max_pending or 16 * self.workers
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="mxgate-kdf")
        self._lock = threading.Lock()
        self._pending = 0
        self.runs = 0  # checks started (for tests and figures)

    def _done(self, _future: object) -> None:
        with self._lock:
            self._pending -= 1

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` in the pool; :class:`KdfPoolFull` at once when ``max_pending`` checks are already queued
        or running."""
        with self._lock:
            if self._pending >= self.max_pending:
                raise KdfPoolFull()
            self._pending += 1
            self.runs += 1
        future = self._executor.submit(fn, *args)
        future.add_done_callback(self._done)
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


USERS_KEY = StashKey[UsersFile]()
KDF_POOL_KEY = StashKey[KdfPool]()
AUTH_FAILURES = StashKey[FailureLimiter]()  # one per process (the cluster's in cluster mode)


def kdf_pool_for_runtime(runtime: Any) -> KdfPool:
    """The process's password-check pool (created on first use, so a receive worker makes its own)."""
    pool: KdfPool | None = runtime.stash.get(KDF_POOL_KEY, None)
    if pool is None:
        pool = runtime.stash[KDF_POOL_KEY] = KdfPool()
    return pool


def users_for_runtime(runtime: Any) -> UsersFile:
    """The running gateway's users file (one instance, so its parsed contents are cached)."""
    users: UsersFile | None = runtime.stash.get(USERS_KEY, None)
    if users is None:
        users = runtime.stash[USERS_KEY] = UsersFile(users_file_path(runtime.config))
    return users


def users_file_path(config: Any) -> Path:
    """``server.users_file`` when the configuration has it, else ``<state_dir>/users``."""
    configured = config.server.users_file
    path: Path = config.path(configured) if configured else config.state_path / USERS_FILE_NAME
    return path
