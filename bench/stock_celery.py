"""The peer a user would pick: a minimal stock Celery app with one task doing the same POST.

    celery -A bench.stock_celery worker --pool=threads --concurrency=16 --queues=stock \
        --without-gossip --without-mingle --events

What someone would write without this project: the token fetched once per
process, a ``requests.Session`` per thread, and the worker's serializer, acks,
prefetch and event settings (and its producer timeouts), so the comparison
measures our machinery and nothing else. No ledger, no lock, no retries: a
failed POST raises and the task fails. Needs ``REDIS_URL`` and
``MIPOS_BASE_URL`` plus the sandbox's ``MIPOS_*`` credentials.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import requests
from celery import Celery

QUEUE = "stock"  # bench.systems.STOCK_QUEUE
TASK_NAME = "stock.accept_order"
ACCEPT_PATH = "/api/v1/integration/order/accept"
TOKEN_PATH = "/api/oauth/token"

app = Celery("stock")
app.conf.update(
    broker_url=os.environ.get("REDIS_URL", "redis://localhost:6379/0"),
    broker_transport_options={"socket_timeout": 3, "socket_connect_timeout": 2, "max_retries": 1},
    task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5,
                               "interval_max": 0.5},
    task_serializer="json",
    result_serializer="json",
    event_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_default_queue=QUEUE,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_send_task_events=True,
    task_send_sent_event=True,
    enable_utc=True,
)

_token_lock = threading.Lock()
_token: str | None = None
_local = threading.local()


def _base_url() -> str:
    return os.environ["MIPOS_BASE_URL"].rstrip("/")


def _bearer() -> str:
    global _token
    with _token_lock:
        if _token is None:
            answer = requests.post(_base_url() + TOKEN_PATH, timeout=(10, 10), json={
                "client_id": os.environ["MIPOS_CLIENT_ID"],
                "client_secret": os.environ["MIPOS_CLIENT_SECRET"],
                "grant_type": "client_credentials",
                "email": os.environ["MIPOS_EMAIL"],
                "password": os.environ["MIPOS_PASSWORD"],
            })
            answer.raise_for_status()
            _token = str(answer.json()["data"]["token"])
        return _token


def _session() -> requests.Session:
    session: requests.Session | None = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    return session


@app.task(name=TASK_NAME)
def accept_order(delivery_id: Any, store_id: Any, order_external_id: str) -> None:
    body = {"delivery_id": str(delivery_id), "store_id": str(store_id),
            "order_external_id": str(order_external_id)}
    answer = _session().post(_base_url() + ACCEPT_PATH, json=body, timeout=(10, 10),
                             headers={"Authorization": f"Bearer {_bearer()}"})
    answer.raise_for_status()
