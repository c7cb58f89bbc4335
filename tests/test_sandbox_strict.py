"""The sandbox's strict mode and its landing delays, over real HTTP to real sandbox processes.

Strict mode answers ``409 Order not found.`` to an accept or deny of an order that is
not pending; lenient (the default) answers 200. ``land_after_s`` lands a request at a
chosen time after it arrived, whenever (or whether) it is answered. Timings are read
from the sandbox's own log (``time``, ``landed_at``) and waited for with a bound.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from sandbox import SandboxControl
from support.processes import Sandbox, wait_for
from tests.test_sandbox import ROOT, TIMEOUT, Api, new_id, start_sandbox, stop_sandbox

NOT_FOUND = {"message": ["Order not found."], "data": None}
SUCCESS = {"message": ["Operation completed successfully"], "data": None}
STORE = "3"  # the store Api.accept and Api.deny use
SLACK_S = 0.6  # how late a landing may be on 2 busy shared cores


# -- the server processes -------------------------------------------------------------


@pytest.fixture(scope="module")
def lenient_url() -> Iterator[str]:
    proc, url = start_sandbox("--quiet")
    try:
        yield url
    finally:
        stop_sandbox(proc)


@pytest.fixture(scope="module")
def strict_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """Built as other tests build theirs: support.processes.Sandbox(strict=True) (--strict)."""
    sandbox = Sandbox(tmp_path_factory.mktemp("strict-sandbox"), "--timeout-land-after-s", "0.25",
                      strict=True)
    try:
        yield sandbox
    finally:
        sandbox.stop()


@pytest.fixture
def control(lenient_url: str) -> SandboxControl:
    ctl = SandboxControl(lenient_url, timeout=TIMEOUT)
    ctl.reset()
    return ctl


@pytest.fixture
def api(lenient_url: str, control: SandboxControl) -> Api:
    return Api(lenient_url)


@pytest.fixture
def strict_control(strict_sandbox: Sandbox) -> SandboxControl:
    ctl = SandboxControl(strict_sandbox.url, timeout=TIMEOUT)
    ctl.reset()
    return ctl


@pytest.fixture
def strict_api(strict_sandbox: Sandbox, strict_control: SandboxControl) -> Api:
    return Api(strict_sandbox.url)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


# -- helpers ------------------------------------------------------------------------------


def record(control: SandboxControl, order_id: str) -> dict[str, Any]:
    return dict(control.orders()["orders"].get(f"{STORE}/{order_id}") or
                {"accepted": 0, "denied": 0})


def entries(control: SandboxControl, order_id: str) -> list[dict[str, Any]]:
    return control.requests(order_external_id=order_id)


def the_entry(control: SandboxControl, order_id: str) -> dict[str, Any]:
    [entry] = entries(control, order_id)
    return entry


def landed(control: SandboxControl, order_id: str, index: int = 0) -> dict[str, Any] | None:
    """The order's ``index``-th logged request once it has landed, else None."""
    found = entries(control, order_id)
    return found[index] if len(found) > index and found[index]["landed_at"] is not None else None


def landing_delay(entry: dict[str, Any]) -> float:
    return float(entry["landed_at"]) - float(entry["time"])


def deliver(control: SandboxControl, order_id: str, **options: Any) -> None:
    control.deliver(STORE, 7, order_id, **options)


# -- strict mode ------------------------------------------------------------------------


def test_strict_first_accept_succeeds_and_a_second_is_order_not_found(
        strict_api: Api, strict_control: SandboxControl) -> None:
    token = strict_api.token()
    order_id = new_id()
    deliver(strict_control, order_id)
    first = strict_api.accept(token, order_id)
    assert (first.status_code, first.json()) == (200, SUCCESS)
    assert strict_api.pending(STORE, token).json()["data"] == []  # gone from the pending list

    second = strict_api.accept(token, order_id)
    assert (second.status_code, second.json()) == (409, NOT_FOUND)
    assert record(strict_control, order_id)["accepted"] == 1  # the second changed nothing
    logged = entries(strict_control, order_id)
    assert [(e["status"], e["landed_status"], e["applied"]) for e in logged] == [
        (200, 200, True), (409, 409, False)]
    assert all(e["landed_at"] is not None for e in logged)


