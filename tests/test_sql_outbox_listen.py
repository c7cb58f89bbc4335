"""The relay woken by the POS's commit on PostgreSQL (LISTEN/NOTIFY; mipos_worker/sql_outbox/listen.py).

The writer notifies in the POS's transaction; PostgreSQL delivers it on commit
only. The relay process LISTENs on a connection of its own and still polls as
the safety net: a relay whose LISTEN connection is killed reconnects and loses
nothing. Real PostgreSQL, Redis, workers and the sandbox.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from support.processes import wait_for
from tests import postgres
from tests.conftest import ClusterFactory, new_order_id
from tests.outbox_processes import (
    RelayProcess,
    accepts_by_order,
    run_script,
    wait_accepted,
)
from tests.test_django_outbox import SETUP, django_env
from tests.test_sql_outbox_e2e import ORDERS, backlog, pos_database

FENCE = "fence"


def driver_dsn(url: str) -> str:
    """A psycopg DSN for a SQLAlchemy ``postgresql+psycopg://`` URL."""
    return url.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture
def pg_url(pg_server: postgres.PostgresServer, tmp_path: Path) -> str:
    return pos_database("postgresql", tmp_path, pg_server)


@pytest.fixture
def listening(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection of the test's own, LISTENing on the outbox's channel."""
    with psycopg.connect(driver_dsn(pg_url), autocommit=True) as conn:
        conn.execute("LISTEN mipos_outbox")
        yield conn


def payloads_until_fence(conn: psycopg.Connection[Any], dsn: str) -> list[str]:
    """Every notification's payload up to a fence the test sends last: PostgreSQL delivers
    notifications in commit order, so what comes before the fence is all that was sent."""
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute(f"NOTIFY mipos_outbox, '{FENCE}'")
    payloads: list[str] = []
    for notification in conn.notifies(timeout=10):
        payloads.append(notification.payload)
        if notification.payload == FENCE:
            return payloads
    raise AssertionError(f"no fence within 10 s; got {payloads}")


def write(engine: sa.Engine, how: str, order_id: str, *, commit: bool) -> None:
    from mipos_worker import sql_outbox

    if how == "session":
        with Session(engine) as session:
            session.execute(sa.insert(ORDERS).values(external_id=order_id))
            sql_outbox.accept(session, delivery_id=1, store_id="3", order_external_id=order_id)
            session.commit() if commit else session.rollback()
        return
    with engine.connect() as conn:
        conn.execute(sa.insert(ORDERS).values(external_id=order_id))
        sql_outbox.accept(conn, delivery_id=1, store_id="3", order_external_id=order_id)
        conn.commit() if commit else conn.rollback()


@pytest.mark.parametrize("how", ["connection", "session"])
def test_a_commit_notifies_the_relay_and_a_rollback_does_not(
        pg_url: str, listening: psycopg.Connection[Any], how: str) -> None:
    engine = sa.create_engine(pg_url)
    try:
        write(engine, how, new_order_id(), commit=False)
        assert payloads_until_fence(listening, driver_dsn(pg_url)) == [FENCE]
        write(engine, how, new_order_id(), commit=True)
        assert payloads_until_fence(listening, driver_dsn(pg_url)) == ["", FENCE]
        assert backlog(pg_url) == 1  # the row itself is written as before
    finally:
        engine.dispose()


DJANGO_WRITES = SETUP + """
    from mipos_worker.django_outbox import outbox
    committed, rolled_back = sys.argv[1:3]
    try:
        with transaction.atomic():
            outbox.deny(delivery_id=2, store_id="3", order_external_id=rolled_back, message="No")
            raise Rollback()
    except Rollback:
        pass
    with transaction.atomic():
        outbox.accept(delivery_id=1, store_id="3", order_external_id=committed)
    print(json.dumps(report))
"""


def test_the_django_outbox_notifies_on_commit_only(
        pg_server: postgres.PostgresServer, redis_server: Any) -> None:
    dsn = driver_dsn(pg_server.create_database(f"dj_{uuid.uuid4().hex[:10]}"))  # Django migrates it
    with psycopg.connect(dsn, autocommit=True) as listening:
        listening.execute("LISTEN mipos_outbox")
        done = run_script(django_env(redis_server.url, dsn), DJANGO_WRITES, new_order_id(), new_order_id())
        assert done.returncode == 0, done.stderr
        assert payloads_until_fence(listening, dsn) == ["", FENCE]


def test_sqlite_writes_no_notify(tmp_path: Path, pg_server: postgres.PostgresServer) -> None:
    url = pos_database("sqlite", tmp_path, pg_server)
    engine = sa.create_engine(url)
    try:
        write(engine, "connection", new_order_id(), commit=True)  # nothing PostgreSQL-only is sent
        assert backlog(url) == 1
    finally:
        engine.dispose()


def listener_pids(pg_url: str) -> list[int]:
    """The relay's LISTEN connections to this database (pg_stat_activity)."""
    database = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(driver_dsn(pg_url), autocommit=True) as conn:
        return [pid for (pid,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
            (database, "mipos-outbox-listener")).fetchall()]


def commit_orders(pg_url: str, order_ids: list[str]) -> None:
    from mipos_worker import sql_outbox

    engine = sa.create_engine(pg_url)
    try:
        for n, order_id in enumerate(order_ids):
            with engine.begin() as conn:
                conn.execute(sa.insert(ORDERS).values(external_id=order_id))
                sql_outbox.accept(conn, delivery_id=n, store_id="3", order_external_id=order_id)
    finally:
        engine.dispose()


def events(relay: RelayProcess, name: str) -> list[dict[str, Any]]:
    return [line for line in relay.lines() if line.get("event") == name]


def test_the_relay_process_publishes_a_commit_without_waiting_for_its_poll(
        make_cluster: ClusterFactory, pg_url: str, tmp_path: Path) -> None:
    """Polling every 120 s, the relay still has the order at mipos well inside that."""
    cluster = make_cluster()
    relay = RelayProcess(cluster.env, tmp_path / "relay.log", pg_url, "--poll-interval", "120s")
    try:
        wait_for(lambda: events(relay, "outbox_backlog"), timeout=20, what="the relay's first poll")
        order_ids = [new_order_id() for _ in range(5)]
        commit_orders(pg_url, order_ids)
        counts = wait_accepted(cluster.control, set(order_ids), timeout=30)
        wait_for(lambda: backlog(pg_url) == 0, timeout=10, what="the rows to be deleted")
    finally:
        relay.stop()
    assert all(counts[o] == 1 for o in order_ids), counts
    [listening] = events(relay, "outbox_listening")
    assert listening["channel"] == "mipos_outbox" and listening["reconnected"] is False


def test_a_relay_whose_listen_connection_is_killed_reconnects_and_loses_nothing(
        make_cluster: ClusterFactory, pg_url: str, tmp_path: Path) -> None:
    """``pg_terminate_backend`` on the LISTEN connection: the orders committed meanwhile are
    accepted once, within one poll interval; the relay listens again and is woken again."""
    poll_s = 60.0
    cluster = make_cluster()
    relay = RelayProcess(cluster.env, tmp_path / "relay.log", pg_url, "--poll-interval", f"{poll_s}s")
    try:
        [first] = wait_for(lambda: listener_pids(pg_url), timeout=20, what="the relay to LISTEN")
        with psycopg.connect(driver_dsn(pg_url), autocommit=True) as conn:
            assert conn.execute("SELECT pg_terminate_backend(%s)", (first,)).fetchone() == (True,)
        during = [new_order_id() for _ in range(20)]
        commit_orders(pg_url, during)
        counts = wait_accepted(cluster.control, set(during), timeout=poll_s)

        wait_for(lambda: [p for p in listener_pids(pg_url) if p != first], timeout=20,
                 what="the relay to LISTEN again")
        after = [new_order_id() for _ in range(5)]
        commit_orders(pg_url, after)
        # Well inside the next poll: woken by the new LISTEN connection.
        counts = wait_accepted(cluster.control, set(during + after), timeout=poll_s / 2)
        wait_for(lambda: backlog(pg_url) == 0, timeout=10, what="the rows to be deleted")
    finally:
        relay.stop()
    assert all(counts[o] == 1 for o in during + after), counts
    assert listener_pids(pg_url) == []  # the relay closed its LISTEN connection on its way out
    [lost] = events(relay, "outbox_listen_lost")
    assert "terminat" in lost["error"]
    assert [line["reconnected"] for line in events(relay, "outbox_listening")] == [False, True]
    assert sum(accepts_by_order(cluster.control)[o] for o in during + after) == 25


def test_the_django_app_notifies_the_channel_the_relay_listens_on() -> None:
    from mipos_worker.django_outbox import outbox
    from mipos_worker.sql_outbox import listen

    assert outbox.NOTIFY_CHANNEL == listen.CHANNEL


def test_no_listen_polls_only(make_cluster: ClusterFactory, pg_url: str, tmp_path: Path) -> None:
    """``--no-listen``: no LISTEN connection; rows still go, found by the polling."""
    cluster = make_cluster()
    relay = RelayProcess(cluster.env, tmp_path / "relay.log", pg_url, "--no-listen")
    try:
        wait_for(lambda: events(relay, "outbox_backlog"), timeout=20, what="the relay's first poll")
        order_ids = [new_order_id() for _ in range(3)]
        commit_orders(pg_url, order_ids)
        counts = wait_accepted(cluster.control, set(order_ids), timeout=30)
        assert listener_pids(pg_url) == []
    finally:
        relay.stop()
    assert all(counts[o] == 1 for o in order_ids), counts
    assert events(relay, "outbox_listening") == []
