"""The sandbox mipos: the API of shared/mipos-api.md over real HTTP, with faults on demand.

Behaves as mipos does, odd parts included: the token call hands back the
current token (even an expired one) and never rotates it; refresh rotates and
kills the old token at once; a refresh with a token that is no longer current
answers ``Token Mismatch.``; ``expires_in`` is a string holding a Unix time.

Control endpoints under ``/_sandbox/`` let tests and demos program faults per
order, read every request received, and change the token lifetime or latency.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import socket
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

PENDING_WINDOW_S = 600.0  # mipos lists an order as pending for 10 minutes
MAX_RECORDED_REQUESTS = 200_000

ACCEPT_PATH = "/api/v1/integration/order/accept"
DENY_PATH = "/api/v1/integration/order/deny"
TOKEN_PATH = "/api/oauth/token"
REFRESH_PATH = "/api/oauth/token/refresh"
ORDERS_PATH = re.compile(r"^/api/v1/orders/(?P<store_id>[^/]+)$")

ORDER_FIELDS = ("delivery_id", "store_id", "order_external_id")
RANDOM_FAULTS: dict[str, dict[str, Any]] = {
    "unable_to_get_token": {"status": 409, "message": "Unable to get token."},
    "http_500": {"status": 500, "message": "Server Error"},
    "timeout": {"delay_s": None},  # delay filled from config.timeout_delay_s
    "drop": {"drop": True},
}


@dataclass
class SandboxConfig:
    token_ttl_s: float = 3600.0
    latency_ms: float = 0.0
    expires_in_format: str = "absolute"  # absolute | relative | missing
    fault_rates: dict[str, float] = field(default_factory=dict)
    timeout_delay_s: float = 15.0
    credentials: dict[str, str] = field(default_factory=dict)


@dataclass
class OrderRecord:
    store_id: str
    order_external_id: str
    delivery_id: str
    accepted: int = 0
    denied: int = 0
    deny_messages: list[str] = field(default_factory=list)


class SandboxState:
    """Everything the sandbox knows; one lock, never held while sleeping."""

    def __init__(self, config: SandboxConfig) -> None:
        self.initial = config
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with getattr(self, "lock", threading.Lock()):
            self.config = SandboxConfig(**{**asdict(self.initial),
                                           "fault_rates": dict(self.initial.fault_rates),
                                           "credentials": dict(self.initial.credentials)})
            self.token: str | None = None
            self.token_expires_at = 0.0
            self.faults: dict[str, deque[dict[str, Any]]] = {}
            self.requests: list[dict[str, Any]] = []
            self.orders: dict[str, OrderRecord] = {}
            self.pending: dict[str, dict[str, Any]] = {}
            self.stats = {"token_calls": 0, "refresh_calls": 0, "rotations": 0,
                          "accept_calls": 0, "deny_calls": 0}
            self.seq = 0

    # -- tokens -----------------------------------------------------------

    def mint(self, now: float) -> None:
        self.token = secrets.token_urlsafe(32)
        self.token_expires_at = now + self.config.token_ttl_s

    def token_valid(self, authorization: str | None, now: float) -> bool:
        if not authorization or not authorization.startswith("Bearer "):
            return False
        return authorization[7:] == self.token and now < self.token_expires_at

    def token_data(self, now: float) -> dict[str, Any]:
        data: dict[str, Any] = {"token": self.token, "token_type": "bearer"}
        fmt = self.config.expires_in_format
        if fmt == "absolute":
            data["expires_in"] = str(int(self.token_expires_at))
        elif fmt == "relative":
            data["expires_in"] = str(max(0, int(self.token_expires_at - now)))
        return data

    # -- faults -------------------------------------------------------------

    def take_fault(self, order_external_id: str) -> dict[str, Any] | None:
        queue = self.faults.get(order_external_id)
        if queue:
            fault = queue[0]
            times = int(fault.get("times", 1))
            if times == 1:
                queue.popleft()
            elif times > 1:
                fault["times"] = times - 1
            return fault
        for name, rate in self.config.fault_rates.items():
            if name in RANDOM_FAULTS and rate > 0 and random.random() < rate:
                fault = dict(RANDOM_FAULTS[name])
                if "delay_s" in fault:
                    fault["delay_s"] = self.config.timeout_delay_s
                fault["random"] = name
                return fault
        return None

    def record(self, entry: dict[str, Any]) -> dict[str, Any]:
        self.seq += 1
        entry["seq"] = self.seq
        if len(self.requests) < MAX_RECORDED_REQUESTS:
            self.requests.append(entry)
        return entry


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


def _conflict(message: str) -> tuple[int, Any]:
    return 409, {"message": [message], "data": None}


def _required(field_name: str) -> str:
    return f"The {field_name.replace('_', ' ')} field is required."


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: SandboxServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.server.verbose:
            super().log_message(format, *args)

    # -- plumbing -----------------------------------------------------------

    def _read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def _send(self, status: int, body: Any = None, *, raw: str | None = None,
              headers: dict[str, str] | None = None) -> None:
        payload = raw.encode() if raw is not None else _json_bytes(body)
        self.send_response(status)
        self.send_header("Content-Type", "text/html" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        body = self._read_body() if method == "POST" else None
        if url.path.startswith("/_sandbox/"):
            status, payload = self._control(method, url.path, parse_qs(url.query), body)
            self._send(status, payload)
            return
        self._mipos(method, url.path, body)

    # -- the mipos API ----------------------------------------------------------

    def _mipos(self, method: str, path: str, body: Any) -> None:
        state = self.server.state
        latency = state.config.latency_ms
        if latency > 0:
            time.sleep(latency / 1000.0)
        now = time.time()
        auth = self.headers.get("Authorization")
        entry: dict[str, Any] = {"time": now, "method": method, "path": path,
                                 "authorization": auth, "body": body, "status": None,
                                 "token_valid": None, "fault": None}
        if method == "POST" and path == TOKEN_PATH:
            status, payload = self._token_call(body, now)
        elif method == "POST" and path == REFRESH_PATH:
            status, payload = self._refresh_call(body, auth, now)
        elif method == "POST" and path in (ACCEPT_PATH, DENY_PATH):
            self._order_call(path, body, auth, entry)
            return
        elif method == "GET" and ORDERS_PATH.match(path):
            status, payload = self._pending_call(ORDERS_PATH.match(path)["store_id"], auth, entry, now)  # type: ignore[index]
        else:
            status, payload = 404, {"message": "Not Found"}
        entry["status"] = status
        with state.lock:
            state.record(entry)
        self._send(status, payload)

    def _credentials_problem(self, body: Any, fields: tuple[str, ...]) -> tuple[int, Any] | None:
        if not isinstance(body, dict):
            body = {}
        missing = {f: [_required(f)] for f in fields if not body.get(f)}
        if missing:
            return 422, missing
        creds = self.server.state.config.credentials
        if body["client_id"] != creds["client_id"]:
            return _conflict("Client id not found with this user.")
        if body["client_secret"] != creds["client_secret"]:
            return _conflict("Client secret not found with this user.")
        if "email" in fields and (body["email"] != creds["email"] or body["password"] != creds["password"]):
            return _conflict("Invalid credentials.")
        return None

    def _token_call(self, body: Any, now: float) -> tuple[int, Any]:
        state = self.server.state
        problem = self._credentials_problem(
            body, ("client_id", "client_secret", "grant_type", "email", "password"))
        with state.lock:
            state.stats["token_calls"] += 1
            if problem:
                return problem
            if state.token is None:  # the token call never rotates: only mints the first
                state.mint(now)
            return 200, {"message": "Access token.", "data": state.token_data(now)}

    def _refresh_call(self, body: Any, auth: str | None, now: float) -> tuple[int, Any]:
        state = self.server.state
        problem = self._credentials_problem(
            body, ("client_id", "client_secret", "grant_type", "refresh_token"))
        with state.lock:
            state.stats["refresh_calls"] += 1
            if problem:
                return problem
            bearer = auth[7:] if auth and auth.startswith("Bearer ") else None
            if state.token is None:
                return _conflict("Token not found with this user.")
            if bearer != state.token or body.get("refresh_token") != state.token:
                return _conflict("Token Mismatch.")
            state.mint(now)  # rotates: the old token stops working at once
            state.stats["rotations"] += 1
            return 200, {"message": "New access token.", "data": state.token_data(now)}

    def _order_call(self, path: str, body: Any, auth: str | None, entry: dict[str, Any]) -> None:
        state = self.server.state
        deny = path == DENY_PATH
        body_dict = body if isinstance(body, dict) else {}
        order_id = str(body_dict.get("order_external_id", ""))
        with state.lock:
            state.stats["deny_calls" if deny else "accept_calls"] += 1
            valid = state.token_valid(auth, entry["time"])
            entry["token_valid"] = valid
            fault = state.take_fault(order_id) if valid else None
            if fault:
                entry["fault"] = fault.get("random") or _describe(fault)
            state.record(entry)
        if not valid:
            entry["status"] = 401
            self._send(401, "Unauthorized.")
            return
        if fault and fault.get("delay_s"):
            time.sleep(float(fault["delay_s"]))
        if fault and fault.get("drop"):
            self._drop()
            return
        if fault and fault.get("status") is not None:
            status, payload, raw = _fault_answer(fault)
            entry["status"] = status
            headers = {"Retry-After": str(int(fault["retry_after"]))} if "retry_after" in fault else {}
            self._send(status, payload, raw=raw, headers=headers)
            return
        if fault and fault.get("apply") is False:
            self._drop()
            return
        status, payload = self._apply(body_dict, deny)
        entry["status"] = status
        self._send(status, payload)

    def _apply(self, body: dict[str, Any], deny: bool) -> tuple[int, Any]:
        fields = ORDER_FIELDS + (("message",) if deny else ())
        errors: dict[str, list[str]] = {}
        for f in fields:
            value = body.get(f)
            if value is None or value == "":
                errors[f] = [_required(f)]
            elif not isinstance(value, str):
                errors[f] = [f"The {f.replace('_', ' ')} must be a string."]
        if errors:
            return 422, errors
        state = self.server.state
        key = f"{body['store_id']}/{body['order_external_id']}"
        with state.lock:
            record = state.orders.setdefault(
                key, OrderRecord(body["store_id"], body["order_external_id"], body["delivery_id"]))
            if deny:
                record.denied += 1
                record.deny_messages.append(body["message"])
            else:
                record.accepted += 1
            state.pending.pop(key, None)
        return 200, {"message": ["Operation completed successfully"], "data": None}

    def _pending_call(self, store_id: str, auth: str | None, entry: dict[str, Any],
                      now: float) -> tuple[int, Any]:
        state = self.server.state
        with state.lock:
            entry["token_valid"] = state.token_valid(auth, now)
            if not entry["token_valid"]:
                return 401, "Unauthorized."
            orders = [o for o in state.pending.values()
                      if o["store_id"] == store_id and now - o["_created"] < PENDING_WINDOW_S]
            known = any(o["store_id"] == store_id for o in state.pending.values()) or any(
                r.store_id == store_id for r in state.orders.values())
        if not known:
            return _conflict("Store not found.")
        data = [{k: v for k, v in o.items() if not k.startswith("_")} for o in orders]
        return 200, {"message": "Orders.", "data": data}

    # -- control ------------------------------------------------------------

    def _control(self, method: str, path: str, query: dict[str, list[str]],
                 body: Any) -> tuple[int, Any]:
        state = self.server.state
        body = body if isinstance(body, dict) else {}
        name = path[len("/_sandbox/"):]
        if method == "GET" and name == "health":
            return 200, {"ok": True}
        if method == "POST" and name == "reset":
            state.reset()
            return 200, {"ok": True}
        if method == "POST" and name == "config":
            with state.lock:
                for key, value in body.items():
                    if key in ("token_ttl_s", "latency_ms", "timeout_delay_s"):
                        setattr(state.config, key, float(value))
                    elif key == "expires_in_format" and value in ("absolute", "relative", "missing"):
                        state.config.expires_in_format = value
                    elif key == "fault_rates" and isinstance(value, dict):
                        state.config.fault_rates = {k: float(v) for k, v in value.items()}
                    else:
                        return 400, {"error": f"unknown or bad config key {key!r}"}
                config = asdict(state.config)
            config.pop("credentials")
            return 200, config
        if method == "POST" and name == "expire-token":
            with state.lock:
                state.token_expires_at = time.time() - 1
            return 200, {"ok": True}
        if method == "POST" and name == "faults":
            order_id = body.get("order_external_id")
            faults = body.get("faults")
            if not order_id or not isinstance(faults, list):
                return 400, {"error": "need order_external_id and a list of faults"}
            with state.lock:
                state.faults.setdefault(str(order_id), deque()).extend(dict(f) for f in faults)
            return 200, {"ok": True}
        if method == "POST" and name == "deliver":
            return self._deliver(body)
        if method == "GET" and name == "requests":
            order_id = (query.get("order_external_id") or [None])[0]
            wanted_path = (query.get("path") or [None])[0]
            with state.lock:
                found = [
                    dict(r) for r in state.requests
                    if (order_id is None or (isinstance(r["body"], dict)
                                             and r["body"].get("order_external_id") == order_id))
                    and (wanted_path is None or r["path"] == wanted_path)
                ]
            return 200, {"requests": found}
        if method == "GET" and name == "stats":
            with state.lock:
                stats = dict(state.stats)
                stats["accepted_orders"] = sum(1 for r in state.orders.values() if r.accepted)
                stats["denied_orders"] = sum(1 for r in state.orders.values() if r.denied)
                stats["current_token_expires_at"] = state.token_expires_at if state.token else None
            return 200, stats
        if method == "GET" and name == "orders":
            with state.lock:
                orders = {k: asdict(v) for k, v in state.orders.items()}
            return 200, {"orders": orders}
        return 404, {"error": f"no control endpoint {method} {path}"}

    def _deliver(self, body: dict[str, Any]) -> tuple[int, Any]:
        missing = [f for f in ("store_id", "delivery_id", "external_id") if body.get(f) in (None, "")]
        if missing:
            return 400, {"error": f"missing {', '.join(missing)}"}
        created = float(body.get("created_at") or time.time())
        order = {
            "external_id": str(body["external_id"]),
            "store_id": str(body["store_id"]),
            "delivery_id": body["delivery_id"],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
            "order_number": body.get("order_number", ""),
            "total": body.get("total", 0),
            "items": [],
            "_created": created,
        }
        with self.server.state.lock:
            self.server.state.pending[f"{order['store_id']}/{order['external_id']}"] = order
        return 200, {"ok": True}


def _describe(fault: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in fault.items() if k != "times"]
    return ",".join(parts)


def _fault_answer(fault: dict[str, Any]) -> tuple[int, Any, str | None]:
    status = int(fault["status"])
    if "raw_body" in fault:
        return status, None, str(fault["raw_body"])
    if "body" in fault:
        return status, fault["body"], None
    message = fault.get("message")
    if status == 401:
        return status, "Unauthorized.", None
    if status == 409:
        return status, {"message": [message or "Conflict."], "data": None}, None
    if status == 422:
        return status, {"delivery_id": [_required("delivery_id")]}, None
    return status, {"message": message or HTTPStatus(status).phrase}, None


class SandboxServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], config: SandboxConfig, verbose: bool = False) -> None:
        self.state = SandboxState(config)
        self.verbose = verbose
        super().__init__(address, Handler)


def make_server(host: str, port: int, config: SandboxConfig, verbose: bool = False) -> SandboxServer:
    return SandboxServer((host, port), config, verbose)
