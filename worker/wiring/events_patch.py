"""One lock around Celery's event dispatcher, so the threads pool does not drop task events.

In Celery 5.6, ``EventDispatcher.send`` appends task events to a shared group
buffer without a lock, while the consumer thread's ``flush`` publishes that
buffer and then empties it: an event a pool thread adds in between is lost
(celery/celery#10434). Flower then shows a task stuck at STARTED, or never
shows a retry. Seen here in one browser-test run in three with the threads
pool; none in eight with this lock. Reentrant, because ``send`` may ``flush``.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

from celery.events.dispatcher import EventDispatcher

_lock = threading.RLock()


def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: EventDispatcher, *args: Any, **kwargs: Any) -> Any:
        with _lock:
            return method(self, *args, **kwargs)
    call.__mipos_locked__ = True  # type: ignore[attr-defined]
    return call


def install() -> None:
    for name in ("send", "flush"):
        method = getattr(EventDispatcher, name)
        if not getattr(method, "__mipos_locked__", False):
            setattr(EventDispatcher, name, _locked(method))
