"""The HTTP client for the mipos calls the worker makes.

One pooled ``requests.Session`` per thread, created on first use, so each
prefork child (or thread of the threads pool) gets its own after the fork.

Every call is bounded three ways: ``timeout=(connect, read)`` per socket
operation; a total wall-clock bound of connect + read (``call_bound_s``, cut by
``worker.mipos.call_deadline``), never more than what is left of the attempt's budget
(``worker.mipos.budget``; a spent budget sends nothing); and a body read up to
``MAX_BODY_BYTES``. Any failure comes back as an ``Answer`` without a status that
says whether the request may have reached mipos (``outcome_unknown``).
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests

from config import MiposSettings
from config.timing import call_bound_for
from mipos_worker.order.model import Action, OrderRequest
from worker.mipos import budget
from worker.mipos.call_deadline import DeadlineAdapter, watched
from worker.mipos.classification import (
    MAX_BODY_BYTES,
    Answer,
    NotSent,
    TotalTimeout,
    classify,
)
from worker.mipos.errors import AuthError, PermanentError, TransientError

TOKEN_PATH = "/api/oauth/token"
REFRESH_PATH = "/api/oauth/token/refresh"
ORDER_PATHS = {
    Action.ACCEPT: "/api/v1/integration/order/accept",
    Action.DENY: "/api/v1/integration/order/deny",
}
PENDING_PATH = "/api/v1/orders"
TOKEN_MISMATCH = "Token Mismatch."
ABSOLUTE_EXPIRY_THRESHOLD = 10**9  # `expires_in` above this is a Unix time, below it seconds
# A stated lifetime outside these bounds is not believed: the token is used until
# mipos refuses it (a 401 gets the next one). Refreshing ahead of an expiry that
# is already past, or seconds away, would refresh (and rotate) before every send.
MIN_TOKEN_LIFETIME_S = 30.0
MAX_TOKEN_LIFETIME_S = 30 * 86_400.0
READ_CHUNK_BYTES = 16 * 1024
_USABLE_TOKEN = re.compile(r"[\x21-\x7e]{1,4096}")  # printable ASCII, no spaces: a header value


@dataclass(frozen=True)
class TokenGrant:
    token: str
    expires_at: float | None  # None: unknown, use it until mipos refuses it
    issued_at: float
    expiry_ignored: str | None = None  # why a stated expiry was not believed
    expires_in_raw: str | None = None  # what mipos said, for that warning


class TokenMismatch(AuthError):
    """Refresh refused because the token was already rotated (by someone else)."""


def parse_expires_in(value: Any, now: float) -> float | None:
    """The expiry of a token, from ``expires_in`` as mipos-api.md says to read it."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if not math.isfinite(number) or number <= 0:
        return None
    return number if number > ABSOLUTE_EXPIRY_THRESHOLD else now + number


def token_expiry(value: Any, now: float) -> tuple[float | None, str | None]:
    """The expiry to act on, and why a stated one was ignored (None when it was not).

    An expiry already past, or less than ``MIN_TOKEN_LIFETIME_S`` or more than
    ``MAX_TOKEN_LIFETIME_S`` away, is unknown: mipos's clock may be off, or the
    value means something else (the documented example is a date in 2020)."""
    expires_at = parse_expires_in(value, now)
    if expires_at is None:
        return None, None
    lifetime = expires_at - now
    if lifetime <= 0:
        why = f"already past ({-lifetime:.0f} s ago)"
    elif lifetime < MIN_TOKEN_LIFETIME_S:
        why = f"too near ({lifetime:.0f} s away; under {MIN_TOKEN_LIFETIME_S:g} s)"
    elif lifetime > MAX_TOKEN_LIFETIME_S:
        why = f"too far ({lifetime / 86_400.0:.0f} days away; over {MAX_TOKEN_LIFETIME_S / 86_400.0:g} days)"
    else:
        return expires_at, None
    return None, f"expiry {why}: treated as unknown, the token is used until mipos refuses it"


