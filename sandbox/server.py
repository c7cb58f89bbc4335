"""The sandbox mipos: the API of shared/mipos-api.md over real HTTP, with faults on demand.

Behaves as mipos does, odd parts included: the token call hands back the
current token (even an expired one) and never rotates it; refresh rotates and
kills the old token at once; a refresh with a token that is no longer current
answers ``Token Mismatch.``; ``expires_in`` is a string holding a Unix time.

Control endpoints under ``/_sandbox/`` let tests and benchmarks program faults,
read every request received, and change the token lifetime or latency.

Faults (``POST /_sandbox/faults``) queue up per *target*, first in first out:

- ``order:<order_external_id>`` (or the body field ``order_external_id``): the
  accept and deny calls of that order, taken only with a valid token;
- ``token``: the token call; ``refresh``: the refresh call;
- ``pending:<store_id>``: the pending list of that store, taken only with a valid token.

A fault is an object with any of: ``status`` (answer with it; ``body`` is the JSON
to send, ``raw_body`` a non-JSON text, else a body typical of the status),
``retry_after``, ``delay_s`` (hold the request first), ``drop`` (close without a
word, nothing done), ``apply: false`` (do nothing, then drop), ``trickle_s`` (send
the status line and headers, then the body one byte every ``trickle_s`` seconds),
``reset`` (read the request, do it unless ``apply`` is false, then reset the
connection: an RST, not a FIN), ``land_after_s`` (below) and ``times`` (how many
requests it hits, -1: all).

Landing. A request *lands* when mipos applies it (the order is accepted or
denied, or refused: see strict mode). Without ``land_after_s`` a request lands
when its ``delay_s`` ends and is answered right after; a ``drop``, a ``status``
or ``apply: false`` never lands. ``land_after_s`` (accept/deny faults only)
lands it that many seconds after it *arrived* (the log entry's ``time``),
whether and whenever it is answered: ``{"delay_s": 5, "land_after_s": 2}`` lands
at 2 s and answers at 5 s with what the landing gave; ``{"land_after_s": 2,
"drop": true}`` closes the connection at once and lands at 2 s; with ``status``
or ``reset`` the fault's answer goes out at ``delay_s`` and the request lands
anyway. A landing later than the answer happens in a timer thread, and the
answer is then the one the request *would* get landing at answer time (200 when
lenient; when strict, 409 ``Order not found.`` unless the order is pending at
answer time); it lands later anyway. ``land_after_s`` with ``apply: false`` is
refused. The config key ``timeout_land_after_s`` gives the random ``timeout``
fault a ``land_after_s`` (null: it lands when ``timeout_delay_s`` ends). A reset
(``/_sandbox/reset``) cancels the timer landings still waiting. Each log entry
(``/_sandbox/requests``) says when the request landed (``landed_at``, a Unix
time, null if it has not or never will), what the landing answered
(``landed_status``) and whether it changed the order (``applied``; for token,
refresh and pending-list calls: whether they answered 200).

Strict mode (config ``strict``, ``python -m sandbox --strict``). mipos's
documentation does not say what an accept or deny of an order it no longer
lists gets back: an order already accepted or denied, one never delivered, or
one older than the 10-minute pending window. Answering it is a *modelling
choice*, not documented behaviour. Lenient (the default) answers 200 and counts
it again, as before. Strict answers ``409 {"message": ["Order not found."],
"data": null}`` (the documented permanent answer that fits) and changes nothing.
So under strict mode only an order put in the pending list (``/_sandbox/deliver``)
can be accepted or denied, once: the first accept or deny succeeds and removes
it from the list; any later one is ``Order not found.``. The decision is taken
when the request lands (the order must still be pending then).
"""

from __future__ import annotations

import json
import math
import random
import re
import secrets
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

PENDING_WINDOW_S = 600.0  # mipos lists an order as pending for 10 minutes
MAX_RECORDED_REQUESTS = 500_000  # a bound on memory for very long benchmark runs

TOKEN_PATH = "/api/oauth/token"
REFRESH_PATH = "/api/oauth/token/refresh"
ACCEPT_PATH = "/api/v1/integration/order/accept"
DENY_PATH = "/api/v1/integration/order/deny"
ORDERS_PATH = re.compile(r"^/api/v1/orders(?:/(?P<store_id>[^/]*))?/?$")
CONTROL_PREFIX = "/_sandbox/"

