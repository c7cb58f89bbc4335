"""The small chaos runs in CI: a few hundred orders, SIGKILLed workers, a Redis restart; the
lenient sandbox, the strict one (a second request refused), and accepts beside denies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from support.processes import ROOT


def chaos_run(tmp_path: Path, *options: str, timeout_s: int = 240) -> tuple[dict[str, Any], str]:
    """``python -m bench.chaos`` with ``options``: (its JSON, its output); it must exit 0."""
    out = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--workers", "2", "--timeout", str(timeout_s), "--quiet",
         "--json", str(out), *options],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout_s + 60, check=False,
    )
    assert out.exists(), proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def assert_sent_once_within_the_bound(result: dict[str, Any]) -> None:
    assert result["lost"] == 0
    assert result["wrongly_dead_lettered"] == 0
    assert result["duplicates_landed_within_bound"] == 0
    assert result["duplicates_unexplained"] == 0


def test_small_chaos_run_loses_nothing(tmp_path: Path) -> None:
    result, stdout = chaos_run(tmp_path, "--orders", "300", "--kills", "1", "--permanent", "6", "--late", "2")
    assert_sent_once_within_the_bound(result)
    assert result["dead_lettered_permanent"] == 6
    assert result["kills"] == 1 and result["redis_restarts"] == 1
    assert result["accepted_once"] + result["accepted_twice_or_more"] == 300 - 6
    assert "| sandbox | orders | accepted once |" in stdout
    assert "sent twice or more" in stdout  # reported with their causes; late landings allowed


def test_small_strict_chaos_run_refuses_nothing_it_should_not(tmp_path: Path) -> None:
    """Strict mipos refuses a second request: one sent within the bound would be dead-lettered
    (wrongly), or refused and settled; neither may happen, and nothing is accepted twice."""
    result, stdout = chaos_run(tmp_path, "--strict", "--orders", "300", "--kills", "1", "--permanent", "6",
                               "--late", "2")
    assert result["strict"] is True
    assert_sent_once_within_the_bound(result)
    assert result["accepted_twice_or_more"] == 0
    assert result["dead_lettered_permanent"] == 6 and result["dead_lettered_other"] == 0
    assert result["accepted_once"] == 300 - 6
    assert "| strict | 300 |" in stdout


def test_small_mixed_chaos_run_never_accepts_and_denies_one_order(tmp_path: Path) -> None:
    """Accepts and denies of the same orders, workers killed while requests are held: never
    both at mipos; each pair's loser is dead-lettered, as expected."""
    result, stdout = chaos_run(tmp_path, "--mixed", "--orders", "200", "--kills", "2", "--kill-interval", "2",
                               "--permanent", "4", "--late", "0")
    assert result["mixed"] is True and result["pairs"] > 0
    assert result["both_accepted_and_denied"] == 0
    assert_sent_once_within_the_bound(result)
    assert result["other_action_dead_lettered"] == result["pairs"]
    assert result["pairs_ended_accepted"] + result["pairs_ended_denied"] == result["pairs"]
    assert "| both accepted and denied |" in stdout
