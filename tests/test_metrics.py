"""The shared counters against a real Redis: written at once, or added up and flushed."""

from __future__ import annotations

import redis

from support.processes import RedisServer, free_port, wait_for
from worker.ops.metrics import render
from worker.state.counters import Metrics


def test_counts_write_through_without_a_flush_interval(redis_server: RedisServer) -> None:
    metrics = Metrics(redis_server.client, "t1:")
    metrics.count("mipos_token_calls_total", kind="refresh", result="auth")
    assert metrics.read() == {"mipos_token_calls_total|kind=refresh,result=auth": 1.0}


def test_buffered_counts_reach_redis_in_one_flush(redis_server: RedisServer) -> None:
    metrics = Metrics(redis_server.client, "t2:", flush_every_s=60)  # the thread won't fire here
    for _ in range(3):
        metrics.attempt("accept", "retrying", "transient")
    metrics.attempt("accept", "accepted", None, latency_s=3.2)
    assert metrics.read() == {}  # nothing written per attempt
    metrics.flush()
    values = metrics.read()
    assert values["mipos_attempts_total|action=accept,error_class=transient,outcome=retrying"] == 3
    assert values["mipos_order_latency_seconds|action=accept,le=5.0"] == 1
    assert values["mipos_order_latency_seconds_sum|action=accept"] == 3.2
    text = render(redis_server.client, "t2:", "mipos").decode()
    assert 'mipos_order_latency_seconds_bucket{action="accept",le="2.5"} 0.0' in text
    assert 'mipos_order_latency_seconds_bucket{action="accept",le="5.0"} 1.0' in text
    assert 'mipos_order_latency_seconds_count{action="accept"} 1.0' in text


def test_the_flush_thread_writes_on_its_own(redis_server: RedisServer) -> None:
    metrics = Metrics(redis_server.client, "t3:", flush_every_s=0.1)
    metrics.count("mipos_replays_total", action="deny")
    wait_for(lambda: metrics.read(), timeout=5, what="the flush thread")
    assert metrics.read() == {"mipos_replays_total|action=deny": 1.0}


def test_counts_survive_a_redis_that_is_away(redis_server: RedisServer) -> None:
    away = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    metrics = Metrics(away, "t4:", flush_every_s=60)
    metrics.count("mipos_replays_total", action="accept")
    metrics.flush()  # fails quietly, keeps the count
    metrics.redis = redis_server.client
    metrics.flush()
    assert metrics.read() == {"mipos_replays_total|action=accept": 1.0}


def test_scrape_with_redis_away_says_so() -> None:
    text = render(redis.Redis(port=free_port(), socket_connect_timeout=0.5), "t5:", "mipos").decode()
    assert "mipos_redis_up 0.0" in text
