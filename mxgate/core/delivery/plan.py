"""The attempt plan: one connection's decisions, without a socket (h11's way; STYLE.md "decisions apart from
sockets").

The driver (:mod:`mxgate.core.delivery.driver`) does the I/O and feeds each result to the plan: the greeting, the
EHLO reply and capabilities, the STARTTLS reply (or handshake error), the verification results, the AUTH reply.
Each call returns either :class:`Next` — the next step, perhaps with one TLS outcome to record — or :class:`Fail`
with the single :class:`AttemptFailure` value (reply, enhanced status, permanent or not, remote or ours) and the
TLS-RPT outcome, if any. Every failure path is written here, once; the driver never builds a reply itself.

The plan works on the **per-host policy** (:class:`~mxgate.core.delivery.policy.TlsDecision` for the host, and
its :class:`~mxgate.core.outcomes.HostPolicy`): the level it demands, the policy whose status codes a failure
carries, and what must be verified (the enforced policy, plus a report-only one such as MTA-STS ``testing``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol

from mxgate.core.delivery.model import DEFERRED, FAILED, OutgoingMessage
from mxgate.core.delivery.policy import (
    TlsDecision,
    combine_policies,
    decide_ranked,
    filter_hosts_by_policies,
    needs_8bitmime,
    needs_smtputf8,
    rank_policies,
)
from mxgate.core.model import DsnNotify
from mxgate.core.outcomes import HopHost, HostPolicy, NextHop, PeerVerification, TlsLevel, TlsPolicy, TlsRptResult
from mxgate.core.smtp.parse import xtext_encode

__all__ = [
    "REPORTED_EXTENSIONS",
    "AttemptFailure",
    "AttemptPlan",
    "Capabilities",
    "DestinationPlan",
    "DestinationVerdict",
    "Fail",
    "HostGate",
    "Next",
    "Step",
    "TlsReport",
    "Verdict",
    "connect_failed",
    "connection_lost",
    "describe_extensions",
    "describe_host_policy",
    "final_verdict",
    "host_gate",
    "judge",
    "local_reply",
    "no_address",
    "plan_destination",
    "rcpt_params",
    "requiretls_gate",
    "transaction_params",
]


class ReplyLike(Protocol):
    """What the plan reads of a server reply (:class:`~mxgate.core.smtp.client.SmtpReply`)."""

    @property
    def code(self) -> int: ...

    @property
    def status(self) -> str: ...


def local_reply(code: int, status: str, text: str) -> str:
    """A reply of our own (for the queue, DSNs and logs): ``"451 4.4.1 text"``."""
    return f"{code} {status} {text}"


# ============================================================================================================
# values
# ============================================================================================================


@dataclass(frozen=True, slots=True)
class AttemptFailure:
    """Why a host or address did not take the message."""

    reply: str  # what to tell the queue ("451 4.4.1 ...")
    status: str  # RFC 3463
    permanent: bool = False
    remote: bool = False  # the reply came from the peer (a DSN's Diagnostic-Code)


@dataclass(frozen=True, slots=True)
class TlsReport:
    """One TLS outcome record to emit (``on_tls_outcome``); the driver adds the connection's facts."""

    success: bool
    result: TlsRptResult | None = None
    detail: str = ""
    verification: PeerVerification | None = None


class Step(StrEnum):
    STARTTLS = "starttls"  # send STARTTLS and handshake
    RETRY_CLEARTEXT = "retry_cleartext"  # the handshake broke the connection: reconnect, no STARTTLS (opportunistic)
    VERIFY = "verify"  # TLS is up: verify the peer (hooks)
    EHLO_AGAIN = "ehlo_again"  # after verification: EHLO under TLS
    AUTH = "auth"
    SEND = "send"  # the session is ready for transactions


@dataclass(frozen=True, slots=True)
class Next:
    step: Step
    report: TlsReport | None = None
    note: str = ""  # for the delivery's steps


@dataclass(frozen=True, slots=True)
class Fail:
    failure: AttemptFailure
    report: TlsReport | None = None
    note: str = ""


