"""The accept and deny tasks, and what happens in the POS's process when one is enqueued.

``OrderTask.apply_async`` checks the arguments in the caller's process
(``ValueError`` naming the field, nothing enqueued), refuses the stamps only
mipos-worker may set (``mipos_worker/order/stamps.py``), and registers the task,
stamped with Redis's clock, before publishing it (``mipos_worker/state/inflight.py``).
The project's own producers (the outbox, replay, reconciliation, the worker's
retries) go through ``publish_order``. ``delay_on_commit`` is Celery's
``DjangoTask`` idea for these tasks.

A task's body runs only in a worker: the worker's checkout hands its delivery
to ``deliver_with`` (``tasks/orders.py``). In a POS's process there is none,
and nothing here imports the worker.
"""

from __future__ import annotations

import functools
import inspect
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis
from celery import Task
from kombu.exceptions import KombuError, OperationalError

try:
    from kombu.exceptions import BatchPublishError
except ImportError:  # kombu before 5.7: no publish batches, nothing raises it
    class BatchPublishError(KombuError):  # type: ignore[no-redef]
        pass

from mipos_worker.celery_app import app
from mipos_worker.folded_publish import RedisClock, can_fold, folded
from mipos_worker.names import TASK_NAMES
from mipos_worker.order.errors import OrderFailed
from mipos_worker.order.model import (
    ORDER_FIELDS,
    Action,
    named_arguments,
    parse_order_request,
)
from mipos_worker.order.request_check import check_request
from mipos_worker.order.stamps import STAMPS_KEY, Stamps, split_message
from mipos_worker.settings import (
    RedisSettings,
    load_producer_settings,
    load_retention_settings,
)
from mipos_worker.state.connection import producer_redis
from mipos_worker.state.inflight import InflightRegistry, Registration
from mipos_worker.state.replication import ReplicaAck, confirm_replicated

_internal_publish: ContextVar[bool] = ContextVar("mipos_internal_publish", default=False)


@contextmanager
def internal_publish() -> Iterator[None]:
    """Within: a publish of our own, whose stamps are kept (a retry, replay, the outbox)."""
    token = _internal_publish.set(True)
    try:
        yield
    finally:
        _internal_publish.reset(token)


Delivery = Callable[["OrderTask", Action, tuple[Any, ...], dict[str, Any]], None]
_delivery: Delivery | None = None


def deliver_with(delivery: Delivery) -> None:
    """The worker's side of a task (its checkout's ``tasks/orders.py``): run in the task's body."""
    global _delivery
    _delivery = delivery


