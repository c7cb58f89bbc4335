"""The worker's settings: every setting beyond Redis, its default, its check.

The POS side needs only the Redis settings, which live in the POS-side package
(``mipos_worker/settings.py``) and are read here the same way; the worker
needs all of them. Every process that opens a broker connection also reads the
two numbers the visibility timeout is derived from (``load_delivery_settings``),
so that all of them agree with the workers on it. The loaders collect every
problem before raising, so one message names every bad setting.

The two mipos secrets may each come from a file instead (``SettingsReader.secret``):
``MIPOS_CLIENT_SECRET_FILE`` and ``MIPOS_PASSWORD_FILE`` hold the path of a file
whose content (its trailing newline stripped) is the secret, as Docker and
Kubernetes secrets are mounted. Setting a secret and its file form is refused;
each file is read once, at start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from urllib.parse import urlsplit

from config.model import (  # what the loaders build, importable from here as before
    BreakerConfig as BreakerConfig,
    DeliverySettings as DeliverySettings,
    MiposSettings as MiposSettings,
    ReconcileSettings as ReconcileSettings,
    RetrySettings as RetrySettings,
    WorkerSettings as WorkerSettings,
)
from config.retention import (
    minimum_history_retention_s,
    minimum_ledger_retention_s,
    retention_problems,
)
from config.timing import delivery_problems
from mipos_worker.settings import (
    RetentionSettings,
    SettingsError,
    SettingsReader,
    is_loopback_host,
    load,
    load_retention_settings,
    read_redis,
    read_retention,
    url_without_password,
)

DEFAULT_MIPOS_BASE_URL = "https://integrations.mipos.shop"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("json", "console")
CREDENTIAL_NAMES = ("MIPOS_CLIENT_ID", "MIPOS_CLIENT_SECRET", "MIPOS_EMAIL", "MIPOS_PASSWORD")
# The credentials kept out of every log line and page (the others identify, they do not authenticate).
SECRET_NAMES = ("MIPOS_CLIENT_SECRET", "MIPOS_PASSWORD")
# Secrets are replaced wherever they occur in a log line; a shorter one would
# match ordinary words and ids, and the replacements would spell it out.
MIN_SECRET_LENGTH = 8


def _read_delivery(reader: SettingsReader) -> DeliverySettings:
    return DeliverySettings(
        timeout_s=reader.positive_float("MIPOS_TIMEOUT_S", "10"),
        visibility_timeout_s=(
            reader.positive_float("MIPOS_VISIBILITY_TIMEOUT_S", "1")
            if reader.raw("MIPOS_VISIBILITY_TIMEOUT_S", None) is not None else None
        ),
    )


def _read_base_url(reader: SettingsReader) -> str:
    """The mipos API; plain http only to this host, or when explicitly allowed."""
    url = reader.url("MIPOS_BASE_URL", DEFAULT_MIPOS_BASE_URL, ("http", "https"))
    allow_http = reader.boolean("MIPOS_ALLOW_INSECURE_HTTP", "false")
    parts = urlsplit(url)
    if parts.scheme == "http" and parts.hostname and not allow_http \
            and not is_loopback_host(parts.hostname):
        reader.problems.append(
            f"MIPOS_BASE_URL={url_without_password(url)!r} is plain http to another host: the "
            "client secret and the password would cross the network unencrypted; use https://, "
            "or set MIPOS_ALLOW_INSECURE_HTTP=true to accept that")
    return url


def _read_secret(reader: SettingsReader, name: str) -> str:
    """``name`` or its file form (``<name>_FILE``), required, long enough to redact."""
    value = reader.secret(name, required=True) or ""
    if value and len(value) < MIN_SECRET_LENGTH:
        source = f"{name}_FILE's content" if name in reader.from_files else name
        reader.problems.append(
            f"{source} is shorter than {MIN_SECRET_LENGTH} characters: too short to keep out of "
            "the logs (replacing it would rewrite ordinary text and give it away); use a longer one")
    return value


def configured_secrets(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The client secret and the password, from either form, for a process that keeps them out
    of what it shows without loading the worker's settings (Flower's pages); a form that cannot
    be read gives nothing (the worker reports it)."""
    reader = SettingsReader(os.environ if env is None else env)
    return tuple(value for name in SECRET_NAMES if (value := reader.secret(name)))


def load_delivery_settings(env: Mapping[str, str] | None = None) -> DeliverySettings:
    """The numbers every process opening a broker connection needs (no mipos credentials)."""
    return load(_read_delivery, env)


def _read_reconcile(reader: SettingsReader) -> ReconcileSettings:
    raw = reader.raw("MIPOS_RECONCILE_STORES", "") or ""
    return ReconcileSettings(
        stores=tuple(dict.fromkeys(s.strip() for s in raw.split(",") if s.strip())),
        interval_s=reader.positive_float("MIPOS_RECONCILE_INTERVAL_S", "60"),
        grace_s=reader.positive_float("MIPOS_RECONCILE_GRACE_S", "120"),
    )


