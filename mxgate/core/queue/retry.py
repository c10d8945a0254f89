"""The retry schedule: when to try a deferred recipient again, and when to give up (pure, no I/O, no clock).

Delays grow geometrically from ``first`` by ``factor`` up to ``maximum``; each is multiplied by a small
random jitter (the caller injects the ``rng``) so that messages deferred together do not retry in lock step. A
message is given up ``give_up_after`` seconds after it arrived: the last attempt is scheduled at that
moment at the latest, and a failure at or after it returns ``None`` (expired: bounce with a DSN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

__all__ = ["RetrySchedule", "UniformRng"]


class UniformRng(Protocol):
    """What the schedule needs from a random source (``random.Random`` fits)."""

    def uniform(self, a: float, b: float) -> float: ...


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    first: float = 300.0  # delay after the first failed attempt, seconds
    maximum: float = 3600.0  # longest delay between attempts
    factor: float = 2.0  # growth per attempt
    give_up_after: float = 5 * 86400.0  # from arrival; then the recipient fails (DSN)
    delay_warning_after: float | None = 4 * 3600.0  # from arrival; None = never send a delay warning
    jitter: float = 0.1  # each delay is multiplied by a factor in [1 - jitter, 1 + jitter]

    def __post_init__(self) -> None:
        if not (math.isfinite(self.first) and self.first > 0):
            raise ValueError(f"first must be > 0, got {self.first}")
        if not (math.isfinite(self.maximum) and self.maximum >= self.first):
            raise ValueError(f"maximum must be >= first ({self.first}), got {self.maximum}")
        if not (math.isfinite(self.factor) and self.factor >= 1.0):
            raise ValueError(f"factor must be >= 1, got {self.factor}")
        if not (math.isfinite(self.give_up_after) and self.give_up_after > 0):
            raise ValueError(f"give_up_after must be > 0, got {self.give_up_after}")
        if self.delay_warning_after is not None and not (
            math.isfinite(self.delay_warning_after) and 0 < self.delay_warning_after < self.give_up_after
        ):
            raise ValueError("delay_warning_after must be > 0 and < give_up_after, or None")
        if not 0.0 <= self.jitter < 0.5:
            raise ValueError(f"jitter must be in [0, 0.5), got {self.jitter}")

    def next_delay(self, attempts: int) -> float:
        """The delay (no jitter) after ``attempts`` failed attempts: first * factor**(attempts-1), capped.

        ``attempts`` below 1 counts as 1.
        """
        exponent = max(0, attempts - 1)
        if self.factor == 1.0:
            return self.first
        # Once first * factor**n passes maximum it stays there; stop before float overflow.
        if exponent > math.log(self.maximum / self.first, self.factor) + 1:
            return self.maximum
        return min(self.maximum, self.first * self.factor**exponent)

    def expires_at(self, received_at: float) -> float:
        return received_at + self.give_up_after

    def next_attempt(self, received_at: float, attempts: int, now: float, rng: UniformRng) -> float | None:
        """When to try again after ``attempts`` failed attempts, or ``None`` to give up (expired).

        The result is never later than the expiry time, so the last attempt happens at expiry at the latest.
        """
        deadline = self.expires_at(received_at)
        if now >= deadline:
            return None
        delay = self.next_delay(attempts)
        if self.jitter:
            delay *= rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)
        return min(now + delay, deadline)

    def delay_warning_due(self, received_at: float, now: float, *, already_warned: bool) -> bool:
        """Whether a "delayed" DSN should go out now (once per message, after ``delay_warning_after``)."""
        if already_warned or self.delay_warning_after is None:
            return False
        return now - received_at >= self.delay_warning_after and now < self.expires_at(received_at)
