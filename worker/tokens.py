"""The mipos token, shared by every worker process through Redis.

mipos's token call hands back the account's current token without rotating
it; refresh rotates and kills the old token at once. So getting or renewing a
token is single-flight across all processes: a Redis lock, one holder calls
mipos, everyone else waits (bounded) for the new token to appear.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

import redis

from worker.errors import AuthError, MiposError, TransientError
from worker.locks import release_lock
from worker.metrics import Metrics
from worker.mipos import MiposClient, TokenGrant
from worker.redaction import register_secret


@dataclass(frozen=True)
class StoredToken:
    token: str
    expires_at: float | None
    issued_at: float

    def due_for_refresh(self, now: float) -> bool:
        """Refresh ahead of a known expiry, by a fifth of the lifetime, at most 60 s."""
        if self.expires_at is None:
            return False
        lifetime = max(self.expires_at - self.issued_at, 0.0)
        margin = min(60.0, lifetime * 0.2)
        return now >= self.expires_at - margin


class TokenStore:
    def __init__(
        self,
        client: MiposClient,
        redis_client: redis.Redis,
        key_prefix: str,
        *,
        clock: Callable[[], float] = time.time,
        poll_interval_s: float = 0.02,
        metrics: Metrics | None = None,
    ) -> None:
        self.client = client
        self.redis = redis_client
        self.key = f"{key_prefix}token"
        self.lock_key = f"{key_prefix}token:lock"
        self.clock = clock
        self.poll_interval_s = poll_interval_s
        self.metrics = metrics
        # A holder makes at most two calls (refresh, then the token call).
        self.lock_ttl_s = 2 * 2 * client.settings.timeout_s + 5.0

    def current(self) -> str:
        """A token to send with; fetches or refreshes it when needed."""
        stored = self._read()
        if stored is not None and not stored.due_for_refresh(self.clock()):
            return stored.token
        return self._renew(stale=stored.token if stored else None)

    def replace_rejected(self, token: str) -> str:
        """mipos refused ``token`` (401 or ``User not authenticated.``): get the next one."""
        return self._renew(stale=token, force=True)

    def _read(self) -> StoredToken | None:
        raw = self.redis.get(self.key)
        if raw is None:
            return None
        stored = StoredToken(**json.loads(raw))
        register_secret(stored.token)
        return stored

    def _write(self, grant: TokenGrant) -> str:
        register_secret(grant.token)
        stored = StoredToken(grant.token, grant.expires_at, grant.issued_at)
        self.redis.set(self.key, json.dumps(asdict(stored)))
        return grant.token

    def _usable_replacement(self, stale: str | None, force: bool) -> str | None:
        stored = self._read()
        if stored is None:
            return None
        if stored.token != stale and not stored.due_for_refresh(self.clock()):
            return stored.token
        if stored.token == stale and not force and not stored.due_for_refresh(self.clock()):
            return stored.token
        return None

    def _renew(self, stale: str | None, force: bool = False) -> str:
        give_up_at = time.monotonic() + self.lock_ttl_s + 5.0
        lock_id = uuid.uuid4().hex
        while True:
            if self.redis.set(self.lock_key, lock_id, nx=True, px=int(self.lock_ttl_s * 1000)):
                try:
                    replacement = self._usable_replacement(stale, force)
                    if replacement is not None:
                        return replacement  # someone renewed it while we queued
                    return self._write(self._fetch(self._read()))
                finally:
                    release_lock(self.redis, self.lock_key, lock_id)
            replacement = self._usable_replacement(stale, force)
            if replacement is not None:
                return replacement
            if time.monotonic() > give_up_at:
                raise TransientError("timed out waiting for another worker's token renewal")
            time.sleep(self.poll_interval_s)

    def _fetch(self, stored: StoredToken | None) -> TokenGrant:
        """Call mipos for a usable token; runs only under the lock."""
        if stored is None:
            grant = self._counted("token", self.client.request_token)
            if not _expired(grant, self.clock()):
                return grant
            # The token call returns the current token even when it has expired.
            return self._counted("refresh", self.client.refresh_token, grant.token)
        try:
            return self._counted("refresh", self.client.refresh_token, stored.token)
        except AuthError:
            # `Token Mismatch.`: rotated outside our store (another deployment, a
            # person); or mipos forgot the token. The token call says which is current.
            grant = self._counted("token", self.client.request_token)
            if grant.token != stored.token and not _expired(grant, self.clock()):
                return grant
            return self._counted("refresh", self.client.refresh_token, grant.token)

    def _counted(self, kind: str, call: Callable[..., TokenGrant], *args: str) -> TokenGrant:
        """Make a token or refresh call, counted in ``mipos_token_calls_total``."""
        result = "ok"
        try:
            return call(*args)
        except MiposError as exc:
            result = exc.error_class.value
            raise
        finally:
            if self.metrics is not None:
                try:
                    self.metrics.count("mipos_token_calls_total", kind=kind, result=result)
                except redis.RedisError:
                    pass  # a counter is not worth failing the token call for


def _expired(grant: TokenGrant, now: float) -> bool:
    return grant.expires_at is not None and grant.expires_at <= now
