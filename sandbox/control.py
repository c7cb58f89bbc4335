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

    def _get(self, name: str, **params: Any) -> Any:
        response = self.session.get(f"{self.base_url}/_sandbox/{name}",
                                    params={k: v for k, v in params.items() if v is not None},
                                    timeout=self.timeout)
        response.raise_for_status()
        return response.json()

    def _post(self, name: str, body: dict[str, Any] | None = None) -> Any:
        response = self.session.post(f"{self.base_url}/_sandbox/{name}", json=body or {},
                                     timeout=self.timeout)
        response.raise_for_status()
        return response.json()

    def health(self) -> bool:
        return bool(self._get("health").get("ok"))

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
        self._post("reset")

    def config(self, **settings: Any) -> dict[str, Any]:
        return dict(self._post("config", settings))

    def expire_token(self) -> None:
        self._post("expire-token")

    def add_faults(self, order_external_id: str, *faults: dict[str, Any]) -> None:
        self._post("faults", {"order_external_id": order_external_id, "faults": list(faults)})

    def deliver(self, store_id: str, delivery_id: int, external_id: str, **extra: Any) -> None:
        self._post("deliver", {"store_id": store_id, "delivery_id": delivery_id,
                               "external_id": external_id, **extra})

    def requests(self, order_external_id: str | None = None, path: str | None = None) -> list[dict[str, Any]]:
        return list(self._get("requests", order_external_id=order_external_id, path=path)["requests"])

    def stats(self) -> dict[str, Any]:
        return dict(self._get("stats"))

    def orders(self) -> dict[str, Any]:
        return dict(self._get("orders"))
