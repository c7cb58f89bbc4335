"""Before sending after an accept or deny whose answer never came: did it land at mipos?

mipos's pending list tells: still listed (it did not land), gone while the
order is young enough to be listed (it landed), or it cannot say. The same
request may always be sent again (flagged as a possible duplicate); the other
one (a deny after an unanswered accept, or the reverse) is never sent blind:
it waits for the list, or is refused once nobody can know.
"""

from __future__ import annotations

from enum import Enum

# mipos lists an order as pending for 10 minutes after it arrived; it arrived at
# mipos before the POS enqueued it, so absence from the list is trusted only while
# the order is younger than this (counted from its enqueue), with room for the
# webhook-to-enqueue delay and for mipos's clock.
PENDING_LIST_TRUSTED_FOR_S = 600.0 - 120.0


class SettleStep(Enum):
    SEND = "send"  # it did not land, or the same request may go again
    LANDED = "landed"  # gone from the list: record it as done, send nothing
    WAIT_FOR_SLOW_REQUEST = "wait"  # still listed, but the other request may still land
    RETRY_LIST_FAILED = "retry"  # the list could not be read; the other request waits
    REFUSE = "refuse"  # nobody can know: the other request is dead-lettered


def settle_step(*, same_action: bool, list_on: bool, list_failed: bool, listed: bool | None,
                age_s: float, in_flight_for_s: float, call_bound_s: float) -> SettleStep:
    """``listed``: whether the pending list still had the order (None: not read)."""
    if not list_on:
        return SettleStep.SEND if same_action else SettleStep.REFUSE
    if list_failed:
        return SettleStep.SEND if same_action else SettleStep.RETRY_LIST_FAILED
    if listed:
        # A slow request may yet land: the other action gives it the time one call may take.
        if not same_action and in_flight_for_s < call_bound_s:
            return SettleStep.WAIT_FOR_SLOW_REQUEST
        return SettleStep.SEND
    if age_s >= PENDING_LIST_TRUSTED_FOR_S:
        return SettleStep.SEND if same_action else SettleStep.REFUSE
    return SettleStep.LANDED
