"""Receiving: reports others send us, addressed to ``receive_mailbox`` (end-of-data hook; DKIM checked, RFC 8460
5.3) or POSTed to the ``receive_listen`` HTTPS endpoint, are decoded and parsed leniently off the event loop
(:mod:`~mxgate.plugins.tlsrpt.report`), bounded, kept as counts in the store, and counted:
:meth:`Receiver.reporter_failures` and ``mxgate tlsrpt received`` show who fails to reach us.

Everything HTTP (the request reader, the rate limit per client, the status replies) is the last section of this
module, in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Iterable
from typing import Any, Final

import dkim

import mxgate.plugins.tlsrpt.report as rpt
from mxgate import Address, TlsRptResult, server_context
from mxgate.plugins.tlsrpt.collect import DAY, Collector
from mxgate.plugins.tlsrpt.parse import (
    MAX_REPORT_BYTES,
    ReceivedReport,
    ReportError,
    ReportTooLarge,
    check_report_bounds,
    decode_report_bytes,
    extract_report_from_mail,
    parse_received_report,
)

__all__ = ["Receiver"]

log = logging.getLogger("mxgate.plugins.tlsrpt")

RECEIVE_HEADER_LIMIT: Final = 16 * 1024
RECEIVE_TIMEOUT: Final = 30.0
TOP_REPORTERS: Final = 20
RATE_CLIENTS: Final = 10_000  # client addresses the HTTPS endpoint's rate limiter remembers (oldest forgotten)
PARSERS: Final = 2  # reports decoded and parsed at the same time (in threads, off the event loop)

_DKIM_TAG = re.compile(r"(?:^|;)\s*([a-z]+)\s*=\s*([^;]*)", re.IGNORECASE)


class Receiver(Collector):
    """Reports others send us, by mail and by HTTPS (the receiving half of the service)."""

    _receive_tasks: set[asyncio.Task[Any]]
    _server: asyncio.Server | None
    _parsers: asyncio.Semaphore
    _rates: dict[str, tuple[float, float]]  # client address -> (tokens, when)

    def _init_receiver(self) -> None:
        self._receive_tasks = set()
        self._server = None
        self._parsers = asyncio.Semaphore(PARSERS)
        self._rates = {}

    # -- parsing and keeping ---------------------------------------------------------------------------------

    async def store_received(self, report: ReceivedReport, *, method: str, dkim_state: str) -> bool:
        """Keep a parsed report's counts; ``False`` when the same reporter's report id was stored before.

        What an operator asks of received reports is who reports how many failures of which kind against
        which MX: the counts per policy and the failures summed per (policy domain, result type, receiving MX).
        Not the report itself, which was 80 times bigger in the store than uploaded."""
        now = self.clock()
        failures: dict[tuple[str, str, str], int] = {}
        for p in report.policies:
            for f in p.failures:
                key = (p.policy_domain, f.result_type, f.receiving_mx)
                failures[key] = failures.get(key, 0) + f.count

        def job(conn: Any) -> bool:
            row = conn.execute(
                'INSERT INTO received (received_at, method, organization, contact, report_id, start, "end",'
                " dkim, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?, '') ON CONFLICT (organization, report_id) DO NOTHING"
                " RETURNING id",
                (
                    now,
                    method,
                    report.organization,
                    report.contact,
                    report.report_id or f"none-{secrets.token_hex(8)}",
                    report.start,
                    report.end,
                    dkim_state,
                ),
            ).fetchone()
            if row is None:
                return False
            rid = row[0]
            conn.executemany(
                "INSERT INTO received_policy (received_id, policy_type, policy_domain, success, failure)"
                " VALUES (?, ?, ?, ?, ?)",
                [(rid, p.policy_type, p.policy_domain, p.success, p.failure) for p in report.policies],
            )
            conn.executemany(
                "INSERT INTO received_failure (received_id, policy_domain, result_type, receiving_mx,"
                " receiving_ip, count) VALUES (?, ?, ?, ?, '', ?)",
                [(rid, domain, rtype, mx, n) for (domain, rtype, mx), n in failures.items()],
            )
            return True

        return await self.db.write(job)

    def _read_report(self, data: bytes) -> ReceivedReport:
        """Decode (gzip or not), bound and parse: runs in a thread (a big report took 1.75 s of the loop)."""
        conf = self.conf
        document = decode_report_bytes(data, limit=min(conf.receive_max_bytes, MAX_REPORT_BYTES))
        check_report_bounds(
            document, max_policies=conf.receive_max_policies, max_failure_details=conf.receive_max_failure_details
        )
        return parse_received_report(document)

    async def accept_report(
        self, data: bytes, *, method: str, dkim_state: str = "none"
    ) -> tuple[str, ReceivedReport | None]:
        """Decode, bound, parse leniently (off the event loop), store the counts, count.

        Returns (result, report): result is ok | duplicate | invalid | too_large."""
        try:
            async with self._parsers:
                report = await asyncio.to_thread(self._read_report, data)
        except ReportTooLarge as exc:
            log.info("oversized TLS report refused", extra={"method": method, "error": str(exc)})
            await self.emit("tlsrpt_received", reporter_kind=method, result="too_large")
            return "too_large", None
        except ReportError as exc:
            log.info("unreadable TLS report received", extra={"method": method, "error": str(exc)})
            await self.emit("tlsrpt_received", reporter_kind=method, result="invalid")
            return "invalid", None
        if report.rejected:
            log.info(
                "TLS report policies left out",
                extra={"method": method, "report_id": report.report_id, "rejected": list(report.rejected)},
            )
        stored = await self.store_received(report, method=method, dkim_state=dkim_state)
        await self.emit("tlsrpt_received", reporter_kind=method, result="ok" if stored else "duplicate")
        if stored:
            await self.emit("tlsrpt_received_sessions", value=float(report.success), result="success")
            by_type: dict[str, int] = {}
            for p in report.policies:
                for f in p.failures:
                    rt = f.result_type if f.result_type in set(TlsRptResult) else "other"
                    by_type[rt] = by_type.get(rt, 0) + f.count
                listed = sum(f.count for f in p.failures)
                if p.failure > listed:
                    by_type["unspecified"] = by_type.get("unspecified", 0) + p.failure - listed
            for rt, n in sorted(by_type.items()):
                await self.emit("tlsrpt_received_sessions", value=float(n), result="failure", result_type=rt)
        return ("ok" if stored else "duplicate"), report

    async def reporter_failures(self, *, days: int = 7, top: int = TOP_REPORTERS) -> list[tuple[str, int, int]]:
        """(reporter organization, successful sessions, failed sessions) over the last ``days``, most failures
        first, at most ``top`` rows. Organization names are unbounded: query them, never use them as labels."""
        since = self.clock() - days * DAY
        rows = await self.db.run(
            lambda c: c.execute(
                "SELECT r.organization, SUM(p.success), SUM(p.failure) FROM received r JOIN received_policy p"
                " ON p.received_id = r.id WHERE r.received_at >= ? GROUP BY r.organization"
                " ORDER BY SUM(p.failure) DESC, r.organization LIMIT ?",
                (since, top),
            ).fetchall()
        )
        return [(str(o), int(s or 0), int(f or 0)) for o, s, f in rows]

    async def received_failure_types(self, *, days: int = 7) -> list[tuple[str, str, int]]:
        """(reporter organization, result type, failed sessions) over the last ``days``."""
        since = self.clock() - days * DAY
        rows = await self.db.run(
            lambda c: c.execute(
                "SELECT r.organization, f.result_type, SUM(f.count) FROM received r JOIN received_failure f"
                " ON f.received_id = r.id WHERE r.received_at >= ? GROUP BY r.organization, f.result_type"
                " ORDER BY SUM(f.count) DESC",
                (since,),
            ).fetchall()
        )
        return [(str(o), str(t), int(n or 0)) for o, t, n in rows]

    # -- mail ----------------------------------------------------------------------------------------------------

    def is_report_recipient(self, rcpts: Iterable[Address]) -> bool:
        box = self.conf.receive_mailbox.lower().removeprefix("mailto:")
        return bool(box) and any(str(r).lower() == box for r in rcpts)

    async def verify_dkim(self, data: bytes) -> str:
        """``pass`` | ``fail`` | ``none`` (no signature) | ``ignored`` (the key lacks ``s=tlsrpt``) |
        ``temperror`` (key lookup failed). The key is fetched with our own resolver (DNSSEC status respected: a
        bogus answer is no key), then dkimpy verifies in its strict TLS-RPT mode (``tlsrpt="strict"``): RFC 8460
        §3 has report signers publish their key with the service type ``tlsrpt``, and we ignore signatures made
        with keys for other services (``s=email``, ``s=*``, no ``s=``), as the RFC lets receivers do."""
        msg = rpt.parse_message_headers(data)
        sigs = msg.get_all("DKIM-Signature") or []
        if not sigs:
            return "none"
        tags = {k.lower(): "".join(v.split()) for k, v in _DKIM_TAG.findall(str(sigs[0]))}
        selector, domain = tags.get("s", ""), tags.get("d", "")
        if not selector or not domain or self.resolver is None:
            return "fail" if self.resolver is not None else "temperror"
        name = f"{selector}._domainkey.{domain}"
        answer = await self.resolver.resolve(name, "TXT")
        if answer.is_failure:
            return "temperror"
        txt = b"".join(b"".join(getattr(r, "strings", ())) for r in answer.records[:1])
        key_tags = {k.lower(): "".join(v.split()) for k, v in _DKIM_TAG.findall(txt.decode("ascii", "replace"))}
        services = key_tags.get("s", "*").lower().split(":")
        if "tlsrpt" not in services:
            log.info("DKIM key without s=tlsrpt: signature ignored", extra={"key": name, "s": key_tags.get("s", "")})
            return "ignored"
        if services != ["tlsrpt"]:
            # RFC 6376 §3.6.1 allows a list ("email:tlsrpt"); dkimpy's strict mode compares the whole tag
            txt = b";".join(
                b" s=tlsrpt" if tag.partition(b"=")[0].strip().lower() == b"s" else tag for tag in txt.split(b";")
            )

        def dnsfunc(_name: bytes, timeout: int = 5) -> bytes:
            return txt

        ok = await asyncio.to_thread(dkim.verify, data, dnsfunc=dnsfunc, tlsrpt="strict")
        return "pass" if ok else "fail"

    async def receive_mail(self, data: bytes) -> str:
        attachment = extract_report_from_mail(data)
        if attachment is None:
            await self.emit("tlsrpt_received", reporter_kind="mailto", result="invalid")
            return "invalid"
        dkim_state = await self.verify_dkim(data)
        if self.conf.receive_require_dkim and dkim_state != "pass":
            log.info("mailed TLS report ignored: no valid DKIM signature", extra={"dkim": dkim_state})
            await self.emit("tlsrpt_received", reporter_kind="mailto", result="unsigned")
            return "unsigned"
        result, _ = await self.accept_report(attachment, method="mailto", dkim_state=dkim_state)
        return result

    def receive_mail_later(self, data: bytes) -> None:
        """Parse off the SMTP transaction (the client gets its reply at once); awaited at shutdown."""
        task = asyncio.ensure_future(self._receive_guarded(data))
        self._receive_tasks.add(task)
        task.add_done_callback(self._receive_tasks.discard)

    async def _receive_guarded(self, data: bytes) -> None:
        try:
            await self.receive_mail(data)
        except Exception:
            log.exception("failed to process a mailed TLS report")

    async def stop_receiving(self) -> None:
        """Close the HTTPS endpoint and wait (up to 10 s) for mailed reports still being parsed."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
            self._server = None
        if self._receive_tasks:
            await asyncio.wait(set(self._receive_tasks), timeout=10.0)

    # -- the HTTPS endpoint (RFC 8460 5.4; all of HTTP is here) ------------------------------------------------

    async def start_receiver(self) -> asyncio.Server | None:
        if not self.conf.receive_listen:
            return None
        if not (self.conf.receive_cert and self.conf.receive_key):
            raise ValueError("[plugins.tlsrpt] receive_listen needs receive_cert and receive_key")
        ctx = server_context(self.path(self.conf.receive_cert), self.path(self.conf.receive_key))
        host, _, port = self.conf.receive_listen.rpartition(":")
        self._server = await asyncio.start_server(
            self._handle_http, host.strip("[]"), int(port), ssl=ctx, limit=RECEIVE_HEADER_LIMIT
        )
        return self._server

    @property
    def receiver_port(self) -> int | None:
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        try:
            async with asyncio.timeout(RECEIVE_TIMEOUT):
                status, text = await self._http_request(reader, client)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
            status, text = 400, "bad request"
        extra = ""
        if status in (429, 507):
            extra = f"Retry-After: {self._retry_after(client) if status == 429 else 3600}\r\n"
        try:
            body = (text + "\r\n").encode()
            writer.write(
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: text/plain\r\n{extra}"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _rate_ok(self, client: str) -> bool:
        """A token bucket per client address: ``receive_reports_per_hour`` POSTs, refilled evenly over the hour."""
        per_hour = float(self.conf.receive_reports_per_hour)
        now = time.monotonic()
        tokens, when = self._rates.pop(client, (per_hour, now))
        tokens = min(per_hour, tokens + (now - when) * per_hour / 3600.0)
        ok = tokens >= 1.0
        self._rates[client] = (tokens - 1.0 if ok else tokens, now)  # (re)inserted last: the newest
        while len(self._rates) > RATE_CLIENTS:
            del self._rates[next(iter(self._rates))]
        return ok

    def _retry_after(self, client: str) -> int:
        tokens, _ = self._rates.get(client, (0.0, 0.0))
        return max(1, int((1.0 - tokens) * 3600.0 / self.conf.receive_reports_per_hour) + 1)

    async def _http_request(self, reader: asyncio.StreamReader, client: str = "?") -> tuple[int, str]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, "bad request line"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, colon, value = line.partition(":")
                if not colon:
                    return 400, "bad header"
                headers[name.strip().lower()] = value.strip()
        if parts[0] != "POST":
            return 405, "POST reports here"
        if not self._rate_ok(client):
            await self.emit("tlsrpt_received", reporter_kind="https", result="rate_limited")
            return 429, f"too many reports from {client}; at most {self.conf.receive_reports_per_hour} an hour"
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return 411, "Content-Length required"
        length_text = headers.get("content-length", "")
        if not length_text.isdigit():
            return 411, "Content-Length required"
        length = int(length_text)
        if length > self.conf.receive_max_bytes:
            return 413, f"report too large: at most {self.conf.receive_max_bytes} bytes"
        if await self.store_size() >= self.conf.receive_store_limit:
            log.warning(
                "TLS-RPT store full: refusing received reports",
                extra={"limit": self.conf.receive_store_limit, "retention_days": self.conf.receive_retention_days},
            )
            await self.emit("tlsrpt_received", reporter_kind="https", result="store_full")
            return 507, "report store full, try again later"
        data = await reader.readexactly(length)
        result, _ = await self.accept_report(data, method="https")
        if result == "invalid":
            return 400, "not a TLS report"
        if result == "too_large":
            return 413, (
                f"report too large: at most {self.conf.receive_max_bytes} bytes decompressed, "
                f"{self.conf.receive_max_policies} policies and {self.conf.receive_max_failure_details} "
                "failure-details"
            )
        return 200, result


_REASONS = {
    200: "OK",
    400: "Bad Request",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Payload Too Large",
    429: "Too Many Requests",
    507: "Insufficient Storage",
}
