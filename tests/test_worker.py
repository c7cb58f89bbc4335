"""The worker end to end: real redis-server, Procfile workers, the sandbox mipos."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from support.processes import RedisServer
from tests.conftest import Cluster, ClusterStarter, dead_letter_of, new_order_id

ACCEPT_PATH = "/api/v1/integration/order/accept"
DENY_PATH = "/api/v1/integration/order/deny"
LINE_FIELDS = {
    "event", "timestamp", "level", "task_id", "delivery_id", "store_id", "order_external_id",
    "attempt", "max_attempts", "outcome", "http_status", "error", "error_class", "elapsed_ms",
}
BASE, CAP = 0.05, 0.4  # FAST_RETRY_ENV


@pytest.fixture(scope="module")
def cluster(make_cluster_module: Any) -> Cluster:
    return make_cluster_module(processes=1)


@pytest.fixture(scope="module")
def make_cluster_module(redis_server: RedisServer, sandbox: Any, logdir: Any) -> Iterator[Any]:
    starter = ClusterStarter(redis_server, sandbox, logdir)
    yield starter
    starter.stop_all()


def order_args(**extra: Any) -> dict[str, Any]:
    return {"delivery_id": 41, "store_id": "3", "order_external_id": new_order_id(), **extra}


def mipos_requests(cluster: Cluster, order_id: str, path: str = ACCEPT_PATH) -> list[dict[str, Any]]:
    return [r for r in cluster.control.requests(order_external_id=order_id) if r["path"] == path]


def assert_schedule(lines: list[dict[str, Any]]) -> None:
    """Each retry waited inside the bounds of interface.md's schedule."""
    for line in lines:
        if line["outcome"] == "retrying":
            n = line["attempt"]
            high = min(CAP, BASE * 2 ** (n - 1))
            assert high * 0.5 - 1e-3 <= line["retry_in_s"] <= high + 1e-3, line


# -- the plain paths ------------------------------------------------------------


def test_plain_accept(cluster: Cluster, tasks: ModuleType) -> None:
    args = order_args()
    result = tasks.accept_order.delay(**args)
    [line] = cluster.wait_final(args["order_external_id"])

    [request] = mipos_requests(cluster, args["order_external_id"])
    assert request["body"] == {"delivery_id": "41", "store_id": "3",
                               "order_external_id": args["order_external_id"]}
    assert request["authorization"].startswith("Bearer ") and request["token_valid"] is True
    assert request["status"] == 200
    assert LINE_FIELDS <= set(line)
    assert line["event"] == "accept_attempt" and line["level"] == "info"
    assert line["outcome"] == "accepted" and line["attempt"] == 1 and line["max_attempts"] == 6
    assert line["task_id"] == result.id and line["http_status"] == 200
    assert line["error"] is None and line["error_class"] is None
    assert line["delivery_id"] == "41" and line["timestamp"].endswith("Z")
    assert cluster.control.orders()["orders"][f"3/{args['order_external_id']}"]["accepted"] == 1


def test_plain_deny(cluster: Cluster, tasks: ModuleType) -> None:
    args = order_args(message="Out of stock")
    tasks.deny_order.delay(**args)
    [line] = cluster.wait_final(args["order_external_id"])

    [request] = mipos_requests(cluster, args["order_external_id"], DENY_PATH)
    assert request["body"]["message"] == "Out of stock"
    assert request["body"]["delivery_id"] == "41"
    assert LINE_FIELDS <= set(line)
    assert (line["event"], line["outcome"], line["http_status"]) == ("deny_attempt", "denied", 200)


def test_send_task_by_name(cluster: Cluster, tasks: ModuleType) -> None:
    from worker.wiring.celery_app import app

    args = order_args()
    app.send_task("mipos.accept_order", kwargs=args)
    [line] = cluster.wait_final(args["order_external_id"])
    assert line["outcome"] == "accepted"


# -- transient answers ----------------------------------------------------------


