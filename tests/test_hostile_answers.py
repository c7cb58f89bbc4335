"""Hostile answers (issue 11, item 2): any body classifies by its status, never raises,
and gives a readable, bounded ``error``; on the accept call, the token call and the
pending list; in unit tests, over real HTTP against the sandbox, and through a real worker."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from config import MiposSettings
from sandbox import SANDBOX_CREDENTIALS
from support.processes import RedisServer, Sandbox
from tests.conftest import Cluster, dead_letter_of, new_order_id
from worker.mipos.classification import MAX_ERROR_CHARS, Answer, classify
from worker.mipos.client import MiposClient, TokenGrant, _grant_from
from worker.mipos.errors import AuthError, ErrorClass, MiposError, PermanentError, TransientError
from worker.mipos.pending import fetch_pending
from worker.mipos.tokens import TokenStore
from mipos_worker.order.model import Action, parse_order_request

T, A, P = ErrorClass.TRANSIENT, ErrorClass.AUTH, ErrorClass.PERMANENT


def _nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = [value]
    return value


HOSTILE_BODIES: dict[str, Any] = {
    "errors-list-of-dicts": {"errors": [{"code": 1, "detail": "boom"}]},
    "message-list-of-ints": {"message": [1]},
    "message-list-of-nulls": {"message": [None, None]},
    "message-list-of-dicts": {"message": [{"text": "no"}], "data": None},
    "message-list-of-lists": {"message": [["a"], ["b", 2]]},
    "message-dict": {"message": {"a": {"b": [1, 2]}}},
    "message-null": {"message": None, "data": None},
    "message-number": {"message": 12.5},
    "field-list-of-nulls": {"delivery_id": [None]},
    "field-list-of-dicts": {"store_id": [{"rule": "required"}], "x": 3},
    "field-null": {"delivery_id": None},
    "bare-number": 42,
    "bare-float": 1e300,
    "null": None,
    "true": True,
    "bare-list": [1, "x", None, {"a": []}],
    "list-of-dicts": [{"message": "hidden"}],
    "empty-dict": {},
    "empty-list": [],
    "nested-600": _nested(600),
    "huge-message": {"message": "x" * 200_000},
    "huge-field-list": {"delivery_id": ["y" * 1000] * 100},
    "many-fields": {f"field_{i}": [i] for i in range(5000)},
}
STATUS_CLASSES = {500: T, 502: T, 503: T, 422: P, 401: A, 404: P, 403: P}


def readable(error: str | None) -> str:
    assert isinstance(error, str) and error.strip(), error
    assert len(error) <= MAX_ERROR_CHARS + 100, len(error)  # room for "token call failed: " etc.
    return error


# -- unit: classify --------------------------------------------------------------------


@pytest.mark.parametrize("status", sorted(STATUS_CLASSES))
@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
def test_classify_never_raises_and_goes_by_status(name: str, status: int) -> None:
    verdict = classify(Answer(http_status=status, body=HOSTILE_BODIES[name], text="..."))
    assert verdict.error_class is STATUS_CLASSES[status]
    readable(verdict.error)


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
def test_hostile_409_and_200_bodies(name: str) -> None:
    body = HOSTILE_BODIES[name]
    conflict = classify(Answer(http_status=409, body=body, text="..."))
    assert conflict.error_class in (T, A, P)
    readable(conflict.error)
    success = classify(Answer(http_status=200, body=body, text="..."))
    assert success.ok or success.error_class is T
    if not success.ok:
        readable(success.error)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"message": [1]}, "1"),
        ({"delivery_id": [None]}, "delivery_id: null"),
        ({"errors": [{"code": 1}]}, 'errors: {"code": 1}'),
        ({"message": ["a", 2, None]}, "a; 2; null"),
        (None, "HTTP 422"),
        (42, "HTTP 422"),
        ({}, "HTTP 422"),
    ],
)
def test_non_string_items_are_rendered_as_json(body: Any, expected: str) -> None:
    assert classify(Answer(http_status=422, body=body)).error == expected


def test_a_long_error_is_cut_and_says_so() -> None:
    error = readable(classify(Answer(http_status=500, body={"message": "z" * 10_000})).error)
    assert error.startswith("zzz") and error.endswith("(cut)")


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
@pytest.mark.parametrize("status", [200, 500, 422, 409, 401])
def test_grant_from_never_raises_anything_but_a_mipos_error(name: str, status: int) -> None:
    answer = Answer(http_status=status, body=HOSTILE_BODIES[name], text="...")
    try:
        _grant_from(answer, "token call")
    except MiposError as exc:
        readable(exc.message)
    else:
        pytest.fail("a hostile body gave a token")


@pytest.mark.parametrize(
    "data",
    [{"token": 5}, {"token": ""}, {"token": None}, {"token": ["t"]}, ["t"], None, "t",
     {"token": "t\r\nX-Evil: 1"}],
)
def test_200_without_a_usable_token(data: Any) -> None:
    with pytest.raises(TransientError, match="without a usable token"):
        _grant_from(Answer(http_status=200, body={"message": "Access token.", "data": data}),
                    "token call")


@pytest.mark.parametrize("expires_in", [[1], {"a": 1}, "1e999", "nan", "-inf", 10**400, True])
def test_200_with_a_hostile_expires_in_still_gives_the_token(expires_in: Any) -> None:
    grant = _grant_from(Answer(http_status=200, body={"data": {"token": "tok", "expires_in": expires_in}}),
                        "token call")
    assert isinstance(grant, TokenGrant) and grant.token == "tok" and grant.expires_at is None


# -- over real HTTP against the sandbox ----------------------------------------------------


@pytest.fixture(scope="module")
def client(sandbox: Sandbox) -> MiposClient:
    return MiposClient(MiposSettings(base_url=sandbox.url, timeout_s=2.0, **SANDBOX_CREDENTIALS))


def _token(client: MiposClient) -> str:
    return client.request_token().token


HTTP_CASES = [(name, status) for name in sorted(HOSTILE_BODIES) for status in (503, 422)]


@pytest.mark.parametrize(("name", "status"), HTTP_CASES)
def test_accept_call_with_a_hostile_body(client: MiposClient, sandbox: Sandbox, name: str,
                                         status: int) -> None:
    token = _token(client)
    order_id = new_order_id()
    sandbox.control.add_faults(order_id, {"status": status, "body": HOSTILE_BODIES[name]})
    request = parse_order_request(Action.ACCEPT, {"delivery_id": "1", "store_id": "3",
                                                  "order_external_id": order_id})
    answer = client.send(request, token)
    assert answer.http_status == status and not answer.outcome_unknown
    verdict = classify(answer)
    assert verdict.error_class is STATUS_CLASSES[status]
    readable(verdict.error)


@pytest.mark.parametrize(("name", "status"), HTTP_CASES)
def test_token_call_with_a_hostile_body(client: MiposClient, sandbox: Sandbox, name: str,
                                        status: int) -> None:
    sandbox.control.add_call_faults("token", {"status": status, "body": HOSTILE_BODIES[name]})
    expected = TransientError if status >= 500 else AuthError
    with pytest.raises(expected) as caught:
        client.request_token()
    assert caught.value.http_status == status
    assert readable(caught.value.message).startswith("token call failed: ")


@pytest.mark.parametrize("status", [200, 500])
def test_refresh_call_with_a_hostile_body(client: MiposClient, sandbox: Sandbox, status: int) -> None:
    token = _token(client)
    sandbox.control.add_call_faults("refresh", {"status": status, "body": [{"data": {"token": 1}}]})
    with pytest.raises(TransientError) as caught:
        client.refresh_token(token)
    readable(caught.value.message)


def test_a_body_past_the_read_bound_is_not_the_documented_json(client: MiposClient,
                                                               sandbox: Sandbox) -> None:
    token = _token(client)
    order_id = new_order_id()
    huge = {"message": ["Order not found."], "padding": "p" * 300_000}  # a permanent 409, if read
    sandbox.control.add_faults(order_id, {"status": 409, "body": huge})
    request = parse_order_request(Action.ACCEPT, {"delivery_id": "1", "store_id": "3",
                                                  "order_external_id": order_id})
    answer = client.send(request, token)
    assert answer.http_status == 409 and not answer.is_json
    assert len(answer.text) <= 500
    verdict = classify(answer)
    assert verdict.error_class is T  # undocumented body: transient, not the permanent message
    assert readable(verdict.error).startswith("409 with an undocumented body")


@pytest.mark.parametrize("raw", ["<html>" * 50_000, "\x00\xff" * 10, "{" * 70_000, "[" * 5000])
def test_raw_bodies_that_are_not_json(client: MiposClient, sandbox: Sandbox, raw: str) -> None:
    token = _token(client)
    order_id = new_order_id()
    sandbox.control.add_faults(order_id, {"status": 500, "raw_body": raw})
    request = parse_order_request(Action.ACCEPT, {"delivery_id": "1", "store_id": "3",
                                                  "order_external_id": order_id})
    verdict = classify(client.send(request, token))
    assert verdict.error == "HTTP 500"


class _PendingRuntime:
    """What ``fetch_pending`` uses of a Runtime: a token store and the client."""

    def __init__(self, client: MiposClient, redis_server: RedisServer) -> None:
        self.client = client
        self.tokens = TokenStore(client, redis_server.client, f"hostile-{uuid.uuid4().hex[:6]}:")


@pytest.fixture
def pending_rt(client: MiposClient, redis_server: RedisServer, sandbox: Sandbox) -> Iterator[Any]:
    sandbox.control.deliver("h3", 5, new_order_id())  # the sandbox knows store h3
    yield _PendingRuntime(client, redis_server)
    sandbox.control.clear_call_faults("pending:h3")


@pytest.mark.parametrize(("name", "status"), HTTP_CASES)
def test_pending_list_with_a_hostile_body(pending_rt: Any, sandbox: Sandbox, name: str,
                                          status: int) -> None:
    sandbox.control.add_call_faults("pending:h3", {"status": status, "body": HOSTILE_BODIES[name]})
    expected = TransientError if status >= 500 else PermanentError
    with pytest.raises(expected) as caught:
        fetch_pending(pending_rt.client, pending_rt.tokens, "h3")
    assert readable(caught.value.message).startswith("pending list of store h3: ")


@pytest.mark.parametrize("data", ["x", None, 5, {"a": 1}, [1, None, "x"]])
def test_pending_list_200_with_a_hostile_data(pending_rt: Any, sandbox: Sandbox, data: Any) -> None:
    sandbox.control.add_call_faults("pending:h3", {"status": 200, "body": {"message": "Orders.",
                                                                          "data": data}})
    try:
        pending, _ = fetch_pending(pending_rt.client, pending_rt.tokens, "h3")
    except TransientError as exc:
        readable(exc.message)
    else:
        assert pending == []


# -- through a real worker ----------------------------------------------------------------


WORKER_BODIES = ["errors-list-of-dicts", "message-list-of-ints", "field-list-of-nulls", "null",
                 "bare-number", "huge-message"]


@pytest.mark.parametrize("name", WORKER_BODIES)
def test_hostile_5xx_accept_answer_is_one_transient_line(cluster: Cluster, tasks: ModuleType,
                                                         name: str) -> None:
    order_id = new_order_id()
    cluster.control.add_faults(order_id, {"status": 500, "body": HOSTILE_BODIES[name]})
    tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id=order_id)
    lines = cluster.wait_final(order_id, timeout=20)
    assert [line["outcome"] for line in lines] == ["retrying", "accepted"]
    first = lines[0]
    assert (first["http_status"], first["error_class"]) == (500, "transient")
    readable(first["error"])


@pytest.mark.parametrize("name", WORKER_BODIES)
def test_hostile_422_accept_answer_is_dead_lettered_permanent(
        cluster: Cluster, tasks: ModuleType, redis_server: RedisServer, name: str) -> None:
    order_id = new_order_id()
    cluster.control.add_faults(order_id, {"status": 422, "body": HOSTILE_BODIES[name]})
    tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id=order_id)
    [line] = cluster.wait_final(order_id, timeout=20)
    assert (line["outcome"], line["fail_reason"], line["error_class"]) == ("failed", "permanent",
                                                                            "permanent")
    assert line["http_status"] == 422
    letter = dead_letter_of(redis_server, order_id)
    assert letter.reason == "permanent" and letter.error == readable(line["error"])


@pytest.mark.parametrize(("status", "error_class"), [(503, "transient"), (422, "auth")])
def test_hostile_token_call_answer_is_one_attempt_line(
        cluster: Cluster, tasks: ModuleType, redis_server: RedisServer, status: int,
        error_class: str) -> None:
    redis_server.client.delete("mipos:token")  # the worker must make the token call
    body = {"errors": [{"code": 7}], "message": [None, 3]}
    cluster.control.add_call_faults("token", {"status": status, "body": body})
    order_id = new_order_id()
    tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id=order_id)
    lines = cluster.wait_final(order_id, timeout=20)
    assert [line["outcome"] for line in lines] == ["retrying", "accepted"]
    first = lines[0]
    assert first["error_class"] == error_class and first["http_status"] == status
    assert readable(first["error"]).startswith("token call failed: ")
    assert json.dumps(first)  # the line itself is plain JSON
