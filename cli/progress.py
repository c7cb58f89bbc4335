"""Progress of long work on stderr, so stdout (and ``--json``) stays clean.

On a terminal one line is redrawn in place; in a log or CI, a line every few
seconds and one at the end.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int | None = None, *, stream: TextIO | None = None,
                 every_s: float | None = None, enabled: bool = True) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = self.stream.isatty()
        self.every_s = every_s if every_s is not None else (0.1 if self.live else 5.0)
        self.done = 0
        self.counts: Counter[str] = Counter()
        self.note = ""
        self._base: int | None = None  # update(): the count when we started watching
        self._shown: tuple[int, str] | None = None
        self.started = time.monotonic()
        self._last = 0.0

    def advance(self, count: int = 1, outcome: str | None = None) -> None:
        self.done += count
        if outcome:
            self.counts[outcome] += count
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._write(final=False)

    def update(self, done: int, note: str = "") -> None:
        """Set where the work is (for work measured by polling rather than step by step)."""
        if self._base is None:
            self._base = done
        self.done, self.note = done, note
        self.advance(0)

    def finish(self) -> None:
        self._write(final=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = (self.done - (self._base or 0)) / elapsed
        parts = []
        if self.total:
            parts.append(f"{self.done}/{self.total} ({100 * self.done / self.total:.0f}%)")
        else:
            parts.append(str(self.done))
        parts.append(f"{rate:.1f}/s")
        if self.total and 0 < self.done < self.total and rate > 0:
            parts.append(f"eta {(self.total - self.done) / rate:.0f}s")
        parts.append(f"{elapsed:.0f}s elapsed")
        if self.counts:
            parts.append(" ".join(f"{k}={v}" for k, v in sorted(self.counts.items())))
        if self.note:
            parts.append(self.note)
        return f"[{self.label}] " + " · ".join(parts)

    def _write(self, *, final: bool) -> None:
        if not self.enabled or (final and not self.live and self._shown == (self.done, self.note)):
            return
        self._shown = (self.done, self.note)
        if self.live:
            self.stream.write("\r\x1b[2K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()
