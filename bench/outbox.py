"""The outbox's cost and latency, beside ``delay()`` in the same run: ``python -m bench.outbox``.

Starts its own Redis, sandbox, PostgreSQL (tests/postgres.py) and one worker
(the Procfile's line). Measures, per order:

- the POS's side: ``outbox.accept`` inside an open transaction; the whole
  transaction (insert the order, accept, commit) beside the same transaction
  without the accept; and ``delay()``; on PostgreSQL and SQLite;
- the latency from the commit to the sandbox receiving the accept, at a steady
  rate, through the relay process (the Procfile-style line, polling) and through
  the in-process relay thread woken after the commit, beside ``delay()``
  returning to the sandbox receiving.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from support.processes import SANDBOX_ENV, RedisServer, Sandbox, WorkerProcess
from tests.outbox_processes import RelayProcess, wait_accepted
from tests.postgres import PostgresServer

STORE_ID = "5"
ACCEPT_PATH = "/api/v1/integration/order/accept"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


class Bench:
    """Redis, the sandbox and workers of the run's own (support/processes.py)."""

    def __init__(self, workdir: Path, quiet: bool) -> None:
        self.workdir, self.quiet, self.started = workdir, quiet, time.monotonic()
        self.redis = RedisServer(workdir / "redis")
        self.sandbox = Sandbox(workdir)
        self.control = self.sandbox.control
        self.env = {**os.environ,
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "REDIS_URL": self.redis.url, "MIPOS_BASE_URL": self.sandbox.url, **SANDBOX_ENV,
                    "LOG_FORMAT": "json", "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
        self.workers: list[WorkerProcess] = []

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True)

    def start_workers(self, pool: str, concurrency: int) -> None:
        self.redis.client.flushall()
        self.control.reset()
        env = {**self.env, "WORKER_POOL": pool, "WORKER_CONCURRENCY": str(concurrency)}
        worker = WorkerProcess(env, self.workdir / f"worker-{uuid.uuid4().hex[:6]}.log")
        self.workers.append(worker)
        worker.wait_ready(timeout=60)

    def accept_times(self) -> dict[str, float]:
        return {r["body"]["order_external_id"]: r["time"]
                for r in self.control.requests(path=ACCEPT_PATH) if r["status"] == 200}

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.sandbox.stop()
        self.redis.stop()


ORDERS = sa.Table("orders", sa.MetaData(), sa.Column("external_id", sa.String(64), primary_key=True))


def fresh_database(url: str) -> sa.Engine:
    from mipos_worker import sql_outbox

    engine = sa.create_engine(url)
    sql_outbox.create_tables(engine)
    ORDERS.create(engine, checkfirst=True)
    return engine


def timed(count: int, step: Callable[[int], None]) -> list[float]:
    """Milliseconds of each of ``count`` calls (after 50 unmeasured warm-up calls)."""
    for n in range(50):
        step(-n - 1)
    times = []
    for n in range(count):
        started = time.perf_counter()
        step(n)
        times.append((time.perf_counter() - started) * 1000)
    return times


def pos_costs(engine: sa.Engine, count: int) -> dict[str, list[float]]:
    from mipos_worker import sql_outbox

    def order_only(_n: int) -> None:
        with engine.begin() as conn:
            conn.execute(sa.insert(ORDERS).values(external_id=str(uuid.uuid4())))

    def order_and_accept(_n: int) -> None:
        order_id = str(uuid.uuid4())
        with engine.begin() as conn:
            conn.execute(sa.insert(ORDERS).values(external_id=order_id))
            sql_outbox.accept(conn, delivery_id=1, store_id=STORE_ID, order_external_id=order_id)

    accept_alone: list[float] = []

    def accept_in_open_transaction(_n: int) -> None:
        order_id = str(uuid.uuid4())
        with engine.begin() as conn:
            conn.execute(sa.insert(ORDERS).values(external_id=order_id))
            started = time.perf_counter()
            sql_outbox.accept(conn, delivery_id=1, store_id=STORE_ID, order_external_id=order_id)
            accept_alone.append((time.perf_counter() - started) * 1000)

    timed(count, accept_in_open_transaction)
    return {"accept": accept_alone[50:], "tx_with": timed(count, order_and_accept),
            "tx_without": timed(count, order_only)}


def delay_cost(count: int) -> list[float]:
    from tasks import accept_order

    return timed(count, lambda n: accept_order.delay(
        delivery_id=1, store_id=STORE_ID, order_external_id=str(uuid.uuid4())))


def steady(rate: float, seconds: float, one: Callable[[], tuple[str, float]]) -> dict[str, float]:
    """``one()`` (returns order id and the time it was committed/enqueued) at ``rate`` a second."""
    done: dict[str, float] = {}
    interval = 1.0 / rate
    next_at = time.perf_counter()
    for _ in range(int(rate * seconds)):
        order_id, at = one()
        done[order_id] = at
        next_at += interval
        pause = next_at - time.perf_counter()
        if pause > 0:
            time.sleep(pause)  # the steady pace being measured
    return done


