"""At-least-once under crashes: SIGKILL, SIGTERM, Redis restarts, foreign serializers."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from kombu import Connection, Exchange, Producer

from support.processes import RedisServer, Sandbox, wait_for
from tests.conftest import Cluster, ClusterFactory, new_order_id

ACCEPT_PATH = "/api/v1/integration/order/accept"
# A short visibility timeout so a killed worker's messages come back within seconds.
CRASH_ENV = {"MIPOS_VISIBILITY_TIMEOUT_S": "12", "MIPOS_TIMEOUT_S": "0.5"}


def accepts_at_sandbox(cluster: Cluster, order_id: str) -> list[dict[str, Any]]:
    return [r for r in cluster.control.requests(order_external_id=order_id)
            if r["path"] == ACCEPT_PATH and r["status"] == 200]


def enqueue(tasks: ModuleType, order_id: str) -> None:
    tasks.accept_order.delay(delivery_id=5, store_id="3", order_external_id=order_id)


def test_sigkill_mid_attempt_is_finished_by_the_next_worker(make_cluster: ClusterFactory,
                                                            tasks: ModuleType) -> None:
    cluster = make_cluster(**CRASH_ENV)
    order_id = new_order_id()
    cluster.control.deliver("3", 5, order_id)  # pending at mipos, so the resend is not skipped
    cluster.control.add_faults(order_id, {"delay_s": 3, "apply": False})  # hangs, then drops
    enqueue(tasks, order_id)
    wait_for(lambda: cluster.control.requests(order_external_id=order_id), timeout=10,
             what="the attempt to be in flight")

    cluster.workers[0].kill(signal.SIGKILL)
    killed_at = time.monotonic()
    cluster.start_worker()
    lines = cluster.wait_final(order_id, timeout=30)

    assert len(accepts_at_sandbox(cluster, order_id)) == 1
    [final] = lines
    assert final["outcome"] == "accepted" and final["attempt"] == 2
    assert final["previous_outcome"] == "unknown" and final["possible_duplicate"] is True
    assert time.monotonic() - killed_at < 25  # the visibility timeout (4 s), not Redis's hour


def test_sigkill_while_holding_a_scheduled_retry(make_cluster: ClusterFactory,
                                                 tasks: ModuleType) -> None:
    cluster = make_cluster(MIPOS_RETRY_BASE_DELAY_S="3", MIPOS_RETRY_MAX_DELAY_S="3", **CRASH_ENV)
    order_id = new_order_id()
    cluster.control.add_faults(order_id, {"status": 409, "message": "Unable to get token."})
    enqueue(tasks, order_id)
    wait_for(lambda: cluster.attempt_lines(order_id), timeout=10, what="the first attempt")

    cluster.workers[0].kill(signal.SIGKILL)
    cluster.start_worker()
    lines = cluster.wait_final(order_id, timeout=30)

    assert [line["outcome"] for line in lines] == ["retrying", "accepted"]
    assert len(accepts_at_sandbox(cluster, order_id)) == 1


def test_sigterm_lets_the_attempt_in_flight_finish(make_cluster: ClusterFactory,
                                                   tasks: ModuleType) -> None:
    cluster = make_cluster(MIPOS_TIMEOUT_S="5")
    order_id = new_order_id()
    cluster.control.add_faults(order_id, {"delay_s": 1.5})  # slow, then applied
    enqueue(tasks, order_id)
    wait_for(lambda: cluster.control.requests(order_external_id=order_id), timeout=10,
             what="the attempt to be in flight")

    worker = cluster.workers[0]
    worker.proc.send_signal(signal.SIGTERM)  # the worker's main process: a warm shutdown
    assert worker.proc.wait(timeout=30) == 0
    [line] = cluster.attempt_lines(order_id)
    assert line["outcome"] == "accepted"
    assert len(accepts_at_sandbox(cluster, order_id)) == 1


def test_sigterm_hands_scheduled_retries_back_without_waiting_them_out(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    cluster = make_cluster(MIPOS_RETRY_BASE_DELAY_S="12", MIPOS_RETRY_MAX_DELAY_S="12")
    order_id = new_order_id()
    cluster.control.add_faults(order_id, {"status": 500, "message": "Server Error"})
    enqueue(tasks, order_id)
    [first] = wait_for(lambda: cluster.attempt_lines(order_id), timeout=10, what="the first attempt")
    assert first["retry_in_s"] >= 6

    worker = cluster.workers[0]
    stopping = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=30) == 0
    assert time.monotonic() - stopping < first["retry_in_s"] - 1, "shutdown waited out the retry"
    assert cluster.redis.client.llen("mipos") == 1  # handed back to the queue at once

    cluster.start_worker()
    lines = cluster.wait_final(order_id, timeout=40)
    assert [line["outcome"] for line in lines] == ["retrying", "accepted"]
    assert len(accepts_at_sandbox(cluster, order_id)) == 1


def test_orders_survive_a_redis_restart(sandbox: Sandbox, logdir: Path, tmp_path: Path,
                                        tasks: ModuleType) -> None:
    durable = RedisServer(tmp_path / "aof-redis", appendonly=True)

    def enqueue_durable(order_id: str) -> None:
        with Connection(durable.url, transport_options={"socket_timeout": 3}) as connection:
            tasks.accept_order.apply_async(
                kwargs={"delivery_id": 5, "store_id": "3", "order_external_id": order_id},
                connection=connection)

    def enqueued(order_id: str) -> bool:
        try:
            enqueue_durable(order_id)
        except Exception:  # Redis still coming back: the POS would retry too
            return False
        return True

    sandbox.control.reset()
    cluster = Cluster(durable, sandbox, logdir, 1,
                      {**CRASH_ENV, "MIPOS_RETRY_BASE_DELAY_S": "2", "MIPOS_RETRY_MAX_DELAY_S": "2"})
    try:
        # A retry scheduled before the restart, held by a running worker.
        held = new_order_id()
        cluster.control.add_faults(held, {"status": 500, "message": "Server Error"})
        enqueue_durable(held)
        wait_for(lambda: cluster.attempt_lines(held), timeout=10, what="the first attempt")
        # An order queued while no worker runs.
        cluster.workers[0].stop()
        queued = new_order_id()
        enqueue_durable(queued)

        durable.stop()
        durable.start()
        cluster.start_worker()
        for order_id in (held, queued):
            lines = cluster.wait_final(order_id, timeout=40)
            assert lines[-1]["outcome"] == "accepted"
            assert len(accepts_at_sandbox(cluster, order_id)) == 1

        # A running worker reconnects by itself after Redis comes back.
        durable.stop()
        durable.start()
        after = new_order_id()
        wait_for(lambda: enqueued(after), timeout=20, what="Redis to take orders again")
        assert cluster.wait_final(after, timeout=40)[-1]["outcome"] == "accepted"
        assert cluster.workers[-1].proc.poll() is None
    finally:
        cluster.stop()
        durable.stop()


def test_a_pickled_message_is_refused_and_never_executed(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster()
    order_id = new_order_id()
    with Connection(cluster.redis.url) as connection:
        producer = Producer(connection, exchange=Exchange("mipos", type="direct"),
                            routing_key="mipos", serializer="pickle")
        producer.publish(
            ((), {"delivery_id": "1", "store_id": "3", "order_external_id": order_id}, {}),
            headers={"task": "mipos.accept_order", "id": new_order_id(), "lang": "py"},
        )
    wait_for(lambda: any("Refusing to deserialize untrusted content of type pickle"
                         in str(line.get("event")) for line in cluster.lines()),
             timeout=15, what="the worker to refuse the pickled message")
    assert cluster.control.requests(order_external_id=order_id) == []
    assert cluster.attempt_lines(order_id) == []


def test_a_message_the_broker_lost_is_rescued(make_cluster: ClusterFactory) -> None:
    """What a worker killed between kombu's BRPOP and its unacked write leaves behind:
    a registered task with no message anywhere."""
    from mipos_worker.state.inflight import InflightRegistry

    cluster = make_cluster(**CRASH_ENV)
    order_id = new_order_id()
    kwargs = {"delivery_id": "5", "store_id": "3", "order_external_id": order_id,
              "enqueued_at": time.time()}
    registry = InflightRegistry(cluster.redis.client, "mipos:")
    registry.register("lost-task-1", "mipos.accept_order", kwargs, countdown=-60)

    [line] = cluster.wait_final(order_id, timeout=30)
    assert line["outcome"] == "accepted" and line["task_id"] == "lost-task-1"
    [rescue] = [entry for entry in cluster.lines() if entry.get("event") == "order_rescued"]
    assert rescue["order_external_id"] == order_id and rescue["silent_for_s"] >= 60
    assert len(accepts_at_sandbox(cluster, order_id)) == 1
    wait_for(lambda: registry.count() == 0, timeout=10, what="the registry to be empty")


def test_the_sweeper_rescues_only_what_is_neither_queued_nor_reserved(
        redis_server: RedisServer, tasks: ModuleType) -> None:
    from mipos_worker.state.inflight import InflightRegistry
    from worker.wiring.celery_app import app
    from worker.wiring.rescue import LostMessageSweeper

    redis_server.client.flushall()
    registry = InflightRegistry(redis_server.client, "mipos:")
    sweeper = LostMessageSweeper(app, registry, redis_server.client, "mipos",
                                 silent_after_s=30, interval_s=1)
    order_id = new_order_id()
    enqueue(tasks, order_id)
    [(task_id, entry, _)] = registry.stale(-10)
    registry.register(task_id, entry["task"], entry["kwargs"], countdown=-60)  # silent, but queued

    assert sweeper.sweep_once() == 0
    assert redis_server.client.llen("mipos") == 1

    redis_server.client.delete("mipos", "mipos:rescue:lock")  # the broker loses it
    registry.register(task_id, entry["task"], entry["kwargs"], countdown=-60)
    assert sweeper.sweep_once() == 1
    [message] = redis_server.client.lrange("mipos", 0, -1)
    assert task_id.encode() in message and order_id.encode() in message
    redis_server.client.flushall()
