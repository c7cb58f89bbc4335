"""The accept and deny tasks: what the POS enqueues, and the story of one attempt.

Producer side: ``OrderTask.apply_async`` validates the arguments in the POS's
process (``ValueError`` naming the field, nothing enqueued) and stamps the
enqueue time that the deadline counts from.

Worker side: ``run_attempt`` checks the ledger, sends (resending once at once
with a fresh token after a 401), classifies the answer, writes one line per
attempt, and then finishes, retries later, or dead-letters.
"""

from __future__ import annotations

import inspect
import random
import time
import uuid
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject, Retry
from kombu.exceptions import OperationalError

from config import load_producer_settings
from worker import delivery
from worker.attempt_log import AttemptLine
from worker.celery_app import app
from worker.deadletters import DeadLetter
from worker.errors import (
    Answer,
    ErrorClass,
    InvalidOrder,
    MiposError,
    OrderFailed,
    TransientError,
    Verdict,
    classify,
)
from worker.inflight import InflightRegistry
from worker.orders import ORDER_FIELDS, Action, Order, OrderRequest, parse_order_request
from worker.reconcile import fetch_pending
from worker.retry import decide_retry
from worker.runtime import Runtime, get_runtime, producer_redis

# Carried in the message beside the order's own arguments.
ENQUEUED_AT = "enqueued_at"  # when the POS enqueued it: the deadline counts from here
NOT_BEFORE = "not_before"  # a wait longer than one countdown hop ends here
RESEND = "reconcile_resend"  # reconciliation: mipos still lists an order we recorded as done
HELD = "breaker_held"  # waiting for the circuit breaker to close (worker/breaker.py)
REPLAY_OF = "replay_of"  # an operator replayed this dead letter (tasks/replay.py)
PRIVATE_KEYS = (ENQUEUED_AT, NOT_BEFORE, RESEND, HELD, REPLAY_OF)
STICKY_KEYS = (RESEND, REPLAY_OF)  # kept in the message across retries

LOCK_BUSY_RETRY_S = (0.2, 1.0)  # another worker is sending this order right now
UNEXPECTED_ERROR_RETRY_S = 5.0


class OrderTask(Task):
    action: Action
    max_retries = None  # attempts and deadline are ours to count (worker.retry)
    typing = False  # checked by parse_order_request, with clearer messages

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        arguments = _named_arguments(self.action, args or (), dict(kwargs or {}))
        private = {key: arguments.pop(key) for key in PRIVATE_KEYS if key in arguments}
        request = parse_order_request(self.action, arguments)
        message_kwargs: dict[str, Any] = {**request.body(), ENQUEUED_AT: time.time()}
        message_kwargs.update({k: v for k, v in private.items() if v is not None})
        options["task_id"] = options.get("task_id") or str(uuid.uuid4())
        options["kwargsrepr"] = repr(request.body())  # what Flower shows: the order, not our stamps
        self._register(options, message_kwargs)
        return super().apply_async(args=(), kwargs=message_kwargs, **options)

    def _register(self, options: dict[str, Any], message_kwargs: dict[str, Any]) -> None:
        """Note the task in the in-flight registry before it is published (worker/inflight.py)."""
        connection = options.get("connection")
        url = connection.as_uri(include_password=True) if connection else self.app.conf.broker_url
        countdown = options.get("countdown")
        try:
            registry = InflightRegistry(producer_redis(url), load_producer_settings().key_prefix)
            registry.register(options["task_id"], self.name, message_kwargs,
                              countdown=float(countdown) if countdown else None)
        except redis.RedisError as exc:
            raise OperationalError(f"cannot reach Redis to enqueue {self.name}: {exc}") from exc