def test_unable_to_get_token_three_times_then_success(cluster: Cluster, tasks: ModuleType) -> None:
    args = order_args()
    cluster.control.add_faults(args["order_external_id"],
                               {"status": 409, "message": "Unable to get token.", "times": 3})
    tasks.accept_order.delay(**args)
    lines = cluster.wait_final(args["order_external_id"])

    assert [line["outcome"] for line in lines] == ["retrying"] * 3 + ["accepted"]
    assert [line["attempt"] for line in lines] == [1, 2, 3, 4]
    assert all(line["error"] == "Unable to get token." for line in lines[:3])
    assert all(line["error_class"] == "transient" and line["level"] == "warning" for line in lines[:3])
    assert_schedule(lines)
    sent = mipos_requests(cluster, args["order_external_id"])
    assert len(sent) == 4
    for earlier, later, line in zip(sent, sent[1:], lines):
        assert later["time"] - earlier["time"] >= line["retry_in_s"] - 0.01


@pytest.mark.parametrize(
    ("fault", "error_part"),
    [
        ({"status": 500, "message": "Server Error"}, "Server Error"),
        ({"drop": True}, "ConnectionError"),
        ({"status": 502, "raw_body": "<html>bad gateway</html>"}, "HTTP 502"),
    ],
    ids=["500", "dropped-connection", "not-json"],
)
def test_transient_then_success(cluster: Cluster, tasks: ModuleType, fault: dict[str, Any],
                                error_part: str) -> None:
    args = order_args()
    cluster.control.deliver("3", 41, args["order_external_id"])  # mipos lists it as pending
    cluster.control.add_faults(args["order_external_id"], fault)
    tasks.accept_order.delay(**args)
    lines = cluster.wait_final(args["order_external_id"])

    # A connection dropped after the request went out, or a gateway's 502: mipos may have
    # applied it. It is given one call's bound to land (a line, no attempt spent); the order
    # is still listed as pending, so it is sent again, flagged.
    unknown = "drop" in fault or fault.get("status") == 502
    expected = ["retrying", "retrying", "accepted"] if unknown else ["retrying", "accepted"]
    assert [line["outcome"] for line in lines] == expected
    assert error_part in lines[0]["error"] and lines[0]["error_class"] == "transient"
    assert_schedule([line for line in lines if "waiting_for_task_id" not in line])
    assert len(mipos_requests(cluster, args["order_external_id"])) == 2
    assert lines[0].get("outcome_unknown", False) is unknown
    assert lines[-1].get("previous_outcome") == ("unknown" if unknown else None)
    if unknown:
        assert lines[1]["waiting_for_task_id"] == lines[0]["task_id"]


def test_read_timeout_still_pending_is_sent_again_and_says_so(cluster: Cluster,
                                                               tasks: ModuleType) -> None:
    args = order_args()
    order_id = args["order_external_id"]
    cluster.control.deliver("3", 41, order_id)  # mipos lists it as pending
    cluster.control.add_faults(order_id, {"delay_s": 1.6, "apply": False})  # client timeout: 1 s
    tasks.accept_order.delay(**args)
    lines = cluster.wait_final(order_id)

    # the timeout; the wait for it to land or not (one call's bound); the resend, flagged
    assert [line["outcome"] for line in lines] == ["retrying", "retrying", "accepted"]
    assert "ReadTimeout" in lines[0]["error"] and lines[0]["http_status"] is None
    assert lines[0]["outcome_unknown"] is True
    assert lines[1]["error"].startswith("waiting for the earlier accept")
    assert lines[2]["previous_outcome"] == "unknown" and lines[2]["possible_duplicate"] is True
    assert "confirmed_by" not in lines[2]


def test_429_waits_for_retry_after(cluster: Cluster, tasks: ModuleType) -> None:
    args = order_args()
    cluster.control.add_faults(args["order_external_id"],
                               {"status": 429, "message": "Too Many Attempts.", "retry_after": 1})
    tasks.accept_order.delay(**args)
    lines = cluster.wait_final(args["order_external_id"])

    assert [line["outcome"] for line in lines] == ["retrying", "accepted"]
    assert lines[0]["http_status"] == 429 and lines[0]["retry_in_s"] >= 1.0
    first, second = mipos_requests(cluster, args["order_external_id"])
    assert second["time"] - first["time"] >= 1.0


