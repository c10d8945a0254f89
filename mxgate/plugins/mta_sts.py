"""Built-in agent: MTA-STS (RFC 8461), the fallback where DANE is absent.

Outbound: for each destination the recipient domain's ``_mta-sts`` TXT record is looked up; a new ``id`` (or no
cached policy) triggers an HTTPS fetch of ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (WebPKI, SNI, no
redirects, 200 and ``text/plain`` only, 64 KiB, timeouts, no HTTP cache). Policies are cached in the state
directory (``sts-cache.sqlite3``) and refreshed in the background before they expire; a failed fetch leaves the
cached policy in force and is not repeated for the same ``id`` within five minutes. The policy becomes a
:class:`~mxgate.core.outcomes.TlsPolicy` of precedence 200: DANE (300) decides where it applies; MX hosts not
matching the policy's ``mx`` patterns are marked unusable (enforce); ``on_tls_verify`` checks the chain against
the WebPKI and the certificate against the MX host actually dialled.

Cluster mode (``[cluster] database``): the cache is also kept in PostgreSQL (schema ``mta_sts``) for every node.
A policy fetched by one node protects all: a node without a policy for a domain asks the cluster's cache before
anything else (so a node that never saw a domain is not open to a first-contact downgrade another node's cache
would stop), and every refresh pass first takes in what other nodes fetched. A background refresh is claimed per
domain for five minutes, so one node fetches per domain per interval. The local SQLite file stays the node's last
known policies: with the database away the node works from it as a single gateway does.

Inbound: optionally serves our own policies on an HTTPS listener; ``mxgate sts record DOMAIN`` prints the TXT
record to publish.

Commands: ``mxgate sts show DOMAIN``, ``sts refresh DOMAIN``, ``sts list``, ``sts record DOMAIN``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import sqlite3
import ssl
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import h11
import httpx
from cryptography import x509

from mxgate import __version__, private_file
from mxgate.core import checks
from mxgate.core.config import Config
from mxgate.core.dns import DnssecStatus
from mxgate.core.errors import MxgateError
from mxgate.core.hookspecs import hookimpl
from mxgate.core.outcomes import (
    Destination,
    HostPolicy,
    NextHop,
    PeerVerification,
    PolicyType,
    TlsLevel,
    TlsOutcome,
    TlsPolicy,
    TlsRptResult,
)
from mxgate.core.runtime import ROLE_COMMAND, ROLE_MAIN
from mxgate.core.settings import ConfigRegistry, ConnectorSetting, setting
from mxgate.core.tls import VerifyReason, client_context, normalize_dns_name, server_context, verify_webpki
from mxgate.plugins._sts_policy import (
    MAX_AGE_LIMIT,
    MAX_POLICY_BYTES,
    RecordLookup,
    RecordStatus,
    StsMode,
    StsPolicy,
    StsSyntaxError,
    is_text_plain,
    mx_matches,
    parse_policy,
    render_policy,
    select_record,
)

if TYPE_CHECKING:
    from mxgate.core.cluster_db import SharedDb
    from mxgate.core.dns import Resolver
    from mxgate.core.migrations import MigrationRegistry
    from mxgate.core.outcomes import AttemptContext
    from mxgate.core.runtime import Runtime

__all__ = [
    "CACHE_FILE",
    "MTA_STS_MODE",
    "CachedPolicy",
    "FetchResult",
    "FetchStatus",
    "MtaStsConfig",
    "MtaStsPlugin",
    "PolicyCache",
    "PolicyFetcher",
    "PolicyServer",
    "ServedPolicy",
    "SqlitePolicyStore",
    "StsEngine",
    "StsResolution",
    "build_tls_policy",
    "mx_matches",
    "served_record",
]

log = logging.getLogger(__name__)

PLUGIN_NAME = "mta_sts"
CACHE_FILE = "sts-cache.sqlite3"
WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"
FETCH_RETRY_AFTER = 300.0  # RFC-CHECKLIST 20: a failed id is not fetched again within 5 minutes
PRECEDENCE = 200  # DANE 300 > MTA-STS 200 > connector 100
_MAX_ADDRESSES = 4  # policy host addresses tried per fetch
_MAX_FAILURE_MEMORY = 10000  # domains remembered for the per-id rate limit
CLUSTER_MISS_TTL = 60.0  # cluster mode: a domain the shared cache did not have is not asked again for this long
_SERVE_REQUEST_TIMEOUT = 10.0
_SERVE_MAX_HEADER = 8192

MTA_STS_MODE = ConnectorSetting(
    "outbound_connector",
    "mta_sts",
    str,
    "opportunistic",
    "MTA-STS (RFC 8461): none | opportunistic (honour the published mode) | mandatory (no valid policy, no delivery).",
    ("none", "opportunistic", "mandatory"),
)


# ============================================================================================================
# configuration
# ============================================================================================================


def _check_max_age(value: Any) -> str | None:
    return None if 0 < value <= MAX_AGE_LIMIT else f"must be between 1 and {MAX_AGE_LIMIT} seconds"


def _check_policy_id(value: Any) -> str | None:
    if value is None:
        return None
    ok = 1 <= len(value) <= 32 and value.isascii() and value.isalnum()
    return None if ok else "must be 1-32 letters and digits"


def _check_mx_patterns(value: Any) -> str | None:
    for pattern in value:
        base = pattern[2:] if pattern.startswith("*.") else pattern
        if not checks.is_hostname(base) or "." not in base:
            return f"{pattern!r} is not a host name or *.domain pattern"
    return None


def _check_port(value: Any) -> str | None:
    return None if 0 < value < 65536 else "must be a port number (1-65535)"


def _check_positive(value: Any) -> str | None:
    return None if value > 0 else "must be positive"


def _is_policy_domain(name: str) -> bool:
    """A name that can have a policy: not an IP literal (a smart host given by address), not a wildcard."""
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        norm = normalize_dns_name(name)
        return norm is not None and "*" not in norm and "." in norm and checks.is_hostname(norm)
    return False


@dataclass(frozen=True, slots=True)
class ServedPolicy:
    domain: str = setting(desc="Policy domain we publish for (served as mta-sts.<domain>).", example="example.org")
    mode: str = setting("enforce", desc="Published mode.", choices=("enforce", "testing", "none"))
    mx: tuple[str, ...] = setting(
        (), desc="MX patterns: host names or '*.domain'.", check=_check_mx_patterns, example=["mx.example.org"]
    )
    max_age: int = setting(604800, desc="Seconds senders may cache the policy.", check=_check_max_age)
    id: str | None = setting(
        None,
        desc="TXT id to publish; default: derived from the policy text, so it changes with the policy.",
        check=_check_policy_id,
    )

    def render(self) -> str:
        return render_policy(self.mode, self.mx, self.max_age)

    @property
    def record_id(self) -> str:
        return self.id or hashlib.sha256(self.render().encode()).hexdigest()[:20]


@dataclass(frozen=True, slots=True)
class MtaStsConfig:
    ca_file: str | None = setting(
        None,
        desc="CA bundle (PEM) trusted for policy hosts and for MX certificates under MTA-STS; default: the system CAs.",
    )
    fetch_timeout: float = setting(
        10.0, desc="Seconds for one policy fetch (resolve, connect, TLS, response).", check=_check_positive
    )
    fetch_port: int = setting(
        443, desc="Port of policy hosts (RFC 8461: 443; tests point this elsewhere).", check=_check_port
    )
    refresh_interval: float = setting(
        3600.0, desc="Seconds between background scans for policies due a refresh.", check=_check_positive
    )
    refresh_after: float = setting(
        86400.0,
        desc="Refresh a cached policy this many seconds after its fetch, or this long before it expires.",
        check=_check_positive,
    )
    refresh_concurrency: int = setting(4, desc="Policies refreshed at the same time.", check=_check_positive)
    refresh_alert_after: int = setting(
        3,
        desc="Consecutive failed refreshes of an enforce/testing policy before the sts_refresh_failing event.",
        check=_check_positive,
    )
    serve_listen: str | None = setting(
        None,
        desc='Serve our own policies over HTTPS on "host:port" ("[::]:443" in production); unset: off.',
        check=checks.check_optional_hostport,
    )
    serve_cert: str | None = setting(None, desc="Certificate chain (PEM) for mta-sts.<domain> of every served domain.")
    serve_key: str | None = setting(None, desc="Private key (PEM) for serve_cert.")
    serve_policies: tuple[ServedPolicy, ...] = setting((), desc="Policies we publish, one table per domain.")


def _section(config: Config) -> MtaStsConfig:
    return config.plugin_section(PLUGIN_NAME, MtaStsConfig)


def _norm_domain(domain: str) -> str:
    norm = normalize_dns_name(domain)
    if norm is None or "*" in norm:
        raise ValueError(f"not a usable domain name: {domain!r}")
    return norm


# ============================================================================================================
# the policy cache: memory in front of SQLite in the state directory
# ============================================================================================================


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
            "fetched_at": _iso(self.fetched_at),
            "expires_at": _iso(self.expires_at),
            "last_attempt_at": _iso(self.last_attempt_at),
            "failures": self.failures,
            "last_error": self.last_error,
            "policy": self.policy.text,
        }


def _iso(ts: float) -> str:
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
        from mxgate.core.cluster_db import ClusterUnavailable

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
            while len(self._misses) > _MAX_FAILURE_MEMORY:
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


# ============================================================================================================
# the fetcher (RFC 8461 section 3.3)
# ============================================================================================================


class FetchStatus(StrEnum):
    """Outcome of one fetch; also the ``result`` label of the ``sts_fetch`` event."""

    OK = "ok"
    FETCH_ERROR = "fetch_error"  # sts-policy-fetch-error: DNS, connect, timeout, non-200, redirect
    INVALID = "invalid"  # sts-policy-invalid: not text/plain, too large, not a valid policy
    WEBPKI_INVALID = "webpki_invalid"  # sts-webpki-invalid: the policy host's certificate

    @property
    def result_type(self) -> TlsRptResult | None:
        return _RESULT_TYPES.get(self)


_RESULT_TYPES = {
    FetchStatus.FETCH_ERROR: TlsRptResult.STS_POLICY_FETCH_ERROR,
    FetchStatus.INVALID: TlsRptResult.STS_POLICY_INVALID,
    FetchStatus.WEBPKI_INVALID: TlsRptResult.STS_WEBPKI_INVALID,
}


@dataclass(frozen=True, slots=True)
class FetchResult:
    status: FetchStatus
    policy: StsPolicy | None = None
    detail: str = ""
    skipped: bool = False  # not attempted: the same id failed less than five minutes ago
    shared: bool = False  # another caller's fetch, awaited (its caller reports it)

    @property
    def ok(self) -> bool:
        return self.status is FetchStatus.OK


class _TryNextAddress(Exception):
    """Connecting to one address failed (refused, unreachable): the next address may work."""


AddressLookup = Callable[[str], Awaitable[tuple[tuple[str, ...], str]]]


def resolver_addresses(get_resolver: Callable[[], Resolver]) -> AddressLookup:
    """Policy host -> (addresses, error) through mxgate's resolver (A first, then AAAA)."""

    async def lookup(host: str) -> tuple[tuple[str, ...], str]:
        a, aaaa = await get_resolver().resolve_addresses(host)
        addresses = tuple(rd.to_text() for ans in (a, aaaa) if ans.exists and not ans.is_failure for rd in ans.records)
        if addresses:
            return addresses, ""
        failures = [f"{ans.rdtype} {ans.status}: {ans.error or ans.kind}" for ans in (a, aaaa) if ans.is_failure]
        return (), "; ".join(failures) or f"{host} has no address records"

    return lookup


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


