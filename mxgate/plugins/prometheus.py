"""Built-in agent: Prometheus metrics on ``[metrics] listen``, fed by hooks (issue "Prometheus metrics")."""

from __future__ import annotations


class PrometheusPlugin:
    """Prometheus metrics, fed by hooks."""

    name = "prometheus"
    priority = 95
