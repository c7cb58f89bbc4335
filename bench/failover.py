"""The failover chaos run: orders through a Redis master SIGKILLed under Sentinel.

    python -m bench.failover [--orders 2000] [--failovers 2] [--replicas-ack 1] [--json PATH]

Starts a Redis master with one replica and three Sentinels (bench/sentinel.py;
a node is down after 1 s), the sandbox with the chaos run's faults (its slow
answers land 1.5 s after arriving, within one call's bound), and three workers
from the Procfile, all on REDIS_URL=sentinel://... Enqueues the orders with
``delay()`` (retrying, as a POS or an outbox does, when it raises); at random
moments SIGKILLs the master (the second time, the promoted one), waits for
Sentinel to promote the replica, and starts the killed node again, which
Sentinel turns into a replica. In each failover's window it also SIGKILLs a
worker (``--worker-kills``, per failover) and starts a new one: once the victim
has followed the new master (its ``redis_master_changed`` line; at most 15 s),
while the promoted master has no replica yet. Prints lost / duplicated (by cause,
bench/chaos_tally.py) / wrongly dead-lettered orders and how long producers and
workers took to follow the new master. Exits non-zero if an order is lost,
wrongly dead-lettered, or sent twice within the bound or unexplained.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench.chaos_setup import (
    SLOW_ANSWER_AFTER_S,
    SLOW_LAND_AFTER_S,
    Enqueuer,
    Plan,
    make_plan,
    start_sandbox,
    worker_env,
)
from bench.chaos_tally import (
    ChaosResult,
    duplicate_notes,
    keep_record,
    read_snapshot,
    report,
    tally,
    unfinished_tasks,
    wait_for_landings,
)
from bench.sentinel import SentinelCluster
from bench.worker_pool import WorkerPool
from cli.progress import Progress
from support.processes import WorkerProcess

REDIS_PASSWORD = "failover-redis-pass"
SENTINEL_PASSWORD = "failover-sentinel-pass"
FOLLOW_WAIT_S = 15.0  # a worker kill waits at most this for its victim's redis_master_changed line
SETTLE_S = 60.0  # after every order is final, how long to wait for the tasks still in flight
LANDINGS_WAIT_S = 10.0  # ... and for the requests still due to land (the late ones: 4 s)


@dataclass
class Failover:
    killed: str
    promoted: str = ""
    killed_at: float = 0.0
    promoted_after_s: float = 0.0
    rejoined_after_s: float = 0.0  # the killed node back, as a replica of the new master
    worker_killed_after_s: list[float] = field(default_factory=list)  # SIGKILLs of workers, after the master's


@dataclass
class FailoverResult(ChaosResult):
    replicas_ack: int = 0
    failovers: list[Failover] = field(default_factory=list)
    worker_follow_s: list[float] = field(default_factory=list)  # kill -> redis_master_changed
    producer_follow_s: list[float] = field(default_factory=list)
    producer_back_s: list[float] = field(default_factory=list)  # kill -> the next delay() returning
    delay_errors: dict[str, int] = field(default_factory=dict)


def _percentiles(values: list[float]) -> str:
    if not values:
        return "none"
    ordered = sorted(values)
    return f"p50 {statistics.median(ordered):.1f} s, max {ordered[-1]:.1f} s (n={len(ordered)})"


class FailoverRun:
    def __init__(self, options: argparse.Namespace, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.rng = random.Random(options.seed)
        self.cluster = SentinelCluster(workdir / "redis", password=REDIS_PASSWORD,
                                       sentinel_password=SENTINEL_PASSWORD)
        self.sandbox = start_sandbox(workdir, strict=options.strict, land_after_s=SLOW_LAND_AFTER_S,
                                     answer_after_s=SLOW_ANSWER_AFTER_S)
        self.redis_env = self.cluster.env(replicas_ack=options.replicas_ack)
        self.pool = WorkerPool(worker_env(self.sandbox.url, self.redis_env), workdir)
        self.failovers: list[Failover] = []
        self.producer_changes: list[float] = []
        self.delay_errors: Counter[str] = Counter()
        self.back: dict[int, float] = {}  # failover -> seconds from its SIGKILL to the next delay() returning
        self.client: redis.Redis | None = None

    def publish(self, action: str, kwargs: dict[str, Any]) -> None:
        """``delay()``, retried when it raises (what a POS does, or an outbox)."""
        from tasks import accept_order, deny_order

        task = accept_order if action == "accept" else deny_order
        while True:
            try:
                task.delay(**kwargs)
                self.note_back(time.time())
                return
            except Exception as exc:  # noqa: BLE001 - counted, then tried again
                self.delay_errors[_error_kind(exc)] += 1
                time.sleep(0.2)

    def note_back(self, now: float) -> None:
        for i, failover in enumerate(list(self.failovers)):
            if i not in self.back and failover.killed_at and now > failover.killed_at:
                self.back[i] = now - failover.killed_at

    def enqueue_all(self, plan: Plan, kill_after: list[int]) -> None:
        from worker.state.topology import follow_master_changes, tracker

        follow_master_changes()  # this process is the POS: when did its connections follow?
        tracker.listen("failover-run", lambda *_: self.producer_changes.append(time.time()))
        enqueuer = Enqueuer(plan, self.sandbox, self.publish)
        progress = Progress("failover: enqueued", total=len(plan.ids), enabled=not self.options.quiet)
        killer: threading.Thread | None = None
        for n, order_id in enumerate(plan.ids, start=1):
            if kill_after and n == kill_after[0]:
                kill_after.pop(0)
                if killer is not None:
                    killer.join()
                killer = threading.Thread(target=self.fail_over, daemon=True)
                killer.start()
            enqueuer.order(n, order_id)
            progress.advance()
        enqueuer.flush(wait=True)
        progress.finish()
        if killer is not None:
            killer.join()

    def fail_over(self) -> None:
        present = list(self.pool.live)  # the workers that will follow the new master
        node, at = self.cluster.kill_master()
        failover = Failover(killed=node.address, killed_at=at)
        self.failovers.append(failover)
        promoted = self.cluster.wait_promoted(node)
        failover.promoted_after_s = round(promoted - at, 2)
        failover.promoted = self.cluster.master().address
        workers = threading.Thread(target=self.kill_workers, args=(failover, present), daemon=True)
        workers.start()
        time.sleep(self.rng.uniform(0.5, 2.0))  # the machine comes back a little later
        node.start()
        self.cluster.wait_healthy(timeout=120)
        failover.rejoined_after_s = round(time.time() - at, 2)
        workers.join(timeout=FOLLOW_WAIT_S + 30)

    def kill_workers(self, failover: Failover, present: list[WorkerProcess]) -> None:
        """SIGKILL workers in the failover's window, each once it has followed the new master
        (so each process that lived through the promotion says when it followed), and start
        new ones (which meet the new master first, and say nothing)."""
        victims = self.rng.sample(present, min(self.options.worker_kills, len(present)))
        for victim in victims:
            wait_followed(victim, failover.promoted, FOLLOW_WAIT_S)
            time.sleep(self.rng.uniform(0.0, 1.0))
            self.pool.kill(victim)
            failover.worker_killed_after_s.append(round(time.time() - failover.killed_at, 2))

    def redis_client(self) -> redis.Redis | None:
        from mipos_worker.state.connection import redis_from_url

        if self.client is None:
            try:
                self.client = redis_from_url(self.redis_env["REDIS_URL"], timeout_s=3.0, retries=1)
            except Exception:  # noqa: BLE001 - mid-failover: ask again on the next round
                return None
        return self.client

    def wait_final(self, plan: Plan, result: FailoverResult, give_up: float) -> None:
        """Until every order is final and no task is still in flight (bounded)."""
        progress = Progress("failover: final", total=len(plan.ids), enabled=not self.options.quiet)
        settled_by: float | None = None
        while True:
            snap = read_snapshot(self.sandbox.control, self.redis_client())
            final = snap.finished(plan)
            inflight = unfinished_tasks(self.redis_client())
            progress.update(final, f"in flight {inflight}")
            if final == len(plan.ids):
                settled_by = settled_by or time.monotonic() + SETTLE_S
                if inflight == 0 or time.monotonic() > settled_by:
                    break
            if time.monotonic() > give_up:
                result.timed_out = True
                break
            time.sleep(0.5)
        progress.finish()

    def stop(self) -> None:
        self.pool.stop()
        self.sandbox.stop()
        self.cluster.stop()


def wait_followed(worker: WorkerProcess, master: str, timeout_s: float) -> bool:
    """Until ``worker``'s log says it follows ``master`` (bounded); False if it never did."""
    needle = f'"new": "{master}"'
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        text = worker.log_path.read_text(errors="replace")
        if any("redis_master_changed" in line and needle in line for line in text.splitlines()):
            return True
        time.sleep(0.2)
    return False


