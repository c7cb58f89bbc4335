"""One attempt as the history keeps it, and a task's history of them.

The history (one Redis list per task, ``worker/state/ledger.py``) gives the next
attempt's number, the attempts counted against ``MIPOS_RETRY_MAX_ATTEMPTS``, the
earlier attempts whose outcome is unknown, and a dead letter's attempts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class AttemptRecord:
    attempt: int
    at: float
    outcome: str  # accepted, denied, retrying, failed, or unknown (a lost worker's)
    http_status: int | None = None
    error: str | None = None
    error_class: str | None = None
    retry_in_s: float | None = None
    elapsed_ms: float | None = 0.0
    counted: bool = True  # against MIPOS_RETRY_MAX_ATTEMPTS (a fresh-token resend is not)
    outcome_unknown: bool = False  # the request may have reached mipos; no answer came

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _NAMES}


_NAMES = tuple(f.name for f in fields(AttemptRecord))


class History:
    """A task's attempts, oldest first, as stored (records of earlier versions included)."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = list(records)

    def add(self, record: AttemptRecord) -> dict[str, Any]:
        stored = record.as_dict()
        self.records.append(stored)
        return stored

    def next_attempt(self) -> int:
        return len(self.records) + 1

    def counted(self) -> int:
        return sum(1 for record in self.records if record.get("counted"))

    def last_unknown(self) -> dict[str, Any] | None:
        """The last attempt, when its outcome is unknown (it may have reached mipos)."""
        if self.records and self.records[-1].get("outcome_unknown"):
            return self.records[-1]
        return None

    def unknown_attempts(self) -> list[int]:
        return [record["attempt"] for record in self.records if record.get("outcome_unknown")]
