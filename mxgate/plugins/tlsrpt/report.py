"""TLS-RPT (RFC 8460) without I/O: policy records, aggregation keys, the report document, its file name and mail
message, and the lenient parser for reports other senders deliver to us.

Everything here is pure (bytes and records in, bytes and records out) so it is tested without sockets; the agent in
:mod:`~mxgate.plugins.tlsrpt.collect`, :mod:`~mxgate.plugins.tlsrpt.send` and :mod:`~mxgate.plugins.tlsrpt.receive`
do the storing, DNS, HTTPS and queueing.
"""

from __future__ import annotations

import base64
import contextlib
import email
import email.message
import email.policy
import gzip
import json
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, make_msgid
from typing import Any
from urllib.parse import unquote, urlsplit

from mxgate import PolicyType, TlsOutcome, TlsRptResult

__all__ = [
    "MAX_REPORT_BYTES",
    "FailureKey",
    "PolicyAggregate",
    "PolicyKey",
    "ReceivedFailure",
    "ReceivedPolicy",
    "ReceivedReport",
    "ReportError",
    "ReportTooLarge",
    "TlsRptRecord",
    "build_mail",
    "build_report",
    "check_report_bounds",
    "day_bounds",
    "decode_report_bytes",
    "extract_report_from_mail",
    "gzip_report",
    "keys_for_outcome",
    "parse_datetime_lenient",
    "parse_received_report",
    "parse_tlsrpt_record",
    "report_filename",
    "report_subject",
]

#: Decompressed size above which an incoming report is refused (a gzip bomb guard).
MAX_REPORT_BYTES = 10 * 1024 * 1024
#: ``failure-reason-code`` and ``additional-information`` are cut to this many characters.
MAX_TEXT = 256
#: Failure-detail groups per policy in one report; the rest are folded into their counts only.
MAX_FAILURE_GROUPS = 1000

MEDIA_TYPE_GZIP = "application/tlsrpt+gzip"
MEDIA_TYPE_JSON = "application/tlsrpt+json"


class ReportError(ValueError):
    """An incoming report could not be read at all (not JSON, not an object, too large)."""


class ReportTooLarge(ReportError):
    """An incoming report over a limit: bytes (compressed or not), policies or failure-details."""


def check_report_bounds(document: object, *, max_policies: int, max_failure_details: int) -> None:
    """Refuse (:class:`ReportTooLarge`) a report with more policies or failure-details (all policies together)
    than we keep: counted before anything is parsed, so an oversized report costs no more than its JSON."""
    if not isinstance(document, dict):
        return
    policies = _as_list(_get(document, "policies"))
    if len(policies) > max_policies:
        raise ReportTooLarge(f"{len(policies)} policies in one report; at most {max_policies} accepted")
    details = sum(len(_as_list(_get(_as_dict(p), "failure-details"))) for p in policies)
    if details > max_failure_details:
        raise ReportTooLarge(f"{details} failure-details in one report; at most {max_failure_details} accepted")


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


