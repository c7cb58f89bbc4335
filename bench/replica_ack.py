"""What ``REDIS_MIN_REPLICAS_ACK`` costs ``delay()``: p50/p99 with 0 and 1.

    python -m bench.replica_ack [--calls 2000]

Starts a master, one replica and three Sentinels on this machine
(bench/sentinel.py) and times ``accept_order.delay()`` in this process (the
POS side; no worker runs, the messages just queue), first with
``REDIS_MIN_REPLICAS_ACK=0`` then with 1, against the same deployment, and
against the master's plain ``redis://`` address for comparison.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.sentinel import SentinelCluster


def _time_delays(calls: int) -> list[float]:
    from tasks import accept_order

    timings = []
    for n in range(calls):
        started = time.perf_counter()
        accept_order.delay(delivery_id=n, store_id="7", order_external_id=str(uuid.uuid4()))
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def _row(label: str, timings: list[float]) -> str:
    ordered = sorted(timings)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"| {label} | {len(ordered)} | {statistics.median(ordered):.2f} ms | {p99:.2f} ms |"


def _measure(label: str, env: dict[str, str], calls: int) -> str:
    """One POS process per configuration: its Celery app is built from its environment."""
    proc = subprocess.run([sys.executable, "-m", "bench.replica_ack", "--calls", str(calls),
                           "--child", label], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=600, check=True)
    return proc.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replica_ack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child:
        _time_delays(50)  # connections, scripts
        print(_row(options.child, _time_delays(options.calls)))
        return 0
    cluster = SentinelCluster(Path(tempfile.mkdtemp(prefix="mipos-replica-ack-")))
    rows = ["| REDIS_URL, REDIS_MIN_REPLICAS_ACK | calls | delay() p50 | delay() p99 |", "|---|---|---|---|"]
    try:
        plain = {"REDIS_URL": f"redis://127.0.0.1:{cluster.master().port}/0"}
        rows.append(_measure("redis:// (the master itself), 0", plain, options.calls))
        rows.append(_measure("redis:// (the master itself), 1", {**plain, "REDIS_MIN_REPLICAS_ACK": "1"},
                             options.calls))
        rows.append(_measure("sentinel://, 0", cluster.env(replicas_ack=0), options.calls))
        rows.append(_measure("sentinel://, 1", cluster.env(replicas_ack=1), options.calls))
    finally:
        cluster.stop()
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
