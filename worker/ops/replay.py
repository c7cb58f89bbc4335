"""Send a dead-lettered order again, once the cause is fixed.

A replay is a new task: a fresh attempt budget and deadline, carrying
``replay_of`` so its log lines and a later dead letter point back. The old
task's history stays where it was. A dead letter is claimed in Redis before
its task is enqueued, so replaying it twice (two operators, a script run
twice) enqueues once; and the ledger and order lock stop a second send anyway.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

from config import SettingsError, load_producer_settings
from mipos_worker.order.model import ORDER_FIELDS, Action, Order
from mipos_worker.order.stamps import Stamps
from mipos_worker.state.connection import producer_redis
from worker.state.counters import Metrics
from worker.state.deadletters import DeadLetter, DeadLetters
from worker.state.ledger import OrderLedger

Result = Literal["replayed", "already_replayed", "already_done", "not_replayable"]


@dataclass(frozen=True)
class Replay:
    letter: DeadLetter
    result: Result
    detail: str
    task_id: str | None = None


def replay_dead_letter(letter: DeadLetter) -> Replay:
    from mipos_worker.order_tasks import publish_order

    settings = load_producer_settings()
    client = producer_redis(settings.url)
    letters = DeadLetters(client, settings.key_prefix)
    if letter.reason == "invalid":
        return Replay(letter, "not_replayable",
                      f"not replayable: its arguments are invalid ({letter.error}); enqueue a "
                      "corrected order instead")
    if letter.action not in (Action.ACCEPT.value, Action.DENY.value):
        return Replay(letter, "not_replayable", f"not replayable: unknown action {letter.action!r}")
    current = letters.get(letter.id)
    if current is not None and current.replayed:
        return _already_replayed(letter, current.replayed)
    order = Order(**{k: str(letter.order.get(k)) for k in ORDER_FIELDS})
    if letter.reason == SETTLE_FIRST and (refused := _unless_still_listed(letter, order)) is not None:
        return refused
    done = OrderLedger(client, settings.key_prefix).done(order)
    if done is not None:
        past = Action(done.action).done_outcome
        return Replay(letter, "already_done", f"not replayed: the order was already {past} at "
                      f"mipos (task {done.task_id}); nothing to send")
    task_id = str(uuid.uuid4())
    if letters.claim_replay(letter.id, task_id) is None:  # another replay won the race
        current = letters.get(letter.id)
        return _already_replayed(letter, current.replayed if current and current.replayed else {})
    kwargs: dict[str, Any] = order.fields()
    if letter.action == Action.DENY.value:
        kwargs["message"] = letter.order.get("message")
    try:
        publish_order(Action(letter.action), kwargs, Stamps(replay_of=letter.id), task_id=task_id)
    except BaseException:
        letters.release_replay(letter.id, task_id)
        raise
    Metrics(client, settings.key_prefix).count("mipos_replays_total", action=letter.action)
    return Replay(letter, "replayed", f"replayed: enqueued as task {task_id}", task_id)


# Refused after a request of the same action went unanswered: that request may have landed
# (worker/attempt/story.py, _settle_refusal). Replayed only while mipos still lists the order.
SETTLE_FIRST = "permanent_after_unknown"


def _unless_still_listed(letter: DeadLetter, order: Order) -> Replay | None:
    """None when mipos's pending list still has the order; else why it is not replayed."""
    from worker.mipos.errors import MiposError
    from worker.mipos.pending import fetch_pending
    from worker.wiring.runtime import get_runtime

    try:
        runtime = get_runtime()
        pending, _ = fetch_pending(runtime.client, runtime.tokens, order.store_id)
    except (MiposError, SettingsError) as exc:
        return Replay(letter, "not_replayable",
                      f"not replayed: an earlier {letter.action} of this order may have reached mipos, and "
                      f"mipos's pending list, which would tell, could not be read ({exc}); check the order "
                      "at mipos")
    if any(item.external_id == order.order_external_id for item in pending):
        return None
    return Replay(letter, "not_replayable",
                  f"not replayed: mipos no longer lists the order, so the earlier {letter.action} whose answer "
                  "never came most likely landed (or the order expired); nothing to send; check the order at "
                  "mipos")


def _already_replayed(letter: DeadLetter, claim: dict[str, Any]) -> Replay:
    task_id = claim.get("task_id")
    return Replay(letter, "already_replayed",
                  f"already replayed as task {task_id or '?'}: nothing sent", task_id)
