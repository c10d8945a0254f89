"""TLS-RPT (RFC 8460) without I/O: policy records, aggregation keys, the report document, its file name and mail
message (the lenient parser for reports other senders deliver to us is :mod:`~mxgate.plugins.tlsrpt.parse`).

Everything here is pure (bytes and records in, bytes and records out) so it is tested without sockets; the agent in
:mod:`~mxgate.plugins.tlsrpt.collect`, :mod:`~mxgate.plugins.tlsrpt.send` and :mod:`~mxgate.plugins.tlsrpt.receive`
do the storing, DNS, HTTPS and queueing.
"""

from __future__ import annotations

import base64
import email
import email.message
import email.policy
import gzip
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, make_msgid
from typing import Any
from urllib.parse import unquote, urlsplit

from mxgate import PolicyType, TlsOutcome, TlsRptResult

__all__ = [
    "FailureKey",
    "PolicyAggregate",
    "PolicyKey",
    "TlsRptRecord",
    "build_mail",
    "build_report",
    "day_bounds",
    "gzip_report",
    "keys_for_outcome",
    "parse_tlsrpt_record",
    "report_filename",
    "report_subject",
]

#: ``failure-reason-code`` and ``additional-information`` are cut to this many characters.
MAX_TEXT = 256
#: Failure-detail groups per policy in one report; the rest are folded into their counts only.
MAX_FAILURE_GROUPS = 1000

MEDIA_TYPE_GZIP = "application/tlsrpt+gzip"
MEDIA_TYPE_JSON = "application/tlsrpt+json"


# -- the policy record: _smtp._tls.<domain> TXT (RFC 8460 section 3) --------------------------------------------

_EXT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
_EXT_VALUE = re.compile(r"^[\x21-\x3a\x3c\x3e-\x7e]+\Z")
_FIELD_DELIM = re.compile(r"[ \t]*;[ \t]*")
_URI_DELIM = re.compile(r"[ \t]*,[ \t]*")
_VERSION = "v=TLSRPTv1"


@dataclass(frozen=True, slots=True)
class TlsRptRecord:
    """A valid TLS-RPT record: where reports go. ``rua`` keeps the published order; only ``mailto:`` and
    ``https:`` URIs are kept (others are ignored, as RFC 8460 lets a sender do)."""

    rua: tuple[str, ...]
    ignored: tuple[str, ...] = ()  # URIs of other schemes, or malformed ones

    @property
    def mailto(self) -> tuple[str, ...]:
        """Mailbox addresses of the ``mailto:`` URIs (percent-decoded, without ``?headers``)."""
        out: list[str] = []
        for uri in self.rua:
            if uri.lower().startswith("mailto:"):
                out.extend(_mailto_addresses(uri))
        return tuple(out)

    @property
    def https(self) -> tuple[str, ...]:
        return tuple(u for u in self.rua if u.lower().startswith("https:"))


def _mailto_addresses(uri: str) -> list[str]:
    body = uri[len("mailto:") :].split("?", 1)[0]
    found = []
    for part in unquote(body).split(","):
        addr = part.strip()
        local, at, domain = addr.rpartition("@")
        if at and local and domain and " " not in addr and "<" not in addr:
            found.append(addr)
    return found


def _valid_uri(uri: str) -> bool:
    """A ``mailto:`` with at least one address or an ``https:`` URI with a host. RFC 8460 §3: commas and
    exclamation points in a URI MUST be percent-encoded, so a literal ``!`` makes the URI unusable."""
    if "!" in uri:
        return False
    lowered = uri.lower()
    if lowered.startswith("mailto:"):
        return bool(_mailto_addresses(uri))
    if lowered.startswith("https:"):
        try:
            parts = urlsplit(uri)
        except ValueError:
            return False
        return parts.scheme.lower() == "https" and bool(parts.hostname)
    return False


def _parse_one(text: str) -> TlsRptRecord | None:
    """One TXT record (strings already joined). ``None`` when it is not a valid TLSRPTv1 record."""
    fields = _FIELD_DELIM.split(text)
    if fields[0] != _VERSION:
        return None
    if fields[-1] == "" and len(fields) > 1:  # a trailing delimiter is allowed
        fields = fields[:-1]
    if len(fields) < 2:
        return None
    rua: list[str] = []
    for item in fields[1:]:
        name, eq, value = item.partition("=")
        if not eq or not value:
            return None
        if name == "rua":
            uris = _URI_DELIM.split(value)
            if any(not u or any(c in u for c in " \t") for u in uris):
                return None
            rua.extend(u for u in uris if u not in rua)  # repeated rua= fields merge (RFC-CHECKLIST 26)
        elif not _EXT_NAME.match(name) or not _EXT_VALUE.match(value):
            return None
    if not rua:
        return None  # rua is required
    good = tuple(u for u in rua if _valid_uri(u))
    bad = tuple(u for u in rua if not _valid_uri(u))
    return TlsRptRecord(good, bad)


