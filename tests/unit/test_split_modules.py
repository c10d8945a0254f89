"""The modules split by concern (issue #20): the old module names still give every name, and the seams the split
made (the TLS outcome record, the same result for every recipient) work on their own, without sockets."""

from __future__ import annotations

import importlib

import pytest

from mxgate.connectors.outbound import OutboundConnector
from mxgate.core.delivery.model import DEFERRED, OutgoingMessage
from mxgate.core.delivery.outcome import tls_outcome
from mxgate.core.delivery.plan import TlsReport
from mxgate.core.delivery.policy import TlsDecision
from mxgate.core.delivery.transaction import AttemptLog, same_for_all
from mxgate.core.outcomes import Destination, HopHost, PolicyType, TlsLevel, TlsPolicy, TlsRptResult

# facade -> the modules its code moved to
FACADES = {
    "mxgate.core.tls": (
        "mxgate.core.tls_contexts",
        "mxgate.core.tls_rotation",
        "mxgate.core.tls_peer",
        "mxgate.core.tls_names",
        "mxgate.core.tls_verify",
    ),
    "mxgate.core.config": ("mxgate.core.config_schema", "mxgate.core.config_checks"),
    "mxgate.testing.dnslab": ("mxgate.testing.dnszones", "mxgate.testing.dnsdaemons", "mxgate.testing.dnsscripted"),
    "mxgate.testing.sinks": ("mxgate.testing.sinks_aiosmtpd", "mxgate.testing.sinks_postfix"),
}

# names importers use from the facades without them being in its __all__
EXTRA = {
    "mxgate.core.tls": (
        "RotatingServerContext",
        "ServedCertificates",
        "ask_for_client_certificate",
        "leaf_certificate",
        "not_after",
        "own_subject",
        "pair_problem",
    ),
    "mxgate.core.config": (
        "DEFAULT_DOCUMENT",
        "SECTIONS",
        "ClusterConfig",
        "ResolverEndpointConfig",
        "SniCertificate",
        "advisories",
        "parse_toml",
        "plugins_section",
        "read_text",
        "_plain",
    ),
    "mxgate.testing.sinks": ("SMTP_SINK_BINARY",),
}


@pytest.mark.parametrize("facade", sorted(FACADES))
def test_facade_gives_every_name_of_its_parts(facade: str) -> None:
    module = importlib.import_module(facade)
    for name in (*module.__all__, *EXTRA.get(facade, ())):
        assert hasattr(module, name), f"{facade}.{name}"
    for part_name in FACADES[facade]:
        part = importlib.import_module(part_name)
        for name in part.__all__:
            if name in ("Daemon", "Handler", "free_port", "spawn_nsd", "spawn_unbound", "terminate", "wait_answering"):
                continue  # the lab's own plumbing, not re-exported
            assert getattr(module, name) is getattr(part, name), f"{facade}.{name} is not {part_name}.{name}"


POLICY = TlsPolicy(
    "mta-sts",
    PolicyType.STS,
    "example.test",
    TlsLevel.SECURE,
    50,
    mx_patterns=("*.example.test",),
    policy_strings=("version: STSv1", "mode: enforce"),
)


def test_tls_outcome_before_any_connection() -> None:
    report = TlsReport(False, TlsRptResult.VALIDATION_FAILURE, "no MX host matches")
    outcome = tls_outcome("internet", TlsDecision(POLICY, POLICY), None, None, report, "Q1", 1234.5)
    assert outcome.connector == "internet"
    assert outcome.policy_type == PolicyType.STS
    assert outcome.policy_domain == "example.test"
    assert not outcome.success
    assert outcome.result_type == TlsRptResult.VALIDATION_FAILURE
    assert outcome.detail == "no MX host matches"
    assert outcome.mx_host is None
    assert outcome.receiving_ip is None and outcome.sending_ip is None and outcome.receiving_helo is None
    assert outcome.tls_version is None and outcome.cipher is None
    assert outcome.verification is None and outcome.matched is None
    assert outcome.policy_strings == ("version: STSv1", "mode: enforce")
    assert outcome.mx_patterns == ("*.example.test",)
    assert outcome.at == 1234.5
    assert outcome.queue_id == "Q1"


def test_tls_outcome_names_the_host() -> None:
    host = HopHost("mx1.example.test", 25)
    outcome = tls_outcome("internet", TlsDecision(POLICY, POLICY), None, host, TlsReport(True), None, 0.0)
    assert outcome.mx_host == "mx1.example.test"
    assert outcome.success
    assert outcome.policy_domain == "example.test"


def test_same_for_all_gives_every_recipient_one_outcome() -> None:
    connector = OutboundConnector(name="internet", recipient_domains=("*",), use_mx=True)
    destination = Destination(connector, "example.test")
    message = OutgoingMessage("Q1", "a@example.org", ("x@example.test", "y@example.test"), b"")
    rec = AttemptLog(steps=["next hop (mx): -"], transcript=["<- 220 hi"])
    result = same_for_all(destination, message, DEFERRED, "451 4.4.3 no hosts", "4.4.3", rec)
    assert [o.recipient for o in result.outcomes] == ["x@example.test", "y@example.test"]
    assert {(o.result, o.reply, o.status, o.mx_host, o.remote) for o in result.outcomes} == {
        (DEFERRED, "451 4.4.3 no hosts", "4.4.3", None, False)
    }
    assert result.steps == ("next hop (mx): -", "deferred: 451 4.4.3 no hosts")
    assert result.transcript == ("<- 220 hi",)
