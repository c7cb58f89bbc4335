"""The sandbox mipos over real HTTP: ``python -m sandbox --port 0`` in a subprocess."""

from __future__ import annotations

import http.client
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from sandbox import SANDBOX_CREDENTIALS, SandboxControl

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "/api/oauth/token"
REFRESH = "/api/oauth/token/refresh"
ACCEPT = "/api/v1/integration/order/accept"
DENY = "/api/v1/integration/order/deny"
TIMEOUT = 5.0


# -- the server process -------------------------------------------------------------


def start_sandbox(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "--host", "127.0.0.1", "--port", "0", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10.0)
    line = proc.stdout.readline() if ready else ""
    match = re.fullmatch(r"sandbox mipos listening on (http://127\.0\.0\.1:\d+)\n", line)
    if not match:
        stop_sandbox(proc)
        raise RuntimeError(f"sandbox did not start: {line!r}")
    return proc, match.group(1)


def stop_sandbox(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=5)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    proc, url = start_sandbox("--quiet")
    try:
        yield url
    finally:
        stop_sandbox(proc)


@pytest.fixture
def control(base_url: str) -> SandboxControl:
    ctl = SandboxControl(base_url, timeout=TIMEOUT)
    ctl.reset()
    return ctl


# -- helpers ---------------------------------------------------------------------------


class Api:
    """Plain ``requests`` calls to the mipos API of the sandbox."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def post(self, path: str, body: Any, token: str | None = None,
             timeout: float = TIMEOUT) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.post(self.base_url + path, json=body, headers=headers, timeout=timeout)

    def token_response(self, **overrides: Any) -> requests.Response:
        body = {**SANDBOX_CREDENTIALS, "grant_type": "client_credentials", **overrides}
        return self.post(TOKEN, {k: v for k, v in body.items() if v is not None})

    def token(self) -> str:
        response = self.token_response()
        assert response.status_code == 200, response.text
        return str(response.json()["data"]["token"])

    def refresh_response(self, token: str, refresh_token: str | None = None,
                         **overrides: Any) -> requests.Response:
        body = {"client_id": SANDBOX_CREDENTIALS["client_id"],
                "client_secret": SANDBOX_CREDENTIALS["client_secret"],
                "grant_type": "refresh_token", "refresh_token": refresh_token or token, **overrides}
        return self.post(REFRESH, body, token=token)

    def accept(self, token: str, order_id: str, timeout: float = TIMEOUT,
               **overrides: Any) -> requests.Response:
        body = {"delivery_id": "7", "store_id": "3", "order_external_id": order_id, **overrides}
        return self.post(ACCEPT, body, token=token, timeout=timeout)

    def deny(self, token: str, order_id: str, message: str = "Out of stock") -> requests.Response:
        body = {"delivery_id": "8", "store_id": "3", "order_external_id": order_id,
                "message": message}
        return self.post(DENY, body, token=token)

    def pending(self, store_id: str, token: str | None) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(f"{self.base_url}/api/v1/orders/{store_id}", headers=headers,
                            timeout=TIMEOUT)


@pytest.fixture
def api(base_url: str, control: SandboxControl) -> Api:
    return Api(base_url)


def new_id() -> str:
    return str(uuid.uuid4())


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll a condition until it holds; fail after ``timeout_s``."""
    give_up = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < give_up, "condition not met in time"
        time.sleep(0.02)


def accepted(control: SandboxControl, order_id: str, store_id: str = "3") -> int:
    record = control.orders()["orders"].get(f"{store_id}/{order_id}")
    return int(record["accepted"]) if record else 0


# -- tokens ------------------------------------------------------------------------------


def test_token_call_returns_the_same_token_until_refreshed(api: Api, control: SandboxControl) -> None:
    first = api.token_response()
    assert first.status_code == 200
    body = first.json()
    assert body["message"] == "Access token."
    assert body["data"]["token_type"] == "bearer"
    assert api.token() == body["data"]["token"]
    assert control.stats()["token_calls"] == 2


