"""The outbox's cost and latency, beside ``delay()`` in the same run: ``python -m bench.outbox``.

Starts its own Redis, sandbox, PostgreSQL (tests/postgres.py) and one worker
(the Procfile's line). Measures, per order:

- the POS's side: ``outbox.accept`` inside an open transaction; the whole
  transaction (insert the order, accept, commit) beside the same transaction
  without the accept; and ``delay()``; on PostgreSQL and SQLite;
- a backlog: ``--backlog`` rows (100,000: a busy site's hour without Redis)
  committed at once, then the time one relay process takes to put them all on
  the queue (no worker consumes meanwhile), and its CPU per row;
- the latency from the commit to the sandbox receiving the accept, at a steady
  rate: through the relay process woken by PostgreSQL's NOTIFY, alternating
  ``--repeats`` times with ``delay()`` returning to the sandbox receiving (the
  peer: median and [min–max] of the ratio); then once each through the relay
  process polling (``--no-listen``) and the in-process relay thread woken after
  the commit.

``--smoke`` runs every row small (the test suite's bench smoke test).
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

from bench.measure import MachineCpu, percentile, process_cpu_s
from bench.report import Goal, Row, table
from support.processes import SANDBOX_ENV, RedisServer, Sandbox, WorkerProcess, wait_for
from tests.outbox_processes import RelayProcess, wait_accepted
from tests.postgres import PostgresServer

STORE_ID = "5"
ACCEPT_PATH = "/api/v1/integration/order/accept"


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


class Results:
    """The POS-side figures (p50/p99 of one run) and the rows beside a peer (bench/report.py)."""

    def __init__(self) -> None:
        self.single: dict[str, tuple[str, float, float]] = {}  # key → (label, p50 ms, p99 ms)
        self.rows: list[Row] = []

    def add(self, key: str, label: str, values: list[float]) -> None:
        self.single[key] = (label, percentile(values, 50), percentile(values, 99))

    def as_json(self) -> dict[str, object]:
        found: dict[str, object] = {key: {"label": label, "p50_ms": p50, "p99_ms": p99}
                                    for key, (label, p50, p99) in self.single.items()}
        found.update({row.key: row.as_json() for row in self.rows})
        return found


def insert_backlog(engine: sa.Engine, rows: int) -> None:
    """``rows`` outbox rows as the writer makes them, committed in one statement (PostgreSQL)."""
    with engine.begin() as conn:
        conn.execute(sa.text("""
            INSERT INTO mipos_outbox (task_id, action, arguments, created_at, tries)
            SELECT gen_random_uuid()::text, 'accept',
                   json_build_object('delivery_id', n::text, 'store_id', CAST(:store AS TEXT),
                                     'order_external_id', gen_random_uuid()::text)::text,
                   CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION), 0
            FROM generate_series(1, :rows) AS n"""), {"rows": rows, "store": STORE_ID})


def backlog_drain(bench: Bench, engine: sa.Engine, pg_url: str, rows: int) -> tuple[float, float, float]:
    """Seconds from starting one relay process to every row on the queue; its CPU ms per row;
    the machine's idle share meanwhile. No worker runs: the queue only grows."""
    bench.redis.client.flushall()
    insert_backlog(engine, rows)
    machine = MachineCpu.read()
    started = time.monotonic()
    relay = RelayProcess(bench.env, bench.workdir / f"relay-backlog-{uuid.uuid4().hex[:6]}.log", pg_url,
                         "--poll-interval", "0.5", "--report-every", "3600s")  # the defaults
    try:
        wait_for(lambda: bench.redis.client.llen("mipos") >= rows, timeout=max(120.0, rows / 200),
                 interval=0.05, what=f"{rows} rows on the queue")
        took = time.monotonic() - started
        cpu_s = process_cpu_s(relay.proc.pid)
    finally:
        relay.stop()
    idle = MachineCpu.read().idle_share_since(machine)
    bench.redis.client.flushall()
    with engine.begin() as conn:
        left = conn.execute(sa.text("SELECT count(*) FROM mipos_outbox")).scalar_one()
    if left:
        raise RuntimeError(f"{left} rows left in the outbox after the drain")
    return took, cpu_s * 1000 / rows, idle


def relay_latency(bench: Bench, engine: sa.Engine, pg_url: str, rate: float, seconds: float,
                  *extra: str) -> list[float]:
    """Commit → sandbox through a relay process started for this run (ready before the first
    commit: listening, or past its first poll)."""
    relay = RelayProcess(bench.env, bench.workdir / f"relay-{uuid.uuid4().hex[:6]}.log", pg_url, *extra)
    ready = "outbox_backlog" if "--no-listen" in extra else "outbox_listening"
    try:
        wait_for(lambda: any(line.get("event") == ready for line in relay.lines()), timeout=30,
                 what=f"the relay's {ready} line")
        return latency(bench, steady(rate, seconds, lambda: commit_one(engine)))
    finally:
        relay.stop()


