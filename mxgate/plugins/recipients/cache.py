"""Callout answers kept for a while (positive, negative and "unavailable" each with its own TTL), and the token
bucket that limits how fast callouts go out. Both take a clock, so tests are exact without sleeping."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["TokenBucket", "TtlCache"]

V = TypeVar("V")


class TtlCache(Generic[V]):
    """A bounded map whose entries expire: least recently used entries go first when it is full."""

    def __init__(self, max_entries: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._data: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def get(self, key: str) -> V | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= self.clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def put(self, key: str, value: V, ttl: float) -> None:
        """Keep ``value`` for ``ttl`` seconds (``ttl <= 0``: not kept, and an older entry is dropped)."""
        if ttl <= 0:
            self._data.pop(key, None)
            return
        self._data[key] = (self.clock() + ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; :meth:`take` says whether one was available."""

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
