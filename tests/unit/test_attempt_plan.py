"""The socket-free attempt plan (mxgate.core.delivery.plan): every step of one connection and every failure value,
fed with replies and verification results as the driver would (RFC 3207, RFC 7672 §2.2, RFC 8461 §5)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mxgate.core.delivery.model import DEFERRED, FAILED, OutgoingMessage
from mxgate.core.delivery.plan import (
    AttemptFailure,
    AttemptPlan,
    Capabilities,
    Fail,
    Next,
    Step,
    final_verdict,
    host_gate,
    judge,
    rcpt_params,
    requiretls_gate,
    transaction_params,
)
from mxgate.core.delivery.policy import TlsDecision
from mxgate.core.model import DsnNotify, DsnRet, RecipientDsn
from mxgate.core.outcomes import HopHost, HostPolicy, PeerVerification, PolicyType, TlsLevel, TlsPolicy, TlsRptResult
from mxgate.core.smtp.client import SmtpReply
from mxgate.plugins.dane import DANE_STATUS

WHERE = "mx.example.test[192.0.2.1]:25"
HOST = HopHost("mx.example.test", 25, 10)
DANE = TlsPolicy("dane", PolicyType.TLSA, "example.test", TlsLevel.SECURE, 300, status_codes=DANE_STATUS)
STS_TESTING = TlsPolicy("mta_sts", PolicyType.STS, "example.test", TlsLevel.SECURE, 200, report_only=True)
CONNECTOR = TlsPolicy("connector", PolicyType.NO_POLICY, "example.test", TlsLevel.MAY, 100)
STARTTLS = Capabilities(frozenset({"STARTTLS", "PIPELINING"}))
PLAIN = Capabilities(frozenset({"PIPELINING"}))


def reply(code: int, text: str = "x") -> SmtpReply:
    return SmtpReply.parse(code, [text])


def plan(
    level: TlsLevel, policy: TlsPolicy = DANE, *, auth: bool = False, report: TlsPolicy | None = None
) -> AttemptPlan:
    decision = TlsDecision(report or policy, policy)
    hp = HostPolicy(level)
    return AttemptPlan(WHERE, decision, hp, HostPolicy(TlsLevel.SECURE) if report else hp, auth=auth)


def test_greeting_other_than_220_is_the_peers_reply() -> None:
    """RFC 5321 §3.1: a 554 greeting is the host's refusal; the reply is remote."""
    assert plan(TlsLevel.MAY).greeting(reply(220)) is None
    step = plan(TlsLevel.MAY).greeting(reply(554, "5.7.1 go away"))
    assert isinstance(step, Fail) and step.failure.remote and step.failure.status == "5.7.1"


def test_rfc7672_s2_2_tls_required_and_starttls_missing_defers_with_the_policy_status() -> None:
    """RFC 7672 §2.2: where DANE applies there is no cleartext fallback; the failure is transient, with DANE's
    enhanced code for starttls-not-supported, and one TLS-RPT outcome."""
    step = plan(TlsLevel.SECURE).ehlo(reply(250), PLAIN)
    assert isinstance(step, Fail) and step.failure.reply.startswith("451 4.7.321 ")
    assert step.report is not None and step.report.result is TlsRptResult.STARTTLS_NOT_SUPPORTED


def test_rfc3207_opportunistic_without_starttls_goes_on_in_cleartext_and_reports() -> None:
    """RFC 3207 / opportunistic TLS: no STARTTLS offered: send in cleartext, record the outcome."""
    step = plan(TlsLevel.MAY, CONNECTOR).ehlo(reply(250), PLAIN)
    assert isinstance(step, Next) and step.step is Step.SEND and step.report is not None and not step.report.success
    assert plan(TlsLevel.MAY, CONNECTOR).ehlo(reply(250), STARTTLS) == Next(Step.STARTTLS)
    assert plan(TlsLevel.NONE, CONNECTOR).ehlo(reply(250), STARTTLS) == Next(Step.SEND)