def run(options: argparse.Namespace) -> Results:
    from mipos_worker.sql_outbox import start_relay_thread
    from worker.wiring.celery_app import app

    results = Results()
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
        results.add("delay", "`delay()` (baseline)", delay_cost(options.count))
        for name, engine in engines.items():
            costs = pos_costs(engine, options.count)
            db = name.lower()
            results.add(f"accept_{db}", f"`outbox.accept` in an open transaction, {name}", costs["accept"])
            results.add(f"transaction_with_accept_{db}", f"insert order + `outbox.accept` + commit, {name}",
                        costs["tx_with"])
            results.add(f"transaction_without_accept_{db}", f"insert order + commit (no accept), {name}",
                        costs["tx_without"])
        for engine in engines.values():  # the rows of the cost runs are not part of the latency runs
            with engine.begin() as conn:
                conn.execute(sa.text("DELETE FROM mipos_outbox"))
        bench.redis.client.flushall()

        engine = engines["PostgreSQL"]
        log.say(f"backlog: {options.backlog} committed rows to the queue, one relay process")
        took, cpu_ms, idle = backlog_drain(bench, engine, pg_url, options.backlog)
        log.say(f"  {took:.1f} s ({options.backlog / took:.0f} rows/s), relay CPU {cpu_ms:.3f} ms a row")
        results.rows.append(Row(
            "outbox_backlog_drain_s", f"{options.backlog:,} committed rows → the queue, one relay process "
            "(PostgreSQL, default batch of 100, no worker consuming)", "s", [round(took, 2)], [], "",
            Goal("ours", "<=", 60.0) if options.backlog == 100_000 else None, [idle],
            note=f"{options.backlog / took:.0f} rows/s; the relay's CPU {cpu_ms:.3f} ms a row"))

        rate, seconds = options.rate, options.seconds
        bench.start_workers("threads", 16)
        from tasks import accept_order

        def delay_one() -> tuple[str, float]:
            order_id = str(uuid.uuid4())
            accept_order.delay(delivery_id=1, store_id=STORE_ID, order_external_id=order_id)
            return order_id, time.time()

        runs: dict[str, list[list[float]]] = {"delay": [], "listen": []}
        idle_runs: list[float] = []
        for n in range(options.repeats):
            log.say(f"latency to the sandbox at {rate:g}/s for {seconds:g}s: delay() (run {n + 1} of "
                    f"{options.repeats})")
            machine = MachineCpu.read()
            runs["delay"].append(latency(bench, steady(rate, seconds, delay_one)))
            log.say("  the same through the relay process woken by NOTIFY, PostgreSQL")
            runs["listen"].append(relay_latency(bench, engine, pg_url, rate, seconds, "--poll-interval", "0.5"))
            idle_runs.append(MachineCpu.read().idle_share_since(machine))
        for p, goal in ((50, 20.0), (99, 100.0)):
            results.rows.append(Row(
                f"outbox_listen_latency_p{p}_ms",
                f"commit → sandbox, p{p}, relay process woken by NOTIFY (PostgreSQL), at {rate:g}/s", "ms",
                [round(percentile(r, p), 3) for r in runs["listen"]],
                [round(percentile(r, p), 3) for r in runs["delay"]], "`delay()` returning → sandbox",
                Goal("ours", "<=", goal), idle_runs))
        results.add("delay_latency", "`delay()` returning → sandbox (baseline, last run)", runs["delay"][-1])
        results.add("relay_listen_latency", "commit → sandbox, relay process woken by NOTIFY (last run)",
                    runs["listen"][-1])

        for poll in ("0.5", "0.1"):
            log.say(f"the same through the relay process polling every {poll} s (--no-listen), PostgreSQL")
            by_relay = relay_latency(bench, engine, pg_url, rate, seconds, "--poll-interval", poll, "--no-listen")
            results.add(f"relay_poll_{poll.replace('.', '_')}_latency",
                        f"commit → sandbox, relay process polling every {poll} s (--no-listen)", by_relay)

        log.say("the same through the in-process relay thread, woken after the commit")
        thread = start_relay_thread(engine, poll_interval_s=1.0, report_every_s=3600.0)
        try:
            by_thread = latency(bench, steady(rate, seconds, lambda: commit_one(engine)))
        finally:
            thread.stop()
        results.add("relay_thread_latency", "commit → sandbox, in-process relay thread + after-commit hook",
                    by_thread)
    finally:
        bench.stop()
        pg.stop()
    return results


SMOKE = {"count": 100, "rate": 50.0, "seconds": 2.0, "repeats": 1, "backlog": 2000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.outbox", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000, help="orders per POS-side measure")
    parser.add_argument("--rate", type=float, default=100.0, help="orders a second in the latency runs")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each latency run")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating runs of delay() and the NOTIFY relay (default 3)")
    parser.add_argument("--backlog", type=int, default=100_000, help="rows of the backlog row")
    parser.add_argument("--smoke", action="store_true",
                        help="every row small: " + ", ".join(f"--{k} {v:g}" for k, v in SMOKE.items()))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--quiet", action="store_true")
    options = parser.parse_args(argv)
    if options.smoke:
        for name, value in SMOKE.items():
            setattr(options, name, type(getattr(options, name))(value))
    started = time.monotonic()
    results = run(options)
    print("| measure (ms) | p50 | p99 |\n|---|---|---|")
    for label, p50, p99 in results.single.values():
        print(f"| {label} | {p50:.3f} | {p99:.3f} |")
    print()
    print(table(results.rows))
    print(f"\n{time.monotonic() - started:.0f} s; python -m bench.outbox "
          + " ".join(argv if argv is not None else sys.argv[1:]))
    if options.json:
        options.json.write_text(json.dumps(results.as_json(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
