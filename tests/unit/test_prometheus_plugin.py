"""The Prometheus agent: hooks in, exposition out. Hooks are called through the real dispatcher; the registry and
the HTTP endpoint are scraped for real."""

from __future__ import annotations

import asyncio
import gzip
import socket
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mxgate import DeliveryReport, PolicyType, TlsOutcome, TlsRptResult, hookimpl
from mxgate.core import bootstrap
from mxgate.core.model import Stash
from mxgate.core.plugins import Dispatcher, Hooks, PluginSet, build_plugins
from mxgate.core.queue.store import QueueStore
from mxgate.core.runtime import Runtime
from mxgate.plugins import prometheus
from mxgate.plugins.prometheus import EVENT_METRICS, PrometheusPlugin, metric_names, sample_names

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def scrape(plugin: PrometheusPlugin) -> Samples:
    body, headers = plugin.exposition()
    assert headers["Content-Type"].startswith("text/plain")
    return parse(body.decode())


def setup() -> tuple[PluginSet, Hooks, PrometheusPlugin]:
    plugins = build_plugins(entry_points=False)
    plugin = plugins.pm.get_plugin("prometheus")
    assert isinstance(plugin, PrometheusPlugin)
    return plugins, Hooks(Dispatcher(plugins)), plugin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def make_runtime(tmp_path: Path, *, metrics: bool = True, extra: str = "") -> tuple[Runtime, PrometheusPlugin]:
    listen = f'listen = "127.0.0.1:{free_port()}"' if metrics else 'listen = ""  # off'

    path = tmp_path / "mx.toml"
    path.write_text(
        f"""
[server]
hostname = "mx.test"
state_dir = "{tmp_path / "var"}"
[[listener]]
name = "smtp"
address = "127.0.0.1:{free_port()}"
[[listener]]
name = "submission"
address = "127.0.0.1:{free_port()}"
[[inbound_connector]]
name = "partner"
sender_ips = ["192.0.2.0/24"]
[[outbound_connector]]
name = "internet"
recipient_domains = ["*"]
use_mx = true
[[outbound_connector]]
name = "to-exo"
recipient_domains = ["example.org"]
smart_hosts = ["example-org.mail.protection.outlook.com"]
[dns]
resolvers = ["127.0.0.1:{free_port()}"]
[metrics]
{listen}
{extra}
"""
    )
    config, plugins = bootstrap.load(path, entry_points=False)
    runtime = Runtime.create(config, plugins)
    runtime.queue = await QueueStore.open(config.state_path)
    plugin = plugins.pm.get_plugin("prometheus")
    assert isinstance(plugin, PrometheusPlugin)
    return runtime, plugin


async def stop(runtime: Runtime) -> None:
    for task in runtime.tasks:
        task.cancel()
    await asyncio.gather(*runtime.tasks, return_exceptions=True)
    await runtime.hooks.on_shutdown(runtime)
    assert runtime.queue is not None
    await runtime.queue.close()
    runtime.tracking.close()


