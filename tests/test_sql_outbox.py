"""The transactional outbox (mipos_worker/sql_outbox) on real databases, in this process: what is
written, what is refused, what the relay publishes, and what it moves aside.

PostgreSQL and MariaDB are servers of the tests' own (tests/postgres.py,
tests/mariadb.py); Redis is the session's. No worker runs here: the messages
are read from the Redis queue (tests/test_sql_outbox_e2e.py has the workers).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa

from support.processes import RedisServer
from tests import mariadb

QUEUE = "mipos"


@pytest.fixture(scope="module")
def maria_server() -> Iterator[mariadb.MariaDBServer | None]:
    server = mariadb.MariaDBServer() if mariadb.available() else None
    yield server
    if server is not None:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def engine(request: pytest.FixtureRequest, tmp_path: Path, tasks: ModuleType) -> Iterator[sa.Engine]:
    """A fresh POS database with an ``orders`` table and the outbox tables."""
    name = f"pos_{uuid.uuid4().hex[:10]}"
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'pos.sqlite3'}"
    elif request.param == "postgresql":
        url = request.getfixturevalue("pg_server").create_database(name)
    else:
        server = request.getfixturevalue("maria_server")
        if server is None:
            pytest.skip("MariaDB is not installed (optional: apt-get install mariadb-server)")
        url = server.create_database(name)
    engine = sa.create_engine(url)
    from mipos_worker import sql_outbox

    sql_outbox.create_tables(engine)
    ORDERS.create(engine)
    yield engine
    engine.dispose()


ORDERS = sa.Table("orders", sa.MetaData(), sa.Column("external_id", sa.String(64), primary_key=True))


def messages(redis_server: RedisServer, task_ids: set[str] | None = None) -> list[dict[str, Any]]:
    """Messages in the queue, oldest first (kombu LPUSHes), optionally only these tasks'."""
    found = []
    for raw in reversed(redis_server.client.lrange(QUEUE, 0, -1)):
        message = json.loads(raw)
        if task_ids is None or message["headers"]["id"] in task_ids:
            found.append(message)
    return found


def store_order(engine: sa.Engine, order_id: str, *, action: str = "accept") -> str:
    from mipos_worker import sql_outbox

    with engine.begin() as conn:
        conn.execute(sa.insert(ORDERS).values(external_id=order_id))
        if action == "accept":
            return sql_outbox.accept(conn, delivery_id=7, store_id="3", order_external_id=order_id)
        return sql_outbox.deny(conn, delivery_id=7, store_id="3", order_external_id=order_id,
                               message="Out of stock")


def rows(engine: sa.Engine, table: sa.Table) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(table).order_by(table.c.id)).all())


def test_rows_are_published_oldest_first_with_their_age_and_deleted(
        engine: sa.Engine, redis_server: RedisServer) -> None:
    from mipos_worker.sql_outbox import Relay, outbox_table

    redis_server.client.delete(QUEUE)
    order_ids = [str(uuid.uuid4()) for _ in range(3)]
    task_ids = [store_order(engine, order_ids[0]), store_order(engine, order_ids[1]),
                store_order(engine, order_ids[2], action="deny")]
    assert [r.task_id for r in rows(engine, outbox_table)] == task_ids
    assert rows(engine, outbox_table)[0].created_at > 1.7e9  # epoch seconds, the database's clock

    result = Relay(engine).run_once()

    assert (result.published, result.moved_aside) == (3, 0)
    assert rows(engine, outbox_table) == []
    sent = messages(redis_server, set(task_ids))
    assert [m["headers"]["id"] for m in sent] == task_ids  # oldest first, the row's task id
    assert [m["headers"]["task"] for m in sent] == ["mipos.accept_order"] * 2 + ["mipos.deny_order"]
    body = json.loads(__import__("base64").b64decode(sent[2]["body"]))
    kwargs = body[1]
    assert kwargs["order_external_id"] == order_ids[2] and kwargs["message"] == "Out of stock"
    assert kwargs["delivery_id"] == "7"
    # The enqueue time is on Redis's clock, counted back by the row's age.
    redis_now = float(redis_server.client.time()[0])
    assert redis_now - 30 < kwargs["_mipos"]["enqueued_at"] <= redis_now + 1


def test_a_rolled_back_transaction_leaves_nothing_to_send(
        engine: sa.Engine, redis_server: RedisServer) -> None:
    from mipos_worker import sql_outbox

    redis_server.client.delete(QUEUE)
    with engine.connect() as conn:
        with conn.begin() as transaction:
            conn.execute(sa.insert(ORDERS).values(external_id="rolled-back"))
            sql_outbox.accept(conn, delivery_id=1, store_id="3", order_external_id="rolled-back")
            transaction.rollback()

    assert sql_outbox.Relay(engine).run_once().seen == 0
    assert rows(engine, sql_outbox.outbox_table) == []
    assert redis_server.client.llen(QUEUE) == 0