def test_strict_accept_after_a_deny_is_order_not_found(
        strict_api: Api, strict_control: SandboxControl) -> None:
    token = strict_api.token()
    order_id = new_id()
    deliver(strict_control, order_id)
    assert strict_api.deny(token, order_id).status_code == 200
    after = strict_api.accept(token, order_id)
    assert (after.status_code, after.json()) == (409, NOT_FOUND)
    again = strict_api.deny(token, order_id)
    assert (again.status_code, again.json()) == (409, NOT_FOUND)
    assert {k: record(strict_control, order_id)[k] for k in ("accepted", "denied")} == {
        "accepted": 0, "denied": 1}


def test_strict_never_delivered_or_too_old_is_order_not_found(
        strict_api: Api, strict_control: SandboxControl) -> None:
    token = strict_api.token()
    never, old = new_id(), new_id()
    deliver(strict_control, old, created_at=time.time() - 11 * 60)  # out of the 10-minute window
    for answer in (strict_api.accept(token, never), strict_api.deny(token, never),
                   strict_api.accept(token, old)):
        assert (answer.status_code, answer.json()) == (409, NOT_FOUND)
    assert strict_control.orders() == {"orders": {}}
    stats = strict_control.stats()
    assert (stats["accept_calls"], stats["deny_calls"], stats["accepted_orders"]) == (2, 1, 0)


def test_strict_checks_the_token_and_the_fields_first(
        strict_api: Api, strict_control: SandboxControl) -> None:
    order_id = new_id()
    assert strict_api.accept("not-a-token", order_id).status_code == 401
    token = strict_api.token()
    assert strict_api.accept(token, order_id, delivery_id=7).status_code == 422
    assert strict_api.accept(token, order_id).status_code == 409


def test_strict_flag_is_the_initial_config(strict_control: SandboxControl) -> None:
    config = strict_control.config()
    assert (config["strict"], config["timeout_land_after_s"]) == (True, 0.25)
    assert strict_control.config(strict=False)["strict"] is False
    strict_control.reset()  # back to what the command line said
    assert strict_control.config()["strict"] is True


def test_lenient_is_the_default_and_unchanged(api: Api, control: SandboxControl) -> None:
    assert control.config()["strict"] is False
    token = api.token()
    twice, denied_then_accepted, never = new_id(), new_id(), new_id()
    deliver(control, twice)
    assert [api.accept(token, twice).status_code for _ in range(2)] == [200, 200]
    assert api.deny(token, denied_then_accepted).status_code == 200
    assert api.accept(token, denied_then_accepted).status_code == 200
    assert api.accept(token, never).status_code == 200
    assert record(control, twice)["accepted"] == 2  # counted again, as before
    assert (record(control, denied_then_accepted)["accepted"],
            record(control, denied_then_accepted)["denied"]) == (1, 1)
    assert all(e["applied"] for e in entries(control, twice))


def test_strict_through_the_config_endpoint(api: Api, control: SandboxControl) -> None:
    token = api.token()
    assert control.config(strict=True)["strict"] is True
    order_id = new_id()
    assert api.accept(token, order_id).json() == NOT_FOUND
    control.config(strict=False)
    assert api.accept(token, order_id).status_code == 200
    for bad in ({"strict": "yes"}, {"strict": 1}, {"timeout_land_after_s": -1},
                {"timeout_land_after_s": "2"}):
        with pytest.raises(requests.HTTPError, match="strict|timeout_land_after_s"):
            control.config(**bad)


# -- land_after_s -------------------------------------------------------------------------


def test_land_after_s_lands_before_a_later_answer(
        api: Api, control: SandboxControl, pool: ThreadPoolExecutor) -> None:
    token = api.token()
    order_id = new_id()
    control.add_faults(order_id, {"delay_s": 2.0, "land_after_s": 0.5})
    started = time.monotonic()
    answer = pool.submit(api.accept, token, order_id)
    entry = wait_for(lambda: landed(control, order_id), timeout=5, what="the request to land")
    assert entry["status"] is None and not answer.done()  # landed, not answered yet
    assert 0.5 <= landing_delay(entry) < 0.5 + SLACK_S
    assert (entry["landed_status"], entry["applied"]) == (200, True)
    assert record(control, order_id)["accepted"] == 1

    response = answer.result(timeout=10)
    assert (response.status_code, response.json()) == (200, SUCCESS)
    assert time.monotonic() - started >= 2.0
    assert the_entry(control, order_id)["status"] == 200


