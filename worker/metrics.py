"""Counters a dashboard wants, kept in Redis so that every worker process adds to one set.

Workers scale as processes on many machines, so a per-process Prometheus
endpoint would need one scrape target per process. Instead each worker adds
to one Redis hash (a field per series), and whoever is scraped reads it:
Flower's ``/metrics`` (``worker/flower.py`` registers the collector) and
``mipos-worker metrics``. Gauges (queue depth, orders in flight, breaker) are
read from Redis at scrape time.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from config import RedisSettings
from worker.breaker import STATE_KEY, WAITING_KEY
from worker.delivery import QUEUE

UNACKED_KEY = "unacked"  # kombu's Redis transport: messages taken and not yet acknowledged

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


def _parse_field(raw: str) -> tuple[str, dict[str, str]]:
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
        return {(k.decode() if isinstance(k, bytes) else k): float(v)
                for k, v in self.redis.hgetall(self.key).items()}


def _write(pipe: Any, key: str, amounts: dict[str, int | float]) -> None:
    for field, amount in amounts.items():
        if isinstance(amount, float):
            pipe.hincrbyfloat(key, field, amount)
        else:
            pipe.hincrby(key, field, amount)


class RedisCollector(Collector):
    """Reads the shared counters and a few gauges from Redis at every scrape."""

    def __init__(self, redis_client: redis.Redis, key_prefix: str, queue: str,
                 settings: RedisSettings | None = None) -> None:
        self.metrics = Metrics(redis_client, key_prefix)
        self.queue = queue
        self.settings = settings  # with Sentinel: failovers so far, from the Sentinels

    def collect(self) -> Iterator[Metric]:
        try:
            values = self.metrics.read()
            gauges = read_gauges(self.metrics.redis, self.metrics.prefix, self.queue)
        except redis.RedisError:
            up = GaugeMetricFamily("mipos_redis_up", "1 when the shared Redis answered this scrape")
            up.add_metric([], 0)
            yield up
            return
        yield from _counter_families(values)
        yield from _latency_families(values)
        for name, (help_text, value) in gauges.items():
            family = GaugeMetricFamily(name, help_text)
            family.add_metric([], value)
            yield family
        yield from _topology_families(self.metrics.redis, self.settings)


def _topology_families(client: redis.Redis, settings: RedisSettings | None) -> Iterator[Metric]:
    """The master now, its online replicas, and (Sentinel) the failovers so far."""
    from worker.topology import replication_of, sentinel_view

    try:
        state = replication_of(client)
    except redis.RedisError:
        return
    master = GaugeMetricFamily("mipos_redis_master", "1 for the Redis master in use now",
                               labels=("address",))
    master.add_metric([state.master], 1.0)
    yield master
    online = GaugeMetricFamily("mipos_redis_replicas_online", "Replicas of the master that are in sync")
    online.add_metric([], float(state.online))
    yield online
    if settings is not None and settings.sentinel:
        view = sentinel_view(settings)
        if view.failovers is not None:
            failovers = CounterMetricFamily(
                "mipos_redis_failovers", "Failovers of the master so far (the Sentinels' config epoch)")
            failovers.add_metric([], float(view.failovers))
            yield failovers


def _counter_families(values: dict[str, float]) -> Iterator[Metric]:
    for name, (help_text, label_names) in COUNTERS.items():
        family = CounterMetricFamily(name.removesuffix("_total"), help_text, labels=label_names)
        for raw, value in values.items():
            series, labels = _parse_field(raw)
            if series == name:
                family.add_metric([labels.get(label, "none") for label in label_names], value)
        yield family


def _latency_families(values: dict[str, float]) -> Iterator[Metric]:
    family = HistogramMetricFamily(LATENCY, LATENCY_HELP, labels=("action",))
    by_action: dict[str, dict[str, float]] = {}
    sums: dict[str, float] = {}
    for raw, value in values.items():
        series, labels = _parse_field(raw)
        if series == LATENCY:
            by_action.setdefault(labels["action"], {})[labels["le"]] = value
        elif series == LATENCY + "_sum":
            sums[labels["action"]] = value
    for action, counts in sorted(by_action.items()):
        cumulative, buckets = 0.0, []
        for bound in [*map(str, LATENCY_BUCKETS_S), "+Inf"]:
            cumulative += counts.get(bound, 0.0)
            buckets.append((bound, cumulative))
        family.add_metric([action], buckets, sums.get(action, 0.0))
    yield family


def read_gauges(client: redis.Redis, prefix: str, queue: str) -> dict[str, tuple[str, float]]:
    """The state gauges, by name: (help, value). ``mipos-worker doctor`` reads them too."""
    # Imported here: the dead letters count into these metrics (an import cycle otherwise).
    from worker.deadletters import DeadLetters, expired_before
    from worker.inflight import InflightRegistry

    pipe = client.pipeline(transaction=False)
    pipe.llen(queue)
    pipe.hlen(UNACKED_KEY)
    pipe.hlen(InflightRegistry(client, prefix).entries_key)
    pipe.zcount(DeadLetters(client, prefix).index_key, f"({expired_before()}", "+inf")
    pipe.get(prefix + STATE_KEY)
    pipe.zcard(prefix + WAITING_KEY)
    queued, unacked, inflight, dead, breaker, held = pipe.execute()
    return {
        "mipos_redis_up": ("1 when the shared Redis answered this scrape", 1.0),
        "mipos_queue_depth": ("Messages waiting in the queue for a worker", float(queued)),
        "mipos_unacked_messages": (
            "Messages taken by a worker and not yet acknowledged (includes scheduled retries)",
            float(unacked)),
        "mipos_orders_in_flight": ("Order tasks enqueued and not yet final", float(inflight)),
        "mipos_dead_letters_stored": ("Dead letters kept (30 days)", float(dead)),
        "mipos_breaker_open": ("1 while the circuit breaker is open", float(breaker == b"open")),
        "mipos_orders_held_by_breaker": ("Orders waiting for the breaker to close", float(held)),
    }


def render(client: redis.Redis, prefix: str, queue: str,
           settings: RedisSettings | None = None) -> bytes:
    """The Prometheus text exposition of our metrics (with ``settings``: the topology's too)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(client, prefix, queue, settings))
    return generate_latest(registry)


_registered = False


def register_prometheus_collector() -> None:
    """Add our metrics to prometheus_client's default registry (Flower's ``/metrics``)."""
    global _registered
    if _registered:
        return
    from prometheus_client import REGISTRY

    from config import load_producer_settings
    from worker.runtime import redis_from_url

    settings = load_producer_settings()
    REGISTRY.register(RedisCollector(redis_from_url(settings.url, timeout_s=2.0, retries=0),
                                     settings.key_prefix, queue=QUEUE, settings=settings))
    _registered = True
