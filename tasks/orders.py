"""The accept and deny tasks: what the POS enqueues, and the story of one attempt.

Producer side: ``OrderTask.apply_async`` validates the arguments in the POS's
process (``ValueError`` naming the field, nothing enqueued), refuses the
stamps only mipos-worker may set (``worker/stamps.py``), and registers the
task, stamped with Redis's clock, before publishing it. The project's own
producers (the outbox, replay, reconciliation, the worker's retries) go
through ``publish_order``.

Worker side: ``run_attempt`` checks the ledger, settles an earlier request
whose answer never came, sends (resending once at once with a fresh token
after a 401), classifies the answer, writes one line per attempt, and then
finishes, comes back later, or dead-letters.
"""

from __future__ import annotations

import inspect
import random
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import redis
import structlog
from celery import Task
from celery.exceptions import Reject, Retry
from kombu.exceptions import OperationalError

from config import RedisSettings, load_producer_settings
from tasks.on_commit import OnCommitMixin
from tasks.request_check import check_request
from worker import delivery
from worker.attempt_log import AttemptLine
from worker.budget import attempt_budget
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
from worker.ledger import LedgerEntry, Uncertain
from worker.orders import ORDER_FIELDS, Action, Order, OrderRequest, parse_order_request
from worker.reconcile import fetch_pending
from worker.replication import ReplicaAck, confirm_replicated
from worker.retry import decide_retry
from worker.runtime import Runtime, get_runtime, producer_redis
from worker.stamps import STAMPS_KEY, Stamps, split_message

logger = structlog.stdlib.get_logger("mipos.attempts")

LOCK_BUSY_RETRY_S = (0.2, 1.0)  # another worker is sending this order right now
# mipos lists an order as pending for 10 minutes after it arrived; it arrived at
# mipos before the POS enqueued it, so absence from the list is trusted only while
# the order is younger than this (counted from its enqueue), with room for the
# webhook-to-enqueue delay and for mipos's clock.
PENDING_LIST_TRUSTED_FOR_S = 600.0 - 120.0
# An uncertain request is settled by its task's deadline; the mark stays a little longer.
UNCERTAIN_MARGIN_S = 60.0

_internal_publish: ContextVar[bool] = ContextVar("mipos_internal_publish", default=False)


@contextmanager
def _internal() -> Iterator[None]:
    token = _internal_publish.set(True)
    try:
        yield
    finally:
        _internal_publish.reset(token)


class OrderTask(OnCommitMixin, Task):
    action: Action
    max_retries = None  # attempts and deadline are ours to count (worker.retry)
    typing = False  # checked by parse_order_request, with clearer messages

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        arguments = dict(kwargs or {})
        if _internal_publish.get():
            arguments, stamps, _ = split_message(arguments)
            request = parse_order_request(self.action, _named_arguments(self.action, args or (), arguments))
        else:  # a caller: its arguments checked, our stamps refused
            stamps = Stamps()
            request = check_request(self.action, _named_arguments(self.action, args or (), arguments))
        age_s = float(options.pop("age_s", 0.0) or 0.0)
        options["task_id"] = options.get("task_id") or str(uuid.uuid4())
        options["kwargsrepr"] = repr(request.body())  # what Flower shows: the order, not our stamps
        settings = load_producer_settings()
        client = self._producer_redis(options)
        enqueued_at = self._register(client, settings, options, request, stamps, age_s)
        message = {**request.body(), STAMPS_KEY: stamps.but(enqueued_at=enqueued_at).to_message()}
        result = super().apply_async(args=(), kwargs=message, **options)
        self._confirm_replicated(client, settings, options)
        return result

    def _producer_redis(self, options: dict[str, Any]) -> redis.Redis:
        connection = options.get("connection")
        url = connection.as_uri(include_password=True) if connection else self.app.conf.broker_url
        if connection is not None and connection.alt:  # sentinel://a;sentinel://b: every Sentinel
            url = ";".join(connection.alt)
        return producer_redis(url)

    def _confirm_replicated(self, client: redis.Redis, settings: RedisSettings,
                            options: dict[str, Any]) -> None:
        """REDIS_MIN_REPLICAS_ACK > 0: return only once the registration and the message are on
        that many replicas (worker/replication.py), else raise as when Redis is down."""
        ack = ReplicaAck.of(settings)
        if not ack.enabled:
            return
        try:
            confirm_replicated(client, settings.key_prefix, ack, f"{self.name} {options['task_id']}")
        except redis.RedisError as exc:
            raise OperationalError(f"{self.name} not confirmed as replicated: {exc}") from exc

    def _register(self, client: redis.Redis, settings: RedisSettings, options: dict[str, Any],
                  request: OrderRequest, stamps: Stamps, age_s: float) -> float:
        """Note the task in the in-flight registry before it is published (worker/inflight.py);
        returns its enqueue time on Redis's clock."""
        countdown = options.get("countdown")
        try:
            registry = InflightRegistry(client, settings.key_prefix)
            return registry.register(
                options["task_id"], self.name, {**request.body(), STAMPS_KEY: stamps.to_message()},
                countdown=float(countdown) if countdown else None,
                enqueued_at=stamps.enqueued_at, age_s=age_s)
        except redis.RedisError as exc:
            raise OperationalError(f"cannot reach Redis to enqueue {self.name}: {exc}") from exc


