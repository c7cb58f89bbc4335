"""The story of one delivery of an order message, as a small state machine.

    received ─ checked ─ locked ─ allowed (breaker, rate) ─ settled ─ sent ─ answered
        │         │         │            │                     │                │
        └─────────┴─────────┴────────────┴──────── done | come back later | dead letter

``Delivery.run`` reads top to bottom; each step either moves on or ends the
delivery with one of three endings (``Finished``, ``ComeBack``, ``DeadLettered``).
"Come back later" has one exit, ``_come_back``. Redis is met twice on the plain
path, at the start and at the end (``worker/state/phases.py``); every branch can be
driven with fakes of ``Services`` (tests/test_attempt_story.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import redis
import structlog

from config import WorkerSettings, timing
from mipos_worker.order.errors import InvalidOrder
from mipos_worker.order.model import (
    ORDER_FIELDS,
    Action,
    OrderRequest,
    named_arguments,
    parse_order_request,
)
from mipos_worker.order.stamps import STAMPS_KEY, split_message
from worker.attempt import retry
from worker.attempt.line import AttemptLine
from worker.attempt.record import AttemptRecord, History
from worker.attempt.settle import PENDING_LIST_TRUSTED_FOR_S, SettleStep, settle_step
from worker.mipos.budget import attempt_budget
from worker.mipos.classification import Answer, Verdict, classify
from worker.mipos.errors import ErrorClass, MiposError
from worker.mipos.pending import fetch_pending
from worker.state.ledger import LedgerEntry, SendingMark, Uncertain, remembered_until
from worker.state.phases import Start

logger = structlog.stdlib.get_logger("mipos.attempts")

LOCK_BUSY_RETRY_S = (0.2, 1.0)  # another worker is sending this order right now
RATE_BUSY_RETRY_S = (0.05, 0.3)  # the shared rate limit's second is full
# Come back this much after a slow request's bound has passed, so the list is read once it has.
SETTLE_AFTER_BOUND_S = 0.05


class Services(Protocol):
    """What a delivery uses (``worker/wiring/runtime.py`` builds it; tests pass fakes)."""

    @property
    def settings(self) -> WorkerSettings: ...
    @property
    def client(self) -> Any: ...  # worker.mipos.client.MiposClient
    @property
    def tokens(self) -> Any: ...  # worker.mipos.tokens.TokenStore
    @property
    def ledger(self) -> Any: ...  # worker.state.ledger.OrderLedger
    @property
    def phases(self) -> Any: ...  # worker.state.phases.AttemptPhases
    @property
    def breaker(self) -> Any: ...  # worker.state.breaker.CircuitBreaker
    @property
    def dead_letters(self) -> Any: ...  # worker.state.deadletters.DeadLetters
    @property
    def metrics(self) -> Any: ...  # worker.state.counters.Metrics
    @property
    def clock(self) -> Any: ...  # mipos_worker.state.clock.SharedClock


@dataclass(frozen=True)
class Finished:
    """Accepted, denied or skipped: nothing more to do."""


@dataclass(frozen=True)
class DeadLettered:
    letter_id: str
    reason: str
    error: str | None


class ComeBack(Exception):
    """Come back later: a new message (same task id) after ``countdown_s``, carrying ``message``."""

    def __init__(self, countdown_s: float, message: dict[str, Any], reason: str | None) -> None:
        super().__init__(reason)
        self.countdown_s = countdown_s
        self.message = message
        self.reason = reason


Ending = Finished | DeadLettered | ComeBack


class Delivery:
    def __init__(self, action: Action, task_id: str | None, services: Services,
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.action, self.task_id, self.s = action, task_id or "unknown", services
        self.settings = services.settings
        self.clock: Callable[[], float] = services.clock.now
        self.now = self.clock()
        given, stamps, self.ignored = split_message(kwargs)
        # Sent by name without our stamps: the deadline counts from the first attempt.
        self.stamps = stamps if stamps.enqueued_at else stamps.but(enqueued_at=self.now)
        self.enqueued_at: float = self.stamps.enqueued_at or self.now
        self.deadline_at = self.enqueued_at + self.settings.retry.deadline_s
        self.request: OrderRequest | None = None
        self.invalid: InvalidOrder | None = None
        try:
            self.request = parse_order_request(action, named_arguments(action, args, dict(given)))
            self.arguments: dict[str, Any] = self.request.body()
        except InvalidOrder as exc:
            self.invalid = exc
            self.arguments = {**given, **({"args": list(args)} if args else {})}
        self.order = self.request.order if self.request else None
        self.order_fields = {f: loggable(self.arguments.get(f)) for f in ORDER_FIELDS}
        sticky = {k: v for k, v in (("reconcile_resend", self.stamps.resend),
                                    ("replay_of", self.stamps.replay_of)) if v}
        self.line = AttemptLine(action=action, task_id=self.task_id, order_fields=self.order_fields,
                                max_attempts=self.settings.retry.max_attempts, extra=sticky,
                                on_emit=self._count)
        self.history = History([])
        self.unwritten: list[dict[str, Any]] = []  # records the end's round trip writes
        self.start: Start | None = None
        self.marked: int | None = None  # the attempt the sending mark stands for
        self.sent_at: float = self.now  # when the last request left (Redis's clock)
        self.breaker_heard = False  # an answer came: tells the breaker mipos is up
        self.closed = False  # the end's round trip was made
        self.dead_letter: DeadLettered | None = None
        self.maybe_landed: Uncertain | None = None  # sent again although that one may have landed

    # -- the story ---------------------------------------------------------------

    def run(self) -> Ending:
        if self.ignored:
            logger.warning("private_keys_ignored", task_id=self.task_id, keys=self.ignored, **self.order_fields,
                           reason="only mipos-worker itself sets these; a message sent by name cannot")
        try:
            return self._deliver()
        except (ComeBack, _Ended) as end:
            return end if isinstance(end, ComeBack) else end.ending
        except redis.RedisError:
            raise  # the shell hands the message back
        except Exception as exc:  # noqa: BLE001 - a bug of ours
            return self._crashed(exc)

    def _deliver(self) -> Ending:
        checked = self.request is not None and self.now <= self.deadline_at and not self._waiting()
        start = self._begin(take_lock=checked)  # received
        if self.request is None:
            return self._fail("invalid", f"invalid arguments: {self.invalid}", ErrorClass.PERMANENT)
        if self.now > self.deadline_at:
            return self._fail("deadline", "deadline passed before the attempt could start", ErrorClass.TRANSIENT)
        if self._waiting():
            return self._wait_for_not_before()
        if not start.locked:  # checked
            self._come_back(random.uniform(*LOCK_BUSY_RETRY_S), hop=False)
        with attempt_budget(timing.attempt_bound_s(self.settings)):  # locked
            if start.done is not None and (ending := self._already_done(start.done)):
                return ending
            self._allowed_by_breaker(start)  # allowed, or come back / dead letter
            uncertain = start.uncertain or self._own_unknown_attempt()
            if uncertain is not None and (ending := self._settle(uncertain)):  # settled
                return ending
            return self._send(uncertain)  # sent, answered

    # -- received and checked -----------------------------------------------------

    def _begin(self, take_lock: bool) -> Start:
        start = self.start = self.s.phases.begin(
            self.task_id, self.order, self.action, token_key=self.s.tokens.key, take_lock=take_lock,
            lock_ttl_s=timing.order_lock_ttl_s(self.settings), held=self.stamps.held,
            resend=self.stamps.resend, enqueued_at=self.enqueued_at,
            deadline_s=self.settings.retry.deadline_s, sending_ttl_s=self._remembered_for_s())
        self.history = History(start.history)
        self.marked = start.marked
        if start.interrupted is not None:
            self._note_interrupted(start.interrupted)
        return start

    def _waiting(self) -> bool:
        return self.stamps.not_before is not None and self.now < self.stamps.not_before

    def _wait_for_not_before(self) -> Ending:
        not_before = self.stamps.not_before
        assert not_before is not None
        if not_before > self.deadline_at:
            return self._fail("deadline", "the next attempt was due after the deadline", ErrorClass.TRANSIENT)
        self._come_back(not_before - self.now)

    def _note_interrupted(self, lost: SendingMark) -> None:
        """A worker died with a request of this order in flight (this task's or another's): the
        start made it the order's uncertain mark and wrote the unknown attempt to that task's
        history, in one step. Said once, for the operator."""
        logger.warning("request_outcome_unknown", task_id=self.task_id, lost_task_id=lost.task_id,
                       lost_attempt=lost.attempt, lost_action=lost.action, sent_at=lost.at,
                       reason="the worker that sent it was lost before its answer was recorded",
                       **self.order_fields)

    def _own_unknown_attempt(self) -> Uncertain | None:
        last = self.history.last_unknown()
        if last is None:
            return None
        return Uncertain(self.action.value, self.task_id, float(last.get("at") or 0), self.enqueued_at)

    # -- locked: done already? ----------------------------------------------------

    def _already_done(self, done: LedgerEntry) -> Ending | None:
        if done.action == self.action.value and self.stamps.resend:
            return None  # mipos says it never got it: send again, on purpose
        if done.action == self.action.value:
            self._close(final=True)
            self.line.emit(attempt=self.history.next_attempt(), outcome="skipped", done_by_task=done.task_id)
            return Finished()
        assert self.request is not None
        past = Action(done.action).done_outcome
        order = self.request.order
        return self._fail("permanent", f"order {order.store_id}/{order.order_external_id} was already {past} at "
                          f"mipos (task {done.task_id}); it cannot be {self.action.done_outcome} afterwards",
                          ErrorClass.PERMANENT)

    # -- allowed by the breaker and the rate limit ----------------------------------

    def _allowed_by_breaker(self, start: Start) -> None:
        """Wait while mipos is failing for everyone (held, no attempt spent); the shared rate."""
        breaker = self.s.breaker
        decision = breaker.decide() if start.breaker_open else "send"
        now = self.clock()
        if decision == "hold":
            wait = self.settings.breaker.probe_interval_s * random.uniform(1.0, 1.5)
            if now + wait > self.deadline_at:
                raise _Ended(self._fail("deadline", "deadline passed while the circuit breaker held the order "
                                        "(mipos is failing for every worker)", ErrorClass.TRANSIENT,
                                        held_by_breaker=True))
            breaker.hold(self.task_id, self.deadline_at, now)
            if not self.stamps.held:  # one line when held, not one per wake-up
                self.line.emit(attempt=self.history.next_attempt(), outcome="retrying",
                               error="circuit breaker open: held without spending an attempt",
                               error_class=ErrorClass.TRANSIENT.value, retry_in_s=wait, held_by_breaker=True)
            self._come_back(wait, held=True, reason="held: the circuit breaker is open")
        if self.stamps.held and decision == "send":
            wait = breaker.release_wait_s(self.task_id, now)
            if wait > 0:  # released oldest deadline first, at the shared rate
                self._come_back(wait, held=True, reason="held: the circuit breaker is open")
        elif decision == "send" and not start.slot:
            self._come_back(random.uniform(*RATE_BUSY_RETRY_S), hop=False)
        if self.stamps.held:
            breaker.unhold(self.task_id)
            self.stamps = self.stamps.but(held=False)

    # -- an earlier request whose answer never came -----------------------------------

    def _read_pending_list(self) -> tuple[bool | None, Answer, MiposError | None]:
        """Whether mipos still lists the order (None: the list is off, or could not be read)."""
        assert self.request is not None
        if not self.settings.confirm_with_pending_list:
            return None, Answer(http_status=None), None
        order = self.request.order
        try:
            pending, answer = fetch_pending(self.s.client, self.s.tokens, order.store_id)
        except MiposError as exc:
            return None, Answer(http_status=exc.http_status), exc
        return any(item.external_id == order.order_external_id for item in pending), answer, None

    def _settle(self, uncertain: Uncertain) -> Ending | None:
        """None: send. Else the delivery ended (worker/attempt/settle.py has the decision)."""
        assert self.request is not None
        order, same = self.request.order, uncertain.action == self.action.value
        other = Action(uncertain.action)
        attempt = self.history.next_attempt()
        listed, answer, problem = self._read_pending_list()
        step = settle_step(
            same_action=same, list_on=self.settings.confirm_with_pending_list, list_failed=problem is not None,
            listed=listed, age_s=self.clock() - min(self.enqueued_at, uncertain.enqueued_at),
            in_flight_for_s=self.clock() - uncertain.at, call_bound_s=timing.call_bound_s(self.settings))
        unknown = {"previous_outcome": "unknown"}
        about = f"the earlier {other.value} (task {uncertain.task_id}"
        match step:
            case SettleStep.SEND:
                if listed:
                    self.s.ledger.clear_uncertain(order)  # still pending: it did not land
                else:
                    self.maybe_landed = uncertain  # nobody could tell: a success may be a duplicate
                return None
            case SettleStep.RETRY_LIST_FAILED:
                assert problem is not None
                self._come_back_after_failure(
                    attempt, Answer(http_status=problem.http_status),
                    Verdict(ErrorClass.TRANSIENT, f"cannot tell whether {about}) reached mipos: {problem.message}"),
                    counted=True, fields=unknown)
            case SettleStep.WAIT_FOR_SLOW_REQUEST:
                self._wait_for_slow_request(uncertain, attempt, answer, about)
            case SettleStep.REFUSE:
                why = ("MIPOS_CONFIRM_WITH_PENDING_LIST is off, so mipos's pending list cannot settle it"
                       if not self.settings.confirm_with_pending_list else
                       f"the order is {self.clock() - min(self.enqueued_at, uncertain.enqueued_at):.0f}s old, "
                       "too old for mipos's pending list to tell")
                return self._fail("permanent", f"not sent: the {other.value} of this order (task "
                                  f"{uncertain.task_id}) may have reached mipos (its answer never came) and {why}; "
                                  f"sending the {self.action.value} too could leave the order both "
                                  f"{other.done_outcome} and {self.action.done_outcome}", ErrorClass.PERMANENT,
                                  previous_outcome="unknown")
            case SettleStep.LANDED:  # gone from the list: mipos got the earlier request
                done = self.s.ledger.entry(order, other, uncertain.task_id, self.request.message if same else None,
                                           confirmed_by="pending_list")
                if same:
                    self._add(attempt, self.action.done_outcome, answer, Verdict(None), counted=False)
                    self._close(final=True, done=done)
                    self.line.emit(attempt=attempt, outcome=self.action.done_outcome,
                                   http_status=answer.http_status, elapsed_ms=answer.elapsed_ms,
                                   confirmed_by="pending_list", previous_outcome="unknown",
                                   **self._others_may_land())
                    return Finished()
                return self._fail("permanent", f"order {order.store_id}/{order.order_external_id} was already "
                                  f"{other.done_outcome} at mipos (task {uncertain.task_id}, whose answer never "
                                  f"came; mipos no longer lists the order); it cannot be "
                                  f"{self.action.done_outcome} afterwards", ErrorClass.PERMANENT, attempt=attempt,
                                  confirmed_by="pending_list", done=done)
        raise AssertionError(f"unhandled settle step {step}")

    def _wait_for_slow_request(self, uncertain: Uncertain, attempt: int, answer: Answer,
                               about: str) -> NoReturn:
        """Come back once the unknown request has had one call's bound since it was sent: by
        then it has landed or never will. Nothing is sent, no attempt spent; the deadline holds."""
        now = self.clock()
        wait = max(0.0, uncertain.at + timing.call_bound_s(self.settings) - now) + SETTLE_AFTER_BOUND_S
        error = (f"waiting for {about}, sent {now - uncertain.at:.1f}s ago, no answer) to land or not "
                 f"before deciding: one call may take {timing.call_bound_s(self.settings):g}s")
        if now + wait > self.deadline_at:
            self._add(attempt, "failed", answer, Verdict(ErrorClass.TRANSIENT, error), counted=False)
            raise _Ended(self._fail("deadline", error, ErrorClass.TRANSIENT, answer, attempt=attempt,
                                    recorded=True, previous_outcome="unknown"))
        self._add(attempt, "retrying", answer, Verdict(ErrorClass.TRANSIENT, error), counted=False,
                  retry_in_s=wait)
        self.line.emit(attempt=attempt, outcome="retrying", http_status=answer.http_status, error=error,
                       error_class=ErrorClass.TRANSIENT.value, retry_in_s=wait, elapsed_ms=answer.elapsed_ms,
                       previous_outcome="unknown", waiting_for_task_id=uncertain.task_id)
        self._come_back(wait, reason=error)

    # -- sent and answered ----------------------------------------------------------

    def _send(self, uncertain: Uncertain | None) -> Ending:
        assert self.request is not None
        rejected_token: str | None = None
        counted = True
        fields: dict[str, Any] = {"previous_outcome": "unknown"} if uncertain is not None else {}
        while True:
            attempt = self.history.next_attempt()
            sent, answer, verdict, token = self._one_request(attempt, rejected_token)
            self._tell_breaker(sent, verdict)
            if verdict.ok:
                done = self.s.ledger.entry(self.request.order, self.action, self.task_id, self.request.message)
                self._add(attempt, self.action.done_outcome, answer, verdict, counted)
                self._close(final=True, done=done)
                self.line.emit(attempt=attempt, outcome=self.action.done_outcome, http_status=answer.http_status,
                               elapsed_ms=answer.elapsed_ms, **fields, **self._duplicate_warning())
                return Finished()
            if retry.resend_with_fresh_token(verdict, sent, already_resent=rejected_token is not None):
                self._add(attempt, "retrying", answer, verdict, counted, retry_in_s=0.0)
                self.line.emit(attempt=attempt, outcome="retrying", http_status=answer.http_status,
                               error=verdict.error, error_class=verdict.error_class, retry_in_s=0.0,
                               elapsed_ms=answer.elapsed_ms, resend="fresh_token", **fields)
                rejected_token, counted = token, False
                continue
            if sent and answer.outcome_unknown:
                self._mark_uncertain()
                fields = {**fields, "outcome_unknown": True}
            if verdict.error_class is ErrorClass.PERMANENT:
                if uncertain is not None and uncertain.action == self.action.value:
                    return self._settle_refusal(uncertain, attempt, answer, verdict, counted)
                self._add(attempt, "failed", answer, verdict, counted)
                return self._fail("permanent", verdict.error, ErrorClass.PERMANENT, answer, attempt=attempt,
                                  recorded=True, **fields)
            self._come_back_after_failure(attempt, answer, verdict, counted, fields)

    def _settle_refusal(self, uncertain: Uncertain, attempt: int, answer: Answer, verdict: Verdict,
                        counted: bool) -> Ending:
        """A permanent refusal after a request of the same action went unanswered: that request
        may have landed, and mipos refuses the second for that very reason (``Order not
        found.``). The pending list tells; a refusal nobody can settle has a reason of its own."""
        assert self.request is not None
        order = self.request.order
        listed, list_answer, problem = self._read_pending_list()
        age_s = self.clock() - min(self.enqueued_at, uncertain.enqueued_at)
        earlier = (f"the {uncertain.action} of task {uncertain.task_id}, sent {self.clock() - uncertain.at:.1f}s "
                   "earlier, whose answer never came")
        if listed is False and age_s < PENDING_LIST_TRUSTED_FOR_S:  # it landed: mipos has the order
            done = self.s.ledger.entry(order, self.action, uncertain.task_id, self.request.message,
                                       confirmed_by="pending_list")
            self._add(attempt, self.action.done_outcome, answer, Verdict(None), counted)
            self._close(final=True, done=done)
            self.line.emit(attempt=attempt, outcome=self.action.done_outcome, http_status=answer.http_status,
                           elapsed_ms=answer.elapsed_ms, confirmed_by="pending_list", previous_outcome="unknown",
                           refused_with=verdict.error, landed_task_id=uncertain.task_id,
                           **self._others_may_land())
            return Finished()
        self._add(attempt, "failed", answer, verdict, counted)
        if listed:  # mipos still waits for the order: the refusal is real
            return self._fail("permanent", verdict.error, ErrorClass.PERMANENT, answer, attempt=attempt,
                              recorded=True, previous_outcome="unknown")
        why = ("MIPOS_CONFIRM_WITH_PENDING_LIST is off" if not self.settings.confirm_with_pending_list else
               f"the pending list could not be read ({problem.message})" if problem is not None else
               f"the order is {age_s:.0f}s old, too old for mipos's pending list to tell")
        return self._fail(
            "permanent_after_unknown",
            f"{verdict.error} (refused after {earlier}: that {uncertain.action} may have reached mipos, which "
            f"would explain the refusal, and {why}; check the order at mipos before replaying)",
            ErrorClass.PERMANENT, answer, attempt=attempt, recorded=True, previous_outcome="unknown",
            unknown_task_id=uncertain.task_id)

    def _one_request(self, attempt: int, rejected: str | None) -> tuple[bool, Answer, Verdict, str | None]:
        """Get a token and send; ``sent`` is False when no token could be had."""
        assert self.request is not None and self.start is not None
        try:
            tokens = self.s.tokens
            token = tokens.replace_rejected(rejected) if rejected else tokens.current(stored=self.start.token)
        except MiposError as exc:
            return False, Answer(http_status=exc.http_status), Verdict(exc.error_class, exc.message), None
        self.sent_at = self.clock()
        if self.marked != attempt:  # not marked by the start (a resend, a probe, after settling)
            self._write_unwritten()
            assert self.start.locked
            self.s.ledger.mark_sending(self.request.order, SendingMark(
                self.task_id, attempt, self.action.value, self.sent_at, self.enqueued_at, self.start.lock_id),
                ttl_s=self._remembered_for_s())
            self.marked = attempt
        answer = self.s.client.send(self.request, token)
        return True, answer, classify(answer), token

    def _tell_breaker(self, sent: bool, verdict: Verdict) -> None:
        """An answer from mipos (even a permanent refusal) says it is up; a transient
        failure, or a token call that failed, counts toward opening the breaker."""
        if verdict.ok or verdict.error_class is ErrorClass.PERMANENT:
            self.breaker_heard = True
        elif verdict.error_class is ErrorClass.TRANSIENT or not sent:
            self.s.breaker.record_failure(verdict.error)

    def _mark_uncertain(self) -> None:
        """The request just sent got no answer: remembered, from when it was sent, while the
        task may retry and mipos may still act on the order (either action)."""
        assert self.order is not None
        self.s.ledger.record_uncertain(
            self.order, Uncertain(self.action.value, self.task_id, self.sent_at, self.enqueued_at),
            ttl_s=self._remembered_for_s())

    def _remembered_for_s(self) -> float:
        return remembered_until(self.enqueued_at, self.settings.retry.deadline_s) - self.clock()

    # -- the endings ------------------------------------------------------------------

    def _come_back_after_failure(self, attempt: int, answer: Answer, verdict: Verdict, counted: bool,
                                 fields: dict[str, Any]) -> NoReturn:
        """A transient failure: come back after the schedule's delay, or fail (attempts, deadline)."""
        assert verdict.error_class is not None
        decision = retry.decide_retry(
            attempts_made=self.history.counted() + (1 if counted else 0), now=self.clock(),
            deadline_at=self.deadline_at, settings=self.settings.retry, retry_after_s=answer.retry_after_s)
        if decision.action == "fail":
            self._add(attempt, "failed", answer, verdict, counted)
            raise _Ended(self._fail(decision.fail_reason or "attempts", verdict.error, verdict.error_class, answer,
                                    attempt=attempt, recorded=True, **fields))
        delay = decision.delay_s or 0.0
        self._add(attempt, "retrying", answer, verdict, counted, retry_in_s=delay)
        self.line.emit(attempt=attempt, outcome="retrying", http_status=answer.http_status, error=verdict.error,
                       error_class=verdict.error_class.value, retry_in_s=delay, elapsed_ms=answer.elapsed_ms,
                       **fields)
        self._come_back(delay, reason=verdict.error)

    def _come_back(self, wait_s: float, *, hop: bool = True, held: bool | None = None,
                   reason: str | None = None) -> NoReturn:
        """The one way to come back later: a new message (same task id) after ``wait_s``.

        Long waits go in hops short enough for the visibility timeout, each carrying
        when the wait ends (``not_before``); the message carries the normalised order
        and every stamp, so nothing the first delivery knew is lost.
        """
        self._close(final=False)
        countdown = max(0.0, min(wait_s, timing.countdown_hop_s(self.settings)))
        stamps = self.stamps.but(not_before=self.clock() + wait_s if hop and wait_s > countdown else None,
                                 held=self.stamps.held if held is None else held)
        assert self.request is not None
        raise ComeBack(countdown, {**self.request.body(), STAMPS_KEY: stamps.to_message()}, reason)

    def _fail(self, reason: str, error: str | None, error_class: ErrorClass, answer: Answer | None = None, *,
              attempt: int | None = None, recorded: bool = False, done: LedgerEntry | None = None,
              **more: Any) -> DeadLettered:
        """Dead-letter the order, then end (the letter first: a crash between loses nothing)."""
        attempt = attempt or self.history.next_attempt()
        elapsed_ms = answer.elapsed_ms if answer else 0.0
        if not recorded:
            self._add_record(AttemptRecord(attempt, self.clock(), "failed", None, error, error_class.value,
                                           elapsed_ms=elapsed_ms, counted=False))
        letter = self.s.dead_letters.add(
            action=self.action.value, order={k: loggable(v) for k, v in self.arguments.items()}, reason=reason,
            error=error, task_id=self.task_id, enqueued_at=self.enqueued_at, attempts=list(self.history.records),
            replay_of=self.stamps.replay_of)
        self._close(final=True, done=done)
        self.line.emit(attempt=attempt, outcome="failed", http_status=answer.http_status if answer else None,
                       error=error, error_class=error_class.value, fail_reason=reason, elapsed_ms=elapsed_ms,
                       dead_letter_id=letter.id, **more)
        self.dead_letter = DeadLettered(letter.id, reason, error)
        return self.dead_letter

    def _crashed(self, exc: Exception) -> Ending:
        """A bug of ours: one line with the traceback, then the retry schedule, so the order
        ends accepted or dead-lettered (``attempts``, ``deadline``) saying why."""
        logger.exception("attempt_crashed", task_id=self.task_id, **self.order_fields)
        if self.request is None or self.dead_letter is not None:
            raise exc
        try:
            self._come_back_after_failure(
                self.history.next_attempt(), Answer(http_status=None),
                Verdict(ErrorClass.TRANSIENT, f"internal error: {type(exc).__name__}: {exc}"), counted=True,
                fields={})
        except ComeBack as back:
            return back
        except _Ended as ended:
            return ended.ending

    # -- the records, and the end's round trip -------------------------------------------

    def _add(self, attempt: int, outcome: str, answer: Answer, verdict: Verdict, counted: bool,
             retry_in_s: float | None = None) -> None:
        self._add_record(AttemptRecord(
            attempt, self.clock(), outcome, answer.http_status, verdict.error,
            verdict.error_class.value if verdict.error_class else None, retry_in_s, answer.elapsed_ms, counted,
            answer.outcome_unknown))

    def _add_record(self, record: AttemptRecord) -> None:
        self.unwritten.append(self.history.add(record))

    def _write_unwritten(self) -> None:
        """Before a second request in one delivery: its predecessor's record, and no mark."""
        for record in self.unwritten:
            self.s.ledger.record_attempt(self.task_id, record, self.order)
        if self.unwritten and self.order is not None and self.start is not None and self.start.locked:
            self.s.ledger.clear_sending(self.order, self.start.lock_id)
        self.unwritten = []

    def _close(self, *, final: bool, done: LedgerEntry | None = None) -> None:
        """The end's one round trip (worker/state/phases.py); then the breaker's line, if it closed."""
        if self.closed:
            return
        self.closed = True
        start = self.start
        closed_breaker = self.s.phases.finish(
            self.task_id, self.order, records=self.unwritten, lock_id=start.lock_id if start and start.locked else None,
            clear_sending=True, final=final, breaker_success=self.breaker_heard, done=done)
        self.unwritten = []
        try:  # after the end is written: best effort, so the line always follows
            if final and self.stamps.held:
                self.s.breaker.unhold(self.task_id)  # else it leaves the waiting set by its deadline
            if closed_breaker:
                self.s.breaker.log_closed()
        except redis.RedisError:
            pass

    def _duplicate_warning(self) -> dict[str, Any]:
        """On success: an earlier attempt may have been applied too (read timeout, worker lost)."""
        unknown = self.history.unknown_attempts()
        if self.maybe_landed is not None and self.maybe_landed.task_id != self.task_id:
            return {"possible_duplicate": True, "unknown_attempts": unknown,
                    "unknown_task_id": self.maybe_landed.task_id}
        return {"possible_duplicate": True, "unknown_attempts": unknown} if unknown else {}

    def _others_may_land(self) -> dict[str, Any]:
        """Confirmed by the list: one unanswered request landed. With more than one unanswered,
        another may land too: the success is flagged as when it was sent again."""
        unknown = self.history.unknown_attempts()
        return {"possible_duplicate": True, "unknown_attempts": unknown} if len(unknown) > 1 else {}

    def _count(self, outcome: str, error_class: str | None) -> None:
        """Every attempt line in ``mipos_attempts_total``; a final success in the latency."""
        done = outcome in ("accepted", "denied")
        self.s.metrics.attempt(self.action.value, outcome, error_class,
                               latency_s=self.clock() - self.enqueued_at if done else None)


class _Ended(Exception):
    """Unwinds from deep in the story once the order was dead-lettered."""

    def __init__(self, ending: DeadLettered) -> None:
        super().__init__(ending.reason)
        self.ending = ending


# What a line or a dead letter keeps of an argument another producer sent by name: the checks
# (mipos_worker/order/model.py) refuse longer ids and messages, and this keeps a refused one
# from filling Redis and the logs.
LOGGABLE_CHARS = 1000


def loggable(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= LOGGABLE_CHARS else value[:LOGGABLE_CHARS] + "…"
    if value is None or isinstance(value, (int, float, bool)):
        return value
    return repr(value)[:200]