# -- permanent answers ----------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        {"status": 409, "message": "User not found."},
        {"status": 409, "message": "You don't have this store available."},
        {"status": 409, "message": "Order not found."},
        {"status": 409, "message": "Microservice does not have this integration configured."},
        {"status": 422, "body": {"delivery_id": ["The delivery id field is required."]}},
        {"status": 404, "message": "Not Found"},
    ],
    ids=["user", "store", "order", "integration", "422", "404"],
)
def test_permanent_answer_stops_and_dead_letters(cluster: Cluster, tasks: ModuleType,
                                                 redis_server: RedisServer,
                                                 fault: dict[str, Any]) -> None:
    args = order_args()
    cluster.control.add_faults(args["order_external_id"], {**fault, "times": -1})
    tasks.accept_order.delay(**args)
    [line] = cluster.wait_final(args["order_external_id"])

    assert len(mipos_requests(cluster, args["order_external_id"])) == 1
    assert (line["outcome"], line["fail_reason"], line["level"]) == ("failed", "permanent", "error")
    assert line["error_class"] == "permanent" and line["http_status"] == fault["status"]
    letter = dead_letter_of(redis_server, args["order_external_id"])
    assert letter.reason == "permanent" and letter.action == "accept"
    assert letter.error == line["error"] and len(letter.attempts) == 1
    assert letter.attempts[0]["http_status"] == fault["status"]


# -- idempotency ------------------------------------------------------------------


def test_same_order_five_times_is_accepted_once(cluster: Cluster, tasks: ModuleType) -> None:
    args = order_args()
    for _ in range(5):
        tasks.accept_order.delay(**args)
    lines = cluster.wait_final(args["order_external_id"], count=5)

    assert len(mipos_requests(cluster, args["order_external_id"])) == 1
    outcomes = sorted(line["outcome"] for line in lines)
    assert outcomes == ["accepted"] + ["skipped"] * 4


def test_deny_after_accept_fails_with_a_clear_reason(cluster: Cluster, tasks: ModuleType,
                                                     redis_server: RedisServer) -> None:
    args = order_args()
    tasks.accept_order.delay(**args)
    cluster.wait_final(args["order_external_id"])
    tasks.deny_order.delay(**args, message="Changed our mind")
    lines = cluster.wait_final(args["order_external_id"], count=2)

    deny = [line for line in lines if line["event"] == "deny_attempt"][0]
    assert deny["outcome"] == "failed" and "already accepted" in deny["error"]
    assert mipos_requests(cluster, args["order_external_id"], DENY_PATH) == []
    assert dead_letter_of(redis_server, args["order_external_id"]).action == "deny"


# -- bad input --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"delivery_id": "", "store_id": "3", "order_external_id": "x"}, "delivery_id"),
        ({"delivery_id": "1", "store_id": None, "order_external_id": "x"}, "store_id"),
        ({"delivery_id": "1", "store_id": "3"}, "order_external_id"),
        ({"delivery_id": 1.5, "store_id": "3", "order_external_id": "x"}, "delivery_id"),
        ({"delivery_id": "1", "store_id": "3", "order_external_id": "x", "extra": 1}, "extra"),
    ],
)
def test_bad_arguments_raise_in_the_caller_and_enqueue_nothing(
        tasks: ModuleType, redis_server: RedisServer, kwargs: dict[str, Any], field: str) -> None:
    sent_before = redis_server.client.llen("mipos")
    with pytest.raises(ValueError, match=field):
        tasks.accept_order.delay(**kwargs)
    assert redis_server.client.llen("mipos") == sent_before


def test_deny_needs_a_message(tasks: ModuleType) -> None:
    with pytest.raises(ValueError, match="message"):
        tasks.deny_order.delay(delivery_id="1", store_id="3", order_external_id="x")
    with pytest.raises(ValueError, match="message"):
        tasks.deny_order.delay(delivery_id="1", store_id="3", order_external_id="x", message="  ")


def test_bad_message_sent_by_name_fails_without_http_and_is_dead_lettered(
        cluster: Cluster, tasks: ModuleType, redis_server: RedisServer) -> None:
    from worker.wiring.celery_app import app

    order_id = new_order_id()
    app.send_task("mipos.accept_order",
                  kwargs={"delivery_id": "", "store_id": "3", "order_external_id": order_id})
    [line] = cluster.wait_final(order_id)

    assert (line["outcome"], line["fail_reason"]) == ("failed", "invalid")
    assert "delivery_id" in line["error"] and line["http_status"] is None
    assert cluster.control.requests(order_external_id=order_id) == []
    assert dead_letter_of(redis_server, order_id).reason == "invalid"
