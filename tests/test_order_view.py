"""``mipos-worker order``'s view of a task still on its way, read from its registered message."""

from __future__ import annotations

from support.processes import RedisServer
from tests.conftest import new_order_id
from worker.ops.order_status import describe_order
from mipos_worker.order.stamps import STAMPS_KEY
from mipos_worker.state.inflight import InflightRegistry

PREFIX = "view-test:"


def test_a_waiting_replay_shows_when_it_comes_back_and_what_it_replays(redis_server: RedisServer) -> None:
    """The stamps travel under ``_mipos``: the view reads them there (it read flat keys, and showed
    neither the end of a long wait nor the dead letter a replay came from)."""
    client = redis_server.client
    order_id = new_order_id()
    registry = InflightRegistry(client, PREFIX, 3600.0)
    far = 4_000_000_000.0  # a wait's end (not_before) well after the message's next hop
    message = {"delivery_id": "8", "store_id": "3", "order_external_id": order_id,
               STAMPS_KEY: {"enqueued_at": 1.0, "not_before": far, "replay_of": "letter-7"}}
    registry.register("task-1", "mipos.accept_order", message, countdown=30.0)

    status = describe_order(client, PREFIX, "3", order_id)

    assert status is not None
    [task] = status.tasks
    assert task.replay_of == "letter-7"
    assert task.next_attempt_at == far
