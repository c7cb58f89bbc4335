"""The wall-clock budget of one attempt, seen by every call made inside it.

An attempt (token renewal, pending-list check, send, fresh-token resend) must
end within a known bound: the per-order lock and the visibility timeout are
derived from it (``config.timing``). The attempt opens a budget; the HTTP
client and the token store read what is left of it instead of being handed a
deadline through every call.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_deadline: ContextVar[float | None] = ContextVar("mipos_attempt_deadline", default=None)


@contextmanager
def attempt_budget(seconds: float) -> Iterator[None]:
    """Everything inside must end within ``seconds`` (monotonic clock)."""
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining_s() -> float | None:
    """Seconds left in the current attempt's budget; None outside an attempt."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()
