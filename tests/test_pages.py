"""The operator's pages over HTTP (issue 21): served by the Procfile's ``flower:`` line behind
Flower's authentication, every write a POST with the CSRF token, a read-only user who may look
but not act, everything escaped and cut, and a bounded Redis cost per page.

The browser flows, with workers and the sandbox, are in test_pages_browser.py.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from support.processes import (
    ROOT,
    FlowerProcess,
    RedisServer,
    free_port,
    procfile_command,
    read_json_lines,
    wait_for,
)
from worker.state.deadletters import DeadLetter, DeadLetters

WRITER, READER = "ops", "viewer"
PASSWORDS = {WRITER: f"pw-{secrets.token_urlsafe(9)}", READER: f"pw-{secrets.token_urlsafe(9)}"}
PREFIX = "mipos:"
HOSTILE = "<script>window.__pwned = 1</script>"
BIG_ERROR = HOSTILE + "<div>" + "<b>mipos said no</b>" * 20_000 + "</div>"  # about 300 KB of HTML
MAX_PAGE_BYTES = 80_000  # a page of ordinary size: Flower's Tasks page is about 11 KB


def flower_env(redis_url: str, users_file: Path, **extra: str) -> dict[str, str]:
    """This environment without FLOWER_ variables, pointed at ``redis_url``, with two users."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_") and k != "PORT"}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONUNBUFFERED="1", REDIS_URL=redis_url, FLOWER_ADDRESS="127.0.0.1",
               FLOWER_BASIC_AUTH_FILE=str(users_file), FLOWER_READONLY_USERS=READER, LOG_FORMAT="json")
    env.update(extra)
    return env


def write_users(directory: Path) -> Path:
    path = directory / "flower-users"
    path.write_text("".join(f"{user}:{password}\n" for user, password in PASSWORDS.items()))
    path.chmod(0o600)
    return path


class PagesClient:
    """One user's HTTP session with Flower: basic auth, and the XSRF cookie once a page set it."""

    def __init__(self, base_url: str, user: str | None) -> None:
        self.base_url = base_url
        self.session = requests.Session()
        if user is not None:
            self.session.auth = (user, PASSWORDS[user])

    def get(self, path: str, **params: Any) -> requests.Response:
        return self.session.get(self.base_url + path, params=params, timeout=10, allow_redirects=False)

    def token(self) -> str:
        if "_xsrf" not in self.session.cookies:
            assert self.get("/dead-letters").status_code == 200
        return str(self.session.cookies["_xsrf"])

    def post(self, path: str, data: dict[str, Any], *, token: str | None = "own") -> requests.Response:
        form = dict(data)
        if token == "own":
            form["_xsrf"] = self.token()
        elif token is not None:
            form["_xsrf"] = token
        return self.session.post(self.base_url + path, data=form, timeout=10, allow_redirects=False)


@pytest.fixture(scope="module")
def flower(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory,
           logdir: Path) -> Iterator[FlowerProcess]:
    redis_server.client.flushall()
    env = flower_env(redis_server.url, write_users(tmp_path_factory.mktemp("pages")))
    process = FlowerProcess(env, logdir / f"flower-pages-{uuid.uuid4().hex[:6]}.log", free_port())
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture
def letters(redis_server: RedisServer) -> DeadLetters:
    return DeadLetters(redis_server.client, PREFIX)


def add_letter(letters: DeadLetters, *, order_id: str | None = None, store_id: str = "3",
               error: str = "Order not found.", reason: str = "permanent", action: str = "accept") -> DeadLetter:
    """A dead letter written through the owner's write path, as a worker writes one."""
    order_id = order_id or str(uuid.uuid4())
    now = time.time()
    return letters.add(action=action, order={"delivery_id": "7", "store_id": store_id, "order_external_id": order_id},
                       reason=reason, error=error, task_id=str(uuid.uuid4()), enqueued_at=now - 2,
                       attempts=[{"attempt": 1, "at": now - 1, "outcome": "failed", "http_status": 409,
                                  "error": error, "error_class": "permanent", "elapsed_ms": 3.0}])


def flower_lines(flower: FlowerProcess, event: str) -> list[dict[str, Any]]:
    return [line for line in read_json_lines(flower.log_path) if line.get("event") == event]


# -- served by Flower, behind its authentication -----------------------------------------------


PAGES = ["/orders", "/orders?q=abc", "/order?store=3&id=x", "/dead-letters", "/dead-letter/0123456789abcdef",
         "/dead-letter/0123456789abcdef/replay", "/dead-letters/replay?id=0123456789abcdef"]


