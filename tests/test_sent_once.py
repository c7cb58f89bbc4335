"""Sent once, and never both accepted and denied, when mipos is slow or a worker is lost.

Against real workers (the Procfile's line), real Redis and the sandbox. Each
order is delivered to the sandbox first, so mipos's pending list lists it until
an accept or deny lands. A sandbox fault ``delay_s`` holds a request and then
applies it: with ``MIPOS_TIMEOUT_S=2`` the worker gives up after 2 s while the
request lands later, as a slow mipos does.
"""

from __future__ import annotations

import signal
import time
from types import ModuleType
from typing import Any

from support.processes import wait_for
from tests.conftest import Cluster, ClusterFactory, dead_letter_of, new_order_id

STORE = "3"
SLOW = {"MIPOS_TIMEOUT_S": "2", "MIPOS_RETRY_BASE_DELAY_S": "0.05", "MIPOS_RETRY_MAX_DELAY_S": "0.2"}


def applied(cluster: Cluster, order_id: str, outcome: str) -> int:
    """How many accepts (``accepted``) or denies (``denied``) of the order mipos applied,
    answered or not."""
    return int(cluster.control.orders()["orders"].get(f"{STORE}/{order_id}", {}).get(outcome, 0))


def wait_answered(cluster: Cluster, order_id: str) -> None:
    """Until every accept and deny request of the order has been answered (or dropped) by the
    sandbox: a slow one has landed by then, and counts."""
    def all_done() -> bool:
        calls = [r for r in cluster.control.requests(order_external_id=order_id)
                 if r["path"].startswith("/api/v1/integration/order/")]
        return bool(calls) and all(r.get("status") is not None or r.get("dropped") for r in calls)
    wait_for(all_done, timeout=20, what=f"the sandbox to answer every request of {order_id}")


def deliver(cluster: Cluster, order_id: str) -> None:
    cluster.control.deliver(STORE, 5, order_id)


def accept(tasks: ModuleType, order_id: str, **options: Any) -> Any:
    return tasks.accept_order.apply_async(
        kwargs={"delivery_id": 5, "store_id": STORE, "order_external_id": order_id}, **options)


def deny(tasks: ModuleType, order_id: str) -> Any:
    return tasks.deny_order.delay(delivery_id=5, store_id=STORE, order_external_id=order_id,
                                  message="Out of stock")


