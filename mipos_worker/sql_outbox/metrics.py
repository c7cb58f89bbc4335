"""``--metrics-port``: a relay's numbers as Prometheus series (needs ``mipos-worker[metrics]``).

The relay itself only counts (``RelayMetrics``); prometheus-client is imported
here, when a relay is asked to serve them, so a POS that never does needs it not.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mipos_worker.sql_outbox.relay import Relay
from mipos_worker.terminal import CliError


class RelayCollector:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        metrics = self.relay.metrics
        status = metrics.status
        if status is not None:
            yield GaugeMetricFamily("mipos_outbox_backlog", "Outbox rows not yet published",
                                    value=status.backlog)
            yield GaugeMetricFamily("mipos_outbox_oldest_age_seconds",
                                    "Age of the oldest unpublished outbox row (database clock)",
                                    value=status.oldest_age_s or 0.0)
            yield GaugeMetricFamily("mipos_outbox_dead_rows", "Rows moved aside to mipos_outbox_dead",
                                    value=status.dead)
        yield CounterMetricFamily("mipos_outbox_published", "Rows published to Redis by this relay",
                                  value=metrics.published)
        yield CounterMetricFamily("mipos_outbox_moved_aside",
                                  "Rows this relay moved aside as unpublishable", value=metrics.moved_aside)


def serve_metrics(relay: Relay, host: str, port: int) -> None:
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise CliError("--metrics-port needs prometheus-client: pip install 'mipos-worker[metrics]'") from None
    registry = CollectorRegistry()
    registry.register(RelayCollector(relay))  # type: ignore[arg-type]
    start_http_server(port, addr=host, registry=registry)
