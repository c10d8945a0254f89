"""The objects hooks receive and return: replies, verdicts, sessions, envelopes, stash keys.

Everything here is frozen. The core builds a new snapshot when the state changes, so a plugin cannot corrupt it;
per-plugin state goes in ``session.stash`` under a module-level :class:`StashKey`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, TypeVar, cast

from mxgate.core.metadata import check_extra_key

T = TypeVar("T")

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}\Z")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: basic code, RFC 3463 enhanced status code, text."""

    code: int  # 250, 451, 550
    enhanced: str  # "5.7.1"
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"SMTP reply code {self.code} is outside 200-599")
        if not _ENHANCED.match(self.enhanced) or self.enhanced[0] != str(self.code)[0]:
            raise ValueError(f"enhanced status {self.enhanced!r} does not fit reply code {self.code}")
        if "\r" in self.text or "\n" in self.text:
            raise ValueError("reply text must be one line")

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500


# --- verdicts: a closed set (Haraka's OK / DENY / DENYSOFT / DENYDISCONNECT); ``None`` continues ----------------


@dataclass(frozen=True, slots=True)
class Accept:
    """Accept now: later plugins for this hook are not asked. The core's own policy checks still hold."""

    reply: Reply | None = None


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse permanently (5xx)."""

    reply: Reply

    def __post_init__(self) -> None:
        if self.reply.code // 100 != 5:
            raise ValueError(f"Reject needs a 5xx reply, got {self.reply.code}")


@dataclass(frozen=True, slots=True)
class TempFail:
    """Refuse for now (4xx); the client should retry."""

    reply: Reply

    def __post_init__(self) -> None:
        if self.reply.code // 100 != 4:
            raise ValueError(f"TempFail needs a 4xx reply, got {self.reply.code}")


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Send the reply, then close the connection."""

    reply: Reply


Verdict = Accept | Reject | TempFail | Disconnect
VERDICT_TYPES = (Accept, Reject, TempFail, Disconnect)


# --- addresses ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    """An envelope address. The null reverse-path ``<>`` is ``Address("", "")``."""

    local: str
    domain: str

    @classmethod
    def null(cls) -> Address:
        return cls("", "")

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    def __str__(self) -> str:
        return "" if self.is_null else f"{self.local}@{self.domain}"


# --- typed per-plugin state -----------------------------------------------------------------------------------


class StashKey(Generic[T]):
    """A typed key into a :class:`Stash` (pytest's ``StashKey``). Create one per module, at import time."""

    __slots__ = ()


class Stash:
    """Per-session storage for plugins; the only mutable thing a plugin is handed."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[StashKey[Any], object] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return cast(T, self._data[key])

    def get(self, key: StashKey[T], default: T) -> T:
        return cast(T, self._data.get(key, default))

    def setdefault(self, key: StashKey[T], default: T) -> T:
        return cast(T, self._data.setdefault(key, default))

    def __delitem__(self, key: StashKey[T]) -> None:
        del self._data[key]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[StashKey[Any]]:
        return iter(self._data)


# --- the receive side's view of a connection and a transaction -------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsState:
    """What the TLS layer of one connection negotiated."""

    version: str  # "TLSv1.3"
    cipher: str
    bits: int
    sni: str | None = None
    peer_certificate_names: tuple[str, ...] = ()  # client certificate DNS names (and CN), verified chain only
    peer_certificate_verified: bool = False


class ReverseDnsStatus(StrEnum):
    """What the client's reverse DNS gave (``Session.reverse_dns_status``)."""

    VERIFIED = "verified"  # a PTR name whose A/AAAA records include the client's address (FCrDNS)
    UNVERIFIED = "unverified"  # PTR names exist, none resolves back to the address
    NONE = "none"  # no PTR record (NXDOMAIN or NODATA)
    FAILED = "failed"  # a lookup failed, was bogus, or did not finish within reverse_dns_timeout


@dataclass(frozen=True, slots=True)
class Session:
    """One SMTP connection as hooks see it: a snapshot, rebuilt by the core whenever the state changes."""

    id: str
    listener: str
    peer_ip: str
    peer_port: int
    local_ip: str
    local_port: int
    connector: str | None = None  # inbound connector name; None = anonymous internet
    ehlo: str | None = None
    tls: TlsState | None = None
    auth_user: str | None = None
    reverse_dns: str | None = None  # the client's forward-confirmed PTR name (FCrDNS); None: not (yet) known
    reverse_dns_status: ReverseDnsStatus | None = None  # None: still being looked up
    stash: Stash = field(default_factory=Stash, compare=False, repr=False)


