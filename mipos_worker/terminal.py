"""How the commands print: aligned tables for people, JSON for scripts, and durations.

Shared by the POS side's relay command and the worker's operator CLI (``cli/output.py``).

What people read is escaped (``printable``): the values shown come from mipos's answers
and from other producers' messages, and a newline or a terminal escape in one would forge
a line, recolour the operator's terminal or set its title. JSON (``emit_json``) escapes
them already.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any, TextIO

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# C0 controls (newline and tab included), DEL, C1 controls, the line and paragraph separators,
# the bidirectional embeddings, overrides and isolates (they reorder what follows them on the
# line), and lone surrogates (which cannot even be written to a UTF-8 terminal).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
                     "\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(value: Any) -> str:
    """``str(value)`` with every character that could act on a terminal shown as an escape:
    ``\\n``, ``\\t``, ``\\r``, ``\\xNN`` (other C0, DEL and C1 controls), ``\\uNNNN`` (bidi
    controls, separators, surrogates). A backslash already in the text is left as it is:
    ``--json`` gives the exact value."""
    return _UNSAFE.sub(_escape, str(value))


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


class CliError(Exception):
    """Bad input or an unreachable dependency: one line on stderr, exit code 1.

    Its text is escaped (``printable``): it may quote a stored value or mipos's answer."""

    def __init__(self, message: str) -> None:
        super().__init__(printable(message))


def emit_json(data: Any, stream: TextIO = sys.stdout) -> None:
    stream.write(json.dumps(data, indent=2, default=str, sort_keys=False) + "\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], max_width: int = 60) -> str:
    cells = [[_cell(value, max_width) for value in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _cell(value: Any, max_width: int) -> str:
    """One value on one line: trimmed, control characters escaped, runs of spaces made one."""
    text = "" if value is None else " ".join(printable(str(value).strip()).split())
    text = text or "-"
    return text if len(text) <= max_width else text[: max_width - 1] + "…"


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 120:
        return f"{value:.1f}s"
    if value < 7200:
        return f"{value / 60:.0f}m"
    if value < 172800:
        return f"{value / 3600:.1f}h"
    return f"{value / 86400:.1f}d"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``7d``, ``1w`` into seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (examples: 90s, 15m, 2h, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def duration_argument(text: str) -> float:
    """An argparse type for ``parse_duration``."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
