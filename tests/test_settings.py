from __future__ import annotations

import pytest

from config import (
    SettingsError,
    load_delivery_settings,
    load_producer_settings,
    load_retention_settings,
    load_worker_settings,
)

CREDENTIALS = {
    "MIPOS_CLIENT_ID": "id",
    "MIPOS_CLIENT_SECRET": "client-secret",
    "MIPOS_EMAIL": "pos@example.invalid",
    "MIPOS_PASSWORD": "password",
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


# -- plain http to mipos (issue 11, item 18) ------------------------------------------


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8765", "http://127.9.9.9", "http://localhost:8000/", "http://[::1]:8765",
    "https://integrations.mipos.shop", "https://10.0.0.5",
])
def test_https_or_loopback_is_accepted(url: str) -> None:
    assert load_worker_settings({**CREDENTIALS, "MIPOS_BASE_URL": url}).mipos.base_url == url.rstrip("/")


@pytest.mark.parametrize("url", [
    "http://integrations.mipos.shop", "http://10.0.0.5:8765", "http://[::2]", "http://localhost.example",
    "http://128.0.0.1",
])
def test_plain_http_to_another_host_is_refused_naming_the_opt_in(url: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_worker_settings({**CREDENTIALS, "MIPOS_BASE_URL": url})
    [problem] = info.value.problems
    assert "MIPOS_BASE_URL" in problem and "MIPOS_ALLOW_INSECURE_HTTP=true" in problem


def test_plain_http_with_the_explicit_opt_in() -> None:
    env = {**CREDENTIALS, "MIPOS_BASE_URL": "http://mipos.internal:8080", "MIPOS_ALLOW_INSECURE_HTTP": "true"}
    assert load_worker_settings(env).mipos.base_url == "http://mipos.internal:8080"
    with pytest.raises(SettingsError, match="MIPOS_ALLOW_INSECURE_HTTP"):
        load_worker_settings({**env, "MIPOS_ALLOW_INSECURE_HTTP": "perhaps"})


# -- secrets too short to redact (issue 11, item 17) ------------------------------------


def test_secrets_too_short_to_redact_are_refused_without_echoing_them() -> None:
    env = {**CREDENTIALS, "MIPOS_PASSWORD": "pw1", "MIPOS_CLIENT_SECRET": "sec-42"}
    with pytest.raises(SettingsError) as info:
        load_worker_settings(env)
    text = str(info.value)
    assert "MIPOS_PASSWORD is shorter than 8" in text and "MIPOS_CLIENT_SECRET is shorter than 8" in text
    assert "pw1" not in text and "sec-42" not in text
    assert load_worker_settings({**CREDENTIALS, "MIPOS_PASSWORD": "8 chars!"}).mipos.password == "8 chars!"


# -- rediss:// verifies (issue 11, item 16) ----------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("rediss://:pw@cache.example:6380/0", "rediss://:pw@cache.example:6380/0?ssl_cert_reqs=required"),
    ("rediss://cache.example/0?ssl_ca_certs=/etc/ca.crt",
     "rediss://cache.example/0?ssl_ca_certs=/etc/ca.crt&ssl_cert_reqs=required"),
    ("rediss://cache.example/0?ssl_cert_reqs=CERT_NONE", "rediss://cache.example/0?ssl_cert_reqs=none"),
    ("rediss://cache.example/0?ssl_cert_reqs=optional", "rediss://cache.example/0?ssl_cert_reqs=optional"),
    ("redis://cache.example/0", "redis://cache.example/0"),
])
def test_rediss_urls_spell_out_their_certificate_check(url: str, expected: str) -> None:
    assert load_producer_settings({"REDIS_URL": url}).url == expected


def test_an_unknown_certificate_check_is_refused() -> None:
    with pytest.raises(SettingsError, match="ssl_cert_reqs") as info:
        load_producer_settings({"REDIS_URL": "rediss://:hunter22@cache.example/0?ssl_cert_reqs=maybe"})
    assert "hunter22" not in str(info.value)


# -- what every broker process reads (issue 11, item 7) -----------------------------------


