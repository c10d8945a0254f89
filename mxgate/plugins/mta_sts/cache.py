"""The policy cache: memory in front of SQLite in the state directory, and in a cluster the shared cache in
PostgreSQL (schema ``mta_sts``) that every node reads and writes."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mxgate import ClusterUnavailable, SharedDb, private_file
from mxgate.plugins.mta_sts.policy import StsPolicy, StsSyntaxError, parse_policy

__all__ = [
    "CACHE_FILE",
    "CLUSTER_MISS_TTL",
    "CLUSTER_SCHEMA",
    "FETCH_RETRY_AFTER",
    "CachedPolicy",
    "PolicyCache",
    "SharedPolicies",
    "SqlitePolicyStore",
    "iso",
]

log = logging.getLogger(__name__)

CACHE_FILE = "sts-cache.sqlite3"
FETCH_RETRY_AFTER = 300.0  # RFC-CHECKLIST 20: a failed id is not fetched again within 5 minutes
MAX_FAILURE_MEMORY = 10000  # domains remembered for the per-id rate limit and the cluster-miss memory
CLUSTER_MISS_TTL = 60.0  # cluster mode: a domain the shared cache did not have is not asked again for this long


@dataclass(frozen=True, slots=True)
class CachedPolicy:
    domain: str
    policy_id: str  # the TXT id the policy was fetched under ("" when the TXT record was gone)
    policy: StsPolicy
    fetched_at: float  # unix time of the last successful fetch
    expires_at: float  # fetched_at + max_age
    last_attempt_at: float  # unix time of the last fetch attempt (successful or not)
    failures: int = 0  # consecutive failed refreshes
    last_error: str = ""

    def valid(self, now: float) -> bool:
        return now < self.expires_at

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "id": self.policy_id,
            "mode": str(self.policy.mode),
            "max_age": self.policy.max_age,
            "mx": list(self.policy.mx),
            "fetched_at": iso(self.fetched_at),
            "expires_at": iso(self.expires_at),
            "last_attempt_at": iso(self.last_attempt_at),
            "failures": self.failures,
            "last_error": self.last_error,
            "policy": self.policy.text,
        }


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sts_policy (
    domain TEXT PRIMARY KEY,
    policy_id TEXT NOT NULL,
    policy_text TEXT NOT NULL,
    fetched_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    last_attempt_at REAL NOT NULL,
    failures INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT ''
)
"""


