"""Bounded order fields (issue 25, item 8).

``deny_order.delay()`` accepted a 2 MB ``message`` and a 100 kB ``order_external_id``: Flower
kept 2.1 million characters of kwargs for that one task, and the id became part of Redis key
names. Ids are at most 200 characters and a deny's message at most 1000, refused in the
producer (``ValueError`` naming the field and the limit, nothing enqueued) and, for a message
sent by name, by the worker (dead-lettered ``invalid``, no HTTP call); and what Flower is
shown of a task (its ``kwargsrepr``) is bounded.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from celery.signals import before_task_publish

from mipos_worker.order.errors import InvalidOrder
from mipos_worker.order.model import Action, parse_order_request
from support.processes import ROOT
from tests.conftest import Cluster, dead_letter_of, new_order_id
from worker.state.deadletters import DeadLetters

CLI = str(Path(sys.executable).parent / "mipos-worker")
ORDER = {"delivery_id": "1", "store_id": "3", "order_external_id": "o-1"}


def deny(**fields: Any) -> dict[str, Any]:
    return {**ORDER, "message": "Out of stock", **fields}


# -- the rule --------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["delivery_id", "store_id", "order_external_id"])
def test_an_id_over_200_characters_is_refused_naming_field_and_limit(field: str) -> None:
    assert parse_order_request(Action.DENY, deny(**{field: "7" * 200})).body()[field] == "7" * 200
    with pytest.raises(InvalidOrder, match=rf"^{field}: must be at most 200 characters \(got 201\)"):
        parse_order_request(Action.DENY, deny(**{field: "7" * 201}))
    with pytest.raises(InvalidOrder, match=rf"^{field}: must be at most 200 characters"):
        parse_order_request(Action.DENY, deny(**{field: 10 ** 300}))  # an integer, by its digits


def test_a_message_over_1000_characters_is_refused_naming_the_limit() -> None:
    assert parse_order_request(Action.DENY, deny(message="x" * 1000)).message == "x" * 1000
    assert parse_order_request(Action.DENY, deny(message=f"  {'x' * 1000}\n")).message == "x" * 1000
    with pytest.raises(InvalidOrder, match=r"^message: must be at most 1000 characters \(got 1001\)"):
        parse_order_request(Action.DENY, deny(message="x" * 1001))


# -- in the producer -------------------------------------------------------------------


def no_keys_naming(cluster: Cluster, marker: str) -> bool:
    return not list(cluster.redis.client.scan_iter(match=f"*{marker}*", count=1000))


def test_delay_refuses_a_2mb_message_and_enqueues_nothing(cluster: Cluster, tasks: ModuleType) -> None:
    before, order_id = cluster.redis.client.llen("mipos"), new_order_id()
    with pytest.raises(ValueError, match=r"^message: must be at most 1000 characters \(got 2000000\)"):
        tasks.deny_order.delay(delivery_id=1, store_id="3", order_external_id=order_id,
                               message="x" * 2_000_000)
    assert cluster.redis.client.llen("mipos") == before
    assert no_keys_naming(cluster, order_id)


def test_delay_refuses_a_100kb_order_id_and_enqueues_nothing(cluster: Cluster, tasks: ModuleType) -> None:
    before, marker = cluster.redis.client.llen("mipos"), new_order_id()
    with pytest.raises(ValueError, match=r"^order_external_id: must be at most 200 characters"):
        tasks.deny_order.delay(delivery_id=1, store_id="3", order_external_id=marker + "y" * 100_000,
                               message="Out of stock")
    assert cluster.redis.client.llen("mipos") == before
    assert no_keys_naming(cluster, marker)


@pytest.fixture
def published_headers() -> Iterator[list[dict[str, Any]]]:
    """The headers of every task message this process publishes (``kwargsrepr`` among them)."""
    seen: list[dict[str, Any]] = []

    def keep(headers: dict[str, Any] | None = None, **_: Any) -> None:
        seen.append(dict(headers or {}))
    before_task_publish.connect(keep, weak=False)
    yield seen
    before_task_publish.disconnect(keep)


def test_what_flower_is_shown_of_a_task_is_bounded(cluster: Cluster, tasks: ModuleType,
                                                   published_headers: list[dict[str, Any]]) -> None:
    order_id = new_order_id() + "z" * (200 - 36)
    tasks.deny_order.delay(delivery_id="d" * 200, store_id="s" * 200, order_external_id=order_id,
                           message="m" * 1000)
    [headers] = [h for h in published_headers if h.get("task") == "mipos.deny_order"]
    shown = headers["kwargsrepr"]
    assert len(shown) <= 1024, len(shown)
    assert order_id in shown and "s" * 200 in shown  # the ids, whole: what one searches for
    assert "m" * 1000 not in shown and "m" * 100 in shown
    assert "_mipos" not in shown
    [line] = cluster.wait_final(order_id)
    assert line["outcome"] == "denied"


# -- in the worker, for a message sent by name -------------------------------------------


@pytest.mark.parametrize("fields, needle", [
    ({"message": "x" * 1001}, "message: must be at most 1000 characters (got 1001)"),
    ({"store_id": "3" * 201}, "store_id: must be at most 200 characters (got 201)"),
])
def test_the_worker_dead_letters_oversized_fields_sent_by_name(
        cluster: Cluster, fields: dict[str, str], needle: str) -> None:
    from worker.wiring.celery_app import app

    order_id = new_order_id()
    app.send_task("mipos.deny_order", kwargs={**deny(order_external_id=order_id), **fields},
                  queue="mipos")
    [line] = cluster.wait_final(order_id)
    assert (line["outcome"], line["fail_reason"]) == ("failed", "invalid")
    assert needle in line["error"]
    letter = dead_letter_of(cluster.redis, order_id)
    assert letter.reason == "invalid"
    assert all(len(str(value)) <= 1001 for value in letter.order.values())  # kept, cut short
    assert all(len(str(value)) <= 1001 for value in line.values() if isinstance(value, str)
               and value is not line["error"])
    assert cluster.control.requests(order_external_id=order_id) == []


def test_replaying_an_older_letter_over_the_limit_is_refused_not_a_crash(cluster: Cluster) -> None:
    """A letter stored before the limits (a 1001-character reason) cannot be sent again as it is."""
    order = deny(order_external_id=new_order_id(), message="x" * 1001)
    letter = DeadLetters(cluster.redis.client, "mipos:").add(
        action="deny", order=order, reason="permanent", error="Order not found.",
        task_id=new_order_id(), enqueued_at=None, attempts=[])
    result = subprocess.run([CLI, "dead", "replay", letter.id], check=False, cwd=ROOT, env=cluster.env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "not replayable: message: must be at most 1000 characters" in result.stdout
    assert "Traceback" not in result.stderr and "unexpected error" not in result.stderr
    assert cluster.control.requests(order_external_id=order["order_external_id"]) == []
