"""Sweeps and listings cost what they report, not what Redis holds (issue 11, item 14).

Real redis-server; Redis's own command counters (``INFO commandstats``) say
what one sweep or one listing cost.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis

from support.processes import RedisServer, wait_for

PREFIX = "mipos:"
QUEUE = "mipos"
QUEUED = 20_000


def command_counts(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def measured(client: redis.Redis, action: Any) -> tuple[Any, dict[str, int]]:
    """Run ``action`` and return its result and the commands Redis served meanwhile
    (without the measuring commands themselves)."""
    client.config_resetstat()
    result = action()
    counts = command_counts(client)
    for own in ("config|resetstat", "config", "info"):
        counts.pop(own, None)
    return result, {name: calls for name, calls in counts.items() if calls}


def server_time(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def message(task_id: str) -> bytes:
    """A queued Celery message, as kombu stores it (only the parts the sweeper reads matter)."""
    return json.dumps({
        "body": "W10=", "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": "mipos.accept_order", "id": task_id},
        "properties": {"delivery_tag": f"tag-{task_id}", "priority": 0,
                       "delivery_info": {"exchange": "", "routing_key": QUEUE}},
    }).encode()


def register(pipe: Any, task_id: str, published_at: float | None, last_seen: float) -> None:
    """An in-flight entry in the shape mipos_worker/state/inflight.py writes."""
    entry: dict[str, Any] = {"task": "mipos.accept_order",
                             "kwargs": {"delivery_id": "1", "store_id": "3", "order_external_id": task_id}}
    if published_at is not None:
        entry["published_at"] = published_at
    pipe.hset(f"{PREFIX}inflight", task_id, json.dumps(entry))
    pipe.zadd(f"{PREFIX}inflight:heartbeat", {task_id: last_seen})


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    redis_server.client.flushall()
    yield redis_server.client
    redis_server.client.flushall()


@pytest.fixture
def sweeper(client: redis.Redis, tasks: Any) -> Any:
    from mipos_worker.state.inflight import InflightRegistry
    from worker.wiring.celery_app import app
    from worker.wiring.rescue import LostMessageSweeper

    return LostMessageSweeper(app, InflightRegistry(client, PREFIX), client, QUEUE,
                              silent_after_s=60, interval_s=1)


def fill_queue(client: redis.Redis, now: float, stale_queued: int) -> list[str]:
    """``QUEUED`` registered messages, oldest at the pop end, the oldest ``stale_queued``
    silent for ten minutes (a backlog): all published in the last half hour."""
    ids = [f"queued-{i}" for i in range(QUEUED)]
    pipe = client.pipeline(transaction=False)
    for i, task_id in enumerate(ids):
        published = now - 1800 + i * 0.05
        pipe.lpush(QUEUE, message(task_id))  # producers LPUSH, workers BRPOP
        register(pipe, task_id, published, now - 600 if i < stale_queued else now)
    pipe.execute()
    return ids


def lose(client: redis.Redis, count: int, published_at: float | None, last_seen: float,
         tag: str = "lost") -> list[str]:
    ids = [f"{tag}-{i}" for i in range(count)]
    pipe = client.pipeline(transaction=False)
    for task_id in ids:
        register(pipe, task_id, published_at, last_seen)
    pipe.execute()
    return ids


def queued_ids(client: redis.Redis, count: int) -> list[str]:
    """The ``count`` newest messages (pushed last)."""
    return [json.loads(raw)["headers"]["id"] for raw in client.lrange(QUEUE, 0, count - 1)]


# -- the rescue sweep -------------------------------------------------------------------


def test_a_sweep_costs_the_stale_entries_not_the_queue(client: redis.Redis, sweeper: Any) -> None:
    now = server_time(client)
    fill_queue(client, now, stale_queued=50)
    lost = lose(client, 10, published_at=now - 3600, last_seen=now - 3000)

    rescued, counts = measured(client, sweeper.sweep_once)

    assert rescued == 10
    assert set(queued_ids(client, 10)) == set(lost)  # re-published, once each
    assert client.llen(QUEUE) == QUEUED + 10
    assert "lrange" not in counts and "hvals" not in counts and "hgetall" not in counts, counts
    stale_entries = 50 + 10
    assert sum(counts.values()) <= 10 * stale_entries + 20, counts


def test_stale_messages_still_queued_are_left_alone(client: redis.Redis, sweeper: Any) -> None:
    now = server_time(client)
    fill_queue(client, now, stale_queued=200)

    rescued, counts = measured(client, sweeper.sweep_once)

    assert rescued == 0
    assert client.llen(QUEUE) == QUEUED
    assert "lrange" not in counts and "hvals" not in counts and "hscan" not in counts, counts
    assert sum(counts.values()) <= 5 * 200 + 20, counts


def test_a_lost_message_published_after_the_oldest_queued_one_waits(client: redis.Redis,
                                                                    sweeper: Any) -> None:
    """It might be queued (the queue is read only at its pop end): nothing is rescued
    until every message published before it has been taken."""
    now = server_time(client)
    fill_queue(client, now, stale_queued=0)
    lose(client, 3, published_at=now - 60, last_seen=now - 3000)
    assert sweeper.sweep_once() == 0
    client.delete(QUEUE, f"{PREFIX}rescue:lock")
    assert sweeper.sweep_once() == 3


def test_an_unregistered_message_at_the_pop_end_stops_the_rescue(client: redis.Redis,
                                                                 sweeper: Any) -> None:
    now = server_time(client)
    client.lpush(QUEUE, message("sent-by-name-unregistered"))
    lose(client, 2, published_at=now - 3600, last_seen=now - 3000)
    assert sweeper.sweep_once() == 0  # cannot tell how old the queue is: be safe
    client.delete(QUEUE, f"{PREFIX}rescue:lock")
    assert sweeper.sweep_once() == 2


def test_entries_without_published_at_are_rescued_only_from_an_empty_queue(
        client: redis.Redis, sweeper: Any) -> None:
    """Entries written before published_at existed (an upgrade)."""
    now = server_time(client)
    client.lpush(QUEUE, message("young"))
    lose(client, 1, published_at=now, last_seen=now, tag="young")
    lose(client, 2, published_at=None, last_seen=now - 3000)
    assert sweeper.sweep_once() == 0
    client.delete(QUEUE, f"{PREFIX}rescue:lock")
    assert sweeper.sweep_once() == 2


def test_a_message_a_worker_holds_is_not_rescued(client: redis.Redis, sweeper: Any) -> None:
    """Taken from the queue after waiting there longer than the silence threshold, and not
    started yet (no heartbeat): in kombu's unacked hash only."""
    now = server_time(client)
    fill_queue(client, now, stale_queued=0)
    [held] = lose(client, 1, published_at=now - 3600, last_seen=now - 3000, tag="held")
    [lost] = lose(client, 1, published_at=now - 3600, last_seen=now - 3000, tag="lost")
    client.hset("unacked", "tag-held", json.dumps([json.loads(message(held)), "", QUEUE]))
    client.zadd("unacked_index", {"tag-held": now})

    rescued, counts = measured(client, sweeper.sweep_once)

    assert rescued == 1
    assert queued_ids(client, 1) == [lost]
    assert "hvals" not in counts and "lrange" not in counts, counts