async def http_get(port: int, target: str = "/metrics", method: str = "GET", **headers: str) -> tuple[str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    writer.write((head + "\r\n").encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    header_block, _, body = raw.partition(b"\r\n\r\n")
    return header_block.decode("latin-1"), body


# -- events ---------------------------------------------------------------------------------------------------------


async def test_receive_events_move_their_counters() -> None:
    _, hooks, plugin = setup()
    await hooks.on_event("connection", listener="smtp", connector="anonymous")
    await hooks.on_event("connection", listener="smtp", connector="anonymous")
    await hooks.on_event("tls_session", listener="smtp", version="TLSv1.3")
    await hooks.on_event("auth", result="failed")
    await hooks.on_event("message_received", listener="smtp", connector="anonymous")
    await hooks.on_event("message_rejected", listener="smtp", reason="relay")
    await hooks.on_event("message_rejected", listener="smtp", reason="relay")
    await hooks.on_event("message_rejected", listener="smtp", reason="smuggling")
    s = scrape(plugin)
    assert value(s, "mxgate_smtp_connections_total", listener="smtp", connector="anonymous") is None  # at close
    assert value(s, "mxgate_smtp_sessions_active", listener="smtp") == 2
    await hooks.on_event("disconnection", listener="smtp", connector="anonymous")
    await hooks.on_event("disconnection", listener="smtp", connector="partner")  # STARTTLS chose it
    s = scrape(plugin)
    assert value(s, "mxgate_smtp_connections_total", listener="smtp", connector="anonymous") == 1
    assert value(s, "mxgate_smtp_connections_total", listener="smtp", connector="partner") == 1
    assert value(s, "mxgate_smtp_sessions_active", listener="smtp") == 0
    assert value(s, "mxgate_smtp_tls_sessions_total", listener="smtp", version="TLSv1.3") == 1
    assert value(s, "mxgate_smtp_auth_total", result="failed") == 1
    assert value(s, "mxgate_messages_received_total", listener="smtp", connector="anonymous") == 1
    assert value(s, "mxgate_messages_rejected_total", listener="smtp", reason="relay") == 2
    assert value(s, "mxgate_messages_rejected_total", listener="smtp", reason="smuggling") == 1
    assert value(s, "mxgate_events_total", kind="message_rejected") == 3


async def test_disconnection_event_closes_the_session_gauge() -> None:
    """An event, not the receive_on_disconnect hook: a receive worker's sessions reach the main process's metrics
    as events (mxgate.core.workers)."""
    _, hooks, plugin = setup()
    await hooks.on_event("connection", listener="smtp", connector="anonymous")
    await hooks.on_event("connection", listener="smtp", connector="anonymous")
    assert value(scrape(plugin), "mxgate_smtp_sessions_active", listener="smtp") == 2
    await hooks.on_event("disconnection", listener="smtp")  # a dead receive worker's session: connector unknown
    s = scrape(plugin)
    assert value(s, "mxgate_smtp_sessions_active", listener="smtp") == 1
    assert not [k for k in s if k[0] == "mxgate_smtp_connections_total"]  # not counted under a made-up connector


@pytest.mark.parametrize(
    ("kind", "labels", "metric", "expected_labels"),
    [
        ("delivery_attempt", {"connector": "internet", "result": "deferred"}, "mxgate_delivery_attempts_total", None),
        ("dane_tlsa_lookup", {"state": "dane"}, "mxgate_dane_tlsa_lookups_total", None),
        (
            "dane_verification",
            {"result": "failed", "result_type": "tlsa-invalid", "usage": ""},
            "mxgate_dane_verifications_total",
            None,
        ),
        ("sts_fetch", {"result": "fetch_error", "trigger": "delivery"}, "mxgate_sts_fetches_total", None),
        ("sts_policy", {"mode": "enforce", "origin": "cache"}, "mxgate_sts_policy_lookups_total", None),
        ("sts_refresh", {"result": "failed"}, "mxgate_sts_refreshes_total", None),
        ("cluster_heartbeat", {"result": "failed"}, "mxgate_cluster_heartbeats_total", None),
        ("sts_refresh_failing", {"mode": "enforce"}, "mxgate_sts_refresh_failing_total", None),
        ("sts_policy_served", {"result": "not_found"}, "mxgate_sts_policy_requests_total", None),
        ("tlsrpt_sent", {"result": "failed", "method": "https"}, "mxgate_tlsrpt_reports_sent_total", None),
        (
            "tlsrpt_received",
            {"reporter_kind": "mailto", "result": "unsigned"},
            "mxgate_tlsrpt_reports_received_total",
            {"method": "mailto", "result": "unsigned"},
        ),
        ("dns_self_test", {"result": "validating"}, "mxgate_dns_self_tests_total", None),
    ],
)
async def test_event_table(
    kind: str, labels: dict[str, str], metric: str, expected_labels: dict[str, str] | None
) -> None:
    _, hooks, plugin = setup()
    assert kind in EVENT_METRICS
    await hooks.on_event(kind, **labels)
    await hooks.on_event(kind, **labels)
    assert value(scrape(plugin), metric, **(expected_labels or labels)) == 2


async def test_values_are_added_and_missing_labels_are_empty() -> None:
    _, hooks, plugin = setup()
    await hooks.on_event("tlsrpt_received_sessions", value=7, result="failure", result_type="certificate-expired")
    await hooks.on_event("tlsrpt_received_sessions", value=5, result="failure", result_type="certificate-expired")
    await hooks.on_event("tlsrpt_received_sessions", value=40, result="success")
    await hooks.on_event("auth")
    s = scrape(plugin)
    m = "mxgate_tlsrpt_received_sessions_total"
    assert value(s, m, result="failure", result_type="certificate-expired") == 12
    assert value(s, m, result="success", result_type="") == 40
    assert value(s, "mxgate_smtp_auth_total", result="") == 1


async def test_dns_lookup_counts_and_observes_latency() -> None:
    _, hooks, plugin = setup()
    await hooks.on_event("dns_lookup", value=0.003, rdtype="MX", status="secure", result="answer")
    await hooks.on_event("dns_lookup", value=2.0, rdtype="MX", status="indeterminate", result="error")
    s = scrape(plugin)
    assert value(s, "mxgate_dns_lookups_total", rdtype="MX", status="secure", result="answer") == 1
    assert value(s, "mxgate_dns_lookups_total", rdtype="MX", status="indeterminate", result="error") == 1
    assert value(s, "mxgate_dns_lookup_duration_seconds_count", rdtype="MX") == 2
    assert value(s, "mxgate_dns_lookup_duration_seconds_bucket", rdtype="MX", le="0.005") == 1
    assert value(s, "mxgate_dns_lookup_duration_seconds_sum", rdtype="MX") == pytest.approx(2.003)


async def test_resolver_gauge_is_absent_until_the_self_test_reports() -> None:
    _, hooks, plugin = setup()
    assert value(scrape(plugin), "mxgate_dns_resolver_validating") is None
    await hooks.on_event("dns_self_test", result="not_validating")
    assert value(scrape(plugin), "mxgate_dns_resolver_validating") == 0
    await hooks.on_event("dns_self_test", result="validating")
    assert value(scrape(plugin), "mxgate_dns_resolver_validating") == 1


async def test_dsn_events_counted_other_queue_actions_only_as_events() -> None:
    _, hooks, plugin = setup()
    await hooks.on_event("queue", action="dsn", dsn="failed")
    await hooks.on_event("queue", action="delivered", connector="internet")
    s = scrape(plugin)
    assert value(s, "mxgate_dsn_messages_total", action="failed") == 1
    assert value(s, "mxgate_events_total", kind="queue") == 2


async def test_unknown_kinds_and_bad_values_are_harmless() -> None:
    _, hooks, plugin = setup()
    before = set(metric_names(plugin.registry))
    await hooks.on_event("something_new", colour="green", value=3)
    await hooks.on_event("auth", value=-1, result="ok")  # a counter cannot go down: ignored
    s = scrape(plugin)
    assert set(metric_names(plugin.registry)) == before
    assert value(s, "mxgate_events_total", kind="something_new") == 1
    assert value(s, "mxgate_smtp_auth_total", result="ok") is None
    assert not any("colour" in dict(labels) for _, labels in s)


async def test_series_guard_folds_runaway_label_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prometheus, "MAX_SERIES", 3)
    _, hooks, plugin = setup()
    plugin._guard.limit = 3
    for i in range(10):
        await hooks.on_event("message_rejected", listener="smtp", reason=f"r{i}")
    await hooks.on_event("message_rejected", listener="smtp", reason="r1")
    await hooks.on_event("message_rejected", listener="x" * 500, reason="r1")
    s = scrape(plugin)
    rejected = {labels: v for (name, labels), v in s.items() if name == "mxgate_messages_rejected_total"}
    assert rejected == {
        (("listener", "smtp"), ("reason", "r0")): 1,
        (("listener", "smtp"), ("reason", "r1")): 2,
        (("listener", "smtp"), ("reason", "r2")): 1,
        (("listener", "other"), ("reason", "other")): 8,
    }


# -- delivery hooks ---------------------------------------------------------------------------------------------------


def report(connector: str, result: str, received_at: float, at: float) -> DeliveryReport:
    return DeliveryReport("q1", "rcpt@example.net", connector, result, "250 ok", None, received_at, at)


async def test_delivery_results_and_latency_histogram() -> None:
    _, hooks, plugin = setup()
    await hooks.on_deferred(report("internet", "deferred", 1000.0, 1001.0))
    await hooks.on_delivered(report("internet", "delivered", 1000.0, 1030.0))
    await hooks.on_delivered(report("internet", "delivered", 1000.0, 1000.2))
    await hooks.on_failed(report("internet", "failed", 1000.0, 1000.0 + 5 * 86400))
    await hooks.on_failed(report("", "failed", 0.0, 0.0))  # no connector, no times: counted, not timed
    s = scrape(plugin)
    r = "mxgate_delivery_recipients_total"
    assert value(s, r, connector="internet", result="delivered") == 2
    assert value(s, r, connector="internet", result="deferred") == 1
    assert value(s, r, connector="internet", result="failed") == 1
    assert value(s, r, connector="none", result="failed") == 1
    h = "mxgate_delivery_latency_seconds"
    assert value(s, h + "_count", connector="internet", result="delivered") == 2
    assert value(s, h + "_bucket", connector="internet", result="delivered", le="0.25") == 1
    assert value(s, h + "_bucket", connector="internet", result="delivered", le="10.0") == 1
    assert value(s, h + "_bucket", connector="internet", result="delivered", le="30.0") == 2
    assert value(s, h + "_sum", connector="internet", result="delivered") == pytest.approx(30.2)
    assert value(s, h + "_bucket", connector="internet", result="failed", le="259200.0") == 0
    assert value(s, h + "_bucket", connector="internet", result="failed", le="432000.0") == 1
    assert value(s, h + "_count", connector="internet", result="deferred") is None  # only final states
    assert value(s, h + "_count", connector="none", result="failed") is None


async def test_tls_outcomes_by_policy_type_and_result_type() -> None:
    _, hooks, plugin = setup()
    ok = TlsOutcome("internet", PolicyType.TLSA, "example.net", True, verification="verified")
    bad = TlsOutcome(
        "internet", PolicyType.TLSA, "example.net", False, result_type=TlsRptResult.TLSA_INVALID, verification="x"
    )
    sts = TlsOutcome("internet", PolicyType.STS, "example.com", False, result_type=TlsRptResult.STS_POLICY_FETCH_ERROR)
    for outcome in (ok, ok, bad, sts):
        await hooks.on_tls_outcome(outcome)
    s = scrape(plugin)
    m = "mxgate_tls_outcomes_total"
    assert value(s, m, connector="internet", policy_type="tlsa", result="success", result_type="") == 2
    assert value(s, m, connector="internet", policy_type="tlsa", result="failure", result_type="tlsa-invalid") == 1
    assert (
        value(s, m, connector="internet", policy_type="sts", result="failure", result_type="sts-policy-fetch-error")
        == 1
    )


class Boom:
    name = "boom"

    @hookimpl
    def mxgate_delivery_on_delivered(self) -> None:
        raise RuntimeError("boom")


async def test_plugin_errors_and_hook_statistics() -> None:
    plugins = build_plugins(entry_points=False, extra=[("boom", Boom())])
    hooks = Hooks(Dispatcher(plugins))
    plugin = plugins.pm.get_plugin("prometheus")
    assert isinstance(plugin, PrometheusPlugin)
    plugin.runtime = type("R", (), {"hooks": hooks, "stash": Stash()})()  # type: ignore[assignment]  # what is read
    await hooks.on_delivered(report("internet", "delivered", 1.0, 2.0))
    await hooks.on_delivered(report("internet", "delivered", 1.0, 2.0))
    s = scrape(plugin)
    assert value(s, "mxgate_plugin_errors_total", plugin="boom", hook="mxgate_delivery_on_delivered") == 2
    assert value(s, "mxgate_hook_calls_total", plugin="boom", hook="mxgate_delivery_on_delivered") == 2
    assert value(s, "mxgate_hook_calls_total", plugin="prometheus", hook="mxgate_delivery_on_delivered") == 2
    assert (
        value(s, "mxgate_hook_duration_seconds_total", plugin="prometheus", hook="mxgate_delivery_on_delivered") or 0
    ) > 0
    assert value(s, "mxgate_delivery_recipients_total", connector="internet", result="delivered") == 2


async def test_registries_are_per_instance() -> None:
    _, hooks_a, a = setup()
    _, _hooks_b, b = setup()
    await hooks_a.on_event("auth", result="ok")
    assert value(scrape(a), "mxgate_smtp_auth_total", result="ok") == 1
    assert value(scrape(b), "mxgate_smtp_auth_total", result="ok") is None


def test_names_follow_the_conventions() -> None:
    plugin = PrometheusPlugin()
    names = metric_names(plugin.registry)
    assert len(names) >= 30
    for name, kind in names.items():
        assert name.startswith("mxgate_"), name
        assert not name.endswith("_total"), name  # families carry the bare name; samples get _total
        if kind == "counter":
            assert f"{name}_total" in sample_names(plugin.registry)
    assert names["mxgate_build"] == "info"
    assert "mxgate_delivery_latency_seconds_bucket" in sample_names(plugin.registry)
    body = plugin.exposition()[0].decode()
    assert 'mxgate_build_info{python_version="' in body and 'version="0.1.0"' in body


# -- start-up, queue figures, the endpoint ---------------------------------------------------------------------------


async def test_startup_presets_series_from_the_config(tmp_path: Path) -> None:
    runtime, plugin = await make_runtime(tmp_path, metrics=False)
    try:
        await runtime.hooks.on_startup(runtime)
        assert plugin.server is None  # [metrics] listen unset: no endpoint, the counters still work
        s = scrape(plugin)
        for listener in ("smtp", "submission"):
            for connector in ("partner", "anonymous"):
                assert value(s, "mxgate_smtp_connections_total", listener=listener, connector=connector) == 0
                assert value(s, "mxgate_messages_received_total", listener=listener, connector=connector) == 0
        for connector in ("internet", "to-exo"):
            for result in ("delivered", "deferred", "failed"):
                assert value(s, "mxgate_delivery_attempts_total", connector=connector, result=result) == 0
                assert value(s, "mxgate_delivery_recipients_total", connector=connector, result=result) == 0
            assert value(s, "mxgate_delivery_latency_seconds_count", connector=connector, result="delivered") == 0
        assert value(s, "mxgate_sts_refresh_failing_total", mode="enforce") == 0
        assert value(s, "mxgate_tlsrpt_reports_sent_total", result="failed", method="https") == 0
        assert (value(s, "mxgate_start_time_seconds") or 0) > 1.7e9
    finally:
        await stop(runtime)


async def test_queue_gauges_follow_the_store(tmp_path: Path) -> None:
    runtime, plugin = await make_runtime(tmp_path, metrics=False)
    clock = [1_800_000_000.0]
    runtime.clock = lambda: clock[0]
    plugin.queue_interval = 3600.0  # only the explicit refreshes below
    try:
        await runtime.hooks.on_startup(runtime)
        await plugin.refresh_queue()
        s = scrape(plugin)
        assert value(s, "mxgate_queue_messages", state="active") == 0
        assert value(s, "mxgate_queue_oldest_message_age_seconds") == 0
        assert runtime.queue is not None
        await runtime.queue.put(
            "a@example.net", ["b@example.org", "c@example.org"], b"Subject: x\r\n\r\nhi\r\n", now=clock[0] - 100
        )
        await runtime.queue.put("a@example.net", ["d@example.org"], b"Subject: y\r\n\r\nhello\r\n", now=clock[0] - 10)
        await plugin.refresh_queue()
        clock[0] += 20  # between reads, the age keeps growing
        s = scrape(plugin)
        assert value(s, "mxgate_queue_messages", state="active") == 2
        assert value(s, "mxgate_queue_messages", state="held") == 0
        assert value(s, "mxgate_queue_recipients", state="queued") == 3
        assert value(s, "mxgate_queue_recipients", state="deferred") == 0
        assert (value(s, "mxgate_queue_size_bytes") or 0) > 20
        assert value(s, "mxgate_queue_oldest_message_age_seconds") == pytest.approx(120)
        assert value(s, "mxgate_queue_read_timestamp_seconds") == 1_800_000_000.0
    finally:
        await stop(runtime)


async def test_queue_task_refreshes_after_mail_moved(tmp_path: Path) -> None:
    runtime, plugin = await make_runtime(tmp_path, metrics=False)
    plugin.queue_interval, plugin.queue_debounce = 3600.0, 0.01
    try:
        await runtime.hooks.on_startup(runtime)
        assert runtime.tasks, "the queue reader runs as a runtime task"
        for _ in range(200):
            if plugin.queue_counts is not None:
                break
            await asyncio.sleep(0.01)
        assert plugin.queue_counts is not None and plugin.queue_counts.messages == 0
        assert runtime.queue is not None
        await runtime.queue.put("a@example.net", ["b@example.org"], b"Subject: x\r\n\r\nhi\r\n", now=runtime.clock())
        await runtime.hooks.on_event("message_received", listener="smtp", connector="anonymous")
        for _ in range(300):
            if plugin.queue_counts.messages == 1:
                break
            await asyncio.sleep(0.01)
        assert value(scrape(plugin), "mxgate_queue_messages", state="active") == 1
    finally:
        await stop(runtime)


async def test_queue_read_failure_keeps_the_last_figures(tmp_path: Path) -> None:
    runtime, plugin = await make_runtime(tmp_path, metrics=False)
    plugin.queue_interval = 3600.0
    try:
        await runtime.hooks.on_startup(runtime)
        await plugin.refresh_queue()
        good = plugin.queue_counts
        assert good is not None

        async def broken(*, now: float) -> Any:
            raise OSError("disk on fire")

        assert runtime.queue is not None
        runtime.queue.counts = broken  # type: ignore[method-assign]
        await plugin.refresh_queue()
        s = scrape(plugin)
        assert plugin.queue_counts is good
        assert value(s, "mxgate_queue_read_errors_total") == 1
        assert value(s, "mxgate_queue_messages", state="active") == 0
    finally:
        await stop(runtime)


async def test_http_endpoint_serves_and_shuts_down(tmp_path: Path) -> None:
    runtime, _plugin = await make_runtime(tmp_path)
    listen = runtime.config.metrics.listen
    assert listen is not None
    port = int(listen.rsplit(":", 1)[1])
    try:
        await runtime.hooks.on_startup(runtime)
        await runtime.hooks.on_event("message_rejected", listener="smtp", reason="relay")
        head, body = await http_get(port)
        assert head.startswith("HTTP/1.1 200 ")
        assert "text/plain; version=0.0.4" in head
        assert value(parse(body.decode()), "mxgate_messages_rejected_total", listener="smtp", reason="relay") == 1

        head, body = await http_get(port, Accept="application/openmetrics-text; version=1.0.0")
        assert "application/openmetrics-text" in head and body.rstrip().endswith(b"# EOF")

        head, body = await http_get(port, Accept_Encoding="gzip")
        assert "Content-Encoding: gzip" in head
        assert b"mxgate_messages_rejected_total" in gzip.decompress(body)

        head, body = await http_get(port, method="HEAD")
        assert head.startswith("HTTP/1.1 200 ") and body == b""
        assert (await http_get(port, "/nope"))[0].startswith("HTTP/1.1 404 ")
        assert (await http_get(port, method="POST"))[0].startswith("HTTP/1.1 405 ")
        assert (await http_get(port, "/"))[0].startswith("HTTP/1.1 200 ")

        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # garbage: 400, not a crash
        writer.write(b"NONSENSE\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 400 ")
        writer.close()
    finally:
        await stop(runtime)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_port_in_use_is_a_startup_error(tmp_path: Path) -> None:
    runtime, _plugin = await make_runtime(tmp_path)
    listen = runtime.config.metrics.listen
    assert listen is not None
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", int(listen.rsplit(":", 1)[1])))
    blocker.listen()
    try:
        with pytest.raises(Exception, match="prometheus"):
            await runtime.hooks.on_startup(runtime)
    finally:
        blocker.close()
        await stop(runtime)


async def test_a_plugin_adds_its_own_counter_fed_by_its_events(tmp_path: Path) -> None:
    """The documented way (docs/plugins/prometheus.md): add_event_counter, then runtime.hooks.on_event/emit."""
    runtime, plugin = await make_runtime(tmp_path, metrics=False)
    try:
        before = scrape(plugin)
        await runtime.hooks.on_event("audit_tls", result="ok", policy="dane")  # not known yet: kind only
        assert prometheus.add_event_counter(
            runtime, "audit_tls", "acme_tls_audits", "TLS outcomes audited, by result.", ["result"]
        )
        await runtime.hooks.on_event("audit_tls", result="ok", policy="dane")
        await runtime.hooks.on_event("audit_tls", 2.0, result="failed")
        runtime.hooks.emit("audit_tls", result="ok")
        await asyncio.gather(*runtime.hooks._pending)
        after = scrape(plugin)
        assert value(before, "acme_tls_audits_total", result="ok") is None
        assert value(after, "acme_tls_audits_total", result="ok") == 2.0  # the event before it was added is not
        assert value(after, "acme_tls_audits_total", result="failed") == 2.0
        assert value(after, "mxgate_events_total", kind="audit_tls") == 4.0
        assert "acme_tls_audits" in metric_names(plugin.registry)
        # the same again is a no-op; another shape, a built-in kind or a taken name is refused
        assert prometheus.add_event_counter(runtime, "audit_tls", "acme_tls_audits_total", "same", ["result"])
        with pytest.raises(ValueError, match="already counts in acme_tls_audits_total"):
            plugin.add_event_counter("audit_tls", "acme_tls_audits", "other labels", ["policy"])
        with pytest.raises(ValueError, match="already counts in mxgate_dns_lookups_total"):
            plugin.add_event_counter("dns_lookup", "acme_lookups", "mine", [])
        with pytest.raises(ValueError, match="mxgate's own"):
            plugin.add_event_counter("queue", "acme_queue", "mine", [])
        with pytest.raises(ValueError):
            plugin.add_event_counter("acme_other", "acme_tls_audits", "a taken name", [])
    finally:
        await stop(runtime)


async def test_add_event_counter_without_the_prometheus_plugin_says_so(tmp_path: Path) -> None:
    runtime, _ = await make_runtime(tmp_path, metrics=False)
    try:
        runtime.plugins.pm.unregister(name="prometheus")
        assert not prometheus.add_event_counter(runtime, "audit_tls", "acme_tls_audits", "doc", ["result"])
    finally:
        await stop(runtime)


def test_documented_names_stay() -> None:
    assert callable(prometheus.add_event_counter)
    assert prometheus.PrometheusPlugin.__module__ == "mxgate.plugins.prometheus.plugin"
    assert set(prometheus.__all__) >= {
        "EVENT_METRICS",
        "EventMetric",
        "PrometheusPlugin",
        "metric_names",
        "sample_names",
    }
