"""One line per attempt, and no duplicate of it (issue 22, item 1): at INFO a plain acceptance
writes our attempt line, with every field the log line's reference promises, and none of
Celery's "received" / "succeeded" lines, which say the same; at DEBUG Celery's come back.
A real worker and the sandbox."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

from tests.conftest import Cluster, ClusterFactory, new_order_id

PROMISED = {"event", "timestamp", "level", "logger", "task_id", "delivery_id", "store_id",
            "order_external_id", "action", "attempt", "max_attempts", "outcome", "http_status",
            "error", "error_class", "elapsed_ms"}


def lines_naming(cluster: Cluster, task_id: str) -> list[dict[str, Any]]:
    return [line for line in cluster.lines() if task_id in json.dumps(line)]


def test_a_plain_acceptance_writes_its_attempt_line_alone(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    cluster = make_cluster()
    order_id = new_order_id()
    result = tasks.accept_order.delay(delivery_id=4, store_id="3", order_external_id=order_id)
    [attempt] = cluster.wait_final(order_id)

    assert attempt["outcome"] == "accepted" and attempt["task_id"] == result.id
    assert set(attempt) >= PROMISED, PROMISED - set(attempt)
    assert attempt["level"] == "info" and attempt["logger"] == "mipos.attempts"
    assert lines_naming(cluster, result.id) == [attempt]  # neither "received" nor "succeeded"


def test_at_debug_celerys_own_lines_are_written_too(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    cluster = make_cluster(LOG_LEVEL="DEBUG")
    order_id = new_order_id()
    result = tasks.accept_order.delay(delivery_id=4, store_id="3", order_external_id=order_id)
    cluster.wait_final(order_id)

    events = [str(line.get("event")) for line in lines_naming(cluster, result.id)]
    assert any(event.endswith(f"[{result.id}] received") for event in events), events
    assert any(f"[{result.id}] succeeded in" in event for event in events), events
