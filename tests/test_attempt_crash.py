"""A bug of ours inside an attempt: one line that says so, then the retry schedule.

Before, an unexpected exception ended the task without an attempt line or a dead
letter; the order came back only through the rescue sweep, minutes later, and
ended as a misleading ``deadline`` letter. The attempt runs here in the test
process (Celery's ``push_request``) against the real Redis and sandbox; its retry
goes to the module's real worker, which accepts the order.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from celery.exceptions import Retry
from structlog.testing import capture_logs

import worker.wiring.runtime
from support.processes import SANDBOX_ENV
from tests.conftest import FAST_RETRY_ENV, Cluster, new_order_id
from worker.mipos.tokens import TokenStore
from mipos_worker.order.model import Action


@pytest.fixture
def in_process_runtime(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in {**SANDBOX_ENV, **FAST_RETRY_ENV, "REDIS_URL": cluster.redis.url,
                        "MIPOS_BASE_URL": cluster.sandbox.url}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(worker.wiring.runtime, "_runtime", None)
    yield
    worker.wiring.runtime._runtime = None


def test_an_unexpected_error_is_logged_and_retried(cluster: Cluster, tasks: ModuleType,
                                                   in_process_runtime: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.orders import accept_order, run_attempt

    calls: list[int] = []
    real_current = TokenStore.current

    def current_failing_once(self: TokenStore, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_current(self, *args, **kwargs)

    monkeypatch.setattr(TokenStore, "current", current_failing_once)
    order_id = new_order_id()
    accept_order.push_request(id=new_order_id(), retries=0, delivery_info={}, headers={},
                              called_directly=False)
    try:
        with capture_logs() as logs, pytest.raises(Retry):
            run_attempt(accept_order, Action.ACCEPT, (),
                        {"delivery_id": "5", "store_id": "3", "order_external_id": order_id})
    finally:
        accept_order.pop_request()

    [crash] = [x for x in logs if x["event"] == "attempt_crashed"]
    assert crash["order_external_id"] == order_id and crash["log_level"] == "error"
    [line] = [x for x in logs if x["event"] == "accept_attempt"]
    assert line["outcome"] == "retrying" and line["error_class"] == "transient"
    assert line["error"] == "internal error: RuntimeError: boom"
    [accepted] = cluster.wait_final(order_id)  # the retry, run by the real worker
    assert accepted["outcome"] == "accepted" and accepted["attempt"] == 2