class MiposClient:
    def __init__(self, settings: MiposSettings, pool_size: int = 16) -> None:
        self.settings = settings
        self.pool_size = pool_size
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = DeadlineAdapter(pool_connections=4, pool_maxsize=self.pool_size)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["Accept"] = "application/json"
            session.headers["Accept-Encoding"] = "identity"  # the body bound counts what is read
            session.headers["User-Agent"] = "mipos-worker"
            _read_environment_once(session, self.settings.base_url)
            self._local.session = session
        return session

    @property
    def timeout(self) -> tuple[float, float]:
        return (self.settings.timeout_s, self.settings.timeout_s)

    @property
    def call_bound_s(self) -> float:
        """The longest one call may take, start to end: connect + read."""
        return call_bound_for(self.settings.timeout_s)

    def _call(self, method: str, path: str, token: str | None = None,
              body: dict[str, str] | None = None) -> Answer:
        """One HTTP call, timed and bounded; any failure becomes an answer without a status."""
        total_s = self.call_bound_s
        left = budget.remaining_s()
        if left is not None:
            if left <= 0:
                return Answer.from_exception(
                    NotSent("attempt time budget spent: the request was not sent"), 0.0, sent=False)
            total_s = min(total_s, left)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        per_operation_s = min(self.settings.timeout_s, total_s)
        started = time.perf_counter()
        response: requests.Response | None = None
        with watched(total_s) as call:
            try:
                response = self.session.request(
                    method, self.settings.base_url + path, json=body, headers=headers,
                    timeout=(per_operation_s, per_operation_s), stream=True, allow_redirects=False,
                )
                raw, truncated = _read_at_most(response, MAX_BODY_BYTES)
            except Exception as exc:  # noqa: BLE001 - every failure of a call is an answer, not a crash
                if call.expired:
                    exc = TotalTimeout(f"total timeout of {round(total_s, 2):g} s exceeded "
                                       f"(the call was cut off: {type(exc).__name__})")
                return Answer.from_exception(exc, _ms_since(started), sent=call.sent)
            finally:
                if response is not None:
                    response.close()
        return Answer.from_body(response.status_code, raw, truncated=truncated,
                                retry_after=response.headers.get("Retry-After"),
                                elapsed_ms=_ms_since(started))

    def _post(self, path: str, body: dict[str, str], token: str | None = None) -> Answer:
        return self._call("POST", path, token, body)

    def send(self, request: OrderRequest, token: str) -> Answer:
        """POST an accept or deny; the answer is classified by the caller."""
        return self._post(ORDER_PATHS[request.action], request.body(), token)

    def pending_orders(self, store_id: str, token: str) -> Answer:
        """GET the orders mipos still lists as pending for the store (last 10 minutes)."""
        return self._call("GET", f"{PENDING_PATH}/{quote(store_id, safe='')}", token)

    def request_token(self) -> TokenGrant:
        s = self.settings
        body = {**self._client(), "grant_type": "client_credentials", "email": s.email, "password": s.password}
        return _grant_from(self._post(TOKEN_PATH, body), "token call")

    def refresh_token(self, token: str) -> TokenGrant:
        body = {**self._client(), "grant_type": "refresh_token", "refresh_token": token}
        return _grant_from(self._post(REFRESH_PATH, body, token=token), "token refresh")

    def _client(self) -> dict[str, str]:
        return {"client_id": self.settings.client_id, "client_secret": self.settings.client_secret}


def _grant_from(answer: Answer, call: str) -> TokenGrant:
    """The token in a token or refresh answer; any other answer raises a ``MiposError``."""
    verdict = classify(answer)
    status = answer.http_status
    if status == 200 and isinstance(answer.body, dict):
        data = answer.body.get("data")
        token = data.get("token") if isinstance(data, dict) else None
        if isinstance(token, str) and _USABLE_TOKEN.fullmatch(token):
            assert isinstance(data, dict)
            now = time.time()
            raw = data.get("expires_in")
            expires_at, ignored = token_expiry(raw, now)
            return TokenGrant(token, expires_at, now, expiry_ignored=ignored,
                              expires_in_raw=None if raw is None else str(raw)[:64])
        raise TransientError(f"{call}: 200 without a usable token in the body", http_status=status)
    message = f"{call} failed: {verdict.error or f'HTTP {status}'}"
    if status == 409 and verdict.error == TOKEN_MISMATCH:
        raise TokenMismatch(message, http_status=status)
    if status in (409, 422, 401):
        # Wrong credentials or account: no token until an operator fixes it.
        raise AuthError(message, http_status=status)
    if verdict.error_class is not None and verdict.error_class.value == "permanent":
        raise PermanentError(message, http_status=status)
    raise TransientError(message, http_status=status)


def _read_at_most(response: requests.Response, limit: int) -> tuple[bytes, bool]:
    """The body, up to ``limit`` bytes (as sent: no decompression); True when there was more."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = response.raw.read(min(READ_CHUNK_BYTES, limit + 1 - size), decode_content=False)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    raw = b"".join(chunks)
    return raw[:limit], size > limit


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 1)


def _read_environment_once(session: requests.Session, base_url: str) -> None:
    """What requests reads from the environment at every request, read once per session.

    With ``trust_env`` requests walks the whole environment for proxies (and looks for
    a ``.netrc``) on each call: a quarter of an attempt's CPU. The proxies for mipos's
    host (``HTTPS_PROXY``, ``NO_PROXY``, ...) and the CA bundle (``REQUESTS_CA_BUNDLE``,
    ``CURL_CA_BUNDLE``) are taken here instead; ``.netrc`` is not read (the token goes
    in our own header, which a ``.netrc`` entry would have replaced).
    """
    session.trust_env = False
    session.proxies.update(requests.utils.get_environ_proxies(base_url))
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
