"""The README's screenshots of the operator's pages: real orders, real retries, in a real headless Chromium.

Starts its own redis-server, the sandbox mipos, one worker and Flower (the Procfile's lines, as
the tests do), enqueues orders whose mipos answers are faults the sandbox injects (accepted after
retries, dead-lettered after a retry, after running out of attempts, a deny refused), waits until
each is final, then takes two screenshots: the order page of the order that retried and was
dead-lettered (``docs/order-page.png``) and the dead letters list (``docs/dead-letters.png``).
Everything it started is ended by PID; every wait is bounded.

    python scripts/pages_screenshot.py [--order-page docs/order-page.png] [--dead-letters docs/dead-letters.png]
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
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.pages_browser import pages_browser
from support.processes import (
    SANDBOX_ENV,
    FlowerProcess,
    RedisServer,
    Sandbox,
    WorkerProcess,
    free_port,
    wait_for,
)

WORKER_ENV = {
    "MIPOS_TIMEOUT_S": "2",
    "MIPOS_RETRY_BASE_DELAY_S": "0.2",
    "MIPOS_RETRY_MAX_DELAY_S": "1",
    "MIPOS_RETRY_MAX_ATTEMPTS": "4",
    "MIPOS_RETRY_DEADLINE_S": "120",
    "WORKER_CONCURRENCY": "4",
    "LOG_FORMAT": "json",
}
STORE = "3"


@dataclass
class Order:
    label: str
    faults: list[dict[str, Any]]
    deny: bool = False
    shown: bool = False  # the order page's screenshot
    order_id: str = field(default_factory=lambda: str(uuid.uuid4()))


ORDERS = [
    Order("accepted after a 500", [{"status": 500, "message": "Server Error"}]),
    Order("a 502 and a 503, then 'Order not found.': dead-lettered",
          [{"status": 502, "message": "Bad Gateway"}, {"status": 503, "message": "Service Unavailable"},
           {"status": 409, "message": "Order not found.", "times": -1}], shown=True),
    Order("'Unable to get token.' until the attempts run out",
          [{"status": 409, "message": "Unable to get token.", "times": -1}]),
    Order("a deny refused: 'Order already accepted.'",
          [{"status": 409, "message": "Order already accepted.", "times": -1}], deny=True),
    Order("'Order not found.' at once", [{"status": 409, "message": "Order not found.", "times": -1}]),
    Order("accepted at once", []),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--order-page", type=Path, default=ROOT / "docs" / "order-page.png")
    parser.add_argument("--dead-letters", type=Path, default=ROOT / "docs" / "dead-letters.png")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=800)
    options = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="pages-screenshot-"))
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
        flower = FlowerProcess({**env, "FLOWER_BASIC_AUTH": f"admin:{password}", "FLOWER_ADDRESS": "127.0.0.1"},
                               workdir / "flower.log", free_port())
        started.append(flower)
        worker.wait_ready()
        flower.wait_ready()

        os.environ["REDIS_URL"] = redis_server.url  # the POS side, in this process
        import tasks
        from worker.state.deadletters import DeadLetters
        from worker.wiring.celery_app import app

        app.conf.broker_url = redis_server.url
        for number, order in enumerate(ORDERS, start=201):
            sandbox.control.deliver(STORE, number, order.order_id, order_number=f"A-{number}")
            if order.faults:
                sandbox.control.add_faults(order.order_id, *order.faults)
            task = tasks.deny_order if order.deny else tasks.accept_order
            extra = {"message": "Out of stock"} if order.deny else {}
            task.delay(delivery_id=number, store_id=STORE, order_external_id=order.order_id, **extra)
            print(f"enqueued {number}: {order.label} ({order.order_id})", flush=True)

        letters = DeadLetters(redis_server.client, "mipos:")
        failing = [o for o in ORDERS if o.faults and o.faults[-1].get("times") == -1]
        wait_for(lambda: len(letters.page(50).letters) >= len(failing), timeout=90, what="the dead letters")
        shown = next(o for o in ORDERS if o.shown)
        with pages_browser(flower.url, ("admin", password), viewport=(options.width, options.height)) as browser:
            browser.open("/order?" + urlencode({"store": STORE, "id": shown.order_id, "ask": "1"}))
            browser.screenshot(options.order_page)
            print(f"wrote {options.order_page}", flush=True)
            browser.open("/dead-letters")
            browser.screenshot(options.dead_letters)
            print(f"wrote {options.dead_letters}", flush=True)
        return 0
    finally:
        for process in reversed(started):
            process.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
