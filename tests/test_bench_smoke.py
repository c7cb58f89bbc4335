"""The benchmark in its smoke mode: it runs, and reports every row with its baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.harness import ROOT


def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--quiet", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    for key in ("throughput_0ms", "enqueue_p99_ms", "queue_latency_p99_ms", "token_calls_cold_start",
                "token_calls_expiring", "cpu_ms_per_acceptance", "peak_rss_mb"):
        assert set(rows[key]) >= {"ours", "baseline", "ratio"}, key
        assert rows[key]["ours"] is not None and rows[key]["ours"] > 0, key
    assert rows["throughput_0ms"]["baseline"] > 0 and rows["throughput_0ms"]["ratio"] > 0
    assert rows["token_calls_cold_start"]["ours"] == 1
    assert "| measure | ours | baseline | ratio |" in proc.stdout
