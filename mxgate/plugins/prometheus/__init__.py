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

The package, by concern (each module imports from mxgate only the public API ``mxgate`` and this package):
``metrics`` (the event table, series limits, name listings), ``collectors`` (queue, hook and state figures read
at scrape time), ``workers`` (the receive workers' processes), ``endpoint`` (the scrape endpoint on
:class:`mxgate.HttpServer`), ``plugin`` (:class:`PrometheusPlugin`: the hooks and :func:`add_event_counter`).
"""

from mxgate.plugins.prometheus.endpoint import exposition
from mxgate.plugins.prometheus.metrics import (
    DNS_BUCKETS,
    EVENT_METRICS,
    FINAL_STATES,
    LATENCY_BUCKETS,
    MAX_CHILDREN,
    MAX_LABEL_LENGTH,
    MAX_SERIES,
    OTHER,
    QUEUE_DEBOUNCE,
    QUEUE_INTERVAL,
    RECIPIENT_STATES,
    EventMetric,
    SeriesGuard,
    metric_names,
    sample_names,
)
from mxgate.plugins.prometheus.plugin import PrometheusPlugin, add_event_counter

__all__ = [
    "DNS_BUCKETS",
    "EVENT_METRICS",
    "FINAL_STATES",
    "LATENCY_BUCKETS",
    "MAX_CHILDREN",
    "MAX_LABEL_LENGTH",
    "MAX_SERIES",
    "OTHER",
    "QUEUE_DEBOUNCE",
    "QUEUE_INTERVAL",
    "RECIPIENT_STATES",
    "EventMetric",
    "PrometheusPlugin",
    "SeriesGuard",
    "add_event_counter",
    "exposition",
    "metric_names",
    "sample_names",
]
