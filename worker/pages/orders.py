"""The Orders pages: find an order (``/orders``), and one order's page (``/order``), with the
Ask mipos button."""

from __future__ import annotations

import time
from dataclasses import dataclass

from config import SettingsError
from config.retention import PENDING_LIST_WINDOW_S
from worker.mipos.errors import MiposError
from worker.ops.order_status import describe_order
from worker.pages.base import PageHandler
from worker.pages.order_view import OrderPage, order_page, pending_answer
from worker.pages.search import FlowerTask, SearchResult, search

MAX_ID_CHARS = 1000  # longer than any valid id (200), so an odd one is still found, yet bounded


@dataclass(frozen=True)
class Asked:
    ok: bool
    text: str


class OrdersHandler(PageHandler):
    """``/orders?q=``: a part of an order id, ``store/order``, or a task id."""

    active_tab = "mipos-orders"

    async def get(self) -> None:
        query = self.argument("q", 200)
        result = None
        if query:
            result = await self.blocking(lambda: search(query, self.flower_tasks(), self.pages.letters,
                                                        self.pages.inflight))
        self.page("mipos-orders.html", title="Orders", query=query, result=result, problem=None)

    def flower_tasks(self) -> list[FlowerTask]:
        """The tasks Flower holds (FLOWER_MAX_TASKS), newest first: their ids and arguments (its
        LRU cache iterates under its own lock, so this may run off the event loop)."""
        tasks = self.application.events.state.tasks
        found = [(task_id, getattr(t, "name", None), getattr(t, "kwargs", None), getattr(t, "received", None))
                 for task_id, t in list(tasks.items())]
        return sorted(found, key=lambda task: task[3] or 0.0, reverse=True)


class OrderHandler(PageHandler):
    """``/order?store=&id=`` (``&ask=1``: with mipos's pending list)."""

    active_tab = "mipos-orders"

    async def get(self) -> None:
        store, order_id = self.argument("store", 200), self.argument("id", MAX_ID_CHARS)
        if not store or not order_id:
            self.set_status(400)
            self.page("mipos-orders.html", title="Orders", query="", result=None,
                      problem="an order is found by its store id and its external id: give both")
            return
        status = await self.blocking(describe_order, self.pages.redis, self.pages.key_prefix, store, order_id)
        if status is None:
            self.set_status(404)
            result = SearchResult(order_id, [])
            self.page("mipos-orders.html", title="Orders", query="", result=result,
                      problem=f"no order {store}/{order_id} is known here: it was never enqueued through this "
                              "Redis, or its records expired (7 days)")
            return
        asked = await self.blocking(ask_mipos, store, order_id) if self.argument("ask") else None
        view: OrderPage = order_page(status)
        letters = status.dead_letters
        self.page("mipos-order.html", title=f"Order {store}/{order_id}"[:120], order=view, letters=letters,
                  asked=asked, last_letter=letters[-1] if letters else None)


def ask_mipos(store_id: str, order_external_id: str) -> Asked:
    """Whether mipos's pending list of the store still lists the order, and for how long."""
    from worker.mipos.pending import fetch_pending
    from worker.wiring.runtime import get_runtime

    try:
        runtime = get_runtime()
        pending, _answer = fetch_pending(runtime.client, runtime.tokens, store_id)
    except SettingsError as exc:
        return Asked(False, f"mipos cannot be asked from this Flower: its settings are incomplete ({exc})")
    except MiposError as exc:
        return Asked(False, f"mipos did not give store {store_id}'s pending list: {exc.message}")
    item = next((p for p in pending if p.external_id == order_external_id), None)
    text = pending_answer(item is not None, item.created_at if item else None, PENDING_LIST_WINDOW_S, time.time())
    return Asked(True, text)
