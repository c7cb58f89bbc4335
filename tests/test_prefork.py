"""The Procfile's worker with ``WORKER_POOL=prefork``, which the README offers.

Everything per process (the HTTP sessions, the call watchdog's thread, Redis's
clock, the runtime) is made again in each pool child after the fork; these
tests see it working there, end to end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from support.processes import RedisServer, Sandbox
from tests.conftest import Cluster, ClusterStarter, new_order_id

ACCEPT_PATH = "/api/v1/integration/order/accept"


@pytest.fixture(scope="module")
def prefork(redis_server: RedisServer, sandbox: Sandbox, logdir: Path) -> Iterator[Cluster]:
    starter = ClusterStarter(redis_server, sandbox, logdir)
    yield starter(processes=1, WORKER_POOL="prefork", WORKER_CONCURRENCY="2")
    starter.stop_all()


def test_orders_are_accepted_by_pool_children(prefork: Cluster, tasks: ModuleType) -> None:
    order_ids = [new_order_id() for _ in range(6)]
    prefork.control.add_faults(order_ids[0], {"status": 500})
    for order_id in order_ids:
        tasks.accept_order.delay(delivery_id=7, store_id="3", order_external_id=order_id)
    for order_id in order_ids:
        assert prefork.wait_final(order_id)[-1]["outcome"] == "accepted"
    assert [line["outcome"] for line in prefork.attempt_lines(order_ids[0])] == ["retrying", "accepted"]


def test_a_trickled_answer_is_cut_at_the_total_timeout_in_a_pool_child(
        prefork: Cluster, tasks: ModuleType) -> None:
    """The watchdog thread must exist in the child that makes the call (MIPOS_TIMEOUT_S=1:
    the call ends by 2 s, not after the ~30 s the trickle would take)."""
    order_id = new_order_id()
    prefork.control.deliver("3", 8, order_id)
    prefork.control.add_faults(order_id, {"trickle_s": 0.5})
    tasks.accept_order.delay(delivery_id=8, store_id="3", order_external_id=order_id)
    lines = prefork.wait_final(order_id, timeout=30)
    first = lines[0]
    assert first["outcome"] == "retrying" and "total timeout" in first["error"]
    assert first["outcome_unknown"] is True and first["elapsed_ms"] < 2500
    assert lines[-1]["outcome"] == "accepted" and lines[-1]["previous_outcome"] == "unknown"
