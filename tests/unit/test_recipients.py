"""The recipients agent's parts without a gateway: the file format (addresses, catch-alls, patterns), reload on
change (and keeping the last good list), the TTL cache and token bucket on an injected clock, and the decisions
(550 5.1.1, 451, 421 after too many unknowns, on_unavailable, rate limit, shared callouts) with an injected callout
function in place of the network (the real callout is tested in tests/integration/test_callout.py)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from mxgate import Address, CalloutResult, CalloutVerdict, Disconnect, Reject, Session, TempFail
from mxgate.core.config import build_config
from mxgate.core.errors import ConfigError
from mxgate.core.settings import ConfigRegistry
from mxgate.plugins.recipients import (
    RecipientDomain,
    RecipientFile,
    RecipientsConfig,
    RecipientValidator,
    TokenBucket,
    TtlCache,
    parse_table,
)

FILE = """\
# valid recipients of example.org
alice@example.org
Bob@Example.org   OK
*-list@example.org
team?@example.org
@catchall.example.org

not-an-address
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_parse_table_addresses_catch_alls_and_patterns() -> None:
    table, problems = parse_table(FILE)
    assert problems == ["line 8: expected user@domain, @domain or a pattern, got 'not-an-address'"]
    assert table.entries == 5
    assert table.matches("alice@example.org")
    assert table.matches("ALICE@EXAMPLE.ORG")  # case-insensitive
    assert table.matches("bob@example.org")  # the first word of a line; "OK" after it is ignored
    assert table.matches("sales-list@example.org")
    assert table.matches("team1@example.org")
    assert table.matches("anyone@catchall.example.org")
    assert not table.matches("team12@example.org")  # ? is one character
    assert not table.matches("mallory@example.org")
    assert not table.matches("alice@other.example.org")
    assert not table.matches("sales-list@example.org.evil.test")  # a pattern covers the whole address


def test_recipient_file_reloads_when_it_changes_and_keeps_the_last_good_list(tmp_path: Path) -> None:
    path = tmp_path / "recipients.txt"
    path.write_text("alice@example.org\n")
    source = RecipientFile(path)
    assert source.apply(source.load())
    assert source.table is not None and source.table.matches("alice@example.org")
    assert not source.apply(source.load())  # unchanged: no new table (one stat, no read)

    path.write_text("alice@example.org\ncarol@example.org\n")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a coarse clock: make the change visible
    assert source.apply(source.load())
    assert source.table.matches("carol@example.org")

    replacement = tmp_path / "new.txt"  # an editor's atomic replace: a new inode
    replacement.write_text("dave@example.org\n")
    replacement.replace(path)
    assert source.apply(source.load())
    assert source.table.matches("dave@example.org") and not source.table.matches("alice@example.org")

    path.unlink()  # gone: the last good list stays, with the error on record
    assert not source.apply(source.load())
    assert source.error is not None and "recipients.txt" in source.error
    assert source.table.matches("dave@example.org")


def test_a_missing_file_at_start_has_no_table(tmp_path: Path) -> None:
    source = RecipientFile(tmp_path / "absent.txt")
    assert not source.apply(source.load())
    assert source.table is None and source.error is not None


def test_ttl_cache_expires_and_evicts_least_recently_used() -> None:
    clock = Clock()
    cache: TtlCache[str] = TtlCache(2, clock=clock)
    cache.put("a", "A", 10)
    cache.put("b", "B", 100)
    assert cache.get("a") == "A"  # a is now the most recently used
    cache.put("c", "C", 100)
    assert cache.get("b") is None and cache.get("a") == "A" and cache.get("c") == "C"
    clock.now += 10
    assert cache.get("a") is None  # expired
    cache.put("c", "C", 0)  # ttl 0: not kept, and the older entry goes
    assert cache.get("c") is None and len(cache) == 0


