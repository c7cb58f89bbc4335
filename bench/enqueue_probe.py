"""One producer process timing ``delay()`` (or a raw LPUSH), run by the benchmark.

    python -m bench.enqueue_probe ours|stock|lpush CALLS

Prints one JSON object: the CPU per call of this process, and the wall time of
each call. A process of its own, so one app's imports and patches never touch the
other's, and its CPU is its own.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

import redis

WARM_CALLS = 50


def main(argv: list[str]) -> int:
    kind, calls = argv[0], int(argv[1])
    if kind == "lpush":
        from bench.systems import OURS

        client = redis.Redis.from_url(os.environ["REDIS_URL"])
        OURS.send(1, str(uuid.uuid4()))  # a real message of ours, to push again raw
        message = client.lindex(OURS.queue, 0)

        def call(n: int) -> None:
            client.lpush("bench:raw", message)
    else:
        from bench.systems import SYSTEMS

        send = SYSTEMS[kind].send

        def call(n: int) -> None:
            send(n, str(uuid.uuid4()))
    for n in range(WARM_CALLS):
        call(n)
    wall_ms = []
    cpu_started = time.process_time()
    for n in range(calls):
        started = time.perf_counter()
        call(n)
        wall_ms.append((time.perf_counter() - started) * 1000)
    cpu_ms = (time.process_time() - cpu_started) * 1000 / calls
    print(json.dumps({"cpu_ms_per_call": cpu_ms, "wall_ms": wall_ms}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
