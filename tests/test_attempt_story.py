"""Every transition of one delivery (``worker/attempt/story.py``), driven with fakes.

No Celery worker, Redis or HTTP: ``Delivery.run()`` meets the world only through
``Services``, so each test builds a small world of fakes (the attempt's start as
Redis would return it, the answers mipos gives), runs one delivery and checks its
ending, the attempt lines a user reads and what was written on the way out.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import redis
import requests
from structlog.testing import capture_logs

from config import load_worker_settings, timing
from worker.attempt.story import ComeBack, DeadLettered, Delivery, Ending, Finished
from worker.mipos.classification import Answer
from worker.mipos.errors import AuthError, MiposError, TransientError
from mipos_worker.order.model import Action, Order, OrderRequest
from mipos_worker.order.stamps import STAMPS_KEY
from worker.state.ledger import LedgerEntry, OrderLedger, SendingMark, Uncertain
from worker.state.phases import LOST_ATTEMPT, Start

CREDENTIALS = {
    "MIPOS_CLIENT_ID": "id",
    "MIPOS_CLIENT_SECRET": "client-secret",
    "MIPOS_EMAIL": "pos@example.invalid",
    "MIPOS_PASSWORD": "password",
}
T0 = 1_700_000_000.0  # when the order was enqueued, on Redis's clock
NOW = T0 + 10.0  # when the delivery runs, unless a test says otherwise
TASK = "task-1"
OTHER_TASK = "task-0"
ORDER_FIELDS = {"delivery_id": "5", "store_id": "3", "order_external_id": "ord-1"}
ORDER = Order("5", "3", "ord-1")
DENY_MESSAGE = "Out of stock"
LOCK_ID = "lock-1"
STORED_TOKEN = b'{"token": "stored"}'

OK = Answer(http_status=200, body={"message": "Order accepted."}, elapsed_ms=12.5)
UNAVAILABLE = Answer(http_status=503, body={"message": "Service Unavailable"}, elapsed_ms=3.0)
UNAUTHORIZED = Answer(http_status=401, body={"message": "Unauthorized."}, elapsed_ms=2.0)
NOT_FOUND = Answer(http_status=409, body={"message": "Order not found."}, elapsed_ms=4.0)
LISTED = Answer(http_status=200, body={"data": [{"external_id": "ord-1"}, {"external_id": "ord-9"}]},
                elapsed_ms=5.0)
NOT_LISTED = Answer(http_status=200, body={"data": [{"external_id": "ord-9"}]}, elapsed_ms=5.0)
LIST_UNREADABLE = Answer(http_status=503, body={"message": "Service Unavailable"}, elapsed_ms=5.0)

UNREAD = object()  # tokens.current() called without the stored token


class UnexpectedCall(BaseException):
    """A fake was asked for something the test did not provide (escapes the story's
    ``except Exception``, so it cannot pass for a crash the story handled)."""


# -- the fakes --------------------------------------------------------------------------


@dataclass
class FakeClock:
    t: float = NOW

    def now(self) -> float:
        return self.t


@dataclass
class FakePhases:
    """``begin`` answers as ``_BEGIN`` would for the state the test describes (``given``);
    ``finish`` records its calls."""

    clock: FakeClock
    lock_free: bool = True
    given: dict[str, Any] = field(default_factory=dict)
    closes_breaker: bool = False
    begins: list[dict[str, Any]] = field(default_factory=list)
    finishes: list[dict[str, Any]] = field(default_factory=list)

    def begin(self, task_id: str, order: Order | None, action: Action, *, token_key: str, take_lock: bool,
              lock_ttl_s: float, held: bool = False, resend: bool = False, enqueued_at: float = 0.0,
              deadline_s: float = 0.0, sending_ttl_s: float = 0.0) -> Start:
        self.begins.append({"task_id": task_id, "order": order, "action": action, "token_key": token_key,
                            "take_lock": take_lock, "lock_ttl_s": lock_ttl_s, "held": held, "resend": resend,
                            "enqueued_at": enqueued_at, "deadline_s": deadline_s, "sending_ttl_s": sending_ttl_s})
        locked = take_lock and order is not None and self.lock_free
        history = list(self.given.get("history", []))
        done: LedgerEntry | None = self.given.get("done") if locked else None
        uncertain = self.given.get("uncertain") if locked else None
        breaker_open = bool(self.given.get("breaker_open", False)) and locked
        # A lost worker's sending mark: only the lock's holder sees it, and turns it into the
        # order's uncertain mark (and the lost task's history record) in the same step.
        interrupted: SendingMark | None = self.given.get("interrupted") if locked else None
        if interrupted is not None:
            uncertain = Uncertain(interrupted.action, interrupted.task_id, interrupted.at, interrupted.enqueued_at)
            if interrupted.task_id == task_id:
                history.append({**LOST_ATTEMPT, "attempt": interrupted.attempt, "at": self.clock.t})
        sendable = done is None or (resend and done.action == action.value)
        slot = self.given.get("slot", locked and sendable and not breaker_open and not held)
        last_unknown = bool(history) and bool(history[-1].get("outcome_unknown"))
        plain = slot and interrupted is None and uncertain is None and not last_unknown
        return Start(now=self.clock.t, interrupted=interrupted, history=[dict(r) for r in history],
                     locked=locked, lock_id=LOCK_ID, done=done, uncertain=uncertain, breaker_open=breaker_open,
                     slot=bool(slot), marked=len(history) + 1 if plain else None, token=STORED_TOKEN)

    def finish(self, task_id: str, order: Order | None, *, records: list[dict[str, Any]], lock_id: str | None,
               clear_sending: bool, final: bool, breaker_success: bool, done: LedgerEntry | None = None) -> bool:
        self.finishes.append({"task_id": task_id, "order": order, "records": list(records), "lock_id": lock_id,
                              "clear_sending": clear_sending, "final": final, "breaker_success": breaker_success,
                              "done": done})
        return self.closes_breaker


@dataclass
class FakeLedger:
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    entry = staticmethod(OrderLedger.entry)

    def record_attempt(self, task_id: str, record: dict[str, Any], order: Order | None = None) -> None:
        self.calls.append(("record_attempt", task_id, dict(record), order))

    def clear_sending(self, order: Order, lock_id: str) -> None:
        self.calls.append(("clear_sending", order, lock_id))

    def mark_sending(self, order: Order, mark: SendingMark, ttl_s: float) -> None:
        self.calls.append(("mark_sending", mark.task_id, mark.attempt))

    def record_uncertain(self, order: Order, uncertain: Uncertain, ttl_s: float) -> None:
        self.calls.append(("record_uncertain", order, uncertain, ttl_s))

    def clear_uncertain(self, order: Order) -> None:
        self.calls.append(("clear_uncertain", order))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == name]


@dataclass
class FakeTokens:
    key: str = "mipos:token"
    fail: MiposError | None = None  # raised by current()
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def current(self, stored: Any = UNREAD) -> str:
        self.calls.append(("current", stored))
        if self.fail is not None:
            raise self.fail
        return "tok-1"

    def replace_rejected(self, token: str) -> str:
        self.calls.append(("replace_rejected", token))
        return "tok-2"


@dataclass
class FakeClient:
    answers: list[Answer | BaseException] = field(default_factory=list)  # to send(), in order
    pending: list[Answer] = field(default_factory=list)  # to pending_orders(), in order
    sent: list[tuple[OrderRequest, str]] = field(default_factory=list)
    pending_calls: list[tuple[str, str]] = field(default_factory=list)

    def send(self, request: OrderRequest, token: str) -> Answer:
        self.sent.append((request, token))
        if not self.answers:
            raise UnexpectedCall(f"send {request} was not expected")
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def pending_orders(self, store_id: str, token: str) -> Answer:
        self.pending_calls.append((store_id, token))
        if not self.pending:
            raise UnexpectedCall(f"pending list of store {store_id} was not expected")
        return self.pending.pop(0)


@dataclass
class FakeBreaker:
    settings: Any
    decision: str = "send"
    release_wait: float = 0.0
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def decide(self) -> str:
        self.calls.append(("decide",))
        return self.decision

    def hold(self, task_id: str, deadline_at: float, now: float) -> None:
        self.calls.append(("hold", task_id, deadline_at, now))

    def unhold(self, task_id: str) -> None:
        self.calls.append(("unhold", task_id))

    def release_wait_s(self, task_id: str, now: float) -> float:
        self.calls.append(("release_wait_s", task_id, now))
        return self.release_wait

    def record_failure(self, error: str | None) -> None:
        self.calls.append(("record_failure", error))

    def log_closed(self) -> None:
        self.calls.append(("log_closed",))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == name]


@dataclass
class FakeDeadLetters:
    added: list[dict[str, Any]] = field(default_factory=list)

    def add(self, **letter: Any) -> SimpleNamespace:
        self.added.append(letter)
        return SimpleNamespace(id=f"dl-{len(self.added)}")


@dataclass
class FakeMetrics:
    calls: list[tuple[str, str, Any, float | None]] = field(default_factory=list)

    def attempt(self, action: str, outcome: str, error_class: Any, latency_s: float | None = None) -> None:
        self.calls.append((action, outcome, error_class, latency_s))


class World:
    """A fake ``Services``: what one delivery meets."""

    def __init__(self, env: dict[str, str] | None = None, now: float = NOW) -> None:
        self.settings = load_worker_settings({**CREDENTIALS, **(env or {})})
        self.clock = FakeClock(now)
        self.phases = FakePhases(self.clock)
        self.ledger = FakeLedger()
        self.tokens = FakeTokens()
        self.client = FakeClient()
        self.breaker = FakeBreaker(self.settings.breaker)
        self.dead_letters = FakeDeadLetters()
        self.metrics = FakeMetrics()

    @property
    def deadline_at(self) -> float:
        return T0 + self.settings.retry.deadline_s


@dataclass
class Run:
    ending: Ending
    logs: list[MutableMapping[str, Any]]

    @property
    def lines(self) -> list[MutableMapping[str, Any]]:
        """The attempt lines (``accept_attempt``/``deny_attempt``)."""
        return [entry for entry in self.logs if entry["event"] in ("accept_attempt", "deny_attempt")]

    @property
    def line(self) -> MutableMapping[str, Any]:
        assert len(self.lines) == 1, self.lines
        return self.lines[0]


def deliver(world: World, action: Action = Action.ACCEPT, *, stamps: dict[str, Any] | None = None,
            enqueued_at: float | None = T0, task_id: str = TASK, **fields: Any) -> Run:
    kwargs: dict[str, Any] = {**ORDER_FIELDS, **({"message": DENY_MESSAGE} if action is Action.DENY else {}),
                              **fields}
    message_stamps = {**({"enqueued_at": enqueued_at} if enqueued_at is not None else {}), **(stamps or {})}
    if message_stamps:
        kwargs[STAMPS_KEY] = message_stamps
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    with capture_logs() as logs:
        ending = Delivery(action, task_id, world, (), kwargs).run()
    return Run(ending, logs)


def record(attempt: int, outcome: str = "retrying", *, counted: bool = True, unknown: bool = False,
           http_status: int | None = 503, at: float = T0) -> dict[str, Any]:
    """A stored attempt record, as the history holds it."""
    return {"attempt": attempt, "at": at, "outcome": outcome, "http_status": http_status,
            "error": "Service Unavailable", "error_class": "transient", "retry_in_s": 1.0, "elapsed_ms": 3.0,
            "counted": counted, "outcome_unknown": unknown}


@pytest.fixture
def world() -> World:
    return World()


def assert_order_fields(line: MutableMapping[str, Any], action: Action = Action.ACCEPT) -> None:
    assert line["event"] == f"{action.value}_attempt"
    assert line["action"] == action.value
    assert line["task_id"] == TASK
    assert (line["delivery_id"], line["store_id"], line["order_external_id"]) == ("5", "3", "ord-1")
    assert line["max_attempts"] == 12


def come_back_stamps(ending: Ending) -> dict[str, Any]:
    assert isinstance(ending, ComeBack), ending
    assert {k: v for k, v in ending.message.items() if k != STAMPS_KEY} == {
        **ORDER_FIELDS, **({"message": DENY_MESSAGE} if "message" in ending.message else {})}
    stamps = ending.message[STAMPS_KEY]
    assert isinstance(stamps, dict)
    return stamps


def the_finish(world: World) -> dict[str, Any]:
    assert len(world.phases.finishes) == 1, world.phases.finishes
    return world.phases.finishes[0]


# -- received and checked ------------------------------------------------------------------


def test_invalid_arguments_are_dead_lettered_without_taking_the_lock(world: World) -> None:
    run = deliver(world, store_id=None)

    assert isinstance(run.ending, DeadLettered)
    assert run.ending == DeadLettered("dl-1", "invalid", "invalid arguments: store_id: is required")
    assert [b["take_lock"] for b in world.phases.begins] == [False]
    assert world.phases.begins[0]["order"] is None
    assert world.client.sent == [] and world.tokens.calls == []
    line = run.line
    assert line["event"] == "accept_attempt" and line["log_level"] == "error"
    assert (line["outcome"], line["fail_reason"], line["error_class"]) == ("failed", "invalid", "permanent")
    assert line["attempt"] == 1 and line["http_status"] is None
    assert line["store_id"] is None and line["delivery_id"] == "5"
    assert line["dead_letter_id"] == "dl-1"
    letter = world.dead_letters.added[0]
    assert letter["reason"] == "invalid" and letter["action"] == "accept"
    assert letter["order"] == {"delivery_id": "5", "order_external_id": "ord-1"}
    assert [r["outcome"] for r in letter["attempts"]] == ["failed"]
    finish = the_finish(world)
    assert finish["order"] is None and finish["lock_id"] is None and finish["final"] is True
    assert [r["outcome"] for r in finish["records"]] == ["failed"]
    assert world.metrics.calls == [("accept", "failed", "permanent", None)]


def test_a_deadline_passed_before_the_start_is_dead_lettered(world: World) -> None:
    world.clock.t = world.deadline_at + 0.5
    run = deliver(world)

    assert isinstance(run.ending, DeadLettered) and run.ending.reason == "deadline"
    assert [b["take_lock"] for b in world.phases.begins] == [False]
    assert world.client.sent == []
    line = run.line
    assert_order_fields(line)
    assert (line["outcome"], line["fail_reason"], line["error_class"]) == ("failed", "deadline", "transient")
    assert line["error"] == "deadline passed before the attempt could start"
    assert the_finish(world)["lock_id"] is None


def test_not_before_in_the_future_comes_back_in_a_hop(world: World) -> None:
    not_before = NOW + 100.0
    run = deliver(world, stamps={"not_before": not_before})

    hop = timing.countdown_hop_s(world.settings)
    assert hop == 30.0
    assert isinstance(run.ending, ComeBack) and run.ending.countdown_s == hop
    assert come_back_stamps(run.ending) == {"enqueued_at": T0, "not_before": not_before}
    assert run.logs == []  # waiting is not an attempt
    assert [b["take_lock"] for b in world.phases.begins] == [False]
    finish = the_finish(world)
    assert finish["final"] is False and finish["lock_id"] is None and finish["records"] == []
    assert world.client.sent == []


def test_not_before_within_one_hop_comes_back_for_the_rest_of_the_wait(world: World) -> None:
    run = deliver(world, stamps={"not_before": NOW + 4.0})

    assert isinstance(run.ending, ComeBack) and run.ending.countdown_s == pytest.approx(4.0)
    assert come_back_stamps(run.ending) == {"enqueued_at": T0}
    assert run.logs == []


def test_not_before_past_the_deadline_fails_with_deadline(world: World) -> None:
    run = deliver(world, stamps={"not_before": world.deadline_at + 5.0})

    assert isinstance(run.ending, DeadLettered) and run.ending.reason == "deadline"
    line = run.line
    assert (line["outcome"], line["fail_reason"]) == ("failed", "deadline")
    assert line["error"] == "the next attempt was due after the deadline"
    assert world.client.sent == []


def test_a_busy_lock_comes_back_soon_without_a_line(world: World) -> None:
    world.phases.lock_free = False
    run = deliver(world)

    assert isinstance(run.ending, ComeBack)
    assert 0.2 <= run.ending.countdown_s <= 1.0 and run.ending.reason is None
    assert come_back_stamps(run.ending) == {"enqueued_at": T0}  # no hop: no not_before
    assert run.logs == []
    assert [b["take_lock"] for b in world.phases.begins] == [True]
    finish = the_finish(world)
    assert finish["lock_id"] is None and finish["final"] is False
    assert world.client.sent == [] and world.metrics.calls == []


def test_a_message_sent_by_name_counts_its_deadline_from_the_first_attempt(world: World) -> None:
    """No stamps (a producer using send_task), and a flat private key that is ignored."""
    world.clock.t = T0 + 5000.0  # long after T0: only the missing stamp keeps it in time
    world.client.answers = [UNAVAILABLE]
    run = deliver(world, enqueued_at=None, not_before=T0 + 9999.0)

    ignored = [e for e in run.logs if e["event"] == "private_keys_ignored"]
    assert len(ignored) == 1 and ignored[0]["keys"] == ["not_before"] and ignored[0]["log_level"] == "warning"
    assert come_back_stamps(run.ending) == {"enqueued_at": T0 + 5000.0}
    assert run.line["outcome"] == "retrying"


# -- locked: done already? ---------------------------------------------------------------------


def test_done_by_the_same_action_is_skipped(world: World) -> None:
    world.phases.given["done"] = LedgerEntry("accept", OTHER_TASK, T0, "5", None, "3", "ord-1")
    run = deliver(world)

    assert run.ending == Finished()
    line = run.line
    assert_order_fields(line)
    assert (line["outcome"], line["log_level"], line["attempt"]) == ("skipped", "info", 1)
    assert line["done_by_task"] == OTHER_TASK and line["error"] is None and line["error_class"] is None
    finish = the_finish(world)
    assert finish["final"] is True and finish["lock_id"] == LOCK_ID and finish["records"] == []
    assert finish["done"] is None
    assert world.client.sent == [] and world.dead_letters.added == []
    assert world.metrics.calls == [("accept", "skipped", None, None)]


@pytest.mark.parametrize(("action", "done_by", "error"), [
    (Action.DENY, "accept", "order 3/ord-1 was already accepted at mipos (task task-0); it cannot be denied "
                            "afterwards"),
    (Action.ACCEPT, "deny", "order 3/ord-1 was already denied at mipos (task task-0); it cannot be accepted "
                            "afterwards"),
])
def test_done_by_the_other_action_is_a_permanent_failure(world: World, action: Action, done_by: str,
                                                         error: str) -> None:
    world.phases.given["done"] = LedgerEntry(done_by, OTHER_TASK, T0, "5", None, "3", "ord-1")
    run = deliver(world, action)

    assert run.ending == DeadLettered("dl-1", "permanent", error)
    line = run.line
    assert_order_fields(line, action)
    assert (line["outcome"], line["fail_reason"], line["error_class"], line["error"]) == (
        "failed", "permanent", "permanent", error)
    assert world.client.sent == []
    assert the_finish(world)["done"] is None  # the ledger keeps the first action's record


def test_a_resend_stamp_sends_although_the_same_action_is_done(world: World) -> None:
    world.phases.given["done"] = LedgerEntry("accept", OTHER_TASK, T0, "5", None, "3", "ord-1")
    world.client.answers = [OK]
    run = deliver(world, stamps={"resend": True})

    assert run.ending == Finished()
    assert world.phases.begins[0]["resend"] is True
    assert len(world.client.sent) == 1
    line = run.line
    assert line["outcome"] == "accepted" and line["reconcile_resend"] is True
    done = the_finish(world)["done"]
    assert isinstance(done, LedgerEntry) and (done.action, done.task_id) == ("accept", TASK)


def test_a_resend_stamp_does_not_send_the_other_action(world: World) -> None:
    world.phases.given["done"] = LedgerEntry("accept", OTHER_TASK, T0, "5", None, "3", "ord-1")
    run = deliver(world, Action.DENY, stamps={"resend": True})

    assert isinstance(run.ending, DeadLettered) and run.ending.reason == "permanent"
    assert world.client.sent == []


# -- allowed by the breaker and the rate limit ------------------------------------------------------


def test_breaker_open_and_holding_writes_one_retrying_line_and_comes_back_held(world: World) -> None:
    world.phases.given["breaker_open"] = True
    world.breaker.decision = "hold"
    run = deliver(world)

    assert isinstance(run.ending, ComeBack)
    assert run.ending.reason == "held: the circuit breaker is open"
    assert 2.0 <= run.ending.countdown_s <= 3.0  # the probe interval (2 s) times [1, 1.5]
    assert come_back_stamps(run.ending) == {"enqueued_at": T0, "held": True}
    line = run.line
    assert_order_fields(line)
    assert (line["outcome"], line["log_level"], line["attempt"]) == ("retrying", "warning", 1)
    assert line["held_by_breaker"] is True and line["error_class"] == "transient"
    assert line["error"] == "circuit breaker open: held without spending an attempt"
    assert line["retry_in_s"] == round(run.ending.countdown_s, 3)
    assert world.breaker.named("hold") == [("hold", TASK, world.deadline_at, NOW)]
    assert world.client.sent == []
    finish = the_finish(world)
    assert finish["records"] == [] and finish["final"] is False  # no attempt spent
    assert finish["lock_id"] == LOCK_ID


def test_an_order_held_again_writes_no_second_line(world: World) -> None:
    world.phases.given["breaker_open"] = True
    world.breaker.decision = "hold"
    run = deliver(world, stamps={"held": True})

    assert isinstance(run.ending, ComeBack)
    assert come_back_stamps(run.ending) == {"enqueued_at": T0, "held": True}
    assert run.lines == []
    assert world.phases.begins[0]["held"] is True
    assert len(world.breaker.named("hold")) == 1 and world.breaker.named("unhold") == []


@pytest.mark.parametrize("held", [False, True])
def test_held_with_the_deadline_too_near_is_dead_lettered(world: World, held: bool) -> None:
    world.clock.t = world.deadline_at - 1.0  # the next probe is at least 2 s away
    world.phases.given["breaker_open"] = True
    world.breaker.decision = "hold"
    run = deliver(world, stamps={"held": True} if held else {})

    assert isinstance(run.ending, DeadLettered) and run.ending.reason == "deadline"
    line = run.line
    assert (line["outcome"], line["fail_reason"], line["error_class"]) == ("failed", "deadline", "transient")
    assert line["held_by_breaker"] is True
    assert world.breaker.named("hold") == []
    assert world.breaker.named("unhold") == ([("unhold", TASK)] if held else [])
    assert the_finish(world)["final"] is True


def test_the_probe_is_sent(world: World) -> None:
    world.phases.given["breaker_open"] = True
    world.breaker.decision = "probe"
    world.client.answers = [OK]
    run = deliver(world)

    assert run.ending == Finished()
    assert len(world.client.sent) == 1
    assert world.ledger.named("mark_sending") == [("mark_sending", TASK, 1)]  # the start did not mark it
    assert run.line["outcome"] == "accepted"
    assert the_finish(world)["breaker_success"] is True


def test_a_held_order_released_is_unheld_and_sent(world: World) -> None:
    world.breaker.release_wait = 0.0
    world.client.answers = [OK]
    run = deliver(world, stamps={"held": True})

    assert run.ending == Finished()
    assert world.breaker.named("release_wait_s") == [("release_wait_s", TASK, NOW)]
    assert world.breaker.named("unhold") == [("unhold", TASK)]  # once: not again at the end
    assert world.ledger.named("mark_sending") == [("mark_sending", TASK, 1)]
    assert len(world.client.sent) == 1
    assert run.line["outcome"] == "accepted" and "held_by_breaker" not in run.line


def test_a_held_order_not_yet_released_comes_back_still_held(world: World) -> None:
    world.breaker.release_wait = 1.5
    run = deliver(world, stamps={"held": True})

    assert isinstance(run.ending, ComeBack) and run.ending.countdown_s == pytest.approx(1.5)
    assert run.ending.reason == "held: the circuit breaker is open"
    assert come_back_stamps(run.ending) == {"enqueued_at": T0, "held": True}
    assert run.lines == []
    assert world.breaker.named("unhold") == [] and world.client.sent == []


def test_no_rate_slot_comes_back_without_a_line(world: World) -> None:
    world.phases.given["slot"] = False
    run = deliver(world)

    assert isinstance(run.ending, ComeBack)
    assert 0.05 <= run.ending.countdown_s <= 0.3 and run.ending.reason is None
    assert come_back_stamps(run.ending) == {"enqueued_at": T0}
    assert run.logs == []
    assert world.client.sent == [] and world.metrics.calls == []
    assert the_finish(world)["lock_id"] == LOCK_ID


# -- sent and answered ---------------------------------------------------------------------------------


def test_200_is_accepted(world: World) -> None:
    world.client.answers = [OK]
    run = deliver(world)

    assert run.ending == Finished()
    request, token = world.client.sent[0]
    assert request == OrderRequest(Action.ACCEPT, ORDER) and token == "tok-1"
    assert world.tokens.calls == [("current", STORED_TOKEN)]  # the token the start read
    line = run.line
    assert_order_fields(line)
    assert (line["outcome"], line["log_level"], line["attempt"], line["http_status"]) == (
        "accepted", "info", 1, 200)
    assert line["error"] is None and line["error_class"] is None and line["elapsed_ms"] == 12.5
    for absent in ("retry_in_s", "fail_reason", "possible_duplicate", "previous_outcome", "outcome_unknown"):
        assert absent not in line
    finish = the_finish(world)
    assert finish["final"] is True and finish["lock_id"] == LOCK_ID and finish["breaker_success"] is True
    assert finish["clear_sending"] is True
    done = finish["done"]
    assert isinstance(done, LedgerEntry)
    assert (done.action, done.task_id, done.delivery_id, done.store_id, done.order_external_id, done.message) == (
        "accept", TASK, "5", "3", "ord-1", None)
    [stored] = finish["records"]
    assert (stored["attempt"], stored["outcome"], stored["http_status"], stored["counted"]) == (
        1, "accepted", 200, True)
    assert world.ledger.calls == []  # the start marked it; the end wrote it: no other write
    [begin] = world.phases.begins
    assert (begin["task_id"], begin["order"], begin["take_lock"], begin["token_key"]) == (
        TASK, ORDER, True, "mipos:token")
    assert begin["lock_ttl_s"] == timing.order_lock_ttl_s(world.settings) == 132.0
    assert world.metrics.calls == [("accept", "accepted", None, 10.0)]
    assert world.breaker.calls == []


def test_200_to_a_deny_is_denied(world: World) -> None:
    world.client.answers = [OK]
    run = deliver(world, Action.DENY)

    assert run.ending == Finished()
    assert world.client.sent[0][0] == OrderRequest(Action.DENY, ORDER, DENY_MESSAGE)
    line = run.line
    assert_order_fields(line, Action.DENY)
    assert (line["event"], line["outcome"], line["log_level"]) == ("deny_attempt", "denied", "info")
    done = the_finish(world)["done"]
    assert (done.action, done.message) == ("deny", DENY_MESSAGE)
    assert world.metrics.calls == [("deny", "denied", None, 10.0)]


def test_a_breaker_closed_by_the_end_is_logged(world: World) -> None:
    world.phases.closes_breaker = True
    world.client.answers = [OK]
    deliver(world)

    assert world.breaker.named("log_closed") == [("log_closed",)]


def test_401_then_200_resends_at_once_with_a_fresh_token_not_counted(world: World) -> None:
    world.client.answers = [UNAUTHORIZED, OK]
    run = deliver(world)

    assert run.ending == Finished()
    assert [token for _, token in world.client.sent] == ["tok-1", "tok-2"]
    assert world.tokens.calls == [("current", STORED_TOKEN), ("replace_rejected", "tok-1")]
    first, second = run.lines
    assert (first["attempt"], first["outcome"], first["http_status"], first["error_class"]) == (
        1, "retrying", 401, "auth")
    assert first["resend"] == "fresh_token" and first["retry_in_s"] == 0 and first["error"] == "Unauthorized."
    assert (second["attempt"], second["outcome"], second["http_status"]) == (2, "accepted", 200)
    assert "resend" not in second
    # The first attempt's record is written before the second request leaves, then its mark.
    assert [c[0] for c in world.ledger.calls] == ["record_attempt", "clear_sending", "mark_sending"]
    assert world.ledger.calls[0][2]["attempt"] == 1 and world.ledger.calls[0][2]["counted"] is True
    assert world.ledger.calls[0][3] == ORDER
    assert world.ledger.calls[2] == ("mark_sending", TASK, 2)
    [stored] = the_finish(world)["records"]
    assert (stored["attempt"], stored["outcome"], stored["counted"]) == (2, "accepted", False)
    assert world.breaker.named("record_failure") == []


def test_401_twice_takes_the_retry_schedule(world: World) -> None:
    world.client.answers = [UNAUTHORIZED, UNAUTHORIZED]
    run = deliver(world)

    assert isinstance(run.ending, ComeBack)
    first, second = run.lines
    assert first["resend"] == "fresh_token"
    assert (second["attempt"], second["outcome"], second["error_class"], second["http_status"]) == (
        2, "retrying", "auth", 401)
    assert "resend" not in second
    # Retry 1 (the resend was not counted): base 1 s times [0.5, 1].
    assert 0.5 <= second["retry_in_s"] <= 1.0
    assert run.ending.countdown_s == pytest.approx(second["retry_in_s"], abs=1e-3)
    assert len(world.client.sent) == 2
    [stored] = the_finish(world)["records"]
    assert (stored["attempt"], stored["counted"]) == (2, False)


@pytest.mark.parametrize(("earlier", "low", "high"), [(0, 0.5, 1.0), (3, 4.0, 8.0)])
def test_a_transient_503_retries_within_the_schedule(world: World, earlier: int, low: float,
                                                     high: float) -> None:
    world.phases.given["history"] = [record(n) for n in range(1, earlier + 1)]
    world.client.answers = [UNAVAILABLE]
    run = deliver(world)

    assert isinstance(run.ending, ComeBack) and run.ending.reason == "Service Unavailable"
    line = run.line
    assert_order_fields(line)
    assert (line["attempt"], line["outcome"], line["log_level"], line["http_status"]) == (
        earlier + 1, "retrying", "warning", 503)
    assert line["error"] == "Service Unavailable" and line["error_class"] == "transient"
    assert low <= line["retry_in_s"] <= high  # retry n waits min(max, base * 2**(n-1)) times [0.5, 1]
    assert run.ending.countdown_s == pytest.approx(line["retry_in_s"], abs=1e-3)
    assert come_back_stamps(run.ending) == {"enqueued_at": T0}
    assert world.breaker.named("record_failure") == [("record_failure", "Service Unavailable")]
    finish = the_finish(world)
    assert finish["final"] is False and finish["breaker_success"] is False
    [stored] = finish["records"]
    assert (stored["attempt"], stored["outcome"], stored["retry_in_s"]) == (
        earlier + 1, "retrying", run.ending.countdown_s)
    assert world.metrics.calls == [("accept", "retrying", "transient", None)]


def test_a_retry_after_longer_than_a_hop_comes_back_in_hops(world: World) -> None:
    world.client.answers = [Answer(http_status=429, body={"message": "Too Many Requests"}, retry_after_s=100.0)]
    run = deliver(world)

    assert run.line["retry_in_s"] == 100.0 and run.line["http_status"] == 429
    assert isinstance(run.ending, ComeBack) and run.ending.countdown_s == 30.0
    assert come_back_stamps(run.ending) == {"enqueued_at": T0, "not_before": NOW + 100.0}


def test_the_last_attempt_failing_is_dead_lettered_with_attempts() -> None:
    world = World({"MIPOS_RETRY_MAX_ATTEMPTS": "3"})
    world.phases.given["history"] = [record(1), record(2)]
    world.client.answers = [UNAVAILABLE]
    run = deliver(world)

    assert run.ending == DeadLettered("dl-1", "attempts", "Service Unavailable")
    line = run.line
    assert (line["attempt"], line["max_attempts"], line["outcome"], line["fail_reason"]) == (
        3, 3, "failed", "attempts")
    assert (line["http_status"], line["error_class"], line["log_level"]) == (503, "transient", "error")
    assert line["dead_letter_id"] == "dl-1"
    letter = world.dead_letters.added[0]
    assert [r["attempt"] for r in letter["attempts"]] == [1, 2, 3]
    assert letter["attempts"][-1]["outcome"] == "failed" and letter["enqueued_at"] == T0
    [stored] = the_finish(world)["records"]
    assert (stored["attempt"], stored["outcome"], stored["counted"]) == (3, "failed", True)


def test_a_retry_past_the_deadline_is_dead_lettered_with_deadline(world: World) -> None:
    world.clock.t = world.deadline_at - 0.3  # the shortest first retry is 0.5 s
    world.client.answers = [UNAVAILABLE]
    run = deliver(world)

    assert run.ending == DeadLettered("dl-1", "deadline", "Service Unavailable")
    line = run.line
    assert (line["attempt"], line["outcome"], line["fail_reason"], line["http_status"]) == (
        1, "failed", "deadline", 503)
    assert len(world.client.sent) == 1


def test_a_permanent_refusal_is_dead_lettered(world: World) -> None:
    world.client.answers = [NOT_FOUND]
    run = deliver(world)

    assert run.ending == DeadLettered("dl-1", "permanent", "Order not found.")
    line = run.line
    assert (line["outcome"], line["fail_reason"], line["error_class"], line["http_status"]) == (
        "failed", "permanent", "permanent", 409)
    assert line["error"] == "Order not found." and line["elapsed_ms"] == 4.0
    assert world.breaker.named("record_failure") == []
    finish = the_finish(world)
    assert finish["breaker_success"] is True  # mipos answered: it is up
    assert finish["done"] is None and finish["final"] is True
    assert [r["outcome"] for r in finish["records"]] == ["failed"]
    assert world.metrics.calls == [("accept", "failed", "permanent", None)]


def test_a_timeout_marks_the_order_uncertain_and_says_so(world: World) -> None:
    world.client.answers = [Answer.from_exception(requests.ReadTimeout("read timed out"), 1000.0)]
    run = deliver(world)

    assert isinstance(run.ending, ComeBack)
    line = run.line
    assert (line["outcome"], line["http_status"], line["error_class"]) == ("retrying", None, "transient")
    assert line["outcome_unknown"] is True and line["error"] == "ReadTimeout: read timed out"
    assert world.ledger.named("record_uncertain") == [
        ("record_uncertain", ORDER, Uncertain("accept", TASK, NOW, T0), world.deadline_at - NOW + 60.0)]
    [stored] = the_finish(world)["records"]
    assert stored["outcome_unknown"] is True
    assert len(world.breaker.named("record_failure")) == 1


def lost_mark(task_id: str = TASK, action: str = "accept", sent_s_ago: float = 30.0) -> SendingMark:
    return SendingMark(task_id, 1, action, NOW - sent_s_ago, T0, "lock-of-the-lost-worker")


def test_a_lost_workers_attempt_is_recorded_unknown_and_settled(world: World) -> None:
    """The start turned the lost worker's mark into the uncertain mark and the unknown record
    (one script, worker/state/phases.py): the story writes neither, and settles it."""
    world.phases.given["interrupted"] = lost_mark()
    world.client.pending = [LISTED]
    world.client.answers = [OK]
    run = deliver(world)

    assert run.ending == Finished()
    assert world.ledger.calls == [("clear_uncertain", ORDER), ("mark_sending", TASK, 2)]
    assert world.client.pending_calls == [("3", "tok-1")]
    line = run.line
    assert (line["attempt"], line["outcome"]) == (2, "accepted")
    assert line["previous_outcome"] == "unknown"
    assert line["possible_duplicate"] is True and line["unknown_attempts"] == [1]


# -- settled: an earlier request whose answer never came --------------------------------------------------


def uncertain_accept(at: float = NOW - 60.0, enqueued_at: float = T0 - 5.0) -> Uncertain:
    return Uncertain("accept", OTHER_TASK, at, enqueued_at)


def test_previous_unknown_still_listed_is_sent_again(world: World) -> None:
    world.phases.given["uncertain"] = uncertain_accept()
    world.client.pending = [LISTED]
    world.client.answers = [OK]
    run = deliver(world)

    assert run.ending == Finished()
    assert world.tokens.calls[0] == ("current", UNREAD)  # the pending list's token
    assert world.client.pending_calls == [("3", "tok-1")]
    assert len(world.client.sent) == 1
    assert world.ledger.named("clear_uncertain") == [("clear_uncertain", ORDER)]
    line = run.line
    assert (line["outcome"], line["previous_outcome"]) == ("accepted", "unknown")
    assert "possible_duplicate" not in line and "confirmed_by" not in line


def test_gone_from_the_list_after_two_unanswered_requests_says_one_may_still_land(world: World) -> None:
    """The list shows one request landed; the other unanswered one may land too: flagged
    (seen in a strict chaos run: a confirmed success without possible_duplicate)."""
    unknown = {"attempt": 0, "at": NOW - 90.0, "outcome": "retrying", "http_status": None, "error": "timeout",
               "error_class": "transient", "retry_in_s": 0.1, "elapsed_ms": 1000.0, "counted": True,
               "outcome_unknown": True}
    world.phases.given["history"] = [{**unknown, "attempt": 1}, {**unknown, "attempt": 2, "at": NOW - 60.0}]
    world.phases.given["uncertain"] = Uncertain("accept", TASK, NOW - 60.0, T0)
    world.client.pending = [NOT_LISTED]
    run = deliver(world)

    assert run.ending == Finished()
    line = run.line
    assert line["confirmed_by"] == "pending_list"
    assert line["possible_duplicate"] is True and line["unknown_attempts"] == [1, 2]


def test_gone_from_the_list_after_the_same_action_is_accepted_without_sending(world: World) -> None:
    world.phases.given["uncertain"] = uncertain_accept()
    world.client.pending = [NOT_LISTED]
    run = deliver(world)

    assert run.ending == Finished()
    assert world.client.sent == []
    line = run.line
    assert (line["outcome"], line["attempt"], line["http_status"]) == ("accepted", 1, 200)
    assert line["confirmed_by"] == "pending_list" and line["previous_outcome"] == "unknown"
    finish = the_finish(world)
    done = finish["done"]
    assert (done.action, done.task_id, done.confirmed_by) == ("accept", OTHER_TASK, "pending_list")
    [stored] = finish["records"]
    assert (stored["outcome"], stored["counted"]) == ("accepted", False)
    assert world.dead_letters.added == []


def test_gone_from_the_list_after_the_other_action_is_a_permanent_failure(world: World) -> None:
    world.phases.given["uncertain"] = uncertain_accept()
    world.client.pending = [NOT_LISTED]
    run = deliver(world, Action.DENY)

    assert isinstance(run.ending, DeadLettered) and run.ending.reason == "permanent"
    assert run.ending.error == (
        "order 3/ord-1 was already accepted at mipos (task task-0, whose answer never came; mipos no longer "
        "lists the order); it cannot be denied afterwards")
    assert world.client.sent == []
    line = run.line
    assert (line["event"], line["outcome"], line["fail_reason"]) == ("deny_attempt", "failed", "permanent")
    assert line["confirmed_by"] == "pending_list"
    done = the_finish(world)["done"]  # the accept that landed is recorded
    assert (done.action, done.task_id, done.confirmed_by, done.message) == (
        "accept", OTHER_TASK, "pending_list", None)


def test_list_unreadable_after_the_same_action_sends_again(world: World) -> None:
    world.phases.given["uncertain"] = uncertain_accept()
    world.client.pending = [LIST_UNREADABLE]
    world.client.answers = [OK]
    run = deliver(world)

    assert run.ending == Finished()
    assert len(world.client.sent) == 1
    assert world.ledger.named("clear_uncertain") == []  # the done record ends it
    assert (run.line["outcome"], run.line["previous_outcome"]) == ("accepted", "unknown")
    # the earlier accept (another task's) may have landed too: the README promises the flag
    assert run.line["possible_duplicate"] is True and run.line["unknown_task_id"] == OTHER_TASK


def test_list_unreadable_after_the_other_action_comes_back_counted(world: World) -> None:
    world.phases.given["uncertain"] = uncertain_accept()
    world.client.pending = [LIST_UNREADABLE]
    run = deliver(world, Action.DENY)

    assert isinstance(run.ending, ComeBack)
    assert come_back_stamps(run.ending) == {"enqueued_at": T0}
    assert run.ending.message["message"] == DENY_MESSAGE  # the deny comes back with its reason
    assert world.client.sent == []
    line = run.line
    assert (line["outcome"], line["http_status"], line["error_class"]) == ("retrying", 503, "transient")
    assert line["error"] == ("cannot tell whether the earlier accept (task task-0) reached mipos: "
                             "pending list of store 3: Service Unavailable")
    assert line["previous_outcome"] == "unknown" and 0.5 <= line["retry_in_s"] <= 1.0
    [stored] = the_finish(world)["records"]
    assert stored["counted"] is True


def test_list_off_after_the_same_action_sends_again() -> None:
    world = World({"MIPOS_CONFIRM_WITH_PENDING_LIST": "false"})
    world.phases.given["uncertain"] = uncertain_accept()
    world.client.answers = [OK]
    run = deliver(world)

    assert run.ending == Finished()
    assert world.client.pending_calls == [] and len(world.client.sent) == 1
    assert (run.line["outcome"], run.line["previous_outcome"]) == ("accepted", "unknown")
    assert run.line["possible_duplicate"] is True


def test_list_off_after_the_other_action_is_refused() -> None:
    world = World({"MIPOS_CONFIRM_WITH_PENDING_LIST": "false"})
    world.phases.given["uncertain"] = uncertain_accept()
    run = deliver(world, Action.DENY)

    assert isinstance(run.ending, DeadLettered) and run.ending.reason == "permanent"
    assert run.ending.error is not None
    assert run.ending.error.startswith("not sent: the accept of this order (task task-0) may have reached mipos")
    assert "MIPOS_CONFIRM_WITH_PENDING_LIST is off" in run.ending.error
    assert world.client.pending_calls == [] and world.client.sent == []
    line = run.line
    assert (line["outcome"], line["fail_reason"], line["previous_outcome"]) == ("failed", "permanent", "unknown")


def test_too_old_for_the_list_refuses_the_other_action(world: World) -> None:
    world.phases.given["uncertain"] = uncertain_accept(enqueued_at=NOW - 500.0)
    world.client.pending = [NOT_LISTED]
    run = deliver(world, Action.DENY)

    assert isinstance(run.ending, DeadLettered) and run.ending.reason == "permanent"
    assert "the order is 500s old, too old for mipos's pending list to tell" in (run.ending.error or "")
    assert world.client.sent == []
    assert run.line["previous_outcome"] == "unknown"


def test_too_old_for_the_list_sends_the_same_action_again(world: World) -> None:
    world.phases.given["uncertain"] = uncertain_accept(enqueued_at=NOW - 500.0)
    world.client.pending = [NOT_LISTED]
    world.client.answers = [OK]
    run = deliver(world)

    assert run.ending == Finished() and len(world.client.sent) == 1
    assert "confirmed_by" not in run.line and run.line["previous_outcome"] == "unknown"
    assert run.line["possible_duplicate"] is True


def test_still_listed_the_other_action_waits_for_the_slow_request_uncounted(world: World) -> None:
    world.phases.given["uncertain"] = uncertain_accept(at=NOW - 5.0)  # one call may take 20 s
    world.client.pending = [LISTED]
    run = deliver(world, Action.DENY)

    assert isinstance(run.ending, ComeBack)
    assert world.client.sent == []
    line = run.line
    assert (line["outcome"], line["error_class"], line["previous_outcome"]) == (
        "retrying", "transient", "unknown")
    assert line["error"] == ("waiting for the earlier accept (task task-0, sent 5.0s ago, no answer) to land "
                             "or not before deciding: one call may take 20s")
    assert line["retry_in_s"] == pytest.approx(15.05)  # until one call's bound from when it was sent
    [stored] = the_finish(world)["records"]
    assert stored["counted"] is False
    assert world.ledger.named("clear_uncertain") == []


def test_still_listed_the_same_action_waits_for_the_slow_request_uncounted(world: World) -> None:
    """Issue 20: no second accept while the first may still land (sent 0.3 s ago; one call may take 20 s)."""
    world.phases.given["uncertain"] = uncertain_accept(at=NOW - 0.3)
    world.client.pending = [LISTED]
    run = deliver(world)

    assert isinstance(run.ending, ComeBack)
    assert world.client.sent == []
    line = run.line
    assert (line["outcome"], line["previous_outcome"], line["waiting_for_task_id"]) == (
        "retrying", "unknown", OTHER_TASK)
    assert line["retry_in_s"] == pytest.approx(19.75)
    [stored] = the_finish(world)["records"]
    assert stored["counted"] is False
    assert world.ledger.named("clear_uncertain") == []


def test_the_wait_for_a_slow_request_keeps_the_deadline(world: World) -> None:
    world.clock.t = world.deadline_at - 5.0  # the bound would end past the deadline
    world.phases.given["uncertain"] = uncertain_accept(at=world.clock.t - 0.3)
    world.client.pending = [LISTED]
    run = deliver(world)

    assert isinstance(run.ending, DeadLettered) and run.ending.reason == "deadline"
    assert world.client.sent == []


def test_a_lost_workers_accept_of_another_task_stops_a_deny(world: World) -> None:
    """Issue 24: the accept of another task, whose worker was lost mid-request, is seen by the
    deny that takes the lock next; gone from the list, it landed: the deny is never sent."""
    world.phases.given["interrupted"] = lost_mark(task_id=OTHER_TASK)
    world.client.pending = [NOT_LISTED]
    run = deliver(world, Action.DENY)

    assert isinstance(run.ending, DeadLettered) and run.ending.reason == "permanent"
    assert world.client.sent == []
    assert run.line["confirmed_by"] == "pending_list"
    done = the_finish(world)["done"]
    assert (done.action, done.task_id) == ("accept", OTHER_TASK)


def test_a_copy_that_cannot_take_the_lock_does_not_touch_a_live_request(world: World) -> None:
    world.phases.lock_free = False
    world.phases.given["interrupted"] = lost_mark(sent_s_ago=0.5)  # the live copy's mark
    run = deliver(world)

    assert isinstance(run.ending, ComeBack)
    assert world.ledger.calls == [] and world.client.sent == []
    assert the_finish(world)["records"] == []


def test_a_refusal_after_an_unanswered_same_action_that_landed_is_accepted(world: World) -> None:
    world.phases.given["uncertain"] = uncertain_accept()
    world.client.pending = [LISTED, NOT_LISTED]
    world.client.answers = [NOT_FOUND]
    run = deliver(world)

    assert run.ending == Finished()
    assert world.dead_letters.added == []
    line = run.line
    assert (line["outcome"], line["confirmed_by"], line["previous_outcome"]) == (
        "accepted", "pending_list", "unknown")
    assert line["refused_with"] == "Order not found." and line["landed_task_id"] == OTHER_TASK
    done = the_finish(world)["done"]
    assert (done.action, done.task_id, done.confirmed_by) == ("accept", OTHER_TASK, "pending_list")


def test_a_refusal_while_still_listed_is_a_dead_letter(world: World) -> None:
    world.phases.given["uncertain"] = uncertain_accept()
    world.client.pending = [LISTED, LISTED]
    world.client.answers = [NOT_FOUND]
    run = deliver(world)

    assert isinstance(run.ending, DeadLettered) and run.ending.reason == "permanent"
    assert run.ending.error == "Order not found."


def test_a_refusal_nobody_can_settle_has_its_own_reason(world: World) -> None:
    world.phases.given["uncertain"] = uncertain_accept()
    world.client.pending = [LISTED, LIST_UNREADABLE]
    world.client.answers = [NOT_FOUND]
    run = deliver(world)

    assert isinstance(run.ending, DeadLettered) and run.ending.reason == "permanent_after_unknown"
    assert run.ending.error is not None and run.ending.error.startswith(
        "Order not found. (refused after the accept of task task-0, sent 60.0s earlier, whose answer never came")
    assert run.line["unknown_task_id"] == OTHER_TASK


def test_the_uncertain_mark_lasts_while_mipos_lists_the_order(world: World) -> None:
    """Issue 24, item 4: with a 30 s deadline the mark still outlives mipos's 10-minute list."""
    world = World({"MIPOS_RETRY_DEADLINE_S": "30"})
    world.client.answers = [Answer.from_exception(requests.ReadTimeout("read timed out"), 1000.0)]
    deliver(world)

    [(_, _, _, ttl_s)] = world.ledger.named("record_uncertain")
    assert ttl_s == pytest.approx(T0 + 600.0 + 60.0 - NOW)


