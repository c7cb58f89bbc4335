from config.settings import (
    MiposSettings,
    ReconcileSettings,
    RedisSettings,
    RetrySettings,
    SettingsError,
    WorkerSettings,
    load_producer_settings,
    load_reconcile_settings,
    load_worker_settings,
    url_without_password,
)

__all__ = [
    "MiposSettings",
    "ReconcileSettings",
    "RedisSettings",
    "RetrySettings",
    "SettingsError",
    "WorkerSettings",
    "load_producer_settings",
    "load_reconcile_settings",
    "load_worker_settings",
    "url_without_password",
]
