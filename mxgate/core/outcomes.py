"""Delivery-side records that hooks exchange: routes, next hops, TLS policies and outcomes, delivery reports.

TLS policy failures carry their RFC 8460 result type, so TLS-RPT and metrics only aggregate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mxgate.connectors.outbound import OutboundConnector


class TlsRptResult(StrEnum):
    """RFC 8460 section 4.3 result types."""

    STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
    CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
    CERTIFICATE_EXPIRED = "certificate-expired"
    CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
    VALIDATION_FAILURE = "validation-failure"
    TLSA_INVALID = "tlsa-invalid"
    DNSSEC_INVALID = "dnssec-invalid"
    DANE_REQUIRED = "dane-required"
    STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
    STS_POLICY_INVALID = "sts-policy-invalid"
    STS_WEBPKI_INVALID = "sts-webpki-invalid"


class PolicyType(StrEnum):
    """RFC 8460 policy-type."""

    TLSA = "tlsa"
    STS = "sts"
    NO_POLICY = "no-policy-found"


class TlsLevel(IntEnum):
    """What a policy demands of the TLS layer; higher is stricter."""

    NONE = 0  # no TLS (connector tls = "none")
    MAY = 1  # opportunistic: TLS when offered, no authentication, cleartext fallback allowed
    ENCRYPT = 2  # TLS required, peer not authenticated
    VERIFY = 3  # TLS required, chain verified (certificate_validation)
    SECURE = 4  # TLS required, chain and name verified (domain_validation, MTA-STS enforce, DANE)


@dataclass(frozen=True, slots=True)
class Route:
    """Where one recipient goes: an outbound connector, optionally with next hops overriding the connector's."""

    connector: str
    smart_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Destination:
    """One delivery job: a connector and the domain (or smart host set) its recipients share.

    ``connector`` is the outbound connector itself (its settings as configured), never a name to look up again.
    """

    connector: OutboundConnector
    domain: str  # the nexthop domain: the recipient domain, or the first smart host's name
    smart_hosts: tuple[str, ...] = ()  # empty: MX delivery


@dataclass(frozen=True, slots=True)
class HopHost:
    """One host to try, in order, with the DNSSEC status of how we found it."""

    name: str
    port: int
    preference: int = 0
    addresses: tuple[str, ...] = ()  # empty: resolve at connect time
    secure: bool = False  # the RRset(s) leading to this host validated (MX or CNAME chain, and the addresses)


@dataclass(frozen=True, slots=True)
class NextHop:
    """The resolved hosts for a destination, or why there are none."""

    destination: Destination
    hosts: tuple[HopHost, ...]
    kind: str  # "mx" | "implicit_mx" | "smart_host" | "null_mx" | "error"
    mx_secure: bool = False  # the MX RRset (implicit MX: its denial) is DNSSEC-secure (RFC 7672 section 2.2.1)
    error: str | None = None  # with kind "error": why (defer; never read as "no record")
    permanent: bool = False  # with kind "error"/"null_mx": bounce, not defer


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """A policy's refinement for one host of the next hop (DANE is decided per MX host, RFC 7672 2.2.3)."""

    level: TlsLevel
    usable: bool = True  # False: never connect to this host (e.g. bogus TLSA); try the next one or defer
    failure: TlsRptResult | None = None  # why the host is unusable, for the outcome record (None: no TLS outcome)
    # False: this policy has no opinion on this host (DANE for a host without secure TLSA): the next applicable
    # policy decides it. One host's refinement never changes another host's policy (RFC-CHECKLIST 37).
    applies: bool = True
    sni: str | None = None  # server name to send (DANE: the TLSA base domain); default: the host name
    reference_ids: tuple[str, ...] = ()  # names the certificate must carry (DANE-TA); default: the policy's
    detail: str = ""
    # TLS-RPT (RFC 8460 §4.4) for this host's outcomes, when they differ from the policy's: DANE reports each
    # host under its TLSA base domain, with that host's own records as policy-string
    policy_domain: str | None = None
    policy_strings: tuple[str, ...] | None = None
    data: object = field(default=None, compare=False)  # the plugin's per-host state (e.g. the TLSA RRset)


@dataclass(frozen=True, slots=True)
class TlsPolicy:
    """One plugin's opinion of how a destination must be reached. The core combines them: DANE > MTA-STS >
    connector (RFC 8461 section 2), the first applicable opinion of the highest ``precedence`` deciding."""

    source: str  # "dane", "mta_sts", "connector" or a plugin's name
    policy_type: PolicyType
    policy_domain: str
    level: TlsLevel
    precedence: int  # dane 300, mta_sts 200, connector 100
    applies: bool = True  # False: the plugin looked and found no policy (still reported, e.g. no-policy-found)
    report_only: bool = False  # MTA-STS "testing": verify and report, deliver anyway
    mx_patterns: tuple[str, ...] = ()  # MTA-STS: only MX hosts matching these may be used
    reference_ids: tuple[str, ...] = ()  # names the certificate must carry when level is SECURE
    policy_strings: tuple[str, ...] = ()  # for TLS-RPT policy-string
    failure: TlsRptResult | None = None  # the policy lookup itself failed: defer (unless report_only)
    detail: str = ""
    data: object = field(default=None, compare=False)  # the plugin's own policy object for on_tls_verify
    hosts: Mapping[str, HostPolicy] = field(default_factory=dict, compare=False)  # per-host refinements by name
    # enhanced status codes (permanent form, "5.7.323") this policy's failures are reported with, by result type;
    # deferrals use the 4.x.x form; unlisted results get 4.7.5 / 5.7.5 (RFC 3463 cryptographic failure)
    status_codes: Mapping[TlsRptResult, str] = field(default_factory=dict, compare=False)

    def status_for(self, result: TlsRptResult | None, default: str = "4.7.5") -> str:
        """The transient (4.x.x) enhanced code for a failure under this policy."""
        code = self.status_codes.get(result) if result is not None else None
        return "4" + code[1:] if code else default

    def for_host(self, host: str) -> HostPolicy:
        """The effective policy for one host: its refinement, or the policy-wide level."""
        found = self.hosts.get(host.lower().rstrip("."))
        return found if found is not None else HostPolicy(self.level, reference_ids=self.reference_ids)