def latency(bench: Bench, done: dict[str, float]) -> list[float]:
    wait_accepted(bench.control, set(done), timeout=120)
    received = bench.accept_times()
    found = [(received[o] - at) * 1000 for o, at in done.items() if o in received]
    if len(found) < len(done):
        raise RuntimeError(f"{len(done) - len(found)} of {len(done)} orders never reached the sandbox; "
                           f"e.g. {next(o for o in done if o not in received)}, {len(received)} received")
    return found


def commit_one(engine: sa.Engine) -> tuple[str, float]:
    from mipos_worker import sql_outbox

    order_id = str(uuid.uuid4())
    with engine.begin() as conn:
        conn.execute(sa.insert(ORDERS).values(external_id=order_id))
        sql_outbox.accept(conn, delivery_id=1, store_id=STORE_ID, order_external_id=order_id)
    return order_id, time.time()


def run(options: argparse.Namespace) -> list[tuple[str, float, float]]:
    from mipos_worker.sql_outbox import start_relay_thread
    from worker.wiring.celery_app import app

    rows: list[tuple[str, float, float]] = []
    workdir = Path(tempfile.mkdtemp(prefix="mipos-bench-outbox-"))
    bench = Bench(workdir, options.quiet)
    log = bench
    pg = PostgresServer()
    app.conf.broker_url = bench.redis.url
    try:
        pg_url = pg.create_database("pos")
        engines = {"PostgreSQL": fresh_database(pg_url),
                   "SQLite": fresh_database(f"sqlite:///{workdir / 'pos.sqlite3'}")}
        log.say(f"POS-side cost, {options.count} orders each")
        baseline = delay_cost(options.count)
        rows.append(("`delay()` (baseline)", percentile(baseline, 50), percentile(baseline, 99)))
        for name, engine in engines.items():
            costs = pos_costs(engine, options.count)
            rows.append((f"`outbox.accept` in an open transaction, {name}",
                         percentile(costs["accept"], 50), percentile(costs["accept"], 99)))
            rows.append((f"insert order + `outbox.accept` + commit, {name}",
                         percentile(costs["tx_with"], 50), percentile(costs["tx_with"], 99)))
            rows.append((f"insert order + commit (no accept), {name}",
                         percentile(costs["tx_without"], 50), percentile(costs["tx_without"], 99)))
        for engine in engines.values():  # the rows of the cost runs are not part of the latency runs
            with engine.begin() as conn:
                conn.execute(sa.text("DELETE FROM mipos_outbox"))
        bench.redis.client.flushall()

        rate, seconds = options.rate, options.seconds
        bench.start_workers("threads", 16)
        log.say(f"latency to the sandbox at {rate:g}/s for {seconds:g}s: delay()")
        from tasks import accept_order

        def delay_one() -> tuple[str, float]:
            order_id = str(uuid.uuid4())
            accept_order.delay(delivery_id=1, store_id=STORE_ID, order_external_id=order_id)
            return order_id, time.time()

        baseline_latency = latency(bench, steady(rate, seconds, delay_one))
        rows.append(("`delay()` returning → sandbox (baseline)", percentile(baseline_latency, 50),
                     percentile(baseline_latency, 99)))

        engine = engines["PostgreSQL"]
        for poll in ("0.5", "0.1"):
            log.say(f"the same through the relay process (poll {poll} s), PostgreSQL")
            relay = RelayProcess(bench.env, workdir / f"relay-{poll}.log", pg_url, "--poll-interval", poll)
            try:
                by_relay = latency(bench, steady(rate, seconds, lambda: commit_one(engine)))
            finally:
                relay.stop()
            rows.append((f"commit → sandbox, relay process polling every {poll} s",
                         percentile(by_relay, 50), percentile(by_relay, 99)))

        log.say("the same through the in-process relay thread, woken after the commit")
        thread = start_relay_thread(engine, poll_interval_s=1.0, report_every_s=3600.0)
        try:
            done = steady(rate, seconds, lambda: commit_one(engine))
            by_thread = latency(bench, done)
        finally:
            thread.stop()
        rows.append(("commit → sandbox, in-process relay thread + after-commit hook",
                     percentile(by_thread, 50), percentile(by_thread, 99)))
    finally:
        bench.stop()
        pg.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.outbox", description=__doc__)
    parser.add_argument("--count", type=int, default=2000, help="orders per POS-side measure")
    parser.add_argument("--rate", type=float, default=100.0, help="orders a second in the latency runs")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each latency run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--quiet", action="store_true")
    options = parser.parse_args(argv)
    rows = run(options)
    print("| measure (ms) | p50 | p99 |\n|---|---|---|")
    for name, p50, p99 in rows:
        print(f"| {name} | {p50:.3f} | {p99:.3f} |")
    if options.json:
        options.json.write_text(json.dumps([{"measure": n, "p50_ms": a, "p99_ms": b} for n, a, b in rows],
                                           indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
