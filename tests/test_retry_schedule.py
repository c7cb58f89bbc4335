"""The retry schedule of interface.md: bounds, cap, Retry-After, attempts, deadline."""

from __future__ import annotations

import random

import pytest

from config import RetrySettings
from worker.attempt.retry import backoff_delay, decide_retry, delay_bounds

SETTINGS = RetrySettings(max_attempts=12, base_delay_s=1.0, max_delay_s=60.0, deadline_s=600.0)


@pytest.mark.parametrize(
    ("n", "low", "high"),
    [(1, 0.5, 1.0), (2, 1.0, 2.0), (3, 2.0, 4.0), (6, 16.0, 32.0), (7, 30.0, 60.0), (40, 30.0, 60.0)],
)
def test_bounds(n: int, low: float, high: float) -> None:
    assert delay_bounds(n, SETTINGS) == (low, high)


def test_delays_stay_inside_bounds() -> None:
    rng = random.Random(7)
    for n in range(1, 15):
        low, high = delay_bounds(n, SETTINGS)
        delays = [backoff_delay(n, SETTINGS, rng=rng) for _ in range(500)]
        assert all(low <= d <= high for d in delays)
        assert min(delays) < low + (high - low) * 0.1  # the whole range is used,
        assert max(delays) > high - (high - low) * 0.1  # not one end of it


def test_retry_after_extends_the_delay_but_never_shortens_it() -> None:
    assert backoff_delay(1, SETTINGS, retry_after_s=30.0) == 30.0
    assert 8.0 <= backoff_delay(5, SETTINGS, retry_after_s=0.1) <= 16.0


def test_attempt_cap() -> None:
    decision = decide_retry(attempts_made=12, now=0.0, deadline_at=1e9, settings=SETTINGS)
    assert (decision.action, decision.fail_reason) == ("fail", "attempts")
    assert decide_retry(attempts_made=11, now=0.0, deadline_at=1e9, settings=SETTINGS).action == "retry"


def test_deadline_stops_a_retry_that_would_start_too_late() -> None:
    decision = decide_retry(attempts_made=1, now=100.0, deadline_at=100.4, settings=SETTINGS)
    assert (decision.action, decision.fail_reason) == ("fail", "deadline")
    retry = decide_retry(attempts_made=1, now=100.0, deadline_at=101.0, settings=SETTINGS)
    assert retry.action == "retry" and retry.delay_s is not None and 0.5 <= retry.delay_s <= 1.0


def test_retry_number_must_be_positive() -> None:
    with pytest.raises(ValueError):
        delay_bounds(0, SETTINGS)
