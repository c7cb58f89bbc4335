"""Scaling: the rate with 1, 2 and 4 worker processes, and how close one Redis comes to a full core.

Each worker process is its own process group (``Bench.start``), their CPU summed.
Redis runs commands on one thread, so its CPU seconds over the run's wall
seconds is the share of the one core it can use; and 1000 / (its CPU ms per
acceptance) is the rate at which that core would be full, if an acceptance
kept costing Redis what it cost here. The orders of a run grow with the number
of processes so that each run lasts about as long. On a machine with fewer
cores than processes the workers contend for CPU: the rows show what was
measured, with the machine's idle share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from statistics import median

from bench.report import Row
from bench.runs import Bench, RunResult
from bench.systems import OURS, STOCK

PROCESS_COUNTS = (1, 2, 4)
SMOKE_PROCESS_COUNTS = (1, 2)


@dataclass
class ScalingRuns:
    processes: int
    orders: int  # in each run
    ours: list[RunResult]
    stock: list[RunResult]  # paired with ours, in order


def measure_scaling(bench: Bench, say: Callable[[str], None], latency_ms: float, pool: str,
                    concurrency: int, processes: int, orders: int, repeats: int) -> ScalingRuns:
    """``repeats`` pairs of runs, ours then stock Celery, each with ``processes`` workers."""
    found = ScalingRuns(processes, orders, [], [])
    for n in range(repeats):
        for system, runs in ((OURS, found.ours), (STOCK, found.stock)):
            say(f"{pool} x{concurrency}, {_processes(processes)}, latency {latency_ms:g} ms, "
                f"{orders} orders: {system.name} (run {n + 1} of {repeats})")
            run = bench.system_run(system, latency_ms, pool, concurrency, orders, processes)
            say(f"  {run.rate:.1f}/s, Redis {run.redis_cpu_ms:.3f} ms CPU each, busy "
                f"{run.redis_core_share:.0%} of a core, machine idle {run.idle:.0%}")
            runs.append(run)
    return found


def scaling_rows(found: ScalingRuns, latency_ms: float, pool: str, concurrency: int) -> list[Row]:
    """The rate beside stock Celery's, then Redis's CPU per acceptance, its commands per
    acceptance and its share of one core, at this number of processes."""
    ours, stock, orders = found.ours, found.stock, found.orders
    idle = [r.idle for r in ours + stock]
    key = f"scaling_{found.processes}_processes_{latency_ms:g}ms"
    what = f"{pool} x{concurrency}, {_processes(found.processes)}"
    worker_cpu = f"workers' CPU per acceptance (all processes) {median([r.cpu_ms for r in ours]):.2f} ms " \
                 f"(ours), {median([r.cpu_ms for r in stock]):.2f} ms (stock)"
    return [
        Row(key, f"acceptances/s at {latency_ms:g} ms latency, {what}", "/s", [r.rate for r in ours],
            [r.rate for r in stock], "stock Celery", None, idle,
            note=f"{orders} orders a run; {worker_cpu}"),
        Row(f"{key}_redis_cpu_ms_per_acceptance", f"Redis's own CPU per acceptance, {what}", "ms",
            [r.redis_cpu_ms for r in ours], [r.redis_cpu_ms for r in stock], "stock Celery", None, idle,
            note=f"one Redis core full at ≈ {_full_core_rate(ours):.0f}/s (ours), "
                 f"{_full_core_rate(stock):.0f}/s (stock)"),
        Row(f"{key}_redis_commands_per_acceptance",
            f"Redis commands per acceptance (producer + worker, sweeps included), {what}", "",
            [r.per_order(orders)[0] for r in ours], [r.per_order(orders)[0] for r in stock],
            "stock Celery", None, idle),
        Row(f"{key}_redis_core_share", f"Redis's CPU share of one core, queue released → last "
            f"acceptance, {what}", "%", [round(r.redis_core_share * 100, 1) for r in ours],
            [round(r.redis_core_share * 100, 1) for r in stock], "stock Celery", None, idle),
    ]


def _processes(count: int) -> str:
    return f"{count} worker process{'' if count == 1 else 'es'}"


def _full_core_rate(runs: list[RunResult]) -> float:
    cost_ms = median([r.redis_cpu_ms for r in runs])
    return 1000 / cost_ms if cost_ms > 0 else float("inf")
