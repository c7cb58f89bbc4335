"""Benchmarks, each figure side by side with a baseline measured in the same run.

    python -m bench [--orders 2000] [--smoke] [--json PATH]

Starts its own Redis, the sandbox (with an injected response latency) and
workers as the Procfile starts them, then measures:

- throughput: acceptances per second for N orders at latency 0, 50 and 200 ms,
  against a bare ``requests.Session``-per-thread pool of the same concurrency;
- enqueue cost in the POS: ``accept_order.delay()`` p50/p99 against a raw LPUSH
  of a message of the same size;
- queue latency: ``delay()`` returning → the sandbox receiving the request, at a
  steady rate;
- token economy: token and refresh calls on a cold start, and while tokens expire
  every few seconds, against the logical minimum;
- cost: worker CPU milliseconds per acceptance and peak RSS per process;
- pools: the throughput row for prefork and threads (and gevent when installed).

Only loopback addresses; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from bench.processes import SANDBOX_ENV, RedisServer, Sandbox, WorkerProcess, wait_for
from cli.progress import Progress

ACCEPT_PATH = "/api/v1/integration/order/accept"
STORE_ID = "5"


@dataclass
class Row:
    key: str
    label: str
    unit: str
    ours: float | None
    baseline: float | None
    higher_is_better: bool = True
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.baseline in (None, 0):
            return None
        return round(self.ours / self.baseline, 3)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


class PhaseLog:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, options: argparse.Namespace, workdir: Path, progress: PhaseLog) -> None:
        self.options = options
        self.workdir = workdir
        self.progress = progress
        self.redis = RedisServer(workdir / "redis")
        self.sandbox = Sandbox(workdir)
        self.control = self.sandbox.control
        os.environ["REDIS_URL"] = self.redis.url
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "REDIS_URL": self.redis.url,
            "MIPOS_BASE_URL": self.sandbox.url,
            **SANDBOX_ENV,
            "MIPOS_TIMEOUT_S": "10",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",  # as in production: one line per attempt
            "PYTHONUNBUFFERED": "1",
        }
        self.workers: list[WorkerProcess] = []

    # -- processes ----------------------------------------------------------

    def fresh(self, latency_ms: float = 0.0, **sandbox_config: Any) -> None:
        self.stop_workers()
        self.redis.client.flushall()
        self.control.reset()
        self.control.config(latency_ms=latency_ms, **sandbox_config)

    def start_workers(self, pool: str, concurrency: int, processes: int = 1) -> None:
        env = {**self.env, "WORKER_POOL": pool, "WORKER_CONCURRENCY": str(concurrency)}
        for _ in range(processes):
            worker = WorkerProcess(env, self.workdir / f"worker-{uuid.uuid4().hex[:6]}.log")
            self.workers.append(worker)
        for worker in self.workers:
            worker.wait_ready(timeout=60)

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []

    def stop(self) -> None:
        self.stop_workers()
        self.sandbox.stop()
        self.redis.stop()

    # -- helpers --------------------------------------------------------------

    def enqueue(self, count: int) -> dict[str, float]:
        from tasks import accept_order

        returned = {}
        for n in range(count):
            order_id = str(uuid.uuid4())
            accept_order.delay(delivery_id=n + 1, store_id=STORE_ID, order_external_id=order_id)
            returned[order_id] = time.time()
        return returned

    def wait_accepted(self, count: int, timeout: float) -> None:
        progress = Progress("bench: accepted", total=count,
                            enabled=count > 1 and not self.progress.quiet)

        def all_accepted() -> bool:
            accepted = int(self.control.stats()["accepted_orders"])
            progress.update(accepted)
            return accepted >= count
        wait_for(all_accepted, timeout=timeout, interval=0.1, what=f"{count} acceptances")
        progress.finish()

    def accept_times(self) -> dict[str, float]:
        return {r["body"]["order_external_id"]: r["time"]
                for r in self.control.requests(path=ACCEPT_PATH) if r["status"] == 200}

    def worker_cpu_s(self) -> float:
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for pid in self._worker_pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError):
                continue
        return total

    def worker_peak_rss_mb(self) -> float:
        peak = 0.0
        for pid in self._worker_pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024)
            except OSError:
                continue
        return round(peak, 1)

    def _worker_pids(self) -> list[int]:
        groups = {w.proc.pid for w in self.workers}
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    if int(fields[2]) in groups:  # process group
                        pids.append(int(entry.name))
                except (OSError, IndexError):
                    continue
        return pids

    # -- measurements ------------------------------------------------------------

    def throughput(self, latency_ms: float, pool: str, concurrency: int,
                   orders: int) -> tuple[float, float, float, float]:
        """(ours/s, baseline/s, worker CPU ms per acceptance, peak RSS MB)."""
        self.fresh(latency_ms)
        self.start_workers(pool, concurrency)
        self.enqueue(1)  # warm: token, connections
        self.wait_accepted(1, timeout=30)
        cpu_before = self.worker_cpu_s()
        started = time.time()
        self.enqueue(orders)
        self.wait_accepted(orders + 1, timeout=120 + orders * (latency_ms / 1000 + 0.02) * 2)
        last = max(self.accept_times().values())
        ours = orders / (last - started)
        cpu_ms = (self.worker_cpu_s() - cpu_before) * 1000 / orders
        rss = self.worker_peak_rss_mb()
        self.stop_workers()
        baseline = self.baseline_throughput(concurrency, orders)
        return round(ours, 1), round(baseline, 1), round(cpu_ms, 2), rss

    def baseline_throughput(self, concurrency: int, orders: int) -> float:
        token = requests.post(self.sandbox.url + "/api/oauth/token", timeout=10, json={
            "client_id": SANDBOX_ENV["MIPOS_CLIENT_ID"], "client_secret": SANDBOX_ENV["MIPOS_CLIENT_SECRET"],
            "grant_type": "client_credentials", "email": SANDBOX_ENV["MIPOS_EMAIL"],
            "password": SANDBOX_ENV["MIPOS_PASSWORD"]}).json()["data"]["token"]
        local = threading.local()

        def post(n: int) -> int:
            session = getattr(local, "session", None)
            if session is None:
                session = local.session = requests.Session()
            body = {"delivery_id": str(n), "store_id": STORE_ID, "order_external_id": str(uuid.uuid4())}
            return session.post(self.sandbox.url + ACCEPT_PATH, json=body, timeout=(10, 10),
                                headers={"Authorization": f"Bearer {token}"}).status_code

        started = time.time()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            statuses = list(pool.map(post, range(orders)))
        elapsed = time.time() - started
        assert statuses.count(200) == orders, "the baseline's requests must all succeed"
        return orders / elapsed

    def enqueue_cost(self, calls: int) -> tuple[list[float], list[float]]:
        from tasks import accept_order

        self.fresh()
        ours = []
        for n in range(calls):
            order_id = str(uuid.uuid4())
            t0 = time.perf_counter()
            accept_order.delay(delivery_id=n, store_id=STORE_ID, order_external_id=order_id)
            ours.append((time.perf_counter() - t0) * 1000)
        message = self.redis.client.lindex("mipos", 0)
        client = self.redis.client
        raw = []
        for _ in range(calls):
            t0 = time.perf_counter()
            client.lpush("bench:raw", message)
            raw.append((time.perf_counter() - t0) * 1000)
        return ours, raw

    def queue_latency(self, rate: float, seconds: float, pool: str, concurrency: int) -> list[float]:
        self.fresh()
        self.start_workers(pool, concurrency)
        self.enqueue(1)
        self.wait_accepted(1, timeout=30)
        returned: dict[str, float] = {}
        interval = 1.0 / rate
        next_at = time.perf_counter()
        for _ in range(int(rate * seconds)):
            returned.update(self.enqueue(1))
            next_at += interval
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)  # the steady pace being measured, not synchronisation
        self.wait_accepted(len(returned) + 1, timeout=60)
        received = self.accept_times()
        self.stop_workers()
        return [(received[o] - returned[o]) * 1000 for o in returned if o in received]

    def token_economy(self, cold_orders: int, ttl_s: float, stream_s: float, pool: str,
                      concurrency: int) -> tuple[int, int, int, int]:
        """(cold-start calls, 1; calls during the expiring run, rotations needed)."""
        self.fresh()
        self.start_workers(pool, concurrency, processes=2)
        self.enqueue(cold_orders)
        self.wait_accepted(cold_orders, timeout=120)
        stats = self.control.stats()
        cold = stats["token_calls"] + stats["refresh_calls"]
        self.stop_workers()

        self.fresh(token_ttl_s=ttl_s)
        self.start_workers(pool, concurrency, processes=2)
        started = time.time()
        sent = 0
        while time.time() - started < stream_s:
            self.enqueue(5)
            sent += 5
            time.sleep(0.1)  # a steady stream across several token lifetimes
        self.wait_accepted(sent, timeout=60)
        elapsed = time.time() - started
        stats = self.control.stats()
        during = stats["token_calls"] + stats["refresh_calls"]
        self.stop_workers()
        return cold, 1, during, 1 + int(elapsed // ttl_s)


def gevent_available() -> bool:
    try:
        import gevent  # noqa: F401
    except ImportError:
        return False
    return True


def run(options: argparse.Namespace) -> list[Row]:
    progress = PhaseLog(options.quiet)
    workdir = Path(tempfile.mkdtemp(prefix="mipos-bench-"))
    bench = Bench(options, workdir, progress)
    rows: list[Row] = []
    smoke = options.smoke
    orders = 40 if smoke else options.orders
    pool, concurrency = options.pool, options.concurrency
    try:
        for latency in ([0] if smoke else [0, 50, 200]):
            progress.say(f"throughput at {latency} ms, {pool} x{concurrency}, {orders} orders")
            ours, base, cpu_ms, rss = bench.throughput(latency, pool, concurrency, orders)
            rows.append(Row(f"throughput_{latency}ms",
                            f"acceptances/s, latency {latency} ms ({pool} x{concurrency})",
                            "1/s", ours, base))
            if latency == 0:
                rows.append(Row("cpu_ms_per_acceptance", "worker CPU ms per acceptance (latency 0)",
                                "ms", cpu_ms, None, higher_is_better=False))
                rows.append(Row("peak_rss_mb", "peak RSS per worker process", "MB", rss, None,
                                higher_is_better=False))
        others = [("prefork", 8), ("threads", 16)] + ([("gevent", 64)] if gevent_available() else [])
        for other, other_concurrency in others:
            if (other, other_concurrency) == (pool, concurrency):
                continue
            progress.say(f"throughput at 50 ms, {other} x{other_concurrency}")
            ours, base, _, rss = bench.throughput(0 if smoke else 50, other, other_concurrency, orders)
            rows.append(Row(f"pool_{other}_{other_concurrency}",
                            f"{other} x{other_concurrency}: acceptances/s "
                            f"(latency {0 if smoke else 50} ms; peak RSS per process {rss} MB)",
                            "1/s", ours, base))
        if not gevent_available():
            rows.append(Row("pool_gevent", "gevent: not installed (pip install gevent)", "1/s", None, None))

        calls = 200 if smoke else 10_000
        progress.say(f"enqueue cost, {calls} calls")
        ours_ms, raw_ms = bench.enqueue_cost(calls)
        rows.append(Row("enqueue_p50_ms", "delay() p50 vs raw LPUSH", "ms",
                        round(percentile(ours_ms, 50), 3), round(percentile(raw_ms, 50), 3), False))
        rows.append(Row("enqueue_p99_ms", "delay() p99 vs raw LPUSH", "ms",
                        round(percentile(ours_ms, 99), 3), round(percentile(raw_ms, 99), 3), False))

        rate, seconds = (20.0, 1.0) if smoke else (100.0, 20.0)
        progress.say(f"queue latency at {rate:.0f} orders/s for {seconds:.0f} s")
        latencies = bench.queue_latency(rate, seconds, pool, concurrency)
        rows.append(Row("queue_latency_p50_ms", f"delay() → sandbox, p50 at {rate:.0f}/s", "ms",
                        round(percentile(latencies, 50), 2), None, False))
        rows.append(Row("queue_latency_p99_ms", f"delay() → sandbox, p99 at {rate:.0f}/s", "ms",
                        round(percentile(latencies, 99), 2), None, False,
                        note=f"mean {statistics.mean(latencies):.2f} ms over {len(latencies)} orders"))

        cold_n, ttl, stream = (50, 1.0, 3.0) if smoke else (500, 5.0, 20.0)
        progress.say(f"token economy: {cold_n} orders cold, then tokens expiring every {ttl:.0f} s")
        cold, cold_min, during, needed = bench.token_economy(cold_n, ttl, stream, pool, concurrency)
        rows.append(Row("token_calls_cold_start", f"token+refresh calls, {cold_n} orders cold, 2 processes",
                        "calls", cold, cold_min, False))
        rows.append(Row("token_calls_expiring", f"token+refresh calls, token expiring every {ttl:.0f} s",
                        "calls", during, needed, False, note="baseline: the logical minimum"))
    finally:
        bench.stop()
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| measure | ours | baseline | ratio |", "|---|---|---|---|"]
    def show(value: float | None, unit: str) -> str:
        return "–" if value is None else f"{value:g} {unit}"

    for row in rows:
        ratio = "–" if row.ratio is None else f"{row.ratio:.2f}"
        lines.append(f"| {row.label} | {show(row.ours, row.unit)} | {show(row.baseline, row.unit)} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--pool", default="threads", help="the worker's pool (the Procfile's default)")
    parser.add_argument("--concurrency", type=int, default=16, help="the pool's size (the Procfile's default)")
    parser.add_argument("--smoke", action="store_true", help="a few dozen orders: checks it runs")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quiet", action="store_true")
    options = parser.parse_args(argv)
    rows = run(options)
    print(table(rows))
    if options.json:
        options.json.write_text(json.dumps(
            {row.key: {"label": row.label, "unit": row.unit, "ours": row.ours,
                       "baseline": row.baseline, "ratio": row.ratio} for row in rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
