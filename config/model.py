"""The worker's settings as values: what the loaders (``config/settings.py``) build, and what
the numbers derived from them (``config/timing.py``, ``config/retention.py``) read.

Here, below both, so that the loaders can check the derived numbers without the derivations
importing the loaders back (no import circle, tests/test_layout.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from mipos_worker.settings import RedisSettings, RetentionSettings


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