def _norm_domain(name: str) -> str:
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
        mx = (_norm_domain(outcome.mx_host),)
    else:
        mx = ()
    strings = tuple(outcome.policy_strings) if outcome.policy_type is not PolicyType.NO_POLICY else ()
    key = PolicyKey(utc_day(when), _norm_domain(outcome.policy_domain), ptype, strings, mx)
    if outcome.success:
        return key, None
    result = outcome.result_type or TlsRptResult.VALIDATION_FAILURE
    failure = FailureKey(
        result_type=str(result),
        sending_ip=outcome.sending_ip or "",
        mx_hostname=_norm_domain(outcome.mx_host) if outcome.mx_host else "",
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
    return f"{_norm_domain(submitter)}!{_norm_domain(policy_domain)}!{start}!{end}{uid}.json.gz"


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


# -- reports others send us: lenient parsing (RFC-CHECKLIST 31) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReceivedFailure:
    result_type: str
    count: int
    sending_ip: str = ""
    receiving_mx: str = ""
    receiving_ip: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ReceivedPolicy:
    policy_type: str
    policy_domain: str
    success: int
    failure: int
    policy_strings: tuple[str, ...] = ()
    mx_hosts: tuple[str, ...] = ()
    failures: tuple[ReceivedFailure, ...] = ()


@dataclass(frozen=True, slots=True)
class ReceivedReport:
    organization: str
    contact: str
    report_id: str
    start: float | None
    end: float | None
    policies: tuple[ReceivedPolicy, ...]
    rejected: tuple[str, ...] = ()  # why policy entries were left out (no policy-domain, unknown policy-type)

    @property
    def success(self) -> int:
        return sum(p.success for p in self.policies)

    @property
    def failure(self) -> int:
        return sum(p.failure for p in self.policies)


_DT = re.compile(
    r"^\s*(\d{4})-(\d{2})-(\d{2})(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?\s*"
    r"(Z|z|UTC|GMT|[+-]\d{2}:?\d{2})?\s*$"
)


def parse_datetime_lenient(value: object) -> float | None:
    """RFC 3339 as real senders write it: with or without a zone (no zone: UTC), with a space instead of ``T``,
    fractions, a date alone, or a unix time. ``None`` for anything else (including empty)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        return None
    m = _DT.match(value)
    if not m:
        return None
    year, month, day, hour, minute, second, frac, zone = m.groups()
    try:
        dt = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0), tzinfo=UTC)
    except ValueError:
        return None
    ts = dt.timestamp() + (float("0." + frac) if frac else 0.0)
    if zone and zone[0] in "+-":
        digits = zone[1:].replace(":", "")
        offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
        ts -= (offset if zone[0] == "+" else -offset).total_seconds()
    return ts


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    return str(value)


def _count(value: object) -> int:
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, float):
        return max(0, int(value))
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return max(0, int(value.strip() or "0"))
    return 0


def _strings(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value.strip(),) if value.strip() else ()
    if isinstance(value, list):
        return tuple(s for s in (_text(v) for v in value) if s)
    return ()


def _get(obj: Mapping[str, Any], *names: str) -> Any:
    """First present key among ``names``, also tolerating ``_`` for ``-`` and any case."""
    lowered = {str(k).lower().replace("_", "-"): v for k, v in obj.items()}
    for n in names:
        if n in lowered:
            return lowered[n]
    return None


def _as_dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _as_list(value: object) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return [value]
    return []


_POLICY_TYPES = frozenset({"tlsa", "sts", "no-policy-found"})  # RFC 8460 §4.4


def parse_received_report(document: object) -> ReceivedReport:
    """Read a report leniently: missing or empty fields become ``""``/0, counts given as strings are read, an
    ``mx-host`` string becomes a one-element list, datetimes without a zone are UTC, ``policy-type`` in any case.

    Two things a report cannot do without (RFC 8460 §4.4): a policy entry with no ``policy-domain`` or a
    ``policy-type`` other than ``tlsa``, ``sts``, ``no-policy-found`` is left out (its reason goes to
    ``rejected``), never kept under an empty domain. Refused (:class:`ReportError`): a document that is not a
    JSON object, and one with policy entries of which none is usable."""
    if not isinstance(document, dict):
        raise ReportError("a TLS report must be a JSON object")
    date_range = _as_dict(_get(document, "date-range"))
    policies: list[ReceivedPolicy] = []
    rejected: list[str] = []
    entries = _as_list(_get(document, "policies"))
    for number, item in enumerate(entries, start=1):
        entry = _as_dict(item)
        pol = _as_dict(_get(entry, "policy"))
        policy_type = _text(_get(pol, "policy-type")).lower()
        policy_domain = _norm_domain(_text(_get(pol, "policy-domain")))
        if policy_type not in _POLICY_TYPES:
            rejected.append(f"policy {number}: policy-type {policy_type[:40]!r} is not tlsa, sts or no-policy-found")
            continue
        if not policy_domain:
            rejected.append(f"policy {number}: no policy-domain")
            continue
        summary = _as_dict(_get(entry, "summary"))
        failures = []
        for f in _as_list(_get(entry, "failure-details")):
            fd = _as_dict(f)
            failures.append(
                ReceivedFailure(
                    result_type=_text(_get(fd, "result-type")) or "unknown",
                    count=_count(_get(fd, "failed-session-count")),
                    sending_ip=_text(_get(fd, "sending-mta-ip")),
                    receiving_mx=_text(_get(fd, "receiving-mx-hostname")),
                    receiving_ip=_text(_get(fd, "receiving-ip")),
                    reason=_text(_get(fd, "failure-reason-code"))[:MAX_TEXT],
                )
            )
        failure_total = _count(_get(summary, "total-failure-session-count"))
        if not failure_total and failures:
            failure_total = sum(f.count for f in failures)
        policies.append(
            ReceivedPolicy(
                policy_type=policy_type,
                policy_domain=policy_domain,
                success=_count(_get(summary, "total-successful-session-count")),
                failure=failure_total,
                policy_strings=_strings(_get(pol, "policy-string")),
                mx_hosts=_strings(_get(pol, "mx-host")),
                failures=tuple(failures),
            )
        )
    if entries and not policies:
        raise ReportError("no usable policy in the report: " + "; ".join(rejected[:3]))
    return ReceivedReport(
        organization=_text(_get(document, "organization-name"))[:MAX_TEXT],
        contact=_text(_get(document, "contact-info"))[:MAX_TEXT],
        report_id=_text(_get(document, "report-id"))[:MAX_TEXT],
        start=parse_datetime_lenient(_get(date_range, "start-datetime")),
        end=parse_datetime_lenient(_get(date_range, "end-datetime")),
        policies=tuple(policies),
        rejected=tuple(rejected),
    )


def _gunzip_capped(data: bytes, limit: int) -> bytes:
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = d.decompress(data, limit + 1)
    if len(out) > limit or d.unconsumed_tail:
        raise ReportTooLarge(f"report larger than {limit} bytes when decompressed")
    return out


def decode_report_bytes(data: bytes, *, limit: int = MAX_REPORT_BYTES) -> Any:
    """gzip or plain JSON (sniffed, whatever the declared media type said) -> the JSON value."""
    raw = data.strip() if data[:2] != b"\x1f\x8b" else data
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = _gunzip_capped(raw, limit)
        except zlib.error as exc:
            raise ReportError(f"bad gzip data: {exc}") from exc
    elif len(raw) > limit:
        raise ReportTooLarge(f"report larger than {limit} bytes")
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ReportError(f"not JSON: {exc}") from exc


_REPORT_TYPES = {
    MEDIA_TYPE_GZIP,
    MEDIA_TYPE_JSON,
    "application/gzip",
    "application/x-gzip",
    "application/json",
    "application/octet-stream",
}


def extract_report_from_mail(data: bytes) -> bytes | None:
    """The report attachment of a mail (RFC 8460 5.3), leniently: the first part whose media type is
    ``application/tlsrpt+gzip`` / ``+json`` or a generic gzip/JSON/octet-stream type with a ``.json``/``.json.gz``
    file name. ``None`` when the message carries none."""
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    fallback: bytes | None = None
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type().lower()
        filename = (part.get_filename() or "").lower()
        if ctype not in _REPORT_TYPES and not filename.endswith((".json", ".json.gz")):
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        if ctype in (MEDIA_TYPE_GZIP, MEDIA_TYPE_JSON):
            return payload
        if fallback is None and (filename.endswith((".json", ".json.gz")) or ctype != "application/octet-stream"):
            fallback = payload
    return fallback


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def parse_message_headers(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)