def _error_kind(exc: Exception) -> str:
    text = str(exc)
    if "not confirmed as replicated" in text:
        return "not_replicated"
    return type(exc).__name__


def run(options: argparse.Namespace) -> FailoverResult:
    workdir = Path(tempfile.mkdtemp(prefix="mipos-failover-"))
    started = time.monotonic()
    result = FailoverResult(orders=options.orders, replicas_ack=options.replicas_ack, strict=options.strict,
                            slow_land_after_s=SLOW_LAND_AFTER_S, slow_answer_after_s=SLOW_ANSWER_AFTER_S,
                            workdir=str(workdir))
    bench = FailoverRun(options, workdir)
    try:
        os.environ.update(bench.redis_env)  # the POS side: this process
        bench.pool.start_ready(options.workers)
        ids = [str(uuid.uuid4()) for _ in range(options.orders)]
        plan = make_plan(bench.rng, ids, permanent=options.permanent, late=options.late)
        # Kill moments: random, spread over the enqueueing, the second one the new master.
        span = options.orders / max(1, options.failovers)
        kill_after = sorted(int(span * k + bench.rng.uniform(0.2, 0.8) * span) + 1
                            for k in range(options.failovers))
        bench.enqueue_all(plan, kill_after)
        bench.wait_final(plan, result, started + options.timeout)
        result.wall_time_s = round(time.monotonic() - started, 1)
        finish(result, bench, plan)
    finally:
        bench.stop()
    return result