Decision = Next | Fail


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the peer's EHLO offered."""

    keywords: frozenset[str] = frozenset()
    size_limit: int | None = None

    def supports(self, keyword: str) -> bool:
        return keyword.upper() in self.keywords


REPORTED_EXTENSIONS = ("CHUNKING", "DSN", "REQUIRETLS", "SIZE", "PIPELINING", "SMTPUTF8", "8BITMIME")


def describe_extensions(capabilities: Capabilities) -> str:
    """The extensions delivery uses, offered or not: ``"CHUNKING DSN SIZE=10240000 (not offered: ...)"``
    (a delivery step; ``mxgate connector validate`` prints it)."""
    offered = [
        f"SIZE={capabilities.size_limit}" if k == "SIZE" and capabilities.size_limit else k
        for k in REPORTED_EXTENSIONS
        if capabilities.supports(k)
    ]
    missing = [k for k in REPORTED_EXTENSIONS if not capabilities.supports(k)]
    return " ".join(offered or ["none"]) + (f" (not offered: {' '.join(missing)})" if missing else "")


@dataclass(frozen=True, slots=True)
class Verdict:
    """The verification of one handshake: may the message go (``ok``), what to report, the failure to report."""

    ok: bool
    verification: PeerVerification
    failure: PeerVerification | None = None


# ============================================================================================================
# before connecting: the destination and each host
# ============================================================================================================


@dataclass(frozen=True, slots=True)
class DestinationPlan:
    """What the policies say about a destination, before any connection: the destination-wide view (whose
    failure defers everything), the hosts an enforcing policy's ``mx`` patterns leave (all hosts filtered, DANE
    or not), and — per host — the governing policy (:meth:`decide`). Delivery and ``mxgate explain`` both use it.
    """

    next_hop: NextHop
    candidates: tuple[TlsPolicy, ...]  # every opinion (the connector's included)
    fallback: TlsPolicy  # the connector's own
    decision: TlsDecision  # the destination-wide view
    hosts: tuple[HopHost, ...]  # after the mx patterns of enforcing policies
    filtering: TlsPolicy | None = None  # the first policy that filtered a host out
    ranked: tuple[TlsPolicy, ...] = ()  # the applicable candidates, highest precedence first

    @property
    def dropped(self) -> tuple[HopHost, ...]:
        return tuple(h for h in self.next_hop.hosts if h not in self.hosts)

    @property
    def failure(self) -> TlsRptResult | None:
        """The destination-wide failure that defers everything (a report-only policy's is only reported)."""
        policy = self.decision.policy
        return policy.failure if not self.decision.report_only else None

    def decide(self, host: HopHost) -> tuple[TlsDecision, HostPolicy, HostPolicy]:
        """The per-host policy: (decision, the enforced policy's refinement, the deciding policy's refinement).
        When the policy governing the host could not be established (e.g. mandatory MTA-STS without a policy,
        for a host DANE does not govern), the host is unusable: never reached at a weaker level."""
        decision = decide_ranked(self.ranked, self.fallback, host)
        enforce_hp = decision.enforce.for_host(host.name)
        report_hp = enforce_hp if decision.policy is decision.enforce else decision.policy.for_host(host.name)
        if decision.enforce.failure is not None and enforce_hp.usable:
            enforce_hp = replace(enforce_hp, usable=False, failure=decision.enforce.failure)
        return decision, enforce_hp, report_hp


def describe_host_policy(decision: TlsDecision, enforce_hp: HostPolicy) -> str:
    """One line: which mechanism governs the host, at what level, and why (steps, logs, ``mxgate explain``)."""
    governing = decision.policy
    text = f"governed by {governing.source} ({governing.policy_type}, level {enforce_hp.level.name}"
    if decision.report_only:
        text += f", report only; enforced by {decision.enforce.source}"
    if not enforce_hp.usable:
        text += f", UNUSABLE: {enforce_hp.failure or enforce_hp.detail or 'host unusable'}"
    return text + ")"


