"""Everything the shared state knows about one order, for the person on call.

Put together from the ledger (done orders), the in-flight registry (tasks not
final yet, and when each is next due), the breaker's waiting set, the attempt
history of every task of the order, and its dead letters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import redis

from mipos_worker.order.model import Action, Order
from mipos_worker.order.stamps import stamps_of
from mipos_worker.state.inflight import InflightEntry, InflightRegistry
from worker.state.breaker import WAITING_KEY
from worker.state.deadletters import DeadLetter, DeadLetters
from worker.state.ledger import LedgerEntry, OrderLedger

State = Literal["pending", "retrying", "held", "accepted", "denied", "dead-lettered"]


@dataclass(frozen=True)
class TaskStatus:
    task_id: str
    action: str | None
    final: bool
    next_attempt_at: float | None  # unfinished tasks: when a worker next takes it
    held_by_breaker: bool
    attempts: list[dict[str, Any]]
    replay_of: str | None = None


@dataclass(frozen=True)
class OrderStatus:
    order: Order
    state: State
    summary: str
    done: LedgerEntry | None
    tasks: list[TaskStatus]
    dead_letters: list[DeadLetter] = field(default_factory=list)

    def attempts(self) -> list[dict[str, Any]]:
        """Every attempt of every task, oldest first, each with its ``task_id``."""
        rows = [{**a, "task_id": t.task_id, "action": t.action} for t in self.tasks for a in t.attempts]
        return sorted(rows, key=lambda row: row.get("at") or 0.0)


def describe_order(client: redis.Redis, key_prefix: str, store_id: str,
                   order_external_id: str) -> OrderStatus | None:
    """None when nothing at all is known about the order."""
    ledger = OrderLedger(client, key_prefix)
    inflight = InflightRegistry(client, key_prefix)
    letters = DeadLetters(client, key_prefix).for_order(store_id, order_external_id)
    probe = Order(delivery_id="", store_id=store_id, order_external_id=order_external_id)
    done = ledger.done(probe)
    task_ids = ledger.tasks_for(probe)
    task_ids += [letter.task_id for letter in letters if letter.task_id not in task_ids]
    if not task_ids and done is None:
        return None
    held = _held_by_breaker(client, key_prefix, task_ids)
    entries = {task_id: inflight.entry(task_id) for task_id in task_ids}
    tasks = [_task_status(task_id, entries[task_id], ledger, letters, held, done)
             for task_id in task_ids]
    delivery_id = (done.delivery_id if done else None) or _delivery_id(entries, letters)
    order = Order(delivery_id=delivery_id or "?", store_id=store_id,
                  order_external_id=order_external_id)
    state, summary = _state(done, tasks, letters)
    return OrderStatus(order=order, state=state, summary=summary, done=done, tasks=tasks,
                       dead_letters=letters)


def _task_status(task_id: str, entry: InflightEntry | None, ledger: OrderLedger,
                 letters: list[DeadLetter], held: set[str], done: LedgerEntry | None) -> TaskStatus:
    attempts = ledger.history(task_id)
    letter = next((x for x in letters if x.task_id == task_id), None)
    if not attempts and letter is not None:
        attempts = letter.attempts  # the history expired before the dead letter did
    action, next_at, replay_of = None, None, None
    if entry is not None:
        message, due = entry
        kwargs = message.get("kwargs", {})
        action = str(message.get("task", "")).removeprefix("mipos.").removesuffix("_order") or None
        stamps = stamps_of(kwargs if isinstance(kwargs, dict) else {})  # the message's own, under _mipos
        next_at = max(due or 0.0, stamps.not_before or 0.0) or None
        replay_of = stamps.replay_of
    elif letter is not None:
        action, replay_of = letter.action, letter.replay_of
    elif done is not None and done.task_id == task_id:
        action = done.action
    if replay_of is None:
        replay_of = next((x.id for x in letters if (x.replayed or {}).get("task_id") == task_id), None)
    return TaskStatus(task_id=task_id, action=action, final=entry is None,
                      next_attempt_at=next_at, held_by_breaker=task_id in held,
                      attempts=attempts, replay_of=replay_of)


def _held_by_breaker(client: redis.Redis, key_prefix: str, task_ids: list[str]) -> set[str]:
    """Which of the order's tasks wait in the breaker's set (one ZSCORE each, not the set)."""
    pipe = client.pipeline(transaction=False)
    for task_id in task_ids:
        pipe.zscore(key_prefix + WAITING_KEY, task_id)
    return {task_id for task_id, score in zip(task_ids, pipe.execute()) if score is not None}


def _delivery_id(entries: dict[str, InflightEntry | None], letters: list[DeadLetter]) -> str | None:
    for letter in letters:
        if letter.order.get("delivery_id") is not None:
            return str(letter.order["delivery_id"])
    for entry in entries.values():
        if entry is not None and entry[0].get("kwargs", {}).get("delivery_id") is not None:
            return str(entry[0]["kwargs"]["delivery_id"])
    return None


def _state(done: LedgerEntry | None, tasks: list[TaskStatus],
           letters: list[DeadLetter]) -> tuple[State, str]:
    if done is not None:
        outcome = cast(State, Action(done.action).done_outcome)
        return outcome, f"{outcome} at mipos at {_when(done.at)} by task {done.task_id}"
    unfinished = [t for t in tasks if not t.final]
    if unfinished:
        task = unfinished[-1]
        if task.held_by_breaker:
            return "held", ("held while the circuit breaker is open (mipos is failing for "
                            "every worker); no attempt is spent while held")
        if task.attempts:
            last = task.attempts[-1]
            return "retrying", (f"attempt {len(task.attempts)} failed ({last.get('error')}); "
                                f"next attempt {_in(task.next_attempt_at)}")
        return "pending", f"queued, first attempt {_in(task.next_attempt_at)}"
    if letters:
        letter = letters[-1]
        replayed = f"; replayed as task {letter.replayed['task_id']}" if letter.replayed else ""
        return "dead-lettered", (f"failed for good ({letter.reason}): {letter.error}; "
                                 f"dead letter {letter.id}{replayed}")
    return "pending", "enqueued; no worker has reported on it yet"


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def _in(at: float | None) -> str:
    if at is None:
        return "as soon as a worker is free"
    wait = at - time.time()
    return "due now" if wait <= 0 else f"in {wait:.1f}s (at {_when(at)})"

