"""The small chaos runs in CI: a few hundred orders, SIGKILLed workers, a Redis restart; the
lenient sandbox, the strict one (a second request refused), and accepts beside denies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.chaos_setup import Pair, Plan
from bench.chaos_tally import (
    LANDED_LATE,
    UNEXPLAINED,
    WITHIN_BOUND,
    WORKER_LOSS,
    ChaosResult,
    Letter,
    Snapshot,
    landings_due_by,
    request_cause,
    tally,
)
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


# -- the tally, on made-up records (no processes) ---------------------------------------


def request(time: float, landed_after: float | None, fault: str | None = None, action: str = "accept",
            order: str = "o1") -> dict[str, Any]:
    return {"path": f"/api/v1/integration/order/{action}", "body": {"order_external_id": order},
            "time": time, "fault": fault, "status": 200,
            "landed_at": None if landed_after is None else time + landed_after}


def test_a_second_request_is_explained_by_when_the_first_landed() -> None:
    assert request_cause(request(100.0, 4.0, "delay_s=5.0,land_after_s=4.0"), [], 2.0) == LANDED_LATE
    assert request_cause(request(100.0, 1.5, "random:timeout"), [], 2.0) == WITHIN_BOUND
    assert request_cause(request(100.0, 0.0), [100.01], 2.0) == WORKER_LOSS
    assert request_cause(request(100.0, 0.0), [], 2.0) == UNEXPLAINED


def test_the_tally_counts_causes_pairs_and_repeated_letters() -> None:
    plan = Plan(ids=["o1", "o2", "o3"], pairs={"o2": Pair("deny", 0.0)})
    snap = Snapshot(
        applied={"o1": {"accept": 2, "deny": 0}, "o2": {"accept": 0, "deny": 1}},
        letters={"o2": [Letter("accept", "permanent", "... it cannot be accepted afterwards", "t2")] * 2})
    requests = [request(100.0, 1.5, "random:timeout"), request(102.1, 0.0),
                request(100.0, 0.0, action="deny", order="o2")]
    result = ChaosResult(orders=3)
    tally(result, plan, snap, requests, [])
    assert result.duplicates_landed_within_bound == 1 and result.duplicate_orders["landed_within_bound"] == ["o1"]
    assert result.lost == 1 and result.lost_orders == ["o3"]
    assert result.other_action_dead_lettered == 1 and result.wrongly_dead_lettered == 0
    assert result.dead_letters_repeated == 1
    assert result.pairs_ended_denied == 1 and result.both_accepted_and_denied == 0
    assert len(result.problems()) == 2  # o1 sent twice within the bound, o3 lost


def test_the_last_count_waits_for_requests_still_due_to_land() -> None:
    late = request(100.0, None, "delay_s=5.0,land_after_s=4.0")
    slow = request(103.0, None, "random:timeout")
    landed_already = request(200.0, 1.0, "random:timeout")
    assert landings_due_by([late, slow, landed_already], 1.5) == 104.5