def plan_destination(next_hop: NextHop, policies: Sequence[TlsPolicy], fallback: TlsPolicy) -> DestinationPlan:
    """The :class:`DestinationPlan` of ``next_hop`` under ``policies`` (``fallback``: the connector's own)."""
    candidates = tuple(policies) or (fallback,)
    hosts, filtering = filter_hosts_by_policies(next_hop.hosts, candidates)
    decision = combine_policies(candidates, fallback)
    return DestinationPlan(next_hop, candidates, fallback, decision, hosts, filtering, rank_policies(candidates))


@dataclass(frozen=True, slots=True)
class HostGate:
    """May this host be dialled under its policy? The TLS outcomes to record either way, and the failure."""

    reports: tuple[TlsReport, ...] = ()
    failure: AttemptFailure | None = None
    note: str = ""


def host_gate(decision: TlsDecision, host: HopHost, enforce_hp: HostPolicy, report_hp: HostPolicy) -> HostGate:
    """A host the governing policy marks unusable (bogus TLSA, mandatory DANE without usable records, a policy
    that could not be established, address lookups that all failed) is skipped; a report-only policy's objection
    is recorded and the host is still dialled. A host without a failure type records no TLS outcome (no TLS was
    attempted, e.g. its address lookups failed)."""
    reports: list[TlsReport] = []
    for hp, pol in ((enforce_hp, decision.enforce), (report_hp, decision.policy)):
        if hp.usable:
            continue
        if hp.failure is not None:
            reports.append(TlsReport(False, hp.failure, hp.detail or f"{pol.source}: host unusable"))
        if pol is decision.enforce:
            status = pol.status_for(hp.failure) if hp.failure is not None else "4.4.3"
            why = hp.failure or hp.detail or "host unusable"
            return HostGate(
                tuple(reports),
                AttemptFailure(local_reply(451, status, f"{host.name}: {pol.source} policy: {why}"), status),
                f"{host.name}: unusable under the {pol.source} policy ({hp.detail or hp.failure})",
            )
    return HostGate(tuple(reports))


REQUIRETLS_STATUS = "5.7.30"  # RFC 8689 §6: "REQUIRETLS support required"


def requiretls_failure(why: str) -> AttemptFailure:
    """The one failure of a REQUIRETLS message that cannot travel as RFC 8689 asks: permanent (the message
    bounces; it is never retried in the clear)."""
    return AttemptFailure(local_reply(550, REQUIRETLS_STATUS, why), REQUIRETLS_STATUS, permanent=True)


def requiretls_gate(requiretls: bool, decision: TlsDecision, host: HopHost, enforce_hp: HostPolicy) -> HostGate:
    """RFC 8689 §4.2.1: a REQUIRETLS message goes only to a host whose certificate the enforced policy verifies
    (DANE, MTA-STS ``enforce``, or the connector's ``certificate_validation``/``domain_validation``). A host
    governed by anything weaker (opportunistic, ``encryption_only``, MTA-STS ``testing`` alone) is not dialled
    for it."""
    if not requiretls or enforce_hp.level >= TlsLevel.VERIFY:
        return HostGate()
    why = (
        f"{host.name}: REQUIRETLS: no policy authenticates this host ({decision.enforce.source} demands only"
        f" {enforce_hp.level.name})"
    )
    return HostGate(failure=requiretls_failure(why), note=why)


def no_address(host: HopHost) -> AttemptFailure:
    return AttemptFailure(local_reply(451, "4.4.4", f"{host.name}: no usable address"), "4.4.4")


def connect_failed(where: str, error: object) -> AttemptFailure:
    return AttemptFailure(local_reply(451, "4.4.1", f"{where}: {error}"), "4.4.1")


def connection_lost(where: str, error: object) -> AttemptFailure:
    return AttemptFailure(local_reply(451, "4.4.2", f"{where}: {error}"), "4.4.2")


# ============================================================================================================
# one connection
# ============================================================================================================


