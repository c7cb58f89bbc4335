"""A total wall-clock deadline for one HTTP call, and a record of whether it sent.

``requests``' read timeout applies to each socket read: a server that trickles a
byte every half second keeps a call alive for ever. Here every call is watched
by one per-process watchdog thread holding a heap of deadlines; when a call
outlives its deadline the watchdog shuts its socket down (``shutdown(SHUT_RDWR)``),
which ends any blocked send, recv or TLS handshake at once, plain or TLS alike.

The socket is known through urllib3 connection subclasses mounted by
``DeadlineAdapter``: a new connection registers a ``dup()`` of its TCP socket
(shutting down a duplicate shuts down the one socket both name, and the duplicate
cannot be closed and its number reused under the watchdog's feet); a request on a
pooled connection attaches that connection to the call running on this thread.
The same hooks record whether any byte of the request was handed to the socket:
failures before that are "not sent", failures after it may have reached mipos.

What it cannot bound: name resolution (``getaddrinfo`` blocks in the C library;
the system resolver's own timeouts apply) and the TCP connect, which the connect
timeout bounds instead (the client makes it no longer than the call's total).
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import PoolManager


class WatchedCall:
    """One HTTP call under a deadline; fields change under the watchdog's lock only."""

    __slots__ = ("connection", "deadline", "expired", "finished", "orphans", "sent", "total_s")

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.deadline = time.monotonic() + total_s
        self.connection: _Watched | None = None
        self.orphans: list[socket.socket] = []  # watch sockets of connections closed mid-call
        self.sent = False  # a byte of the request was handed to a socket
        self.expired = False
        self.finished = False

    def _cut(self) -> None:
        self.expired = True
        sockets = list(self.orphans)
        if self.connection is not None and self.connection.watch_socket is not None:
            sockets.append(self.connection.watch_socket)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed or never connected: nothing left to end


class _Watchdog:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.heap: list[tuple[float, int, WatchedCall]] = []
        self.order = itertools.count()
        self.thread: threading.Thread | None = None

    def watch(self, call: WatchedCall) -> None:
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="mipos-call-watchdog",
                                               daemon=True)
                self.thread.start()
            heapq.heappush(self.heap, (call.deadline, next(self.order), call))
            if self.heap[0][2] is call:
                self.wake.notify()

    def _run(self) -> None:
        with self.lock:
            while True:
                now = time.monotonic()
                while self.heap and (self.heap[0][2].finished or self.heap[0][0] <= now):
                    _, _, call = heapq.heappop(self.heap)
                    if not call.finished:
                        call._cut()
                self.wake.wait(self.heap[0][0] - now if self.heap else None)


_watchdog = _Watchdog()
_current = threading.local()
_opened_total = 0


def _reset_after_fork() -> None:
    """A forked child has no watchdog thread, and the lock may have been held at the fork."""
    global _watchdog, _current
    _watchdog = _Watchdog()
    _current = threading.local()


os.register_at_fork(after_in_child=_reset_after_fork)


def connections_opened() -> int:
    """How many connections this process opened (a test sees keep-alive at work)."""
    return _opened_total


@contextmanager
def watched(total_s: float) -> Iterator[WatchedCall]:
    """Run one HTTP call on this thread under a total deadline of ``total_s``."""
    call = WatchedCall(total_s)
    _watchdog.watch(call)
    _current.call = call
    try:
        yield call
    finally:
        _current.call = None
        with _watchdog.lock:
            call.finished = True
            orphans, call.orphans = call.orphans, []
            call.connection = None
        for sock in orphans:
            sock.close()


def _running_call() -> WatchedCall | None:
    return getattr(_current, "call", None)


class _Watched(HTTPConnection):
    """The hooks, shared by the plain and the TLS connection."""

    watch_socket: socket.socket | None = None

    def _attach(self) -> None:
        call = _running_call()
        if call is not None:
            with _watchdog.lock:
                call.connection = self
                if call.expired:
                    call._cut()

    def _new_conn(self) -> socket.socket:
        global _opened_total
        sock = super()._new_conn()
        self._release_watch_socket()
        self.watch_socket = sock.dup()
        _opened_total += 1
        self._attach()
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self._attach()  # a pooled connection: the call now runs on it
        super().request(*args, **kwargs)

    def send(self, data: Any) -> None:
        if self.sock is None and self.auto_open:
            self.connect()  # as http.client would: a failure here is before sending
        call = _running_call()
        if call is not None:
            call.sent = True
        super().send(data)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._release_watch_socket()

    def _release_watch_socket(self) -> None:
        with _watchdog.lock:
            sock, self.watch_socket = self.watch_socket, None
            call = _running_call()
            if sock is not None and call is not None and call.connection is self:
                # Closed mid-call (``Connection: close`` hands the socket to the
                # response): keep the duplicate until the call ends, so it stays cuttable.
                call.orphans.append(sock)
                sock = None
        if sock is not None:
            sock.close()


class WatchedHTTPConnection(_Watched):
    pass


class WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class WatchedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = WatchedHTTPConnection


class WatchedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = WatchedHTTPSConnection


POOL_CLASSES = {"http": WatchedHTTPConnectionPool, "https": WatchedHTTPSConnectionPool}


class DeadlineAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` whose connections the watchdog can cut."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(POOL_CLASSES)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> PoolManager:
        manager: PoolManager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if proxy.lower().startswith("http"):
            manager.pool_classes_by_scheme = dict(POOL_CLASSES)
        return manager