TOKEN_FIELDS = ("client_id", "client_secret", "grant_type", "email", "password")
REFRESH_FIELDS = ("client_id", "client_secret", "grant_type", "refresh_token")
ORDER_FIELDS = ("delivery_id", "store_id", "order_external_id")
DENY_FIELDS = ORDER_FIELDS + ("message",)
EXPIRES_IN_FORMATS = ("absolute", "relative", "missing")
UNAUTHORIZED = "Unauthorized."
SUCCESS = {"message": ["Operation completed successfully"], "data": None}
ORDER_NOT_FOUND = "Order not found."  # strict mode's answer to an order mipos no longer lists

# What each kind of `fault_rates` entry does to an accept/deny request.
RANDOM_FAULTS: dict[str, dict[str, Any]] = {
    "unable_to_get_token": {"status": 409, "message": "Unable to get token."},
    "http_500": {"status": 500, "message": "Server Error"},
    "timeout": {},  # delay_s from config.timeout_delay_s, land_after_s from timeout_land_after_s
    "drop": {"drop": True},
}
FAULT_KEYS = {"status", "message", "body", "raw_body", "retry_after", "delay_s", "drop",
              "times", "apply", "trickle_s", "reset", "land_after_s"}
CALL_TARGETS = ("token", "refresh")  # fault targets besides order:<id> and pending:<store_id>

Json = Any
Answer = tuple[int, Json]


@dataclass
class SandboxConfig:
    token_ttl_s: float = 3600.0
    latency_ms: float = 0.0
    expires_in_format: str = "absolute"  # absolute | relative | missing
    fault_rates: dict[str, float] = field(default_factory=dict)
    timeout_delay_s: float = 15.0
    credentials: dict[str, str] = field(default_factory=dict)
    expires_in_fixed: str | None = None  # when set, every token answer says exactly this
    strict: bool = False  # 409 Order not found. for an order no longer pending (module docstring)
    timeout_land_after_s: float | None = None  # the random timeout lands then; None: when it answers

    def copy(self) -> SandboxConfig:
        return SandboxConfig(**{**asdict(self), "fault_rates": dict(self.fault_rates),
                                "credentials": dict(self.credentials)})

    def public(self) -> dict[str, Any]:
        """The settings ``/_sandbox/config`` can change (the account is fixed)."""
        data = asdict(self)
        data.pop("credentials")
        return data


@dataclass
class OrderRecord:
    store_id: str
    order_external_id: str
    delivery_id: str
    accepted: int = 0
    denied: int = 0
    deny_messages: list[str] = field(default_factory=list)


@dataclass
class OrderCall:
    """What the handler needs to finish an accept/deny request after the locked part."""

    entry: dict[str, Any]
    token_valid: bool
    fault: dict[str, Any] | None


# -- small pure helpers ---------------------------------------------------------


def conflict(message: str) -> Answer:
    return 409, {"message": [message], "data": None}


def required(field_name: str) -> str:
    return f"The {field_name.replace('_', ' ')} field is required."


def must_be_string(field_name: str) -> str:
    return f"The {field_name.replace('_', ' ')} must be a string."


def bearer_of(authorization: str | None) -> str | None:
    if authorization and authorization.startswith("Bearer "):
        return authorization[len("Bearer "):].strip() or None
    return None


def missing_fields(body: dict[str, Any], fields: tuple[str, ...]) -> dict[str, list[str]]:
    return {f: [required(f)] for f in fields if body.get(f) in (None, "")}


def order_field_errors(body: dict[str, Any], fields: tuple[str, ...]) -> dict[str, list[str]]:
    errors: dict[str, list[str]] = {}
    for name in fields:
        value = body.get(name)
        if value is None or value == "":
            errors[name] = [required(name)]
        elif not isinstance(value, str):
            errors[name] = [must_be_string(name)]
    return errors


def client_problem(credentials: dict[str, str], body: dict[str, Any]) -> Answer | None:
    """mipos's answer to a token or refresh call whose client id or secret is wrong."""
    if body["client_id"] != credentials.get("client_id"):
        return conflict("Client id not found with this user.")
    if body["client_secret"] != credentials.get("client_secret"):
        return conflict("Client secret not found with this user.")
    return None


