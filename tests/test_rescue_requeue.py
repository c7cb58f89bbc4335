"""The rescue sweep never re-publishes a message that is still queued, wherever it sits
(issue 24, item 3).

kombu's Redis transport publishes with LPUSH and consumes with BRPOP, so a queue is
ordered by publish time, oldest at the pop end, except for two moves:

- ``reject(requeue=True)`` (our tasks on a Redis error, Celery on a lost pool child)
  puts a message back with LPUSH: at the *newest* end, behind younger messages;
- a restore from the unacked hash (warm shutdown, visibility timeout) RPUSHes
  messages at the pop end one after the other, so the last one restored, not the
  oldest, ends up first.

Real redis-server, real kombu: messages published by the POS-side tasks, taken with
``basic_get``, put back with ``reject(requeue=True)`` or by closing the channel.
A message "looks stale" by having its registry entry aged (published an hour ago,
silent since), not by sleeping.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from kombu import Connection

from support.processes import RedisServer, wait_for
from tests.conftest import new_order_id
from worker.state.kombu_keys import queue_keys

PREFIX = "mipos:"
QUEUE = "mipos"
SILENT_AFTER_S = 60.0
AN_HOUR = 3600.0


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    redis_server.client.flushall()
    yield redis_server.client
    redis_server.client.flushall()


@pytest.fixture
def sweeper(client: redis.Redis, tasks: ModuleType) -> Any:
    """Made first, as a worker makes it when it is ready: before anything is taken."""
    from mipos_worker.state.inflight import InflightRegistry
    from worker.wiring.celery_app import app
    from worker.wiring.rescue import LostMessageSweeper

    return LostMessageSweeper(app, InflightRegistry(client, PREFIX), client, QUEUE,
                              silent_after_s=SILENT_AFTER_S, interval_s=1)


def server_time(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def publish(tasks: ModuleType, count: int, priority: int | None = None) -> list[str]:
    """``count`` accept orders through the POS-side task (registered, then LPUSHed)."""
    options = {} if priority is None else {"priority": priority}
    return [tasks.accept_order.apply_async(
                kwargs={"delivery_id": 5, "store_id": "3", "order_external_id": f"order-{i}"},
                **options).id
            for i in range(count)]


def queued(client: redis.Redis) -> Counter[str]:
    """How many copies of each task the queue holds, over every priority sub-queue."""
    copies: Counter[str] = Counter()
    for key in queue_keys(QUEUE):
        for raw in client.lrange(key, 0, -1):
            copies[json.loads(raw)["headers"]["id"]] += 1
    return copies


def age(client: redis.Redis, task_id: str, seconds: float = AN_HOUR) -> None:
    """The task was published ``seconds`` ago and has been silent since: stale, and older
    than every message published in the test."""
    now = server_time(client)
    entry = json.loads(client.hget(f"{PREFIX}inflight", task_id))
    entry["published_at"] = now - seconds
    client.hset(f"{PREFIX}inflight", task_id, json.dumps(entry))
    client.zadd(f"{PREFIX}inflight:heartbeat", {task_id: now - seconds})


def take(channel: Any) -> Any:
    """What a worker does: pop the oldest message (kombu records it as unacknowledged)."""
    message = channel.basic_get(QUEUE)
    assert message is not None, "the queue is empty"
    return message


def sweep_again(client: redis.Redis, sweeper: Any) -> int:
    client.delete(f"{PREFIX}rescue:lock")  # one sweep per interval: let the next one run now
    return int(sweeper.sweep_once())


def command_counts(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    counts = {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}
    for own in ("config|resetstat", "config", "info"):
        counts.pop(own, None)
    return {name: calls for name, calls in counts.items() if calls}


@pytest.mark.parametrize("priority", [None, 5], ids=["queue", "priority-sub-queue"])
def test_a_requeued_message_behind_younger_ones_is_not_republished(
        client: redis.Redis, redis_server: RedisServer, tasks: ModuleType, sweeper: Any,
        priority: int | None) -> None:
    [oldest] = publish(tasks, 1, priority)
    age(client, oldest)  # it waited in a backlog for an hour
    younger = publish(tasks, 30, priority)
    with Connection(redis_server.url) as connection:
        message = take(connection.default_channel)
        assert message.headers["id"] == oldest
        message.reject(requeue=True)  # Redis error in the task: back at the newest end
    assert json.loads(client.lindex(queue_keys(QUEUE)[1 if priority else 0], 0))["headers"]["id"] == oldest
    age(client, oldest)  # and the failed attempt could not beat

    client.config_resetstat()
    rescued = sweeper.sweep_once()
    counts = command_counts(client)

    assert queued(client) == Counter([oldest, *younger])  # one copy of each
    assert rescued == 0
    assert "lrange" not in counts, counts  # the queue is not read: its length costs nothing
    assert sum(counts.values()) <= 20, counts


def test_messages_restored_out_of_order_at_the_pop_end_are_not_republished(
        client: redis.Redis, redis_server: RedisServer, tasks: ModuleType, sweeper: Any) -> None:
    """A worker shutting down hands back what it holds with RPUSH, in the order it took
    them: the youngest lands at the pop end, the older one right behind it."""
    ids = publish(tasks, 4)
    for task_id in ids[:2]:
        age(client, task_id)
    with Connection(redis_server.url) as connection:
        channel = connection.channel()
        taken = [take(channel).headers["id"], take(channel).headers["id"]]
        assert taken == ids[:2]
        channel.close()  # warm shutdown: restore_unacked RPUSHes ids[0], then ids[1]
    assert json.loads(client.lindex(QUEUE, -1))["headers"]["id"] == ids[1]
    age(client, ids[0], AN_HOUR + 60)  # older than the one now at the pop end

    rescued = sweeper.sweep_once()
    assert queued(client) == Counter(ids)  # one copy of each
    assert rescued == 0


def test_a_really_lost_message_is_still_republished_once(
        client: redis.Redis, redis_server: RedisServer, tasks: ModuleType, sweeper: Any) -> None:
    """Registered, never in the queue, not unacknowledged: re-published, once, even with a
    requeued message and a backlog around it."""
    from mipos_worker.state.inflight import InflightRegistry

    registry = InflightRegistry(client, PREFIX)
    registry.register("lost-task", "mipos.accept_order",
                      {"delivery_id": "5", "store_id": "3", "order_external_id": "lost-order"})
    age(client, "lost-task", AN_HOUR + 60)
    [requeued] = publish(tasks, 1)
    age(client, requeued)
    younger = publish(tasks, 10)
    with Connection(redis_server.url) as connection:
        take(connection.default_channel).reject(requeue=True)
    age(client, requeued)

    assert sweeper.sweep_once() == 1
    assert queued(client) == Counter(["lost-task", requeued, *younger])
    assert sweep_again(client, sweeper) == 0
    assert queued(client) == Counter(["lost-task", requeued, *younger])


def test_a_requeued_message_the_broker_then_loses_is_rescued_once_nothing_older_waits(
        client: redis.Redis, redis_server: RedisServer, tasks: ModuleType, sweeper: Any) -> None:
    """Counted from when it was put back, not from when it was first published: it waits
    while something put in the queue before it is still there, then comes back once."""
    [requeued, *younger] = publish(tasks, 3)
    age(client, requeued)
    with Connection(redis_server.url) as connection:
        take(connection.default_channel).reject(requeue=True)
    [raw] = [raw for raw in client.lrange(QUEUE, 0, -1) if requeued.encode() in raw]
    client.lrem(QUEUE, 1, raw)  # the broker loses it (popped by a worker killed at once)
    age(client, requeued)

    assert sweeper.sweep_once() == 0  # messages queued before it went back still wait
    client.delete(QUEUE)  # they are taken
    assert sweep_again(client, sweeper) == 1
    assert queued(client) == Counter([requeued])
    assert set(younger).isdisjoint(queued(client))


def pool_children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


def test_a_worker_notes_the_requeue_of_a_lost_pool_child(make_cluster: Any, tasks: ModuleType) -> None:
    """The real path: a prefork pool child killed mid-attempt; Celery's main process
    rejects the message with requeue (``task_reject_on_worker_lost``), and the worker's
    note of it is in Redis, so the sweep knows the message went back behind younger ones."""
    cluster = make_cluster(WORKER_POOL="prefork", WORKER_CONCURRENCY="1", MIPOS_TIMEOUT_S="10")
    client = cluster.redis.client
    order_id = new_order_id()
    cluster.control.deliver("3", 5, order_id)  # pending at mipos, so the resend is not skipped
    cluster.control.add_faults(order_id, {"delay_s": 5, "apply": False})  # held, then dropped
    task_id = tasks.accept_order.delay(delivery_id=5, store_id="3", order_external_id=order_id).id
    wait_for(lambda: cluster.control.requests(order_external_id=order_id), timeout=15,
             what="the attempt to be in flight")

    published_at = json.loads(client.hget(f"{PREFIX}inflight", task_id))["published_at"]

    [child] = pool_children(cluster.workers[0].proc.pid)
    os.kill(child, signal.SIGKILL)

    noted_at = wait_for(lambda: client.zscore(f"{PREFIX}rescue:requeued", task_id), timeout=15,
                        what="the worker to note the requeue")
    assert noted_at > published_at  # the message was last pushed when it went back


def test_a_refused_note_does_not_stop_the_requeue(
        client: redis.Redis, redis_server: RedisServer, tasks: ModuleType, sweeper: Any) -> None:
    [task_id] = publish(tasks, 1)
    client.set(f"{PREFIX}rescue:requeued", "not a sorted set")  # Redis answers WRONGTYPE
    with Connection(redis_server.url) as connection:
        take(connection.default_channel).reject(requeue=True)
    assert queued(client) == Counter([task_id])
    assert client.hlen("unacked") == 0
