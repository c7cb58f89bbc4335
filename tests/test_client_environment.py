"""The HTTP client reads the proxy and CA settings from the environment once per session."""

from __future__ import annotations

import pytest

from config import load_worker_settings
from support.processes import SANDBOX_ENV
from worker.mipos.client import MiposClient


def client(monkeypatch: pytest.MonkeyPatch, base_url: str) -> MiposClient:
    for name, value in {**SANDBOX_ENV, "MIPOS_BASE_URL": base_url}.items():
        monkeypatch.setenv(name, value)
    return MiposClient(load_worker_settings().mipos)


def test_a_proxy_and_a_ca_bundle_from_the_environment_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/private-ca.pem")
    session = client(monkeypatch, "https://integrations.mipos.shop").session
    assert session.proxies.get("https") == "http://proxy.example:3128"
    assert session.verify == "/etc/ssl/private-ca.pem"
    assert session.trust_env is False  # not walked again at every request


def test_no_proxy_for_mipos_host_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "integrations.mipos.shop")
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    session = client(monkeypatch, "https://integrations.mipos.shop").session
    assert "https" not in session.proxies and session.verify is True
