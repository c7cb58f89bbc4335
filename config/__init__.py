from config.settings import (
    MiposSettings,
    RedisSettings,
    RetrySettings,
    SettingsError,
    WorkerSettings,
    load_producer_settings,
    load_worker_settings,
)

__all__ = [
    "MiposSettings",
    "RedisSettings",
    "RetrySettings",
    "SettingsError",
    "WorkerSettings",
    "load_producer_settings",
    "load_worker_settings",
]