def fault_problem(fault: Any, target: str = "order:") -> str | None:
    """Why a programmed fault (for ``target``) is unusable, or None when it is fine."""
    if not isinstance(fault, dict):
        return "a fault must be a JSON object"
    unknown = set(fault) - FAULT_KEYS
    if unknown:
        return f"unknown fault keys {sorted(unknown)}"
    times = fault.get("times", 1)
    if not isinstance(times, int) or isinstance(times, bool) or not (times >= 1 or times == -1):
        return "times must be a positive integer or -1"
    if "status" in fault and (not isinstance(fault["status"], int) or not 100 <= fault["status"] <= 599):
        return "status must be an integer HTTP status"
    for key in ("delay_s", "retry_after", "trickle_s", "land_after_s"):
        if key in fault and (not _is_number(fault[key]) or fault[key] < 0):
            return f"{key} must be a non-negative number"
    if "raw_body" in fault and not isinstance(fault["raw_body"], str):
        return "raw_body must be a string"
    for key in ("reset", "drop", "apply"):
        if key in fault and not isinstance(fault[key], bool):
            return f"{key} must be true or false"
    if fault.get("reset") and (fault.get("drop") or "status" in fault):
        return "reset goes with neither drop nor status (it answers nothing)"
    return landing_problem(fault, target)


def landing_problem(fault: dict[str, Any], target: str) -> str | None:
    """Why a fault's ``land_after_s`` is unusable: it lands an accept or deny, so it is
    for ``order:`` targets only and contradicts ``apply: false`` (never land)."""
    if "land_after_s" not in fault:
        return None
    if not target.startswith("order:"):
        return "land_after_s is for accept/deny faults only (order:<order_external_id>)"
    if fault.get("apply") is False:
        return ("land_after_s lands the request, apply: false never does: "
                "use one or the other")
    return None


def target_problem(target: Any) -> str | None:
    """Why a fault target is unusable, or None when it is fine."""
    if not isinstance(target, str):
        return "target must be a string"
    kind, _, rest = target.partition(":")
    if target in CALL_TARGETS or (kind in ("order", "pending") and rest):
        return None
    return (f"unknown fault target {target!r}: use order:<order_external_id>, "
            f"{', '.join(CALL_TARGETS)} or pending:<store_id>")


def describe_fault(fault: dict[str, Any]) -> str:
    if "random" in fault:
        return f"random:{fault['random']}"
    return ",".join(f"{k}={v}" for k, v in fault.items() if k != "times")


def fault_answer(fault: dict[str, Any]) -> tuple[int, Json, str | None]:
    """(status, JSON body, raw text body) of a fault that carries a status."""
    status = int(fault["status"])
    if "raw_body" in fault:
        return status, None, str(fault["raw_body"])
    if "body" in fault:
        return status, fault["body"], None
    message = fault.get("message")
    if status == 401:
        return status, UNAUTHORIZED, None
    if status == 409:
        return status, {"message": [message or "Conflict."], "data": None}, None
    if status == 422:
        return status, {"delivery_id": [required("delivery_id")]}, None
    return status, {"message": message or _phrase(status)}, None


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def iso8601(unix_time: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_time))


# -- the shared state -------------------------------------------------------------


