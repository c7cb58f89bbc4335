"""The chaos run: thousands of orders through faults, SIGKILLed workers and a Redis restart.

    python -m bench.chaos [--orders 2000] [--workers 3] [--kills 10] [--json PATH]

Starts its own Redis (append-only file), the sandbox (random transient faults,
tokens that expire every few seconds, a few orders with a permanent fault) and
worker processes from the Procfile; enqueues the orders; kills a random worker
with SIGKILL every few seconds and starts a new one; restarts Redis once. At
the end it compares the sandbox's record with the dead letters and prints:

| orders | accepted once | accepted twice or more | dead-lettered (permanent) |
| dead-lettered (other) | lost | wall time |

"lost" is neither accepted nor dead-lettered. Only loopback addresses; every
wait is bounded (``--timeout``). ``--failover`` runs the Sentinel failover run
instead (``python -m bench.failover``, with its own options).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cli.progress import Progress
from support.processes import (
    SANDBOX_ENV,
    RedisServer,
    Sandbox,
    WorkerProcess,
    read_json_lines,
)

WORKER_ENV = {
    "MIPOS_TIMEOUT_S": "1",
    "MIPOS_RETRY_BASE_DELAY_S": "0.1",
    "MIPOS_RETRY_MAX_DELAY_S": "1",
    "MIPOS_RETRY_MAX_ATTEMPTS": "40",
    "MIPOS_RETRY_DEADLINE_S": "600",
    "MIPOS_VISIBILITY_TIMEOUT_S": "20",  # the least MIPOS_TIMEOUT_S=1 allows (hop + attempt + margin)
    "WORKER_CONCURRENCY": "4",
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "INFO",
    "PYTHONUNBUFFERED": "1",
}
FAULT_RATES = {"unable_to_get_token": 0.05, "http_500": 0.05, "timeout": 0.01, "drop": 0.03}
TOKEN_TTL_S = 3.0
PERMANENT_FAULT = {"status": 409, "message": "Order not found.", "times": -1}
STORE_ID = "7"


@dataclass
class ChaosResult:
    orders: int
    accepted_once: int = 0
    accepted_twice_or_more: int = 0
    dead_lettered_permanent: int = 0
    dead_lettered_other: int = 0
    lost: int = 0
    wall_time_s: float = 0.0
    wrongly_dead_lettered: int = 0
    permanent_orders: int = 0
    duplicates_after_read_timeout: int = 0
    duplicates_after_worker_loss: int = 0
    duplicates_unexplained: int = 0
    kills: int = 0
    redis_restarts: int = 0
    faults_injected: dict[str, int] = field(default_factory=dict)
    unexplained_duplicates: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    token_calls: int = 0
    refresh_calls: int = 0
    timed_out: bool = False


class Chaos:
    def __init__(self, options: argparse.Namespace, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.rng = random.Random(options.seed)
        self.redis = RedisServer(workdir / "redis", appendonly=True)
        self.sandbox = Sandbox(workdir, "--token-ttl-s", str(TOKEN_TTL_S))
        self.sandbox.control.config(fault_rates=FAULT_RATES, timeout_delay_s=1.5)
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "REDIS_URL": self.redis.url,
            "MIPOS_BASE_URL": self.sandbox.url,
            **SANDBOX_ENV,
            **WORKER_ENV,
        }
        self.workers: list[WorkerProcess] = []
        self.retired: list[WorkerProcess] = []
        self.lock = threading.Lock()
        self.kills = 0
        self.redis_restarts = 0
        self.stop_chaos = threading.Event()

    def start_worker(self) -> WorkerProcess:
        worker = WorkerProcess(self.env, self.workdir / f"worker-{len(self.workers) + len(self.retired)}.log")
        with self.lock:
            self.workers.append(worker)
        return worker

    def enqueue_all(self, ids: list[str], permanent: set[str], quiet: bool) -> None:
        from kombu import Connection

        from tasks import accept_order

        progress = Progress("chaos: enqueued", total=len(ids), enabled=not quiet)
        for n, order_id in enumerate(ids, start=1):
            self.sandbox.control.deliver(STORE_ID, n, order_id)  # the webhook side: now pending
            if order_id in permanent:
                self.sandbox.control.add_faults(order_id, PERMANENT_FAULT)
            while True:  # what a POS does when Redis is briefly away (or use mipos_worker.file_outbox)
                try:
                    with Connection(self.redis.url, transport_options={"socket_timeout": 3}) as conn:
                        accept_order.apply_async(
                            kwargs={"delivery_id": n, "store_id": STORE_ID, "order_external_id": order_id},
                            connection=conn)
                    break
                except Exception:
                    time.sleep(0.2)
            progress.advance()
        progress.finish()

    def chaos_loop(self) -> None:
        """Kill a random worker every few seconds; restart Redis once, after the first kill."""
        while not self.stop_chaos.wait(self.rng.uniform(0.5, 1.5) * self.options.kill_interval):
            if self.kills < self.options.kills:
                with self.lock:
                    victim = self.rng.choice(self.workers)
                    self.workers.remove(victim)
                    self.retired.append(victim)
                victim.kill(signal.SIGKILL)
                self.kills += 1
                self.start_worker()
            if self.kills >= 1 and self.redis_restarts == 0 and self.options.redis_restart:
                self.redis.stop()
                self.redis.start()
                self.redis_restarts += 1

    def outcome(self, ids: list[str]) -> tuple[dict[str, int], dict[str, str]]:
        accepted = {
            v["order_external_id"]: v["accepted"]
            for v in self.sandbox.control.orders()["orders"].values() if v["store_id"] == STORE_ID
        }
        from worker.state.deadletters import DeadLetters

        try:
            letters = DeadLetters(self.redis.client, "mipos:").list()
        except Exception:  # Redis restarting: ask again on the next round
            letters = []
        dead = {str(letter.order.get("order_external_id")): letter.reason for letter in letters}
        return accepted, dead

    def all_logs(self) -> list[dict[str, Any]]:
        lines: list[dict[str, Any]] = []
        for worker in self.workers + self.retired:
            lines += read_json_lines(worker.log_path)
        return lines

    def stop(self) -> None:
        self.stop_chaos.set()
        for worker in self.workers + self.retired:
            worker.stop()
        self.sandbox.stop()
        self.redis.stop()


def run(options: argparse.Namespace) -> ChaosResult:
    workdir = Path(tempfile.mkdtemp(prefix="mipos-chaos-"))
    started = time.monotonic()
    chaos = Chaos(options, workdir)
    result = ChaosResult(orders=options.orders)
    try:
        os.environ["REDIS_URL"] = chaos.redis.url
        for _ in range(options.workers):
            chaos.start_worker()
        for worker in list(chaos.workers):
            worker.wait_ready()
        ids = [str(uuid.uuid4()) for _ in range(options.orders)]
        permanent = set(chaos.rng.sample(ids, min(options.permanent, len(ids))))
        result.permanent_orders = len(permanent)
        killer = threading.Thread(target=chaos.chaos_loop, daemon=True)
        killer.start()
        chaos.enqueue_all(ids, permanent, options.quiet)
        progress = Progress("chaos: final", total=len(ids), enabled=not options.quiet)

        give_up = started + options.timeout
        while True:
            accepted, dead = chaos.outcome(ids)
            final = sum(1 for i in ids if accepted.get(i) or i in dead)
            progress.update(final, f"accepted {len(accepted)}, dead {len(dead)}, kills "
                                   f"{chaos.kills}, redis restarts {chaos.redis_restarts}")
            if final == len(ids) and chaos.kills >= min(options.kills, 1):
                break
            if time.monotonic() > give_up:
                result.timed_out = True
                break
            time.sleep(0.5)
        chaos.stop_chaos.set()
        killer.join(timeout=30)
        progress.finish()
        result.wall_time_s = round(time.monotonic() - started, 1)
        accepted, dead = chaos.outcome(ids)
        stats = chaos.sandbox.control.stats()
        result.token_calls, result.refresh_calls = stats["token_calls"], stats["refresh_calls"]
        result.faults_injected = dict(Counter(
            r["fault"] for r in chaos.sandbox.control.requests() if r.get("fault")))
        tally(result, ids, permanent, accepted, dead, chaos.all_logs())
        result.kills, result.redis_restarts = chaos.kills, chaos.redis_restarts
    finally:
        chaos.stop()
    return result


def tally(result: ChaosResult, ids: list[str], permanent: set[str], accepted: dict[str, int],
          dead: dict[str, str], lines: list[dict[str, Any]]) -> None:
    for order_id in ids:
        count = accepted.get(order_id, 0)
        if count == 1:
            result.accepted_once += 1
        elif count > 1:
            result.accepted_twice_or_more += 1
        elif order_id in dead:
            if dead[order_id] == "permanent":
                result.dead_lettered_permanent += 1
            else:
                result.dead_lettered_other += 1
        else:
            result.lost += 1
        if order_id in dead and order_id not in permanent:
            result.wrongly_dead_lettered += 1
    # Explain each duplicate by what its log lines say about the earlier attempt.
    causes: dict[str, set[str]] = {}
    for line in lines:
        if line.get("event") != "accept_attempt":
            continue
        order_id = str(line.get("order_external_id"))
        if line.get("outcome_unknown"):
            causes.setdefault(order_id, set()).add("read_timeout")
        if line.get("possible_duplicate") and line.get("attempt", 0) > 1:
            causes.setdefault(order_id, set()).add("unknown_before_success")
    interrupted = {str(line.get("order_external_id")) for line in lines
                   if line.get("possible_duplicate")} - {
        order_id for order_id, c in causes.items() if "read_timeout" in c}
    for order_id in ids:
        if accepted.get(order_id, 0) > 1:
            if "read_timeout" in causes.get(order_id, set()):
                result.duplicates_after_read_timeout += 1
            elif order_id in interrupted:
                result.duplicates_after_worker_loss += 1
            else:
                result.duplicates_unexplained += 1
                if len(result.unexplained_duplicates) < 20:  # their lines, for a post-mortem
                    result.unexplained_duplicates[order_id] = [
                        line for line in lines if line.get("order_external_id") == order_id]


def table(result: ChaosResult) -> str:
    header = ("| orders | accepted once | accepted twice or more | dead-lettered (permanent) "
              "| dead-lettered (other) | lost | wall time |")
    row = (f"| {result.orders} | {result.accepted_once} | {result.accepted_twice_or_more} "
           f"| {result.dead_lettered_permanent} | {result.dead_lettered_other} | {result.lost} "
           f"| {result.wall_time_s:.1f} s |")
    notes = [
        f"permanent-fault orders: {result.permanent_orders}; wrongly dead-lettered: "
        f"{result.wrongly_dead_lettered}",
        f"duplicates: {result.duplicates_after_read_timeout} after a read timeout (mipos applied "
        f"the acceptance, the answer was lost), {result.duplicates_after_worker_loss} after a "
        f"worker was lost mid-attempt, {result.duplicates_unexplained} unexplained",
        f"SIGKILLs: {result.kills}; Redis restarts: {result.redis_restarts}; token calls: "
        f"{result.token_calls}; refreshes: {result.refresh_calls}",
        "faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(result.faults_injected.items())),
    ]
    if result.timed_out:
        notes.append("TIMED OUT before every order was final")
    return "\n".join([header, "|---|---|---|---|---|---|---|", row, "", *notes])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--failover" in argv:  # the Sentinel failover run: bench/failover.py, its own options
        from bench.failover import main as failover_main

        return failover_main([a for a in argv if a != "--failover"])
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=3, help="worker processes (Procfile lines)")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs, one every --kill-interval s")
    parser.add_argument("--kill-interval", type=float, default=3.0)
    parser.add_argument("--permanent", type=int, default=20, help="orders with a permanent fault")
    parser.add_argument("--no-redis-restart", dest="redis_restart", action="store_false")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many s")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", type=Path, help="write the figures as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    parser.add_argument("--failover", action="store_true",
                        help="the Sentinel failover run instead (python -m bench.failover --help)")
    options = parser.parse_args(argv)
    if options.orders < 1 or options.workers < 1:
        parser.error("--orders and --workers must be at least 1")

    return report(run(options), table, options.json)


def report(result: Any, render: Callable[[Any], str], json_path: Path | None) -> int:
    """Print the table, write the JSON; exit 0 only with nothing lost and nothing wrongly
    dead-lettered in time (the bar of the chaos and failover runs alike)."""
    print(render(result))
    if json_path:
        json_path.write_text(json.dumps(asdict(result), indent=2))
    ok = result.lost == 0 and result.wrongly_dead_lettered == 0 and not result.timed_out
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