@pytest.mark.parametrize(
    ("override", "status", "expected"),
    [
        ({"client_id": None}, 422, {"client_id": ["The client id field is required."]}),
        ({"client_id": None, "password": ""}, 422,
         {"client_id": ["The client id field is required."],
          "password": ["The password field is required."]}),
        ({"client_id": "nope"}, 409, {"message": ["Client id not found with this user."], "data": None}),
        ({"client_secret": "nope"}, 409,
         {"message": ["Client secret not found with this user."], "data": None}),
        ({"email": "x@y.invalid"}, 409, {"message": ["Invalid credentials."], "data": None}),
        ({"password": "wrong"}, 409, {"message": ["Invalid credentials."], "data": None}),
    ],
    ids=["missing", "two-missing", "client-id", "client-secret", "email", "password"],
)
def test_token_call_errors(api: Api, override: dict[str, Any], status: int, expected: Any) -> None:
    response = api.token_response(**override)
    assert (response.status_code, response.json()) == (status, expected)


def test_expires_in_formats(api: Api, control: SandboxControl) -> None:
    control.config(token_ttl_s=120)
    before = time.time()
    absolute = api.token_response().json()["data"]["expires_in"]
    assert isinstance(absolute, str) and absolute.isdigit()
    assert before + 120 - 2 <= int(absolute) <= time.time() + 120 + 1

    assert control.config(expires_in_format="relative")["expires_in_format"] == "relative"
    relative = api.token_response().json()["data"]["expires_in"]
    assert isinstance(relative, str) and 110 <= int(relative) <= 120

    control.config(expires_in_format="missing")
    assert "expires_in" not in api.token_response().json()["data"]


def test_expired_token_is_refused_but_still_handed_out(api: Api, control: SandboxControl) -> None:
    token = api.token()
    control.expire_token()
    assert control.stats()["current_token_expires_at"] <= time.time()

    refused = api.accept(token, new_id())
    assert (refused.status_code, refused.json()) == (401, "Unauthorized.")
    assert api.token() == token  # the token call does not rotate, even an expired token

    refreshed = api.refresh_response(token)
    assert refreshed.status_code == 200
    assert api.accept(refreshed.json()["data"]["token"], new_id()).status_code == 200


def test_token_ttl_expiry(api: Api, control: SandboxControl) -> None:
    control.config(token_ttl_s=0)
    token = api.token()
    assert api.accept(token, new_id()).status_code == 401
    [entry] = control.requests(path=ACCEPT)
    assert entry["token_valid"] is False and entry["status"] == 401


def test_refresh_rotates_and_the_old_token_dies(api: Api, control: SandboxControl) -> None:
    old = api.token()
    response = api.refresh_response(old)
    assert response.status_code == 200
    body = response.json()
    assert body["message"] == "New access token."
    new = body["data"]["token"]
    assert new != old and body["data"]["token_type"] == "bearer"
    assert int(body["data"]["expires_in"]) > time.time()

    assert api.accept(old, new_id()).status_code == 401
    assert api.accept(new, new_id()).status_code == 200
    assert api.token() == new

    again = api.refresh_response(old)  # a second worker, still holding the old token
    assert (again.status_code, again.json()) == (409, {"message": ["Token Mismatch."], "data": None})
    assert control.stats()["rotations"] == 1 and control.stats()["refresh_calls"] == 2
    statuses = [(r["status"], r["token_valid"]) for r in control.requests(path=REFRESH)]
    assert statuses == [(200, None), (409, None)]


def test_refresh_errors(api: Api) -> None:
    token = api.token()
    mismatch = {"message": ["Token Mismatch."], "data": None}
    wrong_refresh = api.refresh_response(token, refresh_token="other")
    assert (wrong_refresh.status_code, wrong_refresh.json()) == (409, mismatch)
    wrong_bearer = api.refresh_response("other", refresh_token=token)
    assert (wrong_bearer.status_code, wrong_bearer.json()) == (409, mismatch)
    bad_secret = api.refresh_response(token, client_secret="nope")
    assert bad_secret.json() == {"message": ["Client secret not found with this user."], "data": None}
    bad_id = api.refresh_response(token, client_id="nope")
    assert bad_id.json() == {"message": ["Client id not found with this user."], "data": None}
    assert api.token() == token  # none of these rotated it