def publish_order(action: Action, arguments: dict[str, Any], stamps: Stamps, *,
                  age_s: float = 0.0, **options: Any) -> Any:
    """Enqueue with stamps: for the project's own producers only.

    ``age_s``: how long ago the order was enqueued, on the producer's own clock
    (the outbox's kept rows); the deadline counts from then.
    """
    task = accept_order if action is Action.ACCEPT else deny_order
    with _internal():
        return task.apply_async(kwargs={**arguments, STAMPS_KEY: stamps.to_message()},
                                age_s=age_s, **options)


def _named_arguments(action: Action, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    names = ORDER_FIELDS + (("message",) if action is Action.DENY else ())
    if len(args) > len(names):
        raise InvalidOrder("args", f"{action.value}_order takes at most {len(names)} positional arguments")
    for name, value in zip(names, args, strict=False):
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
        self.clock = runtime.clock.now
        self.task_id: str = task.request.id or "unknown"
        self.now = self.clock()
        given, stamps, ignored = split_message(kwargs)
        # Sent by name without our stamps: the deadline counts from the first attempt.
        self.stamps = stamps if stamps.enqueued_at else stamps.but(enqueued_at=self.now)
        self.enqueued_at: float = self.stamps.enqueued_at or self.now
        self.request: OrderRequest | None = None
        self.invalid: InvalidOrder | None = None
        try:
            self.request = parse_order_request(action, _named_arguments(action, args, dict(given)))
            self.arguments: dict[str, Any] = self.request.body()
        except InvalidOrder as exc:
            self.invalid = exc
            self.arguments = {**given, **({"args": list(args)} if args else {})}
        self.order: Order | None = self.request.order if self.request else None
        self.dead_letter: DeadLetter | None = None
        self.deadline_at = self.enqueued_at + self.settings.retry.deadline_s
        sticky = {k: v for k, v in (("reconcile_resend", self.stamps.resend),
                                    ("replay_of", self.stamps.replay_of)) if v}
        self.line = AttemptLine(
            action=action,
            task_id=self.task_id,
            order_fields={f: _loggable(self.arguments.get(f)) for f in ORDER_FIELDS},
            max_attempts=self.settings.retry.max_attempts,
            extra=sticky,
            on_emit=self._count,
        )
        if ignored:
            logger.warning(
                "private_keys_ignored", task_id=self.task_id, keys=ignored,
                **{f: _loggable(self.arguments.get(f)) for f in ORDER_FIELDS},
                reason="only mipos-worker itself sets these; a message sent by name cannot",
            )
        self._note_interrupted_attempt()
        self.history = self.rt.ledger.history(self.task_id)
        self.token_in_use: str | None = None

    # -- the story --------------------------------------------------------

    def run(self) -> None:
        self.rt.inflight.heartbeat(self.task_id, self.now)
        try:
            self._run()
        except (Retry, Reject, redis.RedisError):
            raise
        except Exception as exc:  # a bug of ours: say so, and retry like a transient failure
            self._crashed(exc)
        # Reached an end (accepted, denied, skipped or failed): coming back later raises instead.
        self.rt.inflight.forget(self.task_id)
        if self.stamps.held:
            self.rt.breaker.unhold(self.task_id)
        if self.dead_letter is not None:
            raise OrderFailed.for_letter(self.dead_letter.id, self.dead_letter.reason,
                                         self.dead_letter.error)

    def _run(self) -> None:
        if self.request is None:
            self._fail("invalid", f"invalid arguments: {self.invalid}", ErrorClass.PERMANENT.value)
            return
        if self.now > self.deadline_at:
            self._fail("deadline", "deadline passed before the attempt could start",
                       ErrorClass.TRANSIENT.value)
            return
        not_before = self.stamps.not_before
        if not_before is not None and self.now < not_before:
            if not_before > self.deadline_at:
                self._fail("deadline", "the next attempt was due after the deadline",
                           ErrorClass.TRANSIENT.value)
                return
            self._come_back(not_before - self.now)
        request = self.request
        bound = delivery.attempt_bound_s(self.settings)
        with attempt_budget(bound), \
                self.rt.ledger.order_lock(request.order, delivery.order_lock_ttl_s(self.settings)) as mine:
            if not mine:
                self._come_back(random.uniform(*LOCK_BUSY_RETRY_S), hop=False)
            done, uncertain = self.rt.ledger.state(request.order)
            if done is not None and self._already_done(request, done):
                return
            if self._held_by_breaker():
                return
            uncertain = uncertain or self._own_unknown_attempt()
            if uncertain is not None and not self._settle(request, uncertain):
                return
            self._send(request, previous_unknown=uncertain is not None)

    def _crashed(self, exc: Exception) -> None:
        """An unexpected error: one line with the traceback, then the retry schedule, so
        the order ends accepted or dead-lettered (``attempts``, ``deadline``) saying why."""
        logger.exception("attempt_crashed", task_id=self.task_id,
                         **{f: _loggable(self.arguments.get(f)) for f in ORDER_FIELDS})
        if self.request is None or self.dead_letter is not None:
            raise exc
        error = f"internal error: {type(exc).__name__}: {exc}"
        self._come_back_after_failure(self._next_attempt(), Answer(http_status=None),
                                      Verdict(ErrorClass.TRANSIENT, error), counted=True,
                                      unknown_fields={})

    def _own_unknown_attempt(self) -> Uncertain | None:
        """This task's last attempt had no answer (from before the order-wide mark existed)."""
        if self.history and self.history[-1].get("outcome_unknown"):
            return Uncertain(self.action.value, self.task_id, float(self.history[-1].get("at") or 0),
                             self.enqueued_at)
        return None

    def _held_by_breaker(self) -> bool:
        """Wait while mipos is failing for everyone; True when the order ended (deadline)."""
        breaker = self.rt.breaker
        decision = breaker.decide()
        now = self.clock()
        if decision == "hold":
            wait = self.settings.breaker.probe_interval_s * random.uniform(1.0, 1.5)
            if now + wait > self.deadline_at:
                self._fail("deadline", "deadline passed while the circuit breaker held the order "
                           "(mipos is failing for every worker)", ErrorClass.TRANSIENT.value,
                           held_by_breaker=True)
                return True
            breaker.hold(self.task_id, self.deadline_at, now)
            if not self.stamps.held:  # one line when held, not one per wake-up
                self.line.emit(
                    attempt=self._next_attempt(), outcome="retrying",
                    error="circuit breaker open: held without spending an attempt",
                    error_class=ErrorClass.TRANSIENT.value, retry_in_s=wait, held_by_breaker=True)
            self._come_back(wait, held=True, reason="held: the circuit breaker is open")
        if self.stamps.held and decision == "send":
            wait = breaker.release_wait_s(self.task_id, now)
            if wait > 0:  # released oldest deadline first, at the shared rate
                self._come_back(wait, held=True, reason="held: the circuit breaker is open")
        elif decision == "send" and not breaker.take_slot():
            self._come_back(random.uniform(0.05, 0.3), hop=False)  # the shared rate limit
        if self.stamps.held:
            breaker.unhold(self.task_id)
            self.stamps = self.stamps.but(held=False)
        return False

    def _already_done(self, request: OrderRequest, done: LedgerEntry) -> bool:
        if done.action == self.action.value and self.stamps.resend:
            return False  # mipos says it never got it: send again, on purpose
        if done.action == self.action.value:
            self.line.emit(attempt=self._next_attempt(), outcome="skipped",
                           done_by_task=done.task_id)
            return True
        past = Action(done.action).done_outcome
        self._fail(
            "permanent",
            f"order {request.order.store_id}/{request.order.order_external_id} was already {past} "
            f"at mipos (task {done.task_id}); it cannot be {self.action.done_outcome} afterwards",
            ErrorClass.PERMANENT.value,
        )
        return True

    # -- an earlier request whose answer never came ----------------------------

    def _settle(self, request: OrderRequest, uncertain: Uncertain) -> bool:
        """Before sending after an unanswered accept or deny of this order: did it land?

        True: send. mipos's pending list says: still listed (it did not land: send),
        gone while the order is young enough to be listed (it landed: record it, send
        nothing), or it cannot say (too old, unreadable). Then the same request is
        sent again, flagged; the other one is not sent blind (never both an accept
        and a deny): it waits for the list, or is refused once nobody can know.
        """
        same = uncertain.action == self.action.value
        other = Action(uncertain.action)
        attempt = self._next_attempt()
        if not self.settings.confirm_with_pending_list:
            if same:
                return True
            self._refuse_after_unknown(uncertain, "MIPOS_CONFIRM_WITH_PENDING_LIST is off, so "
                                       "mipos's pending list cannot settle it")
            return False
        age_s = self.clock() - min(self.enqueued_at, uncertain.enqueued_at)
        listable = age_s < PENDING_LIST_TRUSTED_FOR_S
        try:
            pending, answer = fetch_pending(self.rt, request.order.store_id)
        except MiposError as exc:
            if same:
                return True  # send again and let the answer decide
            self._come_back_after_failure(
                attempt, Answer(http_status=exc.http_status),
                Verdict(ErrorClass.TRANSIENT, f"cannot tell whether the earlier {other.value} "
                        f"(task {uncertain.task_id}) reached mipos: {exc.message}"),
                counted=True, unknown_fields={"previous_outcome": "unknown"})
            return False
        if any(item.external_id == request.order.order_external_id for item in pending):
            in_flight_for = self.clock() - uncertain.at
            if not same and in_flight_for < delivery.call_bound_s(self.settings):
                # Still listed, but a slow request may yet land: give it the time one call may take.
                self._come_back_after_failure(
                    attempt, answer,
                    Verdict(ErrorClass.TRANSIENT, f"waiting for the earlier {other.value} (task "
                            f"{uncertain.task_id}, no answer {in_flight_for:.1f}s ago) to settle"),
                    counted=False, unknown_fields={"previous_outcome": "unknown"})  # nothing sent
                return False
            self.rt.ledger.clear_uncertain(request.order)  # still pending: it did not land
            return True
        if not listable:
            if same:
                return True
            self._refuse_after_unknown(uncertain, f"the order is {age_s:.0f}s old, too old for "
                                       "mipos's pending list to tell")
            return False
        # Gone from the list: mipos got the earlier request.
        self.rt.ledger.record_done(request.order, other, uncertain.task_id,
                                   request.message if same else None, confirmed_by="pending_list")
        if same:
            self._record(attempt, self.action.done_outcome, answer, Verdict(None), counted=False)
            self.line.emit(
                attempt=attempt, outcome=self.action.done_outcome, http_status=answer.http_status,
                elapsed_ms=answer.elapsed_ms, confirmed_by="pending_list", previous_outcome="unknown",
            )
            return False
        self._fail(
            "permanent",
            f"order {request.order.store_id}/{request.order.order_external_id} was already "
            f"{other.done_outcome} at mipos (task {uncertain.task_id}, whose answer never came; "
            f"mipos no longer lists the order); it cannot be {self.action.done_outcome} afterwards",
            ErrorClass.PERMANENT.value, attempt=attempt, confirmed_by="pending_list")
        return False

    def _refuse_after_unknown(self, uncertain: Uncertain, why: str) -> None:
        other = Action(uncertain.action)
        self._fail(
            "permanent",
            f"not sent: the {other.value} of this order (task {uncertain.task_id}) may have reached "
            f"mipos (its answer never came) and {why}; sending the {self.action.value} too could "
            f"leave the order both {other.done_outcome} and {self.action.done_outcome}",
            ErrorClass.PERMANENT.value, previous_outcome="unknown")

    # -- sending ---------------------------------------------------------------

    def _send(self, request: OrderRequest, previous_unknown: bool) -> None:
        rejected_token: str | None = None
        counted = True
        unknown_fields: dict[str, Any] = {"previous_outcome": "unknown"} if previous_unknown else {}
        while True:
            attempt = self._next_attempt()
            sent, answer, verdict = self._one_request(request, attempt, rejected_token)
            self._tell_breaker(sent, verdict)
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
                rejected_token = self.token_in_use
                counted = False
                continue
            if sent and answer.outcome_unknown:
                self._mark_uncertain(request.order)
                unknown_fields = {**unknown_fields, "outcome_unknown": True}
            if verdict.error_class is ErrorClass.PERMANENT:
                self._record(attempt, "failed", answer, verdict, counted)
                self._fail("permanent", verdict.error, verdict.error_class.value, answer,
                           attempt=attempt, recorded=True, **unknown_fields)
                return
            self._come_back_after_failure(attempt, answer, verdict, counted, unknown_fields)
            return  # failed for good (attempts, deadline); coming back later raises

    def _tell_breaker(self, sent: bool, verdict: Verdict) -> None:
        """An answer from mipos (even a permanent refusal) says it is up; a transient
        failure, or a token call that failed, counts toward opening the breaker."""
        if verdict.ok or verdict.error_class is ErrorClass.PERMANENT:
            self.rt.breaker.record_success()
        elif verdict.error_class is ErrorClass.TRANSIENT or not sent:
            self.rt.breaker.record_failure(verdict.error)

    def _one_request(self, request: OrderRequest, attempt: int,
                     rejected_token: str | None) -> tuple[bool, Answer, Verdict]:
        """Get a token and send; ``sent`` is False when no token could be had."""
        try:
            tokens = self.rt.tokens
            token = tokens.replace_rejected(rejected_token) if rejected_token else tokens.current()
        except MiposError as exc:
            return False, Answer(http_status=exc.http_status), Verdict(exc.error_class, exc.message)
        self.token_in_use = token
        self.rt.ledger.mark_sending(self.task_id, attempt)
        answer = self.rt.client.send(request, token)
        return True, answer, classify(answer)

    def _mark_uncertain(self, order: Order) -> None:
        self.rt.ledger.record_uncertain(
            order, Uncertain(self.action.value, self.task_id, self.clock(), self.enqueued_at),
            ttl_s=self.deadline_at - self.clock() + UNCERTAIN_MARGIN_S)

    # -- endings ------------------------------------------------------------

    def _come_back_after_failure(self, attempt: int, answer: Answer, verdict: Verdict,
                                 counted: bool, unknown_fields: dict[str, Any]) -> None:
        """A transient failure: retry after the schedule's delay, or fail (attempts, deadline)."""
        assert verdict.error_class is not None
        error_class = verdict.error_class.value
        attempts_made = self._counted_attempts() + (1 if counted else 0)
        decision = decide_retry(
            attempts_made=attempts_made, now=self.clock(), deadline_at=self.deadline_at,
            settings=self.settings.retry, retry_after_s=answer.retry_after_s,
        )
        if decision.action == "fail":
            self._record(attempt, "failed", answer, verdict, counted)
            self._fail(decision.fail_reason or "attempts", verdict.error, error_class, answer,
                       attempt=attempt, recorded=True, **unknown_fields)
            return
        delay = decision.delay_s or 0.0
        self._record(attempt, "retrying", answer, verdict, counted, retry_in_s=delay)
        self.line.emit(
            attempt=attempt, outcome="retrying", http_status=answer.http_status,
            error=verdict.error, error_class=error_class, retry_in_s=delay,
            elapsed_ms=answer.elapsed_ms, **unknown_fields,
        )
        self._come_back(delay, reason=verdict.error)

    def _fail(self, reason: str, error: str | None, error_class: str, answer: Answer | None = None,
              *, attempt: int | None = None, recorded: bool = False, **more: Any) -> None:
        attempt = attempt or self._next_attempt()
        elapsed_ms = answer.elapsed_ms if answer else 0.0
        if not recorded:
            self.rt.ledger.record_attempt(self.task_id, {
                "attempt": attempt, "at": self.clock(), "outcome": "failed",
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
            replay_of=self.stamps.replay_of,
        )
        self.line.emit(
            attempt=attempt, outcome="failed",
            http_status=answer.http_status if answer else None,
            error=error, error_class=error_class, fail_reason=reason,
            elapsed_ms=elapsed_ms, dead_letter_id=letter.id, **more,
        )

    def _come_back(self, wait_s: float, *, hop: bool = True, held: bool | None = None,
                   reason: str | None = None) -> None:
        """The one way to come back later: a new message (same task id) after ``wait_s``.

        Long waits go in hops short enough for the visibility timeout, each carrying
        when the wait ends (``not_before``); the message carries the normalised order
        and every stamp, so nothing the first delivery knew is lost.
        """
        countdown = max(0.0, min(wait_s, delivery.countdown_hop_s(self.settings)))
        stamps = self.stamps.but(
            not_before=self.clock() + wait_s if hop and wait_s > countdown else None,
            held=self.stamps.held if held is None else held,
        )
        assert self.request is not None
        kwargs = {**self.request.body(), STAMPS_KEY: stamps.to_message()}
        # With ``exc``, Flower's RETRY row says why: "Retry in 3s: TransientError('Server Error')".
        exc = TransientError(reason) if reason else None
        with _internal():
            raise self.task.retry(args=(), kwargs=kwargs, countdown=countdown, exc=exc)

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
        if self.order is not None:
            self._mark_uncertain(self.order)

    def _next_attempt(self) -> int:
        return len(self.history) + 1

    def _counted_attempts(self) -> int:
        return sum(1 for record in self.history if record.get("counted"))

    def _duplicate_warning(self) -> dict[str, Any]:
        """On success: an earlier attempt may have been applied too (read timeout, worker lost)."""
        unknown = [r["attempt"] for r in self.history if r.get("outcome_unknown")]
        return {"possible_duplicate": True, "unknown_attempts": unknown} if unknown else {}

    def _record(self, attempt: int, outcome: str, answer: Answer, verdict: Verdict,
                counted: bool, retry_in_s: float | None = None) -> None:
        record = {
            "attempt": attempt,
            "at": self.clock(),
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
                                    latency_s=self.clock() - self.enqueued_at if done else None)
        except redis.RedisError:
            pass  # a counter is not worth redelivering the order for


def _loggable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)[:200]