def test_land_after_s_with_drop_closes_at_once_and_lands_later(
        api: Api, control: SandboxControl) -> None:
    token = api.token()
    order_id = new_id()
    control.add_faults(order_id, {"land_after_s": 1.0, "drop": True})
    with pytest.raises(requests.ConnectionError):
        api.accept(token, order_id)
    dropped = the_entry(control, order_id)
    assert dropped["landed_at"] is None and record(control, order_id)["accepted"] == 0

    entry = wait_for(lambda: landed(control, order_id), timeout=5, what="the dropped request to land")
    assert 1.0 <= landing_delay(entry) < 1.0 + SLACK_S
    assert (entry["status"], entry["applied"], entry["fault"]) == (
        None, True, "land_after_s=1.0,drop=True")
    assert record(control, order_id)["accepted"] == 1


def test_answer_before_the_landing_says_what_landing_would(
        api: Api, control: SandboxControl, strict_api: Api,
        strict_control: SandboxControl) -> None:
    """Lenient: 200, then lands. Strict: decided by the pending list at answer time."""
    token, strict_token = api.token(), strict_api.token()
    lenient, pending, never = new_id(), new_id(), new_id()
    control.add_faults(lenient, {"land_after_s": 0.8})
    deliver(strict_control, pending)
    for order_id in (pending, never):
        strict_control.add_faults(order_id, {"land_after_s": 0.8})

    assert api.accept(token, lenient).json() == SUCCESS
    assert strict_api.accept(strict_token, pending).json() == SUCCESS
    assert strict_api.accept(strict_token, never).json() == NOT_FOUND
    assert record(control, lenient)["accepted"] == 0  # answered, not landed yet
    assert the_entry(strict_control, pending)["landed_at"] is None

    for ctl, order_id, outcome in ((control, lenient, (200, True)),
                                   (strict_control, pending, (200, True)),
                                   (strict_control, never, (409, False))):
        entry = wait_for(lambda ctl=ctl, order_id=order_id: landed(ctl, order_id), timeout=5,
                         what="a late landing")
        assert 0.8 <= landing_delay(entry) < 0.8 + SLACK_S
        assert (entry["landed_status"], entry["applied"]) == outcome
    assert record(control, lenient)["accepted"] == 1
    assert record(strict_control, pending)["accepted"] == 1


def test_strict_slow_request_overtaken_by_its_retry_gets_a_late_409(
        strict_api: Api, strict_control: SandboxControl, pool: ThreadPoolExecutor) -> None:
    """The worker's case: the retry lands first; the slow request lands after it, is
    refused, and its late answer says so."""
    token = strict_api.token()
    order_id = new_id()
    deliver(strict_control, order_id)
    strict_control.add_faults(order_id, {"delay_s": 1.6, "land_after_s": 0.8})
    slow = pool.submit(strict_api.accept, token, order_id)
    wait_for(lambda: entries(strict_control, order_id), timeout=5, what="the slow request to arrive")
    retry = strict_api.accept(token, order_id)  # the fault is used up: lands at once
    assert (retry.status_code, retry.json()) == (200, SUCCESS)

    late = slow.result(timeout=10)
    assert (late.status_code, late.json()) == (409, NOT_FOUND)
    first, second = entries(strict_control, order_id)
    assert (first["landed_status"], first["applied"], first["status"]) == (409, False, 409)
    assert first["landed_at"] > second["landed_at"]
    assert record(strict_control, order_id)["accepted"] == 1


def test_land_after_s_with_a_status_fault_answers_it_and_lands(
        api: Api, control: SandboxControl) -> None:
    token = api.token()
    order_id = new_id()
    control.add_faults(order_id, {"status": 504, "message": "Gateway Timeout", "land_after_s": 0.3})
    assert api.accept(token, order_id).status_code == 504
    entry = wait_for(lambda: landed(control, order_id), timeout=5, what="the 504 request to land")
    assert (entry["status"], entry["applied"]) == (504, True)


