"""The mipos worker: ``celery -A worker worker`` finds the Celery app here.

Its rooms, lowest first (each imports only from the ones before it):

- ``order/``: what an order is, its arguments checked, the stamps its message carries;
- ``logs/``: logging setup and the redaction of secrets;
- ``state/``: everything kept in Redis, one owner per key family;
- ``mipos/``: all HTTP to mipos: the client, the classification table, tokens;
- ``attempt/``: the story of one delivery, its retry decision and its log line;
- ``wiring/``: the Celery app and what runs beside it in a worker;
- ``ops/``: what operators look at: the order view, metrics, Flower, replay.

Importing any of them builds no Celery app and reads no setting; ``worker.app`` does.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":
        return _app()
    raise AttributeError(f"module 'worker' has no attribute {name!r}")


def _app() -> Any:
    """The app, or one line and exit 2 when a setting it is built from (REDIS_URL) is wrong:
    ``celery -A worker`` would otherwise print "Unable to load celery application" and a traceback."""
    import sys

    from mipos_worker.settings import SettingsError

    try:
        from worker.wiring.celery_app import app
    except SettingsError as exc:
        print(f"mipos-worker: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return app
