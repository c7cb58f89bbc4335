"""What every ``mipos-worker`` command shares: exit codes, the Redis connection, argument types."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import redis

from cli.output import parse_since
from mipos_worker.terminal import EXIT_FAILED as EXIT_FAILED
from mipos_worker.terminal import EXIT_OK as EXIT_OK
from mipos_worker.terminal import EXIT_USAGE as EXIT_USAGE
from mipos_worker.terminal import duration_argument as duration_argument

DEAD_REASONS = ("permanent", "permanent_after_unknown", "attempts", "deadline", "invalid")


def open_redis() -> tuple[redis.Redis, str]:
    from config import load_producer_settings
    from mipos_worker.state.connection import redis_from_url

    settings = load_producer_settings()
    return redis_from_url(settings.url, timeout_s=3.0, retries=0), settings.key_prefix


def id_argument(kind: str) -> Callable[[str], str]:
    """An argparse type for store and order ids: non-empty, printable, no spaces."""
    def parse(text: str) -> str:
        value = text.strip()
        if not value:
            raise argparse.ArgumentTypeError(f"{kind} must not be empty")
        if len(value) > 200 or any(c.isspace() or not c.isprintable() for c in value):
            raise argparse.ArgumentTypeError(
                f"{kind} {text[:40]!r} is malformed (at most 200 printable characters, "
                "no spaces)")
        return value
    return parse


def since_argument(text: str) -> float:
    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def letter_id_argument(text: str) -> str:
    value = text.strip().lower()
    if not (len(value) == 16 and all(c in "0123456789abcdef" for c in value)):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a dead letter id (16 hex digits, as `dead list` shows)")
    return value
