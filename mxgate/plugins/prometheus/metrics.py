"""What is counted: the event table (:data:`EVENT_METRICS`), the limits on label sets, and helpers that list what a
registry exports. No prometheus-client object is created here; :mod:`.plugin` builds them per instance."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from mxgate import ReportEvent

log = logging.getLogger("mxgate.plugins.prometheus")

#: Most label sets one metric may grow to; further new ones are folded into "other".
MAX_SERIES = 2000
#: Label children kept for reuse, all metrics together (past that, ``labels()`` is asked each time).
MAX_CHILDREN = 20_000
#: Longest label value kept (longer ones are cut).
MAX_LABEL_LENGTH = 64
#: Seconds between queue reads when nothing happens; after mail moved, the next read comes within QUEUE_DEBOUNCE.
QUEUE_INTERVAL = 5.0
QUEUE_DEBOUNCE = 2.0  # under steady load the queue is read at most every 2 s (a read is one row and two index seeks)

#: Receipt to final state: seconds .. five days (the default give-up time).
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600, 14400, 43200, 86400, 259200, 432000)
DNS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

OTHER = "other"


@dataclass(frozen=True, slots=True)
class EventMetric:
    """How one event kind becomes a counter: metric name (without ``_total``) and its labels, each taken from an
    event label (``sources``; default: the same name)."""

    name: str
    doc: str
    labels: tuple[str, ...]
    sources: tuple[str, ...] = ()

    def values(self, event: ReportEvent) -> tuple[str, ...]:
        return tuple(event.label(src) for src in (self.sources or self.labels))


#: Event kind -> counter. ``dns_lookup``, ``dns_self_test``, ``disconnection`` and ``queue`` get extra treatment
#: in :meth:`PrometheusPlugin.mxgate_report_on_event` as well; ``connection`` only moves the sessions gauge.
EVENT_METRICS: Mapping[str, EventMetric] = {
    "disconnection": EventMetric(
        "mxgate_smtp_connections",
        "SMTP connections, counted when they close, by listener and the inbound connector in force then (after "
        "STARTTLS or AUTH chose again: a certificate-pinned partner counts under its connector; anonymous: none).",
        ("listener", "connector"),
    ),
    "tls_handshake_failed": EventMetric(
        "mxgate_smtp_tls_handshake_failures",
        "Inbound STARTTLS handshakes that failed (no common protocol or cipher, client gave up, timeout), by listener.",
        ("listener",),
    ),
    "connection_refused": EventMetric(
        "mxgate_smtp_connections_refused",
        "SMTP connections refused before the greeting (421), by listener and reason: client (per-address limit), "
        "network (per-/24 limit), descriptors (server.descriptor_reserve reached).",
        ("listener", "reason"),
    ),
    "tls_session": EventMetric(
        "mxgate_smtp_tls_sessions", "Inbound TLS sessions established (STARTTLS or implicit), by TLS version.",
        ("listener", "version"),
    ),
    "certificate_reload": EventMetric(
        "mxgate_tls_certificate_reloads",
        "Changed listener certificate files: loaded, or refused (the old pair keeps serving).",
        ("listener", "result"),
    ),
    "auth": EventMetric("mxgate_smtp_auth", "SMTP AUTH attempts by result.", ("result",)),
    "message_received": EventMetric(
        "mxgate_messages_received", "Messages accepted and queued (250 after DATA), by listener and connector.",
        ("listener", "connector"),
    ),
    "message_rejected": EventMetric(
        "mxgate_messages_rejected", "Commands refused with a rejection (connect, MAIL, RCPT, DATA), by reason.",
        ("listener", "reason"),
    ),
    "delivery_attempt": EventMetric(
        "mxgate_delivery_attempts",
        "Delivery attempts (one per destination and message), by outbound connector and overall result.",
        ("connector", "result"),
    ),
    "outbound_session_reused": EventMetric(
        "mxgate_outbound_sessions_reused",
        "Deliveries sent over an already-established outbound session (connection reuse), by outbound connector.",
        ("connector",),
    ),
    "dns_lookup": EventMetric(
        "mxgate_dns_lookups", "DNS lookups sent to the resolver (cache misses), by type, DNSSEC status and result.",
        ("rdtype", "status", "result"),
    ),
    "dns_self_test": EventMetric(
        "mxgate_dns_self_tests", "Resolver self-tests (a known-bogus name must fail) by result.", ("result",)
    ),
    "dane_tlsa_lookup": EventMetric(
        "mxgate_dane_tlsa_lookups", "DANE: MX hosts examined for TLSA records, by resulting state.", ("state",)
    ),
    "dane_verification": EventMetric(
        "mxgate_dane_verifications",
        "DANE: peer certificate checks against TLSA records, by result, RFC 8460 result type and matched usage.",
        ("result", "result_type", "usage"),
    ),
    "sts_fetch": EventMetric(
        "mxgate_sts_fetches", "MTA-STS policy fetches made, by result and trigger.", ("result", "trigger")
    ),
    "sts_policy": EventMetric(
        "mxgate_sts_policy_lookups",
        "MTA-STS policy lookups on the delivery path, by policy mode found and where it came from.",
        ("mode", "origin"),
    ),
    "sts_refresh": EventMetric("mxgate_sts_refreshes", "Proactive MTA-STS policy refreshes, by result.", ("result",)),
    "sts_refresh_failing": EventMetric(
        "mxgate_sts_refresh_failing",
        "A cached enforce/testing MTA-STS policy failed to refresh refresh_alert_after times in a row (and again "
        "each time after): alert on any increase.",
        ("mode",),
    ),
    "sts_policy_served": EventMetric(
        "mxgate_sts_policy_requests", "Requests to our own MTA-STS policy listener, by result.", ("result",)
    ),
    "cluster_heartbeat": EventMetric(
        "mxgate_cluster_heartbeats",
        "Cluster mode: heartbeats to the shared PostgreSQL database, by result; failed: the node works without it "
        "(alert when failed keeps rising).",
        ("result",),
    ),
    "receive_worker_restart": EventMetric(
        "mxgate_receive_worker_restarts",
        "Receive workers (server.receive_workers) that died and were started again: alert on any increase.",
        (),
    ),
    "tlsrpt_sent": EventMetric(
        "mxgate_tlsrpt_reports_sent", "TLS-RPT reports we tried to deliver, by result and method.", ("result", "method")
    ),
    "tlsrpt_received": EventMetric(
        "mxgate_tlsrpt_reports_received", "TLS-RPT reports others sent us, by method and result.",
        ("method", "result"), ("reporter_kind", "result"),
    ),
    "tlsrpt_received_sessions": EventMetric(
        "mxgate_tlsrpt_received_sessions",
        "Sessions counted in TLS-RPT reports others sent us, by result and (failures) result type.",
        ("result", "result_type"),
    ),
    "recipient_check": EventMetric(
        "mxgate_recipient_checks",
        "Recipients validated at RCPT, by source (file, callout, cache, none) and result (known, unknown, "
        "unavailable, busy).",
        ("source", "result"),
    ),
}  # fmt: skip

#: Kinds handled in :meth:`PrometheusPlugin.mxgate_report_on_event` without a table entry.
SPECIAL_KINDS = frozenset({"queue", "connection", "certificate_expiry"})

RECIPIENT_STATES = ("delivered", "deferred", "failed")
FINAL_STATES = ("delivered", "failed")


class SeriesGuard:
    """Caps the number of label sets per metric (see :data:`MAX_SERIES`)."""

    def __init__(self, limit: int = MAX_SERIES) -> None:
        self.limit = limit
        self._seen: dict[str, set[tuple[str, ...]]] = {}
        self._warned: set[str] = set()

    def __call__(self, metric: str, values: Iterable[str]) -> tuple[str, ...]:
        vals = tuple(v[:MAX_LABEL_LENGTH] for v in values)
        seen = self._seen.setdefault(metric, set())
        if vals in seen:
            return vals
        if len(seen) >= self.limit:
            if metric not in self._warned:
                self._warned.add(metric)
                log.warning("metric has too many label sets; new ones are counted as 'other'", extra={"metric": metric})
            return (OTHER,) * len(vals)
        seen.add(vals)
        return vals


def metric_names(registry: CollectorRegistry) -> dict[str, str]:
    """Family name -> type for every metric a registry exports (also those without samples yet)."""
    return {m.name: m.type for m in registry.collect()}


def sample_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name a registry can expose (``_total``, ``_bucket``, ``_count``, ``_sum``, ``_info``...), for
    checking dashboards and alert rules against what really exists."""
    suffixes: dict[str, tuple[str, ...]] = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
        "gauge": ("",),
    }
    names: set[str] = set()
    for family, kind in metric_names(registry).items():
        names.update(family + s for s in suffixes.get(kind, ("",)))
    return names