class OrderTask(Task):
    action: Action
    max_retries = None  # attempts and deadline are ours to count (worker/attempt/retry.py)
    typing = False  # checked by parse_order_request, with clearer messages
    acks_late = True
    reject_on_worker_lost = True

    def deliver(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if _delivery is None:
            raise RuntimeError(
                f"{self.name} runs in mipos-worker's workers (celery -A worker, from its checkout); "
                "this process only enqueues it")
        _delivery(self, self.action, args, kwargs)

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        batch = _batch.get()
        if batch is not None and _internal_publish.get() and options.get("task_id") in batch.orders:
            return self._publish_batched(batch, options)
        arguments = named_arguments(self.action, tuple(args or ()), dict(kwargs or {}))
        if _internal_publish.get():
            arguments, stamps, _ = split_message(arguments)
            request = parse_order_request(self.action, arguments)
        else:  # a caller: its arguments checked, our stamps refused
            stamps = Stamps()
            request = check_request(self.action, arguments)
        age_s = float(options.pop("age_s", 0.0) or 0.0)
        options["task_id"] = options.get("task_id") or str(uuid.uuid4())
        body = request.body()
        options["kwargsrepr"] = shown_arguments(body)  # what Flower shows: the order, not our stamps
        settings = load_producer_settings()
        client = self._producer_redis(options)
        if "producer" not in options and "connection" not in options:  # the caller's own: left as it is
            try:
                with self.app.producer_or_acquire() as producer:
                    if can_fold(producer):
                        result = self._register_and_publish(producer, client, settings, options, body, stamps,
                                                            age_s)
                        self._confirm_replicated(client, settings, options)
                        return result
            except OperationalError as exc:
                if self.name in str(exc):  # ours, already saying what could not be done
                    raise
                # kombu's own ("Error 111 connecting to ..."): say it was Redis, and what for
                raise OperationalError(f"cannot reach Redis to enqueue {self.name}: {exc}") from exc
        enqueued_at = self._register(client, settings, options, body, stamps, age_s)
        message = {**body, STAMPS_KEY: stamps.but(enqueued_at=enqueued_at).to_message()}
        result = self._publish(message, options)
        self._confirm_replicated(client, settings, options)
        return result

    def _register_and_publish(self, producer: Any, client: redis.Redis, settings: RedisSettings,
                              options: dict[str, Any], body: dict[str, str], stamps: Stamps,
                              age_s: float) -> Any:
        """The registration and the publish in one script call (mipos_worker/folded_publish.py):
        one round trip, where stock Celery makes two. The enqueue time is Redis's, read through
        this process's monotonic clock (folded_publish.RedisClock), so that the message can
        carry it before the script runs."""
        countdown = options.get("countdown")
        try:
            enqueued_at = stamps.enqueued_at
            if enqueued_at is None:  # to the microsecond, as the script writes it in the registry
                enqueued_at = round(_clock(client).now() - age_s, 6)
            registry = _registry(client, settings.key_prefix, load_retention_settings().history_s)
            registration = Registration(options["task_id"], self.name, {**body, STAMPS_KEY: stamps.to_message()},
                                        float(countdown) if countdown else None, enqueued_at, age_s)
            message = {**body, STAMPS_KEY: stamps.but(enqueued_at=enqueued_at).to_message()}
            with folded(producer, lambda commands: registry.register_and_publish([registration], commands)) \
                    as batch:
                result = super().apply_async(args=(), kwargs=message, producer=producer, **options)
        except redis.RedisError as exc:
            raise OperationalError(f"cannot reach Redis to enqueue {self.name}: {exc}") from exc
        if not batch.flushed:
            raise OperationalError(f"{self.name} {options['task_id']}: kombu published nothing to fold")
        return result

    def _publish(self, message: dict[str, Any], options: dict[str, Any]) -> Any:
        """Celery's publish, its LPUSH and its task-sent event in one pipeline (kombu 5.7's
        publish batch): one round trip, where Celery makes two, and one Redis client where
        kombu builds one per command. A pipeline that fails leaves the delivery uncertain:
        published once more, one command at a time with Celery's retry policy, as Celery's own
        retry would (the same task id: the worker's ledger sends the order once)."""
        if "producer" in options or "connection" in options:  # the caller's own: left as it is
            return super().apply_async(args=(), kwargs=message, **options)
        try:
            with self.app.producer_or_acquire() as producer, _producer_batch(producer, 1):
                return super().apply_async(args=(), kwargs=message, producer=producer, **options)
        except BatchPublishError:
            return super().apply_async(args=(), kwargs=message, **options)

    def _publish_batched(self, batch: _Batch, options: dict[str, Any]) -> Any:
        """An order of ``publish_orders``' batch: already checked and registered; published
        through the batch's producer, the queue declared by its first message only."""
        order, enqueued_at = batch.orders[options["task_id"]]
        options.pop("age_s", None)
        options["kwargsrepr"] = shown_arguments(order.body)
        options["producer"] = batch.producer
        if batch.declared:
            options["declare"] = []  # kombu's check, per message, is a tenth of the publish's CPU
        batch.declared = True
        message = {**order.body, STAMPS_KEY: Stamps(enqueued_at=enqueued_at).to_message()}
        return super().apply_async(args=(), kwargs=message, **options)

    def delay_on_commit(self, *args: Any, **kwargs: Any) -> None:
        self.apply_async_on_commit(args, kwargs)

    def apply_async_on_commit(self, args: Any = None, kwargs: Any = None, **options: Any) -> None:
        """Checked at once; enqueued when the current Django transaction commits (at once outside
        one), not at all when it rolls back. A crash between the commit and the enqueue loses
        it, as in Celery: the outbox (mipos_worker.django_outbox) has no such gap."""
        from django.db import transaction

        check_request(self.action, named_arguments(self.action, tuple(args or ()), dict(kwargs or {})))
        using = options.pop("using", None)
        transaction.on_commit(functools.partial(self.apply_async, args, kwargs, **options), using=using)

    def _producer_redis(self, options: dict[str, Any]) -> redis.Redis:
        connection = options.get("connection")
        url = connection.as_uri(include_password=True) if connection else self.app.conf.broker_url
        if connection is not None and connection.alt:  # sentinel://a;sentinel://b: every Sentinel
            url = ";".join(connection.alt)
        return producer_redis(url)

    def _confirm_replicated(self, client: redis.Redis, settings: RedisSettings,
                            options: dict[str, Any]) -> None:
        """REDIS_MIN_REPLICAS_ACK > 0: return only once the registration and the message are on
        that many replicas (mipos_worker/state/replication.py), else raise as when Redis is down."""
        ack = ReplicaAck.of(settings)
        if not ack.enabled:
            return
        try:
            confirm_replicated(client, settings.key_prefix, ack, f"{self.name} {options['task_id']}")
        except redis.RedisError as exc:
            raise OperationalError(f"{self.name} not confirmed as replicated: {exc}") from exc

    def _register(self, client: redis.Redis, settings: RedisSettings, options: dict[str, Any],
                  body: dict[str, str], stamps: Stamps, age_s: float) -> float:
        """Note the task in the in-flight registry before it is published; returns its
        enqueue time on Redis's clock."""
        countdown = options.get("countdown")
        try:
            registry = _registry(client, settings.key_prefix, load_retention_settings().history_s)
            return registry.register(
                options["task_id"], self.name, {**body, STAMPS_KEY: stamps.to_message()},
                countdown=float(countdown) if countdown else None,
                enqueued_at=stamps.enqueued_at, age_s=age_s)
        except redis.RedisError as exc:
            raise OperationalError(f"cannot reach Redis to enqueue {self.name}: {exc}") from exc


SHOWN_VALUE_CHARS = 200  # of each argument, in what Flower shows of a task: ids fit whole
SHOWN_MAX_CHARS = 1024  # of all of it: the bound Celery sets itself (app.amqp.kwargsrepr_maxsize)


def shown_arguments(body: dict[str, str]) -> str:
    """The task's ``kwargsrepr``: Flower keeps it for each of up to 10,000 tasks, so each value
    is cut at ``SHOWN_VALUE_CHARS`` and the whole at ``SHOWN_MAX_CHARS``."""
    shown = repr({name: _cut(value, SHOWN_VALUE_CHARS) for name, value in body.items()})
    return _cut(shown, SHOWN_MAX_CHARS)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@functools.lru_cache(maxsize=16)
def _clock(client: redis.Redis) -> RedisClock:
    return RedisClock(client)


@functools.lru_cache(maxsize=16)
def _registry(client: redis.Redis, key_prefix: str, index_ttl_s: float) -> InflightRegistry:
    return InflightRegistry(client, key_prefix, index_ttl_s)


@app.task(bind=True, base=OrderTask, name=TASK_NAMES[Action.ACCEPT], action=Action.ACCEPT,
          throws=(OrderFailed,), shared=False)
def accept_order(self: OrderTask, *args: Any, **kwargs: Any) -> None:
    """Tell mipos the POS stored the order: ``delivery_id``, ``store_id``, ``order_external_id``."""
    self.deliver(args, kwargs)


@app.task(bind=True, base=OrderTask, name=TASK_NAMES[Action.DENY], action=Action.DENY,
          throws=(OrderFailed,), shared=False)
def deny_order(self: OrderTask, *args: Any, **kwargs: Any) -> None:
    """Tell mipos the POS could not store the order; ``message`` says why."""
    self.deliver(args, kwargs)


ORDER_TASKS: dict[Action, OrderTask] = {Action.ACCEPT: accept_order, Action.DENY: deny_order}

for _task in ORDER_TASKS.values():
    # Show the POS developer the real arguments in help() and IDEs.
    _task.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in ORDER_FIELDS]
        + ([inspect.Parameter("message", inspect.Parameter.KEYWORD_ONLY)] if _task is deny_order else [])
    )


