"""Sending: each full UTC day, each policy domain's report is scheduled within the send window, built (RFC 8460
section 4, see :mod:`~mxgate.plugins.tlsrpt.report`) and delivered to every ``rua`` of the domain's one valid
``_smtp._tls`` record: ``https:`` by POST, ``mailto:`` as a DKIM-signed message through the gateway's queue (the one
door every message takes, :meth:`mxgate.Runtime.submit`), retried for up to 24 hours (RFC 8460 5.5).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import secrets
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import dkim
import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import mxgate.plugins.tlsrpt.report as rpt
from mxgate import ClusterUnavailable
from mxgate.plugins.tlsrpt.collect import CATCH_UP_DAYS, DAY, Collector
from mxgate.plugins.tlsrpt.parse import decode_report_bytes
from mxgate.plugins.tlsrpt.report import PolicyAggregate, TlsRptRecord

__all__ = ["GRACE_SECONDS", "RETRY_WINDOW", "SendResult", "Sender", "SubmitFn", "dkim_sign", "load_dkim_key"]

log = logging.getLogger("mxgate.plugins.tlsrpt")

GRACE_SECONDS: Final = 600  # after midnight UTC, before a day's report may be built (late outcomes, flushes)
RETRY_FIRST: Final = 300.0  # first retry after 5 minutes, doubling ...
RETRY_MAX: Final = 4 * 3600.0  # ... up to 4 hours apart
RETRY_WINDOW: Final = 24 * 3600.0  # RFC 8460 5.5: retry for up to 24 hours
MAX_DUE_PER_TICK: Final = 200
HTTP_TIMEOUT: Final = 30.0

# :meth:`mxgate.Runtime.submit`: (sender, recipients, data, *, meta, now) -> queue id once the message is on disk
SubmitFn = Callable[..., Awaitable[str]]


def _update_delivery(conn: Any, params: tuple[Any, ...]) -> None:
    conn.execute(
        "UPDATE delivery SET state = ?, attempts = ?, next_attempt = ?, last_error = ?, done_at = ?"
        " WHERE day = ? AND domain = ? AND scope = ? AND uri = ?",
        params,
    )


def _report_state(conn: Any, day: str, domain: str) -> tuple[Any, ...] | None:
    row = conn.execute("SELECT state FROM report WHERE day = ? AND domain = ? AND scope = ''", (day, domain)).fetchone()
    return None if row is None else tuple(row)


def _backoff(attempts: int) -> float:
    return float(min(RETRY_MAX, RETRY_FIRST * 2 ** max(0, attempts - 1)))


def _today(now: float) -> str:
    return rpt.utc_day(now)


@dataclass(frozen=True, slots=True)
class SendResult:
    """What one delivery attempt of a report did."""

    uri: str
    method: str  # "https" | "mailto"
    ok: bool
    detail: str = ""


def load_dkim_key(path: Path) -> bytes:
    """PEM in any form cryptography reads -> the PKCS#1 PEM dkimpy signs with (RSA only). A key file others may
    read is used, with a warning (it is the operator's file)."""
    mode = path.stat().st_mode
    if mode & 0o077:
        log.warning("TLS-RPT: DKIM key %s is group- or world-accessible (mode %04o); chmod 600 it", path, mode & 0o7777)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path}: DKIM key must be RSA (ed25519 signing needs PyNaCl)")
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def dkim_sign(message: bytes, *, selector: str, domain: str, key_pem: bytes) -> bytes:
    """``message`` with a DKIM-Signature prepended (relaxed/relaxed, no ``l=``, the RFC 8460 headers signed)."""
    present = {h.lower() for h in rpt.DKIM_SIGNED_HEADERS if rpt.parse_message_headers(message).get(h) is not None}
    include = [h for h in rpt.DKIM_SIGNED_HEADERS if h.lower() in present]
    sig = dkim.sign(
        message,
        selector.encode("ascii"),
        domain.encode("ascii"),
        key_pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[h.encode("ascii") for h in include],
        tlsrpt=True,
    )
    return bytes(sig) + message


