"""Every row of the classification table in shared/mipos-api.md."""

from __future__ import annotations

import pytest
import requests

from worker.errors import Answer, ErrorClass, classify, parse_retry_after

T, A, P = ErrorClass.TRANSIENT, ErrorClass.AUTH, ErrorClass.PERMANENT


def answer(status: int, body: object, text: str = "") -> Answer:
    return Answer(http_status=status, body=body, text=text)


def conflict(message: str) -> Answer:
    return answer(409, {"message": [message], "data": None})


@pytest.mark.parametrize(
    ("row", "given", "expected"),
    [
        ("200", answer(200, {"message": ["Operation completed successfully"], "data": None}), None),
        ("401", answer(401, "Unauthorized."), A),
        ("409 not authenticated", conflict("User not authenticated."), A),
        ("409 unable to get token", conflict("Unable to get token."), T),
        ("409 acceptance", conflict("Error sending the acceptance to the delivery platform."), T),
        ("409 rejection", conflict("Error sending the rejection to the delivery platform"), T),
        ("409 user not found", conflict("User not found."), P),
        ("409 store", conflict("You don't have this store available."), P),
        ("409 order not found", conflict("Order not found."), P),
        ("409 integration", conflict("Microservice does not have this integration configured."), P),
        ("409 unknown message", conflict("Something new happened."), T),
        ("422", answer(422, {"delivery_id": ["The delivery id field is required."]}), P),
        ("429", answer(429, {"message": "Too Many Attempts."}), T),
        ("500", answer(500, {"message": "Server Error"}), T),
        ("503 html", answer(503, Answer(0).body, "<html>"), T),
        ("404", answer(404, {"message": "Not Found"}), P),
        ("403", answer(403, {"message": "Forbidden"}), P),
    ],
)
def test_answer_rows(row: str, given: Answer, expected: ErrorClass | None) -> None:
    assert classify(given).error_class is expected, row


def test_undocumented_bodies_are_transient() -> None:
    raw = Answer(http_status=200, body=object(), text="<html>oops</html>")
    assert classify(raw).error_class is not None
    garbled_409 = Answer(http_status=409, body=Answer(0).body, text="oops")
    assert classify(garbled_409).error_class is T


@pytest.mark.parametrize(
    "exc",
    [
        requests.ConnectionError("connection refused"),
        requests.ConnectTimeout("connect timeout"),
        requests.ReadTimeout("read timeout"),
        requests.exceptions.ChunkedEncodingError("reset"),
    ],
)
def test_no_answer_is_transient(exc: Exception) -> None:
    verdict = classify(Answer.from_exception(exc, 1.0))
    assert verdict.error_class is T
    assert type(exc).__name__ in (verdict.error or "")


def test_only_a_read_timeout_leaves_the_outcome_unknown() -> None:
    assert Answer.from_exception(requests.ReadTimeout("x"), 1.0).outcome_unknown
    assert not Answer.from_exception(requests.ConnectTimeout("x"), 1.0).outcome_unknown
    assert not Answer.from_exception(requests.ConnectionError("x"), 1.0).outcome_unknown


def test_unknown_409_keeps_the_raw_message() -> None:
    assert classify(conflict("Brand new failure.")).error == "Brand new failure."


def test_422_reports_the_field_errors() -> None:
    verdict = classify(answer(422, {"store_id": ["The store id field is required."]}))
    assert verdict.error == "store_id: The store id field is required."


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("7", 7.0), ("0", 0.0), ("1.5", 1.5), ("-3", 0.0), (None, None), ("soon", None), ("nan", None)],
)
def test_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header) == seconds


def test_retry_after_http_date() -> None:
    assert parse_retry_after("Sun, 29 Nov 2026 10:00:30 GMT", now=1795946400.0) == pytest.approx(30.0)
