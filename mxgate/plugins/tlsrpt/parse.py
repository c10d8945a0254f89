"""Reports others send us, without I/O: decoding (gzip or plain JSON, bounded), the limits on a report's size, and
the lenient parser (RFC-CHECKLIST 31: zone-less datetimes, empty fields, unknown policy types left out).

Pure like :mod:`~mxgate.plugins.tlsrpt.report`, so it is tested (and fuzzed) without sockets; the receiver is
:mod:`~mxgate.plugins.tlsrpt.receive`.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from mxgate.plugins.tlsrpt.report import MAX_TEXT, MEDIA_TYPE_GZIP, MEDIA_TYPE_JSON, norm_domain

__all__ = [
    "MAX_REPORT_BYTES",
    "ReceivedFailure",
    "ReceivedPolicy",
    "ReceivedReport",
    "ReportError",
    "ReportTooLarge",
    "check_report_bounds",
    "decode_report_bytes",
    "extract_report_from_mail",
    "parse_datetime_lenient",
    "parse_received_report",
]

#: Decompressed size above which an incoming report is refused (a gzip bomb guard).
MAX_REPORT_BYTES = 10 * 1024 * 1024


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
        policy_domain = norm_domain(_text(_get(pol, "policy-domain")))
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
