"""MTA-STS (RFC 8461) without I/O: the ``_mta-sts`` TXT record, the policy text, ``mx`` patterns.

Strict where the RFC is strict (version, the record's first field, ``id`` syntax, ``mode``, ``max_age`` range,
``mx`` required for enforce and testing, white space only where the grammars of sections 3.1 and 3.2 allow it),
tolerant where it asks for tolerance (LF or CRLF, white space around ``;`` and after ``:``, unknown fields
ignored, the first instance of a repeated field wins — except ``mx``, which repeats by design). Errors are
:class:`StsSyntaxError` carrying a one-line reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "MAX_AGE_LIMIT",
    "MAX_POLICY_BYTES",
    "WELL_KNOWN_PATH",
    "RecordLookup",
    "RecordStatus",
    "StsMode",
    "StsPolicy",
    "StsRecord",
    "StsSyntaxError",
    "is_text_plain",
    "mx_matches",
    "parse_policy",
    "parse_record",
    "render_policy",
    "select_record",
]

MAX_AGE_LIMIT = 31557600  # RFC 8461 section 3.2: about one year
MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 section 3.3
WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"  # RFC 8461 section 3.3

_RECORD_START = re.compile(r"^v=STSv1[ \t]*;")  # sts-version sts-sep (section 3.1)
_RECORD_ID = re.compile(r"^[A-Za-z0-9]{1,32}\Z")
_EXT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
_EXT_VALUE = re.compile(r"^[\x21-\x3a\x3c\x3e-\x7e]+\Z")
_POLICY_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
_POLICY_VALUE = re.compile(r"^[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*\Z")  # printable, inner spaces allowed
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
_DIGITS = re.compile(r"^[0-9]{1,10}\Z")
_KNOWN_KEYS = frozenset({"version", "mode", "max_age", "mx"})


class StsSyntaxError(ValueError):
    """A TXT record or policy that does not parse; ``str()`` is the reason."""


class StsMode(StrEnum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


# -- the TXT record (section 3.1) ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StsRecord:
    """A valid ``_mta-sts`` TXT record."""

    id: str
    text: str


def parse_record(text: str) -> StsRecord:
    """Parse one TXT record (its strings already concatenated).

    ``sts-text-record = sts-version 1*(*WSP ";" *WSP sts-field) [*WSP ";" *WSP]``: ``v=STSv1;`` first,
    ``id`` of 1-32 letters and digits required, extensions ``name=value`` allowed. A second ``id`` is ignored,
    whatever it holds; white space only around the ``;`` separators.
    """
    if not _RECORD_START.match(text):
        raise StsSyntaxError("record does not begin with v=STSv1")
    parts = text.split(";")
    fields = [f.lstrip(" \t") for f in parts[1:]]  # *WSP after each ";"
    # *WSP before each ";": every field but the last is followed by one; the last only when a ";" ends the record
    fields = [f.rstrip(" \t") for f in fields[:-1]] + fields[-1:]
    if fields and fields[-1] == "":
        fields.pop()  # one trailing ";" (sts-sep) is allowed
    if not fields:
        raise StsSyntaxError("record has no fields after v=STSv1")
    record_id: str | None = None
    for item in fields:
        name, eq, value = item.partition("=")
        if not eq:
            raise StsSyntaxError(f"field {item[:40]!r} is not name=value")
        if name == "id":
            if record_id is not None:
                continue  # a second id is ignored, not validated
            if not _RECORD_ID.match(value):
                raise StsSyntaxError(f"id {value[:40]!r} is not 1-32 letters and digits")
            record_id = value
        elif name == "v":
            raise StsSyntaxError("v= appears twice")
        elif not _EXT_NAME.match(name) or not _EXT_VALUE.match(value):
            raise StsSyntaxError(f"extension {item[:40]!r} is not valid")
    if record_id is None:
        raise StsSyntaxError("record has no id")
    return StsRecord(record_id, text)


class RecordStatus(StrEnum):
    FOUND = "found"  # exactly one valid record
    NONE = "none"  # no STS record (NXDOMAIN, NODATA, or only records of other kinds)
    INVALID = "invalid"  # records begin with v=STSv1 but there is not exactly one valid one
    ERROR = "error"  # the lookup failed (timeout, SERVFAIL): never read as "none"
    BOGUS = "bogus"  # the answer failed DNSSEC validation


@dataclass(frozen=True, slots=True)
class RecordLookup:
    status: RecordStatus
    record: StsRecord | None = None
    detail: str = ""

    @property
    def id(self) -> str | None:
        return self.record.id if self.record is not None else None


def select_record(texts: Sequence[str]) -> RecordLookup:
    """RFC 8461 section 3.1: records not beginning ``v=STSv1;`` are discarded *before* counting (a bare
    ``v=STSv1`` beside a valid record leaves one record); not exactly one left, or the one left invalid, means no
    policy is available."""
    candidates = [t for t in texts if _RECORD_START.match(t)]
    if not candidates:
        return RecordLookup(RecordStatus.NONE, detail="no v=STSv1 record" if texts else "no TXT record")
    if len(candidates) > 1:
        return RecordLookup(RecordStatus.INVALID, detail=f"{len(candidates)} v=STSv1 records")
    try:
        return RecordLookup(RecordStatus.FOUND, parse_record(candidates[0]))
    except StsSyntaxError as exc:
        return RecordLookup(RecordStatus.INVALID, detail=str(exc))


# -- the policy (section 3.2) --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StsPolicy:
    """A valid policy. ``mx`` keeps the published order (lower case, no trailing dot)."""

    mode: StsMode
    max_age: int
    mx: tuple[str, ...]
    text: str  # the policy as fetched (decoded), for the cache and `mxgate sts show`

    @property
    def policy_strings(self) -> tuple[str, ...]:
        """RFC 8460 ``policy-string`` for an STS policy: its non-empty lines, CR removed."""
        return tuple(line.rstrip("\r") for line in self.text.split("\n") if line.strip())

    def matches(self, host: str) -> bool:
        return any(mx_matches(p, host) for p in self.mx)


def _valid_domain(name: str) -> bool:
    return len(name) <= 253 and all(_LABEL.match(label) for label in name.split("."))


def _mx_pattern(value: str) -> str:
    """``["*."] Domain`` (RFC 5321 Domain: one label is enough, ``mx: localhost``). A wildcard over a single label
    (``*.org``) is refused all the same: it would stand for every host of a TLD."""
    pattern = value.lower().rstrip(".")
    wildcard = pattern.startswith("*.")
    base = pattern[2:] if wildcard else pattern
    if not _valid_domain(base) or (wildcard and "." not in base):
        raise StsSyntaxError(f"mx {value[:60]!r} is not a host name or *.domain pattern")
    return pattern


def parse_policy(text: str) -> StsPolicy:
    """Parse a policy body (already decoded). Raises :class:`StsSyntaxError` with the reason."""
    seen: dict[str, str] = {}
    mx: list[str] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        # sts-policy-field *WSP term, field = name ":" *WSP value: white space after the colon and at the end of
        # the line only (blank lines are tolerated)
        line = raw.removesuffix("\r").rstrip(" \t")
        if not line:
            continue
        key, colon, value = line.partition(":")
        value = value.lstrip(" \t")
        if key != key.strip(" \t"):
            raise StsSyntaxError(f"line {number} has white space around its key (RFC 8461 section 3.2)")
        if not colon or not _POLICY_KEY.match(key):
            raise StsSyntaxError(f"line {number} is not 'key: value'")
        if key not in _KNOWN_KEYS:
            continue  # unknown fields (extensions) are ignored, whatever their value
        if not _POLICY_VALUE.match(value):
            raise StsSyntaxError(f"line {number} ({key}) has an empty or non-printable value")
        if key == "mx":
            pattern = _mx_pattern(value)
            if pattern not in mx:
                mx.append(pattern)
        else:
            seen.setdefault(key, value)  # the first instance of a non-repeated field wins
    version = seen.get("version")
    if version is None:
        raise StsSyntaxError("no version field")
    if version != "STSv1":
        raise StsSyntaxError(f"version {version[:20]!r} is not STSv1")
    mode_text = seen.get("mode")
    if mode_text is None:
        raise StsSyntaxError("no mode field")
    try:
        mode = StsMode(mode_text)
    except ValueError:
        raise StsSyntaxError(f"mode {mode_text[:20]!r} is not enforce, testing or none") from None
    age_text = seen.get("max_age")
    if age_text is None:
        raise StsSyntaxError("no max_age field")
    if not _DIGITS.match(age_text):
        raise StsSyntaxError(f"max_age {age_text[:20]!r} is not 1-10 digits")
    max_age = int(age_text)
    if max_age > MAX_AGE_LIMIT:
        raise StsSyntaxError(f"max_age {max_age} exceeds {MAX_AGE_LIMIT}")
    if mode is not StsMode.NONE and not mx:
        raise StsSyntaxError(f"mode {mode} needs at least one mx field")
    return StsPolicy(mode, max_age, tuple(mx), text)


def render_policy(mode: StsMode | str, mx: Iterable[str], max_age: int) -> str:
    """A policy body as we publish it (CRLF lines, version first)."""
    lines = ["version: STSv1", f"mode: {StsMode(mode)}"]
    lines += [f"mx: {pattern}" for pattern in mx]
    lines.append(f"max_age: {max_age}")
    return "".join(line + "\r\n" for line in lines)


def is_text_plain(content_type: str | None) -> bool:
    """``text/plain``, parameters (charset) allowed, case-insensitive."""
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == "text/plain"


# -- mx patterns (section 4.1) -------------------------------------------------------------------------------


def mx_matches(pattern: str, host: str) -> bool:
    """``mx.example.com`` matches itself; ``*.example.com`` matches exactly one more left-most label
    (``a.example.com``, not ``example.com`` nor ``a.b.example.com``). Case and a trailing dot are ignored."""
    pattern = pattern.strip().rstrip(".").lower()
    host = host.strip().rstrip(".").lower()
    if not pattern or not host:
        return False
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and first != "*" and rest == pattern[2:]
    return pattern == host
