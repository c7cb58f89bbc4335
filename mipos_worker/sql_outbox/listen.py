"""PostgreSQL's LISTEN/NOTIFY: the relay woken by the POS's commit, polling kept as the safety net.

The writer notifies ``CHANNEL`` inside the POS's transaction (writer.py, the
Django app); PostgreSQL delivers a notification only once that transaction
commits, never after a rollback. The relay's listener holds a connection of its
own (``application_name`` ``mipos-outbox-listener``, so it shows in
``pg_stat_activity``), LISTENs, and sets the relay's wake event at each
notification.

A notification sent while the listener is not connected is lost; the relay's
polling (``--poll-interval``) finds the row anyway, and the listener, once
connected again, wakes the relay at once to catch up. MySQL, MariaDB and SQLite
have no such channel: their relays poll.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy.engine import Engine

from mipos_worker.logs import log

CHANNEL = "mipos_outbox"
APPLICATION_NAME = "mipos-outbox-listener"
# Drivers whose connections the listener knows how to wait on (psycopg 3).
SUPPORTED_DRIVERS = ("psycopg",)

logger = logging.getLogger("mipos.outbox")


def can_listen(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


class Listener:
    """A daemon thread: LISTEN on a dedicated connection, ``wake.set()`` at each notification,
    reconnect (with a backoff) when the connection is lost, until ``stop`` is set."""

    def __init__(self, engine: Engine, wake: threading.Event, stop: threading.Event, *,
                 relay_name: str, wait_s: float = 1.0, retry_s: float = 0.5, max_retry_s: float = 5.0) -> None:
        self.engine = engine
        self.wake = wake
        self.stop = stop
        self.relay_name = relay_name
        self.wait_s = wait_s  # how often the thread looks at ``stop`` while nothing arrives
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self.connections = 0  # LISTEN connections made so far (the tests read it)
        self.thread = threading.Thread(target=self._run, name=f"mipos-outbox-listen-{relay_name}",
                                       daemon=True)

    def start(self) -> Listener:
        if self.engine.dialect.driver not in SUPPORTED_DRIVERS:
            log(logger, logging.WARNING, "outbox_listen_unsupported", relay=self.relay_name,
                driver=self.engine.dialect.driver,
                fix="use postgresql+psycopg:// (psycopg 3) for the relay; it polls meanwhile")
            return self
        self.thread.start()
        return self

    def join(self, timeout: float = 5.0) -> None:
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _run(self) -> None:
        backoff = self.retry_s
        lost = False
        while not self.stop.is_set():
            conn: Any = None
            try:
                conn = self._connect()
                self.connections += 1
                log(logger, logging.INFO, "outbox_listening", relay=self.relay_name, channel=CHANNEL,
                    reconnected=lost)
                lost, backoff = False, self.retry_s
                self.wake.set()  # whatever was committed while not listening: look now
                while not self.stop.is_set():
                    for _notification in conn.notifies(timeout=self.wait_s, stop_after=1):
                        self.wake.set()
            except Exception as exc:  # noqa: BLE001 - the connection killed, the database restarting: poll meanwhile
                if not lost:
                    log(logger, logging.WARNING, "outbox_listen_lost", relay=self.relay_name,
                        error=f"{type(exc).__name__}: {exc}".strip(), retry_in_s=backoff)
                lost = True
                self.wake.set()
                self.stop.wait(backoff)
                backoff = min(self.max_retry_s, backoff * 2)
            finally:
                _close(conn)

    def _connect(self) -> Any:
        """A connection of the engine's own making (its URL and connect arguments), taken out
        of its pool for good, in autocommit, listening."""
        pooled = self.engine.raw_connection()
        conn = pooled.driver_connection
        pooled.detach()
        try:
            conn.rollback()
            conn.autocommit = True
            conn.execute(f"SET application_name = '{APPLICATION_NAME}'")
            conn.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            _close(conn)
            raise
        return conn


def _close(conn: Any) -> None:
    if conn is None:
        return
    try:
        conn.close()
    except Exception:  # noqa: BLE001, S110 - already broken: nothing to keep
        pass
