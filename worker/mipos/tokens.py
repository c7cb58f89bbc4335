"""The mipos token, shared by every worker process through Redis.

mipos's token call hands back the account's current token without rotating
it; refresh rotates and kills the old token at once. So getting or renewing a
token is single-flight across all processes: a Redis lock, one holder calls
mipos, everyone else waits (bounded) for the new token to appear.

A renewal makes at most ``RENEWAL_CALLS`` calls, each bounded by the client's
``call_bound_s``: the lock outlives that with a margin, and a waiter waits no
longer than the lock can be held, nor past its attempt's budget.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import redis
import structlog

from worker.logs.redaction import register_secret
from worker.mipos import budget
from worker.mipos.client import MiposClient, TokenGrant
from worker.mipos.errors import AuthError, MiposError, TransientError
from worker.state.counters import Metrics
from worker.state.locks import held_lock

logger = structlog.stdlib.get_logger("mipos.tokens")

RENEWAL_CALLS = 3  # the most a renewal makes: refresh, token call, refresh (see _fetch)
LOCK_MARGIN_S = 5.0  # Redis round trips and scheduling, beyond the calls themselves
WAIT_MARGIN_S = 5.0  # a waiter gives the holder this long past the lock's life
WARNED_TOKENS_KEPT = 64  # fingerprints of tokens already warned about, per process
_UNREAD = object()


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
        self.lock_ttl_s = RENEWAL_CALLS * client.call_bound_s + LOCK_MARGIN_S
        self._warned: OrderedDict[str, None] = OrderedDict()

    def wait_limit_s(self) -> float:
        """How long a worker waits for another's renewal: the lock's life and a
        margin, and never past what is left of the attempt's budget."""
        limit = self.lock_ttl_s + WAIT_MARGIN_S
        left = budget.remaining_s()
        return limit if left is None else max(0.0, min(limit, left))

    def current(self, stored: bytes | None | object = _UNREAD) -> str:
        """A token to send with; fetches or refreshes it when needed. ``stored``: the key's
        value, when the caller read it already (the attempt's start reads it with the rest)."""
        stored = self._read() if stored is _UNREAD else self._parse(stored)
        if stored is not None and not stored.due_for_refresh(self.clock()):
            return stored.token
        return self._renew(stale=stored.token if stored else None)

    def replace_rejected(self, token: str) -> str:
        """mipos refused ``token`` (401 or ``User not authenticated.``): get the next one."""
        return self._renew(stale=token, force=True)

    def _read(self) -> StoredToken | None:
        return self._parse(self.redis.get(self.key))

    def _parse(self, raw: Any) -> StoredToken | None:
        if raw is None:
            return None
        stored = StoredToken(**json.loads(raw))
        register_secret(stored.token)
        return stored

    def _write(self, grant: TokenGrant, stale: str | None = None) -> str:
        register_secret(grant.token)
        expires_at, ignored = grant.expires_at, grant.expiry_ignored
        if expires_at is not None and grant.token == stale:
            # mipos handed back the token we renewed: refreshing it ahead of its stated
            # expiry once is enough (never more than one refresh per token).
            expires_at = None
            ignored = ("the renewed token came back unchanged: its expiry is treated as unknown, "
                       "the token is used until mipos refuses it")
        if ignored is not None:
            self._warn_once(grant, ignored)
        stored = StoredToken(grant.token, expires_at, grant.issued_at)
        self.redis.set(self.key, json.dumps(asdict(stored)))
        return grant.token

    def _warn_once(self, grant: TokenGrant, reason: str) -> None:
        fingerprint = hashlib.sha256(grant.token.encode()).hexdigest()
        if fingerprint in self._warned:
            return
        self._warned[fingerprint] = None
        while len(self._warned) > WARNED_TOKENS_KEPT:
            self._warned.popitem(last=False)
        logger.warning("token_expiry_ignored", expires_in=grant.expires_in_raw, reason=reason)

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
        wait_s = self.wait_limit_s()
        give_up_at = time.monotonic() + wait_s
        while True:
            with held_lock(self.redis, self.lock_key, self.lock_ttl_s) as held:
                if held:
                    replacement = self._usable_replacement(stale, force)
                    if replacement is not None:
                        return replacement  # someone renewed it while we queued
                    return self._write(self._fetch(self._read()), stale)
            replacement = self._usable_replacement(stale, force)
            if replacement is not None:
                return replacement
            if time.monotonic() > give_up_at:
                if wait_s < self.lock_ttl_s + WAIT_MARGIN_S:
                    raise TransientError("attempt time budget spent waiting for another "
                                         "worker's token renewal")
                raise TransientError("timed out waiting for another worker's token renewal")
            time.sleep(min(self.poll_interval_s, max(0.0, give_up_at - time.monotonic())))

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
