"""Collectors read at scrape time: queue figures the background task cached, the dispatcher's hook statistics, and
gauges that stay absent until something is known."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from mxgate.plugins.prometheus.plugin import PrometheusPlugin


class QueueCollector(Collector):
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


class HookCollector(Collector):
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


class StateCollector(Collector):
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
