"""The settling table (``worker/attempt/settle.py``), row by row, with its edges.

The README's table "An attempt whose outcome is unknown": what the pending list
says, for the same action and for the other one.
"""

from __future__ import annotations

from typing import Any

import pytest

from worker.attempt.settle import PENDING_LIST_TRUSTED_FOR_S, SettleStep, settle_step

CALL_BOUND_S = 20.0  # 2 x MIPOS_TIMEOUT_S, the default
YOUNG_S = 60.0
OLD_S = 500.0
SLOW_S = 5.0  # in flight for less than one call's bound: may still land
LONG_S = 25.0

SEND, LANDED, WAIT, RETRY, REFUSE = (SettleStep.SEND, SettleStep.LANDED, SettleStep.WAIT_FOR_SLOW_REQUEST,
                                     SettleStep.RETRY_LIST_FAILED, SettleStep.REFUSE)


def step(same: bool, *, list_on: bool = True, failed: bool = False, listed: bool | None = None,
         age_s: float = YOUNG_S, in_flight_s: float = LONG_S) -> SettleStep:
    return settle_step(same_action=same, list_on=list_on, list_failed=failed, listed=listed, age_s=age_s,
                       in_flight_for_s=in_flight_s, call_bound_s=CALL_BOUND_S)


ROWS: list[tuple[str, dict[str, Any], SettleStep, SettleStep]] = [
    # (row, inputs, the same action, the other action). Nothing is sent while the unanswered
# request may still land (in flight for less than one call's bound), whatever the action.
    ("list off", {"list_on": False}, SEND, REFUSE),
    ("list off, slow request", {"list_on": False, "in_flight_s": SLOW_S}, WAIT, REFUSE),
    ("list off, old", {"list_on": False, "age_s": OLD_S}, SEND, REFUSE),
    ("list unreadable", {"failed": True}, SEND, RETRY),
    ("list unreadable, slow request", {"failed": True, "in_flight_s": SLOW_S}, WAIT, RETRY),
    ("list unreadable, old", {"failed": True, "age_s": OLD_S}, SEND, RETRY),
    ("still listed, long in flight", {"listed": True, "in_flight_s": LONG_S}, SEND, SEND),
    ("still listed, slow request", {"listed": True, "in_flight_s": SLOW_S}, WAIT, WAIT),
    ("still listed, just now", {"listed": True, "in_flight_s": 0.0}, WAIT, WAIT),
    ("still listed, one bound exactly", {"listed": True, "in_flight_s": CALL_BOUND_S}, SEND, SEND),
    ("still listed, old", {"listed": True, "age_s": OLD_S, "in_flight_s": LONG_S}, SEND, SEND),
    ("still listed, old, slow", {"listed": True, "age_s": OLD_S, "in_flight_s": SLOW_S}, WAIT, WAIT),
    ("gone, young", {"listed": False}, LANDED, LANDED),
    ("gone, young, slow", {"listed": False, "in_flight_s": SLOW_S}, LANDED, LANDED),
    ("gone, just under trusted age", {"listed": False, "age_s": PENDING_LIST_TRUSTED_FOR_S - 0.001},
     LANDED, LANDED),
    ("gone, trusted age exactly", {"listed": False, "age_s": PENDING_LIST_TRUSTED_FOR_S}, SEND, REFUSE),
    ("gone, too old", {"listed": False, "age_s": OLD_S}, SEND, REFUSE),
]


@pytest.mark.parametrize(("inputs", "same_step", "other_step"), [row[1:] for row in ROWS],
                         ids=[row[0] for row in ROWS])
def test_settle_table(inputs: dict[str, Any], same_step: SettleStep, other_step: SettleStep) -> None:
    assert step(True, **inputs) is same_step
    assert step(False, **inputs) is other_step


def test_the_list_is_trusted_for_eight_minutes() -> None:
    assert PENDING_LIST_TRUSTED_FOR_S == 480.0


@pytest.mark.parametrize("listed", [None, True, False])
def test_a_failed_list_is_never_read_as_an_answer(listed: bool | None) -> None:
    """Whatever ``listed`` holds, a list that could not be read decides nothing."""
    assert step(True, failed=True, listed=listed) is SEND
    assert step(False, failed=True, listed=listed) is RETRY


@pytest.mark.parametrize("failed", [False, True])
@pytest.mark.parametrize("listed", [None, True, False])
def test_with_the_list_off_nothing_else_counts(failed: bool, listed: bool | None) -> None:
    assert step(True, list_on=False, failed=failed, listed=listed, age_s=YOUNG_S) is SEND
    assert step(False, list_on=False, failed=failed, listed=listed, age_s=YOUNG_S) is REFUSE


def test_the_other_action_is_never_sent_blind() -> None:
    """Across a grid of inputs: the other action is sent only when the list was read, still
    lists the order, and the unknown request had one call's bound to land."""
    for list_on in (False, True):
        for failed in (False, True):
            for listed in (None, True, False):
                for age in (0.0, YOUNG_S, PENDING_LIST_TRUSTED_FOR_S, OLD_S, 10_000.0):
                    for in_flight in (0.0, SLOW_S, CALL_BOUND_S, LONG_S):
                        got = step(False, list_on=list_on, failed=failed, listed=listed, age_s=age,
                                   in_flight_s=in_flight)
                        if got is SEND:
                            assert list_on and not failed and listed and in_flight >= CALL_BOUND_S
                        same = step(True, list_on=list_on, failed=failed, listed=listed, age_s=age,
                                    in_flight_s=in_flight)
                        assert same in (SEND, LANDED, WAIT)  # the same action is never refused,
                        if same is SEND:  # nor sent while the unanswered one may still land
                            assert in_flight >= CALL_BOUND_S