def _named_arguments(action: Action, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    names = ORDER_FIELDS + (("message",) if action is Action.DENY else ())
    if len(args) > len(names):
        raise InvalidOrder("args", f"{action.value}_order takes at most {len(names)} positional arguments")
    for name, value in zip(names, args):
        if name in kwargs:
            raise InvalidOrder(name, "given both by position and by name")
        kwargs[name] = value
    return kwargs


@app.task(bind=True, base=OrderTask, name="mipos.accept_order", action=Action.ACCEPT,
          throws=(OrderFailed,))
def accept_order(self: OrderTask, *args: Any, **kwargs: Any) -> None:
    """Tell mipos the POS stored the order: ``delivery_id``, ``store_id``, ``order_external_id``."""
    run_attempt(self, Action.ACCEPT, args, kwargs)


@app.task(bind=True, base=OrderTask, name="mipos.deny_order", action=Action.DENY,
          throws=(OrderFailed,))
def deny_order(self: OrderTask, *args: Any, **kwargs: Any) -> None:
    """Tell mipos the POS could not store the order; ``message`` says why."""
    run_attempt(self, Action.DENY, args, kwargs)


for _task in (accept_order, deny_order):
    # Show the POS developer the real arguments in help() and IDEs.
    _task.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in ORDER_FIELDS]
        + ([inspect.Parameter("message", inspect.Parameter.KEYWORD_ONLY)] if _task is deny_order else [])
    )


