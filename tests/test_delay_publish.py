"""``delay()``'s publish (issue 22, item 2): the registration, the message and its task-sent event
in one script call: one round trip, where stock Celery makes two (LPUSH, PUBLISH); the message
never on the queue unregistered, and a failed registration fails the call and publishes nothing.
The session's Redis; the queue is read.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import redis

from support.processes import RedisServer
from tests.conftest import new_order_id

QUEUE = "mipos"


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per write to a Redis socket from this process: a round trip each."""
    counted: list[int] = []
    real = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        counted.append(1)
        real(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    return counted


@pytest.fixture
def events(redis_server: RedisServer) -> Iterator[Any]:
    pubsub = redis_server.client.pubsub()
    pubsub.psubscribe("*celeryev*")
    assert pubsub.get_message(timeout=5) is not None  # the subscription itself
    yield pubsub
    pubsub.close()


def queued(redis_server: RedisServer) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in redis_server.client.lrange(QUEUE, 0, -1)]


def task_sent(pubsub: Any, count: int) -> list[str]:
    """The task ids of the next ``count`` task-sent events (5 s at most each)."""
    found: list[str] = []
    while len(found) < count and (message := pubsub.get_message(timeout=5)) is not None:
        event = json.loads(base64.b64decode(json.loads(message["data"])["body"]))
        if event.get("type") == "task-sent":
            found.append(event["uuid"])
    return found


def test_delay_is_one_round_trip_registration_message_and_event(
        tasks: ModuleType, redis_server: RedisServer, sends: list[int], events: Any) -> None:
    tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id=new_order_id())  # warm
    redis_server.client.delete(QUEUE)
    task_sent(events, 1)
    sends.clear()

    result = tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id=new_order_id())

    assert len(sends) == 1, len(sends)  # stock Celery: LPUSH, then PUBLISH of its task-sent event
    [message] = queued(redis_server)
    assert message["headers"]["id"] == result.id
    entry = json.loads(redis_server.client.hget("mipos:inflight", result.id))
    body = json.loads(base64.b64decode(message["body"]))
    assert entry["enqueued_at"] == body[1]["_mipos"]["enqueued_at"]  # one stamp, Redis's clock
    assert abs(entry["enqueued_at"] - entry["published_at"]) < 1.0
    assert task_sent(events, 1) == [result.id]


def test_the_folded_message_is_the_one_celery_builds(tasks: ModuleType, redis_server: RedisServer) -> None:
    """Beside the same order published the unfolded way (a caller's own connection)."""
    from tests.test_sql_outbox_batch import comparable
    from worker.wiring.celery_app import app

    redis_server.client.delete(QUEUE)
    folded = tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id="x")
    with app.connection_for_write() as connection:
        unfolded = tasks.accept_order.apply_async(
            kwargs={"delivery_id": 1, "store_id": "3", "order_external_id": "x"}, connection=connection)
    by_id = {m["headers"]["id"]: m for m in queued(redis_server)}
    assert comparable(by_id[folded.id]) == comparable(by_id[unfolded.id])


def test_a_registration_redis_refuses_fails_the_call_and_publishes_nothing(
        tasks: ModuleType, redis_server: RedisServer, events: Any) -> None:
    """The script fails inside Redis, before its LPUSH: nothing on the queue, no task-sent event."""
    from kombu.exceptions import OperationalError

    tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id=new_order_id())  # warm
    task_sent(events, 1)
    redis_server.client.delete(QUEUE)
    redis_server.client.delete("mipos:inflight")
    redis_server.client.set("mipos:inflight", "not a hash")  # HSET fails: WRONGTYPE
    try:
        with pytest.raises(OperationalError, match="WRONGTYPE"):
            tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id=new_order_id())
    finally:
        redis_server.client.delete("mipos:inflight")
    assert queued(redis_server) == []
    assert task_sent(events, 1) == []


def test_a_failed_registration_fails_the_call_and_publishes_nothing(
        tasks: ModuleType, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from kombu.exceptions import OperationalError

    from mipos_worker.state.inflight import InflightRegistry

    redis_server.client.delete(QUEUE)

    def refused(*_args: Any, **_kwargs: Any) -> Any:
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(InflightRegistry, "register_and_publish", refused)
    with pytest.raises(OperationalError, match="Redis went away"):
        tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id=new_order_id())
    assert queued(redis_server) == []
