"""Built-in agent: Prometheus metrics on ``[metrics] listen``, fed by hooks only.

Nothing in the core calls this module. Every number comes from a hook that any third-party plugin could implement
as well:

- ``mxgate_report_on_event`` — countable events; the table :data:`EVENT_METRICS` maps each event kind and its
  labels to a metric. An event kind not in the table is only counted in ``mxgate_events_total{kind}``; labels of
  unknown kinds are dropped (nobody promised they are bounded). A plugin makes its own kind known, with a counter
  of its own, by :func:`add_event_counter` (see ``docs/plugins/prometheus.md``).
- ``mxgate_delivery_on_tls_outcome`` — ``mxgate_tls_outcomes_total`` (DANE = ``policy_type="tlsa"``, MTA-STS =
  ``"sts"``): the same records TLS-RPT aggregates.
- ``mxgate_delivery_on_delivered`` / ``on_deferred`` / ``on_failed`` — per-recipient results and, for the final
  states, the latency from receipt (``received_at``) to the final result (``at``).
- ``mxgate_report_on_plugin_error`` — ``mxgate_plugin_errors_total{plugin, hook}``.
- ``mxgate_lifecycle_on_startup`` — starts the endpoint and a background task that reads
  ``runtime.queue.counts()`` every few seconds (sooner after mail arrived or left), so a scrape never waits on the
  queue store. Hook call counts and durations are read from the dispatcher's own statistics at scrape time.

Event kinds consumed (``kind``: event labels -> metric; value 1 unless said otherwise):

=============================  =========================================  ==========================================
kind                           labels                                     metric
=============================  =========================================  ==========================================
``connection``                 listener                                   ``mxgate_smtp_sessions_active`` (+1)
``disconnection``              listener, connector (in force at the end)  ``mxgate_smtp_connections_total``,
                                                                          ``mxgate_smtp_sessions_active`` (-1)
``tls_handshake_failed``       listener                                   ``mxgate_smtp_tls_handshake_failures_total``
``connection_refused``         listener, reason                           ``mxgate_smtp_connections_refused_total``
``tls_session``                listener, version                          ``mxgate_smtp_tls_sessions_total``
``auth``                       result                                     ``mxgate_smtp_auth_total``
``message_received``           listener, connector                        ``mxgate_messages_received_total``
``message_rejected``           listener, reason                           ``mxgate_messages_rejected_total``
``delivery_attempt``           connector, result                          ``mxgate_delivery_attempts_total``
``outbound_session_reused``    connector                                  ``mxgate_outbound_sessions_reused_total``
``queue`` (action ``dsn``)     dsn                                        ``mxgate_dsn_messages_total{action}``
``dns_lookup``                 rdtype, status, result; value = seconds    ``mxgate_dns_lookups_total``,
                                                                          ``mxgate_dns_lookup_duration_seconds``
``dns_self_test``              result (validating | not_validating)       ``mxgate_dns_resolver_validating``,
                                                                          ``mxgate_dns_self_tests_total``
``dane_tlsa_lookup``           state                                      ``mxgate_dane_tlsa_lookups_total``
``dane_verification``          result, result_type, usage                 ``mxgate_dane_verifications_total``
``sts_fetch``                  result, trigger                            ``mxgate_sts_fetches_total``
``sts_policy``                 mode, origin                               ``mxgate_sts_policy_lookups_total``
``sts_refresh``                result                                     ``mxgate_sts_refreshes_total``
``sts_refresh_failing``        mode                                       ``mxgate_sts_refresh_failing_total``
``sts_policy_served``          result                                     ``mxgate_sts_policy_requests_total``
``receive_worker_restart``     (none)                                     ``mxgate_receive_worker_restarts_total``
``cluster_heartbeat``          result (ok | failed)                       ``mxgate_cluster_heartbeats_total``
``tlsrpt_sent``                result, method                             ``mxgate_tlsrpt_reports_sent_total``
``tlsrpt_received``            reporter_kind -> method, result            ``mxgate_tlsrpt_reports_received_total``
``tlsrpt_received_sessions``   result, result_type; value = sessions      ``mxgate_tlsrpt_received_sessions_total``
``recipient_check``            source, result                             ``mxgate_recipient_checks_total``
=============================  =========================================  ==========================================

A missing event label becomes ``""``. Label values are bounded by the hook contract; as a second line of defence a
metric that reaches :data:`MAX_SERIES` label sets folds every further new one into ``"other"`` (and says so once
in the log), so a misbehaving plugin cannot grow the exposition without bound. ``docs/metrics.md`` lists every
metric.

A registry per plugin instance (never prometheus_client's global one): several gateways can run in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from mxgate._version import __version__
from mxgate.core.checks import split_hostport
from mxgate.core.hookspecs import hookimpl
from mxgate.core.outcomes import DeliveryReport, ReportEvent, TlsOutcome
from mxgate.core.runtime import RECEIVE_WORKER_PIDS, ROLE_MAIN

if TYPE_CHECKING:
    from mxgate.core.queue.store import QueueCounts
    from mxgate.core.runtime import Runtime

log = logging.getLogger(__name__)

_M = TypeVar("_M", bound=MetricWrapperBase)

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

_HTTP_READ_TIMEOUT = 10.0
_HTTP_MAX_HEAD = 16384
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


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
_SPECIAL_KINDS = frozenset({"queue", "connection", "certificate_expiry"})

RECIPIENT_STATES = ("delivered", "deferred", "failed")
FINAL_STATES = ("delivered", "failed")


class _Guard:
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


class _QueueCollector(Collector):
    """Queue gauges from the counts the background task cached (never touches the store during a scrape)."""

    def __init__(self, plugin: PrometheusPlugin) -> None:
        self.plugin = plugin

    def collect(self) -> Iterator[Metric]:
        counts, read_at = self.plugin.queue_counts, self.plugin.queue_read_at
        messages = GaugeMetricFamily(
            "mxgate_queue_messages",
            "Messages in the queue not finished yet: state active = all of them; held, in_flight (an attempt is "
            "running) and deferred (at least one recipient waits for a retry) are subsets of active.",
            labels=["state"],
        )
        recipients = GaugeMetricFamily(
            "mxgate_queue_recipients", "Recipients of active messages by status.", labels=["state"]
        )
        size = GaugeMetricFamily("mxgate_queue_size_bytes", "Total size of the active messages.")
        oldest = GaugeMetricFamily(
            "mxgate_queue_oldest_message_age_seconds", "Age of the oldest active message; 0 when the queue is empty."
        )
        stamp = GaugeMetricFamily(
            "mxgate_queue_read_timestamp_seconds", "When the queue figures above were read (unix time)."
        )
        if counts is not None:
            messages.add_metric(["active"], counts.messages)
            messages.add_metric(["held"], counts.held)
            messages.add_metric(["in_flight"], counts.leased)
            messages.add_metric(["deferred"], counts.deferred)
            for status, n in counts.recipients:
                recipients.add_metric([str(status)], n)
            size.add_metric([], counts.bytes)
            age = 0.0
            if counts.oldest_age is not None:
                age = counts.oldest_age + max(0.0, self.plugin.clock() - read_at)
            oldest.add_metric([], age)
            stamp.add_metric([], read_at)
        yield from (messages, recipients, size, oldest, stamp)


class _HookCollector(Collector):
    """Hook calls and time per (plugin, hook), from the dispatcher's statistics."""

    def __init__(self, plugin: PrometheusPlugin) -> None:
        self.plugin = plugin

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "mxgate_hook_calls", "Hook implementation calls by plugin and hook.", labels=["plugin", "hook"]
        )
        seconds = CounterMetricFamily(
            "mxgate_hook_duration_seconds",
            "Time spent in hook implementations by plugin and hook (await included).",
            labels=["plugin", "hook"],
        )
        runtime = self.plugin.runtime
        if runtime is not None:
            for (plugin, hook), stats in sorted(dict(runtime.hooks.dispatcher.stats).items()):
                calls.add_metric([plugin, hook], stats.calls)
                seconds.add_metric([plugin, hook], stats.seconds)
        yield calls
        yield seconds


