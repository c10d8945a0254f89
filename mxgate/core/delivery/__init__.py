"""Delivery attempts through outbound connectors: "what to do" apart from "doing it" (STYLE.md).

* :mod:`~mxgate.core.delivery.policy`: pure policy functions — the connector's own TLS opinion, MX filtering by
  an enforcing policy's patterns (all hosts, DANE or not), and the **per-host policy** (:func:`decide_host`:
  DANE where it applies to the host, else MTA-STS under enforce, else the connector).
* :mod:`~mxgate.core.delivery.plan`: the socket-free attempt plan — (host policy, EHLO capabilities, STARTTLS
  reply, verification result) to the next step or to one failure value (reply, status code, TLS-RPT outcome).
* :mod:`~mxgate.core.delivery.pool`: the outbound session pool (connection reuse).
* :mod:`~mxgate.core.delivery.driver`: :class:`Deliverer`, the thin driver that runs the plan with the SMTP client.
* :mod:`~mxgate.core.delivery.model`: the records hooks, the scheduler and the CLI see.
"""

from mxgate.core.delivery.driver import Deliverer
from mxgate.core.delivery.model import DEFERRED, DELIVERED, FAILED, DeliveryResult, OutgoingMessage, RecipientOutcome
from mxgate.core.delivery.plan import (
    AttemptFailure,
    AttemptPlan,
    Capabilities,
    DestinationPlan,
    Step,
    TlsReport,
    Verdict,
    plan_destination,
)
from mxgate.core.delivery.policy import (
    CONNECTOR_PRECEDENCE,
    TlsDecision,
    combine_policies,
    connector_level,
    connector_policy,
    decide_host,
    decide_ranked,
    enforced_mx_patterns,
    filter_hosts,
    filter_hosts_by_policies,
    mx_pattern_matches,
    needs_8bitmime,
    needs_smtputf8,
    rank_policies,
)
from mxgate.core.delivery.pool import QUIT_TIMEOUT, RSET_TIMEOUT, SessionKey, SessionPool

__all__ = [
    "CONNECTOR_PRECEDENCE",
    "DEFERRED",
    "DELIVERED",
    "FAILED",
    "QUIT_TIMEOUT",
    "RSET_TIMEOUT",
    "AttemptFailure",
    "AttemptPlan",
    "Capabilities",
    "Deliverer",
    "DeliveryResult",
    "DestinationPlan",
    "OutgoingMessage",
    "RecipientOutcome",
    "SessionKey",
    "SessionPool",
    "Step",
    "TlsDecision",
    "TlsReport",
    "Verdict",
    "combine_policies",
    "connector_level",
    "connector_policy",
    "decide_host",
    "decide_ranked",
    "enforced_mx_patterns",
    "filter_hosts",
    "filter_hosts_by_policies",
    "mx_pattern_matches",
    "needs_8bitmime",
    "needs_smtputf8",
    "plan_destination",
    "rank_policies",
]
