"""Short Redis locks shared by all processes: SET NX PX to take, compare-and-delete to release.

A lock's value is a random id only its taker knows, so releasing deletes the key
only while it is still that lock: after the TTL ran out another process may hold
the same key, and its lock must survive our late release.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from mipos_worker.state.connection import milliseconds

# Delete the lock only if it is still ours (it may have expired and been retaken).
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def take_lock(redis_client: redis.Redis, key: str, ttl_s: float) -> str | None:
    """Takes ``key`` for ``ttl_s`` seconds (at least 1 ms) if nobody holds it: the lock's id, or None."""
    lock_id = uuid.uuid4().hex
    taken = redis_client.set(key, lock_id, nx=True, px=milliseconds(ttl_s))
    return lock_id if taken else None


def release_lock(redis_client: redis.Redis, key: str, lock_id: str) -> None:
    """Deletes ``key`` only if it still holds ``lock_id``."""
    redis_client.eval(_RELEASE, 1, key, lock_id)


@contextmanager
def held_lock(redis_client: redis.Redis, key: str, ttl_s: float) -> Iterator[bool]:
    """Yields True when this process took ``key``; releases it on the way out, only if it is ours."""
    lock_id = take_lock(redis_client, key, ttl_s)
    try:
        yield lock_id is not None
    finally:
        if lock_id is not None:
            release_lock(redis_client, key, lock_id)