# -- accept and deny -------------------------------------------------------------------


def test_accept_and_deny_are_recorded(api: Api, control: SandboxControl) -> None:
    token = api.token()
    order_a, order_b = new_id(), new_id()
    ok = api.accept(token, order_a)
    assert (ok.status_code, ok.json()) == (200, {"message": ["Operation completed successfully"],
                                                 "data": None})
    assert ok.headers["Content-Type"] == "application/json"
    assert int(ok.headers["Content-Length"]) == len(ok.content)
    assert api.accept(token, order_a).status_code == 200  # a duplicate: answered and counted
    assert api.deny(token, order_b, "Out of stock").status_code == 200

    orders = control.orders()["orders"]
    assert orders[f"3/{order_a}"] == {"store_id": "3", "order_external_id": order_a,
                                      "delivery_id": "7", "accepted": 2, "denied": 0,
                                      "deny_messages": []}
    assert orders[f"3/{order_b}"]["denied"] == 1
    assert orders[f"3/{order_b}"]["deny_messages"] == ["Out of stock"]
    stats = control.stats()
    assert (stats["accept_calls"], stats["deny_calls"]) == (2, 1)
    assert (stats["accepted_orders"], stats["denied_orders"]) == (1, 1)

    recorded = control.requests(order_external_id=order_a)
    assert [r["seq"] for r in recorded] == sorted(r["seq"] for r in recorded)
    first = recorded[0]
    assert first["method"] == "POST" and first["path"] == ACCEPT
    assert first["authorization"] == f"Bearer {token}"
    assert first["body"] == {"delivery_id": "7", "store_id": "3", "order_external_id": order_a}
    assert (first["status"], first["token_valid"], first["fault"]) == (200, True, None)
    assert abs(first["time"] - time.time()) < 10
    assert len(control.requests(path=TOKEN)) == 1
    assert all(not r["path"].startswith("/_sandbox") for r in control.requests())


def test_accept_validation(api: Api, control: SandboxControl) -> None:
    token = api.token()
    empty = api.post(ACCEPT, {}, token=token)
    assert (empty.status_code, empty.json()) == (422, {
        "delivery_id": ["The delivery id field is required."],
        "store_id": ["The store id field is required."],
        "order_external_id": ["The order external id field is required."],
    })
    order_id = new_id()
    typed = api.accept(token, order_id, delivery_id=7, store_id="")
    assert (typed.status_code, typed.json()) == (422, {
        "delivery_id": ["The delivery id must be a string."],
        "store_id": ["The store id field is required."],
    })
    no_message = api.post(DENY, {"delivery_id": "1", "store_id": "3", "order_external_id": order_id},
                          token=token)
    assert (no_message.status_code, no_message.json()) == (
        422, {"message": ["The message field is required."]})
    not_json = requests.post(api.base_url + ACCEPT, data="nope", timeout=TIMEOUT,
                             headers={"Authorization": f"Bearer {token}"})
    assert not_json.status_code == 422
    assert control.orders()["orders"] == {}


def test_accept_without_a_token_is_401_and_keeps_the_fault(api: Api, control: SandboxControl) -> None:
    order_id = new_id()
    control.add_faults(order_id, {"status": 409, "message": "Unable to get token."})
    missing = api.accept("", order_id)
    assert (missing.status_code, missing.json()) == (401, "Unauthorized.")
    assert api.accept("not-a-token", order_id).status_code == 401
    token = api.token()
    assert api.accept(token, order_id).status_code == 409  # auth first, then the fault
    assert api.accept(token, order_id).status_code == 200


# -- faults ------------------------------------------------------------------------------


