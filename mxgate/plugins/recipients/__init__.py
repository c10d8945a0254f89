"""Built-in agent: recipient validation at RCPT time (Exchange's Recipient Filtering / Directory-Based Edge Blocking).

Without it, any local part at an accepted domain is accepted; when the inside server then refuses the recipient,
the gateway bounces the message to its (often forged) sender: backscatter carrying the attacker's content. With it,
each ``[[plugins.recipients.domain]]`` names where the valid recipients of a domain are known:

- ``file``: addresses, ``@domain`` catch-alls and ``*``/``?`` patterns (:mod:`.table`); a background task checks
  the file's signature (inode, size, mtime) every ``reload_interval`` seconds off the event loop and swaps the
  new table in; a file that disappears or cannot be read keeps the last good table;
- ``callout = true``: recipients the file does not list (or all of them, without a file) are verified at the next
  hop a delivery would use (:meth:`mxgate.Runtime.callout`: same route, connector, TLS policy and AUTH; MAIL
  FROM, RCPT TO, RSET/QUIT, never DATA); answers are cached (``positive_ttl``, ``negative_ttl``,
  ``unavailable_ttl``), concurrent callouts for one address share one session, at most ``callout_concurrency`` run
  at once and ``callout_rate`` start per second (a token bucket of ``callout_burst``), of which one client network
  (IPv4 /24, IPv6 /64) may cause ``client_callout_rate``: beyond that the client gets ``451 4.4.5`` and no callout
  is made.

Unknown recipients get ``550 5.1.1`` before DATA; after ``max_unknown_recipients`` of them in one connection the
client gets ``421 4.7.0`` and is disconnected (a dictionary attack learns a few names per connection, not a
directory). When the next hop cannot say (unreachable, timeout, 4xx, MAIL refused) the answer is ``on_unavailable``:
``tempfail`` (``451 4.4.3``, the default) or ``accept``. Every check is reported as the event ``recipient_check``
(labels ``source``: file | callout | cache | none, ``result``: known | unknown | unavailable | busy).

Per process: with ``server.receive_workers`` every worker keeps its own cache and rate limit.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mxgate import (
    Address,
    CalloutResult,
    CalloutVerdict,
    ConfigRegistry,
    Disconnect,
    Reject,
    Reply,
    Runtime,
    Session,
    StashKey,
    TempFail,
    Verdict,
    hookimpl,
    setting,
)
from mxgate.plugins.recipients.cache import TokenBucket, TtlCache
from mxgate.plugins.recipients.table import RecipientFile, RecipientTable, parse_table

__all__ = [
    "PLUGIN_NAME",
    "RecipientDomain",
    "RecipientFile",
    "RecipientTable",
    "RecipientValidator",
    "RecipientsConfig",
    "RecipientsPlugin",
    "TokenBucket",
    "TtlCache",
    "parse_table",
]

log = logging.getLogger(__name__)

PLUGIN_NAME = "recipients"
UNAVAILABLE_CHOICES = ("tempfail", "accept")

UNKNOWN = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
UNAVAILABLE = Reply(451, "4.4.3", "Recipient address verification unavailable, try again later")
BUSY = Reply(451, "4.4.5", "Recipient address verification busy, try again later")
NO_LIST = Reply(451, "4.3.0", "Recipient list unavailable, try again later")
TOO_MANY = Reply(421, "4.7.0", "Too many unknown recipients, closing connection")

UNKNOWN_COUNT = StashKey[int]()  # unknown recipients so far in this connection


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _not_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def _check_sender(value: Any) -> str | None:
    local, at, domain = str(value).rpartition("@")
    if value and not (at and local and domain and str(value).isprintable() and " " not in str(value)):
        return "expected an address (local@domain) or an empty string for <>"
    return None


def _check_domain_name(value: Any) -> str | None:
    name = str(value).lower()
    bare = name[2:] if name.startswith("*.") else name
    if not bare or "*" in bare or "@" in bare or bare.startswith(".") or bare.endswith(".") or " " in bare:
        return "expected a domain ('example.org') or '*.example.org'"
    return None


@dataclass(frozen=True, slots=True)
class RecipientDomain:
    name: str = setting(
        desc="Domain whose recipients are validated: 'example.org' or '*.example.org' (its subdomains).",
        check=_check_domain_name,
    )
    file: str | None = setting(
        None,
        desc="File of valid recipients: 'user@example.org', '@example.org' (catch-all), '*-list@example.org'; "
        "reloaded when it changes.",
    )
    callout: bool = setting(
        False,
        desc="Verify recipients the file does not list (all, without a file) by a callout to the domain's next hop.",
    )
    on_unavailable: str | None = setting(
        None,
        desc="This domain's answer when a callout cannot tell (default: the section's on_unavailable).",
        choices=UNAVAILABLE_CHOICES,
    )


def _check_domains(values: Any) -> str | None:
    seen: set[str] = set()
    for i, entry in enumerate(values):
        if entry.file is None and not entry.callout:
            return f"[{i}] ({entry.name}): give a file, or callout = true, or both"
        key = entry.name.lower()
        if key in seen:
            return f"[{i}]: {entry.name} is listed twice"
        seen.add(key)
    return None


@dataclass(frozen=True, slots=True)
class RecipientsConfig:
    domain: tuple[RecipientDomain, ...] = setting(
        (), desc="Domains whose recipients are validated at RCPT ([[plugins.recipients.domain]]).", check=_check_domains
    )
    reload_interval: float = setting(
        5.0, desc="Seconds between checks whether a recipients file changed (one stat each).", check=_positive
    )
    recipient_delimiter: str = setting(
        "", desc="Address extension separator ('+': user+tag@ matches a file's user@); empty: none."
    )
    max_unknown_recipients: int = setting(
        5, desc="Unknown recipients one connection may try before 421 4.7.0 and disconnect.", check=_positive
    )
    on_unavailable: str = setting(
        "tempfail",
        desc="Answer when a callout cannot tell (unreachable, timeout, 4xx): tempfail (451 4.4.3) or accept.",
        choices=UNAVAILABLE_CHOICES,
    )
    callout_timeout: float = setting(
        10.0, desc="Seconds a callout may take in all (connect, TLS, MAIL, RCPT).", check=_positive
    )
    callout_sender: str = setting(
        "", desc="MAIL FROM of callouts ('verify@example.org'); empty: the null sender <>.", check=_check_sender
    )
    callout_concurrency: int = setting(10, desc="Callouts running at the same time (per process).", check=_positive)
    callout_rate: float = setting(
        10.0, desc="Callouts started per second at most (per process); beyond it: 451 4.4.5.", check=_positive
    )
    callout_burst: int = setting(20, desc="Callouts that may start at once after a quiet time.", check=_positive)
    client_callout_rate: float = setting(
        1.0,
        desc="Callouts one client network (IPv4 /24, IPv6 /64) may cause per second; beyond it: 451 4.4.5.",
        check=_positive,
    )
    client_callout_burst: int = setting(
        10, desc="Callouts one client network may cause at once after a quiet time.", check=_positive
    )
    positive_ttl: float = setting(
        86400.0, desc="Seconds a recipient the next hop accepted is remembered.", check=_not_negative
    )
    negative_ttl: float = setting(
        3600.0, desc="Seconds a recipient the next hop refused is remembered.", check=_not_negative
    )
    unavailable_ttl: float = setting(
        30.0,
        desc="Seconds an unanswered callout is remembered (no callout per RCPT during an outage).",
        check=_not_negative,
    )
    cache_size: int = setting(
        100000, desc="Callout answers kept at most (least recently used go first).", check=_positive
    )


@dataclass
class _Domain:
    conf: RecipientDomain
    file: RecipientFile | None
    on_unavailable: str


class RecipientValidator:
    """The decisions, given the configuration, a callout function and a clock (tested without a gateway)."""

    def __init__(
        self,
        conf: RecipientsConfig,
        *,
        resolve_path: Callable[[str], Any],
        callout: Callable[[Address, Address | None, float], Any],
        clock: Callable[[], float] = time.monotonic,
        report: Callable[..., Any] | None = None,
    ) -> None:
        self.conf = conf
        self.clock = clock
        self._callout = callout
        self._report = report
        self.domains = [
            _Domain(d, RecipientFile(resolve_path(d.file)) if d.file else None, d.on_unavailable or conf.on_unavailable)
            for d in conf.domain
        ]
        self.cache: TtlCache[CalloutResult] = TtlCache(conf.cache_size, clock=clock)
        self.bucket = TokenBucket(conf.callout_rate, conf.callout_burst, clock=clock)
        self.client_buckets: TtlCache[TokenBucket] = TtlCache(10000, clock=clock)
        self._slots = asyncio.Semaphore(conf.callout_concurrency)
        self._inflight: dict[str, asyncio.Future[CalloutResult]] = {}
        self.callouts = 0  # callouts made (tests and logs)
        local, _, domain = conf.callout_sender.rpartition("@")
        self._sender = Address(local, domain) if conf.callout_sender else None

    # -- files ---------------------------------------------------------------------------------------------

    @property
    def files(self) -> list[RecipientFile]:
        return [d.file for d in self.domains if d.file is not None]

    async def reload(self) -> int:
        """Check every file once (off the loop); returns how many new tables are in force."""
        changed = 0
        for f in self.files:
            result = await asyncio.to_thread(f.load)
            had_error = f.error
            if f.apply(result):
                changed += 1
                table = f.table
                assert table is not None
                log.info("recipients file loaded", extra={"file": str(f.path), "entries": table.entries})
                for problem in f.problems[:20]:
                    log.warning("recipients file: skipped a line", extra={"file": str(f.path), "problem": problem})
            if f.error and f.error != had_error:
                log.warning(
                    "recipients file unreadable; the last good list stays in force"
                    if f.table is not None
                    else "recipients file unreadable; its domain's recipients get 451 until it can be read",
                    extra={"file": str(f.path), "error": f.error},
                )
        return changed

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.conf.reload_interval)
            try:
                await self.reload()
            except Exception:  # the watcher never dies; the next round tries again
                log.exception("recipients file check failed")

    # -- decisions -----------------------------------------------------------------------------------------

    def domain_for(self, domain: str) -> _Domain | None:
        """The entry for a recipient domain: exact name first, else the most specific ``*.parent``."""
        domain = domain.lower().rstrip(".")
        best: tuple[int, _Domain] | None = None
        for d in self.domains:
            name = d.conf.name.lower()
            if name == domain:
                return d
            if name.startswith("*.") and domain.endswith(name[1:]) and (best is None or len(name) > best[0]):
                best = (len(name), d)
        return best[1] if best is not None else None

    def _lookup_keys(self, rcpt: Address) -> list[str]:
        address = f"{rcpt.local}@{rcpt.domain.rstrip('.')}".lower()
        keys = [address]
        delim = self.conf.recipient_delimiter
        if delim:
            base = rcpt.local.lower().split(delim, 1)[0] if delim in rcpt.local else None
            if base:
                keys.append(f"{base}@{rcpt.domain.rstrip('.').lower()}")
        return keys

    async def check(self, session: Session, rcpt: Address) -> Verdict | None:
        entry = self.domain_for(rcpt.domain)
        if entry is None or rcpt.is_null:
            return None
        keys = self._lookup_keys(rcpt)
        if entry.file is not None:
            table = entry.file.table
            if table is not None and any(table.matches(k) for k in keys):
                await self._event("file", "known")
                return None
            if table is None and not entry.conf.callout:
                await self._event("file", "unavailable")
                return TempFail(NO_LIST)
            if not entry.conf.callout:
                return await self._unknown(session, "file", UNKNOWN)
        result, source = await self.verify(rcpt, keys[0], client=session.peer_ip)
        if result is None:
            await self._event("none", "busy")
            return TempFail(BUSY)
        if result.verdict == CalloutVerdict.ACCEPTED:
            await self._event(source, "known")
            return None
        if result.verdict == CalloutVerdict.REJECTED:
            return await self._unknown(session, source, _rejection(result))
        await self._event(source, "unavailable")
        return None if entry.on_unavailable == "accept" else TempFail(UNAVAILABLE)

    async def _unknown(self, session: Session, source: str, reply: Reply) -> Verdict:
        await self._event(source, "unknown")
        count = session.stash.get(UNKNOWN_COUNT, 0) + 1
        session.stash[UNKNOWN_COUNT] = count
        if count > self.conf.max_unknown_recipients:
            log.info(
                "too many unknown recipients: disconnecting", extra={"session": session.id, "peer": session.peer_ip}
            )
            return Disconnect(TOO_MANY)
        return Reject(reply)

    def _client_bucket(self, peer_ip: str) -> TokenBucket:
        try:
            ip = ipaddress.ip_address(peer_ip)
            net = str(ipaddress.ip_network(f"{ip}/{24 if ip.version == 4 else 64}", strict=False))
        except ValueError:
            net = peer_ip
        bucket = self.client_buckets.get(net)
        if bucket is None:
            bucket = TokenBucket(self.conf.client_callout_rate, self.conf.client_callout_burst, clock=self.clock)
        # kept while it matters: a bucket that refilled completely is the same as a new one
        self.client_buckets.put(net, bucket, self.conf.client_callout_burst / self.conf.client_callout_rate + 1.0)
        return bucket

    async def verify(self, rcpt: Address, key: str, *, client: str | None = None) -> tuple[CalloutResult | None, str]:
        """(the answer, "cache" or "callout"); ``None`` when a rate limit (the client network's, then the
        process's) allows no callout now."""
        cached = self.cache.get(key)
        if cached is not None:
            return cached, "cache"
        pending = self._inflight.get(key)
        if pending is not None:  # the same address asked in parallel: one session answers both
            await asyncio.wait((pending,))  # never raises; our own cancellation still does
            if pending.cancelled() or pending.exception() is not None:
                return CalloutResult(key, CalloutVerdict.UNAVAILABLE, str(UNAVAILABLE), "4.4.3"), "cache"
            return pending.result(), "cache"
        if client is not None and not self._client_bucket(client).take():
            return None, "none"
        if not self.bucket.take():
            return None, "none"
        future: asyncio.Future[CalloutResult] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            async with self._slots:
                self.callouts += 1
                result: CalloutResult = await self._callout(rcpt, self._sender, self.conf.callout_timeout)
            ttl = {
                CalloutVerdict.ACCEPTED: self.conf.positive_ttl,
                CalloutVerdict.REJECTED: self.conf.negative_ttl,
            }.get(result.verdict, self.conf.unavailable_ttl)
            self.cache.put(key, result, ttl)
            log.debug(
                "recipient callout",
                extra={"recipient": key, "verdict": str(result.verdict), "reply": result.reply, "host": result.host},
            )
            future.set_result(result)
            return result, "callout"
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            del self._inflight[key]

    async def _event(self, source: str, result: str) -> None:
        if self._report is not None:
            await self._report("recipient_check", source=source, result=result)


def _rejection(result: CalloutResult) -> Reply:
    """Our own text (the inside server's is not for the internet); its status when it is a 5.x.x one."""
    status = result.status
    if status.startswith("5.1.") or not status.startswith("5."):
        return UNKNOWN
    try:
        return Reply(550, status, "Recipient address rejected")
    except ValueError:
        return UNKNOWN


class RecipientsPlugin:
    """Recipient validation at RCPT: a file of addresses and/or a callout to the next hop; unknown: 550 5.1.1."""

    name = PLUGIN_NAME
    priority = 40

    def __init__(self) -> None:
        self.validator: RecipientValidator | None = None

    @hookimpl
    def mxgate_lifecycle_register_config(self, registry: ConfigRegistry) -> None:
        registry.add_section(PLUGIN_NAME, RecipientsConfig, owner=PLUGIN_NAME)

    @hookimpl
    async def mxgate_lifecycle_on_startup(self, runtime: Runtime) -> None:
        conf = runtime.config.plugin_section(PLUGIN_NAME, RecipientsConfig)
        if not conf.domain:
            return

        async def callout(rcpt: Address, sender: Address | None, timeout: float) -> CalloutResult:
            return await runtime.callout(rcpt, sender=sender, timeout=timeout)

        validator = RecipientValidator(
            conf, resolve_path=runtime.config.path, callout=callout, report=runtime.hooks.on_event
        )
        await validator.reload()
        unreadable = [f for f in validator.files if f.table is None]
        if unreadable:
            raise RuntimeError(f"recipients file cannot be read: {unreadable[0].error}")
        runtime.tasks.append(asyncio.ensure_future(validator.watch()))
        self.validator = validator

    @hookimpl
    def mxgate_lifecycle_on_shutdown(self) -> None:
        self.validator = None

    @hookimpl
    async def mxgate_receive_on_rcpt_command(self, session: Session, rcpt: Address) -> Verdict | None:
        validator = self.validator
        if validator is None:
            return None
        return await validator.check(session, rcpt)
