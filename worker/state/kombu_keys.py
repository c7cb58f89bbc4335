"""The keys kombu's Redis transport keeps for a queue (its defaults): read by the rescue
sweep, the gauges and ``doctor``, written only by kombu.

Where kombu 5.7 puts a message (``kombu/transport/redis.py``): a publish LPUSHes it
(``_put``) and a worker BRPOPs (or RPOPs, ``_get``) from the other end, so the
right end is the oldest. Two moves break that order, and both mark the message
``headers.redelivered``: ``reject(requeue=True)`` LPUSHes it back at the newest
end (``restore_by_tag(leftmost=True)``), and a restore from the unacked hash
(warm shutdown, visibility timeout) RPUSHes messages one after the other at the
pop end (``_do_restore_message``).
"""

UNACKED_KEY = "unacked"  # messages taken and not yet acknowledged: {delivery tag: [message, ...]}
UNACKED_INDEX_KEY = "unacked_index"  # the same delivery tags, scored by when they were taken
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)


def queue_keys(queue: str) -> list[str]:
    """The lists a queue's messages wait in: one per priority step (the first is the queue's name)."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}" for step in (0, *PRIORITY_STEPS)]
