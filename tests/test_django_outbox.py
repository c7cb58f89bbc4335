"""Django: the outbox app in a test project (tests/django_settings.py), and
``delay_on_commit`` on the order tasks. Each Django process is a subprocess:
Django's settings are per process."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from support.processes import RedisServer, wait_for
from tests import postgres
from tests.conftest import ClusterFactory, new_order_id
from tests.outbox_processes import RelayProcess, accepts_by_order, run_script

SETUP = """
    import json, os, sys
    import django
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.django_settings"
    django.setup()
    from django.core.management import call_command
    from django.db import connection, transaction
    call_command("migrate", verbosity=0)
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS pos_order (external_id VARCHAR(64) PRIMARY KEY)")

    from mipos_worker import accept_order, deny_order

    import redis
    queue = redis.Redis.from_url(os.environ["REDIS_URL"])
    def queued(order_id):
        return sum(order_id in json.loads(m)["headers"].get("kwargsrepr", "")
                   for m in queue.lrange("mipos", 0, -1))
    class Rollback(Exception):
        pass
    report = {}
"""

DELAY_ON_COMMIT = SETUP + """
    inside, outside, rolled_back = sys.argv[1:4]
    with transaction.atomic():
        accept_order.delay_on_commit(delivery_id=1, store_id="3", order_external_id=inside)
        report["inside_before_commit"] = queued(inside)
    report["inside_after_commit"] = queued(inside)
    accept_order.delay_on_commit(delivery_id=2, store_id="3", order_external_id=outside)
    report["outside"] = queued(outside)
    try:
        with transaction.atomic():
            deny_order.delay_on_commit(delivery_id=3, store_id="3", order_external_id=rolled_back,
                                       message="Out of stock")
            raise Rollback()
    except Rollback:
        pass
    report["rolled_back"] = queued(rolled_back)
    try:
        with transaction.atomic():
            accept_order.delay_on_commit(delivery_id=4, store_id="", order_external_id="x")
    except ValueError as exc:
        report["bad"] = str(exc)
    print(json.dumps(report))
"""

OUTBOX = SETUP + """
    from mipos_worker.django_outbox import outbox
    from mipos_worker.django_outbox.models import OutboxRow
    committed, rolled_back = sys.argv[1:3]
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO pos_order (external_id) VALUES (%s)", [committed])
        outbox.accept(delivery_id=1, store_id="3", order_external_id=committed)
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO pos_order (external_id) VALUES (%s)", [rolled_back])
            outbox.deny(delivery_id=2, store_id="3", order_external_id=rolled_back, message="No")
            raise Rollback()
    except Rollback:
        pass
    try:
        with transaction.atomic():
            outbox.accept(delivery_id=1, store_id="3", order_external_id="x", _mipos={})
    except ValueError as exc:
        report["bad"] = str(exc)
    report["rows"] = [json.loads(r.arguments)["order_external_id"] for r in OutboxRow.objects.all()]
    report["queued"] = queued(committed)  # nothing goes to Redis from the POS's process
    print(json.dumps(report))
"""


def django_env(redis_url: str, database: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MIPOS_")}
    return {**env, "REDIS_URL": redis_url, "MIPOS_TEST_DJANGO_DB": database}


def test_delay_on_commit_enqueues_after_the_commit_and_never_after_a_rollback(
        redis_server: RedisServer, tmp_path: Path) -> None:
    redis_server.client.delete("mipos")
    inside, outside, rolled_back = (new_order_id() for _ in range(3))
    done = run_script(django_env(redis_server.url, str(tmp_path / "pos.sqlite3")), DELAY_ON_COMMIT,
                      inside, outside, rolled_back)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["inside_before_commit"] == 0
    assert report["inside_after_commit"] == 1
    assert report["outside"] == 1  # no transaction: at once
    assert report["rolled_back"] == 0
    assert report["bad"].startswith("store_id")  # checked at once, as delay() does


def test_the_order_tasks_have_delay_on_commit() -> None:
    """The POS side's tasks are the worker's: ``from tasks import ...`` in a checkout is the same object."""
    import mipos_worker
    import tasks
    from mipos_worker.order_tasks import OrderTask

    assert tasks.accept_order is mipos_worker.accept_order and tasks.deny_order is mipos_worker.deny_order
    assert isinstance(mipos_worker.accept_order, OrderTask) and hasattr(mipos_worker.accept_order, "delay_on_commit")


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_django_outbox_commits_with_the_order_and_the_relay_gets_it_accepted(
        make_cluster: ClusterFactory, pg_server: postgres.PostgresServer, tmp_path: Path, kind: str) -> None:
    cluster = make_cluster()
    if kind == "sqlite":
        path = tmp_path / "pos.sqlite3"
        database, url = str(path), f"sqlite:///{path}"
    else:
        url = pg_server.create_database(f"dj_{uuid.uuid4().hex[:10]}")
        database = url.replace("postgresql+psycopg://", "postgresql://")
    committed, rolled_back = new_order_id(), new_order_id()
    done = run_script(django_env(cluster.redis.url, database), OUTBOX, committed, rolled_back)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["rows"] == [committed] and report["queued"] == 0
    assert report["bad"].startswith("_mipos")

    relay = RelayProcess(cluster.env, tmp_path / "relay.log", url)
    try:
        lines = cluster.wait_final(committed, timeout=30)
        wait_for(lambda: relay.published() >= 1, timeout=10, what="the relay's count")
    finally:
        relay.stop()
    assert [line["outcome"] for line in lines] == ["accepted"]
    counts = accepts_by_order(cluster.control)
    assert counts[committed] == 1 and counts[rolled_back] == 0
    assert cluster.attempt_lines(rolled_back) == []
