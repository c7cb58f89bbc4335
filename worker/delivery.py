"""How Celery delivers our messages on Redis: the numbers and why they are what they are.

Kept apart from the app so the README and the tests can refer to one place.
"""

from __future__ import annotations

from config import WorkerSettings

QUEUE = "mipos"  # the one queue order tasks travel on

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
CALLS_PER_ATTEMPT = 6


def attempt_bound_s(settings: WorkerSettings) -> float:
    """The longest one attempt can take: every call at its connect + read timeouts."""
    return CALLS_PER_ATTEMPT * 2 * settings.mipos.timeout_s


def visibility_timeout_s(settings: WorkerSettings) -> float:
    """Long enough for the longest hop plus the longest attempt, with slack.

    A worker killed with SIGKILL gets its messages back after this, so it must
    stay well inside mipos's 10-minute window: 30 + 120 + 30 = 180 s by default.
    ``MIPOS_VISIBILITY_TIMEOUT_S`` overrides it.
    """
    if settings.visibility_timeout_s is not None:
        return settings.visibility_timeout_s
    return MAX_COUNTDOWN_HOP_S + attempt_bound_s(settings) + 30


def countdown_hop_s(settings: WorkerSettings) -> float:
    return min(MAX_COUNTDOWN_HOP_S, visibility_timeout_s(settings) / 4)


def restore_interval_s(settings: WorkerSettings) -> float:
    return min(UNACKED_RESTORE_INTERVAL_S, max(0.5, visibility_timeout_s(settings) / 4))


def order_lock_ttl_s(settings: WorkerSettings) -> float:
    """Covers one attempt, but never outlives the visibility timeout: the lock of
    a killed worker must be gone by the time its message is handed out again."""
    return min(attempt_bound_s(settings) + 10.0, visibility_timeout_s(settings))


def rescue_after_s(settings: WorkerSettings) -> float:
    """Silence after which an unfinished task counts as lost by the broker."""
    return (visibility_timeout_s(settings) + countdown_hop_s(settings)
            + 2 * restore_interval_s(settings) + 5.0)
