"""How the CLI prints: tables, JSON and durations (``mipos_worker/terminal.py``, shared with the
relay command), and the times in between."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from mipos_worker.terminal import (
    CliError,
    emit_json,
    parse_duration,
    printable,
    seconds,
    table,
)

__all__ = ["CliError", "ago", "emit_json", "key_values", "parse_duration", "parse_since", "printable",
           "seconds", "table", "when"]


def key_values(fields: Sequence[tuple[str, Any]], width: int = 18) -> str:
    """``name:  value`` lines, one a field, the values escaped (``printable``); None is left out."""
    return "\n".join(f"{name + ':':<{width}}{printable(value)}" for name, value in fields
                     if value is not None)


def when(at: float | None) -> str:
    """A time as people read it in a log: ISO 8601, UTC, to the second."""
    if at is None:
        return "-"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def ago(at: float | None, now: float | None = None) -> str:
    if at is None:
        return "-"
    return seconds(max(0.0, (now or time.time()) - at)) + " ago"


def parse_since(text: str, now: float | None = None) -> float:
    """A duration back from now (``1h``) or a moment (``2026-11-29T08:00:00Z``) as a time."""
    try:
        return (now or time.time()) - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (1h, 30m) nor a time "
                         "(2026-11-29T08:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
