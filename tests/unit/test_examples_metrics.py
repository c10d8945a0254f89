"""The Grafana dashboard, the alert rules and docs/metrics.md use exactly the names (and label names) the
Prometheus agent exports. PyYAML is not a dependency: expressions are read from the rule file's text."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mxgate import DeliveryReport, PolicyType, Session, TlsOutcome, TlsRptResult
from mxgate.core import hookspecs
from mxgate.core.messages import RecipientStatus
from mxgate.core.model import Stash
from mxgate.core.plugins import Dispatcher, Hooks, build_plugins
from mxgate.core.queue.queries import QueueCounts
from mxgate.core.runtime import RECEIVE_WORKER_PIDS
from mxgate.plugins.prometheus import EVENT_METRICS, PrometheusPlugin, metric_names, sample_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "examples" / "grafana" / "mxgate-dashboard.json"
ALERTS = ROOT / "examples" / "prometheus" / "alerts.yml"
METRICS_MD = ROOT / "docs" / "metrics.md"

NAME = re.compile(r"\bmxgate_[a-z0-9_]*[a-z0-9]")
SELECTOR = re.compile(r"\b(mxgate_[a-z0-9_]+)\{([^}]*)\}")
LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
TARGET_LABELS = {"instance", "job"}  # added by the scrape


async def exercised() -> dict[str, set[str]]:
    """Sample name -> label names, after driving every hook the agent implements once with every label set."""
    plugins = build_plugins(entry_points=False)
    hooks = Hooks(Dispatcher(plugins))
    plugin = plugins.pm.get_plugin("prometheus")
    assert isinstance(plugin, PrometheusPlugin)
    stash = Stash()
    stash[RECEIVE_WORKER_PIDS] = {0: os.getpid()}  # this process stands in for a receive worker
    plugin.runtime = type("R", (), {"hooks": hooks, "stash": stash})()  # type: ignore[assignment]
    for kind, spec in EVENT_METRICS.items():
        await hooks.on_event(kind, value=0.01, **{src: "x" for src in (spec.sources or spec.labels)})
    await hooks.on_event("queue", action="dsn", dsn="failed")
    await hooks.on_event("disconnection", listener="x")
    await hooks.on_event("certificate_expiry", value=1.8e9, listener="x", certificate="default")
    await hooks.on_disconnect(
        Session(id="s", listener="x", peer_ip="192.0.2.1", peer_port=1, local_ip="", local_port=0)
    )
    failed = {key: st.errors for key, st in hooks.dispatcher.stats.items() if st.errors}
    assert failed == {}, f"the agent raised on an event it declares: {failed}"
    await hooks.on_tls_outcome(TlsOutcome("x", PolicyType.TLSA, "d", False, result_type=TlsRptResult.TLSA_INVALID))
    await hooks.on_delivered(DeliveryReport("q", "r@x", "x", "delivered", "250", None, 1.0, 2.0))
    await hooks.on_failed(DeliveryReport("q", "r@x", "x", "failed", "550", None, 1.0, 2.0))
    plugin.mxgate_report_on_plugin_error("x", "mxgate_delivery_on_delivered")
    plugin.queue_counts = QueueCounts(1, 0, 0, 0, 0, 10, tuple((s, 1) for s in RecipientStatus), 5.0)
    plugin.queue_read_at = plugin.clock()
    plugin.queue_read_errors.inc()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(plugin.exposition()[0].decode()):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    import asyncio

    return asyncio.run(exercised())


def test_every_metric_can_be_produced(exported: dict[str, set[str]]) -> None:
    possible = {n for n in sample_names(PrometheusPlugin().registry) if not n.endswith("_created")}
    assert possible - set(exported) == set()


def dashboard_queries() -> Iterator[str]:
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    yield value
                elif key == "query" and isinstance(value, str | dict):
                    yield from walk({"expr": value} if isinstance(value, str) else value)
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    yield from walk(json.loads(DASHBOARD.read_text()))


def alert_expressions() -> list[str]:
    """Each rule's ``expr``: a one-line value or a ``|`` block (the lines indented deeper than ``expr:``)."""
    lines = ALERTS.read_text().splitlines()
    exprs: list[str] = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        indent, rest = len(m.group(1)), m.group(2).strip()
        if rest not in ("|", ">", "|-", ">-"):
            exprs.append(rest)
            continue
        block = []
        for follow in lines[i + 1 :]:
            if follow.strip() and len(follow) - len(follow.lstrip()) <= indent:
                break
            block.append(follow.strip())
        exprs.append(" ".join(block))
    return exprs


