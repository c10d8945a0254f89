"""Collecting: every TLS outcome of the delivery path becomes a count per (UTC day, policy domain, policy) with its
failure group (RFC 8460 section 4), kept in memory and flushed to the store; in a cluster, this node's totals are
then published to the shared store.

:class:`Collector` holds what every part of the agent shares (configuration, clock, resolver, event sink and the
stores); :class:`~mxgate.plugins.tlsrpt.send.Sender` and :class:`~mxgate.plugins.tlsrpt.receive.Receiver` build on
it, and :class:`~mxgate.plugins.tlsrpt.service.TlsRptService` is all three.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import mxgate.plugins.tlsrpt.report as rpt
from mxgate import ClusterUnavailable, Resolver, SharedDb, TlsOutcome
from mxgate.plugins.tlsrpt.config import TlsRptConfig
from mxgate.plugins.tlsrpt.report import FailureKey, PolicyAggregate, PolicyKey
from mxgate.plugins.tlsrpt.store import DB_NAME, LocalStore, load_aggregates, local_totals, publish_totals, write_counts

__all__ = ["CATCH_UP_DAYS", "DAY", "Collector", "EventFn", "no_event"]

log = logging.getLogger("mxgate.plugins.tlsrpt")

DAY: Final = 86400
CATCH_UP_DAYS: Final = 7  # after downtime, days older than this are not reported any more

EventFn = Callable[..., Awaitable[None]]


async def no_event(_kind: str, value: float = 1.0, **labels: str) -> None:
    return None


class Collector:
    """Counting and the stores. Inject the clock, resolver and event sink (tests do)."""

    def __init__(
        self,
        conf: TlsRptConfig,
        *,
        state_dir: Path,
        submitter: str,
        base_dir: Path = Path("."),
        clock: Callable[[], float] = time.time,
        resolver: Resolver | None = None,
        emit: EventFn = no_event,
        shared: SharedDb | None = None,
    ) -> None:
        self.conf = conf
        self.submitter = submitter.rstrip(".").lower()
        self.base_dir = base_dir
        self.clock = clock
        self.resolver = resolver
        self.emit = emit
        # ``local``: this node's own SQLite file, where counts are written first; ``db``: where reports, deliveries
        # and received reports live and reports are built from — the same file alone, PostgreSQL in a cluster
        self.local = LocalStore(Path(state_dir) / DB_NAME)
        self.shared = shared
        self.db: LocalStore | SharedDb = shared if shared is not None else self.local
        # (day, domain) pairs to publish to the cluster store; None: every recent day (at start)
        self._dirty: set[tuple[str, str]] | None = None
        self._publish_failed = False
        self._counts: dict[PolicyKey, list[int]] = {}
        self._failures: dict[tuple[PolicyKey, FailureKey], int] = {}
        self._flush_lock = asyncio.Lock()
        # queue ids of the reports we mailed: the sessions delivering them are not counted (RFC 8460 §5.3)
        self._report_messages: set[str] = set()

    # -- names -----------------------------------------------------------------------------------------------

    @property
    def organization(self) -> str:
        return self.conf.organization_name or self.submitter

    @property
    def from_addr(self) -> str:
        return self.conf.mail_from or f"tlsrpt-noreply@{self.submitter}"

    @property
    def contact(self) -> str:
        return self.conf.contact_info or self.from_addr

    def path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.base_dir / p

    # -- collection ------------------------------------------------------------------------------------------

    def record(self, outcome: TlsOutcome) -> None:
        """Count one outcome in memory (no I/O: this runs on the delivery path). The session that delivers one of
        our own mailed reports is not counted (RFC 8460 §5.3)."""
        if outcome.queue_id is not None and outcome.queue_id in self._report_messages:
            return
        key, failure = rpt.keys_for_outcome(outcome, at=self.clock())
        if not key.domain:
            return
        counts = self._counts.setdefault(key, [0, 0])
        if failure is None:
            counts[0] += 1
        else:
            counts[1] += 1
            self._failures[(key, failure)] = self._failures.get((key, failure), 0) + 1

    @property
    def pending(self) -> int:
        return sum(a + b for a, b in self._counts.values())

    async def flush(self) -> None:
        """Write the counts gathered so far in one transaction; on failure keep them for the next flush. In a
        cluster, then publish this node's totals of the (day, domain) pairs that changed (see :meth:`publish`)."""
        async with self._flush_lock:
            if self._counts:
                counts, failures = self._counts, self._failures
                self._counts, self._failures = {}, {}
                try:
                    await self.local.write(lambda c: write_counts(c, counts, failures))
                except Exception:
                    for key, (ok, bad) in counts.items():
                        cur = self._counts.setdefault(key, [0, 0])
                        cur[0] += ok
                        cur[1] += bad
                    for fkey, n in failures.items():
                        self._failures[fkey] = self._failures.get(fkey, 0) + n
                    raise
                if self._dirty is not None:
                    self._dirty.update((key.day, key.domain) for key in counts)
            await self._publish()

    async def _publish(self) -> None:
        """Cluster mode: this node's totals of the changed (day, domain) pairs (at start: of every day still
        reportable) into the shared store. Idempotent (absolute totals keyed by node), so after a failure the same
        pairs are simply published again; until then they wait in the local file, which survives a restart."""
        if self.shared is None or self._dirty == set():
            return
        changed = None if self._dirty is None else set(self._dirty)
        oldest = rpt.utc_day(self.clock() - (CATCH_UP_DAYS + 1) * DAY)
        totals = await self.local.run(lambda c: local_totals(c, changed, oldest))
        shared = self.shared
        try:
            await shared.write(lambda c: publish_totals(c, shared.node, totals))
        except ClusterUnavailable as exc:
            if not self._publish_failed:
                log.warning("TLS-RPT counts kept locally until the cluster database returns", extra={"error": str(exc)})
            self._publish_failed = True
            return
        if self._publish_failed:
            log.info("TLS-RPT counts published to the cluster database again")
        self._publish_failed = False
        self._dirty = set() if changed is None else (self._dirty or set()) - changed

    # -- reading back ----------------------------------------------------------------------------------------

    async def domains(self, day: str) -> list[str]:
        await self.flush()
        rows = await self.db.run(
            lambda c: c.execute("SELECT DISTINCT domain FROM policy WHERE day = ? ORDER BY domain", (day,)).fetchall()
        )
        return [str(r[0]) for r in rows]

    async def aggregates(self, day: str, domain: str) -> list[PolicyAggregate]:
        await self.flush()
        return await self.db.run(lambda c: load_aggregates(c, day, domain))

    # -- retention -------------------------------------------------------------------------------------------

    async def purge(self, now: float, db: LocalStore | SharedDb | None = None) -> None:
        cut_day = rpt.utc_day(now - self.conf.retention_days * DAY)
        received_cut = now - self.conf.receive_retention_days * DAY

        def job(conn: Any) -> None:
            conn.execute("DELETE FROM failure WHERE policy_id IN (SELECT id FROM policy WHERE day < ?)", (cut_day,))
            conn.execute("DELETE FROM policy WHERE day < ?", (cut_day,))
            conn.execute("DELETE FROM delivery WHERE day < ?", (cut_day,))
            conn.execute("DELETE FROM report WHERE day < ?", (cut_day,))
            old = "SELECT id FROM received WHERE received_at < ?"
            conn.execute(f"DELETE FROM received_policy WHERE received_id IN ({old})", (received_cut,))
            conn.execute(f"DELETE FROM received_failure WHERE received_id IN ({old})", (received_cut,))
            conn.execute("DELETE FROM received WHERE received_at < ?", (received_cut,))
            conn.execute("DELETE FROM report_message WHERE queued_at < ?", (now - self.conf.retention_days * DAY,))

        await (db or self.db).write(job)
        await self.load_report_messages()

    async def load_report_messages(self) -> None:
        """The queue ids of our mailed reports still within retention (at start-up: reports queued before)."""
        try:
            rows = await self.db.run(lambda c: c.execute("SELECT queue_id FROM report_message").fetchall())
        except ClusterUnavailable as exc:  # read again with the next purge; meanwhile this node's own are known
            log.warning("TLS-RPT: report message ids not loaded", extra={"error": str(exc)})
            return
        self._report_messages = {str(r[0]) for r in rows}

    async def store_size(self) -> int:
        """Bytes of the store: the SQLite file with its WAL, or the cluster store's tables."""
        return await self.db.size()

    async def close(self) -> None:
        """Flush what is counted (a failure is not raised: this runs at shutdown), then close the stores."""
        with contextlib.suppress(Exception):
            await self.flush()
        await self.local.close()
        if self.shared is not None:
            await self.shared.close()