class _WorkerProcessCollector(Collector):
    """CPU, memory and descriptors of each receive worker (``mxgate_process_*`` describe the main process only),
    read from /proc at scrape time (Linux, as prometheus-client's process collector)."""

    def __init__(self, plugin: PrometheusPlugin) -> None:
        self.plugin = plugin

    def collect(self) -> Iterator[Metric]:
        labels = ["slot"]
        cpu = CounterMetricFamily(
            "mxgate_receive_worker_cpu_seconds",
            "CPU time of each receive worker (user and system); starts again from 0 when a worker is restarted.",
            labels=labels,
        )
        rss = GaugeMetricFamily(
            "mxgate_receive_worker_resident_memory_bytes", "Resident memory of each receive worker.", labels=labels
        )
        fds = GaugeMetricFamily(
            "mxgate_receive_worker_open_fds", "Open descriptors of each receive worker.", labels=labels
        )
        runtime = self.plugin.runtime
        pids = runtime.stash.get(RECEIVE_WORKER_PIDS, {}) if runtime is not None else {}
        for slot, pid in sorted(pids.items()):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
                open_fds = len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, IndexError, ValueError):
                continue  # it exited between the list and the read
            cpu.add_metric([str(slot)], (int(stat[11]) + int(stat[12])) / _CLOCK_TICKS)
            rss.add_metric([str(slot)], pages * _PAGE_SIZE)
            fds.add_metric([str(slot)], open_fds)
        yield cpu
        yield rss
        yield fds


