"""The only reader of the environment: every setting, its default, its check.

The POS side (producer) needs only the Redis settings; the worker needs all of
them. Every process that opens a broker connection also reads the two numbers
the visibility timeout is derived from (``load_delivery_settings``), so that
all of them agree with the workers on it. The loaders collect every problem
before raising, so one message names every bad setting.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

from config.redis_url import (
    is_sentinel_url,
    normalized_sentinel_url,
    parse_sentinel_url,
    redis_url_passwords,
)
from config.retention import minimum_history_retention_s, minimum_ledger_retention_s, retention_problems
from config.timing import delivery_problems

T = TypeVar("T")

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_MIPOS_BASE_URL = "https://integrations.mipos.shop"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("json", "console")
# The done record: deduplication and reconciliation need it for the redelivery horizon
# (about 19 minutes by default); a day also covers a POS replaying yesterday's queue.
DEFAULT_LEDGER_RETENTION_S = 24 * 3600
# The attempt history and the order's task index: the running task needs them for the
# same horizon; beyond it only `mipos-worker order` reads them (dead letters keep a copy).
DEFAULT_HISTORY_RETENTION_S = 3600
CREDENTIAL_NAMES = ("MIPOS_CLIENT_ID", "MIPOS_CLIENT_SECRET", "MIPOS_EMAIL", "MIPOS_PASSWORD")
# The credentials kept out of every log line and page (the others identify, they do not authenticate).
SECRET_NAMES = ("MIPOS_CLIENT_SECRET", "MIPOS_PASSWORD")
# How a boolean setting may be written (any case).
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
# Secrets are replaced wherever they occur in a log line; a shorter one would
# match ordinary words and ids, and the replacements would spell it out.
MIN_SECRET_LENGTH = 8
# `ssl_cert_reqs` in a rediss:// URL, as kombu and redis-py both understand it.
CERT_REQS = {"required": "required", "cert_required": "required", "optional": "optional",
             "cert_optional": "optional", "none": "none", "cert_none": "none"}


class SettingsError(Exception):
    """One or more settings are missing or malformed; ``problems`` lists each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            "invalid configuration: " + "; ".join(problems)
            + " (see the Settings section of README.md)"
        )


@dataclass(frozen=True)
class RedisSettings:
    url: str
    key_prefix: str
    sentinel_master: str | None = None  # REDIS_SENTINEL_MASTER: set exactly when url is sentinel://
    sentinel_password: str | None = None  # REDIS_SENTINEL_PASSWORD: the Sentinels' own
    min_replicas_ack: int = 0  # REDIS_MIN_REPLICAS_ACK: replicas a write that counts must reach
    replica_ack_timeout_s: float = 1.0  # REDIS_REPLICA_ACK_TIMEOUT_S: how long to wait for them

    @property
    def sentinel(self) -> bool:
        return self.sentinel_master is not None

    def secrets(self) -> tuple[str, ...]:
        """The Redis and Sentinel passwords, for the log redaction."""
        found = redis_url_passwords(self.url)
        return tuple(s for s in (*found, self.sentinel_password) if s)


@dataclass(frozen=True)
class RetrySettings:
    max_attempts: int
    base_delay_s: float
    max_delay_s: float
    deadline_s: float


@dataclass(frozen=True)
class MiposSettings:
    base_url: str
    client_id: str
    client_secret: str
    email: str
    password: str
    timeout_s: float

    def secrets(self) -> tuple[str, ...]:
        """Values that must never reach a log line."""
        return tuple(s for s in (self.client_secret, self.password) if s)


@dataclass(frozen=True)
class BreakerConfig:
    enabled: bool
    failure_threshold: int
    failure_ratio: float
    window_s: float
    probe_interval_s: float
    rate_limit_per_s: int  # at least 1: MIPOS_RATE_LIMIT_PER_S is read with positive_int


@dataclass(frozen=True)
class ReconcileSettings:
    stores: tuple[str, ...]  # empty: no sweep
    interval_s: float
    grace_s: float