@dataclass(frozen=True, slots=True)
class PeerVerification:
    """The answer of ``on_tls_verify``: did the peer prove it is the right one?"""

    ok: bool
    label: str  # "verified" (secure DNS/PKIX), "trusted" (insecure MX), "untrusted", "anonymous"
    result_type: TlsRptResult | None = None
    matched: str | None = None  # e.g. "3 1 1" (DANE) or the certificate name that matched
    detail: str = ""


@dataclass(frozen=True, slots=True)
class TlsOutcome:
    """One TLS attempt (or one policy failure before any attempt), as TLS-RPT and metrics see it.

    Reported through ``mxgate_delivery_on_tls_outcome``: by the core once per connection to an MX host (a session
    reused for further messages is not reported again), and once per policy failure before any connection (then
    every connection field is None); a policy plugin may report a failure of its own (MTA-STS: a failed policy
    fetch). The field names follow RFC 8460 section 4.4 (failure details) where there is one.
    """

    connector: str  # the outbound connector's name
    policy_type: PolicyType  # the governing policy's type: tlsa (DANE), sts (MTA-STS), no-policy-found
    policy_domain: str  # the domain the policy is for: the recipient domain, or the next-hop domain (smart hosts)
    # TLS was set up and the peer passed every verification asked for (RFC 8460 successful session); a failed
    # report-only policy (MTA-STS testing) is False here although the message still goes
    success: bool
    mx_host: str | None = None  # the host dialled (MX name or smart host); None: failed before any connection
    receiving_ip: str | None = None  # the peer's IP address; None without a connection
    receiving_helo: str | None = None  # the name the peer gave in its greeting/EHLO reply
    sending_ip: str | None = None  # our end of the connection
    tls_version: str | None = None  # e.g. "TLSv1.3"; None: no TLS session (refused, failed or cleartext)
    cipher: str | None = None  # the negotiated cipher suite (OpenSSL name); None without TLS
    verification: str | None = None  # PeerVerification.label: verified, trusted, untrusted, anonymous
    matched: str | None = None  # PeerVerification.matched: the TLSA record ("3 1 1") or certificate name matched
    result_type: TlsRptResult | None = None  # the RFC 8460 result type of a failure; None on success
    policy_strings: tuple[str, ...] = ()  # RFC 8460 policy-string: the TLSA records or the MTA-STS policy lines
    mx_patterns: tuple[str, ...] = ()  # RFC 8460 mx-host patterns of an MTA-STS policy (empty for others)
    detail: str = ""  # a human-readable explanation (RFC 8460 additional-information), "" when nothing to add
    at: float = 0.0  # unix time
    queue_id: str | None = None  # the queued message the attempt was made for (TLS-RPT: its own reports, §5.3)


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """The fate of one recipient after one attempt."""

    message_id: str  # queue id
    recipient: str
    connector: str
    result: str  # "delivered" | "deferred" | "failed"
    reply: str
    mx_host: str | None = None
    received_at: float = 0.0
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class ReportEvent:
    """A countable event for observers (metrics): a bounded ``kind`` and bounded label values, never addresses."""

    kind: str  # e.g. "connection", "message_rejected", "sts_fetch", "tlsrpt_sent"
    labels: tuple[tuple[str, str], ...] = ()
    value: float = 1.0

    def label(self, name: str, default: str = "") -> str:
        return next((v for k, v in self.labels if k == name), default)


@dataclass(frozen=True, slots=True)
class AttemptContext:
    """One connection attempt as ``on_tls_verify`` sees it (after the TLS handshake)."""

    connector: str
    destination: Destination
    next_hop: NextHop
    host: HopHost  # the MX or smart host dialled
    peer_ip: str
    peer_port: int
    sni: str | None  # the server name we sent
    peer_helo: str | None = None  # the name in the peer's banner / EHLO reply
    tls_version: str | None = None
    cipher: str | None = None
    mx_secure: bool = False  # the MX RRset was DNSSEC-secure (RFC 7672 §2.2.1)
    host_policy: HostPolicy | None = None  # the deciding policy's refinement for this host
    at: float = 0.0  # unix time of the attempt

    @property
    def host_secure(self) -> bool:
        return self.host.secure


class CalloutVerdict(StrEnum):
    ACCEPTED = "accepted"  # the next hop said 2xx to RCPT
    REJECTED = "rejected"  # it said 5xx to RCPT, or a delivery there would fail for good (no route, null MX)
    UNAVAILABLE = "unavailable"  # no answer about this recipient: unreachable, 4xx, MAIL refused, timeout


@dataclass(frozen=True, slots=True)
class CalloutResult:
    """What a callout learnt about one recipient."""

    recipient: str
    verdict: CalloutVerdict
    reply: str  # the next hop's reply ("550 5.1.1 ...") or our own account of what went wrong
    status: str  # RFC 3463 code of ``reply``
    connector: str | None = None
    host: str | None = None  # the host that answered
    remote: bool = False  # ``reply`` came from the next hop
