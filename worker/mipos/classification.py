"""What each mipos answer means: the answer model and the classification table.

The table is the project's decision (see ``shared/mipos-api.md``): keep every
rule here, in data, so that a reader can check it row by row.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import requests
import urllib3

from worker.mipos.errors import ErrorClass

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
# A proxy in front of mipos answered for it (bad gateway, gateway timeout): the
# request may have reached mipos and been applied, so the outcome is unknown.
GATEWAY_STATUSES = frozenset({502, 504})
OTHER_CLIENT_ERROR_CLASS = ErrorClass.PERMANENT  # any other 4xx
UNDOCUMENTED_BODY_CLASS = ErrorClass.TRANSIENT  # an answer whose body is not the documented JSON
NO_ANSWER_CLASS = ErrorClass.TRANSIENT  # refused, reset, DNS, connect or read timeout

_NOT_JSON = object()

MAX_BODY_BYTES = 64 * 1024  # an answer's body is read up to this; the rest is cut off
MAX_TEXT_CHARS = 500  # of the raw body kept beside the parsed one, for messages
MAX_ERROR_CHARS = 500  # an ``error`` longer than this is cut and says so
RETRY_AFTER_MAX_S = 24 * 3600.0  # a Retry-After asking for more is read as this much
_CUT = "… (cut)"


class NotSent(requests.RequestException):
    """The call was not made: nothing reached mipos (e.g. the attempt's time budget is spent)."""


class TotalTimeout(requests.Timeout):
    """The call outlived its total wall-clock bound and was cut off."""


@dataclass(frozen=True)
class Answer:
    """What came back from one HTTP call: a status and body, or an exception.

    ``outcome_unknown``: no usable answer, and the request may have reached mipos
    (it was being sent, or had been) so mipos may have applied it."""

    http_status: int | None
    body: Any = None  # parsed JSON, or ``_NOT_JSON`` with ``text`` holding the raw body
    text: str = ""
    retry_after_s: float | None = None
    exception: BaseException | None = None
    elapsed_ms: float = 0.0
    outcome_unknown: bool = False

    @classmethod
    def from_body(cls, status: int, raw: bytes, *, truncated: bool = False,
                  retry_after: str | None = None, elapsed_ms: float = 0.0) -> Answer:
        """An answer from its status and (at most ``MAX_BODY_BYTES`` of) its body.

        A body that was cut off is not the documented JSON unless what was read parses."""
        body = _parse_json(raw)
        text = raw[: MAX_TEXT_CHARS * 4].decode("utf-8", errors="replace")[:MAX_TEXT_CHARS]
        return cls(
            http_status=status,
            body=body,
            text=text + (_CUT if truncated and len(text) < MAX_TEXT_CHARS else ""),
            retry_after_s=parse_retry_after(retry_after),
            elapsed_ms=elapsed_ms,
            # 200 with a body we cannot read: mipos may well have done it; and a
            # gateway's 502/504 may stand for a request that reached mipos.
            outcome_unknown=(status == 200 and not _is_documented_success(body))
            or status in GATEWAY_STATUSES,
        )

    @classmethod
    def from_exception(cls, exc: BaseException, elapsed_ms: float, *,
                       sent: bool | None = None) -> Answer:
        """``sent``: whether any byte of the request was handed to the socket, when the
        client knows; otherwise the exception decides (unknown unless it is one that
        only happens before sending)."""
        unknown = sent if sent is not None else not _before_sending(exc)
        return cls(http_status=None, exception=exc, elapsed_ms=elapsed_ms, outcome_unknown=unknown)

    @property
    def is_json(self) -> bool:
        return self.body is not _NOT_JSON


def _parse_json(raw: bytes) -> Any:
    if not raw.strip():
        return _NOT_JSON
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return _NOT_JSON


# Failures that happen only before a byte of the request is sent.
_BEFORE_SENDING: tuple[type[BaseException], ...] = (
    NotSent,
    requests.ConnectTimeout,
    requests.exceptions.InvalidURL,
    requests.exceptions.InvalidHeader,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
    urllib3.exceptions.NewConnectionError,  # refused; NameResolutionError is one
    urllib3.exceptions.ConnectTimeoutError,
)


def _before_sending(exc: BaseException) -> bool:
    """True when the exception, or what it wraps, can only happen before sending."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 10:
        current = todo.pop()
        if any(current is s for s in seen):
            continue
        seen.append(current)
        if isinstance(current, _BEFORE_SENDING):
            return True
        todo.extend(e for e in (getattr(current, "reason", None), current.__cause__,
                                *(current.args[:1] if current.args else ()))
                    if isinstance(e, BaseException))
    return False


@dataclass(frozen=True)
class Verdict:
    """The classification of one answer: ``error_class`` is None on success."""

    error_class: ErrorClass | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_class is None


def classify(answer: Answer) -> Verdict:
    """Classify the answer to a mipos call (the table in mipos-api.md). Never raises:
    any body classifies by its status, with a readable ``error`` of bounded length."""
    verdict = _classify(answer)
    if verdict.error is None:
        return verdict
    return Verdict(verdict.error_class, _cap(verdict.error))


def _classify(answer: Answer) -> Verdict:
    status = answer.http_status
    if status is None:
        return Verdict(NO_ANSWER_CLASS, _exception_text(answer.exception))
    if status == 200:
        if _is_documented_success(answer.body):
            return Verdict(None)
        return Verdict(UNDOCUMENTED_BODY_CLASS, f"200 with an undocumented body: {_snippet(answer)}")
    message = _message_of(answer)
    if status == 401:
        return Verdict(STATUS_CLASSES[401], message or "Unauthorized.")
    if status == 409:
        if message is None:
            return Verdict(UNDOCUMENTED_BODY_CLASS, f"409 with an undocumented body: {_snippet(answer)}")
        return Verdict(CONFLICT_MESSAGES.get(message, UNKNOWN_CONFLICT_CLASS), message)
    if status in STATUS_CLASSES:
        return Verdict(STATUS_CLASSES[status], message or f"HTTP {status}")
    if 500 <= status <= 599:
        return Verdict(SERVER_ERROR_CLASS, message or f"HTTP {status}")
    if 400 <= status <= 499:
        return Verdict(OTHER_CLIENT_ERROR_CLASS, message or f"HTTP {status}")
    return Verdict(UNDOCUMENTED_BODY_CLASS, f"unexpected HTTP {status}: {_snippet(answer)}")


def _exception_text(exc: BaseException | None) -> str:
    if exc is None:
        return "no answer"
    try:
        detail = str(exc)
    except Exception:  # noqa: BLE001 - an exception whose text cannot be had still has a class
        detail = "(no text)"
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _snippet(answer: Answer) -> str:
    return repr(answer.text[:200])


def _is_documented_success(body: Any) -> bool:
    return isinstance(body, dict) and "message" in body


def _message_of(answer: Answer) -> str | None:
    """The human message of a mipos answer, whatever shape it came in; None when there
    is nothing readable in it."""
    body = answer.body
    if not answer.is_json:
        return None
    if isinstance(body, str):
        return _cap(body) or None
    if isinstance(body, dict):
        message = body.get("message")
        if message is not None and message != [] and message != "":
            return _render(message) or None
        if answer.http_status == 422 or "message" not in body:
            return _field_errors(body)
    return None


def _field_errors(body: dict[str, Any]) -> str | None:
    parts: list[str] = []
    size = 0
    for field, errors in body.items():
        if size > MAX_ERROR_CHARS:
            parts.append("...")
            break
        part = f"{field}: {_render(errors)}"
        parts.append(part)
        size += len(part)
    return " | ".join(parts) or None


def _render(value: Any) -> str:
    """Readable text for a JSON value: strings as they are, a list item by item joined
    with "; ", anything else as JSON; never longer than about ``MAX_ERROR_CHARS``."""
    if isinstance(value, str):
        return _cap(value)
    if isinstance(value, list):
        parts: list[str] = []
        size = 0
        for item in value:
            if size > MAX_ERROR_CHARS:
                parts.append("...")
                break
            part = item if isinstance(item, str) else _as_json(item)
            part = _cap(part)
            parts.append(part)
            size += len(part) + 2
        return "; ".join(parts)
    return _cap(_as_json(value))


def _as_json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        return f"<{type(value).__name__}>"


def _cap(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - len(_CUT)] + _CUT


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date).

    An HTTP date is UTC whatever zone it names or omits (RFC 9110: ``GMT``;
    ``email.utils`` reads ``-0000`` as "no zone" and would give local time). The
    result is at most ``RETRY_AFTER_MAX_S``; the retry schedule still refuses a
    retry past the order's deadline."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return min(max(0.0, seconds), RETRY_AFTER_MAX_S) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    wait = when.timestamp() - (time.time() if now is None else now)
    return min(max(0.0, wait), RETRY_AFTER_MAX_S)