def test_still_listed_the_other_action_is_sent_once_the_slow_request_had_its_time(world: World) -> None:
    world.phases.given["uncertain"] = uncertain_accept(at=NOW - 25.0)
    world.client.pending = [LISTED]
    world.client.answers = [OK]
    run = deliver(world, Action.DENY)

    assert run.ending == Finished()
    assert world.client.sent[0][0].action is Action.DENY
    assert world.ledger.named("clear_uncertain") == [("clear_uncertain", ORDER)]
    assert (run.line["outcome"], run.line["previous_outcome"]) == ("denied", "unknown")


def test_a_replay_says_so_on_every_line_and_in_its_dead_letter(world: World) -> None:
    world.client.answers = [NOT_FOUND]
    run = deliver(world, stamps={"replay_of": "dl-old"})

    assert run.line["replay_of"] == "dl-old" and run.line["fail_reason"] == "permanent"
    assert world.dead_letters.added[0]["replay_of"] == "dl-old"


# -- failures around the send -------------------------------------------------------------------------


@pytest.mark.parametrize(("problem", "error_class"), [
    (TransientError("token call: Service Unavailable", http_status=503), "transient"),
    (AuthError("token call: invalid_client", http_status=401), "auth"),
])
def test_a_failing_token_call_retries_and_counts_toward_the_breaker(world: World, problem: MiposError,
                                                                   error_class: str) -> None:
    world.tokens.fail = problem
    run = deliver(world)

    assert isinstance(run.ending, ComeBack)
    assert world.client.sent == []
    line = run.line
    assert (line["outcome"], line["http_status"], line["error_class"], line["error"]) == (
        "retrying", problem.http_status, error_class, problem.message)
    assert "resend" not in line  # no token was refused: nothing to resend
    assert world.breaker.named("record_failure") == [("record_failure", problem.message)]