class Sender(Collector):
    """Scheduling, building and delivering our reports (the sending half of the service)."""

    submit: SubmitFn | None
    rng: random.Random
    _dkim_key: bytes | None
    _last_purge: float

    def _init_sender(self, *, submit: SubmitFn | None, rng: random.Random | None) -> None:
        self.submit = submit
        self.rng = rng or random.SystemRandom()
        self._dkim_key = None
        self._last_purge = 0.0

    # -- building --------------------------------------------------------------------------------------------

    def _report_id(self, day: str, domain: str) -> tuple[str, str]:
        uid = secrets.token_hex(6)
        return f"{day.replace('-', '')}.{domain}.{uid}@{self.submitter}", uid

    def render(self, day: str, policies: Sequence[PolicyAggregate], report_id: str) -> dict[str, Any]:
        return rpt.build_report(
            organization_name=self.organization,
            contact_info=self.contact,
            report_id=report_id,
            day=day,
            policies=policies,
        )

    async def preview(self, day: str, domain: str) -> dict[str, Any] | None:
        """The report for ``domain`` on ``day``: the stored one when it was built already, else built now."""
        stored = await self.db.run(
            lambda c: c.execute(
                "SELECT body FROM report WHERE day = ? AND domain = ? AND scope = '' AND body IS NOT NULL",
                (day, domain),
            ).fetchone()
        )
        if stored is not None:
            doc: dict[str, Any] = decode_report_bytes(bytes(stored[0]))
            return doc
        aggs = await self.aggregates(day, domain)
        if not aggs:
            return None
        return self.render(day, aggs, f"{day.replace('-', '')}.{domain}.preview@{self.submitter}")

    # -- rua discovery ---------------------------------------------------------------------------------------

    async def lookup_rua(self, domain: str) -> TlsRptRecord | str | None:
        """The one valid record at ``_smtp._tls.<domain>``; ``None`` when there is none (no reporting); a
        string saying why when the lookup failed (retry later: a failure is never "no record")."""
        if self.resolver is None:
            return "no resolver"
        answer = await self.resolver.resolve(f"_smtp._tls.{domain}", "TXT")
        if answer.is_failure:
            return f"{answer.kind}/{answer.status}: {answer.error or 'lookup failed'}"
        if not answer.exists:
            return None
        strings = [tuple(getattr(r, "strings", ())) for r in answer.records]
        return rpt.parse_tlsrpt_record(strings)

    # -- scheduling and building -----------------------------------------------------------------------------

    async def schedule(self, now: float) -> int:
        """Give every (full day, domain) with counts and no report yet a due time: midnight + grace + a random
        delay within the send window. Returns how many were scheduled."""
        await self.flush()
        today = _today(now)
        oldest = rpt.utc_day(now - CATCH_UP_DAYS * DAY)
        window = self.conf.send_window_hours * 3600.0

        def job(conn: Any) -> int:
            rows = conn.execute(
                "SELECT DISTINCT p.day, p.domain FROM policy p WHERE p.day < ? AND p.day >= ? AND NOT EXISTS"
                " (SELECT 1 FROM report r WHERE r.day = p.day AND r.domain = p.domain AND r.scope = '')",
                (today, oldest),
            ).fetchall()
            for day, domain in rows:
                due = rpt.day_bounds(day)[1] + 1 + GRACE_SECONDS + self.rng.uniform(0.0, window)
                conn.execute(
                    "INSERT INTO report (day, domain, scope, state, due_at) VALUES (?, ?, '', 'scheduled', ?)"
                    " ON CONFLICT (day, domain, scope) DO NOTHING",
                    (day, domain, due),
                )
            return len(rows)

        return await self.db.write(job)

    async def build(self, day: str, domain: str, now: float) -> str:
        """Build the day's report for ``domain`` and queue one delivery per rua URI (plus the DANE MX-host
        reports). Returns the report's new state: built | no-rua | empty | scheduled (DNS failed, retry) |
        dns-failed (gave up)."""
        aggs = await self.aggregates(day, domain)
        row = await self.db.run(
            lambda c: c.execute(
                "SELECT state, attempts, first_try FROM report WHERE day = ? AND domain = ? AND scope = ''",
                (day, domain),
            ).fetchone()
        )
        attempts = int(row[1]) + 1 if row else 1
        first_try = float(row[2]) if row and row[2] is not None else now
        if not aggs:
            await self._set_report(day, domain, "", "empty", now, attempts, first_try)
            return "empty"
        found = await self.lookup_rua(domain)
        if isinstance(found, str):
            if now + _backoff(attempts) > first_try + RETRY_WINDOW:
                await self._set_report(day, domain, "", "dns-failed", now, attempts, first_try, error=found)
                return "dns-failed"
            await self._set_report(day, domain, "", "scheduled", now + _backoff(attempts), attempts, first_try, found)
            return "scheduled"
        if found is None or not found.rua:
            await self._set_report(day, domain, "", "no-rua", now, attempts, first_try)
            return "no-rua"
        await self._store_built(day, domain, "", aggs, found, now, attempts, first_try)
        # DANE: the MX host's operator may publish its own _smtp._tls record (RFC 8460 3).
        seen = set(found.rua)
        for mx in sorted({h for a in aggs if a.key.policy_type == "tlsa" for h in a.key.mx_hosts}):
            if mx == domain:
                continue
            mx_found = await self.lookup_rua(mx)
            if not isinstance(mx_found, TlsRptRecord) or not mx_found.rua or set(mx_found.rua) <= seen:
                continue
            part = [a for a in aggs if a.key.policy_type == "tlsa" and mx in a.key.mx_hosts]
            await self._store_built(day, domain, mx, part, mx_found, now, 1, now)
        return "built"

    async def _set_report(
        self,
        day: str,
        domain: str,
        scope: str,
        state: str,
        due: float,
        attempts: int,
        first_try: float,
        error: str | None = None,
    ) -> None:
        await self.db.write(
            lambda c: c.execute(
                "INSERT INTO report (day, domain, scope, state, due_at, attempts, first_try, last_error)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, domain, scope) DO UPDATE SET"
                " state = excluded.state, due_at = excluded.due_at, attempts = excluded.attempts,"
                " first_try = excluded.first_try, last_error = excluded.last_error",
                (day, domain, scope, state, due, attempts, first_try, error),
            )
        )

    async def _store_built(
        self,
        day: str,
        domain: str,
        scope: str,
        aggs: Sequence[PolicyAggregate],
        record: TlsRptRecord,
        now: float,
        attempts: int,
        first_try: float,
    ) -> None:
        report_id, uid = self._report_id(day, scope or domain)
        body = rpt.gzip_report(self.render(day, aggs, report_id))
        filename = rpt.report_filename(self.submitter, domain, day, uid)

        def job(conn: Any) -> None:
            conn.execute(
                "INSERT INTO report (day, domain, scope, state, due_at, attempts, first_try, report_id, filename,"
                " body) VALUES (?, ?, ?, 'built', ?, ?, ?, ?, ?, ?) ON CONFLICT (day, domain, scope) DO UPDATE SET"
                " state = 'built', due_at = excluded.due_at, attempts = excluded.attempts, first_try ="
                " excluded.first_try, report_id = excluded.report_id, filename = excluded.filename,"
                " body = excluded.body, last_error = NULL",
                (day, domain, scope, now, attempts, first_try, report_id, filename, body),
            )
            for uri in record.rua:
                conn.execute(
                    "INSERT INTO delivery (day, domain, scope, uri, state, next_attempt, deadline)"
                    " VALUES (?, ?, ?, ?, 'pending', ?, ?) ON CONFLICT DO NOTHING",
                    (day, domain, scope, uri, now, now + RETRY_WINDOW),
                )

        await self.db.write(job)

    # -- sending ---------------------------------------------------------------------------------------------

    async def tick(self, now: float | None = None) -> None:
        """One round of the background loop: flush, schedule new days, build due reports, send due deliveries,
        purge old data. Bounded: at most ``MAX_DUE_PER_TICK`` reports and deliveries per round."""
        now = self.clock() if now is None else now
        await self.flush()
        try:
            async with self.db.exclusive("tlsrpt-send") as ours:
                if ours:  # in a cluster, the one node holding the lock runs this round
                    await self._round(now)
        except ClusterUnavailable as exc:  # the next round, on whichever node then holds the lock, goes on
            log.info("TLS-RPT sending round skipped: cluster database unavailable", extra={"error": str(exc)})

    async def _round(self, now: float) -> None:
        await self.schedule(now)
        due = await self.db.run(
            lambda c: c.execute(
                "SELECT day, domain FROM report WHERE scope = '' AND state = 'scheduled' AND due_at <= ?"
                " ORDER BY due_at LIMIT ?",
                (now, MAX_DUE_PER_TICK),
            ).fetchall()
        )
        for day, domain in due:
            await self.build(day, domain, now)
        await self.send_due(now)
        if now - self._last_purge > 3600:
            self._last_purge = now
            await self.purge(now)
            if self.shared is not None:
                await self.purge(now, self.local)

    async def send_due(self, now: float, *, day: str | None = None, domain: str | None = None) -> list[SendResult]:
        """Attempt every pending delivery that is due (or, with ``day``, every pending one of that day)."""
        query = (
            "SELECT d.day, d.domain, d.scope, d.uri, d.attempts, d.deadline, r.report_id, r.filename, r.body"
            " FROM delivery d JOIN report r ON r.day = d.day AND r.domain = d.domain AND r.scope = d.scope"
            " WHERE d.state = 'pending'"
        )
        args: list[Any] = []
        if day is None:
            query += " AND d.next_attempt <= ?"
            args.append(now)
        else:
            query += " AND d.day = ?"
            args.append(day)
        if domain is not None:
            query += " AND d.domain = ?"
            args.append(domain)
        query += " ORDER BY d.next_attempt LIMIT ?"
        args.append(MAX_DUE_PER_TICK)
        rows = await self.db.run(lambda c: c.execute(query, args).fetchall())
        results = []
        for rday, rdomain, scope, uri, attempts, deadline, report_id, filename, body in rows:
            result = await self.deliver(
                uri, domain=rdomain, report_id=report_id, filename=filename, gz=bytes(body), now=now
            )
            results.append(result)
            tries = int(attempts) + 1
            if result.ok:
                state, nxt = "sent", now
            elif now + _backoff(tries) <= float(deadline):
                state, nxt = "pending", now + _backoff(tries)
            else:
                state, nxt = "failed", now
            params = (
                state,
                tries,
                nxt,
                None if state == "sent" else result.detail,
                now if state != "pending" else None,
                rday,
                rdomain,
                scope,
                uri,
            )
            await self.db.write(functools.partial(_update_delivery, params=params))
            label = "ok" if state == "sent" else ("retry" if state == "pending" else "failed")
            await self.emit("tlsrpt_sent", result=label, method=result.method)
            if state == "failed":
                log.warning("TLS report not delivered", extra={"uri": uri, "domain": rdomain, "error": result.detail})
        return results

    async def deliver(
        self, uri: str, *, domain: str, report_id: str, filename: str, gz: bytes, now: float
    ) -> SendResult:
        if uri.lower().startswith("https:"):
            return await self.post_https(uri, gz)
        return await self.send_mail(uri, domain=domain, report_id=report_id, filename=filename, gz=gz, now=now)

    def _https_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(
            cafile=str(self.path(self.conf.https_ca_file)) if self.conf.https_ca_file else None
        )
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    async def post_https(self, uri: str, gz: bytes) -> SendResult:
        """RFC 8460 5.4: POST the gzip report; any 2xx is success. Redirects are not followed."""
        try:
            async with httpx.AsyncClient(
                verify=self._https_context(), timeout=HTTP_TIMEOUT, follow_redirects=False
            ) as client:
                response = await client.post(uri, content=gz, headers={"Content-Type": rpt.MEDIA_TYPE_GZIP})
        except (httpx.HTTPError, ssl.SSLError, OSError) as exc:
            return SendResult(uri, "https", False, f"{type(exc).__name__}: {exc}"[:300])
        if 200 <= response.status_code < 300:
            return SendResult(uri, "https", True, str(response.status_code))
        return SendResult(uri, "https", False, f"HTTP {response.status_code}")

    def dkim_key(self) -> bytes | None:
        if self._dkim_key is None and self.conf.dkim_key_file and self.conf.dkim_selector:
            self._dkim_key = load_dkim_key(self.path(self.conf.dkim_key_file))
        return self._dkim_key

    async def build_signed_mail(
        self, to_addrs: Sequence[str], *, domain: str, report_id: str, filename: str, gz: bytes, now: float
    ) -> bytes:
        key = await asyncio.to_thread(self.dkim_key)
        if key is None:
            raise ValueError("no DKIM key configured (dkim_selector, dkim_key_file): RFC 8460 reports must be signed")
        message = rpt.build_mail(
            from_addr=self.from_addr,
            to_addrs=to_addrs,
            policy_domain=domain,
            submitter=self.submitter,
            report_id=report_id,
            filename=filename,
            gz=gz,
            now=now,
        )
        selector, dkim_domain = self.conf.dkim_selector, self.conf.dkim_domain or self.submitter
        return await asyncio.to_thread(dkim_sign, message, selector=selector, domain=dkim_domain, key_pem=key)

    async def send_mail(
        self, uri: str, *, domain: str, report_id: str, filename: str, gz: bytes, now: float
    ) -> SendResult:
        """RFC 8460 5.3: a DKIM-signed multipart/report into our own queue through ``submit`` (the queue retries
        delivery; ``TLS-Required: No`` and the ``tls_required`` meta let it go where TLS fails)."""
        addrs = TlsRptRecord((uri,)).mailto
        if not addrs:
            return SendResult(uri, "mailto", False, "not a mailto: URI")
        if self.submit is None:
            return SendResult(uri, "mailto", False, "no queue")
        try:
            data = await self.build_signed_mail(
                addrs, domain=domain, report_id=report_id, filename=filename, gz=gz, now=now
            )
            queue_id = await self.submit(
                self.from_addr, list(addrs), data, meta=[("origin", "tlsrpt"), ("tls_required", "no")], now=now
            )
        except Exception as exc:  # key missing, queue full...: retried like an HTTP failure
            return SendResult(uri, "mailto", False, f"{type(exc).__name__}: {exc}"[:300])
        self._report_messages.add(queue_id)

        def remember(conn: Any) -> None:
            conn.execute(
                "INSERT INTO report_message (queue_id, queued_at) VALUES (?, ?) ON CONFLICT DO NOTHING", (queue_id, now)
            )

        await self.db.write(remember)
        return SendResult(uri, "mailto", True, "queued")

    async def send_day(self, day: str, *, domain: str | None = None, now: float | None = None) -> list[SendResult]:
        """``mxgate tlsrpt send``: build what is not built yet for ``day`` (ignoring the random delay), then
        attempt every delivery of that day that is not sent yet."""
        now = self.clock() if now is None else now
        if day >= _today(now):
            raise ValueError(f"{day} is not over yet (UTC); reports cover full days")
        await self.flush()
        async with self.db.exclusive("tlsrpt-send") as ours:  # in a cluster, never beside a node's sending round
            if not ours:
                raise ValueError("another node is in its TLS-RPT sending round; try again in a minute")
            return await self._send_day(day, domain, now)

    async def _send_day(self, day: str, domain: str | None, now: float) -> list[SendResult]:
        domains = [domain] if domain else await self.domains(day)
        for d in domains:
            state = await self.db.run(functools.partial(_report_state, day=day, domain=d))
            if state is None or state[0] in ("scheduled", "dns-failed"):
                await self.build(day, d, now)
        # the operator asks explicitly: deliveries that gave up get a fresh 24-hour window
        await self.db.write(
            lambda c: c.execute(
                "UPDATE delivery SET state = 'pending', next_attempt = ?, deadline = ? WHERE day = ? AND state ="
                " 'failed' AND (CAST(? AS TEXT) IS NULL OR domain = ?)",
                (now, now + RETRY_WINDOW, day, domain, domain),
            )
        )
        return await self.send_due(now, day=day, domain=domain)

    async def status(self, day: str) -> list[tuple[str, str, str, str, int, str]]:
        """(domain, scope, uri or report state, delivery state, attempts, last error) for ``day``."""
        rows = await self.db.run(
            lambda c: c.execute(
                "SELECT r.domain, r.scope, COALESCE(d.uri, ''), COALESCE(d.state, r.state),"
                " COALESCE(d.attempts, r.attempts), COALESCE(d.last_error, r.last_error, '') FROM report r"
                " LEFT JOIN delivery d ON d.day = r.day AND d.domain = r.domain AND d.scope = r.scope"
                " WHERE r.day = ? ORDER BY r.domain, r.scope, d.uri",
                (day,),
            ).fetchall()
        )
        return [(str(a), str(b), str(c), str(d), int(e), str(f)) for a, b, c, d, e, f in rows]
