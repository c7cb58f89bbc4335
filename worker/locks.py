"""Short Redis locks shared by all processes: SET NX PX to take, compare-and-delete to release."""

from __future__ import annotations

import redis

# Delete the lock only if it is still ours (it may have expired and been retaken).
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def release_lock(redis_client: redis.Redis, key: str, lock_id: str) -> None:
    redis_client.eval(_RELEASE, 1, key, lock_id)
