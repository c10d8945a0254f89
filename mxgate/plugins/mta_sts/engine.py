"""The decision (RFC 8461 sections 3.3, 4.2 and 5): which policy is in force for a domain, fetching, caching and
refreshing as needed; what it means for delivery (:func:`build_tls_policy`, precedence 200: DANE's 300 decides where
it applies); and the check of the MX certificate (:func:`verify_mx_certificate`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

from cryptography import x509

from mxgate import (
    Config,
    HostPolicy,
    NextHop,
    PeerVerification,
    PolicyType,
    Resolver,
    SharedDb,
    TlsLevel,
    TlsOutcome,
    TlsPolicy,
    TlsRptResult,
    VerifyReason,
    client_context,
    verify_webpki,
)
from mxgate.plugins.mta_sts.cache import (
    CACHE_FILE,
    FETCH_RETRY_AFTER,
    MAX_FAILURE_MEMORY,
    CachedPolicy,
    PolicyCache,
    SharedPolicies,
    iso,
)
from mxgate.plugins.mta_sts.config import PLUGIN_NAME, MtaStsConfig, norm_domain, section
from mxgate.plugins.mta_sts.fetch import (
    FetchResult,
    FetchStatus,
    PolicyFetcher,
    TxtLookup,
    resolver_addresses,
    resolver_txt,
)
from mxgate.plugins.mta_sts.policy import RecordLookup, RecordStatus, StsMode, StsPolicy, mx_matches

__all__ = [
    "PRECEDENCE",
    "EventSink",
    "NullSink",
    "StsEngine",
    "StsResolution",
    "build_engine",
    "build_tls_policy",
    "trust_paths",
    "verify_mx_certificate",
]

log = logging.getLogger(__name__)

PRECEDENCE = 200  # DANE 300 > MTA-STS 200 > connector 100


class EventSink(Protocol):
    """What the engine reports to: the runtime's hooks (``runtime.hooks``) in the gateway, a null sink in commands."""

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
        domain = norm_domain(domain)
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
            self._recheck.add(norm_domain(domain))

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
        while len(self._failed) > MAX_FAILURE_MEMORY:
            self._failed.popitem(last=False)
        log.warning(
            "MTA-STS policy fetch failed",
            extra={"domain": domain, "id": policy_id, "result": str(result.status), "detail": result.detail},
        )
        return result

    # -- refresh (background and `mxgate sts refresh`)

    async def refresh(self, domain: str, *, trigger: str = "refresh", force: bool = False) -> FetchResult:
        """Fetch the policy again whatever the TXT id says (the id is recorded when there is one)."""
        domain = norm_domain(domain)
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
                        "expires_at": iso(cached.expires_at),
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
# wiring: the engine for a configuration
# ============================================================================================================


def trust_paths(config: Config, conf: MtaStsConfig) -> tuple[str, ...] | None:
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
    conf = section(config)
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
