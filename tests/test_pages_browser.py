"""The operator's pages in a real headless Chromium, against real Redis, a real worker (the
Procfile's line), the Procfile's Flower and the sandbox mipos (issue 21, item 4):

- an order retries and is dead-lettered; a user logs in, finds it by a part of its id, reads
  why, asks mipos, replays it, and the sandbox accepts it;
- a hostile error body (``<script>``, 300 KB of HTML) renders as text in a page of normal size;
- a read-only user sees no buttons, and a forged POST gets 403;
- a POST without the CSRF token is refused.
"""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from bench.browser import BrowserMissing, chromium_executable
from bench.pages_browser import PagesBrowser, pages_browser
from support.processes import (
    ROOT,
    FlowerProcess,
    RedisServer,
    free_port,
    read_json_lines,
    wait_for,
)
from tests.conftest import Cluster, dead_letter_of, new_order_id
from tests.test_pages import (
    BIG_ERROR,
    HOSTILE,
    MAX_PAGE_BYTES,
    PASSWORDS,
    READER,
    WRITER,
    add_letter,
    write_users,
)
from worker.state.deadletters import DeadLetters

STORE = "3"


@pytest.fixture(scope="module", autouse=True)
def require_chromium() -> None:
    try:
        chromium_executable()
    except BrowserMissing as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def flower(cluster: Cluster, logdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerProcess]:
    """The flower: line with the workers' environment (so Ask mipos can ask), two users, one read-only."""
    users = write_users(tmp_path_factory.mktemp("pages-browser"))
    env = {**{k: v for k, v in cluster.env.items() if not k.startswith("FLOWER_")},
           "FLOWER_BASIC_AUTH_FILE": str(users), "FLOWER_READONLY_USERS": READER, "FLOWER_ADDRESS": "127.0.0.1"}
    process = FlowerProcess(env, logdir / f"flower-pages-browser-{uuid.uuid4().hex[:6]}.log", free_port())
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def writer(flower: FlowerProcess) -> tuple[str, str]:
    return WRITER, PASSWORDS[WRITER]


def no_script_ran(browser: PagesBrowser) -> bool:
    return bool(browser.page.evaluate("() => window.__pwned === undefined"))


def test_a_failed_order_is_found_read_replayed_and_accepted(cluster: Cluster, flower: FlowerProcess,
                                                            tasks: ModuleType, redis_server: RedisServer) -> None:
    order_id = new_order_id()
    cluster.control.deliver(STORE, 901, order_id, order_number="A-901")  # mipos waits for it
    cluster.control.add_faults(order_id, {"status": 500, "message": "Server Error"},
                               {"status": 409, "message": "Order not found.", "times": -1})
    task_id = tasks.accept_order.delay(delivery_id="901", store_id=STORE, order_external_id=order_id).id
    letter = dead_letter_of(redis_server, order_id)

    with pages_browser(flower.url, writer(flower)) as browser:
        browser.open("/tasks")
        assert browser.has("a.nav-link[href='/orders']") and browser.has("a.nav-link[href='/dead-letters']")
        browser.click_and_wait("a.nav-link[href='/orders']")
        browser.page.fill("#q", order_id[9:18])  # a part of the id, from its middle
        browser.click_and_wait("form[role=search] button[type=submit]")
        found = browser.text("#found")
        assert order_id in found and STORE in found

        browser.click_and_wait(f"#found a:has-text('{order_id}')")
        assert browser.text("#state") == "dead-lettered"
        assert "Order not found." in browser.text("#summary") and letter.id in browser.text("#summary")
        rows = browser.page.locator("#timeline tbody tr").all_inner_texts()
        assert len(rows) == 2 and "retrying" in rows[0] and "500" in rows[0] and task_id[:8] in rows[0]
        assert "failed" in rows[1] and "409" in rows[1] and "Order not found." in rows[1]

        browser.click_and_wait("#ask-mipos")
        assert "mipos lists the order as pending" in browser.text("#asked")

        browser.click_and_wait(f"#order-letters a:has-text('{letter.id}')")  # why, in full
        assert browser.text("#reason") == "permanent" and "Order not found." in browser.text("#error")

        cluster.control.clear_faults(order_id)  # the cause fixed
        browser.click_and_wait("#replay")
        assert "Replay 1 dead letter?" in browser.text("#question")
        browser.click_and_wait("#confirm")
        outcome = browser.page.locator(f"#outcomes li[data-letter='{letter.id}']")
        assert outcome.get_attribute("data-result") == "replayed"
        assert "replayed: enqueued as task" in outcome.inner_text()

        browser.click_and_wait(f"#outcomes li[data-letter='{letter.id}'] a:has-text('{order_id}')")
        assert browser.reload_until("#state", "accepted") == "accepted"
        assert "replay" not in browser.text("#state")

    accepted = [r for r in cluster.control.requests(order_id) if r.get("status") == 200]
    assert len(accepted) == 1  # the sandbox accepted it, once
    lines = [x for x in read_json_lines(flower.log_path) if x.get("event") == "dead_letter_replayed"
             and x.get("letter_id") == letter.id]
    assert len(lines) == 1 and lines[0]["user"] == WRITER and lines[0]["order_external_id"] == order_id


