"""``delay()``'s publish (issue 22, item 2): the registration, then the message and its task-sent
event in one pipeline: two round trips, as stock Celery's LPUSH and PUBLISH; the registration
still first, and a failed one still fails the call. The session's Redis; the queue is read.
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


def test_delay_is_two_round_trips_the_registration_then_one_pipeline(
        tasks: ModuleType, redis_server: RedisServer, sends: list[int], events: Any) -> None:
    tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id=new_order_id())  # warm
    redis_server.client.delete(QUEUE)
    task_sent(events, 1)
    sends.clear()

    result = tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id=new_order_id())

    assert len(sends) == 2, len(sends)  # stock Celery: LPUSH, then PUBLISH of its task-sent event
    [message] = queued(redis_server)
    assert message["headers"]["id"] == result.id
    assert redis_server.client.hget("mipos:inflight", result.id) is not None
    assert task_sent(events, 1) == [result.id]


def test_a_failed_registration_fails_the_call_and_publishes_nothing(
        tasks: ModuleType, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from kombu.exceptions import OperationalError

    from mipos_worker.state.inflight import InflightRegistry

    redis_server.client.delete(QUEUE)

    def refused(*_args: Any, **_kwargs: Any) -> Any:
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(InflightRegistry, "register_many", refused)
    with pytest.raises(OperationalError, match="Redis went away"):
        tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id=new_order_id())
    assert queued(redis_server) == []


def test_a_pipeline_that_fails_is_published_again_as_celerys_retry_would(
        tasks: ModuleType, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's delivery is uncertain: published once more, one command at a time, under the
    same task id (the worker's ledger sends the order once)."""
    tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id=new_order_id())  # warm
    redis_server.client.delete(QUEUE)
    real = redis.client.Pipeline.execute
    failed: list[int] = []

    def lost_once(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not failed:
            failed.append(1)
            self.reset()
            raise redis.ConnectionError("connection lost while the pipeline ran")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", lost_once)
    result = tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id=new_order_id())
    monkeypatch.undo()

    assert failed == [1]
    assert [m["headers"]["id"] for m in queued(redis_server)] == [result.id]
