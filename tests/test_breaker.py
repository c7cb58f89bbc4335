"""The shared circuit breaker and rate limit, with real Redis, workers and the sandbox."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from support.processes import RedisServer, wait_for
from tests.conftest import Cluster, ClusterFactory, new_order_id

ACCEPT_PATH = "/api/v1/integration/order/accept"
BREAKER_ENV = {
    "MIPOS_BREAKER_FAILURES": "5",
    "MIPOS_BREAKER_WINDOW_S": "10",
    "MIPOS_BREAKER_PROBE_INTERVAL_S": "0.5",
    "MIPOS_RETRY_MAX_ATTEMPTS": "100",
}


def events(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    return sorted((line for line in cluster.lines() if line.get("event") == name),
                  key=lambda line: line["timestamp"])


def accepts(cluster: Cluster) -> list[dict[str, Any]]:
    return cluster.control.requests(path=ACCEPT_PATH)


def test_breaker_opens_probes_and_closes(make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    cluster = make_cluster(**BREAKER_ENV)
    cluster.control.config(fault_rates={"http_500": 1.0})  # mipos is down
    ids = [new_order_id() for _ in range(20)]
    for n, order_id in enumerate(ids):
        tasks.accept_order.delay(delivery_id=n, store_id="3", order_external_id=order_id)
    wait_for(lambda: events(cluster, "breaker_opened"), timeout=20, what="the breaker to open")
    wait_for(lambda: len(events(cluster, "breaker_probe")) >= 4, timeout=20, what="probes")
    during_outage = len(accepts(cluster))

    cluster.control.config(fault_rates={})  # mipos is back
    wait_for(lambda: events(cluster, "breaker_closed"), timeout=20, what="the breaker to close")
    for order_id in ids:
        lines = cluster.wait_final(order_id, timeout=30)
        assert lines[-1]["outcome"] == "accepted"
    [opened] = events(cluster, "breaker_opened")
    assert opened["failures"] >= 5 and opened["level"] == "error"
    held = [line for line in cluster.lines() if line.get("held_by_breaker")]
    assert held and all(line["outcome"] == "retrying" for line in held)
    # While open, requests fell to the probes (plus the attempts in flight when it opened).
    probes = len(events(cluster, "breaker_probe"))
    assert during_outage <= 5 + 4 + probes + 4, (during_outage, probes)
    assert not [line for line in cluster.lines() if line.get("outcome") == "failed"]


def test_rate_limit_is_shared_by_two_processes(make_cluster: ClusterFactory,
                                               tasks: ModuleType) -> None:
    cluster = make_cluster(processes=2, MIPOS_RATE_LIMIT_PER_S="5")
    ids = [new_order_id() for _ in range(25)]
    for n, order_id in enumerate(ids):
        tasks.accept_order.delay(delivery_id=n, store_id="3", order_external_id=order_id)
    for order_id in ids:
        cluster.wait_final(order_id, timeout=40)
    times = sorted(r["time"] for r in accepts(cluster))
    assert times[-1] - times[0] >= 25 / 5 - 1.5
    # Any window of 0.9 s, as the sandbox saw it (0.1 s for the way from grant to arrival).
    windows = [sum(1 for u in times if t <= u < t + 0.9) for t in times]
    assert max(windows) <= 5, [round(t - times[0], 3) for t in times]


def test_deadline_passing_while_the_breaker_is_open(make_cluster: ClusterFactory,
                                                    tasks: ModuleType,
                                                    redis_server: RedisServer) -> None:
    # Probes 5 s apart: once the order's own probe fails, its next hold outlasts the deadline.
    cluster = make_cluster(**{**BREAKER_ENV, "MIPOS_RETRY_DEADLINE_S": "3",
                              "MIPOS_BREAKER_PROBE_INTERVAL_S": "5"})
    cluster.control.config(fault_rates={"http_500": 1.0})
    order_id = new_order_id()
    tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id=order_id)
    lines = cluster.wait_final(order_id, timeout=30)
    final = lines[-1]
    assert final["outcome"] == "failed" and final["fail_reason"] == "deadline"
    assert final["held_by_breaker"] is True and "circuit breaker" in final["error"]
    assert events(cluster, "breaker_opened")
