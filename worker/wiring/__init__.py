"""Celery wiring: the app, the event lock patch, the rescue sweeper, the per-process runtime."""
