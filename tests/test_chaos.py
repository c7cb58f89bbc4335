"""The small chaos run in CI: a few hundred orders, one SIGKILL, one Redis restart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support.processes import ROOT


def test_small_chaos_run_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--orders", "300", "--workers", "2", "--kills", "1",
         "--permanent", "6", "--timeout", "240", "--quiet", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    result = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert result["lost"] == 0
    assert result["wrongly_dead_lettered"] == 0
    assert result["dead_lettered_permanent"] == 6
    assert result["kills"] == 1 and result["redis_restarts"] == 1
    assert result["accepted_once"] + result["accepted_twice_or_more"] == 300 - 6
    assert "| orders | accepted once |" in proc.stdout
    assert "duplicates:" in proc.stdout  # reported with their causes, not failed on
