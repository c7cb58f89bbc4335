"""The operator's pages at fleet size (issue 21, item 3): with 100,000 dead letters and 100,000
recent orders in Redis, a list page and an order page each render in at most 200 ms at p95.

    python -m bench.pages [--letters 100000] [--orders 100000] [--samples 200] [--json PATH]

Starts its own redis-server and the Procfile's ``flower:`` line (which serves the pages), fills
Redis through the owners' write paths (``DeadLetters.add``; an attempt's end as a worker writes
it, ``AttemptPhases.finish``; ``InflightRegistry.register`` for the orders still in flight), then
asks each page over loopback HTTP ``--samples`` times, one request at a time, and prints p50,
p95 and max with the Redis commands each page cost (from ``INFO commandstats``). Everything it
started is ended by PID; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
import requests

from bench.measure import percentile
from support.processes import FlowerProcess, RedisServer, free_port

PREFIX = "mipos:"
GOAL_MS = 200.0
STORES = [str(n) for n in range(1, 51)]
REASONS = ("permanent", "permanent", "attempts", "deadline", "permanent_after_unknown", "invalid")
FILL_THREADS = 8


@dataclass(frozen=True)
class Row:
    page: str
    path: str
    samples: int
    p50_ms: float
    p95_ms: float
    max_ms: float
    commands: float  # Redis commands per request

    @property
    def ok(self) -> bool:
        return self.p95_ms <= GOAL_MS


@dataclass(frozen=True)
class Filled:
    letters: list[tuple[str, float, str, str]]  # (id, failed_at, store, order id), a sample of them
    done_orders: list[tuple[str, str]]
    inflight_orders: list[tuple[str, str]]


def say(text: str) -> None:
    print(f"[bench.pages] {text}", file=sys.stderr, flush=True)


def in_parallel(count: int, work: Callable[[int], Any]) -> list[Any]:
    with ThreadPoolExecutor(FILL_THREADS) as pool:
        return list(pool.map(work, range(count), chunksize=256))


def fill(client: redis.Redis, letters: int, orders: int) -> Filled:
    """Dead letters and orders written as the workers write them."""
    from config.settings import BreakerConfig
    from mipos_worker.order.model import Action, Order
    from mipos_worker.state.inflight import InflightRegistry
    from mipos_worker.state.replication import NO_ACK
    from worker.attempt.record import AttemptRecord
    from worker.state.breaker import CircuitBreaker
    from worker.state.deadletters import DeadLetters
    from worker.state.ledger import OrderLedger
    from worker.state.phases import AttemptPhases

    store = DeadLetters(client, PREFIX)
    ledger = OrderLedger(client, PREFIX, NO_ACK)
    inflight = InflightRegistry(client, PREFIX, 7 * 86400)
    breaker = CircuitBreaker(client, PREFIX, BreakerConfig(False, 5, 0.5, 30.0, 2.0, 200))
    phases = AttemptPhases(client, ledger, inflight, breaker)

    def letter(n: int) -> tuple[str, float, str, str]:
        rng = random.Random(n)
        store_id, order_id = rng.choice(STORES), str(uuid.UUID(int=rng.getrandbits(128), version=4))
        now = time.time()
        attempts = [AttemptRecord(i, now - 5 + i, "retrying" if i < 3 else "failed", 500 if i < 3 else 409,
                                  "Server Error" if i < 3 else "Order not found.",
                                  "transient" if i < 3 else "permanent", 0.1 * i, 4.0).as_dict()
                    for i in range(1, 4)]
        made = store.add(action="deny" if n % 5 == 0 else "accept",
                         order={"delivery_id": str(n), "store_id": store_id, "order_external_id": order_id},
                         reason=REASONS[n % len(REASONS)], error="Order not found.", task_id=str(uuid.uuid4()),
                         enqueued_at=now - 6, attempts=attempts)
        return made.id, made.failed_at, store_id, order_id

    def order(n: int) -> tuple[str, str, bool]:
        rng = random.Random(-n - 1)
        store_id, order_id = rng.choice(STORES), str(uuid.UUID(int=rng.getrandbits(128), version=4))
        the_order = Order(delivery_id=str(n), store_id=store_id, order_external_id=order_id)
        task_id, now = str(uuid.uuid4()), time.time()
        if n % 10 == 0:  # still in flight: registered, one attempt failed, the next one due
            inflight.register(task_id, "mipos.accept_order", the_order.fields(), countdown=30.0)
            record = AttemptRecord(1, now, "retrying", 500, "Server Error", "transient", 0.4, 5.0).as_dict()
            phases.finish(task_id, the_order, records=[record], lock_id=None, clear_sending=True, final=False,
                          breaker_success=False)
            return store_id, order_id, True
        records = [AttemptRecord(1, now, "accepted", 200, elapsed_ms=3.0).as_dict()]
        if n % 5 == 1:
            records.insert(0, AttemptRecord(1, now - 1, "retrying", 500, "Server Error", "transient", 0.2,
                                            5.0).as_dict())
            records[1]["attempt"] = 2
        phases.finish(task_id, the_order, records=records, lock_id=None, clear_sending=True, final=True,
                      breaker_success=False, done=ledger.entry(the_order, Action.ACCEPT, task_id))
        return store_id, order_id, False

    started = time.monotonic()
    made_letters = in_parallel(letters, letter)
    say(f"{letters} dead letters written in {time.monotonic() - started:.1f}s")
    started = time.monotonic()
    made_orders = in_parallel(orders, order)
    say(f"{orders} orders written in {time.monotonic() - started:.1f}s "
        f"(Redis: {client.info('memory')['used_memory_human']})")
    return Filled(letters=made_letters[:: max(1, letters // 2000)],
                  done_orders=[(s, o) for s, o, flying in made_orders if not flying][:2000],
                  inflight_orders=[(s, o) for s, o, flying in made_orders if flying][:2000])


def commands(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def measure(session: requests.Session, base_url: str, client: redis.Redis, page: str,
            paths: Iterator[str], samples: int) -> Row:
    first = next(paths)
    for _ in range(3):  # warm: Flower's template cache, connections
        session.get(base_url + first, timeout=10).raise_for_status()
    times: list[float] = []
    before = commands(client)
    for _ in range(samples):
        path = next(paths)
        started = time.perf_counter()
        answer = session.get(base_url + path, timeout=10)
        times.append((time.perf_counter() - started) * 1000)
        if answer.status_code != 200:
            raise RuntimeError(f"{path} answered {answer.status_code}: {answer.text[:300]}")
    spent = (commands(client) - before - samples) / samples  # (each sample's own INFO is not counted)
    return Row(page, first, samples, statistics.median(times), percentile(times, 95), max(times), max(0.0, spent))


def cycle(values: list[str]) -> Iterator[str]:
    while True:
        yield from random.sample(values, len(values))


def rows(base_url: str, auth: tuple[str, str], client: redis.Redis, filled: Filled, samples: int) -> list[Row]:
    session = requests.Session()
    session.auth = auth
    middle_id, middle_at, _, _ = filled.letters[len(filled.letters) // 2]
    letter_ids = [x[0] for x in filled.letters]
    dead_orders = [(x[2], x[3]) for x in filled.letters]

    def order_paths(orders: list[tuple[str, str]]) -> Iterator[str]:
        return cycle([f"/order?store={s}&id={o}" for s, o in orders])

    plan: list[tuple[str, Iterator[str]]] = [
        ("dead letters: first page", cycle(["/dead-letters"])),
        ("dead letters: a page in the middle", cycle([f"/dead-letters?before={middle_at!r}:{middle_id}"])),
        ("dead letters: reason + store + action", cycle([f"/dead-letters?reason=deadline&store={s}&action=deny"
                                                         for s in STORES])),
        ("dead letters: last hour", cycle(["/dead-letters?since=1h"])),
        ("one dead letter", cycle([f"/dead-letter/{i}" for i in letter_ids])),
        ("order page: accepted", order_paths(filled.done_orders)),
        ("order page: in flight", order_paths(filled.inflight_orders)),
        ("order page: dead-lettered", order_paths(dead_orders)),
        ("find by a part of an id", cycle([f"/orders?q={o[9:18]}" for _, o in filled.done_orders[:200]])),
    ]
    found = []
    for page, paths in plan:
        row = measure(session, base_url, client, page, paths, samples)
        say(f"{page}: p50 {row.p50_ms:.1f} ms, p95 {row.p95_ms:.1f} ms, max {row.max_ms:.1f} ms, "
            f"{row.commands:.0f} Redis commands")
        found.append(row)
    return found


def table(found: list[Row], letters: int, orders: int) -> str:
    title = (f"The operator's pages with {letters:,} dead letters and {orders:,} recent orders in Redis "
             f"(goal: p95 <= {GOAL_MS:.0f} ms)")
    lines = [title, "",
             "| page | p50 ms | p95 ms | max ms | Redis commands | goal |", "|---|---|---|---|---|---|"]
    for row in found:
        lines.append(f"| {row.page} | {row.p50_ms:.1f} | {row.p95_ms:.1f} | {row.max_ms:.1f} | "
                     f"{row.commands:.0f} | {'met' if row.ok else 'MISSED'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--letters", type=int, default=100_000)
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--json", type=Path, help="write the rows there")
    options = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="bench-pages-"))
    password = secrets.token_urlsafe(12)
    server: RedisServer | None = None
    flower: FlowerProcess | None = None
    try:
        server = RedisServer(workdir / "redis")
        filled = fill(server.client, options.letters, options.orders)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")},
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "PYTHONUNBUFFERED": "1", "REDIS_URL": server.url, "FLOWER_BASIC_AUTH": f"bench:{password}",
               "FLOWER_ADDRESS": "127.0.0.1"}
        flower = FlowerProcess(env, workdir / "flower.log", free_port())
        flower.wait_ready()
        found = rows(flower.url, ("bench", password), server.client, filled, options.samples)
        print(table(found, options.letters, options.orders))
        if options.json:
            options.json.write_text(json.dumps({"letters": options.letters, "orders": options.orders,
                                                "goal_p95_ms": GOAL_MS, "rows": [asdict(r) for r in found]},
                                               indent=2))
        return 0 if all(row.ok for row in found) else 1
    finally:
        if flower is not None:
            flower.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
