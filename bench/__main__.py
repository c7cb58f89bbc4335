"""Benchmarks against the peer a user would pick, measured so they can be trusted.

    python -m bench [--orders 2000] [--repeats 5] [--smoke] [--json PATH]

Starts its own Redis, the sandbox (its fast serving mode for throughput and
latency rows, the full one for the token rows), and for each row runs, in
alternation, this worker (the Procfile's ``worker:`` line), a stock Celery app
doing the same POST (``bench/stock_celery.py``: same pool, concurrency,
serializer, acks and events) and a bare ``requests`` thread pool. Each ratio is
the median over ``--repeats`` pairs of runs, shown with its min and max; each
row shows the machine's idle CPU share during its runs (lowest and median), so
a busy machine is visible. See ``bench/runs.py`` for how a run is kept clean.
``--json`` writes every row (with each run's figures) and ``_details``: Redis
commands per acceptance by command, Redis round trips per acceptance by command
(from a separate run under ``MONITOR``, see ``bench/round_trips.py``) and memory
per order by kind of key.

Only loopback addresses; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.measure import percentile
from bench.report import Goal, Row, table
from bench.round_trips import ORDERS as ROUND_TRIP_ORDERS
from bench.round_trips import count_round_trips
from bench.runs import Bench, RunResult
from bench.scaling import PROCESS_COUNTS, SMOKE_PROCESS_COUNTS, measure_scaling, scaling_rows
from bench.systems import OURS, STOCK


class PhaseLog:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.started = time.monotonic()

    def __call__(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True)


class Plan:
    """Runs every row and keeps what the calibration row and the details need."""

    def __init__(self, bench: Bench, options: argparse.Namespace, say: PhaseLog) -> None:
        self.bench = bench
        self.options = options
        self.say = say
        self.rows: list[Row] = []
        self.highest_rate = 0.0
        self.busiest_server = 0.0  # the sandbox's share of one core in the fastest run
        self.server_cpu_s = 0.0
        self.server_requests = 0
        self.details: dict[str, Any] = {}

    def _note_server(self, run: RunResult) -> None:
        if run.rate > self.highest_rate:
            self.highest_rate = run.rate
            self.busiest_server = run.server_cpu_s * run.rate / max(1, run.requests)
        self.server_cpu_s += run.server_cpu_s
        self.server_requests += run.requests

    def throughput(self, latency_ms: float, pool: str, concurrency: int, orders: int, repeats: int,
                   *, cost_rows: bool, goal: Goal | None = None, key: str | None = None) -> None:
        bench = self.bench
        runs: dict[str, list[RunResult]] = {"ours": [], "stock": [], "bare": []}
        for n in range(repeats):
            for name in ("ours", "stock", "bare"):
                self.say(f"{pool} x{concurrency}, latency {latency_ms:g} ms, {orders} orders: "
                         f"{name} (run {n + 1} of {repeats})")
                if name == "bare":
                    run = bench.bare_run(latency_ms, concurrency, orders)
                else:
                    run = bench.system_run(OURS if name == "ours" else STOCK, latency_ms, pool,
                                           concurrency, orders)
                self.say(f"  {run.rate:.1f}/s, {run.cpu_ms:.2f} ms CPU each, machine idle {run.idle:.0%}")
                runs[name].append(run)
                self._note_server(run)
        ours, stock, bare = runs["ours"], runs["stock"], runs["bare"]
        idle = [r.idle for r in ours + stock + bare]
        what = f"latency {latency_ms:g} ms, {pool} x{concurrency}"
        key = key or f"throughput_{latency_ms:g}ms"
        rate = [r.rate for r in ours]
        self.rows.append(Row(key, f"acceptances/s, {what}", "/s", rate, [r.rate for r in bare],
                             "bare client", goal, idle))
        self.rows.append(Row(f"{key}_vs_stock", f"acceptances/s, {what}", "/s", rate,
                             [r.rate for r in stock], "stock Celery", None, idle))
        if not cost_rows:
            return
        cpu = [r.cpu_ms for r in ours]
        self.rows.append(Row("cpu_ms_per_acceptance", f"worker CPU per acceptance, {what}", "ms", cpu,
                             [r.cpu_ms for r in stock], "stock Celery", Goal("ratio", "<=", 1.2), idle))
        self.rows.append(Row("cpu_ms_per_acceptance_vs_bare", f"CPU per acceptance, {what}", "ms", cpu,
                             [r.cpu_ms for r in bare], "bare client", None, idle))
        self.rows.append(Row("redis_commands_per_acceptance",
                             "Redis commands per acceptance (producer + worker, sweeps included)", "",
                             [r.per_order(orders)[0] for r in ours], [r.per_order(orders)[0] for r in stock],
                             "stock Celery", Goal("ratio", "<=", 1.5), idle))
        self.rows.append(Row("redis_cpu_ms_per_acceptance", "Redis's own CPU per acceptance", "ms",
                             [r.redis_cpu_ms for r in ours], [r.redis_cpu_ms for r in stock],
                             "stock Celery", None, idle))
        self.rows.append(Row("redis_bytes_per_order", "Redis memory held beyond 1 h, per order", "B",
                             [r.per_order(orders + 1)[1] for r in ours],
                             [r.per_order(orders + 1)[1] for r in stock], "stock Celery",
                             Goal("ours", "<=", 300), idle))
        self.rows.append(Row("peak_rss_mb", f"peak RSS per worker process, {what}", "MB",
                             [r.rss_mb for r in ours], [r.rss_mb for r in stock], "stock Celery", None, idle))
        self.details["commands_per_acceptance"] = {
            name: _per_command([r.commands for r in runs[name]], orders) for name in ("ours", "stock")}
        self.details["memory_per_order"] = {
            name: {kind: {"keys_per_order": round(keys / (orders + 1), 3),
                          "bytes_per_order": round(size / (orders + 1), 1), "ttl_days": None if ttl < 0 else round(ttl / 86400, 2)}
                   for kind, (keys, size, ttl) in runs[name][-1].memory.items()} for name in ("ours", "stock")}

    def scaling(self, latency_ms: float, pool: str, concurrency: int, process_counts: tuple[int, ...],
                orders_per_process: int, repeats: int) -> None:
        """Rows at each number of worker processes; the orders of a run grow with it."""
        for processes in process_counts:
            found = measure_scaling(self.bench, self.say, latency_ms, pool, concurrency, processes,
                                    orders_per_process * processes, repeats)
            for run in found.ours + found.stock:
                self._note_server(run)
            self.rows += scaling_rows(found, latency_ms, pool, concurrency)

    def enqueue(self, calls: int, repeats: int) -> None:
        cpu: dict[str, list[float]] = {"ours": [], "stock": []}
        p50: dict[str, list[float]] = {"ours": [], "stock": []}
        p99: dict[str, list[float]] = {"ours": [], "stock": []}
        idle = []
        for n in range(repeats):
            for name in ("ours", "stock"):
                self.say(f"enqueue cost: {calls} delay() calls, {name} (run {n + 1} of {repeats})")
                cpu_ms, wall, run_idle = self.bench.enqueue_probe(name, calls)
                cpu[name].append(cpu_ms)
                p50[name].append(percentile(wall, 50))
                p99[name].append(percentile(wall, 99))
                idle.append(run_idle)
        self.say(f"enqueue cost: {calls} raw LPUSH calls")
        _, raw, raw_idle = self.bench.enqueue_probe("lpush", calls)
        goal = Goal("ratio", "<=", 1.2)
        self.rows += [
            Row("enqueue_cpu_ms", "delay() CPU per call in the POS (task-sent events on)", "ms",
                cpu["ours"], cpu["stock"], "stock Celery", goal, idle),
            Row("enqueue_p50_ms", "delay() p50", "ms", p50["ours"], p50["stock"], "stock Celery", None, idle),
            Row("enqueue_p99_ms", "delay() p99", "ms", p99["ours"], p99["stock"], "stock Celery", goal, idle),
            Row("enqueue_p99_vs_lpush_ms", "delay() p99", "ms", p99["ours"],
                [percentile(raw, 99)] * len(p99["ours"]), "raw LPUSH", None, idle + [raw_idle]),
        ]

    def queue_latency(self, rate: float, seconds: float, pool: str, concurrency: int, repeats: int) -> None:
        p50: dict[str, list[float]] = {"ours": [], "stock": []}
        p99: dict[str, list[float]] = {"ours": [], "stock": []}
        idle = []
        for n in range(repeats):
            for system in (OURS, STOCK):
                self.say(f"queue latency at {rate:g}/s for {seconds:g} s: {system.name} "
                         f"(run {n + 1} of {repeats})")
                latencies, run_idle = self.bench.queue_latency(system, rate, seconds, pool, concurrency)
                p50[system.name].append(percentile(latencies, 50))
                p99[system.name].append(percentile(latencies, 99))
                idle.append(run_idle)
                self.say(f"  p50 {p50[system.name][-1]:.2f} ms, p99 {p99[system.name][-1]:.2f} ms, "
                         f"machine idle {run_idle:.0%}")
        what = f"delay() returning → the sandbox receiving the request, at {rate:g}/s"
        self.rows += [
            Row("queue_latency_p50_ms", f"{what}, p50", "ms", p50["ours"], p50["stock"], "stock Celery",
                None, idle),
            Row("queue_latency_p99_ms", f"{what}, p99", "ms", p99["ours"], p99["stock"], "stock Celery",
                Goal("ours", "<=", 20), idle),
        ]

    def tokens(self, cold_orders: int, ttl_s: float, stream_s: float, pool: str, concurrency: int) -> None:
        self.say(f"token economy: {cold_orders} orders cold on 2 processes, then tokens expiring "
                 f"every {ttl_s:g} s")
        cold, minimum, during, needed, sandbox_ms = self.bench.token_economy(
            OURS, cold_orders, ttl_s, stream_s, pool, concurrency)
        self.rows += [
            Row("token_calls_cold_start", f"token + refresh calls, {cold_orders} orders at once, cold, "
                "2 processes", "", [cold], [minimum], "the minimum", Goal("ours", "<=", 1)),
            Row("token_calls_expiring", f"token + refresh calls, token expiring every {ttl_s:g} s, "
                f"{stream_s:g} s stream", "", [during], [needed], "1 + one per expiry"),
        ]
        self.details["stdlib_sandbox_cpu_ms_per_request"] = round(sandbox_ms, 3)

    def round_trips(self, pool: str, concurrency: int, orders: int) -> None:
        """Counted in one unmeasured run per system (MONITOR costs Redis CPU); the row goes
        beside the commands row."""
        found = {}
        for system in (OURS, STOCK):
            self.say(f"round trips: {orders} orders at latency 0 under MONITOR: {system.name}")
            found[system.name] = count_round_trips(self.bench, system, pool, concurrency, orders)
            self.say(f"  {found[system.name].per_order(orders):.2f} round trips per acceptance")
        row = Row("redis_round_trips_per_acceptance", "Redis round trips per acceptance: commands "
                  "clients send, a script call once (producer + worker, sweeps included)", "",
                  [found["ours"].per_order(orders)], [found["stock"].per_order(orders)], "stock Celery",
                  Goal("ratio", "<=", 1.5), note=f"{orders} orders under MONITOR, once each")
        after = [n + 1 for n, r in enumerate(self.rows) if r.key == "redis_commands_per_acceptance"]
        self.rows.insert(after[0] if after else len(self.rows), row)
        self.details["round_trips_per_acceptance"] = {
            name: _per_command([dict(found[name].client)], orders) for name in found}
        self.details["script_commands_per_acceptance"] = {
            name: _per_command([dict(found[name].script)], orders) for name in found}
        self.details["round_trips_per_acceptance_multi_exec_once"] = {
            name: round(found[name].per_order_transactions_once(orders), 3) for name in found}

    def calibration(self) -> None:
        per_request_ms = self.server_cpu_s * 1000 / max(1, self.server_requests)
        capacity = 1000 / per_request_ms if per_request_ms > 0 else float("inf")
        stdlib_ms = self.details.get("stdlib_sandbox_cpu_ms_per_request")
        note = (f"fast sandbox: {per_request_ms:.3f} ms CPU a request, busy {self.busiest_server:.0%} "
                f"of one core in the fastest run")
        if stdlib_ms:
            note += f"; the full sandbox: {stdlib_ms:.2f} ms CPU a request"
        self.rows.append(Row("sandbox_capacity", "sandbox capacity on one core vs the highest rate "
                             "measured", "/s", [round(capacity, 1)], [round(self.highest_rate, 1)],
                             "highest rate", Goal("ratio", ">=", 2), note=note))


def _per_command(runs: list[dict[str, int]], orders: int) -> dict[str, float]:
    names = {name for run in runs for name in run}
    per = {name: round(statistics.median(run.get(name, 0) for run in runs) / orders, 3) for name in names}
    return dict(sorted(per.items(), key=lambda item: -item[1]))


def run(options: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    say = PhaseLog(options.quiet)
    bench = Bench(Path(tempfile.mkdtemp(prefix="mipos-bench-")), say)
    plan = Plan(bench, options, say)
    smoke = options.smoke
    repeats = 1 if smoke else options.repeats
    orders = 40 if smoke else options.orders
    pool, concurrency = options.pool, options.concurrency
    try:
        plan.throughput(0, pool, concurrency, orders, repeats, cost_rows=True)
        if not smoke:
            plan.throughput(50, pool, concurrency, orders, repeats, cost_rows=False,
                            goal=Goal("ratio", ">=", 0.95))
            if options.prefork:
                plan.throughput(50, "prefork", 8, options.prefork_orders, repeats, cost_rows=False,
                                key="pool_prefork_8_50ms")
        if options.scaling:
            plan.scaling(50, pool, concurrency, SMOKE_PROCESS_COUNTS if smoke else PROCESS_COUNTS,
                         40 if smoke else options.scaling_orders, repeats)
        plan.enqueue(200 if smoke else options.enqueue_calls, repeats)
        rate, seconds = (20.0, 1.0) if smoke else (100.0, options.latency_seconds)
        plan.queue_latency(rate, seconds, pool, concurrency, repeats)
        plan.tokens(*((50, 1.0, 3.0) if smoke else (500, 5.0, 20.0)), pool, concurrency)
        plan.round_trips(pool, concurrency, orders if smoke else ROUND_TRIP_ORDERS)
        plan.calibration()
    finally:
        bench.stop()
    return plan.rows, plan.details


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=2000, help="orders in a throughput run")
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs a row (default 5)")
    parser.add_argument("--pool", default="threads", help="the worker's pool (the Procfile's default)")
    parser.add_argument("--concurrency", type=int, default=16, help="the pool's size (the Procfile's default)")
    parser.add_argument("--prefork", action=argparse.BooleanOptionalAction, default=True,
                        help="also the prefork x8 row at 50 ms")
    parser.add_argument("--prefork-orders", type=int, default=1000)
    parser.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=True,
                        help="also the scaling rows: 1, 2 and 4 worker processes at 50 ms (--smoke: 1 and 2)")
    parser.add_argument("--scaling-orders", type=int, default=1000,
                        help="orders in a scaling run, per worker process")
    parser.add_argument("--enqueue-calls", type=int, default=3000)
    parser.add_argument("--latency-seconds", type=float, default=10.0,
                        help="length of a queue-latency run at 100 orders/s")
    parser.add_argument("--smoke", action="store_true", help="a few dozen orders, one run each: checks it runs")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quiet", action="store_true")
    options = parser.parse_args(argv)
    started = time.monotonic()
    rows, details = run(options)
    print(table(rows))
    took = time.monotonic() - started
    print(f"\n{len(rows)} rows in {took / 60:.1f} min; python -m bench "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}")
    if options.json:
        document: dict[str, Any] = {row.key: row.as_json() for row in rows}
        document["_details"] = details
        document["_machine"] = {"python": platform.python_version(), "platform": platform.platform(),
                                "minutes": round(took / 60, 1)}
        options.json.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
