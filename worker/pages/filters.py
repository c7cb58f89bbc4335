"""The dead letters list's filters, read from a query string: reason, store, action, time range,
and the cursor of the page. Pure; a malformed value is a problem to show, not an error."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from worker.pages.display import when
from worker.state.deadletters import REASONS

ACTIONS = ("accept", "deny")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_CURSOR = re.compile(r"^\d+(?:\.\d+)?(?::[0-9a-f]{1,32})?$")
MAX_STORE_CHARS = 200


@dataclass(frozen=True)
class LetterFilters:
    reason: str | None = None
    store: str | None = None
    action: str | None = None
    since: float | None = None
    until: float | None = None
    since_text: str = ""
    until_text: str = ""
    before: str | None = None  # where the page starts: a page's next_before

    @property
    def filtered(self) -> bool:
        return any((self.reason, self.store, self.action, self.since is not None, self.until is not None))

    def query(self, **changes: str | None) -> dict[str, str]:
        """The query string of these filters (with ``changes``), for a link."""
        values = {"reason": self.reason, "store": self.store, "action": self.action,
                  "since": self.since_text or None, "until": self.until_text or None, "before": self.before}
        values.update(changes)
        return {k: v for k, v in values.items() if v}

    def start(self) -> str | None:
        """The page's cursor for DeadLetters.page: the given one, else the range's end as a bare time."""
        if self.before:
            return self.before
        return repr(self.until) if self.until is not None else None

    def without_cursor(self) -> LetterFilters:
        return replace(self, before=None)


def parse_time(text: str, now: float) -> float:
    """``1h``/``30m``/``2d`` (that long ago), or a UTC time ``2026-11-29 08:00[:00][Z]``; ValueError."""
    value = text.strip()
    duration = _DURATION.match(value)
    if duration:
        return now - float(duration.group(1)) * _UNITS[duration.group(2)]
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace(" ", "T", 1))
    except ValueError:
        raise ValueError(f"{value[:40]!r} is neither a duration (1h, 30m, 2d) nor a time "
                         "(2026-11-29 08:00, UTC)") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def parse_filters(get: Callable[[str], str], now: float | None = None) -> tuple[LetterFilters, list[str]]:
    """The filters of a request (``get(name)``: the argument, "" when absent), and what was wrong."""
    now = time.time() if now is None else now
    problems: list[str] = []
    reason = get("reason").strip() or None
    if reason is not None and reason not in REASONS:
        problems.append(f"no reason {reason[:40]!r}: one of {', '.join(REASONS)}")
        reason = None
    action = get("action").strip() or None
    if action is not None and action not in ACTIONS:
        problems.append(f"no action {action[:40]!r}: accept or deny")
        action = None
    store = get("store").strip()[:MAX_STORE_CHARS] or None
    times: dict[str, float | None] = {}
    texts: dict[str, str] = {}
    for name in ("since", "until"):
        text = get(name).strip()[:40]
        times[name], texts[name] = None, ""
        if text:
            try:
                times[name], texts[name] = parse_time(text, now), text
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
    before = get("before").strip() or None
    if before is not None and not _CURSOR.match(before):
        problems.append("the page cursor is malformed: start again from the newest")
        before = None
    filters = LetterFilters(reason, store, action, times["since"], times["until"], texts["since"],
                            texts["until"], before)
    return filters, problems


def describe(filters: LetterFilters) -> str:
    """The time range in words, for the counts' heading."""
    if filters.since is None and filters.until is None:
        return "stored (the last 30 days)"
    parts = []
    if filters.since is not None:
        parts.append(f"since {when(filters.since)}")
    if filters.until is not None:
        parts.append(f"before {when(filters.until)}")
    return " ".join(parts)


def arguments(source: Mapping[str, list[bytes]]) -> Callable[[str], str]:
    """``get(name)`` over a Tornado request's ``arguments``: the first value, decoded, or ""."""
    def get(name: str) -> str:
        values = source.get(name)
        return values[0].decode("utf-8", "replace") if values else ""
    return get
