"""One order's page, put together from its story (worker/ops/order_status.py): the state as
the operator names it, every attempt on one timeline, and what the story says between the lines
(settle decisions, possible duplicates), read from the attempts and the done record. Pure."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from worker.ops.order_status import OrderStatus
from worker.pages.display import Shown, ago, seconds, shown, when

# The states of the order page, and the Bootstrap colour of each.
STATE_STYLES = {
    "accepted": "success",
    "denied": "success",
    "in flight": "primary",
    "waiting": "info",
    "held by the breaker": "warning",
    "dead-lettered": "danger",
    "unknown": "secondary",
}
WAITING_FOR_EARLIER = "waiting for the earlier"  # an attempt's error while a settle decision waits


@dataclass(frozen=True)
class TimelineRow:
    at: str
    task_id: str
    action: str
    attempt: Any
    outcome: str
    http_status: str
    error_class: str
    error: Shown
    took: str
    wait_before_next: str
    flags: list[str]


@dataclass(frozen=True)
class Note:
    kind: str  # "settle" or "duplicate" or "check"
    text: str


@dataclass(frozen=True)
class OrderPage:
    store_id: str
    order_external_id: str
    delivery_id: str
    state: str
    style: str
    summary: str
    timeline: list[TimelineRow]
    notes: list[Note]
    done: dict[str, str] | None
    tasks: list[dict[str, Any]] = field(default_factory=list)


def order_page(status: OrderStatus, now: float | None = None) -> OrderPage:
    now = time.time() if now is None else now
    state, summary = page_state(status, now)
    attempts = status.attempts()
    done = status.done
    return OrderPage(
        store_id=status.order.store_id,
        order_external_id=status.order.order_external_id,
        delivery_id=status.order.delivery_id,
        state=state,
        style=STATE_STYLES[state],
        summary=summary,
        timeline=[timeline_row(a) for a in attempts],
        notes=notes(status, attempts),
        done=None if done is None else {
            "action": done.action, "at": when(done.at), "task": done.task_id, "delivery": done.delivery_id,
            "message": done.message or "", "confirmed by": done.confirmed_by or "mipos's answer"},
        tasks=[{"task_id": t.task_id, "action": t.action or "", "final": t.final,
                "next": when(t.next_attempt_at) if not t.final else "",
                "held": t.held_by_breaker, "replay_of": t.replay_of or "", "attempts": len(t.attempts)}
               for t in status.tasks],
    )


def page_state(status: OrderStatus, now: float) -> tuple[str, str]:
    """The state as the issue names them: accepted, denied, in flight, waiting (until a time),
    held by the breaker, dead-lettered, unknown."""
    if status.state in ("accepted", "denied", "dead-lettered"):
        return status.state, status.summary
    if status.state == "held":
        return "held by the breaker", status.summary
    unfinished = [t for t in status.tasks if not t.final]
    if not unfinished:  # every task ended, and neither a done record nor a dead letter is left
        return "unknown", ("every task of the order ended, and neither a done record nor a dead letter "
                           "is left (a dead letter discarded or expired): ask mipos")
    due = unfinished[-1].next_attempt_at
    if due is not None and due > now:
        return "waiting", f"until {when(due)} ({ago(due, now)}): {status.summary}"
    return "in flight", status.summary


def timeline_row(attempt: dict[str, Any]) -> TimelineRow:
    flags = []
    if attempt.get("outcome_unknown"):
        flags.append("no answer: may have reached mipos")
    if attempt.get("counted") is False:
        flags.append("not counted")
    elapsed = attempt.get("elapsed_ms")
    status = attempt.get("http_status")
    return TimelineRow(
        at=when(attempt.get("at")),
        task_id=str(attempt.get("task_id") or ""),
        action=str(attempt.get("action") or ""),
        attempt=attempt.get("attempt"),
        outcome=str(attempt.get("outcome") or ""),
        http_status="" if status is None else str(status),
        error_class=str(attempt.get("error_class") or ""),
        error=shown(attempt.get("error"), 600),
        took=seconds(elapsed / 1000) if isinstance(elapsed, (int, float)) else "",
        wait_before_next=seconds(attempt.get("retry_in_s")),
        flags=flags,
    )


def notes(status: OrderStatus, attempts: list[dict[str, Any]]) -> list[Note]:
    """Settle decisions and duplicate warnings, as the worker's lines say them."""
    found: list[Note] = []
    unknown = [a for a in attempts if a.get("outcome_unknown")]
    for a in unknown:
        found.append(Note("settle", f"attempt {a.get('attempt')} of task {a.get('task_id')} at {when(a.get('at'))} "
                                    "got no answer: the request may have reached mipos, so the next attempt "
                                    "first asks mipos's pending list whether it landed"))
    for a in attempts:
        if str(a.get("error") or "").startswith(WAITING_FOR_EARLIER):
            found.append(Note("settle", f"attempt {a.get('attempt')} of task {a.get('task_id')} waited for an "
                                        "unanswered request to land or not before deciding; nothing was sent"))
    done = status.done
    if done is not None and done.confirmed_by == "pending_list":
        found.append(Note("settle", f"settled by mipos's pending list: mipos no longer listed the order after "
                                    f"a request of task {done.task_id} whose answer never came, so that request "
                                    f"landed: the order was {_past(done.action)} there"))
    elif done is not None and any((a.get("at") or 0) <= done.at for a in unknown):
        found.append(Note("duplicate", f"possible duplicate: the order was {_past(done.action)} by task "
                                       f"{done.task_id}, after an earlier request that got no answer and may "
                                       "have reached mipos too (the attempt line says possible_duplicate)"))
    for letter in status.dead_letters:
        if letter.reason == "permanent_after_unknown" and not letter.replayed:
            found.append(Note("check", f"dead letter {letter.id} was refused after an unanswered request of "
                                       "the same action, which may have landed: ask mipos before replaying "
                                       "(a replay is refused unless mipos still lists the order)"))
    return found


def _past(action: str) -> str:
    return "accepted" if action == "accept" else "denied" if action == "deny" else action


def pending_answer(listed: Any, created_at: float | None, window_s: float, now: float | None = None) -> str:
    """What the Ask mipos button says: whether mipos still waits for the order, and for how long."""
    now = time.time() if now is None else now
    if not listed:
        return ("mipos does not list the order as pending: it was accepted or denied there, or it is older "
                f"than mipos's pending window ({seconds(window_s)}), or it never reached mipos")
    if created_at is None:
        return "mipos lists the order as pending: it still waits for an accept or a deny"
    until = created_at + window_s
    left = f"for about {seconds(until - now)} more (until {when(until)})" if until > now else \
        "though its pending window should be over"
    return (f"mipos lists the order as pending, created {when(created_at)}: it still waits for an accept or a "
            f"deny, {left}")