def test_409_fault_then_fifo_then_success(api: Api, control: SandboxControl) -> None:
    token = api.token()
    order_id = new_id()
    control.add_faults(order_id, {"status": 409, "message": "Unable to get token.", "times": 2},
                       {"status": 500, "message": "Server Error"})
    answers = [api.accept(token, order_id) for _ in range(4)]
    assert [(a.status_code, a.json()) for a in answers] == [
        (409, {"message": ["Unable to get token."], "data": None}),
        (409, {"message": ["Unable to get token."], "data": None}),
        (500, {"message": "Server Error"}),
        (200, {"message": ["Operation completed successfully"], "data": None}),
    ]
    recorded = control.requests(order_external_id=order_id)
    assert [r["status"] for r in recorded] == [409, 409, 500, 200]
    assert "Unable to get token." in recorded[0]["fault"] and recorded[3]["fault"] is None
    assert accepted(control, order_id) == 1


def test_faults_belong_to_their_order(api: Api, control: SandboxControl) -> None:
    token = api.token()
    faulty, clean = new_id(), new_id()
    control.add_faults(faulty, {"status": 503, "message": "down"})
    assert api.accept(token, clean).status_code == 200
    assert api.accept(token, faulty).status_code == 503


def test_429_with_retry_after(api: Api, control: SandboxControl) -> None:
    token = api.token()
    order_id = new_id()
    control.add_faults(order_id, {"status": 429, "message": "Too Many Attempts.", "retry_after": 2})
    limited = api.accept(token, order_id)
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "2"
    assert limited.json() == {"message": "Too Many Attempts."}
    assert "Retry-After" not in api.accept(token, order_id).headers


def test_delay_past_the_client_timeout_is_still_applied(api: Api, control: SandboxControl) -> None:
    token = api.token()
    order_id = new_id()
    control.add_faults(order_id, {"delay_s": 0.5})
    with pytest.raises(requests.ReadTimeout):
        api.accept(token, order_id, timeout=0.15)
    wait_for(lambda: accepted(control, order_id) == 1)
    [entry] = control.requests(order_external_id=order_id)
    assert entry["status"] == 200 and entry["fault"] == "delay_s=0.5"


def test_delay_without_apply_is_not_applied(api: Api, control: SandboxControl) -> None:
    token = api.token()
    order_id = new_id()
    control.add_faults(order_id, {"delay_s": 0.1, "apply": False})
    with pytest.raises(requests.ConnectionError):
        api.accept(token, order_id)
    assert accepted(control, order_id) == 0
    assert control.requests(order_external_id=order_id)[0]["status"] is None


def test_delay_with_status(api: Api, control: SandboxControl) -> None:
    token = api.token()
    order_id = new_id()
    control.add_faults(order_id, {"delay_s": 0.2, "status": 504, "message": "Gateway Timeout"})
    started = time.monotonic()
    response = api.accept(token, order_id)
    assert time.monotonic() - started >= 0.2
    assert (response.status_code, response.json()) == (504, {"message": "Gateway Timeout"})
    assert accepted(control, order_id) == 0


def test_drop_closes_the_connection(api: Api, control: SandboxControl) -> None:
    token = api.token()
    order_id = new_id()
    control.add_faults(order_id, {"drop": True})
    started = time.monotonic()
    with pytest.raises(requests.ConnectionError):
        api.accept(token, order_id)
    assert time.monotonic() - started < 2
    [entry] = control.requests(order_external_id=order_id)
    assert entry["status"] is None and entry["fault"] == "drop=True"
    assert accepted(control, order_id) == 0
    assert api.accept(token, order_id).status_code == 200


def test_raw_body_that_is_not_json(api: Api, control: SandboxControl) -> None:
    token = api.token()
    order_id = new_id()
    control.add_faults(order_id, {"status": 502, "raw_body": "<html>bad gateway</html>"})
    response = api.accept(token, order_id)
    assert response.status_code == 502 and response.text == "<html>bad gateway</html>"
    with pytest.raises(ValueError):
        response.json()


def test_fault_bodies_by_status(api: Api, control: SandboxControl) -> None:
    token = api.token()
    order_id = new_id()
    control.add_faults(order_id,
                       {"status": 401},
                       {"status": 422},
                       {"status": 422, "body": {"store_id": ["The store id field is required."]}},
                       {"status": 409, "body": {"message": "odd"}})
    answers = [api.accept(token, order_id) for _ in range(4)]
    assert [(a.status_code, a.json()) for a in answers] == [
        (401, "Unauthorized."),
        (422, {"delivery_id": ["The delivery id field is required."]}),
        (422, {"store_id": ["The store id field is required."]}),
        (409, {"message": "odd"}),
    ]