def test_an_unexpected_exception_is_logged_then_retried(world: World) -> None:
    world.client.answers = [ValueError("boom")]
    run = deliver(world)

    assert isinstance(run.ending, ComeBack)
    assert [e["event"] for e in run.logs] == ["attempt_crashed", "accept_attempt"]
    crashed = run.logs[0]
    assert crashed["log_level"] == "error" and crashed["exc_info"] is True and crashed["task_id"] == TASK
    line = run.line
    assert (line["attempt"], line["outcome"], line["error_class"], line["http_status"]) == (
        1, "retrying", "transient", None)
    assert line["error"] == "internal error: ValueError: boom"
    finish = the_finish(world)
    assert finish["lock_id"] == LOCK_ID and finish["final"] is False
    assert [r["counted"] for r in finish["records"]] == [True]


def test_an_unexpected_exception_on_the_last_attempt_is_dead_lettered() -> None:
    world = World({"MIPOS_RETRY_MAX_ATTEMPTS": "2"})
    world.phases.given["history"] = [record(1)]
    world.client.answers = [KeyError("x")]
    run = deliver(world)

    assert isinstance(run.ending, DeadLettered) and run.ending.reason == "attempts"
    assert run.line["fail_reason"] == "attempts" and run.line["error"] == "internal error: KeyError: 'x'"


