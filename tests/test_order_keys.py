"""Order keys (issue 11, item 9): one Redis key per order, whatever its ids contain."""

from __future__ import annotations

import itertools
from types import ModuleType

import pytest

from support.processes import wait_for
from tests.conftest import Cluster, new_order_id
from mipos_worker.order.errors import InvalidOrder
from mipos_worker.order.model import Action, Order, order_key, parse_order_request

ACCEPT_PATH = "/api/v1/integration/order/accept"

# Pieces that break naive joins: the separator, the escape character and its
# escapes, what a length prefix looks like, and unicode.
TRICKY_PIECES = ["", "/", "//", "%", "%2F", "%2f", "%25", "12", "7", "abc", "12/7", "7/abc",
                 "3:", ":", "1:a", "a b", "é", "注文", "🙂", "\\", "None"]


def tricky_ids() -> list[str]:
    return sorted({a + b for a, b in itertools.product(TRICKY_PIECES, repeat=2)})


def test_the_reported_collision_has_two_keys() -> None:
    assert order_key("12/7", "abc") != order_key("12", "7/abc")


def test_no_two_different_orders_share_a_key() -> None:
    ids = tricky_ids()
    keys: dict[str, tuple[str, str]] = {}
    for store, order in itertools.product(ids, repeat=2):
        key = order_key(store, order)
        assert keys.setdefault(key, (store, order)) == (store, order), \
            f"{(store, order)} and {keys[key]} share the key {key!r}"
    assert len(keys) == len(ids) ** 2


def test_the_key_of_an_ordinary_order_is_unchanged() -> None:
    """Store ids without ``/`` or ``%`` keep the key the previous version wrote (see the README)."""
    assert order_key("3", "01f1b8ce-abc") == "3/01f1b8ce-abc"
    assert order_key(3, "x/y") == "3/x/y"
    assert Order("1", "12/7", "abc").key == order_key("12/7", "abc")


def test_the_same_order_by_int_or_string_is_one_key() -> None:
    a = parse_order_request(Action.ACCEPT, {"delivery_id": 1, "store_id": 12, "order_external_id": 7})
    b = parse_order_request(Action.ACCEPT, {"delivery_id": "1", "store_id": "12",
                                            "order_external_id": " 7 "})
    assert a.order.key == b.order.key


@pytest.mark.parametrize("bad", ["a\x00b", "line\nbreak", "\x1b[31mred", "tab\there", "del\x7f",
                                 "c\x85one", "c\rr", "\ud800"])
@pytest.mark.parametrize("field", ["delivery_id", "store_id", "order_external_id"])
def test_control_characters_are_refused_naming_the_field(field: str, bad: str) -> None:
    arguments = {"delivery_id": "1", "store_id": "3", "order_external_id": "o-1", field: bad}
    with pytest.raises(InvalidOrder) as caught:
        parse_order_request(Action.ACCEPT, arguments)
    assert caught.value.field == field
    assert "control character" in str(caught.value) or "surrogate" in str(caught.value)


def test_surrounding_whitespace_is_still_trimmed() -> None:
    request = parse_order_request(Action.ACCEPT, {"delivery_id": "1\n", "store_id": "\t3",
                                                  "order_external_id": " o-1\r\n"})
    assert request.order.fields() == {"delivery_id": "1", "store_id": "3", "order_external_id": "o-1"}


@pytest.mark.parametrize("good", ["Café-12", "注文/1", "🙂", "a%2Fb", "zero\u200bwidth", "12/7"])
def test_ordinary_unicode_is_accepted(good: str) -> None:
    request = parse_order_request(Action.ACCEPT, {"delivery_id": good, "store_id": good,
                                                  "order_external_id": good})
    assert request.order.fields() == {"delivery_id": good, "store_id": good,
                                      "order_external_id": good}


def test_delay_refuses_a_control_character_and_enqueues_nothing(cluster: Cluster,
                                                                tasks: ModuleType) -> None:
    before = cluster.redis.client.llen("mipos")
    with pytest.raises(ValueError, match="order_external_id"):
        tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id="o\n1")
    assert cluster.redis.client.llen("mipos") == before


def test_orders_whose_ids_join_alike_are_each_accepted(cluster: Cluster, tasks: ModuleType) -> None:
    """("12/7", X) and ("12", "7/" + X) once shared a ledger entry: the second was skipped."""
    suffix = new_order_id()
    first = ("12/7", suffix)
    second = ("12", f"7/{suffix}")
    for delivery_id, (store, order) in enumerate((first, second), start=1):
        tasks.accept_order.delay(delivery_id=delivery_id, store_id=store, order_external_id=order)
    for _, order in (first, second):
        [line] = cluster.wait_final(order)
        assert line["outcome"] == "accepted", line

    def accepts(store: str, order: str) -> list[dict[str, object]]:
        return [r for r in cluster.control.requests(order_external_id=order)
                if r["path"] == ACCEPT_PATH and r["status"] == 200
                and r["body"].get("store_id") == store]

    wait_for(lambda: accepts(*first) and accepts(*second), timeout=10, what="both accepts recorded")
    assert len(accepts(*first)) == 1
    assert len(accepts(*second)) == 1
