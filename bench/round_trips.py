"""Redis round trips per acceptance: the commands clients send, a script call counted once.

``INFO commandstats`` also counts every command a Lua script runs, so a design
that folds several commands into one script call looks no cheaper there. Redis's
``MONITOR`` prints each command with the client that sent it, and the commands a
script runs as ``[<db> lua]`` instead of an address: counting by that mark
separates what crossed the network from what ran inside a script.

MONITOR costs Redis CPU on every command, so it is only ever open during a
separate, unmeasured counting run (``count_round_trips``), never during the runs
whose CPU is reported. The counting run's windows are those of the
``redis_commands_per_acceptance`` row: the producer's ``delay()`` calls, then from
releasing the parked queue to the last acceptance (background sweeps included);
worker start-up and the warm-up order are left out.

Windows are switched by markers (``ECHO``) sent on the counter's own connection:
MONITOR lists commands in the order Redis ran them, so a marker splits the stream
exactly where the bench switched, without racing the reader thread. That
connection's commands (markers, the queue's renames) are never counted.
Pipelined commands count one each: MONITOR does not show where a pipeline's
batch ends (a MULTI…EXEC block, which it does show, is also counted once, as a
second figure).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType

import redis

from bench.runs import HELD_KEY, Bench
from bench.systems import System
from mipos_worker.state.connection import text

ORDERS = 300  # orders in a counting run (the smoke run passes its own)
MARKER = "bench:round-trips:"
COUNT, PAUSE, STOP = MARKER + "count", MARKER + "pause", MARKER + "stop"
READ_TIMEOUT_S = 30.0  # the reader's socket: a stalled MONITOR fails the run instead of hanging it
STOP_TIMEOUT_S = 30.0


@dataclass
class RoundTrips:
    """Commands seen while counting, by lower-case name."""

    client: Counter[str] = field(default_factory=Counter)  # sent by a client: one round trip each
    script: Counter[str] = field(default_factory=Counter)  # run by a Lua script, not sent
    in_transactions: int = 0  # client commands from MULTI to EXEC, both included

    def per_order(self, orders: int) -> float:
        return sum(self.client.values()) / orders

    def per_order_transactions_once(self, orders: int) -> float:
        """As ``per_order`` with a MULTI…EXEC block counted once: a transaction is one write
        and one read on the wire, however many commands it holds."""
        return (sum(self.client.values()) - self.in_transactions + self.client["multi"]) / orders


def parse_monitor_line(line: str) -> tuple[str, str, str]:
    """(client, command name, first argument) of ``1700000000.1 [0 127.0.0.1:5000] "set" "k" "v"``;
    the client is ``lua`` for a command a script ran."""
    header, _, rest = line.partition("] ")
    client = header.partition("[")[2].partition(" ")[2]
    words = rest.split('" "', 2)
    name = words[0].strip('"').lower()
    argument = words[1].rstrip('"') if len(words) > 1 else ""
    return client, name, argument


class RoundTripCounter:
    """A MONITOR connection read by a thread while in a ``with`` block; counts only between
    ``count()`` and ``pause()`` (it starts paused), and never the commands of ``control``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.found = RoundTrips()
        # One connection for everything the bench sends while counting, so its address is known.
        self.control = redis.Redis.from_url(url, single_connection_client=True, socket_timeout=10)
        self._control_address = ""
        # Kept referenced while reading: a Redis object that is collected closes its connections.
        self._source = redis.Redis.from_url(url, socket_timeout=READ_TIMEOUT_S)
        self._monitor: redis.client.Monitor | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    def __enter__(self) -> RoundTripCounter:
        self._control_address = str(self.control.client_info()["addr"])
        self._monitor = self._source.monitor()
        self._monitor.__enter__()  # MONITOR answered OK: every later command is listed
        self._thread = threading.Thread(target=self._read, name="round-trip-counter", daemon=True)
        self._thread.start()
        return self

    def count(self) -> None:
        self.control.echo(COUNT)

    def pause(self) -> None:
        self.control.echo(PAUSE)

    def _read(self) -> None:
        assert self._monitor is not None
        counting = False
        in_multi: set[str] = set()  # clients between MULTI and EXEC (listed together at EXEC)
        try:
            while True:
                response = self._monitor.connection.read_response()
                client, name, argument = parse_monitor_line(text(response, errors="replace"))
                if client == self._control_address:
                    if name == "echo" and argument == STOP:
                        return
                    if name == "echo" and argument in (COUNT, PAUSE):
                        counting = argument == COUNT
                elif counting and client == "lua":
                    self.found.script[name] += 1
                elif counting:
                    self.found.client[name] += 1
                    if name == "multi":
                        in_multi.add(client)
                    if client in in_multi:
                        self.found.in_transactions += 1
                    if name in ("exec", "discard"):
                        in_multi.discard(client)
        except BaseException as failure:  # handed to the main thread by __exit__
            self._failure = failure

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        assert self._monitor is not None and self._thread is not None
        try:
            self.control.echo(STOP)
            self._thread.join(STOP_TIMEOUT_S)
        finally:
            self._monitor.__exit__(None, None, None)  # disconnects: a reader still blocked fails
            self._thread.join(5)
            self.control.close()
            self._source.close()
        if kind is None:
            if self._thread.is_alive():
                raise RuntimeError("the MONITOR reader did not stop")
            if self._failure is not None:
                raise RuntimeError("reading MONITOR failed") from self._failure


def count_round_trips(bench: Bench, system: System, pool: str, concurrency: int,
                      orders: int) -> RoundTrips:
    """One counting run at latency 0, laid out as ``Bench.system_run``: the orders enqueued
    and parked, the workers started and warmed with one order, then the parked queue released."""
    bench.fresh(bench.fast)
    with RoundTripCounter(bench.redis.url) as counter:
        counter.count()
        bench.send(system, orders)
        counter.pause()
        bench.start_parked(system, pool, concurrency, 1, counter.control)
        counter.count()
        counter.control.rename(HELD_KEY, system.queue)
        bench.wait_accepted(bench.fast, orders + 1, timeout=120 + orders * 0.05)
        counter.pause()
    bench.stop_workers()
    return counter.found
