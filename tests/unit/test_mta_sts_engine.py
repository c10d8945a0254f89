"""The MTA-STS engine with injected TXT lookups, fetcher and clock: caching, id changes, the five-minute rate
limit, re-checks before giving up, background refresh, and the TlsPolicy handed to the core
(RFC-CHECKLIST 20-24)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mxgate.connectors.outbound import OutboundConnector
from mxgate.core.http_wire import HttpRequest
from mxgate.core.outcomes import (
    Destination,
    HopHost,
    NextHop,
    PolicyType,
    TlsLevel,
    TlsOutcome,
    TlsPolicy,
    TlsRptResult,
)
from mxgate.plugins.mta_sts import (
    FETCH_RETRY_AFTER,
    PRECEDENCE,
    CachedPolicy,
    FetchResult,
    FetchStatus,
    MtaStsPlugin,
    PolicyCache,
    PolicyServer,
    ServedPolicy,
    StsEngine,
    StsResolution,
    build_tls_policy,
    served_record,
    verify_mx_certificate,
)
from mxgate.plugins.mta_sts.policy import RecordLookup, RecordStatus, StsRecord, parse_policy
from mxgate.plugins.mta_sts.serve import PolicyResponder, served_label
from mxgate.testing.ca import TestCA

DOMAIN = "example.test"
ENFORCE = "version: STSv1\nmode: enforce\nmx: mx1.example.test\nmx: *.backup.example.test\nmax_age: 86400\n"
TESTING = ENFORCE.replace("enforce", "testing")
NONE = "version: STSv1\nmode: none\nmax_age: 86400\n"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def found(policy_id: str) -> RecordLookup:
    return RecordLookup(RecordStatus.FOUND, StsRecord(policy_id, f"v=STSv1; id={policy_id}"))


@dataclass
class FakeTxt:
    answers: dict[str, RecordLookup] = field(default_factory=dict)
    calls: list[tuple[str, bool]] = field(default_factory=list)

    async def __call__(self, domain: str, fresh: bool) -> RecordLookup:
        self.calls.append((domain, fresh))
        return self.answers.get(domain, RecordLookup(RecordStatus.NONE, detail="no TXT record"))


@dataclass
class FakeFetcher:
    results: dict[str, FetchResult] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    delay: float = 0.0
    running: int = 0
    max_running: int = 0

    async def fetch(self, domain: str) -> FetchResult:
        self.calls.append(domain)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            return self.results.get(domain, FetchResult(FetchStatus.FETCH_ERROR, detail="unreachable"))
        finally:
            self.running -= 1


def ok(text: str) -> FetchResult:
    return FetchResult(FetchStatus.OK, parse_policy(text), detail="ok")


@dataclass
class Sink:
    events: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    outcomes: list[TlsOutcome] = field(default_factory=list)

    async def on_event(self, kind: str, value: float = 1.0, **labels: str) -> None:
        self.events.append((kind, labels))

    async def on_tls_outcome(self, outcome: TlsOutcome) -> None:
        self.outcomes.append(outcome)

    def kinds(self, kind: str) -> list[dict[str, str]]:
        return [labels for k, labels in self.events if k == kind]


@pytest.fixture
async def cache(tmp_path: Path) -> Any:
    c = await PolicyCache.open(tmp_path / "sts-cache.sqlite3")
    yield c
    await c.close()


def make_engine(cache: PolicyCache, **kwargs: Any) -> tuple[StsEngine, FakeTxt, FakeFetcher, Sink, Clock]:
    txt, fetcher, sink, clock = FakeTxt(), FakeFetcher(), Sink(), Clock()
    engine = StsEngine(cache=cache, fetcher=fetcher, txt=txt, clock=clock, sink=sink, **kwargs)  # type: ignore[arg-type]
    return engine, txt, fetcher, sink, clock


# -- resolve ------------------------------------------------------------------------------------------------


async def test_new_id_fetches_once_then_cache_serves(cache: PolicyCache) -> None:
    engine, txt, fetcher, sink, _ = make_engine(cache)
    txt.answers[DOMAIN] = found("id1")
    fetcher.results[DOMAIN] = ok(ENFORCE)
    first = await engine.resolve("Example.TEST.")
    assert (first.origin, first.policy_id, first.domain) == ("fresh", "id1", DOMAIN)
    assert first.policy is not None and first.policy.mx == ("mx1.example.test", "*.backup.example.test")
    second = await engine.resolve(DOMAIN)
    assert second.origin == "cache" and second.policy == first.policy
    assert fetcher.calls == [DOMAIN]  # the unchanged id did not fetch again
    assert sink.kinds("sts_fetch") == [{"result": "ok", "trigger": "delivery"}]
    assert first.fetch is not None and first.fetch.ok and not first.fetch_failed
    assert second.fetch is None


async def test_concurrent_resolves_share_one_fetch(cache: PolicyCache) -> None:
    engine, txt, fetcher, _, _ = make_engine(cache)
    txt.answers[DOMAIN] = found("id1")
    fetcher.results[DOMAIN] = ok(ENFORCE)
    fetcher.delay = 0.05
    results = await asyncio.gather(*(engine.resolve(DOMAIN) for _ in range(5)))
    assert {r.origin for r in results} == {"fresh"}
    assert fetcher.calls == [DOMAIN]
    assert sum(1 for r in results if r.fetch is not None) == 1  # one owner reports the fetch


async def test_changed_id_with_failing_fetch_keeps_old_policy(cache: PolicyCache) -> None:
    engine, txt, fetcher, _, _ = make_engine(cache)
    txt.answers[DOMAIN] = found("id1")
    fetcher.results[DOMAIN] = ok(ENFORCE)
    await engine.resolve(DOMAIN)
    txt.answers[DOMAIN] = found("id2")
    fetcher.results[DOMAIN] = FetchResult(FetchStatus.FETCH_ERROR, detail="connection refused")
    res = await engine.resolve(DOMAIN)
    assert res.origin == "cache" and res.policy_id == "id1"
    assert res.policy is not None and res.policy.mode == "enforce"
    assert res.failure is FetchStatus.FETCH_ERROR
    assert "id2" in res.detail
    assert (
        res.fetch_failed
        and res.fetch is not None
        and res.fetch.status.result_type is (TlsRptResult.STS_POLICY_FETCH_ERROR)
    )
    stored = cache.get(DOMAIN)
    assert stored is not None and stored.policy_id == "id1"


async def test_failed_id_not_fetched_again_within_five_minutes(cache: PolicyCache) -> None:
    engine, txt, fetcher, _, clock = make_engine(cache)
    txt.answers[DOMAIN] = found("id1")
    fetcher.results[DOMAIN] = FetchResult(FetchStatus.INVALID, detail="bad")
    first = await engine.resolve(DOMAIN)
    assert (first.origin, first.failure) == ("none", FetchStatus.INVALID)
    clock.now += FETCH_RETRY_AFTER - 1
    again = await engine.resolve(DOMAIN)
    assert again.failure is FetchStatus.FETCH_ERROR and "not fetched" in again.detail
    assert fetcher.calls == [DOMAIN]
    assert first.fetch_failed and again.fetch is None  # a skipped fetch is not another failure
    # a new id is fetched at once, and the old one again after five minutes
    txt.answers[DOMAIN] = found("id2")
    await engine.resolve(DOMAIN)
    assert len(fetcher.calls) == 2
    txt.answers[DOMAIN] = found("id1")
    clock.now += FETCH_RETRY_AFTER + 1
    await engine.resolve(DOMAIN)
    assert len(fetcher.calls) == 3


async def test_no_record_keeps_cached_policy_until_expiry(cache: PolicyCache) -> None:
    engine, txt, fetcher, _, clock = make_engine(cache)
    txt.answers[DOMAIN] = found("id1")
    fetcher.results[DOMAIN] = ok(ENFORCE)
    await engine.resolve(DOMAIN)
    for status in (RecordStatus.NONE, RecordStatus.INVALID, RecordStatus.ERROR):
        txt.answers[DOMAIN] = RecordLookup(status, detail=str(status))
        res = await engine.resolve(DOMAIN)
        assert (res.origin, res.policy_id) == ("cache", "id1"), status
    clock.now += 86400 + 1  # max_age passed: the cached policy is no longer used
    res = await engine.resolve(DOMAIN)
    assert (res.origin, res.policy) == ("none", None)
    assert fetcher.calls == [DOMAIN]


async def test_no_record_no_cache_is_no_policy(cache: PolicyCache) -> None:
    engine, _, fetcher, _, _ = make_engine(cache)
    res = await engine.resolve(DOMAIN)
    assert (res.origin, res.policy, res.failure) == ("none", None, None)
    assert fetcher.calls == []


async def test_failed_attempt_makes_next_lookup_ask_dns_afresh(cache: PolicyCache) -> None:
    engine, txt, fetcher, _, _ = make_engine(cache)
    txt.answers[DOMAIN] = found("id1")
    fetcher.results[DOMAIN] = ok(ENFORCE)
    plugin = MtaStsPlugin()
    plugin.engine = engine
    await engine.resolve(DOMAIN)
    plugin.mxgate_delivery_on_tls_outcome(
        TlsOutcome("internet", PolicyType.STS, DOMAIN, success=False, result_type=TlsRptResult.VALIDATION_FAILURE)
    )
    plugin.mxgate_delivery_on_tls_outcome(TlsOutcome("internet", PolicyType.TLSA, "other.test", success=False))
    await engine.resolve(DOMAIN)
    await engine.resolve(DOMAIN)
    assert txt.calls == [(DOMAIN, False), (DOMAIN, True), (DOMAIN, False)]


async def test_cache_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "sts-cache.sqlite3"
    first = await PolicyCache.open(path)
    policy = parse_policy(ENFORCE)
    await first.put(CachedPolicy(DOMAIN, "id1", policy, 10.0, 86410.0, 10.0))
    await first.close()
    again = await PolicyCache.open(path)
    try:
        entry = again.get(DOMAIN)
        assert entry is not None
        assert (entry.policy_id, entry.policy, entry.expires_at) == ("id1", policy, 86410.0)
    finally:
        await again.close()


# -- refresh ------------------------------------------------------------------------------------------------


async def test_refresh_failing_signal_after_threshold(cache: PolicyCache) -> None:
    engine, txt, fetcher, sink, clock = make_engine(cache, refresh_alert_after=2)
    txt.answers[DOMAIN] = found("id1")
    fetcher.results[DOMAIN] = ok(TESTING)
    await engine.resolve(DOMAIN)
    fetcher.results[DOMAIN] = FetchResult(FetchStatus.FETCH_ERROR, detail="down")
    for _ in range(3):
        clock.now += FETCH_RETRY_AFTER + 1
        result = await engine.refresh(DOMAIN)
        assert not result.ok
    entry = cache.get(DOMAIN)
    assert entry is not None and entry.failures == 3 and entry.last_error == "down"
    assert entry.policy.mode == "testing"  # the policy itself is kept
    assert sink.kinds("sts_refresh_failing") == [{"mode": "testing"}, {"mode": "testing"}]
    assert sink.kinds("sts_refresh") == [{"result": "failed"}] * 3
    fetcher.results[DOMAIN] = ok(ENFORCE)
    clock.now += FETCH_RETRY_AFTER + 1
    assert (await engine.refresh(DOMAIN)).ok
    entry = cache.get(DOMAIN)
    assert entry is not None and entry.failures == 0 and entry.policy.mode == "enforce"


async def test_failing_refresh_of_a_none_policy_does_not_alert(cache: PolicyCache) -> None:
    engine, txt, fetcher, sink, clock = make_engine(cache, refresh_alert_after=1)
    txt.answers[DOMAIN] = found("id1")
    fetcher.results[DOMAIN] = ok(NONE)
    await engine.resolve(DOMAIN)
    fetcher.results[DOMAIN] = FetchResult(FetchStatus.FETCH_ERROR, detail="down")
    clock.now += FETCH_RETRY_AFTER + 1
    await engine.refresh(DOMAIN)
    assert sink.kinds("sts_refresh_failing") == []


async def test_refresh_due_is_bounded_and_drops_expired(cache: PolicyCache) -> None:
    engine, _, fetcher, _, clock = make_engine(cache, refresh_after=3600, refresh_concurrency=2)
    policy = parse_policy(ENFORCE)
    now = clock.now
    for i in range(6):  # fetched two hours ago: due
        await cache.put(CachedPolicy(f"d{i}.test", "id", policy, now - 7200, now + 80000, now - 7200))
        fetcher.results[f"d{i}.test"] = ok(ENFORCE)
    await cache.put(CachedPolicy("fresh.test", "id", policy, now - 60, now + 86000, now - 60))  # not due
    await cache.put(CachedPolicy("recent.test", "id", policy, now - 7200, now + 80000, now - 10))  # tried just now
    await cache.put(CachedPolicy("soon.test", "id", policy, now - 60, now + 600, now - 600))  # expiring: due
    fetcher.results["soon.test"] = ok(ENFORCE)
    await cache.put(CachedPolicy("gone.test", "id", policy, now - 90000, now - 1, now - 90000))  # expired
    fetcher.delay = 0.02
    count = await engine.refresh_due()
    assert count == 7
    assert sorted(fetcher.calls) == sorted([f"d{i}.test" for i in range(6)] + ["soon.test"])
    assert fetcher.max_running == 2
    assert cache.get("gone.test") is None
    entry = cache.get("d0.test")
    assert entry is not None and entry.fetched_at == now and entry.policy_id == "id"  # no TXT: old id kept


async def test_refresher_task_runs_and_cancels(cache: PolicyCache) -> None:
    engine, *_ = make_engine(cache)
    task = asyncio.ensure_future(engine.run_refresher(0.01))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# -- the TlsPolicy ------------------------------------------------------------------------------------------


def resolution(text: str | None, **kwargs: Any) -> StsResolution:
    policy = parse_policy(text) if text is not None else None
    record = kwargs.pop("record", found("id1") if policy is not None else RecordLookup(RecordStatus.NONE))
    origin = kwargs.pop("origin", "fresh" if policy is not None else "none")
    return StsResolution(DOMAIN, policy, origin, record, "id1" if policy else None, **kwargs)


HOP = NextHop(
    Destination(OutboundConnector(name="internet", recipient_domains=("*",), use_mx=True), DOMAIN),
    (
        HopHost("mx1.example.test", 25, 10),
        HopHost("rogue.example.test", 25, 20),
        HopHost("b1.backup.example.test", 25, 30),
        HopHost("a.b1.backup.example.test", 25, 40),
    ),
    "mx",
)


def test_enforce_marks_non_matching_mx_unusable() -> None:
    policy = build_tls_policy(resolution(ENFORCE), "opportunistic", HOP)
    assert (policy.source, policy.policy_type, policy.level, policy.precedence) == (
        "mta_sts",
        PolicyType.STS,
        TlsLevel.SECURE,
        PRECEDENCE,
    )
    assert policy.applies and not policy.report_only and policy.failure is None
    assert policy.mx_patterns == ("mx1.example.test", "*.backup.example.test")
    assert policy.policy_strings[1] == "mode: enforce"
    assert policy.reference_ids == ()
    assert policy.for_host("mx1.example.test").usable
    assert policy.for_host("b1.backup.example.test").usable
    for bad in ("rogue.example.test", "a.b1.backup.example.test"):
        host = policy.for_host(bad)
        assert not host.usable and host.failure is TlsRptResult.VALIDATION_FAILURE
    assert policy.for_host("mx1.example.test").sni is None  # SNI: the MX host name


def test_testing_reports_only_and_keeps_every_mx() -> None:
    policy = build_tls_policy(resolution(TESTING), "opportunistic", HOP)
    assert policy.applies and policy.report_only and policy.level is TlsLevel.SECURE
    assert all(policy.for_host(h.name).usable for h in HOP.hosts)


def test_mandatory_enforces_a_testing_policy() -> None:
    policy = build_tls_policy(resolution(TESTING), "mandatory", HOP)
    assert policy.applies and not policy.report_only
    assert not policy.for_host("rogue.example.test").usable


@pytest.mark.parametrize("text", [None, NONE])
def test_no_policy_or_mode_none_does_not_apply(text: str | None) -> None:
    policy = build_tls_policy(resolution(text), "opportunistic", HOP)
    assert not policy.applies and policy.failure is None
    assert policy.policy_type is PolicyType.NO_POLICY


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (None, TlsRptResult.STS_POLICY_FETCH_ERROR),
        (FetchStatus.FETCH_ERROR, TlsRptResult.STS_POLICY_FETCH_ERROR),
        (FetchStatus.INVALID, TlsRptResult.STS_POLICY_INVALID),
        (FetchStatus.WEBPKI_INVALID, TlsRptResult.STS_WEBPKI_INVALID),
    ],
)
def test_mandatory_without_policy_defers(failure: FetchStatus | None, expected: TlsRptResult) -> None:
    policy = build_tls_policy(resolution(None, failure=failure), "mandatory", HOP)
    assert policy.applies and policy.failure is expected and policy.level is TlsLevel.SECURE
    assert policy.policy_type is PolicyType.STS
    assert build_tls_policy(resolution(NONE), "mandatory", HOP).failure is TlsRptResult.STS_POLICY_FETCH_ERROR


def test_bogus_record_without_cache_defers() -> None:
    res = resolution(None, record=RecordLookup(RecordStatus.BOGUS, detail="bogus"))
    policy = build_tls_policy(res, "opportunistic", HOP)
    assert policy.applies and policy.failure is TlsRptResult.STS_POLICY_FETCH_ERROR


def test_sts_ranks_below_dane_and_above_connector() -> None:
    assert 100 < PRECEDENCE < 300


async def test_verify_answers_only_for_its_own_policy() -> None:
    plugin = MtaStsPlugin()
    dane = TlsPolicy("dane", PolicyType.TLSA, DOMAIN, TlsLevel.SECURE, 300)
    attempt = SimpleNamespace(
        host=HopHost("mx1.example.test", 25), destination=Destination(HOP.destination.connector, DOMAIN)
    )
    assert await plugin.mxgate_delivery_on_tls_verify(attempt, dane, ()) is None  # type: ignore[arg-type]


# -- the MX certificate ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA.create(tmp_path_factory.mktemp("ca"))


def test_mx_certificate_checks(ca: TestCA, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    trust = (str(ca.cert_path),)
    patterns = ("mx1.example.test", "*.backup.example.test")
    good = ca.issue(["mx1.example.test"])
    result = verify_mx_certificate("mx1.example.test", patterns, good.chain, now=now, trust_store_paths=trust)
    assert (result.ok, result.label, result.matched) == (True, "verified", "mx1.example.test")
    wild = ca.issue(["*.backup.example.test"])
    assert verify_mx_certificate("b7.backup.example.test", patterns, wild.chain, now=now, trust_store_paths=trust).ok
    # valid for another MX of the same policy, but not the one dialled
    other = ca.issue(["b1.backup.example.test"])
    result = verify_mx_certificate("mx1.example.test", patterns, other.chain, now=now, trust_store_paths=trust)
    assert (result.ok, result.result_type) == (False, TlsRptResult.CERTIFICATE_HOST_MISMATCH)
    stranger = TestCA.create(tmp_path / "other", "someone else")
    untrusted = stranger.issue(["mx1.example.test"])
    result = verify_mx_certificate("mx1.example.test", patterns, untrusted.chain, now=now, trust_store_paths=trust)
    assert (result.ok, result.result_type) == (False, TlsRptResult.CERTIFICATE_NOT_TRUSTED)
    expired = ca.issue(["mx1.example.test"], not_after=now - timedelta(days=1))
    result = verify_mx_certificate("mx1.example.test", patterns, expired.chain, now=now, trust_store_paths=trust)
    assert (result.ok, result.result_type) == (False, TlsRptResult.CERTIFICATE_EXPIRED)
    rogue = ca.issue(["rogue.example.test"])
    result = verify_mx_certificate("rogue.example.test", patterns, rogue.chain, now=now, trust_store_paths=trust)
    assert (result.ok, result.result_type) == (False, TlsRptResult.VALIDATION_FAILURE)


# -- serving ------------------------------------------------------------------------------------------------


def test_served_policy_record_and_routing(ca: TestCA) -> None:
    served = ServedPolicy(domain="Example.ORG", mode="enforce", mx=("mx.example.org",), max_age=86400)
    assert served.record_id.isalnum() and len(served.record_id) == 20
    assert served_record(served) == f'_mta-sts.example.org. IN TXT "v=STSv1; id={served.record_id}"'
    changed = ServedPolicy(domain="example.org", mode="testing", mx=("mx.example.org",), max_age=86400)
    assert changed.record_id != served.record_id  # the id follows the policy
    fixed = ServedPolicy(domain="example.org", mx=("mx.example.org",), id="20240101")
    assert served_record(fixed).endswith('"v=STSv1; id=20240101"')
    server = PolicyServer([served], None, Sink())  # type: ignore[arg-type]
    status, body, label = server.respond("GET", "/.well-known/mta-sts.txt", "MTA-STS.example.org:8443")
    assert (status, label) == (200, "ok")
    assert parse_policy(body.decode()).mx == ("mx.example.org",)
    assert server.respond("GET", "/.well-known/mta-sts.txt", "mta-sts.other.org")[0] == 404
    assert server.respond("GET", "/", "mta-sts.example.org")[0] == 404
    assert server.respond("GET", "/.well-known/mta-sts.txt", None)[0] == 404
    assert server.respond("POST", "/.well-known/mta-sts.txt", "mta-sts.example.org")[0] == 405


def test_policy_responder_decides_without_sockets() -> None:
    """What the policy server answers is decided apart from HTTP (``serve.PolicyResponder``)."""
    one = ServedPolicy(domain="example.org", mx=("mx.example.org",), max_age=86400)
    two = ServedPolicy(domain="two.example", mode="testing", mx=("*.two.example",), max_age=600)
    responder = PolicyResponder([one, two])
    status, body, label = responder.respond("HEAD", "/.well-known/mta-sts.txt", "mta-sts.two.example.")
    assert (status, label) == (200, "ok") and parse_policy(body.decode()).mode == "testing"
    assert responder.respond("GET", "/.well-known/mta-sts.txt", "mta-sts.example.org")[1] == one.render().encode()
    assert responder.respond("GET", "/.well-known/mta-sts.txt", "[::1]:443")[2] == "not_found"
    assert responder.respond("GET", "/.well-known/mta-sts.txt?x=1", "mta-sts.example.org")[0] == 404
    assert responder.respond("DELETE", "/", None) == (405, b"method not allowed\n", "bad_request")


def test_policy_responses_and_labels_for_the_shared_http_server() -> None:
    """The HTTP response the shared server sends (headers as before the move to ``mxgate.HttpServer``) and the
    ``sts_policy_served`` label of each status."""
    one = ServedPolicy(domain="example.org", mx=("mx.example.org",), max_age=86400)
    responder = PolicyResponder([one])

    def request(method: str, target: str, host: str | None) -> HttpRequest:
        return HttpRequest(method, target, (("host", host),) if host is not None else ())

    ok = responder.response(request("GET", "/.well-known/mta-sts.txt", "mta-sts.example.org:443"))
    assert (ok.status, ok.body, ok.content_type, ok.headers) == (200, one.render().encode(), "text/plain", ())
    missing = responder.response(request("GET", "/.well-known/mta-sts.txt", None))
    assert (missing.status, missing.body, missing.content_type) == (404, b"not found\n", "text/plain; charset=utf-8")
    refused = responder.response(request("PUT", "/.well-known/mta-sts.txt", "mta-sts.example.org"))
    assert (refused.status, refused.body, refused.header("allow")) == (405, b"method not allowed\n", "GET, HEAD")
    assert [served_label(s) for s in (200, 404, 405, 400, 408, 431, 503)] == ["ok", "not_found"] + ["bad_request"] * 5
