"""The plugin: hooks that feed the metrics, the queue figures' background task, and the endpoint's lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import platform
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.metrics import MetricWrapperBase

from mxgate import ROLE_MAIN, DeliveryReport, HttpServer, ReportEvent, Runtime, TlsOutcome, __version__, hookimpl
from mxgate.plugins.prometheus.collectors import HookCollector, QueueCollector, StateCollector
from mxgate.plugins.prometheus.endpoint import exposition, start_endpoint
from mxgate.plugins.prometheus.metrics import (
    DNS_BUCKETS,
    EVENT_METRICS,
    FINAL_STATES,
    LATENCY_BUCKETS,
    MAX_CHILDREN,
    QUEUE_DEBOUNCE,
    QUEUE_INTERVAL,
    RECIPIENT_STATES,
    SPECIAL_KINDS,
    EventMetric,
    SeriesGuard,
    log,
)
from mxgate.plugins.prometheus.workers import WorkerProcessCollector

if TYPE_CHECKING:
    from mxgate import QueueCounts

_M = TypeVar("_M", bound=MetricWrapperBase)


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
        self.server: HttpServer | None = None
        self._queue_changed: asyncio.Event | None = None
        self._guard = SeriesGuard()
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
        self.resolver_validating: float | None = None  # exported by StateCollector; absent until the self-test
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
        reg.register(QueueCollector(self))
        reg.register(HookCollector(self))
        reg.register(StateCollector(self))
        reg.register(WorkerProcessCollector(self))
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
            self.server = await start_endpoint(listen, self.exposition)
            log.info("metrics endpoint listening", extra={"address": listen})

    @hookimpl
    async def mxgate_lifecycle_on_shutdown(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            await server.close(timeout=5.0)
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
        if kind in SPECIAL_KINDS:
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
        return exposition(self.registry, accept, accept_encoding)


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