@dataclass(frozen=True, slots=True)
class AttemptPlan:
    """The decisions of one connection to one address of a host, under that host's policy.

    :param where: ``host[address]:port`` for replies and steps.
    :param decision: the per-host decision (governing policy and the one enforced).
    :param enforce_hp: the enforced policy's refinement for this host (level, SNI, reference identifiers).
    :param report_hp: the deciding policy's refinement (differs when that policy is report-only).
    :param auth: the connector sends AUTH credentials (only ever under TLS).
    :param cleartext: this connection retries without STARTTLS after a failed opportunistic handshake.
    """

    where: str
    decision: TlsDecision
    enforce_hp: HostPolicy
    report_hp: HostPolicy
    auth: bool = False
    cleartext: bool = False

    @property
    def level(self) -> TlsLevel:
        return self.enforce_hp.level

    def _tls_status(self, result: TlsRptResult | None, default: str = "4.7.5") -> str:
        return self.decision.enforce.status_for(result, default)

    # -- the steps, in order ------------------------------------------------------------------------------

    def greeting(self, banner: ReplyLike) -> Decision | None:
        """``None``: carry on with EHLO."""
        if banner.code != 220:
            return Fail(
                AttemptFailure(f"{banner} (greeting from {self.where})", banner.status, remote=True),
                note=f"{self.where}: greeting {banner}",
            )
        return None

    def ehlo(self, reply: ReplyLike, capabilities: Capabilities) -> Decision:
        """After the first EHLO: STARTTLS when the level asks for TLS and the peer offers it."""
        if reply.code != 250:
            return Fail(AttemptFailure(f"{reply} (EHLO/HELO at {self.where})", reply.status, remote=True))
        if self.level < TlsLevel.MAY or self.cleartext:
            return self.ready(tls=False)
        if capabilities.supports("STARTTLS"):
            return Next(Step.STARTTLS)
        report = TlsReport(False, TlsRptResult.STARTTLS_NOT_SUPPORTED, "STARTTLS not offered")
        if self.level >= TlsLevel.ENCRYPT:
            status = self._tls_status(TlsRptResult.STARTTLS_NOT_SUPPORTED, "4.7.4")
            why = f"{self.where} does not offer STARTTLS (required by {self.decision.enforce.source})"
            return Fail(
                AttemptFailure(local_reply(451, status, why), status),
                report,
                f"{self.where}: STARTTLS not offered; TLS is required",
            )
        return self._then(
            self.ready(tls=False),
            report,
            f"{self.where}: STARTTLS not offered; continuing in cleartext (opportunistic)",
        )

    def starttls(self, reply: ReplyLike | None, error: str | None = None) -> Decision:
        """After STARTTLS: ``error`` when the handshake (or the connection) failed, else the server's reply."""
        if error is not None:
            report = TlsReport(False, TlsRptResult.VALIDATION_FAILURE, error)
            if self.level == TlsLevel.MAY:
                return Next(
                    Step.RETRY_CLEARTEXT,
                    report,
                    f"{self.where}: {error}; retrying in cleartext (opportunistic)",
                )
            return Fail(
                AttemptFailure(local_reply(451, "4.7.5", f"{self.where}: {error}"), "4.7.5"),
                report,
                f"{self.where}: {error}",
            )
        assert reply is not None
        if reply.code == 220:
            return Next(Step.VERIFY)
        report = TlsReport(False, TlsRptResult.STARTTLS_NOT_SUPPORTED, f"STARTTLS: {reply}")
        if self.level >= TlsLevel.ENCRYPT:
            status = self._tls_status(TlsRptResult.STARTTLS_NOT_SUPPORTED, "4.7.4")
            return Fail(
                AttemptFailure(local_reply(451, status, f"{self.where} refused STARTTLS: {reply}"), status), report
            )
        return self._then(self.ready(tls=False), report, f"{self.where}: STARTTLS refused; continuing in cleartext")

    def needs_verification(self) -> tuple[bool, bool]:
        """(ask ``on_tls_verify`` for the enforced policy, ask it for the report-only deciding policy)."""
        return (
            self.enforce_hp.level >= TlsLevel.VERIFY,
            self.decision.report_only and self.report_hp.level >= TlsLevel.VERIFY,
        )

    def verified(self, verdict: Verdict) -> Decision:
        """After the verification hooks (see :func:`judge`): one TLS outcome, then EHLO again or the failure."""
        v = verdict.verification
        note = (
            f"{self.where}: peer {v.label}"
            + (f" ({v.matched})" if v.matched else "")
            + (f": {v.detail}" if v.detail else "")
        )
        failure = verdict.failure
        report = TlsReport(
            failure is None,
            failure.result_type if failure is not None else None,
            failure.detail if failure is not None else "",
            v,
        )
        if not verdict.ok:
            result_type = failure.result_type if failure is not None else None
            status = self._tls_status(result_type)
            why = result_type or "verification failed"
            return Fail(
                AttemptFailure(local_reply(451, status, f"{self.where}: TLS peer verification failed ({why})"), status),
                report,
                note,
            )
        return Next(Step.EHLO_AGAIN, report, note)

    def ehlo_again(self, reply: ReplyLike) -> Decision:
        if reply.code != 250:
            return Fail(AttemptFailure(f"{reply} (EHLO after STARTTLS at {self.where})", reply.status, remote=True))
        return self.ready(tls=True)

    def ready(self, *, tls: bool) -> Decision:
        """TLS settled (or not used): never send under cleartext when TLS is required; AUTH only under TLS."""
        if self.level >= TlsLevel.ENCRYPT and not tls:
            return Fail(AttemptFailure(local_reply(451, "4.7.4", f"{self.where}: TLS required"), "4.7.4"))
        if self.auth:
            if not tls:
                return Fail(
                    AttemptFailure(
                        local_reply(451, "4.7.10", f"{self.where}: not sending AUTH credentials without TLS"), "4.7.10"
                    ),
                    note=f"{self.where}: AUTH configured but the session is not encrypted",
                )
            return Next(Step.AUTH)
        return Next(Step.SEND)

    def authenticated(self, reply: ReplyLike) -> Decision:
        if reply.code != 235:
            return Fail(AttemptFailure(f"{reply} (AUTH at {self.where})", reply.status, remote=True))
        return Next(Step.SEND)

    @staticmethod
    def _then(decision: Decision, report: TlsReport, note: str) -> Decision:
        """``decision`` with a TLS outcome and a note of the step that led to it."""
        if isinstance(decision, Next):
            return Next(decision.step, report, note)
        return Fail(decision.failure, report, f"{note}; {decision.note}" if decision.note else note)