def check_expression(expr: str, exported: dict[str, set[str]]) -> list[str]:
    problems = []
    names = set(NAME.findall(expr))
    if not names:
        return problems
    for name in names - set(exported):
        problems.append(f"{name} is not exported")
    for name, body in SELECTOR.findall(expr):
        allowed = exported.get(name, set()) | TARGET_LABELS
        for label in LABEL.findall(body):
            if label not in allowed:
                problems.append(f"{name} has no label {label!r} (has {sorted(allowed)})")
    grouping_allowed = set().union(*(exported.get(n, set()) for n in names)) | TARGET_LABELS
    for group in BY.findall(expr):
        for label in (g.strip() for g in group.split(",") if g.strip()):
            if label not in grouping_allowed:
                problems.append(f"by ({label}) in {expr!r}: no such label on {sorted(names)}")
    return problems


def test_dashboard_uses_exported_names_and_labels(exported: dict[str, set[str]]) -> None:
    queries = list(dashboard_queries())
    assert len(queries) >= 30
    problems = [p for q in queries for p in check_expression(q, exported)]
    assert problems == []
    used = {n for q in queries for n in NAME.findall(q)}
    for family in ("mxgate_queue_messages", "mxgate_delivery_latency_seconds_bucket", "mxgate_tls_outcomes_total"):
        assert family in used


def test_dashboard_is_well_formed() -> None:
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"] and all(t["refId"] and t["expr"] for t in panel["targets"])
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "instance"}


ALERTS_REQUIRED = {
    "MxgateQueueGrowing": "mxgate_queue_messages",
    "MxgateDeliveriesFailing": "mxgate_delivery_attempts_total",
    "MxgateDaneFailures": "mxgate_tls_outcomes_total",
    "MxgateStsFailures": "mxgate_tls_outcomes_total",
    "MxgateResolverNotValidating": "mxgate_dns_resolver_validating",
    "MxgateStsRefreshFailing": "mxgate_sts_refresh_failing_total",
    "MxgateTlsRptSendFailing": "mxgate_tlsrpt_reports_sent_total",
}


def test_alert_rules_use_exported_names_and_labels(exported: dict[str, set[str]]) -> None:
    text = ALERTS.read_text()
    alerts = re.findall(r"^\s*- alert:\s*(\S+)\s*$", text, re.M)
    exprs = alert_expressions()
    assert len(alerts) == len(exprs) == len(set(alerts))
    by_alert = dict(zip(alerts, exprs, strict=True))
    for alert, metric in ALERTS_REQUIRED.items():
        assert metric in by_alert.get(alert, ""), alert
    problems = [p for e in exprs for p in check_expression(e, exported)]
    assert problems == []
    mentioned = {n for line in text.splitlines() if not line.lstrip().startswith("#") for n in NAME.findall(line)}
    assert mentioned - set(exported) == set()


def test_docs_list_every_metric_and_no_other() -> None:
    suffix = {"counter": "_total", "info": "_info"}
    families = {name + suffix.get(kind, "") for name, kind in metric_names(PrometheusPlugin().registry).items()}
    hooks = {n for n in dir(hookspecs) if n.startswith("mxgate_")}
    documented = set(re.findall(r"`(mxgate_[a-z0-9_]+)`", METRICS_MD.read_text())) - hooks
    assert families - documented == set(), "document these in docs/metrics.md"
    assert documented - families == set(), "docs/metrics.md names metrics that do not exist"


def test_the_checker_catches_mistakes(exported: dict[str, set[str]]) -> None:
    assert check_expression('rate(mxgate_tls_outcomes_total{policy_type="tlsa"}[5m])', exported) == []
    assert check_expression("rate(mxgate_no_such_total[5m])", exported) == ["mxgate_no_such_total is not exported"]
    assert check_expression('mxgate_queue_messages{reason="x"}', exported)[0].startswith("mxgate_queue_messages has no")
    assert check_expression("sum by (domain) (rate(mxgate_messages_received_total[5m]))", exported)
    assert alert_expressions() and all(NAME.search(e) or "up" in e for e in alert_expressions())
