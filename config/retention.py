"""How long Redis keeps what a finished order leaves behind, and the least that is safe.

Two settings (config/settings.py), one per kind of record:

- ``MIPOS_LEDGER_RETENTION_S``: the done record (``done:<order>``). It stops a
  second send of the same order (a duplicate enqueue, a redelivered or rescued
  message, a retry in flight) and an accept after a deny or the other way
  round; reconciliation reads it to tell a lost answer from a lost order.
- ``MIPOS_HISTORY_RETENTION_S``: the attempt history of each task
  (``attempts:<task>``), the order's task index (``order-tasks:<order>``) and
  a crashed attempt's "sending" mark. A running task reads its history for the
  attempt number and its dead letter; after that only ``mipos-worker order``
  does (a dead letter keeps its own copy of the attempts for 30 days).

Both must outlive the **redelivery horizon**: the longest a task of an order
can still start an attempt after the order was finished by another one, which
is the retry deadline, plus one attempt and its margin, plus one redelivery of
a message a dead worker held (the visibility timeout) and one rescue of a
message the broker lost (the rescue window). The done record must also outlive
mipos's pending list (10 minutes) plus the reconciliation grace and interval.
"""

from __future__ import annotations

import math

from config.model import WorkerSettings
from config.timing import (
    attempt_bound_s,
    attempt_margin_s,
    rescue_after_s,
    visibility_timeout_s,
)

PENDING_LIST_WINDOW_S = 600.0  # mipos lists an unanswered order for 10 minutes

# MEMORY USAGE per order of each kind of record after a plain acceptance (Redis 7.0,
# order ids of 36 characters; `python -m bench` measures them): the sizing estimate.
DONE_RECORD_BYTES = 216
HISTORY_BYTES_PER_ORDER = 408 + 177  # one task's attempt history + the order's task index


def redelivery_horizon_s(settings: WorkerSettings) -> float:
    return (settings.retry.deadline_s + attempt_bound_s(settings) + attempt_margin_s(settings)
            + visibility_timeout_s(settings) + rescue_after_s(settings))


def minimum_history_retention_s(settings: WorkerSettings) -> float:
    return math.ceil(redelivery_horizon_s(settings))


def minimum_ledger_retention_s(settings: WorkerSettings) -> float:
    reconciliation = PENDING_LIST_WINDOW_S + settings.reconcile.grace_s + settings.reconcile.interval_s
    return math.ceil(max(redelivery_horizon_s(settings), reconciliation))


def retention_problems(settings: WorkerSettings) -> list[str]:
    """Each retention below its floor, named with the floor and what it is made of."""
    problems = []
    horizon = (f"MIPOS_RETRY_DEADLINE_S={settings.retry.deadline_s:g} + one attempt and its margin "
               f"({attempt_bound_s(settings) + attempt_margin_s(settings):g} s) + the visibility "
               f"timeout ({visibility_timeout_s(settings):g} s) + the rescue window "
               f"({rescue_after_s(settings):g} s)")
    done_floor = minimum_ledger_retention_s(settings)
    if settings.retention.done_s < done_floor:
        problems.append(
            f"MIPOS_LEDGER_RETENTION_S={settings.retention.done_s:g} is too short: a done record must "
            f"outlive every redelivery of the order ({horizon}) and mipos's 10-minute pending list "
            f"plus MIPOS_RECONCILE_GRACE_S and MIPOS_RECONCILE_INTERVAL_S, or the order could be "
            f"sent twice, or denied after it was accepted; it must be at least {done_floor:g}")
    history_floor = minimum_history_retention_s(settings)
    if settings.retention.history_s < history_floor:
        problems.append(
            f"MIPOS_HISTORY_RETENTION_S={settings.retention.history_s:g} is too short: a task reads "
            f"its attempt history for as long as it can run ({horizon}), or its attempt count "
            f"would start again; it must be at least {history_floor:g}")
    return problems


def bytes_held(settings: WorkerSettings, orders_per_s: float) -> float:
    """Redis memory the finished orders hold at a steady ``orders_per_s``."""
    return orders_per_s * (settings.retention.done_s * DONE_RECORD_BYTES
                           + settings.retention.history_s * HISTORY_BYTES_PER_ORDER)
