"""The relay inside the POS's own process: a daemon thread, woken after a commit that wrote a row.

The thread is the safety net (it polls); the after-commit hook only makes the
common case fast. A POS that runs ``mipos-worker outbox relay`` as a process
of its own needs neither: on PostgreSQL that process is woken by NOTIFY (listen.py).
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from mipos_worker.sql_outbox.relay import Relay
from mipos_worker.sql_outbox.writer import WROTE_KEY

_woken: list[threading.Event] = []  # the wake events of the relay threads in this process
_hooks_lock = threading.Lock()
_hooked_engines: set[int] = set()


class RelayThread:
    def __init__(self, engine: Engine, *, poll_interval_s: float = 1.0, report_every_s: float = 60.0,
                 after_commit: bool = True, listen: bool = False, **relay_options: Any) -> None:
        """``listen``: on PostgreSQL, also LISTEN for other processes' commits (one more
        connection per POS process; the relay process listens by default)."""
        self.relay = Relay(engine, **relay_options)
        self.stop_event = threading.Event()
        self.wake_event = threading.Event()
        self.thread = threading.Thread(
            target=self.relay.run_forever, name=f"mipos-outbox-relay-{self.relay.name}", daemon=True,
            args=(self.stop_event, self.wake_event),
            kwargs={"poll_interval_s": poll_interval_s, "report_every_s": report_every_s, "listen": listen,
                    "eager": after_commit})
        if after_commit:
            install_after_commit_hooks(engine)
            _woken.append(self.wake_event)

    def start(self) -> RelayThread:
        self.thread.start()
        return self

    def wake(self) -> None:
        self.wake_event.set()

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.wake_event.set()
        self.thread.join(timeout)
        if self.wake_event in _woken:
            _woken.remove(self.wake_event)


def start_relay_thread(engine: Engine, **options: Any) -> RelayThread:
    """Start the in-process relay; ``stop()`` it at shutdown (rows left are published later)."""
    return RelayThread(engine, **options).start()


def wake_relays() -> None:
    for wake in _woken:
        wake.set()


def install_after_commit_hooks(engine: Engine) -> None:
    """Wake the in-process relays after a commit that wrote an outbox row.

    ORM sessions have a true after-commit event. Core connections only have one
    that fires just before the commit; the relay then looks again a few times
    over the next 200 ms (relay.py), so the row is still picked up at once.
    """
    with _hooks_lock:
        if not _hooked_engines:
            event.listen(Session, "after_commit", _session_committed)
        if id(engine) not in _hooked_engines:
            event.listen(engine, "commit", _connection_committing)
            _hooked_engines.add(id(engine))


def _session_committed(session: Session) -> None:
    if session.info.pop(WROTE_KEY, False):
        wake_relays()


def _connection_committing(conn: Connection) -> None:
    if conn.info.pop(WROTE_KEY, False):
        wake_relays()
