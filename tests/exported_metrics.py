"""The metric names the code exports, taken from the code itself, and the metric names a PromQL
expression uses: what tests/test_alerts.py and tests/test_dashboard.py compare.

Exported are the series a Prometheus scrape can return:
- Flower's ``/metrics`` and ``mipos-worker metrics``: our collector (worker/ops/metrics.py over
  worker/state/counters.py), collected from a real Redis, plus the families it yields only in
  some deployments (Sentinel's failovers), read from its ``*MetricFamily("name", ...)`` calls;
  and Flower's own ``flower_*`` metrics, from Flower's definitions (flower.events);
- a relay's ``--metrics-port`` (mipos_worker/sql_outbox/metrics.py), collected from a real
  relay on an SQLite outbox.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import redis

from support.processes import ROOT

COLLECTOR_SOURCES = ("worker/ops/metrics.py", "mipos_worker/sql_outbox/metrics.py")
FAMILY_TYPES = {"CounterMetricFamily": "counter", "GaugeMetricFamily": "gauge",
                "HistogramMetricFamily": "histogram", "SummaryMetricFamily": "summary"}
# The series a family of each type is exposed as (prometheus_client's text format).
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("", "_sum", "_count"), "untyped": ("",)}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
                "and", "or", "unless", "inf", "nan", "Inf", "NaN"}


def series_names(name: str, kind: str, samples: Iterable[Any] = ()) -> set[str]:
    return {name + suffix for suffix in SUFFIXES[kind]} | {sample.name for sample in samples}


def collected(metrics: Iterable[Any]) -> set[str]:
    return {name for metric in metrics for name in series_names(metric.name, metric.type, metric.samples)}


def declared_families() -> set[str]:
    """Every family our collectors construct by a literal name, whether or not this deployment yields it."""
    names: set[str] = set()
    for relative in COLLECTOR_SOURCES:
        for node in ast.walk(ast.parse((ROOT / relative).read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FAMILY_TYPES
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                names |= series_names(node.args[0].value, FAMILY_TYPES[node.func.id])
    return names


def worker_series(client: redis.Redis) -> set[str]:
    """What Flower's /metrics and ``mipos-worker metrics`` expose of ours, on a real Redis."""
    from mipos_worker.names import QUEUE
    from worker.ops.metrics import RedisCollector

    return collected(RedisCollector(client, "mipos:", QUEUE).collect())


def relay_series(tmp_path: Path) -> set[str]:
    from sqlalchemy import create_engine

    from mipos_worker.sql_outbox import Relay, create_tables
    from mipos_worker.sql_outbox.metrics import RelayCollector

    engine = create_engine(f"sqlite:///{tmp_path / 'outbox.db'}")
    create_tables(engine)
    relay = Relay(engine)
    relay.metrics.observe(relay.status())
    try:
        return collected(RelayCollector(relay).collect())
    finally:
        engine.dispose()


def flower_series() -> set[str]:
    """Flower's own metrics, as its /metrics serves them beside ours."""
    from flower.events import get_prometheus_metrics
    from prometheus_client.metrics import MetricWrapperBase

    wrappers = [value for value in vars(get_prometheus_metrics()).values() if isinstance(value, MetricWrapperBase)]
    return collected(metric for wrapper in wrappers for metric in wrapper.collect())


def exported_series(client: redis.Redis, tmp_path: Path) -> set[str]:
    return worker_series(client) | declared_families() | relay_series(tmp_path) | flower_series()


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (function names, keywords, label names,
    strings, durations, numbers and Grafana's ``$variables`` left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\$\{?\w+\}?", "", text)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\b\d+(\.\d+)?([eE][-+]?\d+)?(ms|[smhdwy])?\b", "", text)  # numbers, durations
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        if match.group() in PROMQL_WORDS or text[match.end():].lstrip().startswith("("):
            continue
        names.add(match.group())
    return names
