"""The relay: committed outbox rows to Redis, oldest first, deleted only once Redis has them.

Several relays may run on one outbox. Where the database has row locks that a
reader can skip (PostgreSQL, MySQL 8, MariaDB 10.6) a relay locks a batch with
``FOR UPDATE SKIP LOCKED`` for the time it publishes it; the POS's inserts
never wait for those locks (READ COMMITTED: no gap locks). SQLite has no row
locks: a relay claims a batch with a lease in one short write and publishes
outside any transaction. Either way a relay killed after a publish and before
the delete leaves the row; it is published again under the same task id, and
the worker's ledger sends the order to mipos once.

A row whose arguments can never be sent moves to ``mipos_outbox_dead`` with the
reason. When Redis cannot be reached the rows wait and the relay backs off.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from kombu.exceptions import OperationalError
from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine, Row

from mipos_worker.logs import log
from mipos_worker.order.model import Action
from mipos_worker.order.request_check import check_request
from mipos_worker.order.stamps import Stamps
from mipos_worker.sql_outbox.schema import (
    db_now,
    dead_table,
    outbox_table,
    supports_skip_locked,
)

logger = logging.getLogger("mipos.outbox")

PUBLISH_ERRORS = (OperationalError, redis.RedisError, OSError)


class RedisUnavailable(Exception):
    """A publish failed for want of Redis: the rest of the batch waits."""


@dataclass(frozen=True)
class BatchResult:
    published: int = 0
    moved_aside: int = 0
    seen: int = 0


@dataclass(frozen=True)
class OutboxStatus:
    backlog: int
    oldest_age_s: float | None
    dead: int

    def fields(self) -> dict[str, Any]:
        return {"backlog": self.backlog, "dead_rows": self.dead,
                "oldest_age_s": None if self.oldest_age_s is None else round(self.oldest_age_s, 3)}


@dataclass
class RelayMetrics:
    """What one relay counted, and the last status it read (``--metrics-port`` serves them)."""

    published: int = 0  # rows published to Redis by this relay
    moved_aside: int = 0  # rows this relay moved aside as unpublishable
    status: OutboxStatus | None = None

    def observe(self, status: OutboxStatus) -> None:
        self.status = status


class Relay:
    def __init__(self, engine: Engine, *, batch_size: int = 100, lease_s: float = 30.0,
                 name: str | None = None) -> None:
        if engine.dialect.name in ("mysql", "mariadb"):
            # No gap locks: a relay's locked batch never holds back the POS's inserts.
            engine = engine.execution_options(isolation_level="READ COMMITTED")
        self.engine = engine
        self.batch_size = batch_size
        self.lease_s = lease_s
        self.name = name or uuid.uuid4().hex[:8]
        self.skip_locked = supports_skip_locked(engine.dialect)
        self.now = db_now(engine.dialect)
        self.metrics = RelayMetrics()
        self._dead_logged_at = 0.0

    # -- one batch --------------------------------------------------------------

    def run_once(self) -> BatchResult:
        """Publish one batch; raises ``RedisUnavailable`` (after keeping what went) when Redis is down."""
        return self._run_locked() if self.skip_locked else self._run_leased()

    def _columns(self) -> Sequence[Any]:
        t = outbox_table.c
        return (t.id, t.task_id, t.action, t.arguments, t.created_at,
                (self.now - t.created_at).label("age_s"))

    def _run_locked(self) -> BatchResult:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(*self._columns()).order_by(outbox_table.c.id).limit(self.batch_size)
                .with_for_update(skip_locked=True)).all()
            try:
                result = self._publish_rows(conn, rows)
            except RedisUnavailable:
                conn.commit()  # keep the deletes of what went before Redis failed
                raise
            conn.commit()
            return result

    def _run_leased(self) -> BatchResult:
        t = outbox_table.c
        claim = uuid.uuid4().hex
        with self.engine.begin() as conn:
            free = or_(t.claimed_until.is_(None), t.claimed_until < self.now)
            ids = conn.execute(select(t.id).where(free).order_by(t.id).limit(self.batch_size)).scalars().all()
            if not ids:
                return BatchResult()
            conn.execute(update(outbox_table).where(t.id.in_(ids), free)
                         .values(claim=claim, claimed_until=self.now + self.lease_s))
        with self.engine.connect() as conn:
            rows = conn.execute(select(*self._columns()).where(t.claim == claim).order_by(t.id)).all()
            conn.rollback()
            result = self._publish_rows(conn, rows, commit_each=True)
        return result

    def _publish_rows(self, conn: Connection, rows: Sequence[Row[Any]], *,
                      commit_each: bool = False) -> BatchResult:
        """Publish in order; delete what went. ``commit_each``: no batch transaction is open (lease)."""
        published: list[int] = []
        moved = 0
        try:
            for row in rows:
                reason = self._publish(row)
                if reason is None:
                    published.append(row.id)
                    if commit_each:
                        self._delete(conn, [row.id])
                        conn.commit()
                else:
                    self._move_aside(conn, row, reason)
                    if commit_each:
                        conn.commit()
                    moved += 1
        except RedisUnavailable as exc:
            waiting = rows[len(published) + moved:]
            t = outbox_table.c
            conn.execute(update(outbox_table).where(t.id == waiting[0].id).values(
                tries=t.tries + 1, last_error=str(exc)[:500]))
            # Free the rest of a leased batch at once for whichever relay reaches Redis first.
            conn.execute(update(outbox_table).where(t.id.in_([r.id for r in waiting]))
                         .values(claim=None, claimed_until=None))
            self._finish(conn, published, commit_each)
            self._count(len(published), moved)
            raise
        self._finish(conn, published, commit_each)
        self._count(len(published), moved)
        return BatchResult(published=len(published), moved_aside=moved, seen=len(rows))

    def _finish(self, conn: Connection, published: list[int], commit_each: bool) -> None:
        if not commit_each and published:
            self._delete(conn, published)
        if commit_each:
            conn.commit()

    def _delete(self, conn: Connection, ids: list[int]) -> None:
        conn.execute(delete(outbox_table).where(outbox_table.c.id.in_(ids)))

    def _count(self, published: int, moved: int) -> None:
        self.metrics.published += published
        self.metrics.moved_aside += moved

    def _publish(self, row: Row[Any]) -> str | None:
        """Publish one row; the reason it can never be published, or None when it went."""
        from mipos_worker.order_tasks import publish_order

        try:
            action = Action(row.action)
            arguments = json.loads(row.arguments)
            if not isinstance(arguments, dict):
                raise ValueError(f"arguments: must be a JSON object, got {type(arguments).__name__}")
            request = check_request(action, arguments)
        except ValueError as exc:  # InvalidOrder, JSONDecodeError and a bad action are ValueErrors
            return f"{type(exc).__name__}: {exc}"
        try:
            # The deadline counts from the commit: the row's age on the database's clock.
            publish_order(action, request.body(), Stamps(), age_s=max(0.0, float(row.age_s or 0.0)),
                          task_id=row.task_id)
        except PUBLISH_ERRORS as exc:
            raise RedisUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return None

    def _move_aside(self, conn: Connection, row: Row[Any], reason: str) -> None:
        conn.execute(insert(dead_table).values(
            id=row.id, task_id=row.task_id, action=str(row.action)[:8], arguments=row.arguments,
            created_at=row.created_at, moved_at=self.now, reason=reason[:2000]))
        self._delete(conn, [row.id])
        log(logger, logging.ERROR, "outbox_row_moved_aside", relay=self.name, row_id=row.id, task_id=row.task_id,
                     action=row.action, reason=reason, table=dead_table.name)

    # -- backlog ------------------------------------------------------------------

    def status(self) -> OutboxStatus:
        with self.engine.connect() as conn:
            backlog, oldest = conn.execute(
                select(func.count(), func.max(self.now - outbox_table.c.created_at))).one()
            dead = conn.execute(select(func.count()).select_from(dead_table)).scalar_one()
        status = OutboxStatus(int(backlog), None if oldest is None else float(oldest), int(dead))
        self.metrics.observe(status)
        return status

    def report(self) -> OutboxStatus:
        status = self.status()
        log(logger, logging.INFO, "outbox_backlog", relay=self.name, **status.fields())
        return status

    # -- the loop -------------------------------------------------------------------

    def run_forever(self, stop: threading.Event, wake: threading.Event | None = None, *,
                    poll_interval_s: float = 1.0, report_every_s: float = 30.0,
                    max_backoff_s: float = 5.0) -> None:
        """Until ``stop`` is set: publish, then sleep ``poll_interval_s`` or until ``wake``."""
        wake = wake or threading.Event()
        backoff = poll_interval_s
        next_report = 0.0
        eager_until = 0.0
        down_since: float | None = None
        while not stop.is_set():
            wait_s = poll_interval_s
            try:
                result = self.run_once()
                if down_since is not None:
                    log(logger, logging.INFO, "outbox_redis_back", relay=self.name,
                                down_for_s=round(time.monotonic() - down_since, 1))
                    down_since = None
                backoff = poll_interval_s
                if result.seen >= self.batch_size:
                    wait_s = 0.0  # more waiting
                elif time.monotonic() < eager_until and not result.seen:
                    # Woken by a commit hook that fires just before the commit itself
                    # (SQLAlchemy Core): look again shortly.
                    wait_s = 0.005
            except RedisUnavailable as exc:
                if down_since is None:
                    down_since = time.monotonic()
                    log(logger, logging.WARNING, "outbox_publish_failed", relay=self.name, error=str(exc),
                                   retry_in_s=backoff)
                wait_s, backoff = backoff, min(max_backoff_s, backoff * 2)
            except Exception as exc:  # the database unreachable, a lock timeout: try again later
                log(logger, logging.ERROR, "outbox_relay_error", relay=self.name, error=f"{type(exc).__name__}: {exc}",
                             retry_in_s=backoff)
                wait_s, backoff = backoff, min(max_backoff_s, backoff * 2)
            if time.monotonic() >= next_report:
                next_report = time.monotonic() + report_every_s
                try:
                    self.report()
                except Exception as exc:
                    log(logger, logging.ERROR, "outbox_relay_error", relay=self.name, error=f"{type(exc).__name__}: {exc}")
            if wait_s > 0 and wake.wait(wait_s):
                wake.clear()
                eager_until = time.monotonic() + 0.2
