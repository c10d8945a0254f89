"""The DANE opinion (RFC 7672): per examined host a :class:`HostPolicy`, per destination a :class:`TlsPolicy` of
precedence 300 for the core to combine with MTA-STS and the connector. Decisions only: the DNS work is
:mod:`~mxgate.plugins.dane.examine`'s."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from mxgate import (
    ConnectorSetting,
    Destination,
    HostPolicy,
    NextHop,
    OutboundConnector,
    PolicyType,
    Resolver,
    SelfTestResult,
    TlsLevel,
    TlsPolicy,
    TlsRptResult,
)
from mxgate.plugins.dane.examine import HostDane, HostState, examine_host

__all__ = [
    "DANE_MODE",
    "DANE_PRECEDENCE",
    "DANE_STATUS",
    "DaneAnalysis",
    "DaneMode",
    "analyse",
    "dane_status",
    "host_policy",
]

DANE_MODE = ConnectorSetting(
    "outbound_connector",
    "dane",
    str,
    "opportunistic",
    "DANE (RFC 7672): none | opportunistic (use TLSA where published) | mandatory (no usable TLSA, no delivery).",
    ("none", "opportunistic", "mandatory"),
)

DANE_PRECEDENCE = 300  # RFC 8461 §2: DANE > MTA-STS (200) > connector (100)


class DaneMode(StrEnum):
    NONE = "none"
    OPPORTUNISTIC = "opportunistic"
    MANDATORY = "mandatory"

    @classmethod
    def of(cls, connector: OutboundConnector) -> DaneMode:
        """The connector's ``dane`` setting."""
        return cls(connector.get(DANE_MODE))


# Enhanced status codes (RFC 3463) per TLS-RPT result type, for DSNs when the retry schedule runs out (5.x.x) and
# for deferral texts while it runs (4.x.x, see dane_status). 5.7.321-5.7.325 are Exchange Online's DANE codes;
# 5.7.326-5.7.328 are mxgate's extension for the remaining RFC 8460 result types DANE can produce.
DANE_STATUS: dict[TlsRptResult, str] = {
    TlsRptResult.STARTTLS_NOT_SUPPORTED: "5.7.321",
    TlsRptResult.CERTIFICATE_EXPIRED: "5.7.322",
    TlsRptResult.TLSA_INVALID: "5.7.323",
    TlsRptResult.DNSSEC_INVALID: "5.7.324",
    TlsRptResult.CERTIFICATE_HOST_MISMATCH: "5.7.325",
    TlsRptResult.DANE_REQUIRED: "5.7.326",
    TlsRptResult.VALIDATION_FAILURE: "5.7.327",
    TlsRptResult.CERTIFICATE_NOT_TRUSTED: "5.7.328",
}


def dane_status(result: TlsRptResult | None, *, permanent: bool) -> str:
    """The enhanced status code for a DANE failure: ``5.7.3xx`` when giving up, ``4.7.3xx`` while retrying.

    Unknown or missing result types map to ``x.7.5`` (RFC 3463: cryptographic failure)."""
    code = DANE_STATUS.get(result, "5.7.5") if result is not None else "5.7.5"
    return code if permanent else "4" + code[1:]


def host_policy(hd: HostDane, mode: DaneMode) -> HostPolicy:
    """The :class:`HostPolicy` for one examined host.

    DANE governs the host (``applies``) when its address records and its TLSA RRset are secure (usable records
    or not), or when a lookup failed (the host is then unusable: never a downgrade because a query went
    unanswered). Otherwise, with opportunistic DANE, DANE has no opinion on this host (``applies=False``) and the
    next policy decides it (MTA-STS, else the connector); with mandatory DANE the host is unusable (RFC 7672 §6),
    and so is any host learnt from an insecure MX RRset (RFC 7672 §2.2.1: Postfix's "non DNSSEC destination")."""
    # TLS-RPT (RFC 8460 §4.4): a tlsa result's policy-domain is the host's TLSA base domain, its policy-string
    # that host's own records (not the destination's, nor every MX host's)
    domain, strings = hd.base_domain, tuple(r.text for r in hd.records)
    if hd.state is HostState.FAILED:
        return HostPolicy(
            TlsLevel.SECURE,
            usable=False,
            failure=hd.failure,
            detail=hd.detail,
            data=hd,
            policy_domain=domain,
            policy_strings=strings,
        )
    if mode is DaneMode.MANDATORY and not hd.name_secure:
        return HostPolicy(
            TlsLevel.SECURE,
            usable=False,
            failure=TlsRptResult.DANE_REQUIRED,
            detail=f"dane = mandatory needs a DNSSEC-secure MX RRset; {hd.host} came from an insecure one",
            data=hd,
            policy_domain=domain,
            policy_strings=strings,
        )
    if hd.state is HostState.DANE:
        return HostPolicy(
            TlsLevel.SECURE,
            sni=hd.base_domain,
            reference_ids=hd.reference_ids,
            detail=hd.detail,
            data=hd,
            policy_domain=domain,
            policy_strings=strings,
        )
    if hd.state is HostState.NO_USABLE:
        if mode is DaneMode.MANDATORY:
            return HostPolicy(
                TlsLevel.SECURE,
                usable=False,
                failure=TlsRptResult.TLSA_INVALID,
                detail=f"{hd.detail}; dane = mandatory needs a usable record",
                data=hd,
                policy_domain=domain,
                policy_strings=strings,
            )
        return HostPolicy(
            TlsLevel.ENCRYPT,
            sni=hd.base_domain,
            detail=hd.detail,
            data=hd,
            policy_domain=domain,
            policy_strings=strings,
        )
    if mode is DaneMode.MANDATORY:
        return HostPolicy(
            TlsLevel.SECURE,
            usable=False,
            failure=TlsRptResult.DANE_REQUIRED,
            detail=f"{hd.detail}; dane = mandatory",
            data=hd,
            policy_domain=domain,
            policy_strings=strings,
        )
    return HostPolicy(TlsLevel.MAY, applies=False, detail=f"DANE does not apply: {hd.detail}", data=hd)