@dataclass(frozen=True)
class DeliverySettings:
    """What the visibility timeout and the attempt bound are derived from (config.timing)."""

    timeout_s: float
    visibility_timeout_s: float | None  # None: derived from timeout_s


@dataclass(frozen=True)
class RetentionSettings:
    """How long Redis keeps each kind of record of a finished order (config/retention.py)."""

    done_s: float = DEFAULT_LEDGER_RETENTION_S  # MIPOS_LEDGER_RETENTION_S: the done record
    history_s: float = DEFAULT_HISTORY_RETENTION_S  # MIPOS_HISTORY_RETENTION_S: attempts, task index


@dataclass(frozen=True)
class WorkerSettings:
    redis: RedisSettings
    mipos: MiposSettings
    retry: RetrySettings
    log_level: str
    log_format: str
    visibility_timeout_s: float | None  # None: derived from the timeouts (config.timing)
    reconcile: ReconcileSettings
    confirm_with_pending_list: bool  # after an unknown outcome, ask the pending list first
    breaker: BreakerConfig
    retention: RetentionSettings = RetentionSettings()

    @property
    def delivery(self) -> DeliverySettings:
        return DeliverySettings(self.mipos.timeout_s, self.visibility_timeout_s)


def parse_boolean(text: str) -> bool:
    """One of TRUE_WORDS or FALSE_WORDS, in any case and with spaces around; ValueError otherwise."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{text!r} is not a boolean")


class _Reader:
    """Reads typed values from an environment, remembering every problem."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []
        self.seen: dict[str, str | None] = {}  # every name read, and its value then

    def raw(self, name: str, default: str | None) -> str | None:
        value = self.env.get(name)
        self.seen[name] = value
        if value is None or value.strip() == "":
            return default
        return value.strip()

    def required(self, name: str) -> str:
        value = self.raw(name, None)
        if value is None:
            self.problems.append(f"{name} is required but not set")
            return ""
        return value

    def parsed(self, name: str, default: str, parse: Callable[[str], T], expected: str) -> T | None:
        text = self.raw(name, default)
        assert text is not None
        try:
            return parse(text)
        except ValueError:
            self.problems.append(f"{name}={text!r} is not {expected}")
            return None

    def positive_float(self, name: str, default: str) -> float:
        value = self.parsed(name, default, float, "a number")
        if value is None:
            return float(default)
        if not math.isfinite(value) or value <= 0:
            self.problems.append(f"{name}={value!r} must be a number greater than 0")
        return value

    def whole_number(self, name: str, default: str) -> int:
        """0 or more."""
        value = self.parsed(name, default, int, "a whole number")
        if value is None:
            return int(default)
        if value < 0:
            self.problems.append(f"{name}={value!r} must be 0 or more")
        return value

    def positive_int(self, name: str, default: str) -> int:
        value = self.parsed(name, default, int, "a whole number")
        if value is None:
            return int(default)
        if value < 1:
            self.problems.append(f"{name}={value!r} must be at least 1")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...], *, upper: bool) -> str:
        text = self.raw(name, default) or default
        value = text.upper() if upper else text.lower()
        if value not in choices:
            self.problems.append(f"{name}={text!r} must be one of {', '.join(choices)}")
            return default
        return value

    def boolean(self, name: str, default: str) -> bool:
        text = (self.raw(name, default) or default).lower()
        try:
            return parse_boolean(text)
        except ValueError:
            self.problems.append(f"{name}={text!r} must be true or false")
            return default == "true"

    def url(self, name: str, default: str, schemes: tuple[str, ...]) -> str:
        text = self.raw(name, default) or default
        parts = urlsplit(text)
        if parts.scheme not in schemes or not parts.hostname:
            self.problems.append(
                f"{name}={url_without_password(text)!r} must be a URL starting with "
                + " or ".join(f"{s}://" for s in schemes)
            )
        return text.rstrip("/") if "http" in schemes else text

    def check(self) -> None:
        if self.problems:
            raise SettingsError(self.problems)


