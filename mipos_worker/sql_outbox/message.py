"""What an outbox row asks for, read strictly before anything is published.

Everything the publish takes from the row is read and checked here, so a row
that can never be published fails here, whatever the exception (a
``RecursionError`` from JSON nested too deep, bytes that are not UTF-8, an
empty task id, ...), and the relay moves it aside alone (relay.py).
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from typing import Any

from mipos_worker.order.model import Action
from mipos_worker.order.request_check import check_request


@dataclass(frozen=True)
class OutboxMessage:
    task_id: str
    action: Action
    body: dict[str, str]
    age_s: float  # how long ago the row was committed, on the database's clock


def read_message(task_id: object, action: object, arguments: object, age_s: object) -> OutboxMessage:
    """The message a row's columns make; raises when they can never make one."""
    task = read_text("task_id", task_id)
    check_task_id(task)
    kind = Action(read_text("action", action))
    decoded = json.loads(read_text("arguments", arguments))
    if not isinstance(decoded, dict):
        raise TypeError(f"arguments: must be a JSON object, got {type(decoded).__name__}")
    body = check_request(kind, decoded).body()
    return OutboxMessage(task, kind, body, max(0.0, float(age_s or 0.0)))  # type: ignore[arg-type]


def read_text(column: str, value: object) -> str:
    """A text column's value. On SQLite the relay reads text columns as bytes, so that one
    row of bytes that are not UTF-8 fails here, alone, and not the whole batch's SELECT."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if not isinstance(value, str):
        raise TypeError(f"{column}: must be text, got {type(value).__name__}")
    return value


def check_task_id(task_id: str) -> None:
    """The task id is the message's identity: a resend must carry the same one. An empty one
    would be replaced by a new id at every publish; a control character breaks log lines."""
    if not task_id.strip():
        raise ValueError("task_id: must not be empty (every publish would take a new task id)")
    for position, char in enumerate(task_id):
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise ValueError(f"task_id: must not contain U+{ord(char):04X} (position {position})")


def shown(value: Any) -> str:
    """A column's value for a log line, whatever it holds."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