def load_reconcile_settings(env: Mapping[str, str] | None = None) -> ReconcileSettings:
    """What beat needs to schedule the sweep (it has no mipos credentials of its own)."""
    return load(_read_reconcile, env)


def load_worker_settings(env: Mapping[str, str] | None = None) -> WorkerSettings:
    reader = SettingsReader(os.environ if env is None else env)
    redis = read_redis(reader)
    delivery = _read_delivery(reader)
    mipos = MiposSettings(
        base_url=_read_base_url(reader),
        client_id=reader.required("MIPOS_CLIENT_ID"),
        client_secret=_read_secret(reader, "MIPOS_CLIENT_SECRET"),
        email=reader.required("MIPOS_EMAIL"),
        password=_read_secret(reader, "MIPOS_PASSWORD"),
        timeout_s=delivery.timeout_s,
    )
    retry = RetrySettings(
        max_attempts=reader.positive_int("MIPOS_RETRY_MAX_ATTEMPTS", "12"),
        base_delay_s=reader.positive_float("MIPOS_RETRY_BASE_DELAY_S", "1"),
        max_delay_s=reader.positive_float("MIPOS_RETRY_MAX_DELAY_S", "60"),
        deadline_s=reader.positive_float("MIPOS_RETRY_DEADLINE_S", "600"),
    )
    if retry.max_delay_s < retry.base_delay_s:
        reader.problems.append(
            f"MIPOS_RETRY_MAX_DELAY_S={retry.max_delay_s!r} must not be below "
            f"MIPOS_RETRY_BASE_DELAY_S={retry.base_delay_s!r}"
        )
    settings = WorkerSettings(
        redis=redis,
        mipos=mipos,
        retry=retry,
        log_level=reader.choice("LOG_LEVEL", "INFO", LOG_LEVELS, upper=True),
        log_format=reader.choice("LOG_FORMAT", "json", LOG_FORMATS, upper=False),
        visibility_timeout_s=delivery.visibility_timeout_s,
        reconcile=_read_reconcile(reader),
        confirm_with_pending_list=reader.boolean("MIPOS_CONFIRM_WITH_PENDING_LIST", "true"),
        breaker=BreakerConfig(
            enabled=reader.boolean("MIPOS_BREAKER_ENABLED", "true"),
            failure_threshold=reader.positive_int("MIPOS_BREAKER_FAILURES", "20"),
            failure_ratio=reader.positive_float("MIPOS_BREAKER_FAILURE_RATIO", "0.5"),
            window_s=reader.positive_float("MIPOS_BREAKER_WINDOW_S", "10"),
            probe_interval_s=reader.positive_float("MIPOS_BREAKER_PROBE_INTERVAL_S", "2"),
            rate_limit_per_s=reader.positive_int("MIPOS_RATE_LIMIT_PER_S", "200"),
        ),
        retention=read_retention(reader),
    )
    if not reader.problems:
        # The floors come from the delivery chain (config/timing.py), once every other
        # setting is valid: an unset retention is raised to its floor, a given one is checked.

        settings = replace(settings, retention=RetentionSettings(
            done_s=(settings.retention.done_s if reader.raw("MIPOS_LEDGER_RETENTION_S", None)
                    else max(settings.retention.done_s, minimum_ledger_retention_s(settings))),
            history_s=(settings.retention.history_s if reader.raw("MIPOS_HISTORY_RETENTION_S", None)
                       else max(settings.retention.history_s, minimum_history_retention_s(settings)))))
        reader.problems.extend(retention_problems(settings))
    reader.check()
    return settings


def configured_retention() -> RetentionSettings:
    """The worker's retention (an unset one raised to its floor) when the worker settings are
    complete; else as set (a process without the mipos credentials)."""
    try:
        return load_worker_settings().retention
    except SettingsError:
        return load_retention_settings()


def broker_settings_problems(env: Mapping[str, str] | None = None) -> list[str]:
    """Why a process may not open a consuming broker connection with this environment:
    its visibility timeout would not be the workers' (a bad value), or too small."""
    try:
        return delivery_problems(load_delivery_settings(env))
    except SettingsError as exc:
        return list(exc.problems)


def load_checked_worker_settings(env: Mapping[str, str] | None = None) -> WorkerSettings:
    """The worker's settings, with the delivery numbers checked against each other too:
    one SettingsError naming every problem."""
    problems: list[str] = []
    settings: WorkerSettings | None = None
    try:
        settings = load_worker_settings(env)
    except SettingsError as exc:
        problems.extend(exc.problems)
    try:
        problems.extend(delivery_problems(load_delivery_settings(env)))
    except SettingsError:
        pass  # the same problems are among the worker settings' already
    if problems or settings is None:
        raise SettingsError(problems)
    return settings
