"""The one log line each attempt writes (fields fixed by ``interface.md``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from mipos_worker.order.model import Action

_LEVELS = {
    "accepted": "info",
    "denied": "info",
    "skipped": "info",
    "retrying": "warning",
    "failed": "error",
}

logger = structlog.stdlib.get_logger("mipos.attempts")


@dataclass
class AttemptLine:
    action: Action
    task_id: str
    order_fields: dict[str, Any]
    max_attempts: int
    extra: dict[str, Any] = field(default_factory=dict)
    on_emit: Callable[[str, str | None], None] | None = None  # (outcome, error_class): metrics

    def emit(
        self,
        *,
        attempt: int,
        outcome: str,
        http_status: int | None = None,
        error: str | None = None,
        error_class: str | None = None,
        retry_in_s: float | None = None,
        fail_reason: str | None = None,
        elapsed_ms: float = 0.0,
        **more: Any,
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "task_id": self.task_id,
            **self.order_fields,
            "action": self.action.value,
            "attempt": attempt,
            "max_attempts": self.max_attempts,
            "outcome": outcome,
            "http_status": http_status,
            "error": error,
            "error_class": error_class,
            "elapsed_ms": elapsed_ms,
            **self.extra,
            **more,
        }
        if outcome == "retrying":
            fields["retry_in_s"] = None if retry_in_s is None else round(retry_in_s, 3)
        if outcome == "failed":
            fields["fail_reason"] = fail_reason
        getattr(logger, _LEVELS[outcome])(f"{self.action.value}_attempt", **fields)
        if self.on_emit is not None:
            self.on_emit(outcome, error_class)
        return fields
