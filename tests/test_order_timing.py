"""Every order ends where it should: the cases that need a worker of their own settings.

Regression tests for issue 11 (items 4, 8, 11, 15), each against a real Redis,
Procfile workers and the sandbox mipos.
"""

from __future__ import annotations

import time
from types import ModuleType

import pytest

from support.processes import wait_for
from tests.conftest import ClusterFactory, new_order_id
from tests.test_order_integrity import DENY_PATH, at_mipos, send_by_name, sent
from mipos_worker.state.clock import redis_time


def test_a_producer_clock_ahead_does_not_stretch_the_deadline(
        make_cluster: ClusterFactory, tasks: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = make_cluster(MIPOS_RETRY_DEADLINE_S="2", MIPOS_RETRY_MAX_ATTEMPTS="200")
    order_id = new_order_id()
    cluster.control.add_faults(order_id, {"status": 500, "times": -1})
    real_time = time.time
    with monkeypatch.context() as patched:
        patched.setattr(time, "time", lambda: real_time() + 900)
        tasks.accept_order.delay(delivery_id=12, store_id="3", order_external_id=order_id)
    lines = cluster.wait_final(order_id, timeout=60)
    assert lines[-1]["outcome"] == "failed" and lines[-1]["fail_reason"] == "deadline"
    assert len(lines) < 50  # about 2 s of retries, not 200 attempts


def test_a_deny_after_an_unanswered_accept_that_landed_is_refused(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    cluster = make_cluster(MIPOS_RETRY_BASE_DELAY_S="2", MIPOS_RETRY_MAX_DELAY_S="2")
    order_id = new_order_id()
    cluster.control.deliver("3", 13, order_id)
    cluster.control.add_faults(order_id, {"delay_s": 1.6})  # applied after the client gave up at 1 s
    tasks.accept_order.delay(delivery_id=13, store_id="3", order_external_id=order_id)
    wait_for(lambda: cluster.attempt_lines(order_id), timeout=15, what="the accept's unanswered attempt")
    tasks.deny_order.delay(delivery_id=13, store_id="3", order_external_id=order_id,
                           message="Out of stock")

    lines = cluster.wait_final(order_id, count=2, timeout=30)
    [deny_end] = [x for x in lines if x["event"] == "deny_attempt" and x["outcome"] == "failed"]
    assert deny_end["fail_reason"] == "permanent" and "already accepted" in deny_end["error"]
    assert sent(cluster, order_id, DENY_PATH) == []
    assert at_mipos(cluster, "3", order_id)["accepted"] == 1
    assert at_mipos(cluster, "3", order_id)["denied"] == 0


def test_a_deny_after_an_unanswered_accept_that_did_not_land_is_sent(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    # One attempt each: the accept ends (dead-lettered, its outcome unknown) before the deny.
    cluster = make_cluster(MIPOS_RETRY_MAX_ATTEMPTS="1", MIPOS_TIMEOUT_S="0.5")
    order_id = new_order_id()
    cluster.control.deliver("3", 14, order_id)
    # The accept is never applied: the sandbox holds it past the timeout, then drops it.
    cluster.control.add_faults(order_id, {"delay_s": 0.8, "apply": False})
    tasks.accept_order.delay(delivery_id=14, store_id="3", order_external_id=order_id)
    [accept_end] = cluster.wait_final(order_id, timeout=15)
    assert accept_end["fail_reason"] == "attempts" and accept_end["outcome_unknown"] is True
    tasks.deny_order.delay(delivery_id=14, store_id="3", order_external_id=order_id,
                           message="Out of stock")

    lines = cluster.wait_final(order_id, count=2, timeout=30)
    deny_lines = [x for x in lines if x["event"] == "deny_attempt"]
    # It waited until the unanswered accept had had the time one call may take, then the
    # pending list still showed the order: the accept did not land.
    assert all("to land or not" in x["error"] for x in deny_lines[:-1])
    assert deny_lines[-1]["outcome"] == "denied" and deny_lines[-1]["previous_outcome"] == "unknown"
    assert at_mipos(cluster, "3", order_id)["denied"] == 1
    assert at_mipos(cluster, "3", order_id).get("accepted", 0) == 0


def test_orders_held_by_the_breaker_leave_the_waiting_set_on_every_path(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    cluster = make_cluster(MIPOS_BREAKER_FAILURES="3", MIPOS_BREAKER_WINDOW_S="30",
                           MIPOS_BREAKER_PROBE_INTERVAL_S="0.5", MIPOS_RETRY_MAX_ATTEMPTS="50",
                           WORKER_CONCURRENCY="8")
    client = cluster.redis.client
    # An orphan from an earlier crash: its order's deadline has passed.
    client.zadd("mipos:breaker:waiting", {"orphan-task": redis_time(client) - 5})
    order_ids = [new_order_id() for _ in range(6)]
    cluster.control.config(fault_rates={"http_500": 1.0})
    for order_id in order_ids:  # twice each: a released task can find its order's lock taken
        tasks.accept_order.delay(delivery_id=16, store_id="3", order_external_id=order_id)
        tasks.accept_order.delay(delivery_id=16, store_id="3", order_external_id=order_id)
    wait_for(lambda: client.get("mipos:breaker:state") == b"open", timeout=20, what="the breaker to open")
    wait_for(lambda: client.zcard("mipos:breaker:waiting") >= 1 and
             client.zscore("mipos:breaker:waiting", "orphan-task") is None,
             timeout=20, what="held orders, and the orphan gone")
    cluster.control.config(fault_rates={})
    for order_id in order_ids:
        cluster.wait_final(order_id, count=2, timeout=40)
        assert at_mipos(cluster, "3", order_id)["accepted"] == 1
    wait_for(lambda: client.zcard("mipos:breaker:waiting") == 0, timeout=10,
             what="the waiting set to empty")


# -- item 15: absence from the pending list proves nothing for an old order ------------------


def test_an_old_order_missing_from_the_pending_list_is_sent_again(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    cluster = make_cluster(MIPOS_RETRY_DEADLINE_S="600")
    order_id = new_order_id()
    cluster.control.deliver("3", 99, new_order_id())  # the store is known; this order is not listed
    cluster.control.add_faults(order_id, {"delay_s": 1.2, "apply": False})
    now = redis_time(cluster.redis.client)
    send_by_name("mipos.accept_order", kwargs={
        "delivery_id": "15", "store_id": "3", "order_external_id": order_id,
        "_mipos": {"enqueued_at": now - 550}})  # older than the list can vouch for

    lines = cluster.wait_final(order_id, timeout=30)
    # the timeout; the wait for it to land or not; then, the list unable to vouch, the resend
    assert [line["outcome"] for line in lines] == ["retrying", "retrying", "accepted"]
    assert "confirmed_by" not in lines[2] and lines[2]["previous_outcome"] == "unknown"
    assert len(sent(cluster, order_id)) == 2
    assert at_mipos(cluster, "3", order_id)["accepted"] == 1
