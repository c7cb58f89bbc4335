"""Token expiry that cannot be right (issue 11, item 12) and the renewal lock (item 13)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import structlog

from config import MiposSettings
from sandbox import SANDBOX_CREDENTIALS
from support.processes import RedisServer, wait_for
from tests.conftest import ClusterFactory, new_order_id
from worker.mipos.budget import attempt_budget
from worker.mipos.client import TokenGrant, token_expiry
from worker.mipos.errors import TransientError
from worker.mipos.tokens import TokenStore

NOW = 1_800_000_000.0
DAY = 86_400.0


@pytest.mark.parametrize(
    ("value", "expected", "why"),
    [
        ("1585815796", None, "past"),  # the documented example: in 2020
        (str(int(NOW) - 5), None, "past"),
        ("10", None, "near"),  # 10 s of life: refreshing ahead of it would be constant
        (str(int(NOW) + 20), None, "near"),
        (str(int(NOW + 31 * DAY)), None, "far"),
        (str(int(40 * DAY)), None, "far"),
        ("3600", NOW + 3600, None),
        (str(int(NOW) + 7200), NOW + 7200, None),
        ("soon", None, None),  # unparsable: unknown, but nothing odd to report
        (None, None, None),
    ],
)
def test_token_expiry_sanity(value: Any, expected: float | None, why: str | None) -> None:
    expires_at, reason = token_expiry(value, NOW)
    assert expires_at == expected
    if why is None:
        assert reason is None
    else:
        assert reason is not None and why in reason


class _FakeClient:
    """Hands out a fixed token with a past expiry; counts the calls."""

    def __init__(self, timeout_s: float = 1.0) -> None:
        self.settings = MiposSettings(base_url="http://127.0.0.1:9", timeout_s=timeout_s,
                                      **SANDBOX_CREDENTIALS)
        self.calls: list[str] = []
        self.token = f"tok-{uuid.uuid4().hex}"

    @property
    def call_bound_s(self) -> float:
        return 2 * self.settings.timeout_s

    def _grant(self) -> TokenGrant:
        expires_at, reason = token_expiry("1585815796", time.time())
        return TokenGrant(self.token, expires_at, time.time(), expiry_ignored=reason,
                          expires_in_raw="1585815796")

    def request_token(self) -> TokenGrant:
        self.calls.append("token")
        return self._grant()

    def refresh_token(self, token: str) -> TokenGrant:
        self.calls.append("refresh")
        return self._grant()  # a mipos that does not rotate


def _store(redis_server: RedisServer, client: Any) -> TokenStore:
    return TokenStore(client, redis_server.client, f"expiry-{uuid.uuid4().hex[:8]}:")


def test_a_past_expiry_is_ignored_and_logged_once_per_token(redis_server: RedisServer) -> None:
    client = _FakeClient()
    store = _store(redis_server, client)
    with structlog.testing.capture_logs() as logs:
        token = store.current()
        for _ in range(5):
            assert store.current() == token  # no refresh because of the stated expiry
        store.replace_rejected(token)  # a 401: refreshed once, mipos hands the same token back
        assert store.current() == token
    assert client.calls == ["token", "refresh"]
    warnings = [e for e in logs if e["event"] == "token_expiry_ignored"]
    assert len(warnings) == 1
    [warning] = warnings
    assert warning["log_level"] == "warning" and warning["expires_in"] == "1585815796"
    assert "past" in warning["reason"]
    assert all(token not in str(value) for event in logs for value in event.values())


def test_renewal_lock_covers_three_bounded_calls(redis_server: RedisServer) -> None:
    client = _FakeClient(timeout_s=10.0)
    store = _store(redis_server, client)
    assert store.lock_ttl_s >= 3 * 2 * 10.0 + 5.0
    assert store.wait_limit_s() >= store.lock_ttl_s
    with attempt_budget(3.0):
        assert store.wait_limit_s() <= 3.0


def test_a_waiter_never_waits_past_the_attempt_budget(redis_server: RedisServer) -> None:
    store = _store(redis_server, _FakeClient(timeout_s=1.0))
    redis_server.client.set(store.lock_key, "another-worker", px=60_000)  # a renewal in progress
    outcome: list[BaseException | str] = []

    def wait() -> None:
        with attempt_budget(0.5):
            try:
                outcome.append(store.current())
            except TransientError as exc:
                outcome.append(exc)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    thread.join(0.5 + 3.0)
    assert outcome, "the waiter outlived its attempt budget"
    [result] = outcome
    assert isinstance(result, TransientError) and "budget" in result.message


# -- against real workers -----------------------------------------------------------------------


def test_documented_past_expiry_makes_one_token_call_and_no_refresh(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    cluster = make_cluster(processes=2)
    cluster.control.config(expires_in_fixed="1585815796")  # mipos-api.md's own example
    ids = [new_order_id() for _ in range(30)]
    for order_id in ids:
        tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id=order_id)
    for order_id in ids:
        lines = cluster.wait_final(order_id, timeout=60)
        assert [line["outcome"] for line in lines] == ["accepted"]
    stats = cluster.control.stats()
    assert (stats["token_calls"], stats["refresh_calls"]) == (1, 0)
    orders = cluster.control.orders()["orders"]
    assert all(orders[f"3/{order_id}"]["accepted"] == 1 for order_id in ids)
    ignored: Callable[[], list[Any]] = lambda: [
        line for line in cluster.lines() if line.get("event") == "token_expiry_ignored"]
    wait_for(lambda: ignored() or None, timeout=10, what="the token_expiry_ignored warning")
    [warning] = ignored()
    assert warning["level"] == "warning" and warning["logger"] == "mipos.tokens"
    assert warning["expires_in"] == "1585815796"