@pytest.mark.parametrize("path", PAGES)
def test_every_page_needs_a_login(flower: FlowerProcess, path: str) -> None:
    assert requests.get(flower.url + path, timeout=10).status_code == 401
    assert requests.get(flower.url + path, auth=(WRITER, "wrong"), timeout=10).status_code == 401


def test_flowers_navigation_bar_links_the_pages(flower: FlowerProcess) -> None:
    client = PagesClient(flower.url, WRITER)
    for path in ("/tasks", "/workers", "/dead-letters", "/orders"):
        body = client.get(path).text
        assert 'href="/orders"' in body and 'href="/dead-letters"' in body, path


def test_a_hostile_order_id_and_error_render_as_text_in_a_page_of_normal_size(
        flower: FlowerProcess, letters: DeadLetters) -> None:
    letter = add_letter(letters, order_id=f"{HOSTILE}\u202e-evil", error=BIG_ERROR)
    client = PagesClient(flower.url, WRITER)
    pages = {
        "letter": client.get(f"/dead-letter/{letter.id}"),
        "list": client.get("/dead-letters"),
        "order": client.get("/order", store="3", id=letter.order["order_external_id"]),
        "search": client.get("/orders", q="window.__pwned"),
        "confirm": client.get(f"/dead-letter/{letter.id}/replay"),
    }
    for name, response in pages.items():
        assert response.status_code == 200, (name, response.text[:500])
        body = response.text
        assert "<script>window" not in body, name
        assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in body, name
        shown = re.sub(r'value="[^"]*"', "", body)  # a form's hidden copy of the id stays exact
        assert "\u202e" not in shown and "\\u202e" in body, name  # the override shown, not obeyed
        assert len(response.content) < MAX_PAGE_BYTES, (name, len(response.content))
    assert "more characters not shown" in pages["letter"].text


def test_no_secret_or_token_is_rendered(flower: FlowerProcess, letters: DeadLetters) -> None:
    token = f"eyJ{secrets.token_urlsafe(24)}"
    letter = add_letter(letters, error=f"Unauthenticated. (Authorization: Bearer {token})")
    client = PagesClient(flower.url, WRITER)
    for path in (f"/dead-letter/{letter.id}", "/dead-letters",
                 f"/order?store=3&id={letter.order['order_external_id']}"):
        body = client.get(path).text
        assert token not in body and "Bearer [redacted]" in body, path
        assert PASSWORDS[WRITER] not in body and PASSWORDS[READER] not in body


# -- writes: POST only, with the CSRF token, by a user who may act ------------------------------


def test_replay_and_discard_are_posts_with_the_token_and_are_logged_with_the_user(
        flower: FlowerProcess, letters: DeadLetters) -> None:
    replayed, discarded = add_letter(letters), add_letter(letters)
    client = PagesClient(flower.url, WRITER)

    asked = client.get(f"/dead-letter/{replayed.id}/replay")  # the confirmation step: nothing done yet
    assert asked.status_code == 200 and 'id="confirm-form"' in asked.text and "_xsrf" in asked.text
    assert letters.get(replayed.id).replayed is None  # type: ignore[union-attr]

    answer = client.post(f"/dead-letter/{replayed.id}/replay", {})
    assert answer.status_code == 200 and 'data-result="replayed"' in answer.text
    claim = letters.get(replayed.id).replayed  # type: ignore[union-attr]
    assert claim is not None and claim["task_id"] in answer.text
    again = client.post(f"/dead-letter/{replayed.id}/replay", {})
    assert 'data-result="already_replayed"' in again.text and "already replayed as task" in again.text

    gone = client.post(f"/dead-letter/{discarded.id}/discard", {})
    assert gone.status_code == 200 and 'data-result="discarded"' in gone.text
    assert letters.get(discarded.id) is None
    assert client.get(f"/dead-letter/{discarded.id}").status_code == 404

    [line] = [x for x in flower_lines(flower, "dead_letter_replayed") if x.get("letter_id") == replayed.id]
    assert line["user"] == WRITER and line["task_id"] == claim["task_id"]
    assert line["order_external_id"] == replayed.order["order_external_id"]
    [line] = [x for x in flower_lines(flower, "dead_letter_discarded") if x.get("letter_id") == discarded.id]
    assert line["user"] == WRITER and line["reason"] == "permanent"


