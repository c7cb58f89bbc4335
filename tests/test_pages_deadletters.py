"""The dead letters' owner, as the operator's pages use it: a filter by action, counts by reason
over a time range, one letter discarded from every index, and a page whose Redis cost does not
grow with the number of letters stored (issue 21, item 3)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from support.processes import RedisServer
from worker.state.deadletters import REASONS, DeadLetters

PREFIX = "pagestest:"


@pytest.fixture
def letters(redis_server: RedisServer) -> Iterator[DeadLetters]:
    redis_server.client.flushall()
    yield DeadLetters(redis_server.client, PREFIX)
    redis_server.client.flushall()


def add(store: DeadLetters, number: int, *, action: str = "accept", reason: str = "permanent",
        store_id: str = "3", error: str = "Order not found.") -> str:
    return store.add(action=action, order={"delivery_id": str(number), "store_id": store_id,
                                           "order_external_id": f"order-{number}"},
                     reason=reason, error=error, task_id=f"task-{number}", enqueued_at=time.time(),
                     attempts=[{"attempt": 1, "at": time.time(), "outcome": "failed"}]).id


def test_a_page_filters_by_action(letters: DeadLetters) -> None:
    accepts = [add(letters, n) for n in range(3)]
    denies = [add(letters, n, action="deny") for n in range(3, 5)]

    assert [x.id for x in letters.page(10, action="deny").letters] == denies[::-1]
    assert [x.id for x in letters.page(10, action="accept").letters] == accepts[::-1]


def test_counts_by_reason_over_a_time_range(letters: DeadLetters) -> None:
    before = time.time()
    add(letters, 1)
    add(letters, 2, reason="attempts")
    add(letters, 3, reason="attempts")
    middle = time.time()
    add(letters, 4, reason="invalid")

    counts = letters.counts(since=before)
    assert counts.by_reason == {"permanent": 1, "attempts": 2, "invalid": 1}
    assert counts.total == 4 and counts.uncounted == 0
    assert letters.counts(since=middle).by_reason == {"invalid": 1}
    assert letters.counts(until=middle).by_reason == {"permanent": 1, "attempts": 2}
    assert set(REASONS) >= {"permanent", "permanent_after_unknown", "attempts", "deadline", "invalid"}


def test_letters_written_before_reason_counts_were_kept_are_told_apart(letters: DeadLetters,
                                                                       redis_server: RedisServer) -> None:
    add(letters, 1)
    add(letters, 2, reason="deadline")
    for reason in REASONS:  # as a letter written by an earlier version: in the index only
        redis_server.client.delete(letters.reason_key(reason))

    counts = letters.counts()
    assert counts.total == 2 and counts.by_reason == {} and counts.uncounted == 2


def test_discard_takes_a_letter_out_of_every_index(letters: DeadLetters) -> None:
    kept, gone = add(letters, 1), add(letters, 2)
    letters.claim_replay(gone, "task-x")

    discarded = letters.discard(gone)
    assert discarded is not None and discarded.id == gone
    assert letters.get(gone) is None
    assert [x.id for x in letters.page(10).letters] == [kept]
    assert letters.for_order("3", "order-2") == []
    assert letters.counts().by_reason == {"permanent": 1}
    assert letters.discard(gone) is None  # twice: nothing more to do


def test_purge_keeps_the_counts_right(letters: DeadLetters) -> None:
    add(letters, 1)
    add(letters, 2, reason="attempts")
    assert letters.purge(time.time() + 1) == 2
    assert letters.counts().by_reason == {} and letters.counts().total == 0


def commands(client: redis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def spent(client: redis.Redis, before: dict[str, int]) -> dict[str, int]:
    after = commands(client)
    return {name: calls - before.get(name, 0) for name, calls in after.items()
            if calls - before.get(name, 0) and name != "info"}


def test_a_page_costs_the_same_with_few_or_many_letters(letters: DeadLetters, redis_server: RedisServer) -> None:
    """A first page, a filtered one and the counts read no more letters with 3,000 stored than
    with 60: no KEYS, no SCAN, no read of the whole index."""
    client = redis_server.client

    def cost() -> dict[str, int]:
        before = commands(client)
        letters.page(50)
        letters.page(50, reason="deadline", store_id="9", action="deny", max_scan=500)
        letters.counts(since=time.time() - 3600)
        return spent(client, before)

    for n in range(60):
        add(letters, n, reason="deadline" if n % 7 == 0 else "permanent")
    few = cost()
    for n in range(60, 3000):  # the rest through the owner's write path
        letters.add(action="accept", order={"delivery_id": str(n), "store_id": "3",
                                            "order_external_id": f"order-{n}"},
                    reason="permanent", error="x", task_id=f"t-{n}", enqueued_at=None, attempts=[])
    many = cost()

    assert not {"keys", "scan", "zscan", "hgetall", "hkeys"} & set(many)
    assert many.get("zrevrangebyscore", 0) <= 2 * few.get("zrevrangebyscore", 0) + 60, many
    assert many.get("get", 0) <= 2 * (50 + 500) + 10, many  # the letters of one page, and one budget
    assert few.get("get", 0) <= many.get("get", 0)