def test_handshake_failure_retries_in_cleartext_only_when_opportunistic() -> None:
    """RFC 3207 §4.1 / RFC-CHECKLIST 8: a broken handshake is retried without TLS at level MAY, never above."""
    retry = plan(TlsLevel.MAY, CONNECTOR).starttls(None, "handshake failed")
    assert isinstance(retry, Next) and retry.step is Step.RETRY_CLEARTEXT
    held = plan(TlsLevel.ENCRYPT).starttls(None, "handshake failed")
    assert isinstance(held, Fail) and held.failure.status == "4.7.5"
    assert held.report is not None and held.report.result is TlsRptResult.VALIDATION_FAILURE


def test_starttls_refused() -> None:
    """RFC 3207 §4: 454 to STARTTLS: required TLS defers; opportunistic goes on in cleartext."""
    assert isinstance(plan(TlsLevel.SECURE).starttls(reply(454)), Fail)
    go = plan(TlsLevel.MAY, CONNECTOR).starttls(reply(454))
    assert isinstance(go, Next) and go.step is Step.SEND
    assert plan(TlsLevel.SECURE).starttls(reply(220)) == Next(Step.VERIFY)


def test_rfc8461_s2_verification_failure_is_one_failure_value() -> None:
    """RFC 8461 §2 / RFC 7672 §2.2: a failed verification defers with the policy's code for its result type."""
    p = plan(TlsLevel.SECURE)
    bad = PeerVerification(False, "untrusted", TlsRptResult.TLSA_INVALID, detail="no match")
    step = p.verified(judge(p, bad, None))
    assert isinstance(step, Fail) and step.failure.status == "4" + DANE_STATUS[TlsRptResult.TLSA_INVALID][1:]
    assert step.report is not None and step.report.result is TlsRptResult.TLSA_INVALID
    good = p.verified(judge(p, PeerVerification(True, "verified", matched="3 1 1"), None))
    assert isinstance(good, Next) and good.step is Step.EHLO_AGAIN and good.report is not None and good.report.success


def test_nobody_verifying_is_a_failure_never_a_pass() -> None:
    """A policy that demands verification and gets no answer from any plugin fails (validation-failure)."""
    verdict = judge(plan(TlsLevel.SECURE), None, None)
    assert not verdict.ok and verdict.failure is not None
    assert verdict.failure.result_type is TlsRptResult.VALIDATION_FAILURE


def test_rfc8461_s5_testing_failure_is_reported_not_enforced() -> None:
    """RFC 8461 §5: under ``testing`` the certificate mismatch is reported; the connector's level is enforced."""
    p = plan(TlsLevel.MAY, CONNECTOR, report=STS_TESTING)
    assert p.needs_verification() == (False, True)
    mismatch = PeerVerification(False, "untrusted", TlsRptResult.CERTIFICATE_HOST_MISMATCH)
    verdict = judge(p, None, mismatch)
    assert verdict.ok and verdict.failure is mismatch
    step = p.verified(verdict)
    assert isinstance(step, Next) and step.report is not None and not step.report.success


def test_never_cleartext_when_tls_is_required_and_auth_only_under_tls() -> None:
    """RFC-CHECKLIST 8 and the AUTH rule: no transaction in cleartext at ENCRYPT and above; credentials only under
    TLS."""
    held = plan(TlsLevel.ENCRYPT).ready(tls=False)
    assert isinstance(held, Fail) and held.failure.status == "4.7.4"
    no_auth = plan(TlsLevel.MAY, CONNECTOR, auth=True).ready(tls=False)
    assert isinstance(no_auth, Fail) and no_auth.failure.status == "4.7.10"
    assert plan(TlsLevel.MAY, CONNECTOR, auth=True).ready(tls=True) == Next(Step.AUTH)
    refused = plan(TlsLevel.MAY, CONNECTOR, auth=True).authenticated(reply(535, "5.7.8 no"))
    assert isinstance(refused, Fail) and refused.failure.remote and refused.failure.status == "5.7.8"


