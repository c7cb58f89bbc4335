"""bench/pages.py runs end to end (small numbers: the figures are the bench's, not this test's)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import pages


def test_the_pages_bench_runs(tmp_path: Path) -> None:
    out = tmp_path / "pages.json"
    pages.main(["--letters", "300", "--orders", "300", "--samples", "5", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {row["page"] for row in rows} >= {"dead letters: first page", "order page: accepted",
                                             "order page: dead-lettered", "find by a part of an id"}
    assert all(row["samples"] == 5 and row["p95_ms"] > 0 for row in rows)