def judge(plan: AttemptPlan, enforced: PeerVerification | None, reported: PeerVerification | None) -> Verdict:
    """The answers of ``on_tls_verify`` (``None``: nobody answered, or not asked) combined: the enforced policy's
    failure stops the message; a report-only policy's failure is reported only. A policy that demanded
    verification and got no answer fails (never "verified" by default)."""
    enforce_asked, report_asked = plan.needs_verification()
    decision = plan.decision
    verification: PeerVerification | None = None
    failure: PeerVerification | None = None
    ok = True
    if enforce_asked:
        verification = enforced or _nobody(decision.enforce.source)
        if not verification.ok:
            ok = False
            failure = verification
    if report_asked:
        got = reported or _nobody(decision.policy.source)
        if not got.ok and failure is None:
            failure = got
        verification = verification or got
    if verification is None:
        verification = PeerVerification(True, "untrusted", detail="encrypted, peer not authenticated")
    return Verdict(ok, verification, failure)


def _nobody(source: str) -> PeerVerification:
    return PeerVerification(
        False, "untrusted", TlsRptResult.VALIDATION_FAILURE, detail=f"nobody verified for policy source {source!r}"
    )


# ============================================================================================================
# the transaction, and the destination's verdict
# ============================================================================================================


def transaction_params(
    message: OutgoingMessage, capabilities: Capabilities, where: str, *, verified_tls: bool = False
) -> tuple[list[str], AttemptFailure | None]:
    """MAIL FROM parameters for ``message`` on a session with ``capabilities`` (SIZE, 8BITMIME, SMTPUTF8, DSN's
    RET/ENVID, REQUIRETLS), or the permanent failure when the peer cannot take it (too large, SMTPUTF8 or
    8BITMIME needed but not offered; a REQUIRETLS message on a session that is not TLS with an authenticated
    peer (``verified_tls``), or to a peer that does not offer REQUIRETLS: 5.7.30)."""
    if message.requiretls:
        if not verified_tls:
            return [], requiretls_failure(f"{where}: REQUIRETLS: the session is not TLS with an authenticated peer")
        if not capabilities.supports("REQUIRETLS"):
            return [], requiretls_failure(f"{where} does not offer REQUIRETLS, which this message requires")
    limit = capabilities.size_limit
    utf8 = needs_smtputf8(message)
    eight = needs_8bitmime(message)
    unmet = [
        (code, status, why)
        for needed, code, status, why in (
            (
                limit is not None and len(message.data) > limit,
                552,
                "5.3.4",
                f"message size {len(message.data)} exceeds the limit of {where} ({limit})",
            ),
            (
                utf8 and not capabilities.supports("SMTPUTF8"),
                553,
                "5.6.7",
                f"{where} does not support SMTPUTF8, which this message needs",
            ),
            (
                eight and not capabilities.supports("8BITMIME"),
                554,
                "5.6.3",
                f"{where} does not support 8BITMIME, which this message needs",
            ),
        )
        if needed
    ]
    if unmet:
        code, status, why = unmet[0]
        return [], AttemptFailure(local_reply(code, status, why), status, permanent=True)
    params: list[str] = []
    if capabilities.supports("SIZE"):
        params.append(f"SIZE={len(message.data)}")
    if eight:
        params.append("BODY=8BITMIME")
    if utf8:
        params.append("SMTPUTF8")
    if capabilities.supports("DSN"):
        if message.dsn_ret is not None:
            params.append(f"RET={message.dsn_ret.value}")
        if message.envid:
            params.append(f"ENVID={xtext_encode(message.envid)}")
    if message.requiretls:
        params.append("REQUIRETLS")
    return params, None