class PolicyFetcher:
    """Fetches ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` with httpx: the policy host is resolved
    through mxgate's resolver and dialled by address, with SNI and ``Host`` set to ``mta-sts.<domain>``; OpenSSL
    verifies chain and name against ``ssl_context``'s anchors during the handshake."""

    def __init__(
        self,
        *,
        addresses: AddressLookup,
        ssl_context: ssl.SSLContext,
        port: int = 443,
        timeout: float = 10.0,
        max_bytes: int = MAX_POLICY_BYTES,
    ) -> None:
        self._addresses = addresses
        self._ssl = ssl_context
        self.port = port
        self.timeout = timeout
        self.max_bytes = max_bytes

    async def fetch(self, domain: str) -> FetchResult:
        host = f"mta-sts.{domain}"
        try:
            async with asyncio.timeout(self.timeout):
                addresses, error = await self._addresses(host)
                if not addresses:
                    return FetchResult(FetchStatus.FETCH_ERROR, detail=f"cannot resolve {host}: {error}")
                last = ""
                for address in addresses[:_MAX_ADDRESSES]:
                    try:
                        return await self._fetch_from(address, host)
                    except _TryNextAddress as exc:
                        last = str(exc)
                return FetchResult(FetchStatus.FETCH_ERROR, detail=last)
        except TimeoutError:
            return FetchResult(FetchStatus.FETCH_ERROR, detail=f"{host}: no complete answer within {self.timeout:g}s")

    async def _fetch_from(self, address: str, host: str) -> FetchResult:
        url = httpx.URL(scheme="https", host=address, port=self.port, path=WELL_KNOWN_PATH)
        host_header = host if self.port == 443 else f"{host}:{self.port}"
        headers = {
            "Host": host_header,
            "Accept": "text/plain",
            "Accept-Encoding": "identity",  # the byte cap applies to what we read, never to a decompressed bomb
            "User-Agent": f"mxgate/{__version__} (MTA-STS)",
        }
        where = f"{host} [{address}]:{self.port}"
        client = httpx.AsyncClient(
            verify=self._ssl, follow_redirects=False, trust_env=False, timeout=httpx.Timeout(self.timeout)
        )
        try:
            async with client, client.stream("GET", url, headers=headers, extensions={"sni_hostname": host}) as resp:
                if resp.is_redirect:
                    target = resp.headers.get("location", "?")[:120]
                    return FetchResult(
                        FetchStatus.FETCH_ERROR, detail=f"{where}: HTTP {resp.status_code} redirect to {target} refused"
                    )
                if resp.status_code != 200:
                    return FetchResult(FetchStatus.FETCH_ERROR, detail=f"{where}: HTTP {resp.status_code}")
                content_type = resp.headers.get("content-type")
                if not is_text_plain(content_type):
                    return FetchResult(
                        FetchStatus.INVALID, detail=f"{where}: media type {content_type!r}, not text/plain"
                    )
                encoding = resp.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    return FetchResult(FetchStatus.INVALID, detail=f"{where}: content-encoding {encoding!r}")
                declared = resp.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                    return FetchResult(FetchStatus.INVALID, detail=f"{where}: {declared} bytes > {self.max_bytes}")
                body = bytearray()
                async for chunk in resp.aiter_raw():
                    body += chunk
                    if len(body) > self.max_bytes:
                        return FetchResult(FetchStatus.INVALID, detail=f"{where}: policy larger than {self.max_bytes}")
        except httpx.TimeoutException as exc:
            return FetchResult(FetchStatus.FETCH_ERROR, detail=f"{where}: timeout ({type(exc).__name__})")
        except httpx.HTTPError as exc:
            return self._transport_error(exc, where)
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            return FetchResult(FetchStatus.INVALID, detail=f"{where}: policy is not UTF-8")
        try:
            return FetchResult(FetchStatus.OK, parse_policy(text), detail=f"{where}: ok")
        except StsSyntaxError as exc:
            return FetchResult(FetchStatus.INVALID, detail=f"{where}: {exc}")

    @staticmethod
    def _transport_error(exc: httpx.HTTPError, where: str) -> FetchResult:
        chain = _cause_chain(exc)
        for cause in chain:
            if isinstance(cause, ssl.SSLCertVerificationError):
                reason = cause.verify_message or cause.reason or str(cause)
                return FetchResult(FetchStatus.WEBPKI_INVALID, detail=f"{where}: certificate: {reason}")
        for cause in chain:
            if isinstance(cause, ssl.SSLError):
                return FetchResult(FetchStatus.FETCH_ERROR, detail=f"{where}: TLS: {cause.reason or cause}")
        if isinstance(exc, httpx.ConnectError):
            raise _TryNextAddress(f"{where}: {exc or type(exc).__name__}")
        return FetchResult(FetchStatus.FETCH_ERROR, detail=f"{where}: {type(exc).__name__}: {exc}")


