"""What the project's own producers write beside an order in a task message.

An order message carries the order's fields (what the POS passed) and, under
one namespaced key, the stamps only mipos-worker sets: when the order was
enqueued (on Redis's clock), when a long wait ends, and why the message exists
(a retry held by the breaker, a reconciliation resend, a replay). A producer
sending by name cannot set them by accident: the flat names of older versions
are ignored by the worker (and logged), and ``delay()`` refuses both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

STAMPS_KEY = "_mipos"
# Names that a caller may not pass: the namespace, and the flat keys older versions used.
LEGACY_KEYS = ("enqueued_at", "not_before", "reconcile_resend", "breaker_held", "replay_of")
PRIVATE_KEYS = (STAMPS_KEY, *LEGACY_KEYS)


@dataclass(frozen=True)
class Stamps:
    enqueued_at: float | None = None  # Redis time of the first enqueue: the deadline counts from here
    not_before: float | None = None  # Redis time: a wait longer than one countdown hop ends here
    resend: bool = False  # reconciliation: mipos still lists an order we recorded as done
    held: bool = False  # waiting for the circuit breaker to close (worker/state/breaker.py)
    replay_of: str | None = None  # an operator replayed this dead letter (worker/ops/replay.py)

    def to_message(self) -> dict[str, Any]:
        values = ((name, getattr(self, name)) for name in _STAMP_NAMES)
        return {name: value for name, value in values if value is not None and value is not False}

    def but(self, **changes: Any) -> Stamps:
        return replace(self, **changes)


_STAMP_NAMES = tuple(f.name for f in fields(Stamps))


def _time(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def split_message(kwargs: dict[str, Any]) -> tuple[dict[str, Any], Stamps, list[str]]:
    """(the order's own arguments, the stamps, the flat private keys found and ignored)."""
    arguments = {k: v for k, v in kwargs.items() if k not in PRIVATE_KEYS}
    ignored = sorted(k for k in LEGACY_KEYS if k in kwargs)
    raw = kwargs.get(STAMPS_KEY)
    if not isinstance(raw, dict):
        if raw is not None:
            ignored.append(STAMPS_KEY)
        return arguments, Stamps(), ignored
    replay_of = raw.get("replay_of")
    stamps = Stamps(
        enqueued_at=_time(raw.get("enqueued_at")),
        not_before=_time(raw.get("not_before")),
        resend=raw.get("resend") is True,
        held=raw.get("held") is True,
        replay_of=replay_of if isinstance(replay_of, str) and replay_of else None,
    )
    return arguments, stamps, ignored


def stamps_of(kwargs: dict[str, Any]) -> Stamps:
    """The stamps of a message's keyword arguments (for the operator tools)."""
    return split_message(kwargs)[1]
