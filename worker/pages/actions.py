"""What the pages' buttons do: replay a dead letter (worker/ops/replay.py, with the CLI's
refusals) or discard it; each writes one structured line naming the Flower user who did it."""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from mipos_worker.order.errors import InvalidOrder
from worker.ops.replay import Replay, replay_dead_letter
from worker.state.deadletters import DeadLetter, DeadLetters

logger = structlog.stdlib.get_logger("mipos.pages")

MAX_SELECTED = 100  # letters one replay of a list's selection takes


@dataclass(frozen=True)
class Outcome:
    """One letter's result, as the result page shows it."""

    letter_id: str
    store_id: str | None
    order_external_id: str | None
    result: str  # replayed, already_replayed, already_done, not_replayable, discarded, missing
    detail: str
    task_id: str | None = None

    @property
    def done(self) -> bool:
        return self.result in ("replayed", "discarded")


def replay(letters: DeadLetters, letter_id: str, user: str | None) -> Outcome:
    letter = letters.get(letter_id)
    if letter is None:
        return _missing(letter_id)
    try:
        result = replay_dead_letter(letter)
    except InvalidOrder as exc:  # a letter written before today's checks: as the CLI says it
        result = Replay(letter, "not_replayable", f"not replayable: {exc}; enqueue a corrected order instead")
    fields = _fields(letter)
    if result.result == "replayed":
        logger.info("dead_letter_replayed", user=user, letter_id=letter.id, task_id=result.task_id, **fields)
    else:
        logger.info("dead_letter_replay_refused", user=user, letter_id=letter.id, result=result.result,
                    detail=result.detail, **fields)
    return Outcome(letter.id, fields["store_id"], fields["order_external_id"], result.result, result.detail,
                   result.task_id)


def discard(letters: DeadLetters, letter_id: str, user: str | None) -> Outcome:
    letter = letters.discard(letter_id)
    if letter is None:
        return _missing(letter_id)
    fields = _fields(letter)
    logger.info("dead_letter_discarded", user=user, letter_id=letter.id, reason=letter.reason,
                replayed_as=(letter.replayed or {}).get("task_id"), **fields)
    return Outcome(letter.id, fields["store_id"], fields["order_external_id"], "discarded",
                   f"discarded: dead letter {letter.id} is deleted; the order's attempts stay in its history")


def _fields(letter: DeadLetter) -> dict[str, str | None]:
    store, order = letter.order.get("store_id"), letter.order.get("order_external_id")
    return {"action": letter.action, "store_id": None if store is None else str(store),
            "order_external_id": None if order is None else str(order)}


def _missing(letter_id: str) -> Outcome:
    return Outcome(letter_id, None, None, "missing",
                   f"no dead letter {letter_id} (it never existed, was discarded or purged, or expired after 30 days)")