def test_redis_unreachable_is_not_swallowed(world: World) -> None:
    def unreachable(*_: Any, **__: Any) -> Start:
        raise redis.ConnectionError("Connection refused")

    world.phases.begin = unreachable  # type: ignore[method-assign]
    with pytest.raises(redis.ConnectionError):
        deliver(world)
    assert world.dead_letters.added == []


def test_a_success_after_an_earlier_unknown_attempt_is_flagged(world: World) -> None:
    world.phases.given["history"] = [record(1, unknown=True, http_status=None), record(2)]
    world.client.answers = [OK]
    run = deliver(world)

    assert run.ending == Finished()
    assert world.client.pending_calls == []  # the last attempt had an answer: nothing to settle
    line = run.line
    assert (line["attempt"], line["outcome"]) == (3, "accepted")
    assert line["possible_duplicate"] is True and line["unknown_attempts"] == [1]
    assert "previous_outcome" not in line


def test_the_accepted_line_survives_a_redis_error_after_the_end(world: World) -> None:
    def log_closed() -> None:
        raise redis.ConnectionError("Connection reset by peer")

    world.phases.closes_breaker = True
    world.breaker.log_closed = log_closed  # type: ignore[method-assign]
    world.client.answers = [OK]
    with capture_logs() as logs:
        try:
            Delivery(Action.ACCEPT, TASK, world, (),
                     {**ORDER_FIELDS, STAMPS_KEY: {"enqueued_at": T0}}).run()
        except redis.RedisError:
            pass  # handing the message back is fine; losing the line is not
    assert the_finish(world)["done"] is not None  # the order was recorded as accepted
    assert [e["outcome"] for e in logs if e["event"] == "accept_attempt"] == ["accepted"]


