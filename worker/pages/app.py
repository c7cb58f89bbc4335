"""The operator's pages, added to Flower's application: the routes, the template loader.

``pages_extension`` is what ``worker/flower.py`` gives ``worker.ops.flower.main``: it runs
once the settings are checked and returns the hook that adds the pages to the application
Flower builds. The routes honour ``FLOWER_URL_PREFIX`` as Flower's own do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flower.app import rewrite_handler
from tornado.web import url

from config import SettingsError, load_producer_settings
from mipos_worker.state.connection import producer_redis
from worker.ops.flower import AppHook, ConfigError, FlowerSettings
from worker.pages.base import Pages
from worker.pages.letters import (
    DeadLettersHandler,
    LetterActionHandler,
    LetterHandler,
    ReplaySelectedHandler,
)
from worker.pages.navigation import PagesLoader
from worker.pages.orders import OrderHandler, OrdersHandler

LETTER = r"([0-9a-f]{16})"


def routes(pages: Pages) -> list[url]:
    shared = {"pages": pages}
    return [
        url(r"/orders", OrdersHandler, shared, name="mipos-orders"),
        url(r"/order", OrderHandler, shared, name="mipos-order"),
        url(r"/dead-letters", DeadLettersHandler, shared, name="mipos-dead-letters"),
        url(r"/dead-letters/replay", ReplaySelectedHandler, shared, name="mipos-replay-selected"),
        url(rf"/dead-letter/{LETTER}", LetterHandler, shared, name="mipos-letter"),
        url(rf"/dead-letter/{LETTER}/(replay|discard)", LetterActionHandler, shared, name="mipos-letter-action"),
    ]


def pages_extension(settings: FlowerSettings, environ: Mapping[str, str]) -> AppHook:
    """Checks what the pages need (Redis's settings: ConfigError) and gives the hook that adds them."""
    try:
        redis_settings = load_producer_settings(environ)
    except SettingsError as exc:
        raise ConfigError(str(exc)) from None

    def install(app: Any) -> None:
        pages = Pages(settings, producer_redis(redis_settings.url), redis_settings.key_prefix)
        prefix = app.options.url_prefix
        handlers = [rewrite_handler(h, prefix) for h in routes(pages)] if prefix else routes(pages)
        app.add_handlers(r".*", handlers)
        app.settings["template_loader"] = PagesLoader(app.settings["template_path"])

    return install