def test_a_hostile_error_body_renders_as_text_in_a_page_of_normal_size(
        cluster: Cluster, flower: FlowerProcess, tasks: ModuleType, redis_server: RedisServer) -> None:
    """mipos answers 300 KB of HTML (the worker keeps "HTTP 422"), and a JSON message holding a
    ``<script>`` (the worker keeps its first 500 characters); a letter holds the whole 300 KB (as one
    written by an older version or another writer may): every page shows them as text, cut."""
    html_order, script_order = new_order_id(), new_order_id()
    cluster.control.add_faults(html_order, {"status": 422, "raw_body": BIG_ERROR, "times": -1})
    cluster.control.add_faults(script_order, {"status": 422, "body": {"message": [BIG_ERROR[:20_000]]},
                                              "times": -1})
    for number, order_id in enumerate((html_order, script_order), start=902):
        tasks.accept_order.delay(delivery_id=str(number), store_id=STORE, order_external_id=order_id)
    html_letter = dead_letter_of(redis_server, html_order)
    script_letter = dead_letter_of(redis_server, script_order)
    assert HOSTILE in str(script_letter.error)
    stored = add_letter(DeadLetters(redis_server.client, "mipos:"), error=BIG_ERROR,
                        order_id=f"{HOSTILE}-{uuid.uuid4().hex[:6]}")

    with pages_browser(flower.url, writer(flower)) as browser:
        for path, shows_script in ((f"/dead-letter/{html_letter.id}", False), (f"/dead-letter/{script_letter.id}", True),
                                   (f"/dead-letter/{stored.id}", True), ("/dead-letters", True),
                                   (f"/order?store={STORE}&id={script_order}", True), ("/orders?q=__pwned", True)):
            response = browser.open(path)
            assert no_script_ran(browser), path
            body = response.body()
            assert len(body) < MAX_PAGE_BYTES, (path, len(body))
            if shows_script:
                assert "<script>window.__pwned" in browser.page.inner_text("body"), path  # shown as text
            height = browser.page.evaluate("() => document.documentElement.scrollHeight")
            assert height < 6000, (path, height)
        browser.open(f"/dead-letter/{stored.id}")
        assert len(browser.text("#error")) <= 4100 and "more characters not shown" in browser.text("#error-cut")


def test_a_read_only_user_sees_no_buttons_and_a_forged_post_gets_403(flower: FlowerProcess,
                                                                     redis_server: RedisServer) -> None:
    letters = DeadLetters(redis_server.client, "mipos:")
    letter = add_letter(letters)
    with pages_browser(flower.url, (READER, PASSWORDS[READER])) as browser:
        browser.open("/dead-letters")
        assert browser.has(f"#letters tr[data-letter='{letter.id}']")
        assert not browser.has("#replay-selected") and not browser.has("#letters input[type=checkbox]")
        browser.open(f"/dead-letter/{letter.id}")
        assert not browser.has("#replay") and not browser.has("#discard")
        browser.open(f"/dead-letter/{letter.id}/replay")
        assert not browser.has("#confirm-form") and "may look, not act" in browser.text("main")
        token = browser.cookie("_xsrf")
        assert token
        for path in (f"/dead-letter/{letter.id}/replay", f"/dead-letter/{letter.id}/discard"):
            assert browser.post(path, {"_xsrf": token, "id": letter.id}) == 403
    current = letters.get(letter.id)
    assert current is not None and current.replayed is None


def test_a_post_without_the_csrf_token_is_refused(flower: FlowerProcess, redis_server: RedisServer) -> None:
    letters = DeadLetters(redis_server.client, "mipos:")
    letter = add_letter(letters)
    with pages_browser(flower.url, writer(flower)) as browser:
        browser.open(f"/dead-letter/{letter.id}/discard")  # the confirmation page: the cookie is set
        assert browser.cookie("_xsrf")
        assert browser.post(f"/dead-letter/{letter.id}/discard", {"id": letter.id}) == 403
        assert browser.post(f"/dead-letter/{letter.id}/discard", {"_xsrf": "forged"}) == 403
        assert letters.get(letter.id) is not None
        browser.click_and_wait("#confirm")  # the page's own form carries it
        assert browser.page.locator("#outcomes li").get_attribute("data-result") == "discarded"
    wait_for(lambda: letters.get(letter.id) is None, timeout=5, what="the letter to be gone")


def test_the_url_make_run_prints_shows_the_demo_order_and_replays_it(
        cluster: Cluster, flower: FlowerProcess, tasks: ModuleType, redis_server: RedisServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``make run`` (scripts/run_local.py) enqueues its demo orders and prints the page of the one that is
    dead-lettered: here with this test's sandbox, Redis and Flower."""
    spec = importlib.util.spec_from_file_location("run_local_for_pages", ROOT / "scripts" / "run_local.py")
    assert spec is not None and spec.loader is not None
    run_local = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_local)
    monkeypatch.setattr(run_local, "FLOWER_PORT", flower.port)

    ids = run_local.enqueue_demo(cluster.sandbox.url)
    dead = ids[-1]
    letter = dead_letter_of(redis_server, dead)
    url = run_local.order_page_url(dead)
    assert url.startswith(f"{flower.url}/order?store=3&id=")

    with pages_browser(flower.url, writer(flower)) as browser:
        browser.open(url.removeprefix(flower.url))
        assert browser.text("#state") == "dead-lettered" and letter.id in browser.text("#summary")
        cluster.control.clear_faults(dead)  # what the printed line says to do first
        browser.click_and_wait("#replay-last")
        browser.click_and_wait("#confirm")
        assert browser.page.locator("#outcomes li").get_attribute("data-result") == "replayed"
        browser.open(url.removeprefix(flower.url))
        assert browser.reload_until("#state", "accepted") == "accepted"
