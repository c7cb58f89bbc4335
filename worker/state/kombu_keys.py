"""The keys kombu's Redis transport keeps for a queue (its defaults): read by the rescue
sweep, the gauges and ``doctor``, written only by kombu."""

UNACKED_KEY = "unacked"  # messages taken and not yet acknowledged: {delivery tag: [message, ...]}
UNACKED_INDEX_KEY = "unacked_index"  # the same delivery tags, scored by when they were taken
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)


def queue_keys(queue: str) -> list[str]:
    """The lists a queue's messages wait in: one per priority step (the first is the queue's name)."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}" for step in (0, *PRIORITY_STEPS)]