def test_host_gate_unusable_host() -> None:
    """RFC 7672 §2.2.3: a host its governing policy marks unusable is skipped with that policy's code; a host
    whose address lookups failed records no TLS outcome (no TLS was attempted)."""
    decision = TlsDecision(DANE, DANE)
    bogus = HostPolicy(TlsLevel.SECURE, usable=False, failure=TlsRptResult.DNSSEC_INVALID, detail="bogus TLSA")
    gate = host_gate(decision, HOST, bogus, bogus)
    assert gate.failure is not None and gate.failure.status.startswith("4.7.")
    assert [r.result for r in gate.reports] == [TlsRptResult.DNSSEC_INVALID]
    lookups = HostPolicy(TlsLevel.SECURE, usable=False, detail="address lookups failed")
    gate = host_gate(decision, HOST, lookups, lookups)
    assert gate.reports == () and gate.failure is not None and gate.failure.status == "4.4.3"
    assert host_gate(decision, HOST, HostPolicy(TlsLevel.SECURE), HostPolicy(TlsLevel.SECURE)).failure is None


def test_report_only_objection_is_recorded_and_the_host_still_dialled() -> None:
    decision = TlsDecision(STS_TESTING, CONNECTOR)
    objection = HostPolicy(TlsLevel.SECURE, usable=False, failure=TlsRptResult.VALIDATION_FAILURE)
    gate = host_gate(decision, HOST, HostPolicy(TlsLevel.MAY), objection)
    assert gate.failure is None and [r.result for r in gate.reports] == [TlsRptResult.VALIDATION_FAILURE]


@pytest.mark.parametrize(
    ("message", "caps", "status"),
    [
        (OutgoingMessage("q", "a@x.test", ("b@y.test",), b"x" * 100), Capabilities(frozenset({"SIZE"}), 10), "5.3.4"),
        (OutgoingMessage("q", "a@x.test", ("b@y.test",), b"x", smtputf8=True), Capabilities(), "5.6.7"),
        (OutgoingMessage("q", "a@x.test", ("b@y.test",), "é".encode()), Capabilities(), "5.6.3"),
    ],
)
def test_rfc1870_rfc6531_rfc6152_what_the_message_needs(
    message: OutgoingMessage, caps: Capabilities, status: str
) -> None:
    """RFC 1870 SIZE, RFC 6531 SMTPUTF8, RFC 6152 8BITMIME: the peer cannot take it: a permanent failure."""
    params, unmet = transaction_params(message, caps, WHERE)
    assert params == [] and unmet is not None and unmet.permanent and unmet.status == status


def test_transaction_params_when_offered() -> None:
    message = OutgoingMessage("q", "a@x.test", ("b@y.test",), "é".encode(), smtputf8=True)
    caps = Capabilities(frozenset({"SIZE", "8BITMIME", "SMTPUTF8"}), 1000)
    assert transaction_params(message, caps, WHERE) == (
        [f"SIZE={len(message.data)}", "BODY=8BITMIME", "SMTPUTF8"],
        None,
    )


def test_final_verdict() -> None:
    """All hosts refused permanently: failed with the last reply; any transient failure: deferred, and a
    permanent-looking reply is wrapped in a 451 (RFC 5321 §5.1: try the other hosts later)."""
    perm = AttemptFailure("550 5.1.1 no such user", "5.1.1", permanent=True, remote=True)
    temp = AttemptFailure("451 4.4.1 timeout", "4.4.1")
    assert final_verdict([perm]).result == FAILED and final_verdict([perm]).remote
    mixed = final_verdict([temp, AttemptFailure("554 5.7.1 policy", "5.7.1")])
    assert (mixed.result, mixed.status) == (DEFERRED, "4.4.1") and mixed.reply.startswith("451 4.4.1 554")
    assert final_verdict([]).result == DEFERRED


# -- RFC 8689 REQUIRETLS ----------------------------------------------------------------------------------

STS_ENFORCE = TlsPolicy("mta_sts", PolicyType.STS, "example.test", TlsLevel.SECURE, 200)
RT = OutgoingMessage("q", "a@x.test", ("b@y.test",), b"x", requiretls=True)
RT_CAPS = Capabilities(frozenset({"REQUIRETLS", "SIZE"}))