def parse_tlsrpt_record(records: Iterable[str | bytes | Sequence[str | bytes]]) -> TlsRptRecord | None:
    """RFC 8460 section 3: from the TXT records at ``_smtp._tls.<domain>`` pick the ones that begin with
    ``v=TLSRPTv1;``; unless exactly one remains and it is valid (``rua`` present, syntax per the ABNF), the domain
    does not take reports: ``None``. A record given as several strings is concatenated without spaces; several
    ``rua=`` fields are merged (in order, duplicates once).
    """
    candidates: list[str] = []
    for rec in records:
        if isinstance(rec, str | bytes):
            parts: Sequence[str | bytes] = [rec]
        else:
            parts = rec
        text = "".join(p.decode("utf-8", "replace") if isinstance(p, bytes) else p for p in parts)
        if re.match(r"^v=TLSRPTv1[ \t]*;", text):
            candidates.append(text)
    if len(candidates) != 1:
        return None
    return _parse_one(candidates[0])


# -- aggregation keys (RFC 8460 section 4.3/4.4 grouping) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyKey:
    """One ``policies[]`` entry of one day's report for one policy domain."""

    day: str  # YYYY-MM-DD (UTC)
    domain: str
    policy_type: str
    policy_strings: tuple[str, ...] = ()
    mx_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FailureKey:
    """One ``failure-details[]`` group: sessions that failed the same way between the same endpoints. Empty
    strings stand for absent fields."""

    result_type: str
    sending_ip: str = ""
    mx_hostname: str = ""
    mx_helo: str = ""
    receiving_ip: str = ""
    additional_info: str = ""
    reason_code: str = ""


def norm_domain(name: str) -> str:
    return name.strip().rstrip(".").lower()


def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).date().isoformat()


def keys_for_outcome(outcome: TlsOutcome, *, at: float | None = None) -> tuple[PolicyKey, FailureKey | None]:
    """Where one TLS outcome is counted: its policy entry, and for a failure its failure-details group.

    ``mx-host`` is the policy's MX patterns for ``sts`` and the MX host reported on for ``tlsa`` (RFC 8460 4.3).
    A failure without a result type is a ``validation-failure`` (the RFC's catch-all).
    """
    when = outcome.at or at or 0.0
    ptype = str(outcome.policy_type)
    if outcome.policy_type is PolicyType.STS:
        mx: tuple[str, ...] = tuple(outcome.mx_patterns)
    elif outcome.policy_type is PolicyType.TLSA and outcome.mx_host:
        mx = (norm_domain(outcome.mx_host),)
    else:
        mx = ()
    strings = tuple(outcome.policy_strings) if outcome.policy_type is not PolicyType.NO_POLICY else ()
    key = PolicyKey(utc_day(when), norm_domain(outcome.policy_domain), ptype, strings, mx)
    if outcome.success:
        return key, None
    result = outcome.result_type or TlsRptResult.VALIDATION_FAILURE
    failure = FailureKey(
        result_type=str(result),
        sending_ip=outcome.sending_ip or "",
        mx_hostname=norm_domain(outcome.mx_host) if outcome.mx_host else "",
        mx_helo=outcome.receiving_helo or "",
        receiving_ip=outcome.receiving_ip or "",
        reason_code=" ".join(outcome.detail.split())[:MAX_TEXT],
    )
    return key, failure


@dataclass(frozen=True, slots=True)
class PolicyAggregate:
    key: PolicyKey
    success: int
    failure: int
    failures: tuple[tuple[FailureKey, int], ...] = ()


# -- the report we send (RFC 8460 section 4) ----------------------------------------------------------------------


def day_bounds(day: str | date) -> tuple[int, int]:
    """The first and the last second of a UTC day, as unix times: ``(00:00:00, 23:59:59)``."""
    d = date.fromisoformat(day) if isinstance(day, str) else day
    start = int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp())
    return start, start + 86399