def test_bad_land_after_s_faults_are_refused(control: SandboxControl) -> None:
    with pytest.raises(requests.HTTPError, match="apply: false"):
        control.add_faults(new_id(), {"land_after_s": 2, "apply": False})
    with pytest.raises(requests.HTTPError, match="non-negative"):
        control.add_faults(new_id(), {"land_after_s": -1})
    for target in ("token", "refresh", "pending:3"):
        with pytest.raises(requests.HTTPError, match="accept/deny faults only"):
            control.add_call_faults(target, {"land_after_s": 1})


def test_reset_forgets_the_landings_still_waiting(api: Api, control: SandboxControl) -> None:
    token = api.token()
    forgotten, later = new_id(), new_id()
    control.add_faults(forgotten, {"land_after_s": 0.4, "drop": True})
    with pytest.raises(requests.ConnectionError):
        api.accept(token, forgotten)
    control.reset()
    token = api.token()
    control.add_faults(later, {"land_after_s": 0.8, "drop": True})
    with pytest.raises(requests.ConnectionError):
        api.accept(token, later)
    wait_for(lambda: landed(control, later), timeout=5, what="the later request to land")
    assert record(control, forgotten)["accepted"] == 0  # due before `later`, and dropped


# -- the random timeout fault with timeout_land_after_s -------------------------------------


def test_random_timeout_lands_after_the_client_gave_up_and_before_the_answer(
        api: Api, control: SandboxControl) -> None:
    """Client timeout 0.2 s, landing at 0.6 s, answer at 2 s: the chaos run's shape."""
    token = api.token()
    config = control.config(fault_rates={"timeout": 1.0}, timeout_delay_s=2.0,
                            timeout_land_after_s=0.6)
    assert config["timeout_land_after_s"] == 0.6
    order_id = new_id()
    with pytest.raises(requests.ReadTimeout):
        api.accept(token, order_id, timeout=0.2)
    assert record(control, order_id)["accepted"] == 0  # the client gave up before it landed
    entry = wait_for(lambda: landed(control, order_id), timeout=5, what="the timed-out request to land")
    assert 0.6 <= landing_delay(entry) < 0.6 + SLACK_S
    assert (entry["fault"], entry["status"], entry["applied"]) == ("random:timeout", None, True)
    assert control.config(timeout_land_after_s=None)["timeout_land_after_s"] is None


def test_random_timeout_landing_after_its_answer(api: Api, control: SandboxControl) -> None:
    token = api.token()
    control.config(fault_rates={"timeout": 1.0}, timeout_delay_s=0.2, timeout_land_after_s=1.0)
    order_id = new_id()
    answer = api.accept(token, order_id)
    assert (answer.status_code, answer.json()) == (200, SUCCESS)  # as if it had landed
    assert record(control, order_id)["accepted"] == 0
    entry = wait_for(lambda: landed(control, order_id), timeout=5, what="the request to land")
    assert 1.0 <= landing_delay(entry) < 1.0 + SLACK_S
    assert entry["status"] == 200 and entry["applied"] is True


def test_random_timeout_without_a_landing_time_lands_when_it_answers(
        api: Api, control: SandboxControl) -> None:
    token = api.token()
    control.config(fault_rates={"timeout": 1.0}, timeout_delay_s=0.5)
    order_id = new_id()
    assert api.accept(token, order_id).status_code == 200
    entry = the_entry(control, order_id)
    assert 0.5 <= landing_delay(entry) < 0.5 + SLACK_S and entry["applied"] is True


# -- the command line ---------------------------------------------------------------------


def test_help_says_strict_is_a_modelling_choice() -> None:
    shown = subprocess.run([sys.executable, "-m", "sandbox", "--help"], cwd=ROOT, check=True,
                           capture_output=True, text=True, timeout=30).stdout
    flat = " ".join(shown.split())
    assert "--strict" in flat and "modelling choice" in flat and "--timeout-land-after-s" in flat


def test_bad_timeout_land_after_s_flag_is_refused() -> None:
    done = subprocess.run([sys.executable, "-m", "sandbox", "--port", "0",
                           "--timeout-land-after-s", "-1"], cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "non-negative" in done.stderr
