"""The durable queue: store (SQLite WAL, group commit), retry schedule, DSN generation."""

from mxgate.core.queue.dsn import DSN_ENVELOPE_SENDER, DsnRecipient, build_dsn, is_auto_message
from mxgate.core.queue.retry import RetrySchedule, UniformRng
from mxgate.core.queue.store import (
    Attempt,
    MessageNotFoundError,
    MessageOptions,
    NewRecipient,
    QueueCounts,
    QueuedMessage,
    QueuedRecipient,
    QueueError,
    QueueFullError,
    QueueStore,
    RecipientResult,
    RecipientStatus,
    StoreStats,
)

__all__ = [
    "DSN_ENVELOPE_SENDER",
    "Attempt",
    "DsnRecipient",
    "MessageNotFoundError",
    "MessageOptions",
    "NewRecipient",
    "QueueCounts",
    "QueueError",
    "QueueFullError",
    "QueueStore",
    "QueuedMessage",
    "QueuedRecipient",
    "RecipientResult",
    "RecipientStatus",
    "RetrySchedule",
    "StoreStats",
    "UniformRng",
    "build_dsn",
    "is_auto_message",
]