# ============================================================================================================
# the engine: record, cache, fetch, refresh
# ============================================================================================================


class EventSink(Protocol):
    """What the engine reports to: :class:`mxgate.core.plugins.Hooks` in the gateway, a null sink in commands."""

    async def on_event(self, kind: str, value: float = 1.0, **labels: str) -> None: ...

    async def on_tls_outcome(self, outcome: TlsOutcome) -> None: ...


class NullSink:
    async def on_event(self, kind: str, value: float = 1.0, **labels: str) -> None:
        return None

    async def on_tls_outcome(self, outcome: TlsOutcome) -> None:
        return None


@dataclass(frozen=True, slots=True)
class StsResolution:
    """What MTA-STS says about one domain right now."""

    domain: str
    policy: StsPolicy | None  # the policy in force (fresh or cached, never expired); None: no policy
    origin: str  # "fresh" | "cache" | "none"
    record: RecordLookup
    policy_id: str | None = None
    failure: FetchStatus | None = None  # this lookup's fetch failed (the cached policy may still apply)
    detail: str = ""
    fetch: FetchResult | None = None  # the fetch this lookup performed itself (not skipped, not shared)

    @property
    def fetch_failed(self) -> bool:
        """This lookup itself tried a fetch, and it failed: one failure to report."""
        return self.fetch is not None and not self.fetch.ok


