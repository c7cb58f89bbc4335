"""Pure parts of the CLI: durations, times, tables, the progress line."""

from __future__ import annotations

import io

import pytest

from cli.output import parse_duration, parse_since, seconds, table
from cli.progress import Progress


@pytest.mark.parametrize("text, expected", [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200),
                                            ("7d", 604800), ("1.5h", 5400), (" 3 m ", 180)])
def test_durations(text: str, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "soon", "-5m", "5 minutes", "1y"])
def test_bad_durations_name_the_input(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_since_takes_a_duration_or_a_moment() -> None:
    assert parse_since("1h", now=10_000.0) == 6_400.0
    assert parse_since("2026-11-29T08:00:00Z") == parse_since("2026-11-29T08:00:00+00:00")
    assert parse_since("2026-11-29T08:00:00") == parse_since("2026-11-29T08:00:00Z")  # UTC
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since("last tuesday")


def test_table_aligns_and_truncates() -> None:
    text = table(["A", "LONG HEADER"], [["x" * 80, None], ["y", " two   words "], ["z", "a\nb"]],
                 max_width=10)
    lines = text.splitlines()
    assert lines[0] == "A           LONG HEADER"
    assert lines[1] == "xxxxxxxxx…  -"
    assert lines[2] == "y           two words"
    assert lines[3] == "z           a\\nb"  # a newline is shown, not obeyed (tests/test_hostile_text.py)


def test_seconds_reads_naturally() -> None:
    assert [seconds(v) for v in (0.0123, 3.21, 600, 7300, 200000)] == ["12ms", "3.2s", "10m", "2.0h", "2.3d"]


def test_progress_in_a_log_writes_whole_lines_and_one_final_line() -> None:
    stream = io.StringIO()
    progress = Progress("replay", total=4, stream=stream, every_s=0)
    for outcome in ("replayed", "replayed", "already_done", "replayed"):
        progress.advance(outcome=outcome)
    progress.finish()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4  # the final state was already shown: not repeated
    assert lines[-1].startswith("[replay] 4/4 (100%) · ")
    assert "already_done=1 replayed=3" in lines[-1]
    assert "\r" not in stream.getvalue()


def test_progress_disabled_writes_nothing() -> None:
    stream = io.StringIO()
    progress = Progress("x", total=2, stream=stream, enabled=False)
    progress.advance()
    progress.finish()
    assert stream.getvalue() == ""
