"""Finding an order from what the caller knows: its store and external id, a task id, or a part
of either; at a bounded cost.

Redis keeps no index of orders by a part of their id, and the pages must not SCAN for one. So a
part is looked for where a bounded list already is: the tasks Flower holds in memory (its
``FLOWER_MAX_TASKS`` newest, with the order's arguments as ``kwargsrepr`` shows them) and the
newest ``SEARCH_LETTERS`` dead letters. A whole task id is also looked up in the in-flight
registry (one HGET).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass

from mipos_worker.state.inflight import InflightRegistry
from worker.state.deadletters import DeadLetters

SEARCH_LETTERS = 500  # the newest dead letters a search reads
MAX_FOUND = 50
MIN_PART = 3  # a shorter part matches too much to be of use
TASK_ID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_FIELD = re.compile(r"'(store_id|order_external_id)': '((?:[^'\\]|\\.)*)'")

# A task Flower holds: (task id, name, kwargsrepr, received at).
FlowerTask = tuple[str, str | None, str | None, float | None]


@dataclass(frozen=True)
class Found:
    store_id: str
    order_external_id: str
    where: str  # which list it was found in
    task_id: str | None = None
    at: float | None = None  # when that task was received, or the letter failed


@dataclass(frozen=True)
class SearchResult:
    query: str
    found: list[Found]
    problem: str | None = None  # why nothing was searched
    more: bool = False  # stopped at MAX_FOUND


def order_of(kwargs: str | None) -> tuple[str, str] | None:
    """The store and external id in a task's ``kwargsrepr`` (the repr of its arguments)."""
    if not kwargs:
        return None
    try:
        value = ast.literal_eval(kwargs) if len(kwargs) <= 4096 else None
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = None
    if isinstance(value, dict):
        store, order = value.get("store_id"), value.get("order_external_id")
    else:  # cut at 1024 characters, so no longer a whole repr: its fields, one by one
        fields = dict(_FIELD.findall(kwargs))
        store, order = fields.get("store_id"), fields.get("order_external_id")
    if store is None or order is None:
        return None
    return str(store), str(order)


def matches(part: str, store_id: str, order_external_id: str, task_id: str | None) -> bool:
    needle = part.casefold()
    return (needle in order_external_id.casefold() or needle in f"{store_id}/{order_external_id}".casefold()
            or (task_id is not None and needle in task_id.casefold()))


def search(query: str, flower_tasks: Iterable[FlowerTask], letters: DeadLetters,
           inflight: InflightRegistry) -> SearchResult:
    part = query.strip()
    if len(part) < MIN_PART:
        return SearchResult(part, [], f"type at least {MIN_PART} characters of an order id or a task id")
    found: dict[tuple[str, str], Found] = {}

    def add(item: Found) -> bool:
        found.setdefault((item.store_id, item.order_external_id), item)
        return len(found) >= MAX_FOUND

    if TASK_ID.match(part):
        entry = inflight.entry(part.lower())
        kwargs = entry[0].get("kwargs") if entry is not None else None
        if isinstance(kwargs, dict) and kwargs.get("store_id") is not None:
            add(Found(str(kwargs["store_id"]), str(kwargs.get("order_external_id")), "in flight", part.lower(),
                      entry[0].get("enqueued_at") if entry is not None else None))
    needle = part.split("/", 1)[-1].casefold()  # of ``store/order``, the order's part is in the repr
    for task_id, _name, kwargs, received in flower_tasks:
        if needle not in (kwargs or "").casefold() and part.casefold() not in task_id.casefold():
            continue  # the cheap test first: up to FLOWER_MAX_TASKS of them
        order = order_of(kwargs)
        if (order is not None and matches(part, order[0], order[1], task_id)
                and add(Found(order[0], order[1], "Flower's tasks", task_id, received))):
            return SearchResult(part, list(found.values()), more=True)
    for letter in letters.page(SEARCH_LETTERS, max_scan=SEARCH_LETTERS).letters:
        store, order_id = str(letter.order.get("store_id")), str(letter.order.get("order_external_id"))
        if (matches(part, store, order_id, letter.task_id)
                and add(Found(store, order_id, "dead letters", letter.task_id, letter.failed_at))):
            return SearchResult(part, list(found.values()), more=True)
    return SearchResult(part, list(found.values()))