def rcpt_params(message: OutgoingMessage, capabilities: Capabilities) -> tuple[tuple[str, ...], ...]:
    """Each recipient's RCPT parameters: its NOTIFY and ORCPT when the peer offers DSN (RFC 3461 §4.1, §4.2),
    with an ORCPT added when the sender gave none (§4.2 recommends it; ASCII addresses only); none otherwise."""
    if not capabilities.supports("DSN"):
        return tuple(() for _ in message.recipients)
    out: list[tuple[str, ...]] = []
    for i, rcpt in enumerate(message.recipients):
        dsn = message.recipient_dsn[i] if i < len(message.recipient_dsn) else None
        params: list[str] = []
        if dsn is not None and dsn.notify is not None:
            params.append("NOTIFY=" + ",".join(n.value for n in DsnNotify if n in dsn.notify))
        if dsn is not None and dsn.orcpt is not None:
            params.append(f"ORCPT={dsn.orcpt[0]};{xtext_encode(dsn.orcpt[1])}")
        elif rcpt.isascii():
            params.append(f"ORCPT=rfc822;{xtext_encode(rcpt)}")
        out.append(tuple(params))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class DestinationVerdict:
    result: str  # FAILED | DEFERRED
    reply: str
    status: str
    remote: bool = False


def final_verdict(failures: Sequence[AttemptFailure]) -> DestinationVerdict:
    """No host took the message: failed when every failure was permanent (the last one's reply), else deferred
    with the last transient reply (a permanent-looking reply of one host while others failed transiently is
    turned into a 451)."""
    if failures and all(f.permanent for f in failures):
        last = failures[-1]
        return DestinationVerdict(FAILED, last.reply, last.status, last.remote)
    transient = next((f for f in reversed(failures) if not f.permanent), None)
    if transient is None:
        return DestinationVerdict(DEFERRED, local_reply(451, "4.4.1", "no host could be reached"), "4.4.1")
    reply, status = transient.reply, transient.status
    if reply[:1] == "5":
        reply, status = local_reply(451, "4.4.1", reply), "4.4.1"
    return DestinationVerdict(DEFERRED, reply, status)