_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _StateCollector(Collector):
    """Gauges that must be absent until something is known (a 0 would look like a failure to alert rules)."""

    def __init__(self, plugin: PrometheusPlugin) -> None:
        self.plugin = plugin

    def collect(self) -> Iterator[Metric]:
        validating = GaugeMetricFamily(
            "mxgate_dns_resolver_validating",
            "1 when the last resolver self-test proved DNSSEC validation, 0 when it failed; absent before the first.",
        )
        if self.plugin.resolver_validating is not None:
            validating.add_metric([], self.plugin.resolver_validating)
        yield validating


class PrometheusPlugin:
    """Prometheus metrics, fed by hooks; served on [metrics] listen."""

    name = "prometheus"
    priority = 95

    def __init__(self, *, queue_interval: float = QUEUE_INTERVAL, queue_debounce: float = QUEUE_DEBOUNCE) -> None:
        self.queue_interval = queue_interval
        self.queue_debounce = queue_debounce
        self.runtime: Runtime | None = None
        self.clock: Callable[[], float] = time.time
        self.queue_counts: QueueCounts | None = None
        self.queue_read_at = 0.0
        self.server: asyncio.Server | None = None
        self._queue_changed: asyncio.Event | None = None
        self._http_writers: set[asyncio.StreamWriter] = set()
        self._guard = _Guard()
        self._names: dict[int, str] = {}
        self._children: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        # EVENT_METRICS and the kinds plugins added (add_event_counter)
        self.event_metrics: dict[str, EventMetric] = dict(EVENT_METRICS)
        self.counters: dict[str, Counter] = {
            kind: Counter(spec.name, spec.doc, spec.labels, registry=reg) for kind, spec in EVENT_METRICS.items()
        }
        self.events = Counter(
            "mxgate_events", "Every event reported through mxgate_report_on_event, by kind.", ["kind"], registry=reg
        )
        self.sessions_active = Gauge(
            "mxgate_smtp_sessions_active", "SMTP sessions open now, by listener.", ["listener"], registry=reg
        )
        self.certificate_expiry = Gauge(
            "mxgate_tls_certificate_expiry_timestamp_seconds",
            "When each certificate a listener serves expires (unix time), by listener and certificate (default, "
            "or the SNI name).",
            ["listener", "certificate"],
            registry=reg,
        )
        self.dns_latency = Histogram(
            "mxgate_dns_lookup_duration_seconds",
            "DNS lookup latency (network, not cache), by record type.",
            ["rdtype"],
            buckets=DNS_BUCKETS,
            registry=reg,
        )
        self.resolver_validating: float | None = None  # exported by _StateCollector; absent until the self-test
        self.dsn = Counter(
            "mxgate_dsn_messages",
            "Delivery status notifications queued, by action (failed, delayed).",
            ["action"],
            registry=reg,
        )
        self.tls_outcomes = Counter(
            "mxgate_tls_outcomes",
            "Outbound TLS outcomes (one per TLS attempt or policy failure, as TLS-RPT sees them), by outbound "
            "connector, policy type (tlsa = DANE, sts = MTA-STS, no-policy-found), result and RFC 8460 result type.",
            ["connector", "policy_type", "result", "result_type"],
            registry=reg,
        )
        self.recipients = Counter(
            "mxgate_delivery_recipients",
            "Per-recipient delivery results (deferred counts every deferral), by outbound connector.",
            ["connector", "result"],
            registry=reg,
        )
        self.latency = Histogram(
            "mxgate_delivery_latency_seconds",
            "Time from receipt to a recipient's final state (delivered or failed), by outbound connector.",
            ["connector", "result"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.plugin_errors = Counter(
            "mxgate_plugin_errors",
            "Hook implementations that raised, by plugin and hook.",
            ["plugin", "hook"],
            registry=reg,
        )
        self.queue_read_errors = Counter(
            "mxgate_queue_read_errors", "Failed reads of the queue figures (the last good ones stay exported).",
            registry=reg,
        )  # fmt: skip
        self.start_time = Gauge("mxgate_start_time_seconds", "When this gateway started (unix time).", registry=reg)
        self.build = Info("mxgate_build", "mxgate version and platform (value 1).", registry=reg)
        self.build.info({"version": __version__, "python_version": platform.python_version()})
        reg.register(_QueueCollector(self))
        reg.register(_HookCollector(self))
        reg.register(_StateCollector(self))
        reg.register(_WorkerProcessCollector(self))
        ProcessCollector(namespace="mxgate", registry=reg)  # mxgate_process_*: CPU, memory, open files (Linux)

    # -- lifecycle ------------------------------------------------------------------------------------------------

    @hookimpl
    async def mxgate_lifecycle_on_startup(self, runtime: Runtime) -> None:
        self.runtime = runtime
        if runtime.role != ROLE_MAIN:  # a receive worker's events and hook figures are counted by the main process
            return
        self.clock = runtime.clock
        self.start_time.set(runtime.clock())
        self._preset(runtime)
        if runtime.queue is not None:
            self._queue_changed = asyncio.Event()
            runtime.tasks.append(asyncio.ensure_future(self._queue_loop()))
        listen = runtime.config.metrics.listen
        if listen:
            host, port = split_hostport(listen)
            self.server = await asyncio.start_server(self._serve, host, port, limit=_HTTP_MAX_HEAD)
            log.info("metrics endpoint listening", extra={"address": listen})

    @hookimpl
    async def mxgate_lifecycle_on_shutdown(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.close()
            for writer in list(self._http_writers):
                writer.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await server.wait_closed()
        self._queue_changed = None

    def _preset(self, runtime: Runtime) -> None:
        """Series whose label sets the config knows are exported at 0 from the start, so that ``increase()`` and
        ``rate()`` see their first event (a series that appears at 1 hides it)."""
        config = runtime.config
        inbound = [c.name for c in config.inbound_connector] + ["anonymous"]
        for lst in config.listener:
            self._child(self.sessions_active, (lst.name,))
            for conn in inbound:
                for kind in ("disconnection", "message_received"):
                    self._counter(kind, (lst.name, conn))
            self._counter("tls_handshake_failed", (lst.name,))
        for out in config.outbound_connector:
            self._counter("outbound_session_reused", (out.name,))
            for result in RECIPIENT_STATES:
                self._counter("delivery_attempt", (out.name, result))
                self._child(self.recipients, (out.name, result))
            for result in FINAL_STATES:
                self._child(self.latency, (out.name, result))
        for mode in ("enforce", "testing"):
            self._counter("sts_refresh_failing", (mode,))
        for result in ("ok", "retry", "failed"):
            for method in ("https", "mailto"):
                self._counter("tlsrpt_sent", (result, method))

    def _counter(self, kind: str, values: tuple[str, ...]) -> Counter:
        if not values:  # a counter without labels is its own only series
            return self.counters[kind]
        return self._child(self.counters[kind], values, self.event_metrics[kind].name)

    def add_event_counter(self, kind: str, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        """Count events of ``kind`` (``runtime.hooks.on_event(kind, value, **labels)``) in the counter
        ``<name>_total`` with these labels, each taken from the event label of the same name ("" when an event
        lacks it); the value is added. The series guard holds as for the built-in kinds. Adding the same kind
        again with the same name and labels is a no-op; a built-in kind, a kind already added otherwise, or a
        metric name already taken is a ``ValueError``."""
        spec = EventMetric(name.removesuffix("_total"), doc, tuple(labels))
        known = self.event_metrics.get(kind)
        if known is not None:
            if kind in EVENT_METRICS or (known.name, known.labels) != (spec.name, spec.labels):
                raise ValueError(f"event kind {kind!r} already counts in {known.name}_total")
            return self.counters[kind]
        if kind in _SPECIAL_KINDS:
            raise ValueError(f"event kind {kind!r} is mxgate's own")
        counter = Counter(spec.name, spec.doc, spec.labels, registry=self.registry)
        self.counters[kind] = counter
        self.event_metrics[kind] = spec
        return counter

    def _child(self, metric: _M, values: tuple[str, ...], name: str | None = None) -> _M:
        """``metric.labels(...)`` through the series guard. The children are kept (up to :data:`MAX_CHILDREN`):
        every message feeds several metrics, and ``labels()`` takes a lock and checks its arguments each time."""
        cache_key = (id(metric), values)
        child = self._children.get(cache_key)
        if child is not None:
            return cast(_M, child)
        key = name or self._names.get(id(metric))
        if key is None:
            key = self._names[id(metric)] = next(iter(metric.describe())).name
        child = metric.labels(*self._guard(key, values))
        if len(self._children) < MAX_CHILDREN:
            self._children[cache_key] = child
        return child

    # -- queue figures ----------------------------------------------------------------------------------------------

    async def refresh_queue(self) -> None:
        """Read the queue figures now (the background task calls this; tests may too)."""
        runtime = self.runtime
        if runtime is None or runtime.queue is None:
            return
        now = runtime.clock()
        try:
            counts = await runtime.queue.counts(now=now)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.queue_read_errors.inc()
            log.warning("metrics: reading the queue figures failed", exc_info=True)
            return
        self.queue_counts, self.queue_read_at = counts, now

    async def _queue_loop(self) -> None:
        while True:  # runs until the engine cancels it at shutdown
            await self.refresh_queue()
            changed = self._queue_changed
            if changed is None:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.queue_interval):
                    await changed.wait()
            changed.clear()
            await asyncio.sleep(self.queue_debounce)

    def _queue_moved(self) -> None:
        if self._queue_changed is not None:
            self._queue_changed.set()

    # -- hooks that feed the metrics ----------------------------------------------------------------------------------

    @hookimpl
    def mxgate_report_on_event(self, event: ReportEvent) -> None:
        kind = event.kind
        self._child(self.events, (kind,)).inc()
        if event.value < 0:
            return
        if kind == "queue":
            if event.label("action") == "dsn":
                self._child(self.dsn, (event.label("dsn"),)).inc()
            return
        if kind == "connection":
            self._child(self.sessions_active, (event.label("listener"),)).inc()
            return
        if kind == "disconnection":
            self._child(self.sessions_active, (event.label("listener"),)).dec()
            if not event.label("connector"):
                return  # the sessions a dying receive worker held: their connector is unknown, not counted
        if kind == "certificate_expiry":
            which = (event.label("listener"), event.label("certificate"))
            self._child(self.certificate_expiry, which).set(event.value)
            return
        spec = self.event_metrics.get(kind)
        if spec is None:
            return
        values = spec.values(event)
        if kind == "dns_lookup":
            self._counter(kind, values).inc()
            self._child(self.dns_latency, (event.label("rdtype"),)).observe(event.value)
            return
        if kind == "dns_self_test":
            self.resolver_validating = 1.0 if event.label("result") == "validating" else 0.0
            self._counter(kind, values).inc()
            return
        if kind == "message_received":
            self._queue_moved()
        self._counter(kind, values).inc(event.value)

    @hookimpl
    def mxgate_delivery_on_tls_outcome(self, outcome: TlsOutcome) -> None:
        values = (
            outcome.connector,
            str(outcome.policy_type),
            "success" if outcome.success else "failure",
            "" if outcome.success or outcome.result_type is None else str(outcome.result_type),
        )
        self._child(self.tls_outcomes, values).inc()

    @hookimpl
    def mxgate_delivery_on_delivered(self, report: DeliveryReport) -> None:
        self._delivery(report, "delivered")

    @hookimpl
    def mxgate_delivery_on_deferred(self, report: DeliveryReport) -> None:
        self._delivery(report, "deferred")

    @hookimpl
    def mxgate_delivery_on_failed(self, report: DeliveryReport) -> None:
        self._delivery(report, "failed")

    def _delivery(self, report: DeliveryReport, result: str) -> None:
        connector = report.connector or "none"
        self._child(self.recipients, (connector, result)).inc()
        if result in FINAL_STATES and report.received_at > 0 and report.at > 0:
            latency = max(0.0, report.at - report.received_at)
            self._child(self.latency, (connector, result)).observe(latency)
        self._queue_moved()

    @hookimpl
    def mxgate_report_on_plugin_error(self, plugin: str, hook: str) -> None:
        self._child(self.plugin_errors, (plugin, hook)).inc()

    # -- the endpoint --------------------------------------------------------------------------------------------------

    def exposition(self, accept: str = "", accept_encoding: str = "") -> tuple[bytes, dict[str, str]]:
        """The scrape body and headers (OpenMetrics when the scraper asks for it; gzip when it accepts it)."""
        encoder, content_type = choose_encoder(accept)
        body = encoder(self.registry)
        headers = {"Content-Type": content_type}
        if "gzip" in accept_encoding.lower():
            body = gzip.compress(body, compresslevel=6)
            headers["Content-Encoding"] = "gzip"
        return body, headers

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._http_writers.add(writer)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HTTP_READ_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                return
            status, body, headers = self._respond(head)
            lines = [f"HTTP/1.1 {status} {_REASONS[status]}"]
            headers = {**headers, "Content-Length": str(len(body)), "Connection": "close"}
            lines += [f"{k}: {v}" for k, v in headers.items()]
            method = head.split(b" ", 1)[0]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if method == b"HEAD" else body))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        except Exception:
            log.exception("metrics endpoint: request failed")
        finally:
            self._http_writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _respond(self, head: bytes) -> tuple[int, bytes, dict[str, str]]:
        text = head.decode("latin-1")
        request_line, *header_lines = text.split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, b"bad request\n", {"Content-Type": "text/plain"}
        method, target = parts[0], parts[1].split("?", 1)[0]
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", {"Content-Type": "text/plain", "Allow": "GET, HEAD"}
        if target == "/metrics":
            body, out = self.exposition(headers.get("accept", ""), headers.get("accept-encoding", ""))
            return 200, body, out
        if target == "/":
            page = b'<html><body><h1>mxgate</h1><p><a href="/metrics">metrics</a></p></body></html>\n'
            return 200, page, {"Content-Type": "text/html; charset=utf-8"}
        return 404, b"not found: try /metrics\n", {"Content-Type": "text/plain"}


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


__all__ = ["EVENT_METRICS", "EventMetric", "PrometheusPlugin", "metric_names", "sample_names"]


def add_event_counter(runtime: Runtime, kind: str, name: str, doc: str, labels: Sequence[str] = ()) -> bool:
    """A plugin's own counter, fed by its own events: after this, every
    ``await runtime.hooks.on_event(kind, value, **labels)`` (``runtime.hooks.emit(...)`` from synchronous code)
    adds ``value`` to ``<name>_total{labels}`` on the metrics endpoint. Call it from ``mxgate_lifecycle_on_startup``
    (in every role: a receive worker's events are counted by the main process). False when the ``prometheus``
    plugin is disabled (the events are then only seen by other ``report_on_event`` hooks). Label values must be
    bounded (no addresses, no domains). See :meth:`PrometheusPlugin.add_event_counter` for the rules."""
    plugin = runtime.plugins.pm.get_plugin(PrometheusPlugin.name)
    if not isinstance(plugin, PrometheusPlugin):
        return False
    plugin.add_event_counter(kind, name, doc, labels)
    return True
