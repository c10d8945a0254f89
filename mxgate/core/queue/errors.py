"""The queue store's errors: ``sqlite3`` errors never leave the store.

Disk full (``SQLITE_FULL``, "database or disk is full") becomes :class:`QueueFullError` (the receive side answers
``452 4.3.1``), everything else :class:`QueueError`. SQLite's transactions guarantee that a failed write leaves the
store as it was.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from mxgate.core.errors import MxgateError

__all__ = ["MessageNotFoundError", "QueueError", "QueueFullError", "map_error"]

_SQLITE_FULL: Final = 13


class QueueError(MxgateError):
    """The queue store could not do what was asked (I/O error, store closed, corrupt store...)."""


class QueueFullError(QueueError):
    """The disk (or the database's size limit) is full; nothing was written. Answer ``452 4.3.1``."""


class MessageNotFoundError(QueueError, LookupError):
    """No such message (or, for ``QueueStore.body``, its body is gone because it is finished)."""


def map_error(exc: BaseException) -> BaseException:
    """Turn an sqlite3 error into ours; leave everything else alone."""
    if not isinstance(exc, sqlite3.Error):
        return exc
    code = getattr(exc, "sqlite_errorcode", None)
    if (isinstance(code, int) and code & 0xFF == _SQLITE_FULL) or "database or disk is full" in str(exc):
        err: QueueError = QueueFullError(f"queue store full: {exc}")
    else:
        err = QueueError(f"queue store error: {exc}")
    err.__cause__ = exc
    return err
