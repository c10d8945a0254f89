"""What the gateway knows about a queued message besides its envelope, as typed values for categorizer hooks.

:class:`MessageMeta` is the receive-time metadata: the listener and inbound connector, the client's address, HELO,
TLS and AUTH identity, the ``BODY``/``SMTPUTF8`` parameters, and the core's own marks (a DSN's original, an expanded
recipient's origin). It is frozen and written once, by whoever queues the message (the SMTP server, the scheduler
for DSNs and expansions, a plugin through ``runtime.submit``). Receive hooks add their own keys with
:meth:`mxgate.IncomingMessage.set_meta`; categorizer and delivery hooks read them as ``message.meta.extra``.

The queue keeps it as ``(key, value)`` string pairs (the ``meta`` column, JSON), the format of every queue written
before this type existed: :meth:`MessageMeta.to_pairs` / :meth:`MessageMeta.from_pairs` are the one conversion, at
the store (and at the pipe from a receive worker to the main process). A key this version does not know is kept in
``extra`` rather than dropped.

:class:`MessageHeaders` is a read-only, case-insensitive view of a message's header section, parsed once
(``email`` with ``policy.default``: RFC 2047 encoded words decoded, folded lines unfolded) and only when read.
"""

from __future__ import annotations

import email.parser
import email.policy
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from email.message import Message
from types import MappingProxyType
from typing import Final

__all__ = ["EXTRA_PREFIX", "MessageHeaders", "MessageMeta", "MetaInput", "check_extra_key"]

# how a plugin's key is stored among the core's keys in the queue: "extra.<key>"
EXTRA_PREFIX: Final = "extra."
_EXTRA_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z")
_EMPTY: Final[Mapping[str, str]] = MappingProxyType({})


def check_extra_key(key: str) -> None:
    """A plugin's metadata key: 1-64 of letters, digits, ``_ . : -``, starting with a letter or digit (so it reads
    well in ``mxgate queue show`` and never collides with the core's keys, which it is stored apart from)."""
    if not isinstance(key, str) or not _EXTRA_KEY.match(key):
        raise ValueError(f"invalid metadata key {key!r}: 1-64 of A-Z a-z 0-9 _ . : - (starting with a letter/digit)")


def _frozen(items: Mapping[str, str] | Iterable[tuple[str, str]]) -> Mapping[str, str]:
    pairs = items.items() if isinstance(items, Mapping) else items
    data = {str(k): str(v) for k, v in pairs}
    return MappingProxyType(data) if data else _EMPTY


@dataclass(frozen=True, slots=True)
class MessageMeta:
    """Receive-time facts about a queued message (``message.meta``). Every field has a neutral default: a message a
    plugin queued (a report) or a DSN has only the fields that apply to it."""

    listener: str = ""  # the listener that received it ("" when not received over SMTP)
    inbound_connector: str = ""  # the inbound connector the transaction ran under
    session: str = ""  # the receive session id (the tracking log's ``session``)
    client_ip: str = ""
    helo: str = ""
    tls_version: str | None = None  # "TLSv1.3" when received over TLS
    tls_cipher: str | None = None
    auth_user: str | None = None  # the SMTP AUTH identity, when the client authenticated
    internal: bool = False  # the inbound connector has treat_as_internal
    body_8bit: bool = False  # MAIL FROM ... BODY=8BITMIME
    smtputf8: bool = False  # MAIL FROM ... SMTPUTF8
    tls_required_no: bool = False  # RFC 8689 "TLS-Required: No" asked by whoever queued it (reports do)
    origin: str | None = None  # who queued a message not received over SMTP, e.g. "tlsrpt"
    dsn_for: str | None = None  # a DSN: the queue id of the message it reports on
    expanded_from: tuple[str, str] | None = None  # (queue id, recipient) whose expansion this message carries
    categorized: bool = False  # recipients already resolved (an expansion): resolve_recipient is not asked again
    # plugin keys, set by receive hooks with IncomingMessage.set_meta
    extra: Mapping[str, str] = field(default_factory=lambda: _EMPTY, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.extra, MappingProxyType):
            object.__setattr__(self, "extra", _frozen(self.extra))

    # -- the queue's form ------------------------------------------------------------------------------------

    def to_pairs(self) -> tuple[tuple[str, str], ...]:
        """The ``(key, value)`` strings the queue stores (the keys of queues written before this type); fields at
        their default are left out."""
        out: list[tuple[str, str]] = []
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value == f.default:
                continue
            key = _KEYS.get(f.name, f.name)
            if f.name == "expanded_from":
                out.append((key, f"{value[0]} {value[1]}"))
            elif f.name == "body_8bit":
                out.append((key, "8BITMIME"))
            elif f.name == "tls_required_no":
                out.append((key, "no"))
            elif f.name == "categorized":
                out.append((key, "1"))
            elif isinstance(value, bool):
                out.append((key, "yes"))
            else:
                out.append((key, str(value)))
        out.extend((EXTRA_PREFIX + k, v) for k, v in self.extra.items())
        return tuple(out)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]]) -> MessageMeta:
        """Read the queue's pairs (any version's). Unknown keys are kept in ``extra`` under their own name."""
        values: dict[str, object] = {}
        extra: dict[str, str] = {}
        for raw_key, raw_value in pairs:
            key, value = str(raw_key), str(raw_value)
            name = _NAMES.get(key)
            if key.startswith(EXTRA_PREFIX):
                extra[key[len(EXTRA_PREFIX) :]] = value
            elif name is None:
                extra[key] = value
            elif name == "expanded_from":
                queue_id, _, recipient = value.partition(" ")
                values[name] = (queue_id, recipient)
            elif name == "body_8bit":
                values[name] = value.upper() == "8BITMIME"
            elif name == "tls_required_no":
                values[name] = value.lower() == "no"
            elif name in _FLAGS:
                values[name] = value.lower() in ("1", "true", "yes")
            else:
                values[name] = value
        return cls(**values, extra=extra)  # type: ignore[arg-type]

    @classmethod
    def of(cls, meta: MetaInput) -> MessageMeta:
        """``meta`` as given to ``runtime.submit``: a :class:`MessageMeta`, ``None`` (none), or the queue's
        ``(key, value)`` pairs (the form before this type; read with :meth:`from_pairs`)."""
        if meta is None:
            return NO_META
        if isinstance(meta, MessageMeta):
            return meta
        return cls.from_pairs(meta)


