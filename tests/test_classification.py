"""Every row of the classification table in shared/mipos-api.md."""

from __future__ import annotations

import time

import pytest
import requests
import urllib3

from worker.mipos.classification import RETRY_AFTER_MAX_S, Answer, classify, parse_retry_after
from worker.mipos.errors import ErrorClass

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


def _wrapped(reason: Exception) -> requests.ConnectionError:
    """As requests raises it: ConnectionError(MaxRetryError(reason=...))."""
    return requests.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/x", reason))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "unknown"),
    [
        (requests.ReadTimeout("x"), True),
        (requests.exceptions.ChunkedEncodingError("x"), True),
        (_wrapped(urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError())), True),
        (requests.ConnectionError("no detail: it may have been sent"), True),
        (requests.ConnectTimeout("x"), False),
        (_wrapped(urllib3.exceptions.NewConnectionError(None, "refused")), False),  # type: ignore[arg-type]
        (_wrapped(urllib3.exceptions.NameResolutionError("h", None, OSError())), False),  # type: ignore[arg-type]
    ],
    ids=["read-timeout", "chunked", "reset", "bare", "connect-timeout", "refused", "dns"],
)
def test_outcome_unknown_by_exception(exc: Exception, unknown: bool) -> None:
    """Without the client's own record of whether it sent, the exception decides."""
    assert Answer.from_exception(exc, 1.0).outcome_unknown is unknown


def test_the_clients_record_of_sending_wins() -> None:
    assert Answer.from_exception(requests.ConnectionError("x"), 1.0, sent=False).outcome_unknown is False
    assert Answer.from_exception(requests.ConnectTimeout("x"), 1.0, sent=True).outcome_unknown is True


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


@pytest.mark.parametrize("zone", ["-0000", "GMT", "+0000", "UTC"])
def test_retry_after_http_date_is_utc_whatever_the_local_zone(
        monkeypatch: pytest.MonkeyPatch, zone: str) -> None:
    """RFC 9110: an HTTP date is UTC; email.utils reads -0000 as "no zone" (naive, local)."""
    monkeypatch.setenv("TZ", "America/Sao_Paulo")
    time.tzset()
    try:
        assert parse_retry_after(f"Sun, 29 Nov 2026 10:01:00 {zone}",
                                 now=1795946400.0) == pytest.approx(60.0)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_retry_after_is_capped() -> None:
    assert parse_retry_after("1e308") == RETRY_AFTER_MAX_S
    assert parse_retry_after("Sun, 29 Nov 2126 10:00:00 GMT", now=1795946400.0) == RETRY_AFTER_MAX_S
    assert parse_retry_after("Sun, 29 Nov 2020 10:00:00 GMT", now=1795946400.0) == 0.0


@pytest.mark.parametrize(("status", "raw", "unknown"), [
    (200, b'{"message": ["Operation completed successfully"], "data": null}', False),
    (200, b"<html>ok</html>", True),  # mipos said OK in a form we cannot read
    (502, b"<html>bad gateway</html>", True),  # a proxy answered for mipos
    (504, b"<html>gateway timeout</html>", True),
    (500, b'{"message": "Server Error"}', False),  # mipos itself refused
    (503, b"<html>unavailable</html>", False),
    (409, b'{"message": ["Unable to get token."], "data": null}', False),
])
def test_outcome_unknown_by_status(status: int, raw: bytes, unknown: bool) -> None:
    assert Answer.from_body(status, raw).outcome_unknown is unknown
