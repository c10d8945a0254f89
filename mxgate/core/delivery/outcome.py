"""The :class:`~mxgate.core.outcomes.TlsOutcome` of one TLS attempt, built from the policy decision, the
session (peer address, EHLO name, negotiated version and cipher) and the attempt's report. The driver passes it to
``on_tls_outcome`` (TLS-RPT, metrics)."""

from __future__ import annotations

from mxgate.core.delivery.plan import TlsReport
from mxgate.core.delivery.policy import TlsDecision
from mxgate.core.outcomes import HopHost, TlsOutcome
from mxgate.core.smtp.client import SmtpClient

__all__ = ["tls_outcome"]


def tls_outcome(
    connector: str,
    decision: TlsDecision,
    client: SmtpClient | None,
    host: HopHost | None,
    report: TlsReport,
    queue_id: str | None,
    at: float,
) -> TlsOutcome:
    """The record of one TLS attempt (or of a policy failure before any, ``client``/``host`` None) that
    ``on_tls_outcome`` gets: TLS-RPT and metrics aggregate these."""
    policy = decision.policy
    hp = policy.for_host(host.name) if host is not None else None
    policy_domain = (hp.policy_domain if hp is not None else None) or policy.policy_domain
    policy_strings = hp.policy_strings if hp is not None and hp.policy_strings is not None else None
    success, result, detail, verification = report.success, report.result, report.detail, report.verification
    version = cipher = None
    peer_ip = sending_ip = helo = None
    if client is not None:
        peer_ip = client.host
        sending_ip = client.local_address[0] if client.local_address else None
        helo = client.peer_ehlo_name
        obj = client.ssl_object
        if obj is not None:
            version = obj.version()
            c = obj.cipher()
            cipher = c[0] if c else None
    outcome = TlsOutcome(
        connector=connector,
        policy_type=policy.policy_type,
        policy_domain=policy_domain,
        success=success,
        mx_host=host.name if host is not None else None,
        receiving_ip=peer_ip,
        receiving_helo=helo,
        sending_ip=sending_ip,
        tls_version=version,
        cipher=cipher,
        verification=verification.label if verification is not None else None,
        matched=verification.matched if verification is not None else None,
        result_type=result,
        policy_strings=policy_strings if policy_strings is not None else policy.policy_strings,
        mx_patterns=policy.mx_patterns,
        detail=detail,
        at=at,
        queue_id=queue_id,
    )
    return outcome


# -- helpers -------------------------------------------------------------------------------------------
