"""The HTTP client for the mipos calls the worker makes.

One pooled ``requests.Session`` per thread, created on first use, so each
prefork child (or thread of the threads pool) gets its own after the fork.
Every call carries ``timeout=(connect, read)``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter

from config import MiposSettings
from worker.errors import (
    Answer,
    AuthError,
    PermanentError,
    TransientError,
    classify,
)
from worker.orders import Action, OrderRequest

TOKEN_PATH = "/api/oauth/token"
REFRESH_PATH = "/api/oauth/token/refresh"
ORDER_PATHS = {
    Action.ACCEPT: "/api/v1/integration/order/accept",
    Action.DENY: "/api/v1/integration/order/deny",
}
PENDING_PATH = "/api/v1/orders"
TOKEN_MISMATCH = "Token Mismatch."
ABSOLUTE_EXPIRY_THRESHOLD = 10**9  # `expires_in` above this is a Unix time, below it seconds


@dataclass(frozen=True)
class TokenGrant:
    token: str
    expires_at: float | None  # None: unknown, use it until mipos refuses it
    issued_at: float


class TokenMismatch(AuthError):
    """Refresh refused because the token was already rotated (by someone else)."""


def parse_expires_in(value: Any, now: float) -> float | None:
    """The expiry of a token, from ``expires_in`` as mipos-api.md says to read it."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if number != number or number <= 0:  # NaN or nonsense
        return None
    return number if number > ABSOLUTE_EXPIRY_THRESHOLD else now + number


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
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=self.pool_size)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["Accept"] = "application/json"
            session.headers["User-Agent"] = "mipos-worker"
            self._local.session = session
        return session

    @property
    def timeout(self) -> tuple[float, float]:
        return (self.settings.timeout_s, self.settings.timeout_s)

    def _call(self, method: str, path: str, token: str | None = None,
              body: dict[str, str] | None = None) -> Answer:
        """One HTTP call, timed; an exception becomes an answer without a status."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        started = time.perf_counter()
        try:
            response = self.session.request(
                method, self.settings.base_url + path, json=body, headers=headers,
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            return Answer.from_exception(exc, _ms_since(started))
        return Answer.from_response(response, _ms_since(started))

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
        answer = self._post(
            TOKEN_PATH,
            {
                "client_id": s.client_id,
                "client_secret": s.client_secret,
                "grant_type": "client_credentials",
                "email": s.email,
                "password": s.password,
            },
        )
        return _grant_from(answer, "token call")

    def refresh_token(self, token: str) -> TokenGrant:
        s = self.settings
        answer = self._post(
            REFRESH_PATH,
            {
                "client_id": s.client_id,
                "client_secret": s.client_secret,
                "grant_type": "refresh_token",
                "refresh_token": token,
            },
            token=token,
        )
        return _grant_from(answer, "token refresh")


def _grant_from(answer: Answer, call: str) -> TokenGrant:
    verdict = classify(answer)
    status = answer.http_status
    if status == 200 and isinstance(answer.body, dict):
        data = answer.body.get("data")
        if isinstance(data, dict) and isinstance(data.get("token"), str) and data["token"]:
            now = time.time()
            return TokenGrant(data["token"], parse_expires_in(data.get("expires_in"), now), now)
        raise TransientError(f"{call}: 200 without a token in the body", http_status=status)
    message = f"{call} failed: {verdict.error}"
    if status == 409 and verdict.error == TOKEN_MISMATCH:
        raise TokenMismatch(message, http_status=status)
    if status in (409, 422, 401):
        # Wrong credentials or account: no token until an operator fixes it.
        raise AuthError(message, http_status=status)
    if verdict.error_class is not None and verdict.error_class.value == "permanent":
        raise PermanentError(message, http_status=status)
    raise TransientError(message, http_status=status)


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 1)
