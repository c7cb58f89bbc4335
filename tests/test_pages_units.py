"""The pure parts of the operator's pages: the order's state and notes, the list's filters,
the search's reading of Flower's task arguments, the display's cuts, the navigation bar."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import pytest

from mipos_worker.order.model import Order
from worker.ops.flower import ConfigError, configure
from worker.ops.order_status import OrderStatus, TaskStatus
from worker.pages.display import block, shown
from worker.pages.filters import parse_filters, parse_time
from worker.pages.navigation import NAV_LINKS, with_our_links
from worker.pages.order_view import order_page, pending_answer
from worker.pages.search import matches, order_of
from worker.state.deadletters import DeadLetter
from worker.state.ledger import LedgerEntry

NOW = 1_800_000_000.0
ORDER = Order(delivery_id="6", store_id="3", order_external_id="4ac4ef09-05bb")


def status(state: str, *, tasks: list[TaskStatus], done: LedgerEntry | None = None,
           letters: list[DeadLetter] | None = None) -> OrderStatus:
    return OrderStatus(order=ORDER, state=state, summary="the summary", done=done, tasks=tasks,  # type: ignore[arg-type]
                       dead_letters=letters or [])


def task(task_id: str, attempts: list[dict[str, Any]], *, final: bool = True, next_at: float | None = None,
         held: bool = False) -> TaskStatus:
    return TaskStatus(task_id=task_id, action="accept", final=final, next_attempt_at=next_at,
                      held_by_breaker=held, attempts=attempts)


def test_states_as_the_operator_names_them() -> None:
    waiting = status("retrying", tasks=[task("t1", [{"attempt": 1, "at": NOW - 5}], final=False, next_at=NOW + 30)])
    assert order_page(waiting, NOW).state == "waiting"
    assert "until" in order_page(waiting, NOW).summary
    due = status("pending", tasks=[task("t1", [], final=False, next_at=NOW - 1)])
    assert order_page(due, NOW).state == "in flight"
    held = status("held", tasks=[task("t1", [], final=False, held=True)])
    assert order_page(held, NOW).state == "held by the breaker"
    gone = status("pending", tasks=[task("t1", [{"attempt": 1, "at": NOW - 5}])])  # its letter discarded
    assert order_page(gone, NOW).state == "unknown"
    done = LedgerEntry("deny", "t1", NOW, "6")
    assert order_page(status("denied", tasks=[task("t1", [])], done=done), NOW).state == "denied"


def test_the_timeline_has_every_attempt_with_its_task_and_wait() -> None:
    attempts = [{"attempt": 1, "at": NOW - 9, "outcome": "retrying", "http_status": 500, "error": "Server Error",
                 "error_class": "transient", "elapsed_ms": 12.0, "retry_in_s": 0.1},
                {"attempt": 1, "at": NOW - 1, "outcome": "accepted", "http_status": 200, "elapsed_ms": 3.0}]
    page = order_page(status("accepted", tasks=[task("t1", attempts[:1]), task("t2", attempts[1:])],
                             done=LedgerEntry("accept", "t2", NOW, "6")), NOW)
    assert [(r.task_id, r.outcome, r.http_status, r.wait_before_next) for r in page.timeline] == [
        ("t1", "retrying", "500", "100ms"), ("t2", "accepted", "200", "")]
    assert page.timeline[0].took == "12ms" and page.done is not None and page.done["task"] == "t2"


def test_a_success_after_an_unanswered_request_is_a_possible_duplicate() -> None:
    attempts = [{"attempt": 1, "at": NOW - 9, "outcome": "unknown", "outcome_unknown": True},
                {"attempt": 2, "at": NOW - 1, "outcome": "accepted", "http_status": 200}]
    page = order_page(status("accepted", tasks=[task("t1", attempts)], done=LedgerEntry("accept", "t1", NOW, "6")))
    kinds = [note.kind for note in page.notes]
    assert kinds == ["settle", "duplicate"]
    assert "possible duplicate" in page.notes[1].text
    settled = LedgerEntry("accept", "t1", NOW, "6", confirmed_by="pending_list")
    page = order_page(status("accepted", tasks=[task("t1", attempts)], done=settled))
    assert [note.kind for note in page.notes] == ["settle", "settle"]
    assert "settled by mipos's pending list" in page.notes[1].text and "accepted there" in page.notes[1].text


def test_ask_mipos_says_for_how_much_longer() -> None:
    assert "for about 7m00s more" in pending_answer(True, NOW - 180, 600, NOW)
    assert "does not list the order" in pending_answer(False, None, 600, NOW)


def test_filters_from_a_query_string() -> None:
    values = {"reason": "attempts", "store": " 3 ", "action": "deny", "since": "2h", "until": "2027-01-15 08:00"}
    filters, problems = parse_filters(lambda name: values.get(name, ""), now=NOW)
    assert problems == []
    assert (filters.reason, filters.store, filters.action, filters.since) == ("attempts", "3", "deny", NOW - 7200)
    assert filters.until == parse_time("2027-01-15T08:00:00Z", NOW)
    assert filters.start() == repr(filters.until) and filters.query(before="1.5:ab")["before"] == "1.5:ab"
    bad = {"reason": "<x>", "action": "drop", "since": "soon", "before": "1;DROP"}
    filters, problems = parse_filters(lambda name: bad.get(name, ""), now=NOW)
    assert len(problems) == 4 and not filters.filtered and filters.before is None


def test_the_order_in_a_tasks_kwargsrepr() -> None:
    assert order_of("{'delivery_id': '6', 'store_id': '3', 'order_external_id': 'ab/c'}") == ("3", "ab/c")
    cut = "{'delivery_id': '6', 'store_id': '3', 'order_external_id': 'x', 'message': 'Out of sto…"
    assert order_of(cut) == ("3", "x")
    assert order_of("garbage") is None and order_of(None) is None
    assert matches("EF09", "3", "4ac4ef09-05bb", None) and matches("3/4ac", "3", "4ac4ef09-05bb", None)
    assert matches("8f2a", "3", "zzz", "00008f2a-1111") and not matches("nope", "3", "zzz", "t")


def test_display_cuts_and_shows_hidden_characters() -> None:
    long = shown("x" * 500, 100)
    assert long.cut == 400 and long.text == "x" * 100 + "…"
    assert shown("a\u202eb\x1b[31m").text == "a\\u202eb\\x1b[31m"
    text = block("line one\nline two\u2028" + "y" * 10_000, 50)
    assert text.text.startswith("line one\nline two\\u2028") and text.cut > 9_000


def test_our_links_go_at_the_end_of_flowers_first_navigation_list() -> None:
    navbar = b'<ul class="a"><li>Workers</li></ul><ul class="b"><li>theme</li></ul>'
    assert with_our_links(navbar) == b'<ul class="a"><li>Workers</li>' + NAV_LINKS + b'</ul><ul class="b"><li>theme</li></ul>'
    assert with_our_links(b"<div>no list</div>") == b"<div>no list</div>"


@pytest.mark.parametrize(("environ", "readonly"), [
    ({"FLOWER_BASIC_AUTH": "ops:pw"}, frozenset()),
    ({"FLOWER_BASIC_AUTH": "ops:pw", "FLOWER_READONLY_USERS": " ops , "}, frozenset({"ops"})),
])
def test_read_only_users_are_configured_users(environ: MutableMapping[str, str], readonly: frozenset[str]) -> None:
    settings = configure(dict(environ))
    assert settings.readonly_users == readonly
    assert settings.is_readonly("ops") == bool(readonly) and not settings.is_readonly(None)


@pytest.mark.parametrize("environ", [
    {"FLOWER_BASIC_AUTH": "ops:pw", "FLOWER_READONLY_USERS": "viewer"},
    {"FLOWER_LOCAL": "true", "FLOWER_READONLY_USERS": "viewer"},
    {"FLOWER_BASIC_AUTH": "ops:pw", "LOG_FORMAT": "xml"},
])
def test_a_read_only_name_that_is_no_user_or_a_bad_log_format_is_refused(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        configure(environ)