class SandboxState:
    """Everything the sandbox knows. One lock; callers never sleep while holding it."""

    def __init__(self, config: SandboxConfig) -> None:
        self.initial = config.copy()
        self.lock = threading.Lock()
        with self.lock:
            self._clear()

    def _clear(self) -> None:
        self.config = self.initial.copy()
        self.token: str | None = None
        self.token_expires_at = 0.0
        self.faults: dict[str, deque[dict[str, Any]]] = {}
        self.requests: list[dict[str, Any]] = []
        self.orders: dict[str, OrderRecord] = {}
        self.pending: dict[str, dict[str, Any]] = {}
        self.stores: set[str] = set()
        self.counters = {"token_calls": 0, "refresh_calls": 0, "rotations": 0,
                         "accept_calls": 0, "deny_calls": 0}
        self.seq = 0
        self.generation = getattr(self, "generation", 0) + 1  # timer landings of older ones are dropped

    def reset(self) -> None:
        with self.lock:
            self._clear()

    def latency_s(self) -> float:
        with self.lock:
            return max(0.0, self.config.latency_ms) / 1000.0

    # -- request record (callers hold the lock) ---------------------------------

    def _record(self, entry: dict[str, Any]) -> None:
        self.seq += 1
        entry["seq"] = self.seq
        if len(self.requests) < MAX_RECORDED_REQUESTS:
            self.requests.append(entry)

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self._record(entry)

    def set_status(self, entry: dict[str, Any], status: int | None) -> None:
        with self.lock:
            entry["status"] = status

    def set_landing(self, entry: dict[str, Any], landed_at: float, status: int) -> None:
        with self.lock:
            entry["landed_at"] = landed_at
            entry["landed_status"] = status
            entry["applied"] = status == 200

    def land_later(self, at: float, land: Callable[[], object]) -> None:
        """Run ``land`` at Unix time ``at`` in a timer thread, unless a reset comes first."""
        with self.lock:
            generation = self.generation

        def fire() -> None:
            with self.lock:
                if self.generation != generation:
                    return
            land()

        timer = threading.Timer(max(0.0, at - time.time()), fire)
        timer.daemon = True
        timer.start()

    # -- tokens (callers hold the lock) -------------------------------------------

    def _mint(self, now: float) -> None:
        self.token = secrets.token_urlsafe(32)
        self.token_expires_at = now + self.config.token_ttl_s

    def _token_valid(self, authorization: str | None, now: float) -> bool:
        token = bearer_of(authorization)
        return token is not None and token == self.token and now < self.token_expires_at

    def _token_data(self, now: float) -> dict[str, Any]:
        data: dict[str, Any] = {"token": self.token, "token_type": "bearer"}
        if self.config.expires_in_fixed is not None:
            data["expires_in"] = self.config.expires_in_fixed
        elif self.config.expires_in_format == "absolute":
            data["expires_in"] = str(int(self.token_expires_at))
        elif self.config.expires_in_format == "relative":
            data["expires_in"] = str(max(0, int(self.token_expires_at - now)))
        return data

    def _client_problem(self, body: dict[str, Any]) -> Answer | None:
        return client_problem(self.config.credentials, body)

    # -- the mipos calls -----------------------------------------------------------

    def token_call(self, body: dict[str, Any], now: float) -> Answer:
        with self.lock:
            self.counters["token_calls"] += 1
            missing = missing_fields(body, TOKEN_FIELDS)
            if missing:
                return 422, missing
            problem = self._client_problem(body)
            if problem:
                return problem
            credentials = self.config.credentials
            if (body["email"], body["password"]) != (credentials.get("email"), credentials.get("password")):
                return conflict("Invalid credentials.")
            if self.token is None:  # never rotates: only mints when the account has none
                self._mint(now)
            return 200, {"message": "Access token.", "data": self._token_data(now)}

    def refresh_call(self, body: dict[str, Any], authorization: str | None, now: float) -> Answer:
        with self.lock:
            self.counters["refresh_calls"] += 1
            missing = missing_fields(body, REFRESH_FIELDS)
            if missing:
                return 422, missing
            problem = self._client_problem(body)
            if problem:
                return problem
            current = self.token
            if current is None or bearer_of(authorization) != current or body["refresh_token"] != current:
                return conflict("Token Mismatch.")
            self._mint(now)  # rotates: the old token stops working at once, expired or not
            self.counters["rotations"] += 1
            return 200, {"message": "New access token.", "data": self._token_data(now)}

    def begin_order_call(self, deny: bool, body: dict[str, Any], authorization: str | None,
                         entry: dict[str, Any], now: float) -> OrderCall:
        """Count, check the token, take this request's fault, and record it."""
        with self.lock:
            self.counters["deny_calls" if deny else "accept_calls"] += 1
            valid = self._token_valid(authorization, now)
            fault = self._take_order_fault(str(body.get("order_external_id") or "")) if valid else None
            entry["token_valid"] = valid
            entry["fault"] = describe_fault(fault) if fault else None
            self._record(entry)
            return OrderCall(entry, valid, fault)

    def _take_order_fault(self, order_external_id: str) -> dict[str, Any] | None:
        return self._take_fault(f"order:{order_external_id}") or self._random_fault()

    def _take_fault(self, target: str) -> dict[str, Any] | None:
        queue = self.faults.get(target)
        if queue:
            fault = dict(queue[0])
            times = int(queue[0].get("times", 1))
            if times == 1:
                queue.popleft()
            elif times > 1:
                queue[0]["times"] = times - 1
            return fault
        return None

    def begin_call(self, target: str, entry: dict[str, Any]) -> dict[str, Any] | None:
        """Take the fault of a token, refresh or pending-list call, and record the call."""
        with self.lock:
            fault = self._take_fault(target)
            entry["fault"] = describe_fault(fault) if fault else None
            self._record(entry)
            return fault

    def token_valid(self, authorization: str | None, now: float) -> bool:
        with self.lock:
            return self._token_valid(authorization, now)

    def _random_fault(self) -> dict[str, Any] | None:
        for name, rate in self.config.fault_rates.items():
            if name in RANDOM_FAULTS and rate > 0 and random.random() < rate:
                fault = {**RANDOM_FAULTS[name], "random": name}
                if name == "timeout":
                    fault["delay_s"] = self.config.timeout_delay_s
                    if self.config.timeout_land_after_s is not None:
                        fault["land_after_s"] = self.config.timeout_land_after_s
                return fault
        return None

    def _not_listed(self, key: str, now: float) -> bool:
        """Strict mode and mipos no longer lists the order (caller holds the lock)."""
        if not self.config.strict:
            return False
        order = self.pending.get(key)
        return order is None or now - order["_created"] >= PENDING_WINDOW_S

    def order_verdict(self, deny: bool, body: dict[str, Any], now: float) -> Answer:
        """What landing the call at ``now`` would answer, changing nothing (an answer
        sent before its request lands)."""
        errors = order_field_errors(body, DENY_FIELDS if deny else ORDER_FIELDS)
        if errors:
            return 422, errors
        with self.lock:
            if self._not_listed(f"{body['store_id']}/{body['order_external_id']}", now):
                return conflict(ORDER_NOT_FOUND)
        return 200, SUCCESS

    def apply_order(self, deny: bool, body: dict[str, Any], now: float) -> Answer:
        """Land an accept or deny: validate, then (strict: if still pending) record it."""
        errors = order_field_errors(body, DENY_FIELDS if deny else ORDER_FIELDS)
        if errors:
            return 422, errors
        key = f"{body['store_id']}/{body['order_external_id']}"
        with self.lock:
            if self._not_listed(key, now):
                return conflict(ORDER_NOT_FOUND)
            record = self.orders.get(key)
            if record is None:
                record = OrderRecord(body["store_id"], body["order_external_id"], body["delivery_id"])
                self.orders[key] = record
            if deny:
                record.denied += 1
                record.deny_messages.append(body["message"])
            else:
                record.accepted += 1
            self.stores.add(body["store_id"])
            self.pending.pop(key, None)
        return 200, SUCCESS

    def pending_call(self, store_id: str, now: float) -> Answer:
        with self.lock:
            if not store_id:
                return conflict("store_id is required.")
            if store_id not in self.stores:
                return conflict("Store not found.")
            orders = [{k: v for k, v in order.items() if not k.startswith("_")}
                      for order in self.pending.values()
                      if order["store_id"] == store_id and now - order["_created"] < PENDING_WINDOW_S]
        orders.sort(key=lambda order: order["created_at"])
        return 200, {"message": "Orders.", "data": orders}

    # -- control operations ----------------------------------------------------------

    def update_config(self, changes: dict[str, Any]) -> Answer:
        problem = config_problem(changes)
        if problem:
            return 400, {"error": problem}
        with self.lock:
            for key, value in changes.items():
                if key == "fault_rates":
                    self.config.fault_rates = {k: float(v) for k, v in value.items()}
                elif key in ("expires_in_format", "expires_in_fixed", "strict"):
                    setattr(self.config, key, value)
                elif key == "timeout_land_after_s":
                    self.config.timeout_land_after_s = None if value is None else float(value)
                else:
                    setattr(self.config, key, float(value))
            return 200, self.config.public()

    def expire_token(self) -> None:
        with self.lock:
            self.token_expires_at = min(self.token_expires_at, time.time())

    def add_faults(self, target: str, faults: list[dict[str, Any]], replace: bool = False) -> None:
        with self.lock:
            if replace:
                self.faults.pop(target, None)
            if faults:
                self.faults.setdefault(target, deque()).extend(dict(f) for f in faults)

    def deliver(self, order: dict[str, Any]) -> None:
        with self.lock:
            self.stores.add(order["store_id"])
            self.pending[f"{order['store_id']}/{order['external_id']}"] = order

    def recorded(self, order_external_id: str | None, path: str | None) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(r) for r in self.requests
                    if (order_external_id is None or _order_id_of(r) == order_external_id)
                    and (path is None or r["path"] == path)]

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                **self.counters,
                "accepted_orders": sum(1 for r in self.orders.values() if r.accepted),
                "denied_orders": sum(1 for r in self.orders.values() if r.denied),
                "current_token_expires_at": self.token_expires_at if self.token else None,
            }

    def order_records(self) -> dict[str, Any]:
        with self.lock:
            return {key: asdict(record) for key, record in self.orders.items()}