def test_token_bucket_refills_at_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(2.0, 3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.5
    assert [bucket.take(), bucket.take()] == [True, False]
    clock.now += 100
    assert sum(bucket.take() for _ in range(10)) == 3  # never more than the burst saved up


def _registry() -> ConfigRegistry:
    registry = ConfigRegistry()
    registry.add_section("recipients", RecipientsConfig, owner="recipients")
    return registry


def test_config_needs_a_file_or_a_callout_per_domain() -> None:
    doc = {"plugins": {"recipients": {"domain": [{"name": "example.org"}]}}}
    with pytest.raises(ConfigError, match="give a file, or callout = true"):
        build_config(doc, registry=_registry(), check_files=False)
    doc = {"plugins": {"recipients": {"domain": [{"name": "example.org", "callout": True, "on_unavailable": "x"}]}}}
    with pytest.raises(ConfigError, match="on_unavailable"):
        build_config(doc, registry=_registry(), check_files=False)
    doc = {"plugins": {"recipients": {"callout_sender": "not an address"}}}
    with pytest.raises(ConfigError, match="callout_sender"):
        build_config(doc, registry=_registry(), check_files=False)
    doc = {"plugins": {"recipients": {"domain": [{"name": "*.example.org", "callout": True}]}}}
    conf = build_config(doc, registry=_registry(), check_files=False).plugin_section("recipients", RecipientsConfig)
    assert conf.domain == (RecipientDomain("*.example.org", None, True, None),)


class Callouts:
    """Stands in for the network: answers by local part, counts calls, can be held open."""

    def __init__(self, answers: dict[str, CalloutVerdict]) -> None:
        self.answers = answers
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, rcpt: Address, sender: Address | None, timeout: float) -> CalloutResult:
        self.calls.append(str(rcpt))
        if self.gate is not None:
            await self.gate.wait()
        verdict = self.answers.get(rcpt.local, CalloutVerdict.UNAVAILABLE)
        reply = {"accepted": "250 2.1.5 ok", "rejected": "550 5.1.1 unknown"}.get(verdict, "451 4.4.1 down")
        return CalloutResult(str(rcpt), verdict, reply, reply[4:9], "inside", "inside.test", True)


def _session() -> Session:
    return Session("s1", "smtp", "192.0.2.1", 40000, "127.0.0.1", 25)


def _validator(tmp_path: Path, callouts: Callouts, clock: Clock, **conf: object) -> RecipientValidator:
    (tmp_path / "list.txt").write_text("alice@example.org\nalice@both.example.org\n")
    domains = (
        RecipientDomain("example.org", "list.txt", False),
        RecipientDomain("callout.example.org", None, True),
        RecipientDomain("*.open.example.org", None, True, "accept"),
        RecipientDomain("both.example.org", "list.txt", True),
    )
    return RecipientValidator(
        RecipientsConfig(domain=domains, **conf),  # type: ignore[arg-type]
        resolve_path=lambda name: tmp_path / name,
        callout=callouts,
        clock=clock,
    )


async def test_file_source_decisions_and_the_unknown_limit(tmp_path: Path) -> None:
    callouts = Callouts({})
    v = _validator(tmp_path, callouts, Clock(), max_unknown_recipients=2, recipient_delimiter="+")
    await v.reload()
    s = _session()
    assert await v.check(s, Address("alice", "example.org")) is None
    assert await v.check(s, Address("Alice+news", "Example.ORG")) is None  # delimiter and case
    assert await v.check(s, Address("anyone", "elsewhere.test")) is None  # not a validated domain
    first = await v.check(s, Address("mallory", "example.org"))
    assert isinstance(first, Reject) and str(first.reply).startswith("550 5.1.1")
    assert isinstance(await v.check(s, Address("trudy", "example.org")), Reject)
    third = await v.check(s, Address("eve", "example.org"))
    assert isinstance(third, Disconnect) and third.reply.code == 421
    assert callouts.calls == []  # a file-only domain never calls out
    assert await v.check(_session(), Address("mallory", "example.org")) is not None  # a new connection counts anew


async def test_unreadable_file_without_callout_tempfails(tmp_path: Path) -> None:
    v = _validator(tmp_path, Callouts({}), Clock())
    (tmp_path / "list.txt").unlink()
    await v.reload()
    verdict = await v.check(_session(), Address("alice", "example.org"))
    assert isinstance(verdict, TempFail) and verdict.reply.enhanced == "4.3.0"


async def test_callout_answers_are_cached_by_kind(tmp_path: Path) -> None:
    clock = Clock()
    callouts = Callouts({"bob": CalloutVerdict.ACCEPTED, "nobody": CalloutVerdict.REJECTED})
    v = _validator(tmp_path, callouts, clock, positive_ttl=100.0, negative_ttl=10.0, unavailable_ttl=1.0)
    await v.reload()
    s = _session()
    for _ in range(2):
        assert await v.check(s, Address("bob", "callout.example.org")) is None
        assert isinstance(await v.check(s, Address("nobody", "callout.example.org")), Reject)
        down = await v.check(s, Address("carol", "callout.example.org"))
        assert isinstance(down, TempFail) and down.reply.enhanced == "4.4.3"
    assert len(callouts.calls) == 3  # the second round came from the cache
    clock.now += 1.0  # "unavailable" expired
    await v.check(s, Address("carol", "callout.example.org"))
    clock.now += 9.0  # negative expired
    await v.check(s, Address("nobody", "callout.example.org"))
    await v.check(s, Address("bob", "callout.example.org"))  # positive still cached
    assert callouts.calls[3:] == ["carol@callout.example.org", "nobody@callout.example.org"]


