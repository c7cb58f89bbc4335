"""The Prometheus exposition: the shared counters (``worker/state/counters.py``) and
gauges read from Redis at every scrape (Flower's ``/metrics``, ``mipos-worker metrics``)."""

from __future__ import annotations

from collections.abc import Iterator

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
from config.timing import QUEUE
from mipos_worker.state.inflight import InflightRegistry
from worker.state.breaker import STATE_KEY, WAITING_KEY
from worker.state.counters import (
    COUNTERS,
    LATENCY,
    LATENCY_BUCKETS_S,
    LATENCY_HELP,
    Metrics,
    parse_field,
)
from worker.state.deadletters import DeadLetters, expired_before
from worker.state.kombu_keys import UNACKED_KEY


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
    from worker.state.topology import replication_of, sentinel_view

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
            series, labels = parse_field(raw)
            if series == name:
                family.add_metric([labels.get(label, "none") for label in label_names], value)
        yield family


def _latency_families(values: dict[str, float]) -> Iterator[Metric]:
    family = HistogramMetricFamily(LATENCY, LATENCY_HELP, labels=("action",))
    by_action: dict[str, dict[str, float]] = {}
    sums: dict[str, float] = {}
    for raw, value in values.items():
        series, labels = parse_field(raw)
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
    from mipos_worker.state.connection import redis_from_url

    settings = load_producer_settings()
    REGISTRY.register(RedisCollector(redis_from_url(settings.url, timeout_s=2.0, retries=0),
                                     settings.key_prefix, queue=QUEUE, settings=settings))
    _registered = True
