"""How the pages show values that come from outside: cut to a size, with the hidden made visible.

Order ids, error texts and an ``invalid`` letter's arguments come from mipos's answers and from
other producers. The templates escape every value for HTML (Tornado's autoescape); here, what
could still mislead a reader is shown as an escape (control characters, bidi overrides, as the
CLI shows them: ``mipos_worker.terminal.printable``), a secret or bearer token is replaced with
``[redacted]`` as on Flower's own pages (``worker.ops.flower.scrub``), and a long value is cut
so that a 300 KB error makes a page of ordinary size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from mipos_worker.terminal import printable
from worker.ops.flower import scrub

CELL_CHARS = 160  # a value in a table
ID_CHARS = 120  # an id in a table or a heading (ids are at most 200 characters when valid)
BLOCK_CHARS = 4000  # a value shown on its own (a letter's error), per value
MARGIN = 400  # redacted before the cut, so that a secret across the cut is still found whole


@dataclass(frozen=True)
class Shown:
    """A value as a page shows it: ``text`` (escaped for HTML by the template), and how many
    characters were left out."""

    text: str
    cut: int = 0

    def __str__(self) -> str:
        return self.text


def shown(value: Any, limit: int = CELL_CHARS) -> Shown:
    """``value`` on one line, hidden characters escaped, cut at ``limit`` characters (then
    ending with ``…``)."""
    if value is None:
        return Shown("")
    text, cut = _cut(value, limit)
    return Shown(printable(text) + ("…" if cut else ""), cut)


def block(value: Any, limit: int = BLOCK_CHARS) -> Shown:
    """``value`` on several lines (its newlines kept), other hidden characters escaped, cut."""
    if value is None:
        return Shown("")
    text, cut = _cut(value, limit)
    return Shown("\n".join(printable(line) for line in text.split("\n")), cut)


def _cut(value: Any, limit: int) -> tuple[str, int]:
    """``value``'s first ``limit`` characters, secrets redacted; and how many were left out."""
    text = str(value)
    kept = scrub(text[:limit + MARGIN])[:limit]
    return kept, max(0, len(text) - limit)


def when(at: Any) -> str:
    """A time as ``2026-11-29 09:08:48Z`` (UTC), as the CLI shows it; "" for none."""
    if not isinstance(at, (int, float)) or isinstance(at, bool):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))


def seconds(value: Any) -> str:
    """A duration in seconds as ``2ms``, ``1.5s``, ``3m05s``; "" for none."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return ""
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 60:
        return f"{value:.1f}s"
    minutes, rest = divmod(int(value), 60)
    return f"{minutes}m{rest:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def ago(at: float, now: float | None = None) -> str:
    """``3m05s ago`` / ``in 12.0s``."""
    delta = (now if now is not None else time.time()) - at
    return f"{seconds(delta)} ago" if delta >= 0 else f"in {seconds(-delta)}"