async def test_file_first_then_callout_and_on_unavailable_accept(tmp_path: Path) -> None:
    callouts = Callouts({"bob": CalloutVerdict.ACCEPTED})
    v = _validator(tmp_path, callouts, Clock())
    await v.reload()
    s = _session()
    assert await v.check(s, Address("alice", "both.example.org")) is None  # listed: no callout
    assert await v.check(s, Address("bob", "both.example.org")) is None  # not listed: the callout says yes
    assert await v.check(s, Address("carol", "a.open.example.org")) is None  # unavailable, but accept
    assert callouts.calls == ["bob@both.example.org", "carol@a.open.example.org"]


async def test_rate_limit_and_shared_callouts(tmp_path: Path) -> None:
    callouts = Callouts({"bob": CalloutVerdict.ACCEPTED, "x1": CalloutVerdict.REJECTED})
    v = _validator(tmp_path, callouts, Clock(), callout_rate=1.0, callout_burst=2)
    await v.reload()
    callouts.gate = asyncio.Event()
    same = [asyncio.ensure_future(v.check(_session(), Address("bob", "callout.example.org"))) for _ in range(5)]
    await asyncio.sleep(0)
    callouts.gate.set()
    assert await asyncio.gather(*same) == [None] * 5
    assert callouts.calls == ["bob@callout.example.org"]  # five RCPTs, one callout
    assert isinstance(await v.check(_session(), Address("x1", "callout.example.org")), Reject)  # the 2nd token
    busy = await v.check(_session(), Address("x2", "callout.example.org"))  # no token left (the clock stands still)
    assert isinstance(busy, TempFail) and busy.reply.enhanced == "4.4.5"
    assert len(callouts.calls) == 2


async def test_rejections_keep_a_non_5_1_status_but_never_the_inside_servers_text(tmp_path: Path) -> None:
    class Dbeb(Callouts):
        async def __call__(self, rcpt: Address, sender: Address | None, timeout: float) -> CalloutResult:
            self.calls.append(str(rcpt))
            reply = "550 5.4.1 Recipient address rejected: Access denied. AS(201806281) [internal.host.test]"
            return CalloutResult(str(rcpt), CalloutVerdict.REJECTED, reply, "5.4.1", "inside", "inside.test", True)

    v = _validator(tmp_path, Dbeb({}), Clock())
    await v.reload()
    verdict = await v.check(_session(), Address("nobody", "callout.example.org"))
    assert isinstance(verdict, Reject)
    assert str(verdict.reply) == "550 5.4.1 Recipient address rejected"


async def test_a_domains_on_unavailable_overrides_the_sections(tmp_path: Path) -> None:
    conf = RecipientsConfig(
        domain=(RecipientDomain("strict.test", None, True, "tempfail"), RecipientDomain("lax.test", None, True)),
        on_unavailable="accept",
    )
    v = RecipientValidator(conf, resolve_path=lambda n: tmp_path / n, callout=Callouts({}), clock=Clock())
    assert isinstance(await v.check(_session(), Address("a", "strict.test")), TempFail)
    assert await v.check(_session(), Address("a", "lax.test")) is None


async def test_one_client_network_cannot_use_up_the_callouts(tmp_path: Path) -> None:
    callouts = Callouts({})
    clock = Clock()
    v = _validator(tmp_path, callouts, clock, client_callout_rate=0.5, client_callout_burst=2, unavailable_ttl=0.0)

    def from_(ip: str) -> Session:
        return Session("s", "smtp", ip, 40000, "127.0.0.1", 25)

    answers = [await v.check(from_("192.0.2.1"), Address(f"g{i}", "callout.example.org")) for i in range(3)]
    assert [a.reply.enhanced for a in answers if isinstance(a, TempFail)] == ["4.4.3", "4.4.3", "4.4.5"]
    same_net = await v.check(from_("192.0.2.77"), Address("g9", "callout.example.org"))  # the same /24
    assert isinstance(same_net, TempFail) and same_net.reply.enhanced == "4.4.5"
    other = await v.check(from_("198.51.100.1"), Address("g9", "callout.example.org"))
    assert isinstance(other, TempFail) and other.reply.enhanced == "4.4.3"  # asked: its own budget
    clock.now += 2.0  # one token back for the first network
    later = await v.check(from_("192.0.2.1"), Address("g10", "callout.example.org"))
    assert isinstance(later, TempFail) and later.reply.enhanced == "4.4.3"
    assert len(callouts.calls) == 4