def url_without_password(url: str) -> str:
    """The URL as it may be shown; every password of a ``;``-joined Sentinel URL hidden too."""
    for password in redis_url_passwords(url):
        url = url.replace(f":{password}@", ":***@")
    return url


def _query_items(url: str) -> list[tuple[str, str]]:
    query = urlsplit(url).query
    return [(k, v) for k, _, v in (item.partition("=") for item in query.split("&") if item)]


def ssl_cert_reqs(url: str) -> str | None:
    """The certificate check a rediss:// URL asks for: required, optional or none
    (None: not TLS, or a value neither kombu nor redis-py knows)."""
    if urlsplit(url).scheme != "rediss":
        return None
    given = [v for k, v in _query_items(url) if k == "ssl_cert_reqs"]
    return CERT_REQS.get(given[-1].strip().lower()) if given else "required"


def verified_redis_url(url: str) -> str:
    """The URL with its certificate check spelled out, so that every client verifies alike.

    kombu connects to ``rediss://`` without ``ssl_cert_reqs`` with no certificate
    check at all, while redis-py requires one; kombu takes ``CERT_NONE`` and
    redis-py only ``none``. Writing ``ssl_cert_reqs=required|optional|none`` into
    the URL makes the broker, the shared-state client, the POS side, Flower and
    the CLI agree: verified unless ``none`` is asked for. A CA file comes from
    ``ssl_ca_certs`` in the URL, else from the system store.
    """
    wanted = ssl_cert_reqs(url)
    if wanted is None:
        return url
    items = [(k, v) for k, v in _query_items(url) if k != "ssl_cert_reqs"]
    items.append(("ssl_cert_reqs", wanted))
    query = "&".join(f"{k}={v}" for k, v in items)
    return urlunsplit(urlsplit(url)._replace(query=query))


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_redis(reader: _Reader) -> RedisSettings:
    text = reader.raw("REDIS_URL", DEFAULT_REDIS_URL) or DEFAULT_REDIS_URL
    master = reader.raw("REDIS_SENTINEL_MASTER", None)
    sentinel_password = reader.raw("REDIS_SENTINEL_PASSWORD", None)
    ack = reader.whole_number("REDIS_MIN_REPLICAS_ACK", "0")
    ack_timeout = reader.positive_float("REDIS_REPLICA_ACK_TIMEOUT_S", "1")
    if is_sentinel_url(text):
        target, problems = parse_sentinel_url(text)
        reader.problems.extend(problems)
        if master is None:
            reader.problems.append(
                "REDIS_URL is a Sentinel URL (sentinel://) but REDIS_SENTINEL_MASTER is not set: "
                "name the master the Sentinels monitor (e.g. REDIS_SENTINEL_MASTER=mymaster)")
        if target is not None and target.tls:
            # TLS to the Sentinels and to Redis: the check spelled out, as for rediss:// URLs.
            verified = verified_redis_url("rediss://x/?" + target.query)
            if ssl_cert_reqs(verified) is None:
                reader.problems.append(
                    "REDIS_URL has an ssl_cert_reqs that is not required, optional or none")
            target = replace(target, query=urlsplit(verified).query)
        url = normalized_sentinel_url(target) if target is not None else text
    else:
        url = reader.url("REDIS_URL", DEFAULT_REDIS_URL, ("redis", "rediss"))
        if urlsplit(url).scheme in ("redis", "rediss") and ";" in url:
            reader.problems.append(
                "REDIS_URL lists several URLs: only Sentinel URLs (sentinel://) may be joined with ';'")
        if urlsplit(url).scheme == "rediss" and ssl_cert_reqs(url) is None:
            reader.problems.append(
                f"REDIS_URL={url_without_password(url)!r} has an ssl_cert_reqs that is not "
                "required, optional or none")
        for name, value in (("REDIS_SENTINEL_MASTER", master),
                            ("REDIS_SENTINEL_PASSWORD", sentinel_password)):
            if value is not None:
                reader.problems.append(
                    f"{name} is set but REDIS_URL is not a Sentinel URL: use "
                    "REDIS_URL=sentinel://host1:26379;sentinel://host2:26379/0, or unset " + name)
        url = verified_redis_url(url)
    return RedisSettings(
        url=url,
        key_prefix=reader.raw("MIPOS_REDIS_PREFIX", "mipos:") or "mipos:",
        sentinel_master=master if is_sentinel_url(text) else None,
        sentinel_password=sentinel_password,
        min_replicas_ack=ack,
        replica_ack_timeout_s=ack_timeout,
    )


