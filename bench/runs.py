"""One measured run of each kind, on a machine left to the system under test while it lasts.

A throughput run is laid out so that nothing but the system costs CPU while it
is measured: the orders are enqueued first and parked under another key, the
workers start and take one order (token, connections), then the parked queue
is renamed back in one Redis command and the bench only polls a counter twice a
second until every order is accepted. CPU, Redis's counters and the machine's
idle share are read at both ends; the request records are read afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests

from bench import measure
from bench.measure import MachineCpu
from bench.systems import STORE_ID, System
from support.processes import (
    ROOT,
    SANDBOX_ENV,
    RedisServer,
    Sandbox,
    WorkerProcess,
    wait_for,
)

ACCEPT_PATH = "/api/v1/integration/order/accept"
HELD_KEY = "bench:held"
POLL_S = 0.5  # the only thing the bench does while a run is measured
HOUR_S = 3600.0


@dataclass
class RunResult:
    rate: float  # acceptances per second, first to last acceptance
    cpu_ms: float  # the system's own CPU per acceptance (workers, or the bare client)
    idle: float  # the machine's idle CPU share during the run
    commands: dict[str, int] = field(default_factory=dict)  # producer + workers, whole run
    redis_cpu_ms: float = 0.0  # per acceptance
    memory: measure.Memory = field(default_factory=dict)  # what outlives an hour, by key kind
    rss_mb: float = 0.0
    server_cpu_s: float = 0.0
    requests: int = 0
    redis_core_share: float = 0.0  # Redis's CPU seconds / wall seconds, queue released → last answer

    def per_order(self, orders: int) -> tuple[float, float]:
        """(Redis commands, bytes held beyond an hour) per order."""
        return (sum(self.commands.values()) / orders,
                sum(size for _, size, _ in self.memory.values()) / orders)


class Bench:
    def __init__(self, workdir: Path, say: Any) -> None:
        self.workdir = workdir
        self.say = say
        self.redis = RedisServer(workdir / "redis")
        self.sandbox = Sandbox(workdir)  # the full sandbox: token economy
        self.fast = Sandbox(workdir, "--fast")  # throughput and latency rows
        os.environ["REDIS_URL"] = self.redis.url
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "REDIS_URL": self.redis.url,
            **SANDBOX_ENV,
            "MIPOS_TIMEOUT_S": "10",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",  # as in production: one line per attempt
            "PYTHONUNBUFFERED": "1",
        }
        self.workers: list[WorkerProcess] = []

    # -- processes --------------------------------------------------------------

    def fresh(self, sandbox: Sandbox, latency_ms: float = 0.0, **config: Any) -> None:
        self.stop_workers()
        self.redis.client.flushall()
        sandbox.control.reset()
        sandbox.control.config(latency_ms=latency_ms, **config)

    def start(self, system: System, sandbox: Sandbox, pool: str, concurrency: int,
              processes: int = 1) -> None:
        env = {**self.env, "MIPOS_BASE_URL": sandbox.url}
        self.workers = [system.start(env, pool, concurrency, self.workdir) for _ in range(processes)]
        for worker in self.workers:
            worker.wait_ready(timeout=90)

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []

    def stop(self) -> None:
        self.stop_workers()
        self.fast.stop()
        self.sandbox.stop()
        self.redis.stop()

    def _pgids(self) -> set[int]:
        return {worker.proc.pid for worker in self.workers}

    def wait_accepted(self, sandbox: Sandbox, count: int, timeout: float, interval: float = POLL_S) -> None:
        wait_for(lambda: int(sandbox.control.stats()["accepted_orders"]) >= count,
                 timeout=timeout, interval=interval, what=f"{count} acceptances")

    def send(self, system: System, count: int) -> dict[str, float]:
        """delay() ``count`` orders; {order id: when delay() returned}."""
        returned = {}
        for n in range(count):
            order_id = str(uuid.uuid4())
            system.send(n + 1, order_id)
            returned[order_id] = time.time()
        return returned

    def accept_times(self, sandbox: Sandbox) -> dict[str, float]:
        return {r["body"]["order_external_id"]: r["time"]
                for r in sandbox.control.requests(path=ACCEPT_PATH) if r["status"] == 200}

    # -- throughput, CPU, Redis -------------------------------------------------------

    def start_parked(self, system: System, pool: str, concurrency: int, processes: int,
                     client: redis.Redis) -> None:
        """Park the enqueued orders under another key (renamed on ``client``), start the
        workers and warm each with one order; the caller renames the queue back to release them."""
        client.rename(system.queue, HELD_KEY)
        self.start(system, self.fast, pool, concurrency, processes)
        self.send(system, processes)  # warm: the token, the first connections
        self.wait_accepted(self.fast, processes, timeout=60, interval=0.1)

    def system_run(self, system: System, latency_ms: float, pool: str, concurrency: int,
                   orders: int, processes: int = 1) -> RunResult:
        """``processes`` workers, each its own process group, their CPU summed; one warm-up
        order each (Redis hands blocked BRPOPs messages first come, first served)."""
        client = self.redis.client
        self.fresh(self.fast, latency_ms)
        client.config_resetstat()
        memory_before = measure.long_lived_memory(client, HOUR_S)
        self.send(system, orders)
        produced = measure.commandstats(client)
        self.start_parked(system, pool, concurrency, processes, client)
        server_pid = {self.fast.proc.pid}

        before_cpu, before_machine = measure.group_cpu_s(self._pgids()), MachineCpu.read()
        before_redis, before_server = measure.redis_cpu_s(client), measure.group_cpu_s(server_pid)
        before_commands = measure.commandstats(client)
        client.rename(HELD_KEY, system.queue)
        released = time.time()
        self.wait_accepted(self.fast, orders + processes, timeout=120 + orders * (latency_ms / 1000 + 0.05))
        after_machine, after_cpu = MachineCpu.read(), measure.group_cpu_s(self._pgids())
        after_redis, after_server = measure.redis_cpu_s(client), measure.group_cpu_s(server_pid)
        after_commands = measure.commandstats(client)

        rss = measure.peak_rss_mb(self._pgids())
        self.stop_workers()
        times = sorted(self.accept_times(self.fast).values())[processes:]  # the warm-up orders first
        commands = measure.commands_between({}, produced)
        for name, count in measure.commands_between(before_commands, after_commands).items():
            commands[name] = commands.get(name, 0) + count
        memory = measure.memory_between(memory_before, measure.long_lived_memory(client, HOUR_S))
        return RunResult(
            rate=(len(times) - 1) / (times[-1] - times[0]),
            cpu_ms=(after_cpu - before_cpu) * 1000 / orders,
            idle=after_machine.idle_share_since(before_machine),
            commands=commands, redis_cpu_ms=(after_redis - before_redis) * 1000 / orders,
            memory=memory,
            rss_mb=rss, server_cpu_s=after_server - before_server, requests=orders,
            # the last answer left latency_ms after its request arrived; the poll's lag left out
            redis_core_share=(after_redis - before_redis) / (times[-1] + latency_ms / 1000 - released),
        )

    def bare_run(self, latency_ms: float, concurrency: int, orders: int) -> RunResult:
        """The bare client: a requests.Session per thread in a pool of the same size, in this process."""
        self.fresh(self.fast, latency_ms)
        url = self.fast.url
        token = requests.post(url + "/api/oauth/token", timeout=10, json={
            "client_id": SANDBOX_ENV["MIPOS_CLIENT_ID"], "client_secret": SANDBOX_ENV["MIPOS_CLIENT_SECRET"],
            "grant_type": "client_credentials", "email": SANDBOX_ENV["MIPOS_EMAIL"],
            "password": SANDBOX_ENV["MIPOS_PASSWORD"]}).json()["data"]["token"]
        local = threading.local()

        def post(n: int) -> int:
            session = getattr(local, "session", None)
            if session is None:
                session = local.session = requests.Session()
            body = {"delivery_id": str(n), "store_id": STORE_ID, "order_external_id": str(uuid.uuid4())}
            return session.post(url + ACCEPT_PATH, json=body, timeout=(10, 10),
                                headers={"Authorization": f"Bearer {token}"}).status_code

        server_pid = {self.fast.proc.pid}
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(post, range(concurrency)))  # warm: one connection per thread
            before_cpu, before_machine = measure.self_cpu_s(), MachineCpu.read()
            before_server = measure.group_cpu_s(server_pid)
            statuses = list(pool.map(post, range(orders)))
            after_machine, after_cpu = MachineCpu.read(), measure.self_cpu_s()
            after_server = measure.group_cpu_s(server_pid)
        assert statuses.count(200) == orders, "the bare client's requests must all succeed"
        times = sorted(self.accept_times(self.fast).values())[concurrency:]
        return RunResult(rate=(len(times) - 1) / (times[-1] - times[0]),
                         cpu_ms=(after_cpu - before_cpu) * 1000 / orders,
                         idle=after_machine.idle_share_since(before_machine),
                         server_cpu_s=after_server - before_server, requests=orders)

    # -- latency, enqueue, tokens ------------------------------------------------------

    def queue_latency(self, system: System, rate: float, seconds: float, pool: str,
                      concurrency: int) -> tuple[list[float], float]:
        """(delay() returning → the sandbox receiving the request, ms each; idle share)."""
        self.fresh(self.fast)
        self.start(system, self.fast, pool, concurrency)
        self.send(system, 1)
        self.wait_accepted(self.fast, 1, timeout=60, interval=0.1)
        returned: dict[str, float] = {}
        interval = 1.0 / rate
        before_machine = MachineCpu.read()
        next_at = time.perf_counter()
        for _ in range(int(rate * seconds)):
            returned.update(self.send(system, 1))
            next_at += interval
            pause = next_at - time.perf_counter()
            if pause > 0:
                time.sleep(pause)  # the steady pace being measured, not synchronisation
        self.wait_accepted(self.fast, len(returned) + 1, timeout=60)
        idle = MachineCpu.read().idle_share_since(before_machine)
        received = self.accept_times(self.fast)
        self.stop_workers()
        return [(received[o] - returned[o]) * 1000 for o in returned if o in received], idle

    def enqueue_probe(self, kind: str, calls: int) -> tuple[float, list[float], float]:
        """(CPU ms per call, wall ms of each call, idle share) of one producer process."""
        self.redis.client.flushall()
        before = MachineCpu.read()
        out = subprocess.run([sys.executable, "-m", "bench.enqueue_probe", kind, str(calls)],
                             cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=300, check=False)
        idle = MachineCpu.read().idle_share_since(before)
        if out.returncode != 0:
            raise RuntimeError(f"enqueue probe {kind} failed: {out.stderr[-2000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        return float(result["cpu_ms_per_call"]), list(result["wall_ms"]), idle

    def token_economy(self, system: System, cold_orders: int, ttl_s: float, stream_s: float,
                      pool: str, concurrency: int) -> tuple[int, int, int, int, float]:
        """(cold-start calls, 1; calls while tokens expire, rotations needed; the stdlib
        sandbox's CPU ms per request during the cold start)."""
        self.fresh(self.sandbox)
        self.start(system, self.sandbox, pool, concurrency, processes=2)
        server = {self.sandbox.proc.pid}
        before_server = measure.group_cpu_s(server)
        self.send(system, cold_orders)
        self.wait_accepted(self.sandbox, cold_orders, timeout=180, interval=0.25)
        sandbox_ms = (measure.group_cpu_s(server) - before_server) * 1000 / cold_orders
        stats = self.sandbox.control.stats()
        cold = stats["token_calls"] + stats["refresh_calls"]
        self.stop_workers()

        self.fresh(self.sandbox, token_ttl_s=ttl_s)
        self.start(system, self.sandbox, pool, concurrency, processes=2)
        started = time.time()
        sent = 0
        while time.time() - started < stream_s:
            self.send(system, 5)
            sent += 5
            time.sleep(0.1)  # a steady stream across several token lifetimes
        self.wait_accepted(self.sandbox, sent, timeout=60, interval=0.25)
        elapsed = time.time() - started
        stats = self.sandbox.control.stats()
        during = stats["token_calls"] + stats["refresh_calls"]
        self.stop_workers()
        return cold, 1, during, 1 + int(elapsed // ttl_s), sandbox_ms