@dataclass(frozen=True, slots=True)
class DaneAnalysis:
    """Everything DANE decided for a destination: per host, and the policy for the core (``None``: no opinion)."""

    mode: DaneMode
    hosts: tuple[HostDane, ...]
    policy: TlsPolicy | None
    detail: str = ""


async def analyse(
    resolver: Resolver,
    destination: Destination,
    next_hop: NextHop,
    *,
    mode: DaneMode,
    self_test: SelfTestResult | None = None,
) -> DaneAnalysis:
    """Examine every host of ``next_hop`` and build the DANE :class:`TlsPolicy` (precedence 300), with a
    :class:`HostPolicy` per host: DANE decides only the hosts it applies to (see :func:`host_policy`)."""
    domain = destination.domain.lower().rstrip(".")

    def policy(**kwargs: Any) -> TlsPolicy:
        return TlsPolicy(
            source="dane",
            policy_type=PolicyType.TLSA,
            policy_domain=domain,
            level=TlsLevel.SECURE,
            precedence=DANE_PRECEDENCE,
            status_codes=DANE_STATUS,
            **kwargs,
        )

    if mode is DaneMode.NONE:
        return DaneAnalysis(mode, (), None, "dane = none")
    if self_test is not None and not self_test.validating:
        why = f"DANE unavailable: {self_test.detail}"
        if mode is DaneMode.MANDATORY:
            return DaneAnalysis(mode, (), policy(failure=TlsRptResult.DNSSEC_INVALID, detail=why), why)
        return DaneAnalysis(mode, (), None, why)
    if mode is DaneMode.MANDATORY and next_hop.kind in ("mx", "implicit_mx") and not next_hop.mx_secure:
        # RFC 7672 §2.2.1: an attacker can forge an insecure MX RRset to name his own host with his own signed
        # TLSA records; mandatory DANE therefore needs the MX RRset itself to be secure (Postfix: dane-only defers
        # a "non DNSSEC destination", 4.7.5).
        what = "MX RRset" if next_hop.kind == "mx" else "MX denial (implicit MX)"
        why = f"dane = mandatory and the {what} of {domain} is not DNSSEC-secure"
        return DaneAnalysis(mode, (), policy(failure=TlsRptResult.DANE_REQUIRED, detail=why), why)
    hosts = tuple(await asyncio.gather(*(examine_host(resolver, h, next_hop) for h in next_hop.hosts)))
    per_host = {hd.host: host_policy(hd, mode) for hd in hosts}
    relevant = [hd for hd in hosts if hd.state in (HostState.DANE, HostState.NO_USABLE, HostState.FAILED)]
    if mode is DaneMode.OPPORTUNISTIC and not relevant:
        return DaneAnalysis(mode, hosts, None, "no host publishes secure TLSA records")
    strings = tuple(dict.fromkeys(r.text for hd in hosts for r in hd.records if hd.state is not HostState.NO_TLSA))
    failure: TlsRptResult | None = None
    detail = ", ".join(f"{hd.host}: {hd.state}" for hd in hosts)
    if mode is DaneMode.MANDATORY and not any(hd.state is HostState.DANE for hd in hosts):
        failed = next((hd for hd in hosts if hd.state is HostState.FAILED), None)
        failure = failed.failure if failed is not None and failed.failure else TlsRptResult.DANE_REQUIRED
        detail = f"dane = mandatory and no host has usable TLSA records ({detail})"
    return DaneAnalysis(
        mode,
        hosts,
        policy(hosts=per_host, policy_strings=strings, failure=failure, detail=detail, data=hosts),
        detail,
    )
