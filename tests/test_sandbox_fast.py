"""The sandbox's fast serving mode (``python -m sandbox --fast``): the happy-path API of the
full sandbox (token, refresh, accept), its latency, and the controls a benchmark uses."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from support.processes import SANDBOX_ENV, Sandbox

ACCEPT = "/api/v1/integration/order/accept"


@pytest.fixture
def fast(tmp_path: Path) -> Iterator[Sandbox]:
    sandbox = Sandbox(tmp_path, "--fast")
    try:
        yield sandbox
    finally:
        sandbox.stop()


def token_call(url: str) -> requests.Response:
    return requests.post(url + "/api/oauth/token", timeout=5, json={
        "client_id": SANDBOX_ENV["MIPOS_CLIENT_ID"], "client_secret": SANDBOX_ENV["MIPOS_CLIENT_SECRET"],
        "grant_type": "client_credentials", "email": SANDBOX_ENV["MIPOS_EMAIL"],
        "password": SANDBOX_ENV["MIPOS_PASSWORD"]})


def test_fast_sandbox_answers_as_the_sandbox_does(fast: Sandbox) -> None:
    order = {"delivery_id": "1", "store_id": "5", "order_external_id": "o-1"}
    assert requests.post(fast.url + ACCEPT, json=order, timeout=5).status_code == 401

    first = token_call(fast.url).json()["data"]
    assert token_call(fast.url).json()["data"]["token"] == first["token"]  # never rotates
    assert float(first["expires_in"]) > time.time()
    bearer = {"Authorization": f"Bearer {first['token']}"}

    with requests.Session() as session:  # keep-alive: several requests on one connection
        accepted = session.post(fast.url + ACCEPT, json=order, headers=bearer, timeout=5)
        assert accepted.status_code == 200
        assert accepted.json() == {"message": ["Operation completed successfully"], "data": None}
        assert session.post(fast.url + ACCEPT, json={**order, "store_id": 5}, headers=bearer,
                            timeout=5).status_code == 422
        assert session.post(fast.url + ACCEPT, json=order, headers=bearer, timeout=5).status_code == 200

    refreshed = requests.post(fast.url + "/api/oauth/token/refresh", headers=bearer, timeout=5, json={
        "client_id": SANDBOX_ENV["MIPOS_CLIENT_ID"], "client_secret": SANDBOX_ENV["MIPOS_CLIENT_SECRET"],
        "grant_type": "refresh_token", "refresh_token": first["token"]})
    assert refreshed.status_code == 200 and refreshed.json()["data"]["token"] != first["token"]
    assert requests.post(fast.url + ACCEPT, json=order, headers=bearer, timeout=5).status_code == 401

    stats = fast.control.stats()
    assert (stats["accepted_orders"], stats["accept_calls"], stats["token_calls"], stats["rotations"]) \
        == (1, 5, 2, 1)
    records = fast.control.requests(path=ACCEPT)
    assert [r["status"] for r in records] == [401, 200, 422, 200, 401]
    assert records[1]["body"]["order_external_id"] == "o-1"
    fast.control.reset()
    assert fast.control.stats()["accepted_orders"] == 0


def test_fast_sandbox_latency_holds_the_answer(fast: Sandbox) -> None:
    fast.control.config(latency_ms=150)
    token = token_call(fast.url).json()["data"]["token"]
    started = time.monotonic()
    answer = requests.post(fast.url + ACCEPT, timeout=5, headers={"Authorization": f"Bearer {token}"},
                           json={"delivery_id": "1", "store_id": "5", "order_external_id": "o-2"})
    assert answer.status_code == 200
    assert time.monotonic() - started >= 0.15
    with pytest.raises(requests.HTTPError):
        fast.control.config(fault_rates={"http_500": 0.5})  # no fault machinery here


def test_fast_sandbox_strict_mode(tmp_path: Path) -> None:
    """--strict as in the full sandbox: only a delivered, pending order is accepted, once."""
    strict = Sandbox(tmp_path, "--fast", strict=True)
    try:
        token = token_call(strict.url).json()["data"]["token"]
        bearer = {"Authorization": f"Bearer {token}"}
        not_found = {"message": ["Order not found."], "data": None}

        def call(order_id: str, deny: bool = False) -> tuple[int, object]:
            body = {"delivery_id": "1", "store_id": "5", "order_external_id": order_id}
            path = ACCEPT
            if deny:
                body["message"] = "Out of stock"
                path = "/api/v1/integration/order/deny"
            answer = requests.post(strict.url + path, json=body, headers=bearer, timeout=5)
            return answer.status_code, answer.json()

        strict.control.deliver("5", 1, "o-1")
        strict.control.deliver("5", 2, "o-old", created_at=time.time() - 11 * 60)
        assert call("o-1")[0] == 200
        assert call("o-1") == (409, not_found)  # accepted already
        assert call("o-1", deny=True) == (409, not_found)
        assert call("o-never") == (409, not_found)
        assert call("o-old") == (409, not_found)  # older than the 10-minute window
        assert strict.control.stats()["accepted_orders"] == 1

        assert strict.control.config(strict=False)["strict"] is False
        assert call("o-never")[0] == 200  # lenient: as before
        with pytest.raises(requests.HTTPError):
            strict.control.config(strict="yes")
        with pytest.raises(requests.HTTPError):
            strict.control.deliver("5", "x", "o-2")  # type: ignore[arg-type]  # delivery_id: int
        strict.control.reset()
        assert strict.control.config()["strict"] is True  # the command line's again
    finally:
        strict.stop()
