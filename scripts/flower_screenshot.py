"""The README's screenshot of Flower: real orders, real retries, in a real headless Chromium.

Starts its own redis-server, the sandbox mipos, one worker and Flower (the Procfile's
lines, as the tests do), enqueues a few orders whose mipos answers are faults the
sandbox injects (transient ones that are retried, a 429 with a long Retry-After, a
permanent one that is dead-lettered, and a deny), takes the screenshot of the Tasks
page once every order is final except the two still waiting for a retry (so RETRY
shows), then waits until those are accepted too. Everything it started is ended by
PID; every wait is bounded.

    python scripts/flower_screenshot.py [--output docs/flower-tasks.png]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.browser import VIEWPORT, Expectation, flower_tasks_page
from support.processes import (
    SANDBOX_ENV,
    FlowerProcess,
    RedisServer,
    Sandbox,
    WorkerProcess,
    free_port,
)

WORKER_ENV = {
    "MIPOS_TIMEOUT_S": "2",
    "MIPOS_RETRY_BASE_DELAY_S": "0.5",
    "MIPOS_RETRY_MAX_DELAY_S": "2",
    "MIPOS_RETRY_MAX_ATTEMPTS": "6",
    "MIPOS_RETRY_DEADLINE_S": "120",
    "WORKER_CONCURRENCY": "4",
    "LOG_FORMAT": "json",
}
# The Retry-After that keeps two orders in RETRY while the screenshot is taken; below the
# worker's countdown hop (a quarter of its visibility timeout, 21 s here), so it is one retry.
LONG_WAIT_S = 18


@dataclass
class Order:
    label: str
    faults: list[dict[str, Any]]
    final: str  # the state it ends in
    deny: bool = False
    waits: bool = False  # still waiting for a retry when the screenshot is taken
    order_id: str = field(default_factory=lambda: str(uuid.uuid4()))


ORDERS = [
    Order("accepted at once", [], "SUCCESS"),
    Order("'Unable to get token.' twice, then accepted",
          [{"status": 409, "message": "Unable to get token.", "times": 2}], "SUCCESS"),
    Order("a 500 and a dropped connection, then accepted",
          [{"status": 500, "message": "Server Error"}, {"drop": True}], "SUCCESS"),
    Order("denied: out of stock", [], "SUCCESS", deny=True),
    Order("'Order not found.': permanent, dead-lettered",
          [{"status": 409, "message": "Order not found.", "times": -1}], "FAILURE"),
    Order(f"a 502, then a 429 with Retry-After: {LONG_WAIT_S}",
          [{"status": 502, "message": "Bad Gateway"},
           {"status": 429, "message": "Too Many Attempts.", "retry_after": LONG_WAIT_S}],
          "SUCCESS", waits=True),
    Order(f"a 429 with Retry-After: {LONG_WAIT_S}",
          [{"status": 429, "message": "Too Many Attempts.", "retry_after": LONG_WAIT_S}],
          "SUCCESS", waits=True),
]


def expectation(order: Order, state: str) -> Expectation:
    name = "mipos.deny_order" if order.deny else "mipos.accept_order"
    return {"name": name, "state": state, "kwargs": order.order_id}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "flower-tasks.png")
    parser.add_argument("--width", type=int, default=VIEWPORT[0])
    parser.add_argument("--height", type=int, default=720)
    options = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="flower-screenshot-"))
    password = secrets.token_urlsafe(12)
    started: list[Any] = []
    try:
        redis_server = RedisServer(workdir / "redis")
        started.append(redis_server)
        sandbox = Sandbox(workdir)
        started.append(sandbox)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")},
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
            "REDIS_URL": redis_server.url,
            "MIPOS_BASE_URL": sandbox.url,
            **SANDBOX_ENV,
            **WORKER_ENV,
        }
        worker = WorkerProcess(env, workdir / "worker.log")
        started.append(worker)
        flower = FlowerProcess({**env, "FLOWER_BASIC_AUTH": f"admin:{password}",
                                "FLOWER_ADDRESS": "127.0.0.1"}, workdir / "flower.log", free_port())
        started.append(flower)
        worker.wait_ready()
        flower.wait_ready()

        os.environ["REDIS_URL"] = redis_server.url  # the POS side, in this process
        import tasks
        from worker.wiring.celery_app import app

        app.conf.broker_url = redis_server.url
        for number, order in enumerate(ORDERS, start=101):
            sandbox.control.deliver("3", number, order.order_id, order_number=f"A-{number}")
            if order.faults:
                sandbox.control.add_faults(order.order_id, *order.faults)
            if order.deny:
                tasks.deny_order.delay(delivery_id=number, store_id="3", order_external_id=order.order_id,
                                       message="Out of stock")
            else:
                tasks.accept_order.delay(delivery_id=number, store_id="3", order_external_id=order.order_id)
            print(f"enqueued {number}: {order.label} ({order.order_id})", flush=True)

        with flower_tasks_page(flower.url, ("admin", password), viewport=(options.width, options.height)) as page:
            page.wait_for_rows([expectation(o, "RETRY" if o.waits else o.final) for o in ORDERS],
                               timeout=LONG_WAIT_S - 5)
            page.screenshot(options.output)
            print(f"wrote {options.output}", flush=True)
            page.wait_for_rows([expectation(o, o.final) for o in ORDERS], timeout=LONG_WAIT_S + 30)
            print("every order is final: the waiting ones were accepted after their Retry-After", flush=True)
        return 0
    finally:
        for process in reversed(started):
            process.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
