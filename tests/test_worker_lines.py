"""One line per attempt, and no duplicate of it (issue 22, item 1): at INFO a plain acceptance
writes our attempt line, with every field the log line's reference promises, and none of
Celery's "received" / "succeeded" lines, which say the same; at DEBUG Celery's come back.
A real worker and the sandbox."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

from support.processes import wait_for
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

    def events() -> list[str]:
        return [str(line.get("event")) for line in lines_naming(cluster, result.id)]

    # Celery writes "succeeded" once the task returns, a moment after our attempt line.
    wait_for(lambda: any(f"[{result.id}] succeeded in" in event for event in events()), timeout=10,
             what="Celery's succeeded line")
    assert any(event.endswith(f"[{result.id}] received") for event in events()), events()


RENDER = """
import logging, structlog
from worker.logs.setup import configure_logging
configure_logging("INFO", "json")
log = structlog.stdlib.get_logger("mipos.attempts")
log.info("accept_attempt", store_id="Café ☕", nested={1: "one", "two": (2, 2.5)},
         other=object.__new__(type("Thing", (), {"__repr__": lambda self: "<thing>"})))
log.info("odd", huge=2**70, surrogate="a\\udc80b")
logging.getLogger("celery.worker").info("Task %s received", "x")
"""


def test_lines_are_compact_utf8_json_whatever_the_values() -> None:
    """orjson renders the lines (no spaces, text as UTF-8); what it cannot encode (an integer past
    64 bits, a key that is not a string, an object) still makes a line."""
    import subprocess
    import sys

    from support.processes import ROOT

    done = subprocess.run([sys.executable, "-c", RENDER], cwd=ROOT, capture_output=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    first, odd, celerys = done.stderr.decode("utf-8").splitlines()
    assert '"store_id":"Café ☕"' in first  # compact, and not \\u-escaped
    line = json.loads(first)
    assert line["nested"] == {"1": "one", "two": [2, 2.5]}
    assert line["other"] == "<thing>" and line["event"] == "accept_attempt"
    assert json.loads(odd)["huge"] == 2**70 and json.loads(odd)["surrogate"] == "a\udc80b"
    assert json.loads(celerys)["event"] == "Task x received"