def test_a_post_without_the_token_is_refused(flower: FlowerProcess, letters: DeadLetters) -> None:
    letter = add_letter(letters)
    client = PagesClient(flower.url, WRITER)
    other = PagesClient(flower.url, WRITER)
    other_token = other.token()
    client.token()  # this session has a cookie of its own

    for token in (None, "", "2|00000000|" + "0" * 32 + "|0"):
        answer = client.post(f"/dead-letter/{letter.id}/replay", {}, token=token)
        assert answer.status_code == 403, token
    forged = requests.post(flower.url + f"/dead-letter/{letter.id}/discard", auth=(WRITER, PASSWORDS[WRITER]),
                           data={"_xsrf": other_token}, timeout=10)  # a token without its cookie
    assert forged.status_code == 403
    cross_site = client.session.post(flower.url + f"/dead-letter/{letter.id}/discard", timeout=10,
                                     data={"_xsrf": client.token()}, headers={"Sec-Fetch-Site": "cross-site"})
    assert cross_site.status_code == 403  # a form on another site, posting with the user's cookie
    own = client.post(f"/dead-letter/{letter.id}/discard", {})
    assert own.status_code == 200  # the control: the same POST from the page itself works
    assert letters.get(letter.id) is None
    assert not [x for x in flower_lines(flower, "dead_letter_replayed") if x.get("letter_id") == letter.id]


def test_a_get_changes_nothing(flower: FlowerProcess, letters: DeadLetters) -> None:
    letter = add_letter(letters)
    client = PagesClient(flower.url, WRITER)
    for path in (f"/dead-letter/{letter.id}/replay", f"/dead-letter/{letter.id}/discard",
                 f"/dead-letters/replay?id={letter.id}"):
        assert client.get(path).status_code == 200
    current = letters.get(letter.id)
    assert current is not None and current.replayed is None


def test_a_read_only_user_sees_no_button_and_a_forged_post_gets_403(flower: FlowerProcess,
                                                                     letters: DeadLetters) -> None:
    letter = add_letter(letters)
    reader = PagesClient(flower.url, READER)
    for path in ("/dead-letters", f"/dead-letter/{letter.id}", f"/dead-letter/{letter.id}/replay",
                 f"/order?store=3&id={letter.order['order_external_id']}"):
        answer = reader.get(path)
        assert answer.status_code == 200, path
        body = answer.text
        assert "Replay selected" not in body and 'id="replay"' not in body and 'id="discard"' not in body
        assert 'id="confirm-form"' not in body and 'id="replay-last"' not in body and 'type="checkbox"' not in body
    for path in (f"/dead-letter/{letter.id}/replay", f"/dead-letter/{letter.id}/discard", "/dead-letters/replay"):
        assert reader.post(path, {"id": letter.id}).status_code == 403, path  # with a valid token
    # Flower's own writes too: its API refuses the read-only user's POST.
    assert reader.post("/api/task/revoke/" + str(uuid.uuid4()), {}).status_code == 403
    current = letters.get(letter.id)
    assert current is not None and current.replayed is None


def test_replay_of_selected_letters_with_the_clis_refusals(flower: FlowerProcess, letters: DeadLetters) -> None:
    fine, invalid = add_letter(letters, store_id="41"), add_letter(letters, store_id="41", reason="invalid")
    client = PagesClient(flower.url, WRITER)
    asked = client.get("/dead-letters/replay", id=[fine.id, invalid.id])
    assert asked.status_code == 200 and "Replay 2 dead letters?" in asked.text

    answer = client.post("/dead-letters/replay", {"id": [fine.id, invalid.id, "0123456789abcdef"]})
    assert answer.status_code == 200
    assert f'data-letter="{fine.id}" data-result="replayed"' in answer.text
    assert f'data-letter="{invalid.id}" data-result="not_replayable"' in answer.text
    assert "its arguments are invalid" in answer.text and "enqueue a corrected order instead" in answer.text
    assert 'data-letter="0123456789abcdef" data-result="missing"' in answer.text
    refused = [x for x in flower_lines(flower, "dead_letter_replay_refused") if x.get("letter_id") == invalid.id]
    assert refused and refused[0]["user"] == WRITER and refused[0]["result"] == "not_replayable"


# -- the list: filters, counts, pages ------------------------------------------------------------


