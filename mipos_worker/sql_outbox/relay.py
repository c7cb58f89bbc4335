"""The relay: committed outbox rows to Redis, oldest first, deleted only once Redis has them.

Several relays may run on one outbox. Where the database has row locks that a
reader can skip (PostgreSQL, MySQL 8, MariaDB 10.6) a relay locks a batch with
``FOR UPDATE SKIP LOCKED`` for the time it publishes it; the POS's inserts
never wait for those locks (READ COMMITTED: no gap locks). SQLite has no row
locks: a relay claims a batch with a lease in one short write and publishes
outside any transaction. Either way a relay killed after a publish and before
the delete leaves the row; it is published again under the same task id, and
the worker's ledger sends the order to mipos once.

A row that can never be published (whatever about it: arguments, JSON, text
that is not UTF-8, its task id; message.py) moves to ``mipos_outbox_dead``
alone, with the reason, and the rows around it go. When Redis cannot be
reached the rows wait and the relay backs off.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from kombu.exceptions import OperationalError
from sqlalchemy import (
    LargeBinary,
    Text,
    case,
    cast,
    delete,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, Row

from mipos_worker.logs import log
from mipos_worker.sql_outbox.listen import Listener, can_listen
from mipos_worker.sql_outbox.message import read_message, shown
from mipos_worker.sql_outbox.schema import (
    db_now,
    dead_table,
    outbox_table,
    supports_skip_locked,
)
from mipos_worker.sql_outbox.upgrade import dead_table_upgraded, pending_upgrades

logger = logging.getLogger("mipos.outbox")

PUBLISH_ERRORS = (OperationalError, redis.RedisError, OSError)


class RedisUnavailable(Exception):
    """A publish failed for want of Redis: the rest of the batch waits."""


class PublishFailed(Exception):
    """Publishes failed with an error no check foresaw, and no later row of the batch went:
    the relay, not a row, is at fault; the rows wait (their tries and last error updated)."""


class Unpublishable(Exception):
    """What a row holds can never make a message (message.py): it moves aside, alone."""


Outcome = Exception | None  # of one row's publish: None when it went
_NOT_TRIED = object()  # past the end of publish_orders' answer


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
class _Batch:
    """What became of one batch's rows so far."""

    commit_each: bool  # no batch transaction (lease): each row's outcome is committed at once
    published: list[int] = field(default_factory=list)
    moved: int = 0
    suspects: list[tuple[Row[Any], str]] = field(default_factory=list)  # failed, cause unknown yet


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
        self._dead_upgraded: bool | None = None  # the dead table's shape, read at the first move

    # -- one batch --------------------------------------------------------------

    def run_once(self) -> BatchResult:
        """Publish one batch; raises ``RedisUnavailable`` (after keeping what went) when Redis is down."""
        return self._run_locked() if self.skip_locked else self._run_leased()

    def _columns(self) -> Sequence[Any]:
        t = outbox_table.c
        return (t.id, self._text(t.task_id), self._text(t.action), self._text(t.arguments),
                (self.now - t.created_at).label("age_s"))

    def _text(self, column: Any) -> Any:
        """On SQLite, a text column as its bytes: the SELECT cannot fail on one row that is not
        UTF-8 (another program's write); message.read_text decodes it, row by row."""
        if self.engine.dialect.name == "sqlite":
            return cast(column, LargeBinary).label(column.name)
        return column

    def _run_locked(self) -> BatchResult:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(*self._columns()).order_by(outbox_table.c.id).limit(self.batch_size)
                .with_for_update(skip_locked=True)).all()
            try:
                result = self._publish_rows(conn, rows)
            except (RedisUnavailable, PublishFailed):
                conn.commit()  # keep the deletes of what went, and the rows' tries
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
        """Publish in order, the batch at once (``_publish``); delete what went, move aside what
        never can.

        ``commit_each``: no batch transaction is open (lease). A row whose publish fails with
        an error no check foresaw is moved aside only once a later row went (the relay
        works, so the row is what is wrong); when none did, the rows wait (PublishFailed).
        """
        batch = _Batch(commit_each)
        outcomes = self._publish(rows)  # ends at a RedisUnavailable when Redis took not all
        for index, row in enumerate(rows):
            outcome = outcomes[index]
            if isinstance(outcome, RedisUnavailable):
                self._wait(conn, batch, [r.id for r in rows[index:]], str(outcome))
                raise outcome
            if isinstance(outcome, PublishFailed):
                batch.suspects.append((row, str(outcome)))
            elif isinstance(outcome, Unpublishable):
                self._move_aside(conn, row, str(outcome))
                batch.moved += 1
                self._commit_each(conn, batch)
            else:
                self._published(conn, batch, row)
        if batch.suspects:
            error = batch.suspects[0][1]
            self._wait(conn, batch, [], error)
            raise PublishFailed(f"{error} ({len(batch.suspects)} rows wait)")
        self._finish(conn, batch)
        return BatchResult(published=len(batch.published), moved_aside=batch.moved, seen=len(rows))

    def _published(self, conn: Connection, batch: _Batch, row: Row[Any]) -> None:
        batch.published.append(row.id)  # deleted with the others that went (_finish)
        if not batch.suspects:
            return
        for suspect, error in batch.suspects:  # a later row went: these rows are what is wrong
            self._move_aside(conn, suspect, f"{error} (the rows after it were published)")
            batch.moved += 1
        batch.suspects.clear()
        self._commit_each(conn, batch)

    def _wait(self, conn: Connection, batch: _Batch, waiting: list[int], error: str) -> None:
        """The rows that could not go wait: the failed ones count a try (``waiting[0]`` failed
        with ``error``); all are free at once for whichever relay can publish first. Then
        what went is kept."""
        failed = [(row.id, why) for row, why in batch.suspects] + [(id_, error) for id_ in waiting[:1]]
        t = outbox_table.c
        for row_id, why in failed:
            conn.execute(update(outbox_table).where(t.id == row_id).values(
                tries=t.tries + 1, last_error=why[:500]))
        conn.execute(update(outbox_table).where(t.id.in_([i for i, _ in failed] + waiting))
                     .values(claim=None, claimed_until=None))
        self._finish(conn, batch)

    def _finish(self, conn: Connection, batch: _Batch) -> None:
        if batch.published:
            self._delete(conn, batch.published)
        self._commit_each(conn, batch)
        self._count(len(batch.published), batch.moved)

    @staticmethod
    def _commit_each(conn: Connection, batch: _Batch) -> None:
        if batch.commit_each:
            conn.commit()

    def _delete(self, conn: Connection, ids: list[int]) -> None:
        conn.execute(delete(outbox_table).where(outbox_table.c.id.in_(ids)))

    def _count(self, published: int, moved: int) -> None:
        self.metrics.published += published
        self.metrics.moved_aside += moved

    def _publish(self, rows: Sequence[Row[Any]]) -> list[Outcome]:
        """Publish the rows' messages in one batch (order_tasks.publish_orders: two round trips).

        Per row in order: None when it went; ``Unpublishable`` when it never can be (what
        it holds: message.py); ``PublishFailed`` for an error no check foresaw; then, at the
        first row Redis did not take, ``RedisUnavailable``, and the list stops there.
        """
        from mipos_worker.order_tasks import OrderToPublish, publish_orders

        outcomes: list[Outcome] = []
        orders: list[OrderToPublish] = []
        for row in rows:
            try:
                message = read_message(row.task_id, row.action, row.arguments, row.age_s)
            except Exception as exc:  # noqa: BLE001 - whatever the row holds: RecursionError, UnicodeError, ...
                outcomes.append(Unpublishable(f"{type(exc).__name__}: {exc}"))
                continue
            outcomes.append(None)
            # The deadline counts from the commit: the row's age on the database's clock.
            orders.append(OrderToPublish(message.action, message.body, message.task_id, message.age_s))
        try:
            results = iter(publish_orders(orders))
        except PUBLISH_ERRORS as exc:
            unavailable = RedisUnavailable(f"{type(exc).__name__}: {exc}")
            # The rows before the first readable one can still be moved aside.
            first = next((i for i, o in enumerate(outcomes) if o is None), len(outcomes))
            return [*outcomes[:first], unavailable]
        for index, outcome in enumerate(outcomes):
            if outcome is not None:
                continue
            result = next(results, _NOT_TRIED)
            if result is None:
                continue
            if isinstance(result, PUBLISH_ERRORS):
                return [*outcomes[:index], RedisUnavailable(f"{type(result).__name__}: {result}")]
            if not isinstance(result, Exception):  # the list stopped short: not published
                return [*outcomes[:index], RedisUnavailable("not published: Redis failed earlier")]
            outcomes[index] = PublishFailed(f"{type(result).__name__}: {result}")
        return outcomes

    def _move_aside(self, conn: Connection, row: Row[Any], reason: str) -> None:
        """Copied in SQL, byte for byte, whatever the row holds; then deleted."""
        t = outbox_table.c
        upgraded = self._dead_table_upgraded(conn)
        conn.execute(insert(dead_table).from_select(
            ["outbox_id" if upgraded else "id", "task_id", "action", "arguments", "created_at", "moved_at",
             "reason"],
            select(t.id if upgraded else self._old_dead_id(conn), t.task_id, t.action, t.arguments,
                   t.created_at, self.now, literal(reason[:2000], Text())).where(t.id == row.id)))
        self._delete(conn, [row.id])
        log(logger, logging.ERROR, "outbox_row_moved_aside", relay=self.name, row_id=row.id,
            task_id=shown(row.task_id), action=shown(row.action), reason=reason, table=dead_table.name)

    def _dead_table_upgraded(self, conn: Connection) -> bool:
        """The dead table's shape (upgrade.py), read at the first move; a warning when it is old."""
        if self._dead_upgraded is None:
            self._dead_upgraded = dead_table_upgraded(conn)
            if not self._dead_upgraded:
                log(logger, logging.WARNING, "outbox_tables_not_upgraded", relay=self.name,
                    pending=pending_upgrades(conn),
                    fix="mipos_worker.sql_outbox.upgrade_tables(engine), or the README's SQL")
        return self._dead_upgraded

    @staticmethod
    def _old_dead_id(conn: Connection) -> Any:
        """The id of a row moved into a dead table not yet upgraded: its outbox id; on SQLite,
        where outbox ids repeat, a free id when that one is taken (the task id says which)."""
        t, dead = outbox_table.c, dead_table.c
        if conn.dialect.name != "sqlite":
            return t.id
        taken = exists().where(dead.id == t.id)
        free = select(func.coalesce(func.max(dead.id), 0) + 1).scalar_subquery()
        return case((taken, free), else_=t.id)

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
                    max_backoff_s: float = 5.0, listen: bool | None = None,
                    eager: bool | None = None) -> None:
        """Until ``stop`` is set: publish, then sleep ``poll_interval_s`` or until ``wake``.

        ``listen`` (default: on PostgreSQL): a listener thread wakes the relay at each commit
        that wrote a row (listen.py); the polling stays as the safety net. ``eager`` (default:
        when not listening): a wake that found nothing looks again a few times over 200 ms,
        for SQLAlchemy Core's commit hook, which fires just before the commit (background.py);
        a notification comes after the commit and needs none.
        """
        wake = wake or threading.Event()
        if listen is False or not can_listen(self.engine):
            self._loop(stop, wake, poll_interval_s, report_every_s, max_backoff_s,
                       eager=True if eager is None else eager)
            return
        done = threading.Event()
        listener = Listener(self.engine, wake, done, relay_name=self.name).start()
        try:
            self._loop(stop, wake, poll_interval_s, report_every_s, max_backoff_s, eager=bool(eager))
        finally:
            done.set()
            listener.join()

    def _loop(self, stop: threading.Event, wake: threading.Event, poll_interval_s: float,
              report_every_s: float, max_backoff_s: float, *, eager: bool) -> None:
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
                elif eager and time.monotonic() < eager_until and not result.seen:
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
