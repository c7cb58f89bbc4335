"""What the chaos and failover runs set up: the workers' settings, the sandbox's faults, and
the plan of which orders get what (a permanent fault, a late landing, a deny beside the accept).

Shared by ``bench/chaos.py`` and ``bench/failover.py`` (neither imports the other's run).
"""

from __future__ import annotations

import heapq
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.processes import SANDBOX_ENV, Sandbox

TIMEOUT_S = 1.0  # the workers' MIPOS_TIMEOUT_S
CALL_BOUND_S = 2 * TIMEOUT_S  # one call's bound: an unanswered request is given this to land
WORKER_ENV = {
    "MIPOS_TIMEOUT_S": f"{TIMEOUT_S:g}",
    "MIPOS_RETRY_BASE_DELAY_S": "0.1",
    "MIPOS_RETRY_MAX_DELAY_S": "1",
    "MIPOS_RETRY_MAX_ATTEMPTS": "40",
    "MIPOS_RETRY_DEADLINE_S": "600",
    "MIPOS_VISIBILITY_TIMEOUT_S": "20",  # the least MIPOS_TIMEOUT_S=1 allows (hop + attempt + margin)
    "WORKER_CONCURRENCY": "4",
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "INFO",
    "PYTHONUNBUFFERED": "1",
}
FAULT_RATES = {"unable_to_get_token": 0.05, "http_500": 0.05, "timeout": 0.01, "drop": 0.03}
TOKEN_TTL_S = 3.0
PERMANENT_FAULT = {"status": 409, "message": "Order not found.", "times": -1}
STORE_ID = "7"
KEY_PREFIX = "mipos:"
DENY_MESSAGE = "the POS could not store the order (chaos run)"

# The random timeout: the client gives up after 1 s, the request lands at 1.5 s (after the
# worker's first retry would have gone, inside one call's bound), the answer goes at 3 s.
SLOW_LAND_AFTER_S = 1.5
SLOW_ANSWER_AFTER_S = 3.0
# A few orders whose first request lands later than the bound: the documented exception.
LATE_LAND_AFTER_S = 2 * CALL_BOUND_S
# The mixed mode holds requests (answered within the client's timeout) so that a SIGKILL
# finds workers mid-request.
HELD_S = 0.8


def sandbox_config(land_after_s: float, answer_after_s: float) -> dict[str, Any]:
    """The sandbox's random faults, the slow one landing at ``land_after_s``."""
    return {"fault_rates": FAULT_RATES, "timeout_delay_s": answer_after_s,
            "timeout_land_after_s": land_after_s}


def start_sandbox(workdir: Path, *, strict: bool, land_after_s: float, answer_after_s: float) -> Sandbox:
    sandbox = Sandbox(workdir, "--token-ttl-s", str(TOKEN_TTL_S), strict=strict)
    sandbox.control.config(**sandbox_config(land_after_s, answer_after_s))
    return sandbox


def worker_env(sandbox_url: str, redis_env: dict[str, str]) -> dict[str, str]:
    """The workers' environment: this interpreter's venv first on PATH, the sandbox's account."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MIPOS_BASE_URL": sandbox_url,
        **SANDBOX_ENV,
        **WORKER_ENV,
        **redis_env,
    }


# -- the plan --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """An order that gets both an accept and a deny: which goes first, and how much later the other."""

    first: str  # "accept" or "deny"
    gap_s: float  # 0: enqueued back to back

    @property
    def second(self) -> str:
        return "deny" if self.first == "accept" else "accept"


@dataclass
class Plan:
    ids: list[str]
    permanent: set[str] = field(default_factory=set)  # a permanent fault: dead-lettered, rightly
    late: set[str] = field(default_factory=set)  # the first request lands later than the bound
    pairs: dict[str, Pair] = field(default_factory=dict)  # accept and deny both enqueued
    held: set[str] = field(default_factory=set)  # the first request held HELD_S (mixed mode)

    def actions(self, order_id: str) -> tuple[str, ...]:
        pair = self.pairs.get(order_id)
        return (pair.first, pair.second) if pair else ("accept",)

    def faults(self, order_id: str) -> list[dict[str, Any]]:
        """The faults programmed for the order's requests, first in first out."""
        if order_id in self.permanent:
            return [PERMANENT_FAULT]
        if order_id in self.late:
            return [{"delay_s": LATE_LAND_AFTER_S + 1.0, "land_after_s": LATE_LAND_AFTER_S}]
        if order_id in self.held:
            return [{"delay_s": HELD_S}]
        return []


def make_plan(rng: random.Random, ids: list[str], *, permanent: int, late: int,
              pair_share: float = 0.0, held_share: float = 0.0) -> Plan:
    """Draw the orders' roles. Late landings go to single-action orders: a late accept beside
    a deny is allowed to end both accepted and denied, which the mixed mode counts as 0."""
    plan = Plan(ids=list(ids))
    plan.permanent = set(rng.sample(ids, min(permanent, len(ids))))
    rest = [i for i in ids if i not in plan.permanent]
    for order_id in rest:
        if rng.random() < pair_share:
            gap = 0.0 if rng.random() < 0.5 else rng.uniform(0.2, 3.0)
            plan.pairs[order_id] = Pair(rng.choice(("accept", "deny")), round(gap, 3))
    singles = [i for i in rest if i not in plan.pairs]
    plan.late = set(rng.sample(singles, min(late, len(singles))))
    plan.held = {i for i in plan.pairs if rng.random() < held_share}
    return plan


# -- enqueueing ------------------------------------------------------------------------

Publish = Callable[[str, dict[str, Any]], None]  # (action, kwargs): enqueue it, retrying


def task_kwargs(action: str, delivery_id: int, order_id: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"delivery_id": delivery_id, "store_id": STORE_ID, "order_external_id": order_id}
    return {**kwargs, "message": DENY_MESSAGE} if action == "deny" else kwargs


class Enqueuer:
    """Delivers each order to the sandbox (now pending: strict mode needs it), programs its
    faults, and enqueues its task(s); a pair's second task waits ``gap_s`` in a heap,
    sent between later orders."""

    def __init__(self, plan: Plan, sandbox: Sandbox, publish: Publish) -> None:
        self.plan, self.sandbox, self.publish = plan, sandbox, publish
        self.later: list[tuple[float, int, str, dict[str, Any]]] = []  # (due, seq, action, kwargs)
        self.sent = 0

    def order(self, delivery_id: int, order_id: str) -> None:
        self.sandbox.control.deliver(STORE_ID, delivery_id, order_id)
        faults = self.plan.faults(order_id)
        if faults:
            self.sandbox.control.add_faults(order_id, *faults)
        actions = self.plan.actions(order_id)
        self._send(actions[0], task_kwargs(actions[0], delivery_id, order_id))
        pair = self.plan.pairs.get(order_id)
        if pair is not None and pair.gap_s == 0:
            self._send(pair.second, task_kwargs(pair.second, delivery_id, order_id))
        elif pair is not None:
            due = time.monotonic() + pair.gap_s
            heapq.heappush(self.later, (due, delivery_id, pair.second,
                                        task_kwargs(pair.second, delivery_id, order_id)))
        self.flush(wait=False)

    def flush(self, wait: bool) -> None:
        """Send the seconds that are due; with ``wait``, all of them, each at its time."""
        while self.later and (wait or self.later[0][0] <= time.monotonic()):
            due, _, action, kwargs = heapq.heappop(self.later)
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # at most a pair's gap (3 s): the second's own moment
            self._send(action, kwargs)

    def _send(self, action: str, kwargs: dict[str, Any]) -> None:
        self.publish(action, kwargs)
        self.sent += 1
