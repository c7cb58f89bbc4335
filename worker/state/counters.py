"""Counters a dashboard wants, kept in Redis so that every worker process adds to one set.

Workers scale as processes on many machines, so a per-process Prometheus
endpoint would need one scrape target per process. Instead each worker adds
to one Redis hash (a field per series), and whoever is scraped reads it:
Flower's ``/metrics`` (``worker/ops/flower.py`` registers the collector) and
``mipos-worker metrics``. Gauges (queue depth, orders in flight, breaker) are
read from Redis at scrape time.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import redis

from mipos_worker.state.connection import text

# Enqueue to accepted (or denied): mipos cancels an order after about 10 minutes.
LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mipos_attempts_total": (
        "Attempt lines written, by action, outcome and error class", ("action", "outcome", "error_class")),
    "mipos_dead_letters_total": ("Orders dead-lettered, by action and reason", ("action", "reason")),
    "mipos_token_calls_total": (
        "Calls to mipos for a token (kind: token or refresh; result: ok or the error class)",
        ("kind", "result")),
    "mipos_orders_unacknowledged_total": (
        "Orders mipos listed as pending that were never enqueued (reconciliation; each once)", ()),
    "mipos_replays_total": ("Dead letters replayed by an operator", ("action",)),
    "mipos_redis_master_followed_total": (
        "Times a worker process followed a new Redis master after a Sentinel failover", ()),
}
LATENCY = "mipos_order_latency_seconds"
LATENCY_HELP = "From enqueue to the order accepted or denied at mipos"


def _field(name: str, labels: Mapping[str, str]) -> str:
    return name + "|" + ",".join(f"{k}={labels[k]}" for k in sorted(labels))


def parse_field(raw: str) -> tuple[str, dict[str, str]]:
    name, _, encoded = raw.partition("|")
    labels = dict(part.split("=", 1) for part in encoded.split(",") if part)
    return name, labels


class Metrics:
    """Writes and reads the shared counters (one Redis hash).

    With ``flush_every_s`` (the workers) counts add up in the process and go to
    Redis in one pipeline that often, from a thread: no round trip per attempt.
    A SIGKILL loses at most that much; a clean stop flushes. Without it (the CLI,
    beat) each count is written at once.
    """

    def __init__(self, redis_client: redis.Redis, key_prefix: str,
                 flush_every_s: float | None = None) -> None:
        self.redis = redis_client
        self.prefix = key_prefix
        self.key = f"{key_prefix}metrics"
        self.flush_every_s = flush_every_s
        self._lock = threading.Lock()
        self._pending: dict[str, int | float] = {}
        self._flusher_pid: int | None = None

    def count(self, name: str, pipe: Any = None, amount: int = 1, **labels: str | None) -> None:
        """Add to counter ``name``; inside ``pipe`` when given (no round trip of its own)."""
        if name not in COUNTERS:
            raise KeyError(f"unknown counter {name}")
        self._add({_field(name, {k: v or "none" for k, v in labels.items()}): amount}, pipe)

    def attempt(self, action: str, outcome: str, error_class: str | None,
                latency_s: float | None = None) -> None:
        """One attempt line; with ``latency_s`` the order ended accepted or denied."""
        labels = {"action": action, "outcome": outcome, "error_class": error_class or "none"}
        amounts: dict[str, int | float] = {_field("mipos_attempts_total", labels): 1}
        if latency_s is not None:
            bucket = next((str(b) for b in LATENCY_BUCKETS_S if latency_s <= b), "+Inf")
            amounts[_field(LATENCY, {"action": action, "le": bucket})] = 1
            amounts[_field(LATENCY + "_sum", {"action": action})] = float(latency_s)
        self._add(amounts)

    def _add(self, amounts: dict[str, int | float], pipe: Any = None) -> None:
        if pipe is None and self.flush_every_s is not None:
            with self._lock:
                for field, amount in amounts.items():
                    self._pending[field] = self._pending.get(field, 0) + amount
            self._ensure_flusher()
            return
        target = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        _write(target, self.key, amounts)
        if pipe is None:
            target.execute()

    def flush(self) -> None:
        """Write what this process has counted; kept for the next try if Redis is away."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        pipe = self.redis.pipeline(transaction=False)
        _write(pipe, self.key, pending)
        try:
            pipe.execute()
        except redis.RedisError:
            with self._lock:
                for field, amount in pending.items():
                    self._pending[field] = self._pending.get(field, 0) + amount

    def _ensure_flusher(self) -> None:
        if self._flusher_pid == os.getpid():
            return
        with self._lock:  # one thread per process, started again in a forked child
            if self._flusher_pid == os.getpid():
                return
            self._flusher_pid = os.getpid()
        threading.Thread(target=self._flush_loop, name="mipos-metrics", daemon=True).start()
        atexit.register(self.flush)

    def _flush_loop(self) -> None:
        assert self.flush_every_s is not None
        while True:
            time.sleep(self.flush_every_s)
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - a counter must never take the worker down
                pass

    def read(self) -> dict[str, float]:
        return {text(k): float(v) for k, v in self.redis.hgetall(self.key).items()}


def _write(pipe: Any, key: str, amounts: dict[str, int | float]) -> None:
    for field, amount in amounts.items():
        if isinstance(amount, float):
            pipe.hincrbyfloat(key, field, amount)
        else:
            pipe.hincrby(key, field, amount)