def test_a_message_in_a_priority_queue_counts_as_queued(client: redis.Redis, sweeper: Any) -> None:
    now = server_time(client)
    [waiting] = lose(client, 1, published_at=now - 3600, last_seen=now - 3000, tag="prio")
    client.lpush(f"{QUEUE}\x06\x163", message(waiting))
    assert sweeper.sweep_once() == 0


# -- the dead letters ---------------------------------------------------------------------


def members(client: redis.Redis, key: str) -> list[str]:
    return [bytes(x).decode() for x in cast(list[bytes], client.zrange(key, 0, -1))]


def add_letter(store: Any, order_id: str, reason: str = "deadline", store_id: str = "3") -> Any:
    return store.add(action="accept", order={"delivery_id": "1", "store_id": store_id,
                                             "order_external_id": order_id},
                     reason=reason, error="boom", task_id=f"task-{order_id}", enqueued_at=None,
                     attempts=[])


def write_letters(client: redis.Redis, count: int, newest_at: float, reason: str,
                  tag: str) -> list[str]:
    """Letters written straight into Redis as DeadLetters.add writes them (fast in bulk)."""
    from worker.state.deadletters import DEAD_LETTER_TTL_S

    ids = []
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        letter_id = f"{tag}{i:012d}"[-16:]
        failed_at = newest_at - i
        letter: dict[str, Any] = {"id": letter_id, "action": "accept", "reason": reason, "error": "boom",
                  "order": {"delivery_id": "1", "store_id": "3", "order_external_id": f"{tag}-{i}"},
                  "task_id": f"task-{tag}-{i}", "enqueued_at": None, "failed_at": failed_at,
                  "attempts": [], "replay_of": None}
        pipe.set(f"{PREFIX}dead:{letter_id}", json.dumps(letter), ex=DEAD_LETTER_TTL_S)
        pipe.zadd(f"{PREFIX}dead", {letter_id: failed_at})
        ids.append(letter_id)
    pipe.execute()
    return ids


def write_expired_ids(client: redis.Redis, count: int, now: float) -> None:
    """What letters that expired leave behind in the index (their keys are gone)."""
    from worker.state.deadletters import DEAD_LETTER_TTL_S

    client.zadd(f"{PREFIX}dead", {f"gone{i:012d}": now - DEAD_LETTER_TTL_S - 10 - i
                                  for i in range(count)})