def run_attempt(task: OrderTask, action: Action, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    try:
        _Attempt(task, action, get_runtime(), args, kwargs).run()
    except (Retry, Reject):
        raise
    except redis.RedisError as exc:
        # Shared state unreachable: hand the message back rather than lose it;
        # if Redis is gone altogether it stays in the unacked set and kombu
        # restores it after the visibility timeout.
        raise Reject(exc, requeue=True) from exc


class _Attempt:
    """One delivery of one message: zero or more HTTP attempts, then an end."""

    def __init__(
        self,
        task: OrderTask,
        action: Action,
        runtime: Runtime,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.task = task
        self.action = action
        self.rt = runtime
        self.settings = runtime.settings
        self.task_id: str = task.request.id or "unknown"
        self.now = time.time()
        self.kwargs = dict(kwargs)
        # Sent by name without our stamp: the deadline counts from the first attempt.
        self.enqueued_at: float = _as_time(self.kwargs.pop(ENQUEUED_AT, None)) or self.now
        self.not_before = _as_time(self.kwargs.pop(NOT_BEFORE, None))
        self.resend = self.kwargs.pop(RESEND, None) is True
        self.held = self.kwargs.pop(HELD, None) is True
        replay_of = self.kwargs.get(REPLAY_OF)
        self.replay_of = replay_of if isinstance(replay_of, str) else None
        if self.resend:
            self.kwargs[RESEND] = True  # kept for retries of the resend
        sticky = {k: self.kwargs[k] for k in STICKY_KEYS if k in self.kwargs}
        self.order: Order | None = None
        self.dead_letter: DeadLetter | None = None
        try:
            self.arguments = _named_arguments(
                action, args, {k: v for k, v in self.kwargs.items() if k not in STICKY_KEYS})
        except InvalidOrder:
            self.arguments = {**self.kwargs, "args": list(args)}
        self.deadline_at = self.enqueued_at + self.settings.retry.deadline_s
        self._note_interrupted_attempt()
        self.history = self.rt.ledger.history(self.task_id)
        self.line = AttemptLine(
            action=action,
            task_id=self.task_id,
            order_fields={f: _loggable(self.arguments.get(f)) for f in ORDER_FIELDS},
            max_attempts=self.settings.retry.max_attempts,
            extra=sticky,
            on_emit=self._count,
        )

    # -- the story --------------------------------------------------------

    def run(self) -> None:
        self.rt.inflight.heartbeat(self.task_id)
        self._run()
        # Reached an end (accepted, denied, skipped or failed): a retry or hop raises instead.
        self.rt.inflight.forget(self.task_id)
        if self.held:
            self.rt.breaker.unhold(self.task_id)
        if self.dead_letter is not None:
            raise OrderFailed.for_letter(self.dead_letter.id, self.dead_letter.reason,
                                         self.dead_letter.error)

    def _run(self) -> None:
        if self.not_before is not None and self.now < self.not_before:
            self._hop(self.not_before - self.now)
        try:
            request = parse_order_request(self.action, self.arguments)
        except InvalidOrder as exc:
            self._fail("invalid", f"invalid arguments: {exc}", ErrorClass.PERMANENT.value, None, 0.0)
            return
        order = self.order = request.order
        with self.rt.ledger.order_lock(order, delivery.order_lock_ttl_s(self.settings)) as mine:
            if not mine:
                self._reschedule(random.uniform(*LOCK_BUSY_RETRY_S))
            if self._already_done(request):
                return
            if self.now > self.deadline_at:
                self._fail("deadline", "deadline passed before the attempt could start",
                           ErrorClass.TRANSIENT.value, None, 0.0)
                return
            if self._held_by_breaker():
                return
            self._send(request)

    def _held_by_breaker(self) -> bool:
        """Wait while mipos is failing for everyone; True when the order ended (deadline)."""
        breaker = self.rt.breaker
        decision = breaker.decide()
        if decision == "hold":
            wait = self.settings.breaker.probe_interval_s * random.uniform(1.0, 1.5)
            if time.time() + wait > self.deadline_at:
                self._fail("deadline", "deadline passed while the circuit breaker held the order "
                           "(mipos is failing for every worker)", ErrorClass.TRANSIENT.value,
                           None, 0.0, held_by_breaker=True)
                return True
            breaker.hold(self.task_id, self.deadline_at)
            if not self.held:  # one line when held, not one per wake-up
                self.line.emit(
                    attempt=self._next_attempt(), outcome="retrying",
                    error="circuit breaker open: held without spending an attempt",
                    error_class=ErrorClass.TRANSIENT.value, retry_in_s=wait, held_by_breaker=True)
            self._retry_held(wait)
        if self.held and decision == "send":
            wait = breaker.release_wait_s(self.task_id)
            if wait > 0:
                self._retry_held(wait)  # released oldest deadline first, at the shared rate
        elif decision == "send" and not breaker.take_slot():
            self._reschedule(random.uniform(0.05, 0.3))  # the shared rate limit
        if self.held:
            breaker.unhold(self.task_id)
        return False

    def _retry_held(self, wait_s: float) -> None:
        kwargs = {**self.kwargs, ENQUEUED_AT: self.enqueued_at, HELD: True}
        exc = TransientError("held: the circuit breaker is open")
        raise self.task.retry(args=(), kwargs=kwargs, countdown=wait_s, exc=exc)

    def _already_done(self, request: OrderRequest) -> bool:
        done = self.rt.ledger.done(request.order)
        if done is None:
            return False
        if done.action == self.action.value and self.resend:
            return False  # mipos says it never got it: send again, on purpose
        if done.action == self.action.value:
            self.line.emit(attempt=self._next_attempt(), outcome="skipped",
                           done_by_task=done.task_id)
            return True
        past = Action(done.action).done_outcome
        self._fail(
            "permanent",
            f"order {request.order.key} was already {past} at mipos (task {done.task_id}); "
            f"it cannot be {self.action.done_outcome} afterwards",
            ErrorClass.PERMANENT.value, None, 0.0,
        )
        return True

    def _send(self, request: OrderRequest) -> None:
        previous_unknown = self._previous_outcome_unknown()
        if previous_unknown and self.settings.confirm_with_pending_list and self._confirmed(request):
            return
        rejected_token: str | None = None
        counted = True
        while True:
            attempt = self._next_attempt()
            sent, answer, verdict = self._one_request(request, attempt, rejected_token)
            self._tell_breaker(sent, verdict)
            unknown_fields: dict[str, Any] = {"previous_outcome": "unknown"} if previous_unknown else {}
            if verdict.ok:
                self.rt.ledger.record_done(request.order, self.action, self.task_id, request.message)
                self._record(attempt, self.action.done_outcome, answer, verdict, counted)
                self.line.emit(
                    attempt=attempt, outcome=self.action.done_outcome,
                    http_status=answer.http_status, elapsed_ms=answer.elapsed_ms,
                    **unknown_fields, **self._duplicate_warning(),
                )
                return
            if verdict.error_class is ErrorClass.AUTH and sent and rejected_token is None:
                # Refused token: one fresh-token resend at once, not counted.
                self._record(attempt, "retrying", answer, verdict, counted, retry_in_s=0.0)
                self.line.emit(
                    attempt=attempt, outcome="retrying", http_status=answer.http_status,
                    error=verdict.error, error_class=verdict.error_class.value,
                    retry_in_s=0.0, elapsed_ms=answer.elapsed_ms, resend="fresh_token",
                    **unknown_fields,
                )
                rejected_token = self._token_in_use
                counted = False
                continue
            self._after_failure(attempt, answer, verdict, counted, unknown_fields)
            return

    _token_in_use: str = ""

    def _tell_breaker(self, sent: bool, verdict: Verdict) -> None:
        """An answer from mipos (even a permanent refusal) says it is up; a transient
        failure, or a token call that failed, counts toward opening the breaker."""
        if verdict.ok or verdict.error_class is ErrorClass.PERMANENT:
            self.rt.breaker.record_success()
        elif verdict.error_class is ErrorClass.TRANSIENT or not sent:
            self.rt.breaker.record_failure(verdict.error)

    def _confirmed(self, request: OrderRequest) -> bool:
        """After an attempt with an unknown outcome, ask mipos's pending list first.

        Gone from the list means mipos got the earlier accept (or deny): record it
        and send nothing. Listed, or the list cannot be read: send as usual.
        """
        attempt = self._next_attempt()
        try:
            pending, answer = fetch_pending(self.rt, request.order.store_id)
        except MiposError:
            return False
        if any(item.external_id == request.order.order_external_id for item in pending):
            return False
        outcome = self.action.done_outcome
        verdict = Verdict(None)
        self.rt.ledger.record_done(request.order, self.action, self.task_id, request.message)
        self._record(attempt, outcome, answer, verdict, counted=False)
        self.line.emit(
            attempt=attempt, outcome=outcome, http_status=answer.http_status,
            elapsed_ms=answer.elapsed_ms, confirmed_by="pending_list", previous_outcome="unknown",
        )
        return True

    def _one_request(self, request: OrderRequest, attempt: int,
                     rejected_token: str | None) -> tuple[bool, Answer, Verdict]:
        """Get a token and send; ``sent`` is False when no token could be had."""
        try:
            tokens = self.rt.tokens
            token = tokens.replace_rejected(rejected_token) if rejected_token else tokens.current()
        except MiposError as exc:
            return False, Answer(http_status=exc.http_status), Verdict(exc.error_class, exc.message)
        self._token_in_use = token
        self.rt.ledger.mark_sending(self.task_id, attempt)
        answer = self.rt.client.send(request, token)
        return True, answer, classify(answer)

    def _after_failure(self, attempt: int, answer: Answer, verdict: Verdict,
                       counted: bool, unknown_fields: dict[str, Any]) -> None:
        assert verdict.error_class is not None
        error_class = verdict.error_class.value
        if answer.outcome_unknown:
            unknown_fields = {**unknown_fields, "outcome_unknown": True}
        if verdict.error_class is ErrorClass.PERMANENT:
            self._record(attempt, "failed", answer, verdict, counted)
            self._fail("permanent", verdict.error, error_class, answer, answer.elapsed_ms,
                       attempt=attempt, recorded=True, **unknown_fields)
            return
        attempts_made = self._counted_attempts() + (1 if counted else 0)
        decision = decide_retry(
            attempts_made=attempts_made, now=time.time(), deadline_at=self.deadline_at,
            settings=self.settings.retry, retry_after_s=answer.retry_after_s,
        )
        if decision.action == "fail":
            self._record(attempt, "failed", answer, verdict, counted)
            self._fail(decision.fail_reason or "attempts", verdict.error, error_class, answer,
                       answer.elapsed_ms, attempt=attempt, recorded=True, **unknown_fields)
            return
        delay = decision.delay_s or 0.0
        self._record(attempt, "retrying", answer, verdict, counted, retry_in_s=delay)
        self.line.emit(
            attempt=attempt, outcome="retrying", http_status=answer.http_status,
            error=verdict.error, error_class=error_class, retry_in_s=delay,
            elapsed_ms=answer.elapsed_ms, **unknown_fields,
        )
        self._hop(delay, not_before=time.time() + delay, reason=verdict.error)

    # -- endings ------------------------------------------------------------

    def _fail(self, reason: str, error: str | None, error_class: str, answer: Answer | None,
              elapsed_ms: float, *, attempt: int | None = None, recorded: bool = False,
              **more: Any) -> None:
        attempt = attempt or self._next_attempt()
        if not recorded:
            self.rt.ledger.record_attempt(self.task_id, {
                "attempt": attempt, "at": time.time(), "outcome": "failed",
                "http_status": None, "error": error, "error_class": error_class,
                "elapsed_ms": elapsed_ms, "counted": False,
            }, self.order)
        self.rt.ledger.clear_sending(self.task_id)
        letter = self.dead_letter = self.rt.dead_letters.add(
            action=self.action.value,
            order={k: _loggable(v) for k, v in self.arguments.items()},
            reason=reason,
            error=error,
            task_id=self.task_id,
            enqueued_at=self.enqueued_at,
            attempts=self.rt.ledger.history(self.task_id),
            replay_of=self.replay_of,
        )
        self.line.emit(
            attempt=attempt, outcome="failed",
            http_status=answer.http_status if answer else None,
            error=error, error_class=error_class, fail_reason=reason,
            elapsed_ms=elapsed_ms, dead_letter_id=letter.id, **more,
        )

    def _hop(self, wait_s: float, not_before: float | None = None, reason: str | None = None) -> None:
        """Come back after ``wait_s``, in hops short enough for the visibility timeout."""
        kwargs = {**self.kwargs, ENQUEUED_AT: self.enqueued_at,
                  NOT_BEFORE: not_before if not_before is not None else self.not_before}
        countdown = max(0.0, min(wait_s, delivery.countdown_hop_s(self.settings)))
        # With ``exc``, Flower's RETRY row says why: "Retry in 3s: TransientError('Server Error')".
        exc = TransientError(reason) if reason else None
        raise self.task.retry(args=(), kwargs=kwargs, countdown=countdown, exc=exc)

    def _reschedule(self, wait_s: float) -> None:
        kwargs = {**self.kwargs, ENQUEUED_AT: self.enqueued_at}
        raise self.task.retry(args=(), kwargs=kwargs, countdown=wait_s)

    # -- bookkeeping --------------------------------------------------------

    def _note_interrupted_attempt(self) -> None:
        """A worker died with a request of this task in flight: put it in the history."""
        attempt = self.rt.ledger.interrupted_attempt(self.task_id)
        if attempt is None:
            return
        self.rt.ledger.record_attempt(self.task_id, {
            "attempt": attempt, "at": self.now, "outcome": "unknown", "http_status": None,
            "error": "the worker was lost during the attempt", "error_class": "transient",
            "retry_in_s": None, "elapsed_ms": None, "counted": True, "outcome_unknown": True,
        })
        self.rt.ledger.clear_sending(self.task_id)

    def _next_attempt(self) -> int:
        return len(self.history) + 1

    def _counted_attempts(self) -> int:
        return sum(1 for record in self.history if record.get("counted"))

    def _duplicate_warning(self) -> dict[str, Any]:
        """On success: an earlier attempt may have been applied too (read timeout, worker lost)."""
        unknown = [r["attempt"] for r in self.history if r.get("outcome_unknown")]
        return {"possible_duplicate": True, "unknown_attempts": unknown} if unknown else {}

    def _previous_outcome_unknown(self) -> bool:
        return bool(self.history) and bool(self.history[-1].get("outcome_unknown"))

    def _record(self, attempt: int, outcome: str, answer: Answer, verdict: Verdict,
                counted: bool, retry_in_s: float | None = None) -> None:
        record = {
            "attempt": attempt,
            "at": time.time(),
            "outcome": outcome,
            "http_status": answer.http_status,
            "error": verdict.error,
            "error_class": verdict.error_class.value if verdict.error_class else None,
            "retry_in_s": retry_in_s,
            "elapsed_ms": answer.elapsed_ms,
            "counted": counted,
            "outcome_unknown": answer.outcome_unknown,
        }
        self.rt.ledger.record_attempt(self.task_id, record, self.order)
        self.rt.ledger.clear_sending(self.task_id)
        self.history.append(record)

    def _count(self, outcome: str, error_class: str | None) -> None:
        """Every attempt line in ``mipos_attempts_total``; a final success in the latency."""
        done = outcome in ("accepted", "denied")
        try:
            self.rt.metrics.attempt(self.action.value, outcome, error_class,
                                    latency_s=time.time() - self.enqueued_at if done else None)
        except redis.RedisError:
            pass  # a counter is not worth redelivering the order for


def _as_time(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and value > 0:
        return float(value)
    return None


def _loggable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)[:200]