def publish_order(action: Action, arguments: dict[str, Any], stamps: Stamps, *,
                  age_s: float = 0.0, **options: Any) -> Any:
    """Enqueue with stamps: for the project's own producers only.

    ``age_s``: how long ago the order was enqueued, on the producer's own clock
    (the outbox's kept rows); the deadline counts from then.
    """
    with internal_publish():
        return ORDER_TASKS[action].apply_async(
            kwargs={**arguments, STAMPS_KEY: stamps.to_message()}, age_s=age_s, **options)


class OrderToPublish(NamedTuple):
    """One order of a batch (``publish_orders``): its fields, checked; no stamps of its own."""

    action: Action
    body: dict[str, str]
    task_id: str
    age_s: float = 0.0


@dataclass
class _Batch:
    producer: Any
    orders: dict[str, tuple[OrderToPublish, float]]  # task id → the order, its registered enqueue time
    declared: bool = False  # the queue declared by a message of the batch


_batch: ContextVar[_Batch | None] = ContextVar("mipos_publish_batch", default=None)

# Redis could not be reached: the order, and those after it, were not published.
REDIS_ERRORS = (OperationalError, redis.RedisError, OSError)


def publish_orders(orders: Sequence[OrderToPublish]) -> list[Exception | None]:
    """Publish a batch (the outbox relay's) in two round trips rather than three per order.

    The batch is registered first, in one script call (``register_many``); then each
    message is built by Celery exactly as ``publish_order`` builds it, and the LPUSHes and
    task-sent events go to Redis in one pipeline (kombu's ``Producer.batch``, kombu 5.7+;
    an older kombu publishes each at once). Returns, per order in order, None when it
    went or the error that kept it back (an error no check foresaw); after an error of
    ``REDIS_ERRORS`` the list stops: that order and the rest were not published. Raises
    ``OperationalError`` when the registration or the pipeline fails: then none may be
    taken as published (a message may still be in Redis: its row goes again, under the
    same task id, and the worker's ledger sends the order once).
    """
    if not orders:
        return []
    settings = load_producer_settings()
    registry = _registry(producer_redis(app.conf.broker_url), settings.key_prefix,
                         load_retention_settings().history_s)
    try:
        stamps = registry.register_many([
            Registration(order.task_id, TASK_NAMES[order.action], {**order.body, STAMPS_KEY: {}},
                         age_s=order.age_s) for order in orders])
    except redis.RedisError as exc:
        raise OperationalError(f"cannot reach Redis to enqueue {len(orders)} orders: {exc}") from exc
    results: list[Exception | None] = []
    try:
        with app.producer_or_acquire() as producer:
            token = _batch.set(_Batch(producer, {o.task_id: (o, at) for o, at in zip(orders, stamps, strict=True)}))
            try:
                with _producer_batch(producer, len(orders)):
                    for order in orders:
                        try:
                            publish_order(order.action, order.body, Stamps(), age_s=order.age_s,
                                          task_id=order.task_id)
                        except REDIS_ERRORS as exc:
                            results.append(exc)
                            break
                        except Exception as exc:  # noqa: BLE001 - this order's, not the batch's
                            results.append(exc)
                        else:
                            results.append(None)
            finally:
                _batch.reset(token)
    except KombuError as exc:  # BatchPublishError: the pipeline failed, delivery uncertain
        raise OperationalError(f"cannot publish {len(orders)} orders: {exc.__cause__ or exc}") from exc
    ack = ReplicaAck.of(settings)
    if ack.enabled:
        try:
            confirm_replicated(producer_redis(app.conf.broker_url), settings.key_prefix, ack,
                               f"{len(orders)} orders")
        except redis.RedisError as exc:
            raise OperationalError(f"{len(orders)} orders not confirmed as replicated: {exc}") from exc
    return results


def _producer_batch(producer: Any, orders: int) -> AbstractContextManager[Any]:
    """kombu's publish batch, large enough for one flush (a message and its event each)."""
    if not hasattr(producer, "batch"):  # kombu before 5.7
        return nullcontext()
    return producer.batch(max_size=2 * orders + 1)