def test_expired_letters_leave_both_indexes(client: redis.Redis,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.state.deadletters
    from worker.ops.metrics import read_gauges
    from worker.state.deadletters import DeadLetters

    monkeypatch.setattr(worker.state.deadletters, "DEAD_LETTER_TTL_S", 1)
    store = DeadLetters(client, PREFIX)
    old = [add_letter(store, "order-a"), add_letter(store, "order-b")]
    wait_for(lambda: all(store.get(x.id) is None for x in old), timeout=10, what="the letters to expire")

    assert read_gauges(client, PREFIX, QUEUE)["mipos_dead_letters_stored"][1] == 0
    assert store.list() == []
    fresh = add_letter(store, "order-a")
    assert members(client, f"{PREFIX}dead") == [fresh.id]
    assert [x.id for x in store.for_order("3", "order-a")] == [fresh.id]
    assert members(client, f"{PREFIX}dead-order:{fresh.order_key}") == [fresh.id]
    assert read_gauges(client, PREFIX, QUEUE)["mipos_dead_letters_stored"][1] == 1


def test_the_gauge_does_not_count_expired_ids(client: redis.Redis) -> None:
    from worker.ops.metrics import read_gauges

    now = time.time()
    write_letters(client, 5, now, "deadline", "live")
    write_expired_ids(client, 3000, now)
    assert read_gauges(client, PREFIX, QUEUE)["mipos_dead_letters_stored"][1] == 5


def test_a_page_costs_its_size_not_the_index(client: redis.Redis) -> None:
    from worker.state.deadletters import DeadLetters

    now = time.time()
    newest = write_letters(client, 2000, now, "deadline", "live")
    write_expired_ids(client, 3000, now)
    store = DeadLetters(client, PREFIX)

    def first_page() -> Any:
        return store.page(limit=10)

    client.config_resetstat()
    page, counts = measured(client, first_page)
    sent = int(client.info("stats")["total_net_output_bytes"])

    assert [x.id for x in page.letters] == newest[:10]
    assert page.next_before is not None
    assert counts.get("get", 0) <= 2 * 11 + 2, counts
    assert sum(counts.values()) <= 40, counts
    assert sent < 20_000, f"{sent} bytes sent for one page of 10"
    assert client.zcard(f"{PREFIX}dead") == 2000  # the expired ids are gone

    second = store.page(limit=10, before=page.next_before)
    assert [x.id for x in second.letters] == newest[10:20]


def test_a_filtered_page_examines_a_bounded_number_of_letters(client: redis.Redis) -> None:
    from worker.state.deadletters import DeadLetters

    now = time.time()
    write_letters(client, 2000, now, "deadline", "newer")
    wanted = write_letters(client, 15, now - 5000, "permanent", "older")
    store = DeadLetters(client, PREFIX)

    page, counts = measured(client, lambda: store.page(limit=10, reason="permanent", max_scan=200))
    assert page.letters == [] and page.next_before is not None
    assert counts.get("get", 0) <= 2 * 200 + 2, counts

    found: list[str] = []
    cursor: str | None = None
    for _ in range(100):
        page = store.page(limit=10, reason="permanent", before=cursor, max_scan=200)
        found += [x.id for x in page.letters]
        cursor = page.next_before
        if cursor is None:
            break
    assert found == wanted
    assert [x.id for x in store.list(reason="permanent")] == wanted


def test_pages_split_letters_that_failed_at_the_same_moment(client: redis.Redis) -> None:
    from worker.state.deadletters import DeadLetters

    now = time.time()
    pipe = client.pipeline(transaction=False)
    ids = [f"{i:016x}" for i in range(7)]
    for letter_id in ids:
        pipe.set(f"{PREFIX}dead:{letter_id}", json.dumps({
            "id": letter_id, "action": "accept", "reason": "deadline", "error": None,
            "order": {}, "task_id": "t", "enqueued_at": None, "failed_at": now, "attempts": []}))
        pipe.zadd(f"{PREFIX}dead", {letter_id: now})
    pipe.execute()
    store = DeadLetters(client, PREFIX)
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = store.page(limit=3, before=cursor)
        seen += [x.id for x in page.letters]
        cursor = page.next_before
        if cursor is None:
            break
    assert sorted(seen) == ids and len(seen) == len(ids)


def test_listing_the_newest_does_not_read_the_whole_index(client: redis.Redis) -> None:
    from worker.state.deadletters import DeadLetters

    now = time.time()
    newest = write_letters(client, 3000, now, "deadline", "live")
    store = DeadLetters(client, PREFIX)
    client.config_resetstat()
    letters = store.list(10)
    sent = int(client.info("stats")["total_net_output_bytes"])
    assert [x.id for x in letters] == newest[:10]
    assert sent < 20_000, f"{sent} bytes sent to list 10 letters"
