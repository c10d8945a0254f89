"""Built-in agent: TLS-RPT (RFC 8460).

Sending side
    Every TLS outcome of the delivery path (hook ``mxgate_delivery_on_tls_outcome``) is counted in memory per
    (UTC day, policy domain, policy) with its failure group, and flushed to ``<state_dir>/tlsrpt.sqlite3`` (WAL,
    ``synchronous=NORMAL``) every ``flush_interval`` seconds and at shutdown, on a thread of its own: the hot
    path never touches the disk. A crash (not a stop) can lose at most the last ``flush_interval`` seconds of
    counts; a stop loses nothing.

    After each full UTC day, each policy domain gets one report (JSON per RFC 8460 section 4, gzip, file name per
    5.1), built after a random delay of up to ``send_window_hours`` and sent to every ``rua`` of the one valid
    ``_smtp._tls.<domain>`` TXT record: ``https:`` by POST (``application/tlsrpt+gzip``, retried with
    exponential backoff for up to 24 hours), ``mailto:`` through mxgate's own queue as a DKIM-signed
    ``multipart/report; report-type="tlsrpt"`` with ``TLS-Required: No``. For ``tlsa`` policies, an MX host that
    publishes its own ``_smtp._tls`` record also gets the part of the report about it.

Cluster mode (``[cluster] database``)
    Counts are still written to the node's own ``tlsrpt.sqlite3`` first (durable, whatever the database does),
    then published to PostgreSQL (schema ``tlsrpt``) as this node's running totals per (day, policy): an
    idempotent upsert keyed by node and policy, so a publish repeated after a lost connection counts nothing twice
    and a node that was cut off catches up by publishing again. Reports are built from the sum over all nodes;
    the sending round (schedule, build, send, purge) runs on one node at a time, the holder of a PostgreSQL
    advisory lock, and reports, deliveries and received reports live in the shared database: one report-id per
    domain and day, one copy of each received report, the same ``mxgate tlsrpt show`` on every node.

Receiving side
    Reports addressed to ``receive_mailbox`` (end-of-data hook) or POSTed to the ``receive_listen`` HTTPS
    endpoint are parsed leniently (gzip or plain JSON, zone-less datetimes, empty fields), kept in the same
    database, and counted: ``reporter_failures()`` and ``mxgate tlsrpt received`` show who fails to reach us.

Modules
    ``collect`` (outcomes into counts, flushed and published), ``store`` (the SQLite file and the cluster schema),
    ``report`` (the RFC 8460 document, record and mail, no I/O), ``parse`` (reports others send us, read
    leniently, no I/O), ``send`` (rua discovery, HTTPS and mail),
    ``receive`` (reports others send us; the HTTPS endpoint), ``service`` (all of it in one object), ``plugin``
    (the hooks), ``commands`` (``mxgate tlsrpt``), ``config`` (``[plugins.tlsrpt]``). Each imports only the
    public API, :mod:`mxgate`, and this package.
"""

from __future__ import annotations

from mxgate.plugins.tlsrpt.config import TlsRptConfig
from mxgate.plugins.tlsrpt.plugin import TlsRptPlugin
from mxgate.plugins.tlsrpt.send import GRACE_SECONDS, RETRY_WINDOW, SendResult
from mxgate.plugins.tlsrpt.service import TlsRptService
from mxgate.plugins.tlsrpt.store import DB_NAME

__all__ = ["DB_NAME", "GRACE_SECONDS", "RETRY_WINDOW", "SendResult", "TlsRptConfig", "TlsRptPlugin", "TlsRptService"]
