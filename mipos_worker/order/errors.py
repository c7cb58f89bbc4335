"""The two ways an order ends without reaching mipos: bad arguments, or dead-lettered."""

from __future__ import annotations


class InvalidOrder(ValueError):
    """Arguments of an accept or deny that can never be sent; names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class OrderFailed(Exception):
    """The order was dead-lettered: raised at the end so Celery and Flower show the task failed.

    Built from its message alone, so Celery can pickle it (and so match it against
    the task's ``throws``: logged at INFO, no traceback)."""

    def __init__(self, message: str, letter_id: str | None = None) -> None:
        super().__init__(message)
        self.letter_id = letter_id

    @classmethod
    def for_letter(cls, letter_id: str, reason: str, error: str | None) -> OrderFailed:
        return cls(f"dead-lettered ({reason}): {error} [dead letter {letter_id}]", letter_id)
