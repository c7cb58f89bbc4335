"""What every page shares: Flower's authentication, the user and whether they may act, a CSRF
check that basic auth does not skip, and Redis work off Flower's event loop."""

from __future__ import annotations

import functools
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
import tornado.web
from flower.views import BaseHandler
from tornado.ioloop import IOLoop

from mipos_worker.state.inflight import InflightRegistry
from worker.ops.flower import READONLY_VARIABLE, FlowerSettings, request_user
from worker.pages import display
from worker.state.deadletters import DeadLetters

T = TypeVar("T")


@dataclass(frozen=True)
class Pages:
    """What the handlers share, built once when Flower starts."""

    settings: FlowerSettings
    redis: redis.Redis
    key_prefix: str

    @property
    def letters(self) -> DeadLetters:
        return DeadLetters(self.redis, self.key_prefix)

    @property
    def inflight(self) -> InflightRegistry:
        return InflightRegistry(self.redis, self.key_prefix)


class PageHandler(BaseHandler):  # type: ignore[misc]  # flower has no type hints
    """A page behind Flower's authentication (``guard_basic_auth`` included)."""

    pages: Pages
    user: str | None
    readonly: bool
    active_tab = ""

    def initialize(self, pages: Pages) -> None:
        self.pages = pages
        self.user = None
        self.readonly = False

    def prepare(self) -> None:
        # Flower's check, behind ours: a 401 without credentials, a 403 for a read-only user's
        # write. With OAuth (--auth), no user yet means Flower's login page.
        if not self.current_user:
            if self.request.method in ("GET", "HEAD"):
                self.redirect(self.get_login_url() + "?" + urllib.parse.urlencode({"next": self.request.uri}))
                return
            raise tornado.web.HTTPError(403)
        self.user = request_user(self) or (self.current_user if isinstance(self.current_user, str) else None)
        self.readonly = self.pages.settings.is_readonly(self.user)
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Referrer-Policy", "same-origin")

    def check_xsrf_cookie(self) -> None:
        """Flower checks the origin of a write, and the XSRF token only with OAuth; here the token
        is checked always: a POST needs the ``_xsrf`` of the user's own cookie."""
        super().check_xsrf_cookie()
        tornado.web.RequestHandler.check_xsrf_cookie(self)

    def require_writer(self) -> None:
        if self.readonly:
            raise tornado.web.HTTPError(403, f"{self.user} may look, not act ({READONLY_VARIABLE})")

    async def blocking(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` on Flower's thread pool: Redis and mipos never hold the event loop."""
        try:
            return await IOLoop.current().run_in_executor(None, functools.partial(work, *args))
        except redis.RedisError as exc:
            raise tornado.web.HTTPError(503, f"Redis did not answer: {type(exc).__name__}") from exc

    def argument(self, name: str, limit: int = 400) -> str:
        """A query or form argument as sent (the template escapes it), cut at ``limit``; "" when absent."""
        value = self.get_argument(name, default="", strip=True, escape=False)
        return str(value or "")[:limit]

    def link(self, name: str, *args: str, **query: Any) -> str:
        """A URL of one of the pages (Flower's url prefix included), with a query string."""
        url = self.reverse_url(name, *args)
        pairs = [(k, str(v)) for k, v in query.items() if v not in (None, "")]
        return url + ("?" + urllib.parse.urlencode(pairs) if pairs else "")

    def order_link(self, store_id: Any, order_external_id: Any) -> str:
        return self.link("mipos-order", store=str(store_id), id=str(order_external_id))

    def page(self, template: str, *, title: str, **values: Any) -> None:
        self.render(template, title=display.shown(title, 120).text, active_tab=self.active_tab, user=self.user, readonly=self.readonly,
                    readonly_variable=READONLY_VARIABLE, link=self.link, order_link=self.order_link,
                    when=display.when, shown=display.shown, text_block=display.block, seconds=display.seconds,
                    ago=display.ago, **values)
