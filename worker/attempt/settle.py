"""Before sending after an accept or deny whose answer never came: did it land at mipos?

mipos's pending list tells: still listed (it did not land), gone while the
order is young enough to be listed (it landed), or it cannot say. Nothing is
sent while the unanswered request may still land: until it has had one call's
bound since it was sent, a delivery comes back later (no attempt spent), for
the same action as for the other. Then the same request may be sent again
(flagged as a possible duplicate when nobody could tell); the other one (a deny
after an unanswered accept, or the reverse) is never sent blind: it waits for
the list, or is refused once nobody can know.
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
    may_still_land = in_flight_for_s < call_bound_s
    readable = list_on and not list_failed
    if readable and listed is False and age_s < PENDING_LIST_TRUSTED_FOR_S:
        return SettleStep.LANDED  # gone from the list: mipos got the earlier request
    if same_action:
        # Sent again only once the unanswered one has had the time one call may take.
        return SettleStep.WAIT_FOR_SLOW_REQUEST if may_still_land else SettleStep.SEND
    if not list_on:
        return SettleStep.REFUSE
    if list_failed:
        return SettleStep.RETRY_LIST_FAILED
    if listed:
        return SettleStep.WAIT_FOR_SLOW_REQUEST if may_still_land else SettleStep.SEND
    return SettleStep.REFUSE  # gone, but too old for the list to tell
