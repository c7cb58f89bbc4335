"""Keeps secrets out of log lines: every rendered line is scrubbed of them.

Tokens are registered as the token store sees them; the client secret and
the password when the worker's settings are loaded.
"""

from __future__ import annotations

import threading
from collections import deque

REDACTED = "[redacted]"
_MAX_TOKENS = 64  # rotations keep old tokens around for a while; they stay secret

_lock = threading.Lock()
_secrets: deque[str] = deque(maxlen=_MAX_TOKENS)
_fixed: set[str] = set()


def register_secret(value: str | None, *, permanent: bool = False) -> None:
    if not value or len(value) < 4:  # too short to replace without mangling text
        return
    with _lock:
        if permanent:
            _fixed.add(value)
        elif value not in _secrets:
            _secrets.append(value)


def redact(text: str) -> str:
    with _lock:
        secrets = list(_fixed) + list(_secrets)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text