TxtLookup = Callable[[str, bool], Awaitable[RecordLookup]]


def resolver_txt(get_resolver: Callable[[], Resolver]) -> TxtLookup:
    """``_mta-sts.<domain>`` TXT through mxgate's resolver; the strings of one record are concatenated."""

    async def lookup(domain: str, fresh: bool) -> RecordLookup:
        answer = await get_resolver().resolve(f"_mta-sts.{domain}", "TXT", use_cache=not fresh)
        if answer.status is DnssecStatus.BOGUS:
            return RecordLookup(RecordStatus.BOGUS, detail=f"TXT answer failed DNSSEC validation ({answer.error})")
        if answer.is_failure:
            return RecordLookup(RecordStatus.ERROR, detail=f"TXT lookup failed: {answer.error or answer.status}")
        if not answer.exists:
            return RecordLookup(RecordStatus.NONE, detail=f"no TXT record ({answer.kind})")
        texts = [b"".join(getattr(rd, "strings", ())).decode("utf-8", "replace") for rd in answer.records]
        return select_record(texts)

    return lookup


class StsEngine:
    """RFC 8461 sections 3.3 and 5: decide which policy is in force, fetching and caching as needed."""

    def __init__(
        self,
        *,
        cache: PolicyCache,
        fetcher: PolicyFetcher,
        txt: TxtLookup,
        clock: Callable[[], float] = time.time,
        sink: EventSink | None = None,
        refresh_after: float = 86400.0,
        refresh_concurrency: int = 4,
        refresh_alert_after: int = 3,
    ) -> None:
        self.cache = cache
        self.fetcher = fetcher
        self.txt = txt
        self.clock = clock
        self.sink: EventSink = sink or NullSink()
        self.refresh_after = refresh_after
        self.refresh_concurrency = refresh_concurrency
        self.refresh_alert_after = refresh_alert_after
        self._failed: OrderedDict[str, tuple[str, float]] = OrderedDict()  # domain -> (id, unix time)
        self._inflight: dict[tuple[str, str], asyncio.Task[FetchResult]] = {}
        self._recheck: set[str] = set()

    # -- delivery path

    async def resolve(self, domain: str) -> StsResolution:
        """The policy in force for ``domain`` (the recipient domain itself, never a parent)."""
        domain = _norm_domain(domain)
        fresh = domain in self._recheck
        self._recheck.discard(domain)
        record = await self.txt(domain, fresh)
        now = self.clock()
        cached = self.cache.get(domain)
        if cached is not None and not cached.valid(now):
            cached = None
        if cached is None or (record.id is not None and cached.policy_id != record.id):
            cached = await self.cache.from_cluster(domain, now) or cached  # another node's fetch protects us too
        if record.status is RecordStatus.FOUND and record.id is not None:
            if cached is not None and cached.policy_id == record.id:
                return StsResolution(domain, cached.policy, "cache", record, cached.policy_id, detail="id unchanged")
            result = await self._fetch(domain, record.id, trigger="delivery")
            own = None if result.skipped or result.shared else result
            if result.ok and result.policy is not None:
                return StsResolution(domain, result.policy, "fresh", record, record.id, detail=result.detail, fetch=own)
            if cached is not None:
                return StsResolution(
                    domain,
                    cached.policy,
                    "cache",
                    record,
                    cached.policy_id,
                    failure=result.status,
                    detail=f"fetch for id {record.id} failed, cached policy {cached.policy_id} applies: "
                    f"{result.detail}",
                    fetch=own,
                )
            return StsResolution(
                domain, None, "none", record, record.id, failure=result.status, detail=result.detail, fetch=own
            )
        if cached is not None:  # no usable record now: a cached policy stays in force until it expires
            detail = f"TXT {record.status}: cached policy applies"
            return StsResolution(domain, cached.policy, "cache", record, cached.policy_id, detail=detail)
        return StsResolution(domain, None, "none", record, detail=record.detail or str(record.status))

    def recheck(self, domain: str) -> None:
        """An attempt under this domain's policy failed: the next resolve asks the DNS afresh for the TXT id
        (RFC 8461 section 5.1: never fail permanently without checking for an updated policy)."""
        with contextlib.suppress(ValueError):
            self._recheck.add(_norm_domain(domain))

    def rate_limited(self, domain: str, policy_id: str) -> float | None:
        """Seconds since the last failed fetch of this id, when within the five-minute window."""
        failed = self._failed.get(domain)
        if failed is None or failed[0] != policy_id:
            return None
        age = self.clock() - failed[1]
        return age if 0 <= age < FETCH_RETRY_AFTER else None

    async def _fetch(self, domain: str, policy_id: str, *, trigger: str, force: bool = False) -> FetchResult:
        age = None if force else self.rate_limited(domain, policy_id)
        if age is not None:
            return FetchResult(
                FetchStatus.FETCH_ERROR,
                detail=f"not fetched: the fetch for id {policy_id} failed {age:.0f}s ago",
                skipped=True,
            )
        key = (domain, policy_id)
        task = self._inflight.get(key)
        if task is not None:
            return replace(await asyncio.shield(task), shared=True)
        task = asyncio.ensure_future(self._fetch_and_store(domain, policy_id, trigger))
        self._inflight[key] = task
        task.add_done_callback(lambda _t, k=key: self._inflight.pop(k, None))  # type: ignore[misc]
        return await asyncio.shield(task)

    async def _fetch_and_store(self, domain: str, policy_id: str, trigger: str) -> FetchResult:
        result = await self.fetcher.fetch(domain)
        now = self.clock()
        await self.sink.on_event("sts_fetch", result=str(result.status), trigger=trigger)
        if result.ok and result.policy is not None:
            self._failed.pop(domain, None)
            policy = result.policy
            await self.cache.put(CachedPolicy(domain, policy_id, policy, now, now + policy.max_age, now))
            log.info(
                "MTA-STS policy fetched",
                extra={"domain": domain, "id": policy_id, "mode": str(policy.mode), "max_age": policy.max_age},
            )
            return result
        self._failed[domain] = (policy_id, now)
        self._failed.move_to_end(domain)
        while len(self._failed) > _MAX_FAILURE_MEMORY:
            self._failed.popitem(last=False)
        log.warning(
            "MTA-STS policy fetch failed",
            extra={"domain": domain, "id": policy_id, "result": str(result.status), "detail": result.detail},
        )
        return result

    # -- refresh (background and `mxgate sts refresh`)

    async def refresh(self, domain: str, *, trigger: str = "refresh", force: bool = False) -> FetchResult:
        """Fetch the policy again whatever the TXT id says (the id is recorded when there is one)."""
        domain = _norm_domain(domain)
        record = await self.txt(domain, True)
        cached = self.cache.get(domain)
        if record.status is RecordStatus.FOUND and record.id is not None:
            policy_id = record.id
        elif cached is not None:
            policy_id = cached.policy_id
        else:
            return FetchResult(FetchStatus.FETCH_ERROR, detail=f"no MTA-STS record: {record.detail or record.status}")
        result = await self._fetch(domain, policy_id, trigger=trigger, force=force)
        ok = result.ok
        if not ok and not result.skipped and cached is not None:
            failures = cached.failures + 1
            cached = replace(cached, failures=failures, last_error=result.detail[:500], last_attempt_at=self.clock())
            await self.cache.put(cached)
            if cached.policy.mode is not StsMode.NONE and failures >= self.refresh_alert_after:
                log.warning(
                    "MTA-STS policy refresh keeps failing",
                    extra={
                        "domain": domain,
                        "failures": failures,
                        "expires_at": _iso(cached.expires_at),
                        "detail": result.detail,
                    },
                )
                await self.sink.on_event("sts_refresh_failing", mode=str(cached.policy.mode))
        if not result.skipped:
            await self.sink.on_event("sts_refresh", result="ok" if ok else "failed")
        return result

    def due(self, now: float) -> list[CachedPolicy]:
        """Cached policies to refresh now: old enough or close to expiry, not attempted in the last five minutes."""
        return [
            e
            for e in self.cache.entries()
            if e.valid(now)
            and now - e.last_attempt_at >= FETCH_RETRY_AFTER
            and (now - e.fetched_at >= self.refresh_after or e.expires_at - now <= self.refresh_after)
        ]

    async def refresh_due(self) -> int:
        """One background pass: take in the cluster's fetches, drop expired entries, refresh due ones with bounded
        concurrency (in a cluster, only those this node claims: one node refreshes a domain per interval)."""
        now = self.clock()
        await self.cache.pull(now)
        for entry in self.cache.entries():
            if not entry.valid(now):
                log.info("MTA-STS cached policy expired", extra={"domain": entry.domain, "id": entry.policy_id})
                await self.cache.delete(entry.domain)
        due = self.due(now)
        gate = asyncio.Semaphore(self.refresh_concurrency)

        async def one(entry: CachedPolicy) -> None:
            async with gate:
                try:
                    if await self.cache.claim(entry.domain, now):
                        await self.refresh(entry.domain)
                except Exception:  # one domain's trouble must not stop the others
                    log.exception("MTA-STS refresh failed unexpectedly", extra={"domain": entry.domain})

        async with asyncio.TaskGroup() as group:
            for entry in due:
                group.create_task(one(entry))
        return len(due)

    async def run_refresher(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh_due()
            except Exception:
                log.exception("MTA-STS refresher pass failed")


# ============================================================================================================
# policy -> TlsPolicy, and peer verification
# ============================================================================================================


def build_tls_policy(resolution: StsResolution, setting_mode: str, next_hop: NextHop | None = None) -> TlsPolicy:
    """The opinion handed to the core. ``setting_mode`` is the connector's ``mta_sts``: ``opportunistic``
    honours the published mode; ``mandatory`` demands an enforce or testing policy and enforces it."""
    domain = resolution.domain
    policy = resolution.policy
    mandatory = setting_mode == "mandatory"
    no_policy = policy is None or policy.mode is StsMode.NONE
    if no_policy:
        failure: TlsRptResult | None = None
        if mandatory:
            failure = (resolution.failure.result_type if resolution.failure else None) or (
                TlsRptResult.STS_POLICY_FETCH_ERROR
            )
            detail = f"mta_sts = mandatory and no MTA-STS policy in force: {resolution.detail}"
        elif resolution.record.status is RecordStatus.BOGUS:
            failure = TlsRptResult.STS_POLICY_FETCH_ERROR
            detail = f"_mta-sts record of {domain} is bogus: defer ({resolution.record.detail})"
        else:
            detail = "policy mode none" if policy is not None else f"no MTA-STS policy: {resolution.detail}"
        return TlsPolicy(
            source=PLUGIN_NAME,
            policy_type=PolicyType.STS if failure else PolicyType.NO_POLICY,
            policy_domain=domain,
            level=TlsLevel.SECURE if failure else TlsLevel.MAY,
            precedence=PRECEDENCE,
            applies=failure is not None,
            failure=failure,
            policy_strings=policy.policy_strings if policy is not None else (),
            detail=detail,
            data=resolution,
        )
    assert policy is not None
    report_only = policy.mode is StsMode.TESTING and not mandatory
    hosts: dict[str, HostPolicy] = {}
    for hop in next_hop.hosts if next_hop is not None else ():
        name = hop.name.lower().rstrip(".")
        if policy.matches(name):
            continue
        if report_only:
            hosts[name] = HostPolicy(
                TlsLevel.SECURE,
                usable=True,
                detail=f"MX {name} not in the {domain} policy (testing: delivered and reported)",
            )
        else:
            hosts[name] = HostPolicy(
                TlsLevel.SECURE,
                usable=False,
                failure=TlsRptResult.VALIDATION_FAILURE,
                detail=f"MX {name} does not match the {domain} policy's mx patterns",
            )
    return TlsPolicy(
        source=PLUGIN_NAME,
        policy_type=PolicyType.STS,
        policy_domain=domain,
        level=TlsLevel.SECURE,
        precedence=PRECEDENCE,
        applies=True,
        report_only=report_only,
        mx_patterns=policy.mx,
        reference_ids=(),
        policy_strings=policy.policy_strings,
        detail=f"MTA-STS {policy.mode} ({resolution.origin}, id {resolution.policy_id})",
        data=resolution,
        hosts=hosts,
    )


_VERIFY_RESULT = {
    VerifyReason.EXPIRED: TlsRptResult.CERTIFICATE_EXPIRED,
    VerifyReason.UNTRUSTED: TlsRptResult.CERTIFICATE_NOT_TRUSTED,
    VerifyReason.NAME_MISMATCH: TlsRptResult.CERTIFICATE_HOST_MISMATCH,
    VerifyReason.NOT_YET_VALID: TlsRptResult.VALIDATION_FAILURE,
    VerifyReason.OTHER: TlsRptResult.VALIDATION_FAILURE,
}


def verify_mx_certificate(
    host: str,
    mx_patterns: Sequence[str],
    chain: Sequence[x509.Certificate],
    *,
    now: datetime,
    trust_store_paths: Sequence[str] | None,
) -> PeerVerification:
    """RFC 8461 section 4.2: the MX dialled must match a pattern, and its certificate must be WebPKI-valid for
    that MX host name (RFC 6125). Blocking (trust store, signatures): run in a thread."""
    if mx_patterns and not any(mx_matches(p, host) for p in mx_patterns):
        return PeerVerification(
            False, "untrusted", TlsRptResult.VALIDATION_FAILURE, detail=f"{host} matches no policy mx pattern"
        )
    result = verify_webpki(chain, name=host, now=now, trust_store_paths=trust_store_paths)
    if result.ok:
        return PeerVerification(True, "verified", matched=host, detail=result.detail)
    return PeerVerification(False, "untrusted", _VERIFY_RESULT[result.reason], detail=result.detail)


# ============================================================================================================
# inbound: serving our own policies
# ============================================================================================================


def served_record(policy: ServedPolicy) -> str:
    """The TXT record to publish for a served policy."""
    return f'_mta-sts.{_norm_domain(policy.domain)}. IN TXT "v=STSv1; id={policy.record_id}"'


class PolicyServer:
    """A small HTTPS server: ``GET /.well-known/mta-sts.txt`` with ``Host: mta-sts.<domain>`` for each served
    domain, ``404`` otherwise. HTTP parsing is h11's; one request per connection, bounded in size and time."""

    def __init__(self, policies: Sequence[ServedPolicy], ssl_context: ssl.SSLContext, sink: EventSink) -> None:
        self._bodies = {f"mta-sts.{_norm_domain(p.domain)}": p.render().encode() for p in policies}
        self._ssl = ssl_context
        self._sink = sink
        self._server: asyncio.Server | None = None

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self._server.sockets) if self._server is not None else ()

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, ssl=self._ssl)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
            self._server = None

    def respond(self, method: str, target: str, host: str | None) -> tuple[int, bytes, str]:
        """(status, body, label) for a request: pure, so it is testable without sockets."""
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", "bad_request"
        name = (host or "").rsplit(":", 1)[0] if host and not host.startswith("[") else ""
        body = self._bodies.get(name.lower().rstrip("."))
        if target != WELL_KNOWN_PATH or body is None:
            return 404, b"not found\n", "not_found"
        return 200, body, "ok"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_SERVE_MAX_HEADER)
        label = "bad_request"
        try:
            async with asyncio.timeout(_SERVE_REQUEST_TIMEOUT):
                request = await self._read_request(conn, reader)
                if request is None:
                    return
                host = next((v.decode("latin-1") for k, v in request.headers if k == b"host"), None)
                method = request.method.decode("ascii", "replace")
                status, body, label = self.respond(method, request.target.decode("latin-1"), host)
                headers = [
                    ("Content-Type", "text/plain" if status == 200 else "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(body))),
                    ("Connection", "close"),
                ]
                writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
                if method != "HEAD":
                    writer.write(conn.send(h11.Data(data=body)) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
        except (h11.RemoteProtocolError, h11.LocalProtocolError, TimeoutError, OSError, ssl.SSLError):
            label = "bad_request"
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            await self._sink.on_event("sts_policy_served", result=label)

    @staticmethod
    async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
        for _ in range(64):  # bounded: at most 64 reads of up to 4 KiB before the request line and headers
            event = conn.next_event()
            if isinstance(event, h11.Request):
                return event
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(4096))
                continue
            return None  # ConnectionClosed or anything else
        return None


# ============================================================================================================
# the plugin
# ============================================================================================================


def _trust_paths(config: Config, conf: MtaStsConfig) -> tuple[str, ...] | None:
    return (str(config.path(conf.ca_file)),) if conf.ca_file else None


def _fetch_context(config: Config, conf: MtaStsConfig) -> ssl.SSLContext:
    return client_context(verify=True, cafile=config.path(conf.ca_file) if conf.ca_file else None)


async def build_engine(
    config: Config,
    resolver: Callable[[], Resolver],
    *,
    clock: Callable[[], float],
    sink: EventSink,
    shared: SharedDb | None = None,
) -> StsEngine:
    conf = _section(config)
    ctx = await asyncio.to_thread(_fetch_context, config, conf)
    fetcher = PolicyFetcher(
        addresses=resolver_addresses(resolver), ssl_context=ctx, port=conf.fetch_port, timeout=conf.fetch_timeout
    )
    cache = await PolicyCache.open(
        config.state_path / CACHE_FILE, SharedPolicies(shared) if shared is not None else None
    )
    return StsEngine(
        cache=cache,
        fetcher=fetcher,
        txt=resolver_txt(resolver),
        clock=clock,
        sink=sink,
        refresh_after=conf.refresh_after,
        refresh_concurrency=conf.refresh_concurrency,
        refresh_alert_after=conf.refresh_alert_after,
    )


class MtaStsPlugin:
    """MTA-STS (RFC 8461): the fallback where DANE is absent."""

    name = PLUGIN_NAME
    priority = 45

    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        self.engine: StsEngine | None = None
        self.server: PolicyServer | None = None
        self._resolver: Resolver | None = None
        self._trust: tuple[str, ...] | None = None

    # -- lifecycle

    @hookimpl
    def mxgate_lifecycle_register_config(self, registry: ConfigRegistry) -> None:
        registry.add_connector_setting(MTA_STS_MODE, owner=self.name)
        registry.add_section(self.name, MtaStsConfig, owner=self.name)

    @hookimpl
    def mxgate_lifecycle_register_commands(self, subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        register_cli(subparsers)

    @hookimpl
    def mxgate_lifecycle_register_migrations(self, migrations: MigrationRegistry) -> None:
        migrations.add(PLUGIN_NAME, 1, "MTA-STS policy cache shared by the nodes", CLUSTER_SCHEMA)

    @hookimpl
    async def mxgate_lifecycle_on_startup(self, runtime: Runtime) -> None:
        self.runtime = runtime
        if runtime.role not in (ROLE_MAIN, ROLE_COMMAND):  # policies serve delivery: not a receive worker's job
            return
        config = runtime.config
        conf = _section(config)
        self._trust = _trust_paths(config, conf)
        shared = runtime.cluster.database(PLUGIN_NAME, schema="mta_sts") if runtime.cluster is not None else None
        self.engine = await build_engine(
            config, self._get_resolver, clock=runtime.clock, sink=runtime.hooks, shared=shared
        )
        if runtime.role != ROLE_MAIN:  # a command delivers once: policies yes, refresher and policy server no
            return
        runtime.tasks.append(asyncio.ensure_future(self.engine.run_refresher(conf.refresh_interval)))
        if conf.serve_listen:
            self.server = await start_policy_server(config, conf, runtime.hooks)

    @hookimpl
    async def mxgate_lifecycle_on_preflight(self, runtime: Runtime) -> list[str]:
        """``mxgate check``: every policy we serve names our host and every MX its domain publishes."""
        conf = _section(runtime.config)
        hostname = runtime.config.server.hostname
        problems: list[str] = []
        for i, policy in enumerate(conf.serve_policies):
            if policy.mode == "none":
                continue
            where = f"plugins.mta_sts.serve_policies[{i}] ({policy.domain})"
            if not any(mx_matches(p, hostname) for p in policy.mx):
                problems.append(f"{where}: our host name {hostname} matches none of the mx patterns {list(policy.mx)}")
            if runtime.resolver is None:
                continue
            answer = await runtime.resolver.resolve(policy.domain, "MX")
            if answer.is_failure:
                problems.append(f"{where}: MX lookup failed ({answer.status}): {answer.error}")
                continue
            for rd in answer.records if answer.exists else ():
                mx = str(getattr(rd, "exchange", "")).rstrip(".").lower()
                if mx and not any(mx_matches(p, mx) for p in policy.mx):
                    problems.append(
                        f"{where}: MX {mx} matches none of the mx patterns {list(policy.mx)}: senders that honour "
                        f"the policy ({policy.mode}) will not deliver to it"
                    )
        return problems

    @hookimpl
    async def mxgate_lifecycle_on_shutdown(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None
        if self.engine is not None:
            await self.engine.cache.close()
            self.engine = None

    def _get_resolver(self) -> Resolver:
        if self.runtime is not None and self.runtime.resolver is not None:
            return self.runtime.resolver
        if self._resolver is None:
            from mxgate.core.dns import resolver_from_config

            assert self.runtime is not None
            self._resolver = resolver_from_config(self.runtime.config.dns)
        return self._resolver

    # -- delivery

    @hookimpl
    async def mxgate_delivery_resolve_tls_policy(self, destination: Destination, next_hop: NextHop) -> TlsPolicy | None:
        if self.runtime is None or self.engine is None:
            return None
        mode = destination.connector.get(MTA_STS_MODE)
        if mode == "none" or not _is_policy_domain(destination.domain):
            return None  # an IP-literal smart host has no policy domain
        resolution = await self.engine.resolve(destination.domain)
        policy = build_tls_policy(resolution, mode, next_hop)
        mode_label = str(resolution.policy.mode) if resolution.policy is not None else "absent"
        await self.runtime.hooks.on_event("sts_policy", mode=mode_label, origin=resolution.origin)
        if resolution.fetch is not None and not resolution.fetch.ok and policy.failure is None:
            # The core reports a policy's own failure; a failed fetch behind a policy without one (no policy, or
            # the cached policy) is reported here, once per fetch, so TLS-RPT counts it.
            await self.runtime.hooks.on_tls_outcome(
                TlsOutcome(
                    connector=destination.connector.name,
                    policy_type=PolicyType.STS,
                    policy_domain=resolution.domain,
                    success=False,
                    result_type=resolution.fetch.status.result_type,
                    detail=resolution.fetch.detail,
                    at=self.runtime.clock(),
                )
            )
        return policy

    @hookimpl
    async def mxgate_delivery_on_tls_verify(
        self, attempt: AttemptContext, policy: TlsPolicy, chain: Sequence[x509.Certificate]
    ) -> PeerVerification | None:
        if policy.source != PLUGIN_NAME:
            return None  # DANE or the connector decided: not ours to judge
        clock = self.runtime.clock if self.runtime is not None else time.time
        now = datetime.fromtimestamp(clock(), UTC)
        return await asyncio.to_thread(
            verify_mx_certificate,
            attempt.host.name.rstrip(".").lower(),
            policy.mx_patterns,
            tuple(chain),
            now=now,
            trust_store_paths=self._trust,
        )

    @hookimpl
    def mxgate_delivery_on_tls_outcome(self, outcome: TlsOutcome) -> None:
        if self.engine is not None and outcome.policy_type is PolicyType.STS and not outcome.success:
            self.engine.recheck(outcome.policy_domain)


async def start_policy_server(config: Config, conf: MtaStsConfig, sink: EventSink) -> PolicyServer:
    if not (conf.serve_cert and conf.serve_key):
        raise MxgateError("plugins.mta_sts.serve_listen needs serve_cert and serve_key")
    if not conf.serve_policies:
        raise MxgateError("plugins.mta_sts.serve_listen is set but serve_policies is empty")
    cert, key = config.path(conf.serve_cert), config.path(conf.serve_key)
    try:
        ctx = await asyncio.to_thread(server_context, cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise MxgateError(f"plugins.mta_sts.serve_cert/serve_key: cannot load {cert} / {key}: {exc}") from exc
    server = PolicyServer(conf.serve_policies, ctx, sink)
    host, port = checks.split_hostport(conf.serve_listen or "")
    try:
        await server.start(host, port)
    except OSError as exc:
        raise MxgateError(f"plugins.mta_sts.serve_listen {conf.serve_listen}: {exc.strerror or exc}") from exc
    log.info("serving MTA-STS policies", extra={"address": conf.serve_listen, "domains": len(conf.serve_policies)})
    return server


# ============================================================================================================
# commands: mxgate sts show | refresh | list | record
# ============================================================================================================


def register_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from mxgate.core.commands import add_config_arg

    p = subparsers.add_parser("sts", help="MTA-STS: cached policies, refresh, the TXT record we publish")
    sub = p.add_subparsers(dest="sts_command", metavar="ACTION", required=True)
    q = sub.add_parser("show", help="the cached policy of DOMAIN")
    q.add_argument("domain")
    q.add_argument("--json", action="store_true")
    add_config_arg(q)
    q.set_defaults(func=cmd_show)
    q = sub.add_parser("refresh", help="look up and fetch DOMAIN's policy now and cache it")
    q.add_argument("domain")
    add_config_arg(q)
    q.set_defaults(func=cmd_refresh)
    q = sub.add_parser("list", help="every cached policy")
    q.add_argument("--json", action="store_true")
    add_config_arg(q)
    q.set_defaults(func=cmd_list)
    q = sub.add_parser("record", help="the _mta-sts TXT record to publish for a served DOMAIN")
    q.add_argument("domain")
    add_config_arg(q)
    q.set_defaults(func=cmd_record)


def _load(args: argparse.Namespace) -> Config:
    from mxgate.core.commands import load_from_args

    config, _plugins = load_from_args(args)
    return config


def _describe(entry: CachedPolicy, now: float) -> str:
    state = "valid" if entry.valid(now) else "EXPIRED"
    lines = [
        f"domain:       {entry.domain}",
        f"id:           {entry.policy_id or '-'}",
        f"mode:         {entry.policy.mode}",
        f"max_age:      {entry.policy.max_age}",
        f"mx:           {', '.join(entry.policy.mx) or '-'}",
        f"fetched:      {_iso(entry.fetched_at)}",
        f"expires:      {_iso(entry.expires_at)} ({state})",
        f"last attempt: {_iso(entry.last_attempt_at)}",
        f"failures:     {entry.failures}" + (f" ({entry.last_error})" if entry.last_error else ""),
    ]
    return "\n".join(lines)


def _with_store(config: Config, action: Callable[[SqlitePolicyStore], int]) -> int:
    store = SqlitePolicyStore(config.state_path / CACHE_FILE)
    try:
        return action(store)
    finally:
        store.close()


def cmd_show(args: argparse.Namespace) -> int:
    config = _load(args)
    domain = _norm_domain(args.domain)

    def show(store: SqlitePolicyStore) -> int:
        entry = store.get(domain)
        if entry is None:
            print(f"mxgate: no cached MTA-STS policy for {domain}", file=sys.stderr)
            return 1
        print(json.dumps(entry.to_json(), indent=2) if args.json else _describe(entry, time.time()))
        return 0

    return _with_store(config, show)


def cmd_list(args: argparse.Namespace) -> int:
    config = _load(args)

    def show(store: SqlitePolicyStore) -> int:
        entries = store.load_all()
        if args.json:
            print(json.dumps([e.to_json() for e in entries], indent=2))
            return 0
        rows = [
            (e.domain, e.policy_id or "-", str(e.policy.mode), _iso(e.expires_at), str(e.failures)) for e in entries
        ]
        head = ("DOMAIN", "ID", "MODE", "EXPIRES", "FAILURES")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        for row in [head, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        return 0

    return _with_store(config, show)


def cmd_refresh(args: argparse.Namespace) -> int:
    config = _load(args)
    domain = _norm_domain(args.domain)
    return asyncio.run(_refresh(config, domain))


async def _refresh(config: Config, domain: str) -> int:
    from mxgate.core.dns import resolver_from_config

    resolver = resolver_from_config(config.dns)
    engine = await build_engine(config, lambda: resolver, clock=time.time, sink=NullSink())
    try:
        result = await engine.refresh(domain, trigger="command", force=True)
        entry = engine.cache.get(domain)
    finally:
        await engine.cache.close()
    if not result.ok:
        print(f"mxgate: {domain}: {result.status}: {result.detail}", file=sys.stderr)
        return 1
    if entry is not None:
        print(_describe(entry, time.time()))
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    config = _load(args)
    conf = _section(config)
    domain = _norm_domain(args.domain)
    served = next((p for p in conf.serve_policies if _norm_domain(p.domain) == domain), None)
    if served is None:
        known = ", ".join(p.domain for p in conf.serve_policies) or "none"
        print(f"mxgate: {domain} is not in plugins.mta_sts.serve_policies (served: {known})", file=sys.stderr)
        return 1
    print(served_record(served))
    return 0