class DsnRet(StrEnum):
    """RFC 3461 §4.3 ``RET``: what a failure DSN returns of the message."""

    FULL = "FULL"
    HDRS = "HDRS"


class DsnNotify(StrEnum):
    """RFC 3461 §4.1 ``NOTIFY`` keywords (``NEVER`` stands alone)."""

    NEVER = "NEVER"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    DELAY = "DELAY"


@dataclass(frozen=True, slots=True)
class RecipientDsn:
    """RFC 3461 parameters of one ``RCPT TO``: ``notify`` (``None``: not given, the default applies) and the
    decoded ``ORCPT`` as ``(address type, address)``, e.g. ``("rfc822", "user@example.org")``."""

    notify: frozenset[DsnNotify] | None = None
    orcpt: tuple[str, str] | None = None

    @property
    def notify_text(self) -> str | None:
        """``NOTIFY`` as the queue keeps it: ``"NEVER"`` or e.g. ``"SUCCESS,FAILURE"`` (fixed order)."""
        if self.notify is None:
            return None
        return ",".join(n.value for n in DsnNotify if n in self.notify)

    @property
    def orcpt_text(self) -> str | None:
        return None if self.orcpt is None else f"{self.orcpt[0]};{self.orcpt[1]}"


@dataclass(frozen=True, slots=True)
class Envelope:
    """The transaction in progress; reset by RSET, by a new EHLO and after DATA.

    ``rcpt_dsn`` runs parallel to ``rcpt_tos``: the DSN parameters of each recipient. ``dsn_ret`` and ``envid``
    are the RFC 3461 parameters of MAIL FROM; ``requiretls`` is RFC 8689's ``REQUIRETLS`` (only over TLS)."""

    mail_from: Address | None = None
    mail_options: tuple[str, ...] = ()
    rcpt_tos: tuple[Address, ...] = ()
    smtputf8: bool = False
    body: str = "7BIT"  # 7BIT | 8BITMIME
    declared_size: int | None = None
    dsn_ret: DsnRet | None = None
    envid: str | None = None
    requiretls: bool = False
    rcpt_dsn: tuple[RecipientDsn, ...] = ()


@dataclass(frozen=True, slots=True)
class HeaderEdit:
    name: str
    value: str


class IncomingMessage:
    """The message at end of headers / end of data: read-only content, plus a controlled way to add headers and
    to keep plugin metadata with the queued message (:meth:`set_meta`)."""

    __slots__ = ("_added", "_meta", "data", "headers")

    _HEADER_NAME = re.compile(r"^[!-9;-~]+\Z")  # RFC 5322 ftext

    def __init__(self, data: bytes, headers: tuple[tuple[str, str], ...]) -> None:
        self.data = data
        self.headers = headers
        self._added: list[HeaderEdit] = []
        self._meta: dict[str, str] = {}

    def get_header(self, name: str) -> str | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def add_header(self, name: str, value: str) -> None:
        """Prepend a header to the message as queued. Names and values are checked: no header injection."""
        if not self._HEADER_NAME.match(name):
            raise ValueError(f"invalid header name {name!r}")
        if "\r" in value or "\n" in value or "\0" in value:
            raise ValueError("header value must not contain CR, LF or NUL")
        self._added.append(HeaderEdit(name, value))

    @property
    def added_headers(self) -> tuple[HeaderEdit, ...]:
        return tuple(self._added)

    def set_meta(self, key: str, value: str) -> None:
        """Keep ``value`` with the queued message under ``key``, for categorizer and delivery hooks to read as
        ``message.meta.extra[key]`` (:class:`~mxgate.core.metadata.MessageMeta`). Keys are 1-64 of ``A-Z a-z 0-9
        _ . : -``; prefix them with the plugin's name. Set at end of headers or end of data; a later call for
        the same key replaces the value."""
        check_extra_key(key)
        if not isinstance(value, str):
            raise TypeError(f"metadata value must be a str, got {type(value).__name__}")
        self._meta[key] = value

    @property
    def meta(self) -> dict[str, str]:
        """The metadata plugins set so far (a copy)."""
        return dict(self._meta)


@dataclass(frozen=True, slots=True)
class AuthResult:
    """What a credentials source says about one username/password pair."""

    ok: bool
    user: str | None = None  # the authenticated identity (may be normalised by the source)
    reason: str = ""  # for logs, never sent to the client
    temporary: bool = False  # the source could not decide (backend down): 454 4.7.0 instead of 535 5.7.8

    @classmethod
    def success(cls, user: str) -> AuthResult:
        return cls(True, user)

    @classmethod
    def failure(cls, reason: str = "bad credentials", *, temporary: bool = False) -> AuthResult:
        return cls(False, None, reason, temporary)