def test_delivery_settings_need_no_credentials() -> None:
    assert load_delivery_settings({}).timeout_s == 10 and load_delivery_settings({}).visibility_timeout_s is None
    settings = load_delivery_settings({"MIPOS_TIMEOUT_S": "2", "MIPOS_VISIBILITY_TIMEOUT_S": "90"})
    assert (settings.timeout_s, settings.visibility_timeout_s) == (2.0, 90.0)
    assert load_worker_settings({**CREDENTIALS, "MIPOS_TIMEOUT_S": "2",
                                 "MIPOS_VISIBILITY_TIMEOUT_S": "90"}).delivery == settings


def test_delivery_settings_are_validated() -> None:
    with pytest.raises(SettingsError) as info:
        load_delivery_settings({"MIPOS_TIMEOUT_S": "soon", "MIPOS_VISIBILITY_TIMEOUT_S": "-1"})
    text = str(info.value)
    assert "MIPOS_TIMEOUT_S='soon'" in text and "MIPOS_VISIBILITY_TIMEOUT_S=-1" in text


# -- how long a finished order's records stay (issue 15, item 7) ----------------------------


def test_retention_defaults() -> None:
    s = load_worker_settings(CREDENTIALS)
    assert (s.retention.done_s, s.retention.history_s) == (86400.0, 3600.0)
    assert load_retention_settings({}) == s.retention
    given = load_worker_settings({**CREDENTIALS, "MIPOS_LEDGER_RETENTION_S": "7200",
                                  "MIPOS_HISTORY_RETENTION_S": "1800.5"}).retention
    assert (given.done_s, given.history_s) == (7200.0, 1800.5)
    assert load_retention_settings({"MIPOS_HISTORY_RETENTION_S": "1800.5"}).history_s == 1800.5


def test_malformed_retentions_are_named() -> None:
    with pytest.raises(SettingsError) as info:
        load_worker_settings({**CREDENTIALS, "MIPOS_LEDGER_RETENTION_S": "a week",
                              "MIPOS_HISTORY_RETENTION_S": "0"})
    text = str(info.value)
    assert "MIPOS_LEDGER_RETENTION_S='a week' is not a number" in text
    assert "MIPOS_HISTORY_RETENTION_S=0.0 must be a number greater than 0" in text


def test_a_retention_below_the_redelivery_horizon_is_refused_naming_the_minimum() -> None:
    # Defaults: deadline 600 + attempt 120 + margin 12 + visibility 180 + rescue window 225.
    with pytest.raises(SettingsError) as info:
        load_worker_settings({**CREDENTIALS, "MIPOS_LEDGER_RETENTION_S": "1136",
                              "MIPOS_HISTORY_RETENTION_S": "1000"})
    text = str(info.value)
    assert "MIPOS_LEDGER_RETENTION_S=1136 is too short" in text and "at least 1137" in text
    assert "MIPOS_HISTORY_RETENTION_S=1000 is too short" in text
    assert "MIPOS_RETRY_DEADLINE_S=600" in text
    s = load_worker_settings({**CREDENTIALS, "MIPOS_LEDGER_RETENTION_S": "1137",
                              "MIPOS_HISTORY_RETENTION_S": "1137"})
    assert s.retention.done_s == 1137
    # A longer deadline moves the floor: an unset history retention follows it, a given one is refused.
    longer = {**CREDENTIALS, "MIPOS_RETRY_DEADLINE_S": "3600"}
    assert load_worker_settings(longer).retention.history_s == 4137
    with pytest.raises(SettingsError, match=r"MIPOS_HISTORY_RETENTION_S=3600 is too short.*at least 4137"):
        load_worker_settings({**longer, "MIPOS_HISTORY_RETENTION_S": "3600"})
    # The reconciliation's window sets the done record's floor when the horizon is short.
    fast = {**CREDENTIALS, "MIPOS_TIMEOUT_S": "1", "MIPOS_RETRY_DEADLINE_S": "60"}
    with pytest.raises(SettingsError, match=r"MIPOS_LEDGER_RETENTION_S=779 .*at least 780"):
        load_worker_settings({**fast, "MIPOS_LEDGER_RETENTION_S": "779", "MIPOS_HISTORY_RETENTION_S": "251"})