@pytest.mark.parametrize("arguments, field", [
    ({"delivery_id": 1, "store_id": "", "order_external_id": "x"}, "store_id"),
    ({"delivery_id": 1, "store_id": "3"}, "order_external_id"),
    ({"delivery_id": 1, "store_id": "3", "order_external_id": "x", "message": "no"}, "message"),
    ({"delivery_id": 1, "store_id": "3", "order_external_id": "x", "_mipos": {"enqueued_at": 1}}, "_mipos"),
    ({"delivery_id": 1, "store_id": "3", "order_external_id": "x", "enqueued_at": 1.0}, "enqueued_at"),
    ({"delivery_id": True, "store_id": "3", "order_external_id": "x"}, "delivery_id"),
])
def test_bad_arguments_raise_before_anything_is_written(
        engine: sa.Engine, arguments: dict[str, Any], field: str) -> None:
    from mipos_worker import accept_order, sql_outbox

    with engine.begin() as conn:
        with pytest.raises(ValueError, match=f"^{field}") as raised:
            sql_outbox.accept(conn, **arguments)
    with pytest.raises(ValueError) as by_delay:  # exactly what delay() says
        accept_order.delay(**arguments)
    assert str(raised.value) == str(by_delay.value)
    assert rows(engine, sql_outbox.outbox_table) == []


def test_a_deny_needs_its_message(engine: sa.Engine) -> None:
    from mipos_worker import sql_outbox

    with engine.begin() as conn, pytest.raises(ValueError, match="^message"):
        sql_outbox.deny(conn, delivery_id=1, store_id="3", order_external_id="x")


def test_a_row_that_can_never_be_sent_is_moved_aside_with_the_reason(
        engine: sa.Engine, redis_server: RedisServer) -> None:
    """Written by hand (or an older version): never retried forever, never silently deleted."""
    from mipos_worker.sql_outbox import Relay, dead_table, outbox_table
    from mipos_worker.sql_outbox.schema import db_now

    redis_server.client.delete(QUEUE)
    good = str(uuid.uuid4())
    bad_rows = [
        ("accept", json.dumps({"delivery_id": 1, "store_id": "", "order_external_id": "a"}), "store_id"),
        ("accept", "{not json", "JSONDecodeError"),
        ("cancel", json.dumps({"delivery_id": 1, "store_id": "3", "order_external_id": "b"}), "cancel"),
        ("accept", json.dumps({"delivery_id": 1, "store_id": "3", "order_external_id": "c",
                               "_mipos": {"enqueued_at": 1}}), "_mipos"),
        ("accept", json.dumps(["1", "3", "d"]), "JSON object"),
    ]
    with engine.begin() as conn:
        for action, arguments, _ in bad_rows:
            conn.execute(sa.insert(outbox_table).values(
                task_id=str(uuid.uuid4()), action=action, arguments=arguments,
                created_at=db_now(engine.dialect), tries=0))
    good_task = store_order(engine, good)

    result = Relay(engine).run_once()

    assert (result.published, result.moved_aside) == (1, len(bad_rows))
    assert rows(engine, outbox_table) == []
    dead = rows(engine, dead_table)
    assert [d.arguments for d in dead] == [arguments for _, arguments, _ in bad_rows]
    for row, (_, _, why) in zip(dead, bad_rows, strict=True):
        assert why in row.reason
    assert [m["headers"]["id"] for m in messages(redis_server)] == [good_task]
    status = Relay(engine).status()
    assert (status.backlog, status.dead) == (0, len(bad_rows))


def test_redis_down_keeps_the_rows_and_counts_the_try(engine: sa.Engine, tmp_path: Path) -> None:
    from mipos_worker.sql_outbox import RedisUnavailable, Relay, outbox_table
    from support.processes import free_port
    from worker.wiring.celery_app import app

    store_order(engine, str(uuid.uuid4()))
    store_order(engine, str(uuid.uuid4()))
    saved = app.conf.broker_url
    app.conf.broker_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    try:
        with pytest.raises(RedisUnavailable):
            Relay(engine).run_once()
    finally:
        app.conf.broker_url = saved
    kept = rows(engine, outbox_table)
    assert len(kept) == 2
    assert kept[0].tries == 1 and kept[0].last_error
    assert kept[1].claimed_until is None  # a leased batch is released at once
    status = Relay(engine).status()
    assert status.backlog == 2 and status.oldest_age_s is not None and status.oldest_age_s >= 0


def test_sqlite_lease_keeps_a_claimed_batch_from_a_second_relay(
        tmp_path: Path, tasks: ModuleType, redis_server: RedisServer) -> None:
    from mipos_worker.sql_outbox import Relay, create_tables, outbox_table

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'lease.sqlite3'}")
    create_tables(engine)
    ORDERS.create(engine)
    store_order(engine, str(uuid.uuid4()))
    first, second = Relay(engine, lease_s=60), Relay(engine, lease_s=60)
    published: list[str] = []

    def publish_then_look(batch: list[Any]) -> list[None]:
        published.extend(row.task_id for row in batch)
        assert second.run_once().seen == 0  # the row is claimed by the first relay
        return [None] * len(batch)

    first._publish = publish_then_look  # type: ignore[method-assign]
    assert first.run_once().published == 1
    assert len(published) == 1 and rows(engine, outbox_table) == []