def _order_id_of(entry: dict[str, Any]) -> Any:
    body = entry["body"]
    return body.get("order_external_id") if isinstance(body, dict) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def config_problem(changes: dict[str, Any]) -> str | None:
    for key, value in changes.items():
        if key in ("token_ttl_s", "latency_ms", "timeout_delay_s"):
            if not _is_number(value) or value < 0:
                return f"{key} must be a non-negative number"
        elif key == "timeout_land_after_s":
            if value is not None and (not _is_number(value) or value < 0):
                return "timeout_land_after_s must be a non-negative number or null"
        elif key == "strict":
            if not isinstance(value, bool):
                return "strict must be true or false"
        elif key == "expires_in_format":
            if value not in EXPIRES_IN_FORMATS:
                return f"expires_in_format must be one of {', '.join(EXPIRES_IN_FORMATS)}"
        elif key == "expires_in_fixed":
            if value is not None and not isinstance(value, str):
                return "expires_in_fixed must be a string (what expires_in says) or null"
        elif key == "fault_rates":
            if not isinstance(value, dict):
                return "fault_rates must be an object"
            for name, rate in value.items():
                if name not in RANDOM_FAULTS:
                    return f"unknown fault rate {name!r} (known: {', '.join(RANDOM_FAULTS)})"
                if not _is_number(rate) or not 0 <= rate <= 1:
                    return f"fault rate {name!r} must be between 0 and 1"
        else:
            return f"unknown config key {key!r}"
    return None


