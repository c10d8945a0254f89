"""The durable queue: store (SQLite WAL, group commit), retry schedule, DSN generation."""

from mxgate.core.queue.dsn import DSN_ENVELOPE_SENDER, DsnRecipient, build_dsn, is_auto_message
from mxgate.core.queue.errors import MessageNotFoundError, QueueError, QueueFullError
from mxgate.core.queue.queries import Attempt, QueueCounts
from mxgate.core.queue.retry import RetrySchedule, UniformRng
from mxgate.core.queue.store import QueueStore, RecipientResult, StoreStats

__all__ = [
    "DSN_ENVELOPE_SENDER",
    "Attempt",
    "DsnRecipient",
    "MessageNotFoundError",
    "QueueCounts",
    "QueueError",
    "QueueFullError",
    "QueueStore",
    "RecipientResult",
    "RetrySchedule",
    "StoreStats",
    "UniformRng",
    "build_dsn",
    "is_auto_message",
]