def finish(result: FailoverResult, bench: FailoverRun, plan: Plan) -> None:
    wait_for_landings(bench.sandbox.control, SLOW_LAND_AFTER_S, LANDINGS_WAIT_S)
    snap = read_snapshot(bench.sandbox.control, bench.redis_client())
    stats = bench.sandbox.control.stats()
    result.token_calls, result.refresh_calls = stats["token_calls"], stats["refresh_calls"]
    result.unfinished_tasks = unfinished_tasks(bench.redis_client())
    lines = bench.pool.lines()
    requests = bench.sandbox.control.requests()
    keep_record(bench.workdir, plan, requests)
    tally(result, plan, snap, requests, lines)
    result.kills = len(bench.pool.kills)
    result.failovers = bench.failovers
    result.delay_errors = dict(bench.delay_errors)
    for failover in bench.failovers:
        changed = [float(line["at"]) for line in lines if line.get("event") == "redis_master_changed"
                   and line.get("new") == failover.promoted and line.get("at")]
        # One line per worker process that followed (a replacement meets the new master first: none).
        result.worker_follow_s += [round(at - failover.killed_at, 2) for at in changed]
        result.producer_follow_s += [round(at - failover.killed_at, 2) for at in bench.producer_changes
                                     if failover.killed_at <= at <= failover.killed_at + 120][:1]
    result.producer_back_s = [round(bench.back[i], 2) for i in sorted(bench.back)]


def table(result: FailoverResult) -> str:
    header = ("| REDIS_MIN_REPLICAS_ACK | orders | accepted once | accepted twice or more | "
              "dead-lettered (permanent) | wrongly dead-lettered | lost | worker SIGKILLs | "
              "sent twice: landed within the bound | unexplained | wall time |")
    row = (f"| {result.replicas_ack} | {result.orders} | {result.accepted_once} | "
           f"{result.accepted_twice_or_more} | {result.dead_lettered_permanent} | "
           f"{result.wrongly_dead_lettered} | {result.lost} | {result.kills} | "
           f"{result.duplicates_landed_within_bound} | {result.duplicates_unexplained} | "
           f"{result.wall_time_s:.1f} s |")
    notes = [
        *duplicate_notes(result),
        ("failovers: " + "; ".join(
            f"{f.killed} killed, {f.promoted} promoted after {f.promoted_after_s:.1f} s, "
            f"the killed node a replica again after {f.rejoined_after_s:.1f} s, workers SIGKILLed "
            f"{', '.join(f'{s:.1f}' for s in f.worker_killed_after_s) or 'none'} s after the master"
            for f in result.failovers)),
        (f"workers followed the new master (SIGKILL -> redis_master_changed): "
         f"{_percentiles(result.worker_follow_s)}"),
        (f"the producer followed: {_percentiles(result.producer_follow_s)}; its next delay() "
         f"returned: {_percentiles(result.producer_back_s)}"),
        ("delay() raised (and was retried): " + (", ".join(
            f"{k} {v}" for k, v in sorted(result.delay_errors.items())) or "never")),
        ("faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(result.faults_injected.items()))),
        f"tasks still in flight at the end: {result.unfinished_tasks}; worker logs: {result.workdir}",
    ]
    if result.timed_out:
        notes.append("TIMED OUT before every order was final")
    return "\n".join([header, "|" + "---|" * 11, row, "", *notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--failovers", type=int, default=2, help="masters SIGKILLed, one after another")
    parser.add_argument("--worker-kills", type=int, default=1,
                        help="workers SIGKILLed in each failover's window (and replaced)")
    parser.add_argument("--replicas-ack", type=int, default=1, help="REDIS_MIN_REPLICAS_ACK")
    parser.add_argument("--permanent", type=int, default=20, help="orders with a permanent fault")
    parser.add_argument("--late", type=int, default=0,
                        help="orders whose first request lands later than one call's bound (4 s)")
    parser.add_argument("--strict", action="store_true",
                        help="the sandbox refuses an accept of an order that is not pending")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quiet", action="store_true")
    options = parser.parse_args(argv)
    if options.orders < 1 or options.workers < 1:
        parser.error("--orders and --workers must be at least 1")
    if not 0 <= options.worker_kills <= options.workers:
        parser.error("--worker-kills: between 0 and --workers (each failover kills workers it saw)")
    return report(run(options), table, options.json)


if __name__ == "__main__":
    sys.exit(main())