def _read_delivery(reader: _Reader) -> DeliverySettings:
    return DeliverySettings(
        timeout_s=reader.positive_float("MIPOS_TIMEOUT_S", "10"),
        visibility_timeout_s=(
            reader.positive_float("MIPOS_VISIBILITY_TIMEOUT_S", "1")
            if reader.raw("MIPOS_VISIBILITY_TIMEOUT_S", None) is not None else None
        ),
    )


def _read_base_url(reader: _Reader) -> str:
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


def _read_secret(reader: _Reader, name: str) -> str:
    value = reader.required(name)
    if value and len(value) < MIN_SECRET_LENGTH:
        reader.problems.append(
            f"{name} is shorter than {MIN_SECRET_LENGTH} characters: too short to keep out of "
            "the logs (replacing it would rewrite ordinary text and give it away); use a longer one")
    return value


_loaded: dict[Callable[..., Any], tuple[dict[str, str | None], Any]] = {}


def _load(read: Callable[[_Reader], T], env: Mapping[str, str] | None) -> T:
    """Read one group of settings, raising once with every problem found.

    From the process's environment, the last result is kept while every variable it
    read is unchanged: ``delay()`` reads the Redis settings at every call, and parsing
    them cost more than the comparison."""
    if env is None and (kept := _loaded.get(read)) is not None:
        seen, settings = kept
        if all(os.environ.get(name) == value for name, value in seen.items()):
            return cast(T, settings)
    reader = _Reader(os.environ if env is None else env)
    settings = read(reader)
    reader.check()
    if env is None:
        _loaded[read] = (reader.seen, settings)
    return settings


def load_delivery_settings(env: Mapping[str, str] | None = None) -> DeliverySettings:
    """The numbers every process opening a broker connection needs (no mipos credentials)."""
    return _load(_read_delivery, env)


def _read_reconcile(reader: _Reader) -> ReconcileSettings:
    raw = reader.raw("MIPOS_RECONCILE_STORES", "") or ""
    return ReconcileSettings(
        stores=tuple(dict.fromkeys(s.strip() for s in raw.split(",") if s.strip())),
        interval_s=reader.positive_float("MIPOS_RECONCILE_INTERVAL_S", "60"),
        grace_s=reader.positive_float("MIPOS_RECONCILE_GRACE_S", "120"),
    )


def load_reconcile_settings(env: Mapping[str, str] | None = None) -> ReconcileSettings:
    """What beat needs to schedule the sweep (it has no mipos credentials of its own)."""
    return _load(_read_reconcile, env)


def _read_retention(reader: _Reader) -> RetentionSettings:
    return RetentionSettings(
        done_s=reader.positive_float("MIPOS_LEDGER_RETENTION_S", str(DEFAULT_LEDGER_RETENTION_S)),
        history_s=reader.positive_float("MIPOS_HISTORY_RETENTION_S", str(DEFAULT_HISTORY_RETENTION_S)),
    )


def load_retention_settings(env: Mapping[str, str] | None = None) -> RetentionSettings:
    """The retention settings alone (the POS side's registration keeps the task index as long);
    their floor is checked with the worker's settings (``load_worker_settings``)."""
    return _load(_read_retention, env)


def load_producer_settings(env: Mapping[str, str] | None = None) -> RedisSettings:
    """What the POS side needs to enqueue: Redis only, no mipos credentials."""
    return _load(_read_redis, env)


def load_worker_settings(env: Mapping[str, str] | None = None) -> WorkerSettings:
    reader = _Reader(os.environ if env is None else env)
    redis = _read_redis(reader)
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
        retention=_read_retention(reader),
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
