"""An outage of mipos, with the circuit breaker and without it, in one run.

    python -m bench.outage [--orders 500] [--outage-s 120] [--rate-limit 50] [--json PATH]

For each mode: a fresh Redis state, the sandbox answering every accept with a
500 or a dropped connection for ``--outage-s`` seconds, ``--orders`` orders
enqueued at its start, then mipos healthy again. Reports requests sent during
the outage, the time from recovery until each order is accepted (p50, p99,
max) and the orders that missed their deadline. Default retry settings
(1 s doubling to 60 s, 12 attempts, 600 s deadline); only loopback addresses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from support.processes import SANDBOX_ENV, RedisServer, Sandbox, WorkerProcess, wait_for

ACCEPT_PATH = "/api/v1/integration/order/accept"
DOWN = {"http_500": 0.5, "drop": 1.0}  # every accept fails: half 500s, the rest dropped


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def run_mode(breaker: bool, options: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    redis = RedisServer(workdir / f"redis-{breaker}")
    sandbox = Sandbox(workdir)
    os.environ["REDIS_URL"] = redis.url
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "REDIS_URL": redis.url, "MIPOS_BASE_URL": sandbox.url, **SANDBOX_ENV,
        "MIPOS_TIMEOUT_S": "5", "MIPOS_BREAKER_ENABLED": "true" if breaker else "false",
        "MIPOS_RATE_LIMIT_PER_S": str(options.rate_limit),
        "LOG_FORMAT": "json", "LOG_LEVEL": "INFO",
    }
    workers = [WorkerProcess(env, workdir / f"worker-{breaker}-{n}.log") for n in range(2)]
    try:
        for worker in workers:
            worker.wait_ready(timeout=60)
        from kombu import Connection

        from tasks import accept_order

        sandbox.control.config(fault_rates=DOWN)
        outage_started = time.time()
        ids = [str(uuid.uuid4()) for _ in range(options.orders)]
        with Connection(redis.url) as connection:
            for n, order_id in enumerate(ids):
                sandbox.control.deliver("4", n + 1, order_id)
                accept_order.apply_async(kwargs={"delivery_id": n + 1, "store_id": "4",
                                                 "order_external_id": order_id},
                                         connection=connection)
        while time.time() - outage_started < options.outage_s:
            elapsed = time.time() - outage_started
            sent = len(sandbox.control.requests(path=ACCEPT_PATH))
            if not options.quiet:
                print(f"\r[{'breaker' if breaker else 'no breaker'}] outage {elapsed:5.0f}/"
                      f"{options.outage_s:.0f} s, requests {sent}", end="", file=sys.stderr, flush=True)
            time.sleep(1)  # the outage's length, not synchronisation
        recovered = time.time()
        during = len([r for r in sandbox.control.requests(path=ACCEPT_PATH) if r["time"] < recovered])
        sandbox.control.config(fault_rates={})

        def finished() -> bool:
            accepted = {v["order_external_id"] for v in sandbox.control.orders()["orders"].values()
                        if v["accepted"]}
            if not options.quiet:
                print(f"\r[{'breaker' if breaker else 'no breaker'}] recovering: accepted "
                      f"{len(accepted)}/{len(ids)}\033[K", end="", file=sys.stderr, flush=True)
            return len(accepted) + _dead(redis) >= len(ids)

        wait_for(finished, timeout=options.outage_s + 700, interval=1.0, what="every order final")
        if not options.quiet:
            print(file=sys.stderr)
        first_ok: dict[str, float] = {}
        for r in sandbox.control.requests(path=ACCEPT_PATH):
            if r["status"] == 200:
                order_id = r["body"]["order_external_id"]
                first_ok[order_id] = min(first_ok.get(order_id, r["time"]), r["time"])
        after = [first_ok[o] - recovered for o in ids if o in first_ok]
        return {
            "breaker": breaker,
            "orders": len(ids),
            "requests_during_outage": during,
            "recovery_p50_s": round(percentile(after, 50), 1),
            "recovery_p99_s": round(percentile(after, 99), 1),
            "recovery_max_s": round(max(after), 1),
            "missed_deadline": _dead(redis, reason="deadline"),
            "dead_lettered": _dead(redis),
        }
    finally:
        for worker in workers:
            worker.stop()
        sandbox.stop()
        redis.stop()


def _dead(redis: RedisServer, reason: str | None = None) -> int:
    from worker.state.deadletters import DeadLetters

    letters = DeadLetters(redis.client, "mipos:").list()
    return sum(1 for letter in letters if reason is None or letter.reason == reason)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.outage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=500)
    parser.add_argument("--outage-s", type=float, default=120.0)
    parser.add_argument("--rate-limit", type=int, default=50, help="MIPOS_RATE_LIMIT_PER_S for both modes")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quiet", action="store_true")
    options = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mipos-outage-"))
    results = [run_mode(True, options, workdir), run_mode(False, options, workdir)]
    print("| mode | orders | requests during the outage | recovery → accepted p50 | p99 | max "
          "| missed deadline |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {'breaker' if r['breaker'] else 'no breaker'} | {r['orders']} "
              f"| {r['requests_during_outage']} | {r['recovery_p50_s']} s | {r['recovery_p99_s']} s "
              f"| {r['recovery_max_s']} s | {r['missed_deadline']} |")
    if options.json:
        options.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