def test_fault_forever(api: Api, control: SandboxControl) -> None:
    token = api.token()
    order_id = new_id()
    control.add_faults(order_id, {"status": 503, "message": "down", "times": -1})
    assert [api.accept(token, order_id).status_code for _ in range(5)] == [503] * 5
    assert accepted(control, order_id) == 0


def test_bad_faults_are_refused(control: SandboxControl) -> None:
    for fault in ({"times": 0}, {"status": "409"}, {"delay_s": -1}, {"colour": "red"}):
        with pytest.raises(requests.HTTPError):
            control.add_faults(new_id(), fault)
    with pytest.raises(requests.HTTPError):
        control.config(fault_rates={"meteor": 0.5})


def test_random_faults(api: Api, control: SandboxControl) -> None:
    token = api.token()
    control.config(fault_rates={"http_500": 1.0})
    assert api.accept(token, new_id()).status_code == 500
    control.config(fault_rates={"unable_to_get_token": 1.0})
    conflict = api.accept(token, new_id())
    assert conflict.json() == {"message": ["Unable to get token."], "data": None}
    control.config(fault_rates={"drop": 1.0})
    with pytest.raises(requests.ConnectionError):
        api.accept(token, new_id())
    control.config(fault_rates={"timeout": 1.0}, timeout_delay_s=0.3)
    order_id = new_id()
    with pytest.raises(requests.ReadTimeout):
        api.accept(token, order_id, timeout=0.1)
    wait_for(lambda: accepted(control, order_id) == 1)
    faults = [r["fault"] for r in control.requests(path=ACCEPT)]
    assert faults == ["random:http_500", "random:unable_to_get_token", "random:drop",
                      "random:timeout"]
    queued = new_id()  # a queued fault wins over the random ones
    control.config(fault_rates={"http_500": 1.0})
    control.add_faults(queued, {"status": 409, "message": "Order not found."})
    assert api.accept(token, queued).status_code == 409


# -- pending orders ----------------------------------------------------------------------


def test_pending_orders(api: Api, control: SandboxControl) -> None:
    token = api.token()
    fresh, old, accepted_one, other_store = new_id(), new_id(), new_id(), new_id()
    control.deliver("3", 11, fresh, order_number="A-11", total=12.5)
    control.deliver("3", 12, old, created_at=time.time() - 11 * 60)
    control.deliver("3", 13, accepted_one)
    control.deliver("4", 14, other_store)
    assert api.accept(token, accepted_one).status_code == 200

    response = api.pending("3", token)
    assert response.status_code == 200
    body = response.json()
    assert body["message"] == "Orders."
    [order] = body["data"]
    assert order["external_id"] == fresh and order["store_id"] == "3"
    assert order["delivery_id"] == 11 and order["order_number"] == "A-11"
    assert order["total"] == 12.5 and order["items"] == []
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", order["created_at"])

    assert api.deny(token, fresh).status_code == 200
    assert api.pending("3", token).json()["data"] == []
    assert [o["external_id"] for o in api.pending("4", token).json()["data"]] == [other_store]

    unknown = api.pending("999", token)
    assert (unknown.status_code, unknown.json()) == (409, {"message": ["Store not found."],
                                                           "data": None})
    unauthorized = api.pending("3", None)
    assert (unauthorized.status_code, unauthorized.json()) == (401, "Unauthorized.")
    assert [r["status"] for r in control.requests(path="/api/v1/orders/3")] == [200, 200, 401]


# -- HTTP behaviour --------------------------------------------------------------------


def test_unknown_paths_are_404_json(api: Api, control: SandboxControl) -> None:
    for response in (requests.get(api.base_url + "/api/v2/nothing", timeout=TIMEOUT),
                     requests.put(api.base_url + ACCEPT, json={}, timeout=TIMEOUT),
                     requests.get(api.base_url + TOKEN, timeout=TIMEOUT)):
        assert response.status_code == 404
        assert isinstance(response.json(), dict)
    assert len(control.requests()) == 3


