"""What the queue holds, as hooks and commands see it: a queued message, its recipients and their status, and
what the sender asked for the whole message. The store (:mod:`mxgate.core.queue.store`) keeps them; the
categorizer's hooks (``on_submitted_message``, ``resolve_recipient``, ``resolve_route``, ``on_routed_message``)
get them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from mxgate.core.metadata import NO_META, MessageMeta
from mxgate.core.model import DsnRet

__all__ = [
    "NO_OPTIONS",
    "MessageOptions",
    "NewRecipient",
    "QueuedMessage",
    "QueuedRecipient",
    "RecipientStatus",
]


class RecipientStatus(StrEnum):
    QUEUED = "queued"  # not tried yet
    DEFERRED = "deferred"  # tried, temporary failure, will retry at next_attempt
    DELIVERED = "delivered"  # final
    FAILED = "failed"  # final: permanent failure or expired

    @property
    def is_final(self) -> bool:
        return self in (RecipientStatus.DELIVERED, RecipientStatus.FAILED)


@dataclass(frozen=True, slots=True)
class NewRecipient:
    """A recipient for :meth:`QueueStore.put` with its RFC 3461 DSN parameters (a plain ``str`` works too)."""

    address: str
    dsn_notify: str | None = None  # NOTIFY=, e.g. "FAILURE,DELAY" or "NEVER"
    orcpt: str | None = None  # ORCPT=, decoded, e.g. "rfc822;user@example.org"


@dataclass(frozen=True, slots=True)
class MessageOptions:
    """What the sender asked for the whole message, kept with it in the queue (columns, not ``meta`` strings):
    RFC 3461 ``RET`` and ``ENVID`` (decoded), RFC 8689 ``REQUIRETLS``."""

    dsn_ret: DsnRet | None = None
    envid: str | None = None
    requiretls: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"ret": self.dsn_ret.value if self.dsn_ret else None, "envid": self.envid, "rt": self.requiretls}

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> MessageOptions:
        ret = item.get("ret")
        return cls(DsnRet(ret) if ret else None, item.get("envid"), bool(item.get("rt")))


NO_OPTIONS: Final = MessageOptions()


@dataclass(frozen=True, slots=True)
class QueuedRecipient:
    address: str
    status: RecipientStatus
    attempts: int
    last_error: str | None
    route: str | None  # outbound connector name
    next_attempt: float  # unix time
    dsn_notify: str | None = None
    orcpt: str | None = None

    @property
    def is_final(self) -> bool:
        return self.status.is_final


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    id: str
    sender: str  # "" = null sender
    recipients: tuple[QueuedRecipient, ...]
    received_at: float
    size: int
    message_id: str | None  # Message-ID header
    held: bool
    meta: MessageMeta = NO_META  # receive-time facts (client, inbound connector, TLS, AUTH...) and plugin keys
    leased_until: float = 0.0  # unix time; <= now means not leased
    finished_at: float | None = None  # set when every recipient is final (tombstone)
    options: MessageOptions = NO_OPTIONS  # DSN RET/ENVID, REQUIRETLS

    @property
    def requiretls(self) -> bool:
        """RFC 8689: the sender asked that the message travel only over validated TLS."""
        return self.options.requiretls

    @property
    def next_attempt(self) -> float | None:
        """Earliest next attempt of the recipients not final yet; ``None`` when the message is final."""
        pending = [r.next_attempt for r in self.recipients if not r.is_final]
        return min(pending) if pending else None

    @property
    def is_final(self) -> bool:
        return all(r.is_final for r in self.recipients)

    def recipient(self, address: str) -> QueuedRecipient | None:
        return next((r for r in self.recipients if r.address == address), None)
