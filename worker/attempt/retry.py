"""The retry schedule: a pure function of the attempt, the settings and the clock.

Celery's own ``retry_backoff``/``retry_jitter`` picks anywhere in [0, delay],
so a retry can fire at once; the schedule in ``interface.md`` keeps a floor of
half the delay, hence this module.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from config import RetrySettings
from worker.mipos.classification import Verdict
from worker.mipos.errors import ErrorClass


def delay_bounds(retry_number: int, settings: RetrySettings) -> tuple[float, float]:
    """The interval the n-th retry's delay is drawn from (n = 1 after the first failure)."""
    if retry_number < 1:
        raise ValueError(f"retry_number must be at least 1, got {retry_number}")
    exponent = min(retry_number - 1, 64)  # 2**64 already dwarfs any sane cap
    ceiling = min(settings.max_delay_s, settings.base_delay_s * 2.0**exponent)
    return ceiling * 0.5, ceiling


def backoff_delay(
    retry_number: int,
    settings: RetrySettings,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> float:
    low, high = delay_bounds(retry_number, settings)
    delay = (rng or random).uniform(low, high)
    if retry_after_s is not None and retry_after_s > delay:
        delay = retry_after_s
    return delay


@dataclass(frozen=True)
class RetryDecision:
    action: Literal["retry", "fail"]
    delay_s: float | None = None
    fail_reason: Literal["attempts", "deadline"] | None = None


def decide_retry(
    *,
    attempts_made: int,
    now: float,
    deadline_at: float,
    settings: RetrySettings,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> RetryDecision:
    """After a transient failure: retry after some delay, or give up and say why.

    ``attempts_made`` counts attempts against ``max_attempts`` (fresh-token
    resends excluded).
    """
    if attempts_made >= settings.max_attempts:
        return RetryDecision("fail", fail_reason="attempts")
    # A wait that spent no attempt (waiting for another request to settle) still backs off.
    delay = backoff_delay(max(1, attempts_made), settings, retry_after_s, rng)
    if now + delay > deadline_at:
        return RetryDecision("fail", fail_reason="deadline")
    return RetryDecision("retry", delay_s=delay)


def resend_with_fresh_token(verdict: Verdict, sent: bool, *, already_resent: bool) -> bool:
    """A refused token (401, ``User not authenticated.``): one resend at once with a fresh
    token, not counted against the attempts; a second refusal takes the schedule."""
    return verdict.error_class is ErrorClass.AUTH and sent and not already_resent
