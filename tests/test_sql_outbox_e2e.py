"""The outbox end to end: a POS process, its database, the relay process, Redis, real workers
and the sandbox mipos. Each order must be accepted at mipos exactly once."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from support.processes import RedisServer, wait_for
from tests import postgres
from tests.conftest import Cluster, ClusterFactory, new_order_id
from tests.outbox_processes import (
    RelayProcess,
    accepts_by_order,
    run_script,
    start_script,
    wait_accepted,
)

ORDERS = sa.Table("orders", sa.MetaData(), sa.Column("external_id", sa.String(64), primary_key=True))

POS_COMMITS_THEN_WAITS = """
    import sys
    import sqlalchemy as sa
    from mipos_worker import sql_outbox

    engine = sa.create_engine(sys.argv[1])
    with engine.begin() as conn:  # the order and its acceptance: one transaction
        conn.execute(sa.text("INSERT INTO orders (external_id) VALUES (:id)"), {"id": sys.argv[2]})
        sql_outbox.accept(conn, delivery_id=5, store_id="3", order_external_id=sys.argv[2])
    print("committed", flush=True)
    sys.stdin.read()  # the POS carries on until it is killed
"""

RELAY_DIES_BEFORE_DELETE = """
    import os, signal, sys
    import sqlalchemy as sa
    from mipos_worker.sql_outbox import Relay

    relay = Relay(sa.create_engine(sys.argv[1]), lease_s=0.5)
    def die(*_args):
        print("published", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # after the publish, before the delete
    relay._delete = die
    relay.run_once()
"""


def pos_database(kind: str, tmp_path: Path, pg_server: postgres.PostgresServer) -> str:
    from mipos_worker import sql_outbox

    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'pos.sqlite3'}"
    else:
        url = pg_server.create_database(f"pos_{uuid.uuid4().hex[:10]}")
    engine = sa.create_engine(url)
    sql_outbox.create_tables(engine)
    ORDERS.create(engine)
    engine.dispose()
    return url


def backlog(url: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM mipos_outbox")).scalar_one())
    finally:
        engine.dispose()


def test_pos_killed_after_its_commit_is_accepted_once_by_a_relay_started_later(
        make_cluster: ClusterFactory, pg_server: postgres.PostgresServer, tmp_path: Path) -> None:
    cluster = make_cluster()
    url = pos_database("postgresql", tmp_path, pg_server)
    order_id = new_order_id()
    pos = start_script(cluster.env, POS_COMMITS_THEN_WAITS, url, order_id)
    try:
        assert pos.stdout is not None and pos.stdout.readline().strip() == "committed", pos.stderr
    finally:
        pos.kill()  # SIGKILL: nothing was ever published
        pos.wait(timeout=10)
    assert backlog(url) == 1
    assert accepts_by_order(cluster.control)[order_id] == 0

    relay = RelayProcess(cluster.env, tmp_path / "relay.log", url)
    try:
        lines = cluster.wait_final(order_id, timeout=30)
        wait_for(lambda: backlog(url) == 0, timeout=10, what="the row to be deleted")
    finally:
        relay.stop()
    assert [line["outcome"] for line in lines] == ["accepted"]
    assert accepts_by_order(cluster.control)[order_id] == 1
    assert any(line.get("event") == "outbox_backlog" for line in relay.lines())


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_relay_killed_between_publish_and_delete_publishes_again_and_mipos_accepts_once(
        make_cluster: ClusterFactory, pg_server: postgres.PostgresServer, tmp_path: Path, kind: str) -> None:
    cluster = make_cluster()
    url = pos_database(kind, tmp_path, pg_server)
    order_id = new_order_id()
    assert run_script(cluster.env, POS_COMMITS_THEN_WAITS.replace("sys.stdin.read()", "pass"),
                      url, order_id).returncode == 0
    dying = run_script(cluster.env, RELAY_DIES_BEFORE_DELETE, url)
    assert dying.stdout.strip() == "published" and dying.returncode == -9, dying.stderr
    assert backlog(url) == 1  # the delete never happened

    relay = RelayProcess(cluster.env, tmp_path / "relay.log", url)
    try:
        lines = cluster.wait_final(order_id, count=2, timeout=30)  # both messages, one per publish
        wait_for(lambda: backlog(url) == 0, timeout=10, what="the row to be deleted")
    finally:
        relay.stop()
    outcomes = sorted(line["outcome"] for line in lines if line["outcome"] != "retrying")
    assert outcomes == ["accepted", "skipped"]
    assert len({line["task_id"] for line in lines}) == 1  # the same task id both times
    assert accepts_by_order(cluster.control)[order_id] == 1


def test_redis_down_for_30s_while_200_orders_commit(
        make_cluster: ClusterFactory, redis_server: RedisServer, pg_server: postgres.PostgresServer,
        tmp_path: Path) -> None:
    """The POS's commits neither fail nor wait for Redis; every order is accepted once after."""
    from mipos_worker import sql_outbox

    cluster = make_cluster()
    url = pos_database("postgresql", tmp_path, pg_server)
    relay = RelayProcess(cluster.env, tmp_path / "relay.log", url)
    engine = sa.create_engine(url)
    order_ids = [new_order_id() for _ in range(200)]
    commit_s: list[float] = []
    try:
        redis_server.stop()
        outage_started = time.monotonic()
        for n, order_id in enumerate(order_ids):
            started = time.perf_counter()
            with engine.begin() as conn:
                conn.execute(sa.insert(ORDERS).values(external_id=order_id))
                sql_outbox.accept(conn, delivery_id=n, store_id="3", order_external_id=order_id)
            commit_s.append(time.perf_counter() - started)
            # Spread the commits over the 30 s outage (the pace, not synchronisation).
            time.sleep(max(0.0, outage_started + 30.0 * (n + 1) / len(order_ids) - time.monotonic()))
        assert backlog(url) == 200
        assert any(line.get("event") == "outbox_publish_failed" for line in relay.lines())
        redis_server.start()

        counts = wait_accepted(cluster.control, set(order_ids), timeout=90)
        wait_for(lambda: backlog(url) == 0, timeout=10, what="the outbox to drain")
    finally:
        if redis_server.proc.poll() is not None:
            redis_server.start()
        relay.stop()
        engine.dispose()
    assert all(counts[o] == 1 for o in order_ids), [o for o in order_ids if counts[o] != 1]
    # Not a speed benchmark: a commit that waited for Redis would take seconds.
    assert max(commit_s) < 2.0, max(commit_s)


def test_two_relays_on_one_postgresql_outbox_under_1000_orders(
        make_cluster: ClusterFactory, pg_server: postgres.PostgresServer, tmp_path: Path) -> None:
    from mipos_worker import sql_outbox

    cluster: Cluster = make_cluster(processes=2, WORKER_CONCURRENCY="8")
    url = pos_database("postgresql", tmp_path, pg_server)
    relays = [RelayProcess(cluster.env, tmp_path / f"relay-{n}.log", url, "--batch-size", "20")
              for n in range(2)]
    engine = sa.create_engine(url, pool_size=4)
    order_ids = [new_order_id() for _ in range(1000)]

    def pos_thread(part: list[str]) -> None:
        for order_id in part:
            with engine.begin() as conn:
                conn.execute(sa.insert(ORDERS).values(external_id=order_id))
                sql_outbox.accept(conn, delivery_id=1, store_id="3", order_external_id=order_id)

    try:
        threads = [threading.Thread(target=pos_thread, args=(order_ids[n::4],)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        counts = wait_accepted(cluster.control, set(order_ids), timeout=120)
        wait_for(lambda: backlog(url) == 0, timeout=10, what="the outbox to drain")
        published = [relay.published() for relay in relays]
    finally:
        for relay in relays:
            relay.stop()
        engine.dispose()
    assert all(counts[o] == 1 for o in order_ids), [o for o in order_ids if counts[o] != 1]
    assert sum(published) >= 1000  # each row published at least once
    assert all(p > 0 for p in published), published  # both relays took batches