@pytest.mark.parametrize(
    ("policy", "level", "allowed"),
    [
        (DANE, TlsLevel.SECURE, True),  # DANE authenticates the host
        (STS_ENFORCE, TlsLevel.SECURE, True),  # WebPKI under an enforced MTA-STS policy
        (CONNECTOR, TlsLevel.SECURE, True),  # the connector's domain_validation
        (CONNECTOR, TlsLevel.VERIFY, True),  # the connector's certificate_validation
        (CONNECTOR, TlsLevel.ENCRYPT, False),  # encryption_only: the peer is not authenticated
        (CONNECTOR, TlsLevel.MAY, False),  # opportunistic
        (CONNECTOR, TlsLevel.NONE, False),
    ],
)
def test_rfc8689_requiretls_only_to_a_host_whose_certificate_a_policy_verifies(
    policy: TlsPolicy, level: TlsLevel, allowed: bool
) -> None:
    """RFC 8689 §4.2.1: a REQUIRETLS message goes only to a host authenticated by DANE, MTA-STS or the
    connector's validation; anything weaker is one permanent 5.7.30 failure, before any connection (so never
    in the clear, never retried). A message without REQUIRETLS is never stopped here."""
    decision = TlsDecision(policy, policy)
    gate = requiretls_gate(True, decision, HOST, HostPolicy(level))
    if allowed:
        assert gate.failure is None
    else:
        assert gate.failure is not None and gate.failure.permanent and gate.failure.status == "5.7.30"
        assert gate.failure.reply.startswith("550 5.7.30 mx.example.test: REQUIRETLS")
    assert requiretls_gate(False, decision, HOST, HostPolicy(level)).failure is None


def test_rfc8689_requiretls_report_only_sts_does_not_authenticate() -> None:
    """MTA-STS ``testing`` only reports: the enforced policy (an opportunistic connector) decides: 5.7.30."""
    decision = TlsDecision(STS_TESTING, CONNECTOR)
    gate = requiretls_gate(True, decision, HOST, HostPolicy(TlsLevel.MAY))
    assert gate.failure is not None and gate.failure.status == "5.7.30"


def test_rfc8689_requiretls_on_the_session() -> None:
    """§4.2.1: MAIL carries REQUIRETLS only on a verified TLS session to a peer that offers it; otherwise the
    message fails permanently with 5.7.30 (RFC 8689 §6)."""
    params, unmet = transaction_params(RT, RT_CAPS, WHERE, verified_tls=True)
    assert unmet is None and params == ["SIZE=1", "REQUIRETLS"]
    for caps, verified in ((Capabilities(frozenset({"SIZE"})), True), (RT_CAPS, False)):
        params, unmet = transaction_params(RT, caps, WHERE, verified_tls=verified)
        assert params == [] and unmet is not None and unmet.permanent and unmet.status == "5.7.30"
    # without REQUIRETLS nothing is asked of the session
    plain = OutgoingMessage("q", "a@x.test", ("b@y.test",), b"x")
    assert transaction_params(plain, Capabilities(), WHERE) == ([], None)


# -- RFC 3461 DSN passed on -------------------------------------------------------------------------------


def test_rfc3461_dsn_parameters_passed_on_only_when_offered() -> None:
    """§4.1-4.4: RET and ENVID on MAIL, NOTIFY and ORCPT on each RCPT, xtext-encoded, when the peer offers DSN;
    an ORCPT is added where the sender gave none (§4.2), not for a non-ASCII address; nothing without DSN."""
    message = OutgoingMessage(
        "q",
        "a@x.test",
        ("b@y.test", "c@y.test", "dé@y.test"),
        b"x",
        envid="id+1 =x",
        dsn_ret=DsnRet.HDRS,
        recipient_dsn=(
            RecipientDsn(frozenset({DsnNotify.SUCCESS, DsnNotify.FAILURE}), ("rfc822", "B+orig@y.test")),
            RecipientDsn(frozenset({DsnNotify.NEVER})),
            RecipientDsn(),
        ),
    )
    dsn = Capabilities(frozenset({"DSN"}))
    ascii_only = replace(message, recipients=("b@y.test",))
    assert transaction_params(ascii_only, dsn, WHERE) == (["RET=HDRS", "ENVID=id+2B1+20+3Dx"], None)
    assert rcpt_params(message, dsn) == (
        ("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;B+2Borig@y.test"),
        ("NOTIFY=NEVER", "ORCPT=rfc822;c@y.test"),
        (),
    )
    assert transaction_params(ascii_only, Capabilities(), WHERE) == ([], None)
    assert rcpt_params(message, Capabilities()) == ((), (), ())
