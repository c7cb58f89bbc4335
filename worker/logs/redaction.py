"""Keeps secrets out of log lines, in every form a renderer can give them.

Two passes (worker/logs/setup.py): the values of each event are redacted before
rendering, strings nested in dicts, lists and tuples included, so a renderer
never sees a secret to escape; then the rendered line is scrubbed of every
escaped form (JSON, ``repr``, ASCII escapes), for whatever reached the renderer
some other way (an object's ``repr``, a traceback the renderer formats).

Tokens are registered as the token store sees them; the client secret and the
password when the worker's settings are loaded. The settings refuse a client
secret or password shorter than ``MIN_SECRET_LENGTH``: replacing a short
string everywhere would rewrite ordinary words and ids, and where it was
replaced would give it away. A shorter value is never registered.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from config import MIN_SECRET_LENGTH

REDACTED = "[redacted]"
_MAX_TOKENS = 64  # rotations keep old tokens around for a while; they stay secret
_PLAIN_TYPES = (int, float, bool, type(None), bytes)

_lock = threading.Lock()
_secrets: deque[str] = deque(maxlen=_MAX_TOKENS)
_fixed: set[str] = set()
_forms: tuple[str, ...] = ()  # every form of every registered secret, longest first


@lru_cache(maxsize=256)
def secret_forms(secret: str) -> tuple[str, ...]:
    """The secret as it appears written by JSON, by ``repr`` and in ASCII escapes,
    and those escaped once more (a repr inside a JSON line); longest first."""
    once = {
        secret,
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        repr(secret)[1:-1],
        ascii(secret)[1:-1],
        secret.encode("unicode_escape").decode("ascii"),
    }
    twice = {escaped for form in once for escaped in (json.dumps(form)[1:-1], repr(form)[1:-1])}
    return tuple(sorted(once | twice, key=len, reverse=True))


def _all_forms(secrets: Iterable[str]) -> tuple[str, ...]:
    forms = {form for secret in secrets for form in secret_forms(secret)}
    return tuple(sorted(forms, key=len, reverse=True))


def register_secret(value: str | None, *, permanent: bool = False) -> None:
    global _forms
    if not value or len(value) < MIN_SECRET_LENGTH:
        return
    with _lock:
        if permanent:
            if value in _fixed:
                return
            _fixed.add(value)
        else:
            if value in _secrets:
                return
            _secrets.append(value)
        _forms = _all_forms([*_fixed, *_secrets])


def redact_text(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with every form of the registered secrets (or of ``secrets``) replaced."""
    forms = _forms if secrets is None else _all_forms(secrets)
    for form in forms:
        if form in text:
            text = text.replace(form, REDACTED)
    return text


def redact(text: str) -> str:
    return redact_text(text)


def redact_value(value: Any) -> Any:
    """A copy of ``value`` with the secrets out of every string in it, however deep.

    Other objects are kept, unless their ``repr`` (what a renderer falls back
    on) holds a secret: then they become their redacted ``repr``.
    """
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, _PLAIN_TYPES):
        return value
    if isinstance(value, dict):
        return {redact_value(k) if isinstance(k, str) else k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_value(v) for v in value]
    if isinstance(value, tuple):
        return tuple(redact_value(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return [redact_value(v) for v in value]
    try:
        shown = repr(value)
    except Exception:  # noqa: BLE001  # a broken __repr__ must not break the log line
        return value
    redacted = redact_text(shown)
    return value if redacted == shown else redacted