def test_the_list_filters_counts_and_pages(flower: FlowerProcess, letters: DeadLetters,
                                           redis_server: RedisServer) -> None:
    redis_server.client.flushall()
    ids = [add_letter(letters, store_id="52", reason="attempts" if n % 3 == 0 else "permanent",
                      action="deny" if n % 4 == 0 else "accept").id for n in range(60)]
    client = PagesClient(flower.url, WRITER)

    first = client.get("/dead-letters").text
    assert first.index(ids[-1]) < first.index(ids[-2])  # newest first
    assert ids[0] not in first and 'id="older"' in first  # 50 a page
    assert 'data-reason="attempts">attempts 20<' in first and 'data-reason="permanent">permanent 40<' in first
    older_link = first.split('id="older" href="')[1].split('"')[0].replace("&amp;", "&")
    second = client.get(older_link).text
    assert ids[0] in second and ids[-1] not in second

    denies = client.get("/dead-letters", action="deny", reason="attempts").text
    expected = {ids[n] for n in range(60) if n % 4 == 0 and n % 3 == 0}
    shown = {i for i in ids if f'data-letter="{i}"' in denies}
    assert shown == expected
    assert client.get("/dead-letters", store="53").text.count("data-letter=") == 0
    assert "data-letter=" not in client.get("/dead-letters", since="2000-01-01", until="2000-01-02").text
    problems = client.get("/dead-letters", reason="nope", since="yesterday-ish").text
    assert "no reason" in problems and "neither a duration" in problems


def commands(client: redis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def test_a_page_costs_bounded_redis_work(flower: FlowerProcess, letters: DeadLetters,
                                         redis_server: RedisServer) -> None:
    """No KEYS, no SCAN, and the letters of one page, however many are stored."""
    for n in range(1500):
        add_letter(letters, store_id="61" if n % 2 else "62")
    letter = add_letter(letters)
    client = PagesClient(flower.url, WRITER)
    before = commands(redis_server.client)
    for path, params in [("/dead-letters", {}), ("/dead-letters", {"store": "nobody", "reason": "deadline"}),
                         (f"/dead-letter/{letter.id}", {}), ("/orders", {"q": "no-such-order"}),
                         ("/order", {"store": "3", "id": letter.order["order_external_id"]})]:
        assert client.get(path, **params).status_code == 200
    after = commands(redis_server.client)
    spent = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    assert not {"keys", "scan", "sscan", "hscan", "zscan", "hgetall", "hvals", "hkeys", "smembers"} & set(spent)
    # one page of 50, a filtered page examining at most 1000, a search's 500, one letter, one order
    assert spent.get("get", 0) <= 2 * (50 + 1000 + 500 + 10) + 40, spent


# -- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "needle"), [
    ("nobody", "FLOWER_READONLY_USERS names 'nobody', not a user"),
    (f"{READER},opz", "'opz'"),
])
def test_a_read_only_name_that_is_no_user_is_refused_at_start(redis_server: RedisServer, tmp_path: Path,
                                                              value: str, needle: str) -> None:
    env = flower_env(redis_server.url, write_users(tmp_path), FLOWER_READONLY_USERS=value, PORT=str(free_port()))
    result = subprocess.run(["bash", "-c", f"exec {procfile_command('flower')}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2, result
    [line] = result.stderr.strip().splitlines()
    assert needle in line and "Traceback" not in result.stderr
    assert PASSWORDS[WRITER] not in result.stderr + result.stdout


def answers(process: FlowerProcess, path: str) -> bool:
    if process.proc.poll() is not None:
        raise AssertionError(f"flower exited:\n{process.log_path.read_text()[-2000:]}")
    try:
        return process.get(path, timeout=1.0) == (200, "OK")
    except OSError:
        return False


def test_the_pages_follow_flowers_url_prefix_and_run_without_users_locally(
        redis_server: RedisServer, tmp_path: Path, logdir: Path) -> None:
    env = flower_env(redis_server.url, write_users(tmp_path), FLOWER_URL_PREFIX="ops")
    local = {k: v for k, v in flower_env(redis_server.url, tmp_path / "none").items()
             if k not in ("FLOWER_BASIC_AUTH_FILE", "FLOWER_READONLY_USERS")}
    local["FLOWER_LOCAL"] = "true"
    letter = add_letter(DeadLetters(redis_server.client, PREFIX))
    for name, environment in (("prefix", env), ("local", local)):
        process = FlowerProcess(environment, logdir / f"flower-pages-{name}-{uuid.uuid4().hex[:6]}.log", free_port())
        try:
            base = "/ops" if name == "prefix" else ""
            wait_for(functools.partial(answers, process, f"{base}/healthcheck"), timeout=30, what=f"Flower ({name})")
            client = PagesClient(process.url + base, WRITER if name == "prefix" else None)
            listed = client.get("/dead-letters")
            assert listed.status_code == 200, name
            assert f'href="{base}/orders"' in listed.text and f'href="{base}/dead-letter/{letter.id}"' in listed.text
            if name == "local":  # no users: no login, but a write still needs the token
                assert client.post(f"/dead-letter/{letter.id}/replay", {}, token=None).status_code == 403
                assert 'data-result="replayed"' in client.post(f"/dead-letter/{letter.id}/replay", {}).text
        finally:
            process.stop()
