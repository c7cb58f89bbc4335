"""The chaos run: thousands of orders through faults, SIGKILLed workers and a Redis restart.

    python -m bench.chaos [--orders 2000] [--strict] [--mixed] [--kills 10] [--json PATH]

Starts its own Redis (append-only file), the sandbox (random transient faults,
tokens that expire every few seconds, a few orders with a permanent fault) and
worker processes from the Procfile; delivers each order to the sandbox (it is then
pending) and enqueues it; kills a random worker with SIGKILL every few seconds and
starts a new one; restarts Redis once. The sandbox's slow answers (the random
``timeout``) land 1.5 s after they arrive: after the client's 1 s timeout and the
first retry it would have sent, within one call's bound (2 s), so "sent once" is
exercised; a few orders (``--late``) land later than the bound, the documented
exception. At the end it compares the sandbox's record with the dead letters and
explains each order sent twice from the sandbox's request log (bench/chaos_tally.py):

| sandbox | orders | accepted once | accepted twice or more | dead-lettered (permanent) |
| dead-lettered (other) | wrongly dead-lettered | lost | sent twice, by cause | wall time |

``--strict``: the sandbox refuses (409 ``Order not found.``) an accept or deny of an
order that is not pending, so a second request is refused instead of applied.
``--mixed`` (issue 24): a share of the orders get an accept and a deny, in random order,
back to back or up to 3 s apart; half of those have their first request held 0.8 s, and
each SIGKILL waits for a held request; it reports orders both accepted and denied at
mipos (must be 0) and the losers' dead letters ("already accepted ... cannot be
denied afterwards"), which are expected.

"lost" is an order with a task that neither reached mipos nor was dead-lettered. Exits
non-zero if an order is lost, wrongly dead-lettered, sent twice within the bound or
unexplained, or both accepted and denied. Only loopback addresses; every wait is
bounded (``--timeout``); the workers' logs stay in the run's directory (printed).
``--failover`` runs the Sentinel failover run instead (``python -m bench.failover``).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

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
    ACTION_PATHS,
    ChaosResult,
    duplicate_notes,
    keep_record,
    read_snapshot,
    report,
    tally,
    unfinished_tasks,
    wait_for_landings,
)
from bench.worker_pool import WorkerPool
from cli.progress import Progress
from support.processes import RedisServer

HELD_WINDOW_S = 0.6  # a held request that arrived this recently is still waiting for its answer
KILL_WAIT_S = 3.0  # how long a kill waits for a held request (mixed mode) before going anyway
SETTLE_S = 60.0  # after every order is final, how long to wait for the tasks still in flight
LANDINGS_WAIT_S = 10.0  # ... and for the requests still due to land (the late ones: 4 s)


class Chaos:
    def __init__(self, options: argparse.Namespace, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.rng = random.Random(options.seed)
        self.redis = RedisServer(workdir / "redis", appendonly=True)
        self.sandbox = start_sandbox(workdir, strict=options.strict, land_after_s=options.slow_land_after_s,
                                     answer_after_s=options.slow_answer_after_s)
        self.pool = WorkerPool(worker_env(self.sandbox.url, {"REDIS_URL": self.redis.url}), workdir)
        self.kills = 0
        self.kills_mid_request = 0
        self.redis_restarts = 0
        self.stop_chaos = threading.Event()
        self.recent_held: deque[str] = deque(maxlen=20)  # held orders, newest last
        self.plan_held: set[str] = set()

    def publish(self, action: str, kwargs: dict[str, Any]) -> None:
        """Enqueue, retrying while Redis is away (what a POS does, or mipos_worker.file_outbox)."""
        from kombu import Connection

        from tasks import accept_order, deny_order

        task = accept_order if action == "accept" else deny_order
        give_up = time.monotonic() + 60
        while True:
            try:
                with Connection(self.redis.url, transport_options={"socket_timeout": 3}) as conn:
                    task.apply_async(kwargs=kwargs, connection=conn)
                if kwargs["order_external_id"] in self.plan_held:
                    self.recent_held.append(kwargs["order_external_id"])
                return
            except Exception:  # Redis restarting: try again
                if time.monotonic() > give_up:
                    raise
                time.sleep(0.2)

    def enqueue_all(self, plan: Plan) -> None:
        self.plan_held = plan.held
        enqueuer = Enqueuer(plan, self.sandbox, self.publish)
        progress = Progress("chaos: enqueued", total=len(plan.ids), enabled=not self.options.quiet)
        for n, order_id in enumerate(plan.ids, start=1):
            enqueuer.order(n, order_id)
            progress.advance()
        enqueuer.flush(wait=True)
        progress.finish()

    # -- the chaos ---------------------------------------------------------------------

    def chaos_loop(self) -> None:
        """Kill a random worker every few seconds; restart Redis once, after the first kill."""
        while not self.stop_chaos.wait(self.rng.uniform(0.5, 1.5) * self.options.kill_interval):
            if self.kills < self.options.kills:
                if self.options.mixed:
                    self.kills_mid_request += self.wait_for_held_request()
                self.pool.kill_random(self.rng)
                self.kills += 1
            if self.kills >= 1 and self.redis_restarts == 0 and self.options.redis_restart:
                self.redis.stop()
                self.redis.start()
                self.redis_restarts += 1

    def wait_for_held_request(self) -> bool:
        """Until the sandbox holds a request (a worker waits for its answer), bounded."""
        give_up = time.monotonic() + KILL_WAIT_S
        while time.monotonic() < give_up and not self.stop_chaos.is_set():
            if self.held_request():
                return True
            time.sleep(0.05)
        return False

    def held_request(self) -> bool:
        now = time.time()
        for order_id in list(self.recent_held)[-5:]:
            for entry in self.sandbox.control.requests(order_external_id=order_id):
                if (entry.get("path") in ACTION_PATHS and entry.get("status") is None and entry.get("fault")
                        and now - float(entry["time"]) < HELD_WINDOW_S):
                    return True
        return False

    # -- the end -----------------------------------------------------------------------

    def wait_final(self, plan: Plan, result: ChaosResult, give_up: float) -> None:
        """Until every order is final and no task is still in flight (bounded)."""
        progress = Progress("chaos: final", total=len(plan.ids), enabled=not self.options.quiet)
        settled_by: float | None = None
        while True:
            snap = read_snapshot(self.sandbox.control, self.redis.client)
            final = snap.finished(plan)
            inflight = unfinished_tasks(self.redis.client)
            progress.update(final, f"in flight {inflight}, kills {self.kills}, "
                                   f"redis restarts {self.redis_restarts}")
            if final == len(plan.ids) and self.kills >= min(self.options.kills, 1):
                settled_by = settled_by or time.monotonic() + SETTLE_S
                if inflight == 0 or time.monotonic() > settled_by:
                    break
            if time.monotonic() > give_up:
                result.timed_out = True
                break
            time.sleep(0.5)
        progress.finish()

    def stop(self) -> None:
        self.stop_chaos.set()
        self.pool.stop()
        self.sandbox.stop()
        self.redis.stop()


def run(options: argparse.Namespace) -> ChaosResult:
    workdir = Path(tempfile.mkdtemp(prefix="mipos-chaos-"))
    started = time.monotonic()
    chaos = Chaos(options, workdir)
    result = ChaosResult(orders=options.orders, strict=options.strict, mixed=options.mixed,
                         slow_land_after_s=options.slow_land_after_s,
                         slow_answer_after_s=options.slow_answer_after_s, workdir=str(workdir))
    try:
        os.environ["REDIS_URL"] = chaos.redis.url
        chaos.pool.start_ready(options.workers)
        ids = [str(uuid.uuid4()) for _ in range(options.orders)]
        plan = make_plan(chaos.rng, ids, permanent=options.permanent, late=options.late,
                         pair_share=options.pair_share if options.mixed else 0.0,
                         held_share=options.held_share if options.mixed else 0.0)
        killer = threading.Thread(target=chaos.chaos_loop, daemon=True)
        killer.start()
        chaos.enqueue_all(plan)
        chaos.wait_final(plan, result, started + options.timeout)
        chaos.stop_chaos.set()
        killer.join(timeout=30)
        result.wall_time_s = round(time.monotonic() - started, 1)
        finish(result, chaos, plan)
    finally:
        chaos.stop()
    return result


def finish(result: ChaosResult, chaos: Chaos, plan: Plan) -> None:
    wait_for_landings(chaos.sandbox.control, chaos.options.slow_land_after_s, LANDINGS_WAIT_S)
    snap = read_snapshot(chaos.sandbox.control, chaos.redis.client)
    stats = chaos.sandbox.control.stats()
    result.token_calls, result.refresh_calls = stats["token_calls"], stats["refresh_calls"]
    result.unfinished_tasks = unfinished_tasks(chaos.redis.client)
    requests = chaos.sandbox.control.requests()
    keep_record(chaos.workdir, plan, requests)
    tally(result, plan, snap, requests, chaos.pool.lines())
    result.kills, result.kills_mid_request = chaos.kills, chaos.kills_mid_request
    result.redis_restarts = chaos.redis_restarts


# -- the tables ----------------------------------------------------------------------------


def sandbox_mode(result: ChaosResult) -> str:
    return "strict" if result.strict else "lenient"


def table(result: ChaosResult) -> str:
    rows = mixed_rows(result) if result.mixed else plain_rows(result)
    return "\n".join([*rows, "", *notes(result)])


def plain_rows(result: ChaosResult) -> list[str]:
    header = ("| sandbox | orders | accepted once | accepted twice or more | dead-lettered (permanent) "
              "| dead-lettered (other) | wrongly dead-lettered | lost | sent twice: landed within the bound "
              "| landed later | after a lost worker | unexplained | wall time |")
    row = (f"| {sandbox_mode(result)} | {result.orders} | {result.accepted_once} | "
           f"{result.accepted_twice_or_more} | {result.dead_lettered_permanent} | "
           f"{result.dead_lettered_other} | {result.wrongly_dead_lettered} | {result.lost} | "
           f"{result.duplicates_landed_within_bound} | {result.duplicates_landed_late} | "
           f"{result.duplicates_after_worker_loss} | {result.duplicates_unexplained} | "
           f"{result.wall_time_s:.1f} s |")
    return [header, "|" + "---|" * 13, row]


def mixed_rows(result: ChaosResult) -> list[str]:
    header = ("| sandbox | orders | accept and deny both enqueued | pairs ended accepted | pairs ended denied "
              "| both accepted and denied | other action dead-lettered (expected) | "
              "dead-lettered (permanent) | wrongly dead-lettered | lost | sent twice: landed within the "
              "bound | wall time |")
    row = (f"| {sandbox_mode(result)} | {result.orders} | {result.pairs} | {result.pairs_ended_accepted} | "
           f"{result.pairs_ended_denied} | {result.both_accepted_and_denied} | "
           f"{result.other_action_dead_lettered} | {result.dead_lettered_permanent} | "
           f"{result.wrongly_dead_lettered} | {result.lost} | {result.duplicates_landed_within_bound} | "
           f"{result.wall_time_s:.1f} s |")
    return [header, "|" + "---|" * 12, row]


def notes(result: ChaosResult) -> list[str]:
    lines = [
        (f"orders: {result.accepted_once} accepted once, {result.accepted_twice_or_more} twice or more, "
         f"{result.denied_once} denied once, {result.denied_twice_or_more} twice or more; "
         f"permanent-fault orders: {result.permanent_orders}; wrongly dead-lettered: "
         f"{result.wrongly_dead_lettered}"),
        *duplicate_notes(result),
    ]
    if result.mixed:
        lines.append(
            f"pairs: {result.pairs} (first request held: {result.held_orders}); both reached mipos: "
            f"{result.both_reached_mipos} (strict mipos refuses the second); both accepted and denied: "
            f"{result.both_accepted_and_denied} ({result.both_landed_late} after a late landing); losers "
            f"dead-lettered: {result.other_action_dead_lettered} ({result.other_action_refused_by_mipos} "
            f"refused by mipos, the rest by the worker)")
    lines += [
        (f"SIGKILLs: {result.kills}" + (f" ({result.kills_mid_request} while the sandbox held a request)"
                                        if result.mixed else "")
         + f"; Redis restarts: {result.redis_restarts}; token calls: {result.token_calls}; refreshes: "
         f"{result.refresh_calls}; tasks still in flight at the end: {result.unfinished_tasks}"),
        "faults injected: " + ", ".join(f"{k} {v}" for k, v in result.faults_injected.items()),
        f"worker logs: {result.workdir}",
    ]
    if result.timed_out:
        lines.append("TIMED OUT before every order was final")
    return lines


# -- the command line ----------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--orders", type=int, default=2000)
    p.add_argument("--workers", type=int, default=3, help="worker processes (Procfile lines)")
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs, one every --kill-interval s")
    p.add_argument("--kill-interval", type=float, default=3.0)
    p.add_argument("--permanent", type=int, default=20, help="orders with a permanent fault")
    p.add_argument("--late", type=int, default=10,
                   help="orders whose first request lands later than one call's bound (4 s)")
    p.add_argument("--strict", action="store_true",
                   help="the sandbox refuses an accept or deny of an order that is not pending")
    p.add_argument("--mixed", action="store_true", help="accept and deny tasks of the same orders")
    p.add_argument("--pair-share", type=float, default=0.3, help="--mixed: orders given both")
    p.add_argument("--held-share", type=float, default=0.5,
                   help="--mixed: pairs whose first request is held 0.8 s (killed mid-request)")
    p.add_argument("--slow-land-after-s", type=float, default=SLOW_LAND_AFTER_S,
                   help="the random timeout lands this long after arriving")
    p.add_argument("--slow-answer-after-s", type=float, default=SLOW_ANSWER_AFTER_S,
                   help="... and is answered this long after")
    p.add_argument("--no-redis-restart", dest="redis_restart", action="store_false")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many s")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", type=Path, help="write the figures as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--failover", action="store_true",
                   help="the Sentinel failover run instead (python -m bench.failover --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--failover" in argv:  # the Sentinel failover run: bench/failover.py, its own options
        from bench.failover import main as failover_main

        return failover_main([a for a in argv if a != "--failover"])
    p = parser()
    options = p.parse_args(argv)
    if options.orders < 1 or options.workers < 1:
        p.error("--orders and --workers must be at least 1")
    return report(run(options), table, options.json)


if __name__ == "__main__":
    sys.exit(main())