# -- the Celery shell (tasks/orders.py) ------------------------------------------------------------------


@pytest.fixture
def shell(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, World]]:
    """``accept_order`` run in this process, its runtime the fake world. ``tasks.orders``
    imported ``get_runtime`` by name, so that is the name patched (and the module's, for
    anything that looks it up there)."""
    import tasks.orders
    import worker.wiring.runtime

    world = World()
    monkeypatch.setattr(tasks.orders, "get_runtime", lambda: world)
    monkeypatch.setattr(worker.wiring.runtime, "get_runtime", lambda: world)
    task = tasks.orders.accept_order
    task.push_request(id=TASK, retries=0)
    try:
        yield task, world
    finally:
        task.pop_request()


def test_the_shell_turns_a_come_back_into_a_celery_retry(shell: tuple[Any, World]) -> None:
    from celery.exceptions import Retry

    from mipos_worker import order_tasks as order_task

    task, world = shell
    world.client.answers = [UNAVAILABLE]
    calls: list[dict[str, Any]] = []

    def retry(**options: Any) -> Retry:  # publishing would need Redis: record it instead
        calls.append({**options, "internal": order_task._internal_publish.get()})
        return Retry("Retry in", options.get("exc"), options.get("countdown"))

    task.retry = retry
    try:
        with capture_logs(), pytest.raises(Retry):
            task.run(**ORDER_FIELDS, **{STAMPS_KEY: {"enqueued_at": T0}})
    finally:
        del task.retry
    [call] = calls
    assert call["args"] == () and call["internal"] is True  # our stamps are kept
    assert call["kwargs"] == {**ORDER_FIELDS, STAMPS_KEY: {"enqueued_at": T0}}
    assert 0.5 <= call["countdown"] <= 1.0
    assert isinstance(call["exc"], TransientError) and str(call["exc"]) == "Service Unavailable"