def test_keep_alive(base_url: str, control: SandboxControl) -> None:
    host, port = base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        for _ in range(3):
            connection.request("GET", "/_sandbox/health")
            response = connection.getresponse()
            assert response.status == 200 and not response.will_close
            assert response.read() == b'{"ok": true}'
    finally:
        connection.close()


def test_latency_delays_the_api_but_not_the_controls(api: Api, control: SandboxControl) -> None:
    control.config(latency_ms=300)
    started = time.monotonic()
    api.token()
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    control.stats()
    assert time.monotonic() - started < 0.3


def test_reset_forgets_everything(api: Api, control: SandboxControl) -> None:
    token = api.token()
    order_id = new_id()
    control.config(latency_ms=1, token_ttl_s=5, fault_rates={"http_500": 0.0})
    control.add_faults(order_id, {"status": 500})
    control.deliver("3", 1, new_id())
    api.accept(token, new_id())
    control.reset()

    assert control.requests() == [] and control.orders() == {"orders": {}}
    assert control.stats() == {"token_calls": 0, "refresh_calls": 0, "rotations": 0,
                               "accept_calls": 0, "deny_calls": 0, "accepted_orders": 0,
                               "denied_orders": 0, "current_token_expires_at": None}
    assert control.config() == {"token_ttl_s": 3600.0, "latency_ms": 0.0,
                                "expires_in_format": "absolute", "fault_rates": {},
                                "timeout_delay_s": 15.0, "expires_in_fixed": None,
                                "strict": False, "timeout_land_after_s": None}
    fresh = api.token()
    assert fresh != token and api.accept(fresh, order_id).status_code == 200
    assert api.pending("3", fresh).status_code == 200  # the store is known again by the accept
    assert api.pending("3", fresh).json()["data"] == []


def test_two_hundred_concurrent_accepts(api: Api, control: SandboxControl) -> None:
    token = api.token()
    control.config(latency_ms=200)  # they must overlap: one after the other would take 40 s
    ids = [new_id() for _ in range(200)]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=200) as pool:
        statuses = list(pool.map(lambda order_id: api.accept(token, order_id).status_code, ids))
    assert statuses == [200] * 200
    assert time.monotonic() - started < 5
    stats = control.stats()
    assert stats["accept_calls"] == 200 and stats["accepted_orders"] == 200
    assert sorted(r["seq"] for r in control.requests(path=ACCEPT)) == list(
        range(2, 202))  # seq 1 was the token call


def test_sigterm_stops_it_cleanly() -> None:
    proc, url = start_sandbox()
    assert SandboxControl(url, timeout=TIMEOUT).health()
    assert stop_sandbox(proc) == 0


# -- faults on the token, refresh and pending-list calls; trickled bodies; resets --------


def test_faults_on_the_token_refresh_and_pending_calls(api: Api, control: SandboxControl) -> None:
    control.add_call_faults("token", {"status": 500, "body": {"message": [1, None]}})
    hostile = api.token_response()
    assert (hostile.status_code, hostile.json()) == (500, {"message": [1, None]})
    token = api.token()  # the fault was used up

    control.add_call_faults("refresh", {"status": 503, "raw_body": "down"})
    refused = api.refresh_response(token)
    assert (refused.status_code, refused.text) == (503, "down")
    assert control.stats()["rotations"] == 0  # the fault answered instead of mipos

    order_id = new_id()
    control.deliver("3", 1, order_id)
    control.add_call_faults("pending:3", {"status": 422, "body": None})
    assert api.pending("4", token).status_code == 409  # another store: no fault, unknown store
    answer = api.pending("3", token)
    assert (answer.status_code, answer.json()) == (422, None)
    assert [o["external_id"] for o in api.pending("3", token).json()["data"]] == [order_id]

    [first_token, _] = control.requests(path=TOKEN)
    assert first_token["status"] == 500 and first_token["fault"].startswith("status=500")
    assert control.requests(path="/api/v1/orders/3")[0]["fault"].startswith("status=422")