# field name -> the key queues have always used for it (others use the field name)
_KEYS: Final = {
    "inbound_connector": "connector",
    "tls_version": "tls",
    "tls_cipher": "cipher",
    "body_8bit": "body",
    "tls_required_no": "tls_required",
}
_NAMES: Final = {_KEYS.get(f.name, f.name): f.name for f in fields(MessageMeta) if f.name != "extra"}
_FLAGS: Final = frozenset(f.name for f in fields(MessageMeta) if f.type == "bool")
NO_META: Final = MessageMeta()
MetaInput = MessageMeta | Iterable[tuple[str, str]] | None


class MessageHeaders:
    """A message's header section, read-only: ``headers.get("X-Route-To")``, ``headers.get_all("Received")``,
    ``"Subject" in headers``. Names are case-insensitive; values are unfolded, encoded words decoded, surrounding
    white space removed. Parsed on first use, once."""

    __slots__ = ("_message", "raw")

    _PARSER: Final = email.parser.BytesHeaderParser(policy=email.policy.default)

    def __init__(self, raw: bytes = b"") -> None:
        self.raw = raw  # the header section as received (CRLF line ends, without the blank line)
        self._message: Message | None = None

    @classmethod
    def of_message(cls, data: bytes) -> MessageHeaders:
        """The headers of a whole message (everything before the first empty line)."""
        end = data.find(b"\r\n\r\n")
        return cls(data if end < 0 else data[: end + 2])

    def _parsed(self) -> Message:
        if self._message is None:
            self._message = self._PARSER.parsebytes(self.raw)
        return self._message

    def _value(self, name: str, raw: str) -> str:
        if any("\udc80" <= c <= "\udcff" for c in raw):  # 8-bit bytes (SMTPUTF8 or not): read as UTF-8
            raw = raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        try:
            return str(email.policy.default.header_fetch_parse(name, raw)).strip()
        except Exception:  # a header the email package cannot parse: its unfolded text
            return " ".join(raw.split())

    def get_all(self, name: str) -> tuple[str, ...]:
        """Every value of header ``name``, in message order."""
        lname = name.lower()
        return tuple(self._value(k, v) for k, v in self._parsed().raw_items() if k.lower() == lname)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name``, else ``default``."""
        values = self.get_all(name)
        return values[0] if values else default

    def items(self) -> tuple[tuple[str, str], ...]:
        """Every ``(name, value)``, in message order."""
        return tuple((k, self._value(k, v)) for k, v in self._parsed().raw_items())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(k.lower() == name.lower() for k in self._parsed())

    def __iter__(self) -> Iterator[str]:
        """The header names, in message order (repeated names repeat)."""
        return iter(self._parsed().keys())

    def __len__(self) -> int:
        return len(self._parsed())

    def __repr__(self) -> str:
        return f"MessageHeaders({len(self.raw)} bytes)"
