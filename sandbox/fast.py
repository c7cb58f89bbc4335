"""A fast serving mode of the sandbox, for throughput benchmarks: ``python -m sandbox --fast``.

One asyncio event loop parses HTTP/1.1 itself, so a request costs a small part of
what ``sandbox/server.py`` spends on it, and the server is not what a benchmark
measures. The semantics a worker sees are the same for the calls it makes on the
happy path: the token call hands back the current token and never rotates it,
refresh rotates, accept and deny need a valid bearer token (401 ``Unauthorized.``
otherwise), need their fields as strings (422), and answer success. The fault
machinery and the pending list's API call are left out.

Strict mode (``--strict``, config ``strict``) is the full sandbox's: an accept or
deny of an order that is not pending (never delivered through ``/_sandbox/deliver``,
already accepted or denied, older than the 10-minute window) answers 409
``Order not found.`` and changes nothing. A modelling choice, as there: mipos's
documentation does not say what such a call gets. Each accept or deny costs one
dict operation on the pending orders in either mode (popping its key).

Controls: ``GET /_sandbox/health``, ``POST /_sandbox/reset``, ``POST /_sandbox/config``
(``latency_ms``, ``token_ttl_s``, ``strict``), ``POST /_sandbox/deliver`` (as the full
sandbox's), ``GET /_sandbox/stats`` (counters only, O(1), cheap enough to poll
during a measured run) and ``GET /_sandbox/requests`` (accept/deny requests: time
of arrival, path, status, body), to read afterwards.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sandbox.server import (
    ACCEPT_PATH,
    DENY_FIELDS,
    DENY_PATH,
    ORDER_FIELDS,
    ORDER_NOT_FOUND,
    PENDING_WINDOW_S,
    REFRESH_FIELDS,
    REFRESH_PATH,
    SUCCESS,
    TOKEN_FIELDS,
    TOKEN_PATH,
    UNAUTHORIZED,
    bearer_of,
    client_problem,
    conflict,
    delivered_order,
    missing_fields,
    order_field_errors,
)

Answer = tuple[int, Any]
CONTROL_PREFIX = "/_sandbox/"
MAX_HEADER_BYTES = 64 * 1024
MAX_RECORDED_REQUESTS = 500_000
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           409: "Conflict", 422: "Unprocessable Content"}


class FastState:
    def __init__(self, credentials: dict[str, str], token_ttl_s: float, latency_ms: float,
                 strict: bool = False) -> None:
        self.credentials = credentials
        self.initial = (token_ttl_s, latency_ms, strict)
        self.clear()

    def clear(self) -> None:
        self.token_ttl_s, self.latency_ms, self.strict = self.initial
        self.pending: dict[str, float] = {}  # "store/order" -> when it was created (Unix time)
        self.token: str | None = None
        self.token_expires_at = 0.0
        self.accepted: set[str] = set()
        self.denied: set[str] = set()
        self.requests: list[tuple[float, str, int, Any]] = []
        self.counters = {"token_calls": 0, "refresh_calls": 0, "rotations": 0,
                         "accept_calls": 0, "deny_calls": 0}

    def _mint(self, now: float) -> dict[str, Any]:
        if self.token is None:
            self.token = secrets.token_urlsafe(32)
            self.token_expires_at = now + self.token_ttl_s
        return {"token": self.token, "token_type": "bearer",
                "expires_in": str(int(self.token_expires_at))}

    def token_call(self, body: dict[str, Any], now: float) -> Answer:
        self.counters["token_calls"] += 1
        problem = missing_fields(body, TOKEN_FIELDS) or None
        if problem:
            return 422, problem
        client = client_problem(self.credentials, body)
        if client:
            return client
        if (body["email"], body["password"]) != (self.credentials.get("email"),
                                                 self.credentials.get("password")):
            return conflict("Invalid credentials.")
        return 200, {"message": "Access token.", "data": self._mint(now)}

    def refresh_call(self, body: dict[str, Any], authorization: str | None, now: float) -> Answer:
        self.counters["refresh_calls"] += 1
        problem = missing_fields(body, REFRESH_FIELDS) or None
        if problem:
            return 422, problem
        client = client_problem(self.credentials, body)
        if client:
            return client
        current = self.token
        if current is None or bearer_of(authorization) != current or body["refresh_token"] != current:
            return conflict("Token Mismatch.")
        self.token = None
        self.counters["rotations"] += 1
        return 200, {"message": "New access token.", "data": self._mint(now)}

    def order_call(self, deny: bool, body: dict[str, Any], authorization: str | None,
                   now: float) -> Answer:
        self.counters["deny_calls" if deny else "accept_calls"] += 1
        token = bearer_of(authorization)
        if token is None or token != self.token or now >= self.token_expires_at:
            return 401, UNAUTHORIZED
        errors = order_field_errors(body, DENY_FIELDS if deny else ORDER_FIELDS)
        if errors:
            return 422, errors
        key = f"{body['store_id']}/{body['order_external_id']}"
        created = self.pending.pop(key, None)  # the one lookup strict mode costs
        if self.strict and (created is None or now - created >= PENDING_WINDOW_S):
            return conflict(ORDER_NOT_FOUND)
        (self.denied if deny else self.accepted).add(key)
        return 200, SUCCESS

    def record(self, arrived: float, path: str, status: int, body: Any) -> None:
        if len(self.requests) < MAX_RECORDED_REQUESTS:
            self.requests.append((arrived, path, status, body))

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "accepted_orders": len(self.accepted),
                "denied_orders": len(self.denied),
                "current_token_expires_at": self.token_expires_at if self.token else None}

    def control(self, method: str, name: str, query: str, body: Any) -> Answer:
        if (method, name) == ("GET", "health"):
            return 200, {"ok": True}
        if (method, name) == ("GET", "stats"):
            return 200, self.stats()
        if (method, name) == ("POST", "reset"):
            self.clear()
            return 200, {"ok": True}
        if (method, name) == ("POST", "config"):
            return self.configure(body if isinstance(body, dict) else {})
        if (method, name) == ("POST", "deliver"):
            order = delivered_order(body if isinstance(body, dict) else {})
            if isinstance(order, str):
                return 400, {"error": order}
            self.pending[f"{order['store_id']}/{order['external_id']}"] = order["_created"]
            return 200, {"ok": True}
        if (method, name) == ("GET", "requests"):
            wanted = parse_qs(query)
            path = wanted["path"][0] if wanted.get("path") else None
            order = wanted["order_external_id"][0] if wanted.get("order_external_id") else None
            return 200, {"requests": [
                {"time": t, "path": p, "status": s, "body": b} for t, p, s, b in self.requests
                if (path is None or p == path)
                and (order is None or (isinstance(b, dict) and b.get("order_external_id") == order))]}
        return 404, {"error": f"no control endpoint {method} {CONTROL_PREFIX}{name} in the fast sandbox"}

    def configure(self, changes: dict[str, Any]) -> Answer:
        """``POST /_sandbox/config``: all the changes or, if one is bad, none."""
        for key, value in changes.items():
            if key == "strict":
                if not isinstance(value, bool):
                    return 400, {"error": "strict must be true or false"}
            elif key not in ("latency_ms", "token_ttl_s") or isinstance(value, bool) \
                    or not isinstance(value, (int, float)) or value < 0:
                return 400, {"error": "the fast sandbox takes latency_ms and token_ttl_s "
                                      f"(non-negative numbers) and strict, not {key!r}={value!r}"}
        for key, value in changes.items():
            setattr(self, key, value if key == "strict" else float(value))
        return 200, {"latency_ms": self.latency_ms, "token_ttl_s": self.token_ttl_s,
                     "strict": self.strict}

    def answer(self, method: str, target: str, headers: dict[str, str], raw: bytes,
               arrived: float) -> Answer:
        url = urlsplit(target)
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        if url.path.startswith(CONTROL_PREFIX):
            return self.control(method, url.path[len(CONTROL_PREFIX):], url.query, body)
        fields = body if isinstance(body, dict) else {}
        now = time.time()
        authorization = headers.get("authorization")
        if method == "POST" and url.path in (ACCEPT_PATH, DENY_PATH):
            status, payload = self.order_call(url.path == DENY_PATH, fields, authorization, now)
            self.record(arrived, url.path, status, body)
            return status, payload
        if method == "POST" and url.path == TOKEN_PATH:
            return self.token_call(fields, now)
        if method == "POST" and url.path == REFRESH_PATH:
            return self.refresh_call(fields, authorization, now)
        return 404, {"message": "Not Found."}


class Connection(asyncio.Protocol):
    """One client connection: requests answered in order, keep-alive unless asked to close."""

    def __init__(self, state: FastState) -> None:
        self.state = state
        self.buffer = b""
        self.busy = False  # an answer is waiting for its latency
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._serve()

    def _serve(self) -> None:
        while not self.busy and self.transport is not None and not self.transport.is_closing():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEADER_BYTES:
                    self.transport.close()
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            try:
                method, target, _ = head[0].split(" ", 2)
            except ValueError:
                self.transport.close()
                return
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length") or 0)
            if len(self.buffer) < end + 4 + length:
                return
            raw = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            arrived = time.time()
            close = headers.get("connection", "").lower() == "close"
            latency = self.state.latency_ms / 1000 if not target.startswith(CONTROL_PREFIX) else 0.0
            if latency > 0:
                self.busy = True
                asyncio.get_running_loop().call_later(
                    latency, self._finish, method, target, headers, raw, arrived, close)
                return
            self._respond(*self.state.answer(method, target, headers, raw, arrived), close)

    def _finish(self, method: str, target: str, headers: dict[str, str], raw: bytes,
                arrived: float, close: bool) -> None:
        self.busy = False
        if self.transport is None or self.transport.is_closing():
            return
        self._respond(*self.state.answer(method, target, headers, raw, arrived), close)
        self._serve()

    def _respond(self, status: int, payload: Any, close: bool) -> None:
        assert self.transport is not None
        data = json.dumps(payload).encode()
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n")
        if close:
            head += "Connection: close\r\n"
        self.transport.write(head.encode() + b"\r\n" + data)
        if close:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def _serve_forever(host: str, port: int, state: FastState) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(state), host, port, backlog=1024,
                                      reuse_address=True)
    address = server.sockets[0].getsockname()
    print(f"sandbox mipos (fast) listening on http://{address[0]}:{address[1]}", flush=True)
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    async with server:
        await stopped.wait()


def serve_fast(host: str, port: int, credentials: dict[str, str], token_ttl_s: float,
               latency_ms: float, strict: bool = False) -> int:
    try:
        asyncio.run(_serve_forever(host, port, FastState(credentials, token_ttl_s, latency_ms,
                                                         strict)))
    except OSError as exc:
        print(f"sandbox mipos: cannot listen on {host}:{port}: {exc}", flush=True)
        return 1
    return 0
