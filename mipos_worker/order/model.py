"""The order an accept or deny is about, and the checks its arguments must pass.

Used twice: in the POS's process before anything is enqueued, and in the
worker for messages that another producer sent by name.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from mipos_worker.order.errors import InvalidOrder


class Action(StrEnum):
    ACCEPT = "accept"
    DENY = "deny"

    @property
    def done_outcome(self) -> str:
        return "accepted" if self is Action.ACCEPT else "denied"


ORDER_FIELDS = ("delivery_id", "store_id", "order_external_id")

# mipos documents no sizes (docs/, /work/shared/mipos-api.md): its ids are UUIDs (36 characters)
# and small integers, and a deny's message is a sentence. Generous bounds all the same: an id
# is part of Redis key names, log lines and what Flower keeps of every task (up to 10,000).
MAX_ID_CHARS = 200
MAX_MESSAGE_CHARS = 1000


def order_key(store_id: Any, order_external_id: Any) -> str:
    """Identifies an order at mipos: one store's external id (also in Redis key names).

    ``store/order``, with ``%`` and ``/`` in the store id percent-escaped: the
    first ``/`` always ends the store id, so no two orders share a key (ids may
    contain ``/``), and the key of an ordinary store id is the plain join.
    """
    store = str(store_id).replace("%", "%25").replace("/", "%2F")
    return f"{store}/{order_external_id}"


@dataclass(frozen=True)
class Order:
    delivery_id: str
    store_id: str
    order_external_id: str

    @property
    def key(self) -> str:
        return order_key(self.store_id, self.order_external_id)

    def fields(self) -> dict[str, str]:
        return {
            "delivery_id": self.delivery_id,
            "store_id": self.store_id,
            "order_external_id": self.order_external_id,
        }


@dataclass(frozen=True)
class OrderRequest:
    action: Action
    order: Order
    message: str | None = None  # the reason, for a deny

    def body(self) -> dict[str, str]:
        body = self.order.fields()
        if self.message is not None:
            body["message"] = self.message
        return body


def _as_id(field: str, value: Any) -> str:
    if isinstance(value, bool):
        raise InvalidOrder(field, f"must be a non-empty string or an integer, got {value!r}")
    if isinstance(value, int):
        return _int_id(field, value)
    if isinstance(value, str):
        if not value.strip():
            raise InvalidOrder(field, "must not be empty")
        return _checked_text(field, value, MAX_ID_CHARS)
    if value is None:
        raise InvalidOrder(field, "is required")
    raise InvalidOrder(
        field, f"must be a non-empty string or an integer, got {type(value).__name__}"
    )


def _int_id(field: str, value: int) -> str:
    """An integer id as its digits; one too big to print them (Python refuses past 4300) is
    refused by its size: past 800 bits it has more than 200 digits anyway."""
    if value.bit_length() > 4 * MAX_ID_CHARS:
        raise InvalidOrder(field, f"must be at most {MAX_ID_CHARS} characters "
                                  f"(got an integer of {value.bit_length()} bits)")
    digits = str(value)
    _refuse_longer(field, digits, MAX_ID_CHARS)
    return digits


def _checked_text(field: str, value: str, limit: int) -> str:
    """``value`` trimmed, once it is at most ``limit`` characters with no control character."""
    text = value.strip()
    _refuse_longer(field, text, limit)
    _refuse_unprintable(field, text)
    return text


def _refuse_longer(field: str, text: str, limit: int) -> None:
    """The error names the limit and the length, never the value (it may be megabytes)."""
    if len(text) > limit:
        raise InvalidOrder(field, f"must be at most {limit} characters (got {len(text)})")


def _refuse_unprintable(field: str, value: str) -> None:
    """Control characters (NUL, newlines, tabs, terminal escapes: C0, DEL, C1) and lone
    surrogates make an id or a deny's message that logs, terminals and Redis keys cannot carry
    faithfully; mipos ids never hold them, and a deny's reason is one line of text. Surrounding
    whitespace is trimmed before this check. Format characters (right-to-left marks) pass."""
    for position, char in enumerate(value):
        category = unicodedata.category(char)
        if category == "Cc":
            raise InvalidOrder(field, f"must not contain a control character "
                                      f"(U+{ord(char):04X} at position {position})")
        if category == "Cs":
            raise InvalidOrder(field, f"must not contain a lone surrogate "
                                      f"(U+{ord(char):04X} at position {position})")


def parse_order_request(action: Action, arguments: dict[str, Any]) -> OrderRequest:
    """Check and normalise an accept/deny's keyword arguments; raise naming the field."""
    allowed = set(ORDER_FIELDS) | ({"message"} if action is Action.DENY else set())
    unexpected = sorted(set(arguments) - allowed)
    if unexpected:
        raise InvalidOrder(unexpected[0], f"is not an argument of {action.value}_order")
    order = Order(**{field: _as_id(field, arguments.get(field)) for field in ORDER_FIELDS})
    message = None
    if action is Action.DENY:
        raw = arguments.get("message")
        if raw is None:
            raise InvalidOrder("message", "is required for a deny")
        if not isinstance(raw, str) or not raw.strip():
            raise InvalidOrder("message", f"must be a non-empty string, got {_short_repr(raw)}")
        message = _checked_text("message", raw, MAX_MESSAGE_CHARS)  # one line: no newline or tab inside
    return OrderRequest(action=action, order=order, message=message)


def _short_repr(value: Any) -> str:
    """A wrong value as an error message quotes it: cut, as it may be huge (a list, a dict)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:79] + "…"


def named_arguments(action: Action, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments put under their names (``accept_order.delay("1", "3", "x")``)."""
    names = ORDER_FIELDS + (("message",) if action is Action.DENY else ())
    if len(args) > len(names):
        raise InvalidOrder("args", f"{action.value}_order takes at most {len(names)} positional arguments")
    for name, value in zip(names, args, strict=False):
        if name in kwargs:
            raise InvalidOrder(name, "given both by position and by name")
        kwargs[name] = value
    return kwargs
