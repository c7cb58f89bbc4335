from __future__ import annotations

import pytest

from config import SettingsError, load_producer_settings, load_worker_settings

CREDENTIALS = {
    "MIPOS_CLIENT_ID": "id",
    "MIPOS_CLIENT_SECRET": "secret",
    "MIPOS_EMAIL": "pos@example.invalid",
    "MIPOS_PASSWORD": "pw",
}


def test_defaults_of_interface_md() -> None:
    s = load_worker_settings(CREDENTIALS)
    assert s.redis.url == "redis://localhost:6379/0"
    assert s.mipos.base_url == "https://integrations.mipos.shop"
    assert s.mipos.timeout_s == 10
    assert (s.retry.max_attempts, s.retry.base_delay_s, s.retry.max_delay_s, s.retry.deadline_s) == (
        12, 1.0, 60.0, 600.0)
    assert (s.log_level, s.log_format) == ("INFO", "json")


def test_every_bad_setting_is_named_in_one_error() -> None:
    env = {
        "MIPOS_CLIENT_ID": "id",
        "REDIS_URL": "http://nope",
        "MIPOS_TIMEOUT_S": "ten",
        "MIPOS_RETRY_MAX_ATTEMPTS": "0",
        "LOG_FORMAT": "xml",
    }
    with pytest.raises(SettingsError) as info:
        load_worker_settings(env)
    text = str(info.value)
    for name in ("REDIS_URL", "MIPOS_TIMEOUT_S", "MIPOS_RETRY_MAX_ATTEMPTS", "LOG_FORMAT",
                 "MIPOS_CLIENT_SECRET", "MIPOS_EMAIL", "MIPOS_PASSWORD"):
        assert name in text
    assert "MIPOS_CLIENT_ID" not in text


def test_floats_for_fast_tests() -> None:
    s = load_worker_settings({**CREDENTIALS, "MIPOS_RETRY_BASE_DELAY_S": "0.05",
                              "MIPOS_RETRY_MAX_DELAY_S": "0.2"})
    assert s.retry.base_delay_s == 0.05


def test_producer_needs_only_redis() -> None:
    assert load_producer_settings({"REDIS_URL": "rediss://:pw@cache.example:6380/2"}).url.startswith("rediss://")


def test_password_in_a_bad_url_is_not_echoed() -> None:
    with pytest.raises(SettingsError) as info:
        load_producer_settings({"REDIS_URL": "http://:hunter22@host"})
    assert "hunter22" not in str(info.value)
