"""What each mipos answer means: the classification table and the error types.

The table is the project's decision (see ``shared/mipos-api.md``): keep every
rule here, in data, so that a reader can check it row by row.
"""

from __future__ import annotations

import email.utils
import math
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import requests


class ErrorClass(StrEnum):
    TRANSIENT = "transient"  # back off and retry
    AUTH = "auth"  # get a fresh token, then send again at once
    PERMANENT = "permanent"  # stop; dead-letter


class MiposError(Exception):
    """A call to mipos did not succeed; ``error_class`` says what to do next."""

    error_class: ErrorClass = ErrorClass.TRANSIENT

    def __init__(self, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status


class TransientError(MiposError):
    error_class = ErrorClass.TRANSIENT


class AuthError(MiposError):
    """The token was refused, or a token could not be had (credentials, token call)."""

    error_class = ErrorClass.AUTH


class PermanentError(MiposError):
    error_class = ErrorClass.PERMANENT


class InvalidOrder(ValueError):
    """Arguments of an accept or deny that can never be sent; names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class OrderFailed(Exception):
    """The order was dead-lettered: raised at the end so Celery and Flower show the task failed.

    Built from its message alone, so Celery can pickle it (and so match it against
    the task's ``throws``: logged at INFO, no traceback)."""

    def __init__(self, message: str, letter_id: str | None = None) -> None:
        super().__init__(message)
        self.letter_id = letter_id

    @classmethod
    def for_letter(cls, letter_id: str, reason: str, error: str | None) -> OrderFailed:
        return cls(f"dead-lettered ({reason}): {error} [dead letter {letter_id}]", letter_id)


# 409 answers, by their message. Any 409 message not listed here is transient,
# and its raw text goes to the log so that it can be added.
CONFLICT_MESSAGES: dict[str, ErrorClass] = {
    "User not authenticated.": ErrorClass.AUTH,
    "Unable to get token.": ErrorClass.TRANSIENT,
    "Error sending the acceptance to the delivery platform.": ErrorClass.TRANSIENT,
    "Error sending the rejection to the delivery platform": ErrorClass.TRANSIENT,
    "User not found.": ErrorClass.PERMANENT,
    "You don't have this store available.": ErrorClass.PERMANENT,
    "Order not found.": ErrorClass.PERMANENT,
    "Microservice does not have this integration configured.": ErrorClass.PERMANENT,
}
UNKNOWN_CONFLICT_CLASS = ErrorClass.TRANSIENT

# Answers classified by their status alone.
STATUS_CLASSES: dict[int, ErrorClass] = {
    401: ErrorClass.AUTH,
    422: ErrorClass.PERMANENT,
    429: ErrorClass.TRANSIENT,
}
SERVER_ERROR_CLASS = ErrorClass.TRANSIENT  # 5xx
OTHER_CLIENT_ERROR_CLASS = ErrorClass.PERMANENT  # any other 4xx
UNDOCUMENTED_BODY_CLASS = ErrorClass.TRANSIENT  # an answer whose body is not the documented JSON
NO_ANSWER_CLASS = ErrorClass.TRANSIENT  # refused, reset, DNS, connect or read timeout

_NOT_JSON = object()


@dataclass(frozen=True)
class Answer:
    """What came back from one HTTP call: a status and body, or an exception."""

    http_status: int | None
    body: Any = None  # parsed JSON, or ``_NOT_JSON`` with ``text`` holding the raw body
    text: str = ""
    retry_after_s: float | None = None
    exception: BaseException | None = None
    elapsed_ms: float = 0.0

    @classmethod
    def from_response(cls, response: requests.Response, elapsed_ms: float) -> Answer:
        try:
            body = response.json()
        except ValueError:
            body = _NOT_JSON
        return cls(
            http_status=response.status_code,
            body=body,
            text=response.text[:500],
            retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
            elapsed_ms=elapsed_ms,
        )

    @classmethod
    def from_exception(cls, exc: BaseException, elapsed_ms: float) -> Answer:
        return cls(http_status=None, exception=exc, elapsed_ms=elapsed_ms)

    @property
    def is_json(self) -> bool:
        return self.body is not _NOT_JSON

    @property
    def outcome_unknown(self) -> bool:
        """True when the request may have been applied although no answer came."""
        return isinstance(self.exception, requests.ReadTimeout)


@dataclass(frozen=True)
class Verdict:
    """The classification of one answer: ``error_class`` is None on success."""

    error_class: ErrorClass | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_class is None


def classify(answer: Answer) -> Verdict:
    """Classify the answer to an accept or deny call (the table in mipos-api.md)."""
    status = answer.http_status
    if status is None:
        exc = answer.exception
        return Verdict(NO_ANSWER_CLASS, f"{type(exc).__name__}: {exc}" if exc else "no answer")
    if status == 200:
        if _is_documented_success(answer.body):
            return Verdict(None)
        return Verdict(UNDOCUMENTED_BODY_CLASS, f"200 with an undocumented body: {answer.text!r}")
    if status == 401:
        return Verdict(STATUS_CLASSES[401], _message_of(answer) or "Unauthorized.")
    if status == 409:
        message = _message_of(answer)
        if message is None:
            return Verdict(UNDOCUMENTED_BODY_CLASS, f"409 with an undocumented body: {answer.text!r}")
        return Verdict(CONFLICT_MESSAGES.get(message, UNKNOWN_CONFLICT_CLASS), message)
    if status in STATUS_CLASSES:
        return Verdict(STATUS_CLASSES[status], _message_of(answer) or f"HTTP {status}")
    if 500 <= status <= 599:
        return Verdict(SERVER_ERROR_CLASS, _message_of(answer) or f"HTTP {status}")
    if 400 <= status <= 499:
        return Verdict(OTHER_CLIENT_ERROR_CLASS, _message_of(answer) or f"HTTP {status}")
    return Verdict(UNDOCUMENTED_BODY_CLASS, f"unexpected HTTP {status}: {answer.text!r}")


def _is_documented_success(body: Any) -> bool:
    return isinstance(body, dict) and "message" in body


def _message_of(answer: Answer) -> str | None:
    """The human message of a mipos answer, whatever shape it came in."""
    body = answer.body
    if not answer.is_json:
        return None
    if isinstance(body, str):
        return body
    if isinstance(body, dict):
        message = body.get("message")
        if isinstance(message, list) and message and all(isinstance(m, str) for m in message):
            return "; ".join(message)
        if isinstance(message, str):
            return message
        if answer.http_status == 422 or "message" not in body:
            return _field_errors(body)
    return None


def _field_errors(body: dict[str, Any]) -> str:
    parts = []
    for field, errors in body.items():
        text = "; ".join(errors) if isinstance(errors, list) else str(errors)
        parts.append(f"{field}: {text}")
    return " | ".join(parts) or "validation failed"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
