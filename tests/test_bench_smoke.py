"""The benchmark in its smoke mode: it runs, and reports every row beside its peer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support.processes import ROOT

# Rows compared with the stock Celery app (bench/stock_celery.py) run in the same invocation.
STOCK_ROWS = ("throughput_0ms_vs_stock", "cpu_ms_per_acceptance", "redis_commands_per_acceptance",
              "redis_round_trips_per_acceptance", "redis_cpu_ms_per_acceptance", "peak_rss_mb",
              "enqueue_cpu_ms", "enqueue_p99_ms", "queue_latency_p99_ms", "scaling_1_processes_50ms",
              "scaling_2_processes_50ms")


def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--quiet", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    for key in ("throughput_0ms", "enqueue_p99_ms", "queue_latency_p99_ms", "token_calls_cold_start",
                "token_calls_expiring", "cpu_ms_per_acceptance", "peak_rss_mb", "sandbox_capacity",
                *STOCK_ROWS):
        assert set(rows[key]) >= {"ours", "baseline", "ratio", "ratio_min", "ratio_max", "idle_cpu_min"}, key
        assert rows[key]["ours"] is not None and rows[key]["ours"] > 0, key
    for key in STOCK_ROWS:
        assert rows[key]["baseline_is"] == "stock Celery" and rows[key]["baseline"] > 0, key
    assert rows["throughput_0ms"]["baseline_is"] == "bare client"
    assert rows["throughput_0ms"]["baseline"] > 0 and rows["throughput_0ms"]["ratio"] > 0
    assert 0 <= rows["cpu_ms_per_acceptance"]["idle_cpu_min"] <= 1
    assert rows["token_calls_cold_start"]["ours"] == 1
    # The orders leave records behind (the ledger at least); stock Celery leaves none.
    assert rows["redis_bytes_per_order"]["ours"] > 0
    assert rows["redis_bytes_per_order"]["baseline"] == 0
    assert rows["_details"]["commands_per_acceptance"]["stock"]["lpush"] == 1
    # Round trips: a script call counts once, so ours are Celery's own plus our three scripts.
    assert rows["_details"]["round_trips_per_acceptance"]["stock"]["lpush"] == 1
    assert rows["redis_round_trips_per_acceptance"]["ours"] < rows["redis_commands_per_acceptance"]["ours"]
    assert "| measure | ours | baseline | ratio (median [min–max]) | goal | machine idle, min (median) |" in proc.stdout


def test_bench_outbox_smoke(tmp_path: Path) -> None:
    """The outbox's bench: the NOTIFY relay beside delay(), and the backlog row (issue 22)."""
    out = tmp_path / "bench-outbox.json"
    proc = subprocess.run([sys.executable, "-m", "bench.outbox", "--smoke", "--quiet", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    for key in ("outbox_listen_latency_p50_ms", "outbox_listen_latency_p99_ms"):
        assert rows[key]["baseline_is"] == "`delay()` returning → sandbox", key
        assert rows[key]["ours"] > 0 and rows[key]["baseline"] > 0 and rows[key]["ratio_min"] is not None, key
        assert rows[key]["goal"] is not None and 0 <= rows[key]["idle_cpu_min"] <= 1, key
    backlog = rows["outbox_backlog_drain_s"]
    assert backlog["ours"] > 0 and backlog["label"].startswith("2,000 committed rows")
    for key in ("delay", "accept_postgresql", "relay_listen_latency", "relay_poll_0_5_latency",
                "relay_thread_latency"):
        assert rows[key]["p50_ms"] > 0 and rows[key]["p99_ms"] >= rows[key]["p50_ms"], key
    assert "| measure | ours | baseline | ratio (median [min–max]) | goal | machine idle, min (median) |" in proc.stdout
