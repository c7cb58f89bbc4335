"""The failover chaos run: orders through a Redis master SIGKILLed under Sentinel.

    python -m bench.failover [--orders 2000] [--failovers 2] [--replicas-ack 1] [--json PATH]

Starts a Redis master with one replica and three Sentinels (bench/sentinel.py;
a node is down after 1 s), the sandbox with the chaos run's faults, and three
workers from the Procfile, all on REDIS_URL=sentinel://... Enqueues the orders
with ``delay()`` (retrying, as a POS or an outbox does, when it raises); at
random moments SIGKILLs the master (the second time, the promoted one), waits
for Sentinel to promote the replica, and starts the killed node again, which
Sentinel turns into a replica. Prints lost / duplicated / wrongly
dead-lettered orders and how long producers and workers took to follow the
new master. Exits non-zero if an order is lost or wrongly dead-lettered.
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

from bench.chaos import (
    FAULT_RATES,
    PERMANENT_FAULT,
    STORE_ID,
    TOKEN_TTL_S,
    WORKER_ENV,
    ChaosResult,
    report,
    tally,
)
from bench.sentinel import SentinelCluster
from cli.progress import Progress
from support.processes import (
    SANDBOX_ENV,
    Sandbox,
    WorkerProcess,
    read_json_lines,
)

REDIS_PASSWORD = "failover-redis-pass"
SENTINEL_PASSWORD = "failover-sentinel-pass"


@dataclass
class Failover:
    killed: str
    promoted: str = ""
    killed_at: float = 0.0
    promoted_after_s: float = 0.0
    rejoined_after_s: float = 0.0  # the killed node back, as a replica of the new master


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
        self.sandbox = Sandbox(workdir, "--token-ttl-s", str(TOKEN_TTL_S))
        self.sandbox.control.config(fault_rates=FAULT_RATES, timeout_delay_s=1.5)
        self.redis_env = self.cluster.env(replicas_ack=options.replicas_ack)
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "MIPOS_BASE_URL": self.sandbox.url,
            **SANDBOX_ENV,
            **WORKER_ENV,
            **self.redis_env,
        }
        self.workers = [WorkerProcess(self.env, workdir / f"worker-{n}.log")
                        for n in range(options.workers)]
        self.failovers: list[Failover] = []
        self.producer_changes: list[float] = []
        self.delay_errors: Counter[str] = Counter()
        self.back: dict[int, float] = {}  # failover -> seconds from its SIGKILL to the next delay() returning

    def enqueue_all(self, ids: list[str], permanent: set[str], kill_after: list[int]) -> None:
        from tasks import accept_order
        from worker.state.topology import tracker

        tracker.listen("failover-run", lambda *_: self.producer_changes.append(time.time()))
        progress = Progress("failover: enqueued", total=len(ids), enabled=not self.options.quiet)
        killer: threading.Thread | None = None
        for n, order_id in enumerate(ids, start=1):
            if kill_after and n == kill_after[0]:
                kill_after.pop(0)
                if killer is not None:
                    killer.join()
                killer = threading.Thread(target=self.fail_over, daemon=True)
                killer.start()
            self.sandbox.control.deliver(STORE_ID, n, order_id)
            if order_id in permanent:
                self.sandbox.control.add_faults(order_id, PERMANENT_FAULT)
            while True:  # what a POS does when delay() raises (or use an outbox)
                try:
                    accept_order.delay(delivery_id=n, store_id=STORE_ID, order_external_id=order_id)
                    now = time.time()
                    for i, failover in enumerate(list(self.failovers)):
                        if i not in self.back and failover.killed_at and now > failover.killed_at:
                            self.back[i] = now - failover.killed_at
                    break
                except Exception as exc:  # noqa: BLE001 - counted, then tried again
                    self.delay_errors[_error_kind(exc)] += 1
                    time.sleep(0.2)
            progress.advance()
        progress.finish()
        if killer is not None:
            killer.join()

    def fail_over(self) -> None:
        node, at = self.cluster.kill_master()
        failover = Failover(killed=node.address, killed_at=at)
        self.failovers.append(failover)
        promoted = self.cluster.wait_promoted(node)
        failover.promoted_after_s = round(promoted - at, 2)
        failover.promoted = self.cluster.master().address
        time.sleep(self.rng.uniform(0.5, 2.0))  # the machine comes back a little later
        node.start()
        self.cluster.wait_healthy(timeout=120)
        failover.rejoined_after_s = round(time.time() - at, 2)

    def outcome(self) -> tuple[dict[str, int], dict[str, str]]:
        from mipos_worker.state.connection import redis_from_url
        from worker.state.deadletters import DeadLetters

        accepted = {v["order_external_id"]: v["accepted"]
                    for v in self.sandbox.control.orders()["orders"].values()
                    if v["store_id"] == STORE_ID}
        try:
            client = redis_from_url(self.redis_env["REDIS_URL"], timeout_s=3.0, retries=1)
            letters = DeadLetters(client, "mipos:").list()
        except Exception:  # noqa: BLE001 - mid-failover: ask again on the next round
            letters = []
        return accepted, {str(x.order.get("order_external_id")): x.reason for x in letters}

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.sandbox.stop()
        self.cluster.stop()


def _error_kind(exc: Exception) -> str:
    text = str(exc)
    if "not confirmed as replicated" in text:
        return "not_replicated"
    return type(exc).__name__


def run(options: argparse.Namespace) -> FailoverResult:
    workdir = Path(tempfile.mkdtemp(prefix="mipos-failover-"))
    started = time.monotonic()
    result = FailoverResult(orders=options.orders, replicas_ack=options.replicas_ack)
    bench = FailoverRun(options, workdir)
    try:
        os.environ.update(bench.redis_env)  # the POS side: this process
        for worker in bench.workers:
            worker.wait_ready(timeout=60)
        ids = [str(uuid.uuid4()) for _ in range(options.orders)]
        permanent = set(bench.rng.sample(ids, min(options.permanent, len(ids))))
        result.permanent_orders = len(permanent)
        # Kill moments: random, spread over the enqueueing, the second one the new master.
        span = options.orders / max(1, options.failovers)
        kill_after = sorted(int(span * k + bench.rng.uniform(0.2, 0.8) * span) + 1
                            for k in range(options.failovers))
        bench.enqueue_all(ids, permanent, kill_after)
        progress = Progress("failover: final", total=len(ids), enabled=not options.quiet)
        give_up = started + options.timeout
        while True:
            accepted, dead = bench.outcome()
            final = sum(1 for i in ids if accepted.get(i) or i in dead)
            progress.update(final, f"accepted {len(accepted)}, dead {len(dead)}")
            if final == len(ids):
                break
            if time.monotonic() > give_up:
                result.timed_out = True
                break
            time.sleep(0.5)
        progress.finish()
        result.wall_time_s = round(time.monotonic() - started, 1)
        accepted, dead = bench.outcome()
        stats = bench.sandbox.control.stats()
        result.token_calls, result.refresh_calls = stats["token_calls"], stats["refresh_calls"]
        result.faults_injected = dict(Counter(
            r["fault"] for r in bench.sandbox.control.requests() if r.get("fault")))
        lines = [line for w in bench.workers for line in read_json_lines(w.log_path)]
        tally(result, ids, permanent, accepted, dead, lines)
        result.failovers = bench.failovers
        result.delay_errors = dict(bench.delay_errors)
        for failover in bench.failovers:
            changed = [float(line["at"]) for line in lines if line.get("event") == "redis_master_changed"
                       and line.get("new") == failover.promoted and line.get("at")]
            # One line per worker process that followed (a killed process's replacement has none).
            result.worker_follow_s += [round(at - failover.killed_at, 2) for at in changed]
            result.producer_follow_s += [round(at - failover.killed_at, 2) for at in bench.producer_changes
                                         if failover.killed_at <= at <= failover.killed_at + 120][:1]
        result.producer_back_s = [round(bench.back[i], 2) for i in sorted(bench.back)]
    finally:
        bench.stop()
    return result


def table(result: FailoverResult) -> str:
    header = ("| REDIS_MIN_REPLICAS_ACK | orders | accepted once | accepted twice or more | "
              "dead-lettered (permanent) | wrongly dead-lettered | lost | wall time |")
    row = (f"| {result.replicas_ack} | {result.orders} | {result.accepted_once} | "
           f"{result.accepted_twice_or_more} | {result.dead_lettered_permanent} | "
           f"{result.wrongly_dead_lettered} | {result.lost} | {result.wall_time_s:.1f} s |")
    notes = [
        (f"duplicates: {result.duplicates_after_read_timeout} after a read timeout, "
         f"{result.duplicates_after_worker_loss} after an unknown outcome left by a lost attempt, "
         f"{result.duplicates_unexplained} unexplained (not flagged)"),
        ("failovers: " + "; ".join(
            f"{f.killed} killed, {f.promoted} promoted after {f.promoted_after_s:.1f} s, "
            f"the killed node a replica again after {f.rejoined_after_s:.1f} s" for f in result.failovers)),
        (f"workers followed the new master (SIGKILL -> redis_master_changed): "
         f"{_percentiles(result.worker_follow_s)}"),
        (f"the producer followed: {_percentiles(result.producer_follow_s)}; its next delay() "
         f"returned: {_percentiles(result.producer_back_s)}"),
        ("delay() raised (and was retried): " + (", ".join(
            f"{k} {v}" for k, v in sorted(result.delay_errors.items())) or "never")),
        ("faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(result.faults_injected.items()))),
    ]
    if result.timed_out:
        notes.append("TIMED OUT before every order was final")
    return "\n".join([header, "|---|---|---|---|---|---|---|---|", row, "", *notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--failovers", type=int, default=2, help="masters SIGKILLed, one after another")
    parser.add_argument("--replicas-ack", type=int, default=1, help="REDIS_MIN_REPLICAS_ACK")
    parser.add_argument("--permanent", type=int, default=20, help="orders with a permanent fault")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quiet", action="store_true")
    options = parser.parse_args(argv)
    if options.orders < 1 or options.workers < 1:
        parser.error("--orders and --workers must be at least 1")
    return report(run(options), table, options.json)


if __name__ == "__main__":
    sys.exit(main())