def _rfc3339(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _policy_json(agg: PolicyAggregate) -> dict[str, Any]:
    policy: dict[str, Any] = {"policy-type": agg.key.policy_type}
    if agg.key.policy_strings:
        policy["policy-string"] = list(agg.key.policy_strings)
    policy["policy-domain"] = agg.key.domain
    if agg.key.mx_hosts:
        policy["mx-host"] = list(agg.key.mx_hosts)
    entry: dict[str, Any] = {
        "policy": policy,
        "summary": {
            "total-successful-session-count": agg.success,
            "total-failure-session-count": agg.failure,
        },
    }
    details = []
    ordered = sorted(agg.failures, key=lambda fc: (-fc[1], fc[0].result_type, fc[0].mx_hostname, fc[0].receiving_ip))
    for fk, count in ordered[:MAX_FAILURE_GROUPS]:
        d: dict[str, Any] = {"result-type": fk.result_type}
        if fk.sending_ip:
            d["sending-mta-ip"] = fk.sending_ip
        if fk.mx_hostname:
            d["receiving-mx-hostname"] = fk.mx_hostname
        if fk.mx_helo:
            d["receiving-mx-helo"] = fk.mx_helo
        if fk.receiving_ip:
            d["receiving-ip"] = fk.receiving_ip
        d["failed-session-count"] = count
        if fk.additional_info:
            d["additional-information"] = fk.additional_info
        if fk.reason_code:
            d["failure-reason-code"] = fk.reason_code
        details.append(d)
    if details:
        entry["failure-details"] = details
    return entry


def build_report(
    *,
    organization_name: str,
    contact_info: str,
    report_id: str,
    day: str,
    policies: Sequence[PolicyAggregate],
) -> dict[str, Any]:
    """The JSON document of RFC 8460 section 4 for one policy domain and one full UTC day."""
    start, end = day_bounds(day)
    ordered = sorted(policies, key=lambda p: (p.key.policy_type, p.key.policy_strings, p.key.mx_hosts))
    return {
        "organization-name": organization_name,
        "date-range": {"start-datetime": _rfc3339(start), "end-datetime": _rfc3339(end)},
        "contact-info": contact_info,
        "report-id": report_id,
        "policies": [_policy_json(p) for p in ordered],
    }


def report_json_bytes(report: Mapping[str, Any]) -> bytes:
    return json.dumps(report, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def gzip_report(report: Mapping[str, Any]) -> bytes:
    """The report as sent: compact JSON, gzip-compressed, with a fixed mtime (same report, same bytes)."""
    return gzip.compress(report_json_bytes(report), mtime=0)


def report_filename(submitter: str, policy_domain: str, day: str, unique_id: str | None = None) -> str:
    """RFC 8460 section 5.1: ``sender!policy-domain!begin-timestamp!end-timestamp[!unique-id].json.gz``."""
    start, end = day_bounds(day)
    uid = f"!{unique_id}" if unique_id else ""
    if unique_id is not None and not unique_id.isalnum():
        raise ValueError("unique-id must be letters and digits")
    return f"{norm_domain(submitter)}!{norm_domain(policy_domain)}!{start}!{end}{uid}.json.gz"


def report_subject(policy_domain: str, submitter: str, report_id: str) -> str:
    """RFC 8460 section 5.3: ``Report Domain: <d> Submitter: <s> Report-ID: <msg-id>``."""
    return f"Report Domain: {policy_domain} Submitter: {submitter} Report-ID: <{report_id}>"


DKIM_SIGNED_HEADERS = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "TLS-Report-Domain",
    "TLS-Report-Submitter",
    "TLS-Required",
)


def build_mail(
    *,
    from_addr: str,
    to_addrs: Sequence[str],
    policy_domain: str,
    submitter: str,
    report_id: str,
    filename: str,
    gz: bytes,
    now: float,
) -> bytes:
    """The report as an RFC 8460 section 5.3 message: ``multipart/report; report-type="tlsrpt"``, a short text
    part and the gzip attachment; ``TLS-Report-Domain``, ``TLS-Report-Submitter`` and ``TLS-Required: No``
    (RFC 8689: deliver it even when the recipient's TLS policy fails). CRLF line ends, not yet DKIM-signed."""
    msg = MIMEMultipart("report", report_type="tlsrpt")
    msg["From"] = from_addr
    msg["To"] = ", ".join(to_addrs)
    msg["Subject"] = report_subject(policy_domain, submitter, report_id)
    msg["Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
    msg["Message-ID"] = make_msgid("tlsrpt", domain=submitter)
    msg["TLS-Report-Domain"] = policy_domain
    msg["TLS-Report-Submitter"] = submitter
    msg["TLS-Required"] = "No"
    msg.preamble = "This is a multipart message in MIME format."
    msg.attach(MIMEText(f"This is an aggregate TLS report from {submitter}\n", "plain", "us-ascii"))
    part = MIMEApplication(gz, "tlsrpt+gzip")
    part.add_header("Content-Disposition", "attachment", filename=filename)
    msg.attach(part)
    return msg.as_bytes(policy=email.policy.SMTP)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def parse_message_headers(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)
