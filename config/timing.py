"""How Celery delivers our messages on Redis: the numbers and why they are what they are.

One chain, from the HTTP timeout up (defaults with ``MIPOS_TIMEOUT_S=10``):

=================  ==========================================  ========
call bound         2 x MIPOS_TIMEOUT_S: one HTTP call, connect      20 s
                   and read, ends at this total deadline
                   (worker/mipos/client.py), however the server trickles
attempt bound      CALLS_PER_ATTEMPT x call bound: the wall-       120 s
                   clock budget of one attempt (worker/mipos/budget.py)
margin             10 % of the attempt bound (2 s to 30 s): what     12 s
                   an attempt may still do once its budget is
                   spent (close the call, write the ledger, ack)
order lock TTL     attempt bound + margin, never past the          132 s
                   visibility timeout
visibility         longest countdown hop + attempt bound +         180 s
timeout            slack: a message a live worker holds is never
                   handed out again, and a dead worker's comes
                   back inside mipos's 10-minute window
=================  ==========================================  ========

``MIPOS_VISIBILITY_TIMEOUT_S`` overrides the visibility timeout, but not below
hop + attempt bound + margin: the worker refuses to start with less. Every
process that opens a broker connection sweeps the ``unacked`` set with its own
visibility timeout (kombu's ``restore_visible``), so the Celery app sets these
numbers when it is built, from the same settings, in every process.
"""

from __future__ import annotations

import math
from typing import Protocol

from config.model import DeliverySettings
from mipos_worker.names import QUEUE as QUEUE  # the queue's name is the POS side's

# A countdown longer than the visibility timeout gets the message delivered
# twice (kombu#337). Long waits are therefore cut into hops of at most this
# many seconds (and at most a quarter of the visibility timeout); each hop is a
# new message that carries its `not_before` time.
MAX_COUNTDOWN_HOP_S = 30.0

# Seconds between kombu's sweeps that hand back messages a dead worker held
# (kombu's default sweeps about every 100 s).
UNACKED_RESTORE_INTERVAL_S = 5.0

# HTTP calls one attempt may make in the worst case: token call and refresh,
# the send, a refresh after a 401 (with its fallback token call), the resend.
# The pending-list check and a wait on another worker's renewal spend the same
# budget: the budget, not the count, is what bounds the attempt.
CALLS_PER_ATTEMPT = 6

# The margin past the attempt bound: a share of it, within these limits.
MARGIN_SHARE = 0.1
MIN_MARGIN_S = 2.0
MAX_MARGIN_S = 30.0

# What the default visibility timeout adds on top of hop + attempt bound (>= MAX_MARGIN_S).
VISIBILITY_SLACK_S = 30.0


class HoldsDelivery(Protocol):
    """Settings that hold the delivery numbers (config.model.WorkerSettings)."""

    @property
    def delivery(self) -> DeliverySettings: ...


AnySettings = DeliverySettings | HoldsDelivery


def _numbers(settings: AnySettings) -> DeliverySettings:
    return settings if isinstance(settings, DeliverySettings) else settings.delivery


def call_bound_for(timeout_s: float) -> float:
    """The total deadline of one HTTP call: connect + read, as one wall-clock limit."""
    return 2 * timeout_s


def call_bound_s(settings: AnySettings) -> float:
    return call_bound_for(_numbers(settings).timeout_s)


def attempt_bound_s(settings: AnySettings) -> float:
    """The wall-clock budget of one attempt, every call of it included."""
    return CALLS_PER_ATTEMPT * call_bound_s(settings)


def attempt_margin_s(settings: AnySettings) -> float:
    return min(MAX_MARGIN_S, max(MIN_MARGIN_S, MARGIN_SHARE * attempt_bound_s(settings)))


def _hop_s(visibility_s: float) -> float:
    return min(MAX_COUNTDOWN_HOP_S, visibility_s / 4)


def default_visibility_timeout_s(settings: AnySettings) -> float:
    """30 + 120 + 30 = 180 s by default; never below the minimum (the slack is at least the margin)."""
    return MAX_COUNTDOWN_HOP_S + attempt_bound_s(settings) + VISIBILITY_SLACK_S


def minimum_visibility_timeout_s(settings: AnySettings) -> float:
    """The smallest timeout with room for a countdown hop (a quarter of it, at most
    30 s), one attempt and the margin; rounded up to a tenth of a second."""
    held = attempt_bound_s(settings) + attempt_margin_s(settings)
    exact = held * 4 / 3 if held * 4 / 3 <= 4 * MAX_COUNTDOWN_HOP_S else held + MAX_COUNTDOWN_HOP_S
    return math.ceil(exact * 10 - 1e-9) / 10


def visibility_timeout_s(settings: AnySettings) -> float:
    """How long a message may stay unacknowledged before Redis hands it out again."""
    given = _numbers(settings).visibility_timeout_s
    return given if given is not None else default_visibility_timeout_s(settings)


def countdown_hop_s(settings: AnySettings) -> float:
    return _hop_s(visibility_timeout_s(settings))


def restore_interval_s(settings: AnySettings) -> float:
    return min(UNACKED_RESTORE_INTERVAL_S, max(0.5, visibility_timeout_s(settings) / 4))


def order_lock_ttl_s(settings: AnySettings) -> float:
    """Outlives one attempt, but never the visibility timeout: the lock of a
    killed worker must be gone by the time its message is handed out again."""
    return min(attempt_bound_s(settings) + attempt_margin_s(settings), visibility_timeout_s(settings))


def rescue_after_s(settings: AnySettings) -> float:
    """Silence after which an unfinished task counts as lost by the broker."""
    return (visibility_timeout_s(settings) + countdown_hop_s(settings)
            + 2 * restore_interval_s(settings) + 5.0)


def delivery_problems(settings: AnySettings) -> list[str]:
    """What is wrong with these numbers together (each setting alone is already checked)."""
    numbers = _numbers(settings)
    given = numbers.visibility_timeout_s
    minimum = minimum_visibility_timeout_s(numbers)
    if given is None or given >= minimum:
        return []
    return [(
        f"MIPOS_VISIBILITY_TIMEOUT_S={given:g} is too small for MIPOS_TIMEOUT_S={numbers.timeout_s:g}: "
        f"a live worker may hold a message for a countdown hop plus one attempt "
        f"({attempt_bound_s(numbers):g} s: {CALLS_PER_ATTEMPT} calls of 2 x MIPOS_TIMEOUT_S) plus "
        f"{attempt_margin_s(numbers):g} s, and would see it delivered again; it must be at least "
        f"{minimum:g} (unset, it is {default_visibility_timeout_s(numbers):g})"
    )]
