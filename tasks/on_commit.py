"""``delay_on_commit`` / ``apply_async_on_commit`` for the order tasks, as Celery's
``celery.contrib.django.task.DjangoTask`` has them for its own.

The arguments are checked at once (``ValueError`` in the caller, as with
``delay()``); the enqueue runs when the current Django transaction commits, or
at once outside one, and not at all when it rolls back. As in Celery, this
loses the enqueue if the process dies between the commit and the enqueue, or
if Redis is down then (the exception comes out of the commit): the outbox
(tasks.django_outbox) has neither gap. Django is imported only when called, so
the worker does not need it.
"""

from __future__ import annotations

import functools
from typing import Any

from tasks.request_check import check_request


class OnCommitMixin:
    """Mixed into ``tasks.orders.OrderTask`` (before ``Task``)."""

    action: Any
    apply_async: Any

    def delay_on_commit(self, *args: Any, **kwargs: Any) -> None:
        self.apply_async_on_commit(args, kwargs)

    def apply_async_on_commit(self, args: Any = None, kwargs: Any = None, **options: Any) -> None:
        from django.db import transaction

        from tasks.orders import _named_arguments

        check_request(self.action, _named_arguments(self.action, tuple(args or ()), dict(kwargs or {})))
        using = options.pop("using", None)
        transaction.on_commit(functools.partial(self.apply_async, args, kwargs, **options), using=using)