def test_the_shell_fails_a_dead_lettered_order(shell: tuple[Any, World]) -> None:
    from mipos_worker.order.errors import OrderFailed

    task, world = shell
    world.client.answers = [NOT_FOUND]
    with capture_logs(), pytest.raises(OrderFailed) as failed:
        task.run(**ORDER_FIELDS, **{STAMPS_KEY: {"enqueued_at": T0}})
    assert failed.value.letter_id == "dl-1"
    assert str(failed.value) == "dead-lettered (permanent): Order not found. [dead letter dl-1]"


def test_the_shell_returns_when_finished(shell: tuple[Any, World]) -> None:
    task, world = shell
    world.client.answers = [OK]
    with capture_logs() as logs:
        assert task.run(**ORDER_FIELDS, **{STAMPS_KEY: {"enqueued_at": T0}}) is None
    assert [e["outcome"] for e in logs if e["event"] == "accept_attempt"] == ["accepted"]
    assert the_finish(world)["task_id"] == TASK  # the Celery request's id


def test_the_shell_hands_the_message_back_when_redis_is_unreachable(shell: tuple[Any, World]) -> None:
    from celery.exceptions import Reject

    task, world = shell

    def unreachable(*_: Any, **__: Any) -> Start:
        raise redis.ConnectionError("Connection refused")

    world.phases.begin = unreachable  # type: ignore[method-assign]
    with pytest.raises(Reject) as rejected:
        task.run(**ORDER_FIELDS)
    assert rejected.value.requeue is True
