"""The relay publishes a batch in a few round trips to Redis, not three per row (issue 22, item 4),
keeping its guarantees: each message registered before it can be consumed, the messages as
``delay()``'s path builds them (with their task-sent events), and a row deleted only once Redis
has it. Real SQLite and PostgreSQL, the session's Redis; no worker (the queue is read).
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from support.processes import RedisServer
from tests import mariadb
from tests.test_sql_outbox import engine, messages, rows, store_order

__all__ = ["engine"]  # the fixture, shared with tests/test_sql_outbox.py


@pytest.fixture(scope="module")
def maria_server() -> Iterator[mariadb.MariaDBServer | None]:
    server = mariadb.MariaDBServer() if mariadb.available() else None
    yield server
    if server is not None:
        server.stop()

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


def test_a_batch_takes_a_few_round_trips_whatever_its_size(
        engine: sa.Engine, redis_server: RedisServer, sends: list[int]) -> None:
    from mipos_worker.sql_outbox import Relay, outbox_table

    redis_server.client.delete(QUEUE)
    relay = Relay(engine, batch_size=100, lease_s=60)
    store_order(engine, str(uuid.uuid4()))
    assert relay.run_once().published == 1  # connections made, the script and the queue known
    task_ids = [store_order(engine, str(uuid.uuid4())) for _ in range(60)]
    sends.clear()

    assert relay.run_once().published == 60

    # The registration (one script call) and the messages with their events (one pipeline);
    # row by row it was three a row (180).
    assert len(sends) <= 4, len(sends)
    assert [m["headers"]["id"] for m in messages(redis_server, set(task_ids))] == task_ids
    assert rows(engine, outbox_table) == []
    registered = redis_server.client.hmget("mipos:inflight", task_ids)
    assert all(entry is not None for entry in registered)  # each registered before it went


def comparable(message: dict[str, Any]) -> dict[str, Any]:
    """A queued message with what differs between two orders blanked: its shape and its options."""
    body = json.loads(base64.b64decode(message["body"]))
    headers = {k: v for k, v in message["headers"].items()
               if k not in ("id", "root_id", "kwargsrepr", "argsrepr")}
    properties = {k: v for k, v in message["properties"].items()
                  if k not in ("correlation_id", "delivery_tag", "kwargsrepr")}
    kwargs = body[1]
    kwargs["_mipos"] = sorted(kwargs["_mipos"])
    return {"headers": headers, "properties": properties, "args": body[0],
            "kwargs": sorted(kwargs), "embed": body[2], "content": message["content-type"],
            "encoding": message["content-encoding"]}


def test_a_batched_message_is_the_one_publish_order_sends(
        engine: sa.Engine, redis_server: RedisServer) -> None:
    from mipos_worker.order.model import Action
    from mipos_worker.order.stamps import Stamps
    from mipos_worker.order_tasks import publish_order
    from mipos_worker.sql_outbox import Relay

    redis_server.client.delete(QUEUE)
    one_by_one = str(uuid.uuid4())
    publish_order(Action.ACCEPT, {"delivery_id": "7", "store_id": "3", "order_external_id": "x"},
                  Stamps(), age_s=0.5, task_id=one_by_one)
    batched = [store_order(engine, str(uuid.uuid4())) for _ in range(3)]

    assert Relay(engine, lease_s=60).run_once().published == 3

    [single] = messages(redis_server, {one_by_one})
    for message in messages(redis_server, set(batched)):
        assert comparable(message) == comparable(single)
        assert json.loads(base64.b64decode(message["body"]))[1]["_mipos"]["enqueued_at"] > 1.7e9


def test_every_batched_message_has_its_task_sent_event(
        engine: sa.Engine, redis_server: RedisServer) -> None:
    from mipos_worker.sql_outbox import Relay

    pubsub = redis_server.client.pubsub()
    pubsub.psubscribe("*celeryev*")
    assert pubsub.get_message(timeout=5) is not None
    task_ids = [store_order(engine, str(uuid.uuid4())) for _ in range(5)]
    assert Relay(engine, lease_s=60).run_once().published == 5
    seen: list[str] = []
    while len(seen) < 5 and (message := pubsub.get_message(timeout=5)) is not None:
        event = json.loads(base64.b64decode(json.loads(message["data"])["body"]))
        if event.get("type") == "task-sent":
            seen.append(event["uuid"])
    pubsub.close()
    assert seen == task_ids


def test_a_pipeline_that_fails_keeps_every_row_of_the_batch(
        engine: sa.Engine, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis may or may not have the messages: the rows stay (sent again under the same task ids)."""
    from mipos_worker.sql_outbox import RedisUnavailable, Relay, outbox_table

    relay = Relay(engine, lease_s=60)
    store_order(engine, str(uuid.uuid4()))
    assert relay.run_once().published == 1
    task_ids = [store_order(engine, str(uuid.uuid4())) for _ in range(4)]

    def lost(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise redis.ConnectionError("connection lost while the pipeline ran")

    monkeypatch.setattr(redis.client.Pipeline, "execute", lost)
    with pytest.raises(RedisUnavailable, match="connection lost"):
        relay.run_once()
    monkeypatch.undo()

    kept = rows(engine, outbox_table)
    assert [r.task_id for r in kept] == task_ids
    assert kept[0].tries == 1 and "connection lost" in kept[0].last_error
    assert all(r.claimed_until is None for r in kept)
    assert relay.run_once().published == 4
