"""Every order ends where it should, whatever the producer sent and whatever its clock says.

Regression tests for issue 11 (items 1, 3, 8, 15), each against a real
Redis, Procfile workers and the sandbox mipos.
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import Cluster, new_order_id
from mipos_worker.order.stamps import PRIVATE_KEYS
from mipos_worker.state.clock import redis_time

ACCEPT_PATH = "/api/v1/integration/order/accept"
DENY_PATH = "/api/v1/integration/order/deny"


def sent(cluster: Cluster, order_id: str, path: str = ACCEPT_PATH) -> list[dict[str, Any]]:
    return [r for r in cluster.control.requests(order_external_id=order_id) if r["path"] == path]


def at_mipos(cluster: Cluster, store_id: str, order_id: str) -> dict[str, Any]:
    return cluster.control.orders()["orders"].get(f"{store_id}/{order_id}") or {}


def send_by_name(name: str, *, args: list[Any] | None = None, kwargs: dict[str, Any] | None = None) -> None:
    from worker.wiring.celery_app import app

    app.send_task(name, args=args or [], kwargs=kwargs or {}, queue="mipos")


# -- item 1: positional arguments survive a retry ------------------------------------


def test_a_positional_message_sent_by_name_keeps_its_order_across_retries(
        cluster: Cluster, tasks: ModuleType) -> None:
    order_id = new_order_id()
    cluster.control.add_faults(order_id, {"status": 500})
    send_by_name("mipos.accept_order", args=["7", "3", order_id])

    lines = cluster.wait_final(order_id)
    assert [line["outcome"] for line in lines] == ["retrying", "accepted"]
    assert lines[1]["delivery_id"] == "7" and lines[1]["store_id"] == "3"
    assert len(sent(cluster, order_id)) == 2
    assert at_mipos(cluster, "3", order_id)["accepted"] == 1


# -- item 3: the stamps only mipos-worker sets ------------------------------------------


@pytest.mark.parametrize("key", PRIVATE_KEYS)
def test_delay_refuses_the_private_stamps(key: str, cluster: Cluster, tasks: ModuleType) -> None:
    before = cluster.redis.client.llen("mipos")
    with pytest.raises(ValueError, match=f"{key}: is set by mipos-worker itself"):
        tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id=new_order_id(),
                                 **{key: 1})
    assert cluster.redis.client.llen("mipos") == before


def test_flat_stamps_sent_by_name_are_ignored_and_logged(cluster: Cluster, tasks: ModuleType) -> None:
    """A far-future not_before used to make the task hop forever, never sent, never dead-lettered."""
    order_id = new_order_id()
    now = redis_time(cluster.redis.client)
    send_by_name("mipos.accept_order", kwargs={
        "delivery_id": "8", "store_id": "3", "order_external_id": order_id,
        "enqueued_at": now - 10_000, "not_before": now + 10_000_000,
    })
    [line] = cluster.wait_final(order_id)
    assert line["outcome"] == "accepted"
    [ignored] = [x for x in cluster.lines() if x.get("event") == "private_keys_ignored"
                 and x.get("order_external_id") == order_id]
    assert ignored["keys"] == ["enqueued_at", "not_before"] and ignored["level"] == "warning"


def test_a_resend_flag_sent_by_name_does_not_send_an_accepted_order_again(
        cluster: Cluster, tasks: ModuleType) -> None:
    order_id = new_order_id()
    tasks.accept_order.delay(delivery_id=9, store_id="3", order_external_id=order_id)
    cluster.wait_final(order_id)
    send_by_name("mipos.accept_order", kwargs={
        "delivery_id": "9", "store_id": "3", "order_external_id": order_id, "reconcile_resend": True})

    lines = cluster.wait_final(order_id, count=2)
    assert [line["outcome"] for line in lines] == ["accepted", "skipped"]
    assert len(sent(cluster, order_id)) == 1


def test_the_deadline_is_checked_before_any_wait(cluster: Cluster, tasks: ModuleType) -> None:
    order_id = new_order_id()
    now = redis_time(cluster.redis.client)
    send_by_name("mipos.accept_order", kwargs={
        "delivery_id": "10", "store_id": "3", "order_external_id": order_id,
        "_mipos": {"enqueued_at": now - 3600, "not_before": now + 3600}})
    [line] = cluster.wait_final(order_id, timeout=10)
    assert line["outcome"] == "failed" and line["fail_reason"] == "deadline"
    assert sent(cluster, order_id) == []


# -- item 8: one clock for the deadline ---------------------------------------------------


@pytest.mark.parametrize("skew_s", [-900.0, 900.0])
def test_a_producer_with_a_wrong_clock_still_gets_its_order_accepted(
        skew_s: float, cluster: Cluster, tasks: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    order_id = new_order_id()
    real_time = time.time
    with monkeypatch.context() as patched:
        patched.setattr(time, "time", lambda: real_time() + skew_s)
        tasks.accept_order.delay(delivery_id=11, store_id="3", order_external_id=order_id)
    [line] = cluster.wait_final(order_id)
    assert line["outcome"] == "accepted"


# -- item 4: an unanswered accept is settled before a deny --------------------------------


# -- item 11: the breaker's waiting set -------------------------------------------------------
