"""A client for the sandbox's control endpoints, for tests, demos and benchmarks."""

from __future__ import annotations

import time
from typing import Any

import requests


class SandboxControl:
    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()

    def _call(self, method: str, name: str, *, params: dict[str, Any] | None = None,
              body: dict[str, Any] | None = None) -> Any:
        response = self.session.request(
            method, f"{self.base_url}/_sandbox/{name}",
            params={k: v for k, v in (params or {}).items() if v is not None},
            json=body if method == "POST" else None, timeout=self.timeout)
        if not response.ok:
            # Keep the sandbox's explanation (a bad fault, a bad config key) in the error.
            raise requests.HTTPError(
                f"{method} /_sandbox/{name}: HTTP {response.status_code}: {response.text}",
                response=response)
        return response.json()

    def health(self) -> bool:
        return bool(self._call("GET", "health").get("ok"))

    def wait_until_up(self, timeout_s: float) -> None:
        give_up = time.monotonic() + timeout_s
        while True:
            try:
                if self.health():
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > give_up:
                raise TimeoutError(f"sandbox at {self.base_url} not up after {timeout_s}s")
            time.sleep(0.05)

    def reset(self) -> None:
        self._call("POST", "reset", body={})

    def config(self, **settings: Any) -> dict[str, Any]:
        """Change any of token_ttl_s, latency_ms, expires_in_format, expires_in_fixed,
        fault_rates, timeout_delay_s, timeout_land_after_s (None: land when answering),
        strict (True: 409 Order not found. for an order not pending; see sandbox/server.py);
        returns the whole config. The fast sandbox takes latency_ms, token_ttl_s, strict."""
        return dict(self._call("POST", "config", body=settings))

    def expire_token(self) -> None:
        self._call("POST", "expire-token", body={})

    def add_faults(self, order_external_id: str, *faults: dict[str, Any]) -> None:
        self._call("POST", "faults", body={"order_external_id": order_external_id,
                                           "faults": list(faults)})

    def add_call_faults(self, target: str, *faults: dict[str, Any]) -> None:
        """Faults for a target: ``token``, ``refresh``, ``pending:<store_id>`` or
        ``order:<order_external_id>`` (see sandbox/server.py)."""
        self._call("POST", "faults", body={"target": target, "faults": list(faults)})

    def clear_call_faults(self, target: str) -> None:
        self._call("POST", "faults", body={"target": target, "faults": [], "replace": True})

    def clear_faults(self, order_external_id: str) -> None:
        """Drop the faults still waiting for an order (the cause is fixed)."""
        self._call("POST", "faults", body={"order_external_id": order_external_id, "faults": [],
                                           "replace": True})

    def deliver(self, store_id: str, delivery_id: int, external_id: str, *,
                order_number: str | None = None, total: float | None = None,
                created_at: float | None = None) -> None:
        body: dict[str, Any] = {"store_id": store_id, "delivery_id": delivery_id,
                                "external_id": external_id}
        optional = {"order_number": order_number, "total": total, "created_at": created_at}
        body.update({k: v for k, v in optional.items() if v is not None})
        self._call("POST", "deliver", body=body)

    def requests(self, order_external_id: str | None = None,
                 path: str | None = None) -> list[dict[str, Any]]:
        """The log of API requests, oldest first: ``time`` (arrival), ``status`` (answered;
        None: not, or not yet), ``landed_at``/``landed_status``/``applied`` (when the call
        reached mipos's logic, what that gave, whether it changed the order), ``seq``,
        ``method``, ``path``, ``authorization``, ``body``, ``token_valid``, ``fault``."""
        params = {"order_external_id": order_external_id, "path": path}
        return list(self._call("GET", "requests", params=params)["requests"])

    def stats(self) -> dict[str, Any]:
        return dict(self._call("GET", "stats"))

    def orders(self) -> dict[str, Any]:
        """``{"orders": {"STORE/ORDER": {...}}}``, as the endpoint answers."""
        return dict(self._call("GET", "orders"))