def test_a_slow_accept_that_lands_after_the_timeout_is_not_sent_again(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    """Issue 20, item 1: the same action waits one call's bound (2 x 2 s) from when the
    unanswered request was sent, then asks the pending list; it finds the order gone."""
    cluster = make_cluster(**SLOW)
    order_id = new_order_id()
    deliver(cluster, order_id)
    cluster.control.add_faults(order_id, {"delay_s": 3.0})  # lands 3 s after it arrived; client gave up at 2 s
    accept(tasks, order_id)

    lines = cluster.wait_final(order_id, timeout=30)
    wait_answered(cluster, order_id)
    assert applied(cluster, order_id, "accepted") == 1  # one accept reached mipos
    assert [line["outcome"] for line in lines][-1] == "accepted"
    final = lines[-1]
    assert final["confirmed_by"] == "pending_list" and final["previous_outcome"] == "unknown"
    waits = [line for line in lines if line["outcome"] == "retrying" and line.get("outcome_unknown") is None]
    assert waits and all("waiting for the earlier accept" in line["error"] for line in waits)


def test_a_refusal_after_an_unanswered_accept_that_landed_is_not_a_dead_letter(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    """Issue 20, item 2: the first accept lands late (4.6 s); the second, sent once the
    wait is over (4 s), is refused ``Order not found.``, as a strict mipos answers. The
    pending list no longer shows the order: the first landed, the order is accepted."""
    cluster = make_cluster(**SLOW)
    order_id = new_order_id()
    deliver(cluster, order_id)
    cluster.control.add_faults(order_id, {"delay_s": 4.6},
                               {"status": 409, "message": "Order not found.", "delay_s": 1.5})
    accept(tasks, order_id)

    lines = cluster.wait_final(order_id, timeout=30)
    final = lines[-1]
    assert final["outcome"] == "accepted", final
    assert final["confirmed_by"] == "pending_list" and final["previous_outcome"] == "unknown"
    assert "dead_letter_id" not in final
    assert applied(cluster, order_id, "accepted") == 1


def test_a_refusal_while_mipos_still_lists_the_order_is_a_dead_letter(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    """The same, but the first accept never lands: the refusal is real."""
    cluster = make_cluster(**SLOW)
    order_id = new_order_id()
    deliver(cluster, order_id)
    cluster.control.add_faults(order_id, {"delay_s": 2.5, "apply": False},
                               {"status": 409, "message": "Order not found."})
    accept(tasks, order_id)

    final = cluster.wait_final(order_id, timeout=30)[-1]
    assert final["outcome"] == "failed" and final["fail_reason"] == "permanent"
    assert final["error"] == "Order not found."
    assert dead_letter_of(cluster.redis, order_id).reason == "permanent"


def test_a_refusal_nobody_can_settle_is_dead_lettered_with_its_own_reason(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    """The pending list cannot be read after the refusal: a dead letter whose reason tells
    operators the earlier accept may have landed, naming it."""
    cluster = make_cluster(**SLOW)
    order_id = new_order_id()
    deliver(cluster, order_id)
    cluster.control.add_faults(order_id, {"delay_s": 2.5, "apply": False},
                               {"status": 409, "message": "Order not found."})
    task = accept(tasks, order_id)

    def listed_once() -> bool:
        return any(r["path"].startswith("/api/v1/orders/") for r in cluster.control.requests())
    wait_for(listed_once, timeout=15, what="the pending list read while settling the timeout")
    cluster.control.add_call_faults(f"pending:{STORE}", {"status": 500, "times": -1})

    final = cluster.wait_final(order_id, timeout=30)[-1]
    assert final["outcome"] == "failed" and final["fail_reason"] == "permanent_after_unknown", final
    assert f"task {task.id}" in final["error"] and "may have" in final["error"]
    letter = dead_letter_of(cluster.redis, order_id)
    assert letter.reason == "permanent_after_unknown"


def test_a_lost_workers_accept_is_seen_by_a_deny_of_the_same_order(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    """Issue 24, item 1: the accept is held 4 s at mipos and then applied; its worker is
    killed meanwhile. A deny enqueued on a new worker takes the order's lock once it expires
    (before the visibility timeout brings the accept back): it must see the accept that may
    have landed, settle it by the pending list, and never reach mipos."""
    cluster = make_cluster(MIPOS_TIMEOUT_S="1", MIPOS_VISIBILITY_TIMEOUT_S="24")
    order_id = new_order_id()
    deliver(cluster, order_id)
    cluster.control.add_faults(order_id, {"delay_s": 4.0})
    accept(tasks, order_id)
    wait_for(lambda: cluster.control.requests(order_external_id=order_id), timeout=10,
             what="the accept in flight")
    cluster.workers[0].kill(signal.SIGKILL)
    cluster.start_worker()
    deny(tasks, order_id)

    lines = cluster.wait_final(order_id, count=2, timeout=60)
    wait_answered(cluster, order_id)
    assert applied(cluster, order_id, "denied") == 0  # never both accepted and denied
    assert applied(cluster, order_id, "accepted") == 1
    deny_final = [line for line in lines if line["event"] == "deny_attempt" and line["outcome"] == "failed"]
    assert deny_final and deny_final[0]["confirmed_by"] == "pending_list"
    accept_final = [line for line in lines if line["event"] == "accept_attempt"
                    and line["outcome"] in ("accepted", "skipped", "failed")]
    assert accept_final and accept_final[-1]["outcome"] in ("accepted", "skipped"), accept_final


def test_a_second_copy_that_cannot_take_the_lock_leaves_the_live_request_alone(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    """Issue 24, item 2: a second copy of a task (a republished outbox row, a rescued or
    redelivered message) runs while the first copy's request is in flight. It must not
    record a lost worker, nor mark the order uncertain, nor clear the live copy's mark."""
    cluster = make_cluster(**SLOW)
    order_id = new_order_id()
    deliver(cluster, order_id)
    cluster.control.add_faults(order_id, {"delay_s": 1.5})  # answered within the timeout
    task_id = accept(tasks, order_id).id
    wait_for(lambda: cluster.control.requests(order_external_id=order_id), timeout=10,
             what="the first copy's request in flight")
    accept(tasks, order_id, task_id=task_id)  # the second copy, same task id

    lines = cluster.wait_final(order_id, count=2, timeout=30)
    assert applied(cluster, order_id, "accepted") == 1
    assert sorted(line["outcome"] for line in lines if line["outcome"] != "retrying") == ["accepted", "skipped"]
    assert not any(line.get("outcome_unknown") or line.get("possible_duplicate") for line in lines), lines
    from worker.state.ledger import OrderLedger

    history = OrderLedger(cluster.redis.client, "mipos:").history(task_id)
    assert [r for r in history if r.get("outcome_unknown")] == [], history


def test_the_uncertain_mark_lasts_while_mipos_may_still_take_the_other_action(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    """Issue 24, item 4: with a short deadline (30 s), an accept whose answer never came is
    still remembered while mipos lists the order (10 minutes from its arrival)."""
    cluster = make_cluster(MIPOS_TIMEOUT_S="1", MIPOS_RETRY_DEADLINE_S="30", MIPOS_RETRY_MAX_ATTEMPTS="2",
                           MIPOS_RETRY_BASE_DELAY_S="0.05")
    order_id = new_order_id()
    deliver(cluster, order_id)
    cluster.control.add_faults(order_id, {"delay_s": 2.5, "apply": False}, {"status": 500, "times": -1})
    cluster.control.add_call_faults(f"pending:{STORE}", {"status": 500, "times": -1})
    started = time.time()
    accept(tasks, order_id)

    final = cluster.wait_final(order_id, timeout=60)[-1]
    assert final["outcome"] == "failed"
    keys = cluster.redis.client.keys("mipos:uncertain:*")
    assert keys, "the unknown accept is forgotten"
    remaining = cluster.redis.client.ttl(keys[0])
    assert remaining >= 600 - (time.time() - started) - 5, remaining


def test_a_replay_of_such_a_letter_asks_the_pending_list_first(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    """Issue 20, item 2: ``dead replay`` of a ``permanent_after_unknown`` letter sends again
    only while mipos still lists the order."""
    import subprocess
    import sys
    from pathlib import Path

    from support.processes import ROOT
    from worker.state.deadletters import DeadLetters

    cluster = make_cluster(**SLOW)
    letters = DeadLetters(cluster.redis.client, "mipos:")
    listed, gone = new_order_id(), new_order_id()
    deliver(cluster, listed)
    ids = {}
    for order_id in (listed, gone):
        ids[order_id] = letters.add(
            action="accept", order={"delivery_id": "5", "store_id": STORE, "order_external_id": order_id},
            reason="permanent_after_unknown", error="Order not found. (refused after ...)", task_id="t-1",
            enqueued_at=time.time(), attempts=[]).id
    cli = str(Path(sys.executable).parent / "mipos-worker")

    def replay(letter_id: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([cli, "dead", "replay", letter_id], cwd=ROOT, env=cluster.env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)

    refused = replay(ids[gone])
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "not replayed: mipos no longer lists the order" in refused.stdout
    sent = replay(ids[listed])
    assert sent.returncode == 0 and "replayed: enqueued as task" in sent.stdout, sent.stdout + sent.stderr
    assert cluster.wait_final(listed, timeout=30)[-1]["outcome"] == "accepted"
    assert cluster.attempt_lines(gone) == []