def pending_order(body: dict[str, Any]) -> dict[str, Any]:
    """The order ``/_sandbox/deliver`` describes, as ``GET /api/v1/orders`` lists it."""
    created = float(body.get("created_at") or time.time())
    return {
        "external_id": str(body["external_id"]),
        "store_id": str(body["store_id"]),
        "delivery_id": int(body["delivery_id"]),
        "created_at": iso8601(created),
        "order_number": str(body.get("order_number") or f"A-{body['delivery_id']}"),
        "total": body.get("total", 0),
        "items": [],
        "_created": created,
    }


# -- control endpoints ---------------------------------------------------------------

Query = dict[str, list[str]]
ControlRoute = Callable[[SandboxState, Query, dict[str, Any]], Answer]


def _first(query: Query, name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def control_health(state: SandboxState, query: Query, body: dict[str, Any]) -> Answer:
    return 200, {"ok": True}


def control_reset(state: SandboxState, query: Query, body: dict[str, Any]) -> Answer:
    state.reset()
    return 200, {"ok": True}


def control_config(state: SandboxState, query: Query, body: dict[str, Any]) -> Answer:
    return state.update_config(body)


def control_expire_token(state: SandboxState, query: Query, body: dict[str, Any]) -> Answer:
    state.expire_token()
    return 200, {"ok": True}


def control_faults(state: SandboxState, query: Query, body: dict[str, Any]) -> Answer:
    """``{"order_external_id": ..., "faults": [...]}`` or ``{"target": ..., "faults": [...]}``."""
    order_id, faults = body.get("order_external_id"), body.get("faults")
    target = f"order:{order_id}" if isinstance(order_id, str) and order_id else body.get("target")
    if not isinstance(faults, list) or (target is None and "target" not in body):
        return 400, {"error": "need order_external_id (string) or target, and faults (list)"}
    problem = target_problem(target)
    if problem or not isinstance(target, str):
        return 400, {"error": problem}
    for fault in faults:
        problem = fault_problem(fault, target)
        if problem:
            return 400, {"error": problem, "fault": fault}
    state.add_faults(target, faults, replace=body.get("replace") is True)
    return 200, {"ok": True}


def delivered_order(body: dict[str, Any]) -> dict[str, Any] | str:
    """The order a ``/_sandbox/deliver`` body describes, or why it cannot be one."""
    missing = [f for f in ("store_id", "delivery_id", "external_id") if body.get(f) in (None, "")]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        return pending_order(body)
    except (TypeError, ValueError) as exc:
        return f"bad order: {exc}"


def control_deliver(state: SandboxState, query: Query, body: dict[str, Any]) -> Answer:
    order = delivered_order(body)
    if isinstance(order, str):
        return 400, {"error": order}
    state.deliver(order)
    return 200, {"ok": True}


def control_requests(state: SandboxState, query: Query, body: dict[str, Any]) -> Answer:
    return 200, {"requests": state.recorded(_first(query, "order_external_id"), _first(query, "path"))}


def control_stats(state: SandboxState, query: Query, body: dict[str, Any]) -> Answer:
    return 200, state.stats()


def control_orders(state: SandboxState, query: Query, body: dict[str, Any]) -> Answer:
    return 200, {"orders": state.order_records()}


CONTROL_ROUTES: dict[tuple[str, str], ControlRoute] = {
    ("GET", "health"): control_health,
    ("POST", "reset"): control_reset,
    ("POST", "config"): control_config,
    ("POST", "expire-token"): control_expire_token,
    ("POST", "faults"): control_faults,
    ("POST", "deliver"): control_deliver,
    ("GET", "requests"): control_requests,
    ("GET", "stats"): control_stats,
    ("GET", "orders"): control_orders,
}


# -- HTTP ----------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: SandboxServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.server.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_POST  # noqa: N815

    @property
    def state(self) -> SandboxState:
        return self.server.state

    # -- plumbing -------------------------------------------------------------------

    def _read_body(self) -> Json:
        """The body parsed as JSON; its text when it is not JSON; None when empty."""
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def _send(self, status: int, body: Json = None, *, raw: str | None = None,
              headers: dict[str, str] | None = None, trickle_s: float = 0.0) -> None:
        payload = raw.encode() if raw is not None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=UTF-8" if raw is not None
                         else "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if trickle_s <= 0:
            self.wfile.write(payload)
            return
        self.close_connection = True  # whatever the client makes of it, this one is done
        for index in range(len(payload)):
            self.wfile.write(payload[index:index + 1])
            if index + 1 < len(payload):
                time.sleep(trickle_s)

    def _answer(self, entry: dict[str, Any], status: int, body: Json = None, *,
                raw: str | None = None, headers: dict[str, str] | None = None,
                trickle_s: float = 0.0) -> None:
        self.state.set_status(entry, status)  # before writing: the client may ask at once
        self._send(status, body, raw=raw, headers=headers, trickle_s=trickle_s)

    def _drop(self) -> None:
        """Close the connection without a word; the client sees it closed at once."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _reset(self) -> None:
        """Abort the connection: with SO_LINGER 0, closing sends an RST (not a FIN)."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()  # it holds the socket open: the last close is the real one
            self.connection.close()
        except OSError:
            pass

    def _dispatch(self) -> None:
        arrived = time.time()
        url = urlsplit(self.path)
        try:
            body = self._read_body()
        except ValueError:
            self.close_connection = True
            self._send(400, {"message": "Bad Content-Length"})
            return
        if url.path.startswith(CONTROL_PREFIX):
            self._control(url.path[len(CONTROL_PREFIX):], parse_qs(url.query), body)
        else:
            self._mipos(url.path, body, arrived)

    def _control(self, name: str, query: Query, body: Json) -> None:
        route = CONTROL_ROUTES.get((self.command, name))
        if route is None:
            self._send(404, {"error": f"no control endpoint {self.command} {CONTROL_PREFIX}{name}"})
            return
        status, payload = route(self.state, query, body if isinstance(body, dict) else {})
        self._send(status, payload)

    # -- the mipos API ---------------------------------------------------------------

    def _mipos(self, path: str, body: Json, arrived: float) -> None:
        latency = self.state.latency_s()
        if latency > 0:
            time.sleep(latency)
        now = time.time()
        auth = self.headers.get("Authorization")
        fields = body if isinstance(body, dict) else {}
        entry: dict[str, Any] = {"time": arrived, "method": self.command, "path": path,
                                 "authorization": auth, "body": body, "status": None,
                                 "token_valid": None, "fault": None,
                                 "landed_at": None, "landed_status": None, "applied": False}
        orders_match = ORDERS_PATH.match(path)
        if self.command == "POST" and path in (ACCEPT_PATH, DENY_PATH):
            self._order_call(path == DENY_PATH, fields, auth, entry, now)
        elif self.command == "POST" and path == TOKEN_PATH:
            fault = self.state.begin_call("token", entry)
            self._with_fault(entry, fault, lambda: self.state.token_call(fields, now))
        elif self.command == "POST" and path == REFRESH_PATH:
            fault = self.state.begin_call("refresh", entry)
            self._with_fault(entry, fault, lambda: self.state.refresh_call(fields, auth, now))
        elif self.command == "GET" and orders_match:
            store_id = unquote(orders_match["store_id"] or "")
            entry["token_valid"] = self.state.token_valid(auth, now)
            if not entry["token_valid"]:
                self.state.record(entry)
                self._answer(entry, 401, UNAUTHORIZED)
                return
            fault = self.state.begin_call(f"pending:{store_id}", entry)
            self._with_fault(entry, fault, lambda: self.state.pending_call(store_id, now))
        else:
            self.state.record(entry)
            self._answer(entry, 404, {"message": "Not Found."})

    def _order_call(self, deny: bool, body: dict[str, Any], auth: str | None,
                    entry: dict[str, Any], now: float) -> None:
        call = self.state.begin_order_call(deny, body, auth, entry, now)
        if not call.token_valid:
            self._answer(entry, 401, UNAUTHORIZED)
            return
        self._with_fault(entry, call.fault, lambda: self.state.apply_order(deny, body, time.time()),
                         preview=lambda: self.state.order_verdict(deny, body, time.time()))

    def _land(self, entry: dict[str, Any], run: Callable[[], Answer]) -> Answer:
        """Apply the call now (it reaches mipos's logic) and log when and with what."""
        landed_at = time.time()
        answer = run()
        self.state.set_landing(entry, landed_at, answer[0])
        return answer

    def _with_fault(self, entry: dict[str, Any], fault: dict[str, Any] | None,
                    run: Callable[[], Answer],
                    preview: Callable[[], Answer] | None = None) -> None:
        """Answer a mipos call, through its fault if it has one (see the module docstring).

        ``run`` lands the call; ``preview`` is what landing it would answer, without
        landing it, for an answer sent before a ``land_after_s`` landing."""
        if not fault:  # the common case, kept short
            status, payload = self._land(entry, run)
            self._answer(entry, status, payload)
            return
        answer_at = time.time() + float(fault.get("delay_s") or 0.0)
        land_at = landing_time(entry, fault, answer_at)
        landing: Answer | None = None
        if land_at is not None and land_at <= answer_at:
            sleep_until(land_at)
            landing = self._land(entry, run)
        sleep_until(answer_at)
        if land_at is not None and landing is None:
            self.state.land_later(land_at, lambda: self._land(entry, run))
        self._finish(entry, fault, landing, preview)

    def _finish(self, entry: dict[str, Any], fault: dict[str, Any], landing: Answer | None,
                preview: Callable[[], Answer] | None) -> None:
        """Send what a fault says once its delay is over: nothing, its own answer, the
        landing's answer, or (the call lands later) the answer it would get now."""
        if fault.get("drop"):
            self._drop()
            return
        trickle_s = float(fault.get("trickle_s") or 0.0)
        if fault.get("status") is not None:
            status, payload, raw = fault_answer(fault)
            self._answer(entry, status, payload, raw=raw, headers=retry_after_header(fault),
                         trickle_s=trickle_s)
            return
        if fault.get("reset"):
            self._reset()  # mipos may have done it; the client only sees the reset
            return
        if fault.get("apply") is False:
            self._drop()  # mipos did not do it, and the client has stopped waiting
            return
        if landing is None:  # only land_after_s lands after the answer: an accept or deny
            assert preview is not None, "a call that lands after its answer needs a preview"
            landing = preview()
        status, payload = landing
        self._answer(entry, status, payload, trickle_s=trickle_s)


def landing_time(entry: dict[str, Any], fault: dict[str, Any], answer_at: float) -> float | None:
    """When a faulty call lands (Unix time), or None if it never does.

    ``land_after_s`` counts from the request's arrival; without it, a call that is
    answered by mipos (or reset after mipos did it) lands when its delay ends, and
    a drop, a fault's own status or ``apply: false`` never lands."""
    if fault.get("land_after_s") is not None:
        return float(entry["time"]) + float(fault["land_after_s"])
    if fault.get("drop") or fault.get("status") is not None or fault.get("apply") is False:
        return None
    return answer_at


def sleep_until(at: float) -> None:
    pause = at - time.time()
    if pause > 0:
        time.sleep(pause)


def retry_after_header(fault: dict[str, Any]) -> dict[str, str]:
    if fault.get("retry_after") is None:
        return {}
    return {"Retry-After": str(math.ceil(float(fault["retry_after"])))}


class SandboxServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], config: SandboxConfig, verbose: bool = False) -> None:
        self.state = SandboxState(config)
        self.verbose = verbose
        super().__init__(address, Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up (timeouts, drops) are normal here: no traceback for them."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)) and not self.verbose:
            return
        super().handle_error(request, client_address)


def make_server(host: str, port: int, config: SandboxConfig, verbose: bool = False) -> SandboxServer:
    return SandboxServer((host, port), config, verbose)