def test_pending_faults_need_a_valid_token(api: Api, control: SandboxControl) -> None:
    token = api.token()
    control.deliver("3", 1, new_id())
    control.add_call_faults("pending:3", {"status": 500})
    assert api.pending("3", "not-a-token").status_code == 401  # auth first, the fault is kept
    assert api.pending("3", token).status_code == 500


def test_bad_fault_targets_are_refused(control: SandboxControl) -> None:
    for target in ("nope", "pending:", "", "order:"):
        with pytest.raises(requests.HTTPError):
            control.add_call_faults(target, {"status": 500})
    for fault in ({"trickle_s": -1}, {"reset": "yes"}, {"reset": True, "drop": True},
                  {"reset": True, "status": 500}):
        with pytest.raises(requests.HTTPError):
            control.add_faults(new_id(), fault)


def test_order_target_is_the_same_as_order_external_id(api: Api, control: SandboxControl) -> None:
    token = api.token()
    order_id = new_id()
    control.add_call_faults(f"order:{order_id}", {"status": 503})
    assert api.accept(token, order_id).status_code == 503
    assert api.accept(token, order_id).status_code == 200


def test_trickled_body(api: Api, control: SandboxControl) -> None:
    token = api.token()
    order_id = new_id()
    control.add_faults(order_id, {"trickle_s": 0.02})
    started = time.monotonic()
    response = requests.post(api.base_url + ACCEPT, json={"delivery_id": "7", "store_id": "3",
                                                          "order_external_id": order_id},
                             headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT,
                             stream=True)
    assert response.status_code == 200  # status and headers come at once
    body = response.content  # then one byte every 0.02 s
    assert time.monotonic() - started >= 0.02 * (len(body) - 1)
    assert response.json() == {"message": ["Operation completed successfully"], "data": None}
    assert accepted(control, order_id) == 1
    [entry] = control.requests(order_external_id=order_id)
    assert entry["fault"] == "trickle_s=0.02" and entry["status"] == 200


def test_trickled_fault_answer_on_the_token_call(api: Api, control: SandboxControl) -> None:
    control.add_call_faults("token", {"status": 502, "raw_body": "<html>", "trickle_s": 0.01})
    response = api.token_response()
    assert (response.status_code, response.text) == (502, "<html>")


def test_reset_after_the_body_was_read(api: Api, control: SandboxControl) -> None:
    token = api.token()
    applied, not_applied = new_id(), new_id()
    control.add_faults(applied, {"reset": True})
    control.add_faults(not_applied, {"reset": True, "apply": False})
    for order_id in (applied, not_applied):
        with pytest.raises(requests.ConnectionError, match="reset"):
            api.accept(token, order_id)
    assert accepted(control, applied) == 1  # mipos did it; the client only saw a reset
    assert accepted(control, not_applied) == 0
    [entry] = control.requests(order_external_id=applied)
    assert entry["status"] is None and entry["fault"] == "reset=True"
    assert api.accept(token, not_applied).status_code == 200


def test_reset_after_a_token_call_that_minted(api: Api, control: SandboxControl) -> None:
    control.add_call_faults("token", {"reset": True})
    with pytest.raises(requests.ConnectionError, match="reset"):
        api.token_response()
    assert control.stats()["current_token_expires_at"] is not None  # the token was minted
    assert api.token()


def test_fixed_expires_in(api: Api, control: SandboxControl) -> None:
    assert control.config(expires_in_fixed="1585815796")["expires_in_fixed"] == "1585815796"
    assert api.token_response().json()["data"]["expires_in"] == "1585815796"
    token = api.token()
    assert api.accept(token, new_id()).status_code == 200  # the token lives by token_ttl_s
    refreshed = api.refresh_response(token).json()["data"]
    assert refreshed["expires_in"] == "1585815796"
    control.config(expires_in_fixed=None)
    assert api.token_response().json()["data"]["expires_in"] != "1585815796"
    with pytest.raises(requests.HTTPError):
        control.config(expires_in_fixed=5)