class SqlitePolicyStore:
    """The persistent side of the cache (blocking; call from a thread). One small table, WAL mode."""

    def __init__(self, path: Path) -> None:
        self.path = path
        private_file(path, companions=("-wal", "-shm", "-journal"))  # 0600, whatever the umask
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10.0)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)

    def load_all(self) -> list[CachedPolicy]:
        with self._lock:
            rows = self._db.execute(
                "SELECT domain, policy_id, policy_text, fetched_at, expires_at, last_attempt_at, failures,"
                " last_error FROM sts_policy ORDER BY domain"
            ).fetchall()
        out = []
        for domain, policy_id, text, fetched, expires, attempt, failures, error in rows:
            try:
                policy = parse_policy(text)
            except StsSyntaxError:
                log.warning("dropping unparsable cached MTA-STS policy", extra={"domain": domain})
                self.delete(domain)
                continue
            out.append(CachedPolicy(domain, policy_id, policy, fetched, expires, attempt, failures, error))
        return out

    def get(self, domain: str) -> CachedPolicy | None:
        return next((e for e in self.load_all() if e.domain == domain), None)

    def put(self, entry: CachedPolicy) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO sts_policy VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.domain,
                    entry.policy_id,
                    entry.policy.text,
                    entry.fetched_at,
                    entry.expires_at,
                    entry.last_attempt_at,
                    entry.failures,
                    entry.last_error,
                ),
            )

    def delete(self, domain: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM sts_policy WHERE domain = ?", (domain,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


# The cluster's cache (PostgreSQL, schema "mta_sts"): the same rows, a revision number for "what changed since",
# and a claim per domain so that one node refreshes it per interval.
CLUSTER_SCHEMA = """
CREATE SCHEMA mta_sts;
CREATE SEQUENCE mta_sts.rev;
CREATE TABLE mta_sts.sts_policy (
    domain TEXT PRIMARY KEY,
    policy_id TEXT NOT NULL,
    policy_text TEXT NOT NULL,
    fetched_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    last_attempt_at DOUBLE PRECISION NOT NULL,
    failures INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    rev BIGINT NOT NULL,
    updated_by TEXT NOT NULL,
    claimed_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    claimed_by TEXT NOT NULL DEFAULT ''
);
CREATE INDEX sts_policy_rev ON mta_sts.sts_policy (rev);
"""

_COLUMNS = "domain, policy_id, policy_text, fetched_at, expires_at, last_attempt_at, failures, last_error"


def _entry(row: Sequence[Any]) -> CachedPolicy | None:
    domain, policy_id, text, fetched, expires, attempt, failures, error = row[:8]
    try:
        policy = parse_policy(text)
    except StsSyntaxError:
        return None
    return CachedPolicy(domain, policy_id, policy, float(fetched), float(expires), float(attempt), failures, error)


class SharedPolicies:
    """The cluster's policy cache in PostgreSQL; every call may raise ``ClusterUnavailable``."""

    def __init__(self, db: SharedDb) -> None:
        self.db = db

    async def get(self, domain: str) -> CachedPolicy | None:
        row = await self.db.run(
            lambda c: c.execute(f"SELECT {_COLUMNS} FROM sts_policy WHERE domain = ?", (domain,)).fetchone()
        )
        return None if row is None else _entry(row)

    async def put(self, entry: CachedPolicy) -> None:
        """Last fetch wins: an older fetch (a slow node) never replaces a newer one."""
        node = self.db.node
        await self.db.run(
            lambda c: c.execute(
                f"INSERT INTO sts_policy ({_COLUMNS}, rev, updated_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?,"
                " nextval('mta_sts.rev'), ?) ON CONFLICT (domain) DO UPDATE SET policy_id = excluded.policy_id,"
                " policy_text = excluded.policy_text, fetched_at = excluded.fetched_at, expires_at ="
                " excluded.expires_at, last_attempt_at = excluded.last_attempt_at, failures = excluded.failures,"
                " last_error = excluded.last_error, rev = excluded.rev, updated_by = excluded.updated_by"
                " WHERE sts_policy.fetched_at <= excluded.fetched_at",
                (
                    entry.domain,
                    entry.policy_id,
                    entry.policy.text,
                    entry.fetched_at,
                    entry.expires_at,
                    entry.last_attempt_at,
                    entry.failures,
                    entry.last_error,
                    node,
                ),
            )
        )

    async def changed(self, since: int, now: float) -> tuple[list[CachedPolicy], int]:
        """Valid entries written since revision ``since``, and the newest revision seen."""
        rows = await self.db.run(
            lambda c: c.execute(
                f"SELECT {_COLUMNS}, rev FROM sts_policy WHERE rev > ? AND expires_at > ? ORDER BY rev",
                (since, now),
            ).fetchall()
        )
        entries = [e for e in (_entry(r) for r in rows) if e is not None]
        return entries, max([since, *(int(r[8]) for r in rows)])

    async def claim(self, domain: str, now: float, hold: float) -> bool:
        """True when this node may refresh ``domain`` now (no other node claimed it within ``hold`` seconds)."""
        node = self.db.node

        def job(c: Any) -> bool:
            row = c.execute(
                "UPDATE sts_policy SET claimed_until = ?, claimed_by = ? WHERE domain = ?"
                " AND (claimed_until <= ? OR claimed_by = ?) RETURNING 1",
                (now + hold, node, domain, now, node),
            ).fetchone()
            if row is not None:
                return True
            return c.execute("SELECT 1 FROM sts_policy WHERE domain = ?", (domain,)).fetchone() is None

        return bool(await self.db.write(job))

    async def close(self) -> None:
        await self.db.close()


class PolicyCache:
    """Reads from memory (no thread hop on the delivery path); writes through to the store off the loop. In a
    cluster, also through to the shared cache, which fills this one (:meth:`from_cluster`, :meth:`pull`)."""

    def __init__(self, store: SqlitePolicyStore, shared: SharedPolicies | None = None) -> None:
        self.store = store
        self.shared = shared
        self._entries: dict[str, CachedPolicy] = {}
        self._rev = 0  # the shared cache's revision this node has taken in
        self._misses: OrderedDict[str, float] = OrderedDict()  # domain -> when the shared cache lacked it
        self._unavailable_logged = False
        self._unshared: set[str] = set()  # fetched while the database was away: shared by the next pull

    @classmethod
    async def open(cls, path: Path, shared: SharedPolicies | None = None) -> PolicyCache:
        store = await asyncio.to_thread(SqlitePolicyStore, path)
        cache = cls(store, shared)
        for entry in await asyncio.to_thread(store.load_all):
            cache._entries[entry.domain] = entry
        return cache

    def get(self, domain: str) -> CachedPolicy | None:
        return self._entries.get(domain)

    def entries(self) -> list[CachedPolicy]:
        return sorted(self._entries.values(), key=lambda e: e.domain)

    async def put(self, entry: CachedPolicy) -> None:
        self._entries[entry.domain] = entry
        await asyncio.to_thread(self.store.put, entry)
        if self.shared is not None and await self._shared(self.shared.put(entry), False) is False:
            self._unshared.add(entry.domain)  # the database is away: shared by the next pull

    async def delete(self, domain: str) -> None:
        """This node's copy only: the shared row expires by its own ``expires_at``."""
        self._entries.pop(domain, None)
        await asyncio.to_thread(self.store.delete, domain)

    async def _keep(self, entry: CachedPolicy) -> None:
        self._entries[entry.domain] = entry
        await asyncio.to_thread(self.store.put, entry)

    async def _shared(self, call: Awaitable[Any], default: Any) -> Any:
        try:
            result = await call
        except ClusterUnavailable as exc:
            if not self._unavailable_logged:
                log.warning("MTA-STS: cluster cache unavailable, using this node's policies", extra={"error": str(exc)})
            self._unavailable_logged = True
            return default
        self._unavailable_logged = False
        return result

    async def from_cluster(self, domain: str, now: float) -> CachedPolicy | None:
        """The shared cache's valid policy for ``domain``, kept here too; None without a cluster, when it has
        none (asked again after ``CLUSTER_MISS_TTL``) or when the database is away."""
        if self.shared is None:
            return None
        missed = self._misses.get(domain)
        if missed is not None and 0 <= now - missed < CLUSTER_MISS_TTL:
            return None
        entry: CachedPolicy | None = await self._shared(self.shared.get(domain), None)
        if entry is None or not entry.valid(now):
            self._misses[domain] = now
            self._misses.move_to_end(domain)
            while len(self._misses) > MAX_FAILURE_MEMORY:
                self._misses.popitem(last=False)
            return None
        self._misses.pop(domain, None)
        await self._keep(entry)
        return entry

    async def pull(self, now: float) -> int:
        """Take in what other nodes fetched since the last pull; returns how many entries changed here."""
        if self.shared is None:
            return 0
        for domain in sorted(self._unshared):  # fetched while the database was away: the cluster gets them now
            entry = self._entries.get(domain)
            if entry is not None and await self._shared(self.shared.put(entry), False) is False:
                return 0
            self._unshared.discard(domain)
        found = await self._shared(self.shared.changed(self._rev, now), None)
        if found is None:
            return 0
        entries, self._rev = found
        taken = 0
        for entry in entries:
            mine = self._entries.get(entry.domain)
            if mine is None or mine.fetched_at < entry.fetched_at or mine.policy_id != entry.policy_id:
                await self._keep(entry)
                taken += 1
        return taken

    async def claim(self, domain: str, now: float) -> bool:
        """Whether this node refreshes ``domain`` now: always alone or with the database away."""
        if self.shared is None:
            return True
        return bool(await self._shared(self.shared.claim(domain, now, FETCH_RETRY_AFTER), True))

    async def close(self) -> None:
        await asyncio.to_thread(self.store.close)
        if self.shared is not None:
            await self.shared.close()
