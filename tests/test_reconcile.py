"""Reconciliation against the sandbox's pending list, with real Redis, workers and beat."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from support.processes import ROOT, procfile_command, stop_process, wait_for
from tests.conftest import Cluster, ClusterFactory, new_order_id
from worker.state.counters import Metrics

STORE = "9"
ACCEPT_PATH = "/api/v1/integration/order/accept"
RECONCILE_ENV = {"MIPOS_RECONCILE_STORES": STORE, "MIPOS_RECONCILE_GRACE_S": "1"}


def sweep_now() -> None:
    from worker.wiring.celery_app import app

    app.send_task("mipos.reconcile")


def events(cluster: Cluster, name: str, **match: Any) -> list[dict[str, Any]]:
    return [line for line in cluster.lines() if line.get("event") == name
            and all(line.get(k) == v for k, v in match.items())]


def test_delivered_but_never_enqueued_is_reported_each_sweep_and_never_acted_on(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    cluster = make_cluster(**{**RECONCILE_ENV, "MIPOS_RECONCILE_GRACE_S": "60"})
    order_id = new_order_id()
    cluster.control.deliver(STORE, 77, order_id, order_number="A-77", total=31.5,
                            created_at=time.time() - 300)
    young = new_order_id()
    cluster.control.deliver(STORE, 78, young)  # inside the grace period: not reported

    for sweep in (1, 2):
        sweep_now()
        wait_for(lambda: len(events(cluster, "reconcile_finished")) >= sweep, timeout=20,
                 what=f"sweep {sweep}")
    reports = events(cluster, "order_unacknowledged", order_external_id=order_id)
    assert len(reports) == 2
    assert reports[0]["level"] == "error" and reports[0]["order_number"] == "A-77"
    assert reports[0]["total"] == 31.5 and reports[0]["age_s"] >= 300
    assert reports[0]["delivery_id"] == "77" and reports[0]["store_id"] == STORE
    assert events(cluster, "order_unacknowledged", order_external_id=young) == []
    sent = [r for r in cluster.control.requests(order_external_id=order_id) if "order/" in r["path"]]
    assert sent == []
    metrics = Metrics(cluster.redis.client, "mipos:")
    wait_for(lambda: "mipos_orders_unacknowledged_total|" in metrics.read(), timeout=10,
             what="the worker's counts in Redis")
    assert metrics.read()["mipos_orders_unacknowledged_total|"] == 1  # reported twice, counted once


def test_accepted_order_that_mipos_forgot_is_sent_again(make_cluster: ClusterFactory,
                                                        tasks: ModuleType) -> None:
    cluster = make_cluster(**RECONCILE_ENV)
    order_id = new_order_id()
    tasks.accept_order.delay(delivery_id=12, store_id=STORE, order_external_id=order_id)
    cluster.wait_final(order_id)
    cluster.control.deliver(STORE, 12, order_id)  # mipos lists it again: it never got it

    def resent() -> bool:
        sweep_now()
        return bool(wait_for(lambda: events(cluster, "reconcile_finished"), timeout=20)) and bool(
            events(cluster, "reconcile_resend", order_external_id=order_id))

    wait_for(resent, timeout=30, interval=0.5, what="a reconcile_resend (after the 1 s grace)")
    lines = cluster.wait_final(order_id, count=2)
    assert [line["outcome"] for line in lines] == ["accepted", "accepted"]
    assert lines[1]["reconcile_resend"] is True
    assert cluster.control.orders()["orders"][f"{STORE}/{order_id}"]["accepted"] == 2
    pending = cluster.control.requests(path=f"/api/v1/orders/{STORE}")
    assert pending  # the sweep read the list
    wait_for(lambda: not _listed(cluster, order_id), timeout=10, what="the order to leave the list")


def _listed(cluster: Cluster, order_id: str) -> bool:
    sweep_now()
    before = len(events(cluster, "reconcile_finished"))
    wait_for(lambda: len(events(cluster, "reconcile_finished")) > before, timeout=20)
    last = events(cluster, "reconcile_finished")[-1]
    return bool(last["pending"])


def test_two_beat_processes_never_run_two_sweeps_at_once(make_cluster: ClusterFactory,
                                                         tmp_path: Path) -> None:
    cluster = make_cluster(MIPOS_RECONCILE_STORES="9,10,11", MIPOS_RECONCILE_INTERVAL_S="0.5",
                           MIPOS_RECONCILE_GRACE_S="1")
    for store in ("9", "10", "11"):
        cluster.control.deliver(store, 1, new_order_id())
    cluster.control.config(latency_ms=300)  # each sweep takes about a second: beats overlap
    beats = []
    for n in range(2):
        env = {**cluster.env, "BEAT_SCHEDULE_FILE": str(tmp_path / f"beat-{n}")}
        beats.append(subprocess.Popen(
            ["bash", "-c", f"exec {procfile_command('beat')}"], cwd=ROOT, env=env,
            stdout=open(tmp_path / f"beat-{n}.log", "wb"), stderr=subprocess.STDOUT,
            start_new_session=True))
    try:
        wait_for(lambda: len(events(cluster, "reconcile_finished")) >= 4
                 and events(cluster, "reconcile_skipped"), timeout=60, interval=0.2,
                 what="several sweeps, and some skipped")
    finally:
        for beat in beats:
            stop_process(beat)
        cluster.control.config(latency_ms=0)
    sweeps = sorted((line["started_at"], line["finished_at"])
                    for line in events(cluster, "reconcile_finished"))
    for (_, end), (start, _) in zip(sweeps, sweeps[1:]):
        assert start >= end, f"two sweeps overlapped: {sweeps}"
    assert all(b.returncode is not None for b in beats)
    assert "beat: Starting" in (tmp_path / "beat-0.log").read_text()  # the Procfile's beat: line


def test_a_dead_lettered_order_mipos_still_lists_is_reported_as_such(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    cluster = make_cluster(**RECONCILE_ENV)
    order_id = new_order_id()
    cluster.control.deliver(STORE, 31, order_id, created_at=time.time() - 300)
    cluster.control.add_faults(order_id, {"status": 409, "message": "Order not found.", "times": -1})
    tasks.accept_order.delay(delivery_id=31, store_id=STORE, order_external_id=order_id)
    cluster.wait_final(order_id)
    sweep_now()
    wait_for(lambda: events(cluster, "reconcile_finished"), timeout=20, what="a sweep")
    [report] = events(cluster, "order_pending_after_failure", order_external_id=order_id)
    assert report["fail_reason"] == "permanent" and report["error"] == "Order not found."
    assert events(cluster, "order_unacknowledged", order_external_id=order_id) == []


def test_resends_come_from_the_ledger_and_one_odd_item_spoils_nothing(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    """Issue 11, item 10: a null delivery_id used to be sent as "None", a missing one
    aborted the sweep for every later store, and a resend in flight was enqueued again
    on every sweep."""
    cluster = make_cluster(**{**RECONCILE_ENV, "MIPOS_RECONCILE_STORES": f"{STORE},10"})
    with_null, without, lost = new_order_id(), new_order_id(), new_order_id()
    for delivery_id, order_id in ((21, with_null), (22, without)):
        tasks.accept_order.delay(delivery_id=delivery_id, store_id=STORE, order_external_id=order_id)
        cluster.wait_final(order_id)
    cluster.control.deliver("10", 23, lost, created_at=time.time() - 300)  # never enqueued
    # mipos forgot both acceptances, and lists them oddly.
    listed = [{"external_id": with_null, "store_id": STORE, "delivery_id": None},
              {"external_id": without, "store_id": STORE},
              {"external_id": None, "delivery_id": 5}, "not an order"]
    cluster.control.add_call_faults(f"pending:{STORE}", {
        "status": 200, "body": {"message": "Orders.", "data": listed}, "times": -1})
    # The resend of one of them keeps failing: it stays in flight across sweeps.
    cluster.control.add_faults(with_null, {"status": 500, "times": -1})
    time.sleep(1.1)  # the grace period (1 s) of the recorded acceptances must pass

    for sweep in (1, 2):
        sweep_now()
        wait_for(lambda: len(events(cluster, "reconcile_finished")) >= sweep, timeout=20,
                 what=f"sweep {sweep}")
    assert [r["delivery_id"] for r in events(cluster, "reconcile_resend", order_external_id=with_null)] == ["21"]
    assert [r["delivery_id"] for r in events(cluster, "reconcile_resend", order_external_id=without)] == ["22"]
    assert events(cluster, "order_unacknowledged", order_external_id=lost)  # store 10 was swept
    resent = [r for r in cluster.control.requests(order_external_id=with_null) if r["path"] == ACCEPT_PATH]
    assert resent and {r["body"]["delivery_id"] for r in resent} == {"21"}
    skipped = [x for x in cluster.lines() if x.get("event") == "pending_item_skipped"]
    assert len(skipped) >= 2
