"""The retry schedule: delay table, jitter bounds, expiry, delay warnings."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxgate.core.queue import RetrySchedule

T0 = 1_700_000_000.0


class FixedRng:
    """uniform() always returns the same point of the interval (0 = low end, 1 = high end)."""

    def __init__(self, where: float) -> None:
        self.where = where

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.where


MIDDLE = FixedRng(0.5)  # factor exactly 1.0: no jitter


@pytest.mark.parametrize(
    ("attempts", "delay"),
    [(-3, 300.0), (0, 300.0), (1, 300.0), (2, 600.0), (3, 1200.0), (4, 2400.0), (5, 3600.0), (6, 3600.0),
     (50, 3600.0), (10_000, 3600.0), (10**12, 3600.0)],
)  # fmt: skip
def test_default_delay_table(attempts: int, delay: float) -> None:
    assert RetrySchedule().next_delay(attempts) == delay


def test_custom_schedule_and_flat_factor() -> None:
    s = RetrySchedule(first=60, maximum=1000, factor=3)
    assert [s.next_delay(n) for n in range(1, 6)] == [60, 180, 540, 1000, 1000]
    flat = RetrySchedule(first=120, maximum=120, factor=1)
    assert [flat.next_delay(n) for n in (1, 2, 100)] == [120, 120, 120]


@pytest.mark.parametrize(
    ("attempts", "now_offset", "expected_offset"),
    [
        (1, 0.0, 300.0),
        (2, 1000.0, 1600.0),
        (5, 7200.0, 10800.0),
        (9, 5 * 86400.0 - 100, 5 * 86400.0),  # capped: the last attempt happens at expiry
        (9, 5 * 86400.0, None),  # expired: give up
        (9, 6 * 86400.0, None),
    ],
)
def test_next_attempt_table(attempts: int, now_offset: float, expected_offset: float | None) -> None:
    got = RetrySchedule().next_attempt(T0, attempts, T0 + now_offset, MIDDLE)
    assert got == (None if expected_offset is None else T0 + expected_offset)


def test_jitter_ends() -> None:
    s = RetrySchedule()
    assert s.next_attempt(T0, 2, T0, FixedRng(0.0)) == pytest.approx(T0 + 600 * 0.9)
    assert s.next_attempt(T0, 2, T0, FixedRng(1.0)) == pytest.approx(T0 + 600 * 1.1)
    assert RetrySchedule(jitter=0).next_attempt(T0, 2, T0, FixedRng(1.0)) == T0 + 600


def test_jitter_spreads_retries() -> None:
    rng = random.Random(7)
    times = {RetrySchedule().next_attempt(T0, 3, T0, rng) for _ in range(50)}
    assert len(times) > 40
    assert all(t is not None and T0 + 1080 <= t <= T0 + 1320 for t in times)


@given(
    attempts=st.integers(min_value=0, max_value=10_000),
    age=st.floats(min_value=0, max_value=10 * 86400, allow_nan=False),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_next_attempt_is_in_the_future_and_never_after_expiry(attempts: int, age: float, seed: int) -> None:
    s = RetrySchedule()
    now = T0 + age
    got = s.next_attempt(T0, attempts, now, random.Random(seed))
    if now >= s.expires_at(T0):
        assert got is None
    else:
        assert got is not None
        assert now < got <= s.expires_at(T0)
        assert got - now <= s.maximum * (1 + s.jitter)


def test_delay_warning() -> None:
    s = RetrySchedule()
    assert not s.delay_warning_due(T0, T0 + 4 * 3600 - 1, already_warned=False)
    assert s.delay_warning_due(T0, T0 + 4 * 3600, already_warned=False)
    assert not s.delay_warning_due(T0, T0 + 4 * 3600, already_warned=True)
    assert not s.delay_warning_due(T0, T0 + 5 * 86400, already_warned=False)  # expired: a failure DSN instead
    assert not RetrySchedule(delay_warning_after=None).delay_warning_due(T0, T0 + 86400, already_warned=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"first": 0},
        {"first": -1},
        {"maximum": 10},
        {"factor": 0.5},
        {"give_up_after": 0},
        {"delay_warning_after": 6 * 86400.0},
        {"delay_warning_after": 0},
        {"jitter": 0.5},
        {"first": float("nan")},
        {"maximum": float("inf")},
    ],
)
def test_invalid_schedules(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetrySchedule(**kwargs)
