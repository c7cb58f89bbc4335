"""How long Redis keeps a finished order's records, and how much of it stays (issue 15, item 7)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from types import ModuleType
from typing import Any

import pytest

from bench.measure import long_lived_memory, memory_between
from support.processes import ROOT, SANDBOX_ENV, RedisServer, wait_for
from tests.conftest import ClusterFactory, new_order_id, write_done
from mipos_worker.order.model import Order
from worker.state.ledger import LedgerEntry, OrderLedger

HISTORY_S = 300  # at the floor's side for the test's delivery numbers (251 s), see config/retention.py
LEDGER_S = 900  # floor 780: mipos's 10-minute list + the reconciliation grace and interval
ORDERS = 30


def _finish(cluster_redis: object, tasks: ModuleType, count: int) -> list[str]:
    ids = [new_order_id() for _ in range(count)]
    for order_id in ids:
        tasks.accept_order.delay(delivery_id="41", store_id="3", order_external_id=order_id)
    return ids


def test_what_outlives_the_history_retention_is_at_most_300_bytes_an_order(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    cluster = make_cluster(MIPOS_HISTORY_RETENTION_S=str(HISTORY_S), MIPOS_LEDGER_RETENTION_S=str(LEDGER_S))
    client = cluster.redis.client
    [warm_up] = _finish(client, tasks, 1)  # the token, and the rest that is one per deployment
    cluster.wait_final(warm_up)
    before = long_lived_memory(client, HISTORY_S)
    ids = _finish(client, tasks, ORDERS)
    for order_id in ids:
        cluster.wait_final(order_id)
    wait_for(lambda: client.hlen("mipos:inflight") == 0, timeout=30, what="every task final")

    grown = memory_between(before, long_lived_memory(client, HISTORY_S))
    per_order = sum(size for _, size, _ in grown.values()) / ORDERS
    assert per_order <= 300, f"{per_order:.0f} B an order outlive the history retention: {grown}"
    assert set(grown) == {"mipos:done:…"}, grown
    done_ttl = client.ttl(f"mipos:done:3/{ids[0]}")
    assert LEDGER_S - 60 <= done_ttl <= LEDGER_S
    [task_id] = OrderLedger(client, "mipos:").tasks_for(Order("41", "3", ids[0]))
    assert 0 < client.ttl(f"mipos:attempts:{task_id}") <= HISTORY_S
    assert 0 < client.ttl(f"mipos:order-tasks:3/{ids[0]}") <= HISTORY_S

    # The compact record still says all the operator's `order` command showed before.
    entry = OrderLedger(client, "mipos:").done(Order("41", "3", ids[0]))
    assert entry is not None and (entry.action, entry.delivery_id, entry.task_id) == ("accept", "41", task_id)
    assert (entry.store_id, entry.order_external_id) == ("3", ids[0])


def test_records_of_the_previous_format_still_count(make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    """A done record written by the previous version (every field, nulls included) still stops
    a second accept and a deny after the accept."""
    cluster = make_cluster()
    client = cluster.redis.client
    order_id = new_order_id()
    old: dict[str, Any] = {"action": "accept", "task_id": "old-task", "at": time.time() - 30, "delivery_id": "41",
           "message": None, "store_id": "3", "order_external_id": order_id, "confirmed_by": None}
    client.set(f"mipos:done:3/{order_id}", json.dumps(old), ex=7 * 24 * 3600)
    assert OrderLedger(client, "mipos:").done(Order("41", "3", order_id)) == LedgerEntry(**old)

    tasks.accept_order.delay(delivery_id="41", store_id="3", order_external_id=order_id)
    [skipped] = cluster.wait_final(order_id)
    assert skipped["outcome"] == "skipped" and skipped["done_by_task"] == "old-task"
    tasks.deny_order.delay(delivery_id="41", store_id="3", order_external_id=order_id, message="No")
    lines = cluster.wait_final(order_id, count=2)
    assert lines[-1]["outcome"] == "failed" and "already accepted" in lines[-1]["error"]
    assert not [r for r in cluster.control.requests() if order_id in json.dumps(r.get("body"))]


def test_a_retention_below_the_redelivery_horizon_stops_the_worker(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(processes=0)
    env = {**cluster.env, "MIPOS_LEDGER_RETENTION_S": "600", "MIPOS_HISTORY_RETENTION_S": "60"}
    result = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "worker", "--pool=solo"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "MIPOS_LEDGER_RETENTION_S=600 is too short" in result.stderr
    assert "at least 780" in result.stderr
    assert "MIPOS_HISTORY_RETENTION_S=60 is too short" in result.stderr and "at least 251" in result.stderr


def test_doctor_warns_when_maxmemory_cannot_hold_the_retention(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(processes=0)
    client = cluster.redis.client
    now = float(client.time()[0])
    client.set("mipos:doctor:finished-sample", f"{now - 600:.3f} 0")
    client.hset("mipos:metrics", "mipos_attempts_total|action=accept,error_class=none,outcome=accepted",
                60_000)  # 100 orders/s over the last 10 minutes
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used + 100_000_000)
    try:
        checks = _doctor(cluster.env)
    finally:
        client.config_set("maxmemory", 0)
    memory = checks["redis memory"]
    assert memory["status"] == "warn", memory
    assert "cannot hold the configured retention" in memory["detail"]
    assert re.search(r"(99\.\d|100) orders/s", memory["detail"]) and "MIPOS_LEDGER_RETENTION_S=86400" in memory["detail"]

    unlimited = _doctor(cluster.env)["redis memory"]
    assert unlimited["status"] == "warn" and "no maxmemory" in unlimited["detail"]

    client.config_set("maxmemory", 8_000_000_000)
    try:
        roomy = _doctor({**cluster.env, "MIPOS_LEDGER_RETENTION_S": "900"})["redis memory"]
    finally:
        client.config_set("maxmemory", 0)
    assert roomy["status"] == "ok", roomy


def _doctor(env: dict[str, str]) -> dict[str, dict[str, str]]:
    result = subprocess.run([sys.executable, "-m", "cli", "doctor", "--json", "--skip-mipos",
                             "--ping-timeout", "0.2s"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    return {c["name"]: c for c in json.loads(result.stdout)["checks"]}


def test_an_unset_retention_follows_a_longer_horizon(monkeypatch: pytest.MonkeyPatch,
                                                     redis_server: RedisServer) -> None:
    """The worker's ledger uses the retention the worker's settings check (floors applied)."""
    for name, value in {**SANDBOX_ENV, "MIPOS_RETRY_DEADLINE_S": "3600"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MIPOS_HISTORY_RETENTION_S", raising=False)
    monkeypatch.delenv("MIPOS_LEDGER_RETENTION_S", raising=False)
    client = redis_server.client
    ledger = OrderLedger(client, "retention-test:")
    order = Order("41", "3", new_order_id())
    ledger.record_attempt("task-1", {"attempt": 1}, order)
    write_done(client, "retention-test:", order, "task-1")
    assert 4137 - 5 <= client.ttl("retention-test:attempts:task-1") <= 4137
    assert 86400 - 5 <= client.ttl(f"retention-test:done:3/{order.order_external_id}") <= 86400
