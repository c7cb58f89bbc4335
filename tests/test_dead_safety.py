"""``dead replay --all`` and ``dead purge`` ask first (issue 25, item 9).

With stdin at /dev/null, ``dead replay --all`` re-sent every dead letter to mipos, and
``dead purge --older-than 0`` deleted letters that had failed seconds earlier. Now: at a
terminal they ask, showing the count; elsewhere they need ``--yes`` (exit 2 without it);
and a purge never takes letters younger than an hour, which an operator (or doctor's
"dead letters in the last hour") may not have seen yet.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from typing import Any

import pytest

from support.processes import ROOT
from tests.conftest import Cluster, new_order_id
from tests.pty_terminal import CLI, Terminal
from worker.state.deadletters import DeadLetter, DeadLetters


def run(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """The console script with stdin at /dev/null, as from cron, CI or a pipe."""
    return subprocess.run([CLI, *args], check=False, cwd=ROOT, env=cluster.env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)


def store_of_its_own() -> str:
    return str(uuid.uuid4().int % 10**9)


def add_letter(cluster: Cluster, store: str, age_s: float = 0.0) -> DeadLetter:
    """A permanent failure of an order of ``store``, failed ``age_s`` ago."""
    letters = DeadLetters(cluster.redis.client, "mipos:")
    letter = letters.add(action="accept", order={"delivery_id": "1", "store_id": store,
                                                 "order_external_id": new_order_id()},
                         reason="permanent", error="Order not found.", task_id=new_order_id(),
                         enqueued_at=None, attempts=[])
    if age_s:
        backdate(cluster, letter.id, age_s)
    return letter


def backdate(cluster: Cluster, letter_id: str, age_s: float) -> None:
    """Make a stored letter look as if it failed ``age_s`` earlier than it did."""
    letters = DeadLetters(cluster.redis.client, "mipos:")
    stored = json.loads(cluster.redis.client.get(letters.item_prefix + letter_id))
    failed_at = stored["failed_at"] - age_s
    cluster.redis.client.set(letters.item_prefix + letter_id,
                             json.dumps({**stored, "failed_at": failed_at}), keepttl=True)
    cluster.redis.client.zadd(letters.index_key, {letter_id: failed_at})


def exists(cluster: Cluster, letter: DeadLetter) -> bool:
    return DeadLetters(cluster.redis.client, "mipos:").get(letter.id) is not None


def replayed(cluster: Cluster, letter: DeadLetter) -> Any:
    current = DeadLetters(cluster.redis.client, "mipos:").get(letter.id)
    return current.replayed if current else None


def sent_to_mipos(cluster: Cluster, letters: list[DeadLetter]) -> list[dict[str, Any]]:
    return [r for x in letters for r in cluster.control.requests(order_external_id=x.order["order_external_id"])]


def older_than_an_hour(cluster: Cluster) -> int:
    letters = DeadLetters(cluster.redis.client, "mipos:")
    return int(cluster.redis.client.zcount(letters.index_key, "-inf", time.time() - 3600))


# -- replay --all ---------------------------------------------------------------------------


def test_replay_all_without_a_terminal_needs_yes(cluster: Cluster) -> None:
    store = store_of_its_own()
    letters = [add_letter(cluster, store) for _ in range(3)]
    before = cluster.redis.client.llen("mipos")

    refused = run(cluster, "dead", "replay", "--all", "--store", store)
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    assert "would replay 3 dead letters" in refused.stderr and "--yes" in refused.stderr
    assert refused.stdout == ""
    assert [replayed(cluster, x) for x in letters] == [None] * 3
    assert cluster.redis.client.llen("mipos") == before and sent_to_mipos(cluster, letters) == []

    done = run(cluster, "dead", "replay", "--all", "--store", store, "--yes")
    assert done.returncode == 0, done.stderr
    assert "3 replayed" in done.stdout
    assert all(replayed(cluster, x) for x in letters)


def test_replay_of_one_letter_by_its_id_needs_no_yes(cluster: Cluster) -> None:
    letter = add_letter(cluster, store_of_its_own())
    result = run(cluster, "dead", "replay", letter.id)
    assert result.returncode == 0 and "replayed: enqueued as task" in result.stdout, result.stderr


def test_replay_all_at_a_terminal_asks_with_the_count(cluster: Cluster) -> None:
    store = store_of_its_own()
    letters = [add_letter(cluster, store) for _ in range(2)]

    declined = Terminal(cluster.env, "dead", "replay", "--all", "--store", store)
    prompt = declined.read_until(b"[y/N] ")
    assert b"replay 2 dead letters" in prompt
    declined.type("n\n")
    code, output = declined.finish()
    assert code == 1 and b"nothing replayed" in output, output
    assert [replayed(cluster, x) for x in letters] == [None, None]

    accepted = Terminal(cluster.env, "dead", "replay", "--all", "--store", store, "--quiet")
    accepted.read_until(b"[y/N] ")
    accepted.type("y\n")
    code, output = accepted.finish()
    assert code == 0 and b"2 replayed" in output, output
    assert all(replayed(cluster, x) for x in letters)


# -- purge ------------------------------------------------------------------------------------


def test_purge_without_a_terminal_needs_yes(cluster: Cluster) -> None:
    old, fresh = add_letter(cluster, store_of_its_own(), age_s=7200), add_letter(cluster, store_of_its_own())
    count = older_than_an_hour(cluster)

    refused = run(cluster, "dead", "purge", "--older-than", "1h")
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    assert f"would delete {count} dead letter" in refused.stderr and "--yes" in refused.stderr
    assert exists(cluster, old) and exists(cluster, fresh)

    dry = run(cluster, "dead", "purge", "--older-than", "1h", "--dry-run", "--json")  # deletes nothing: no --yes
    assert dry.returncode == 0 and json.loads(dry.stdout)["would_purge"] == count, dry.stderr
    assert exists(cluster, old)

    done = run(cluster, "dead", "purge", "--older-than", "1h", "--yes")
    assert done.returncode == 0, done.stderr
    assert f"deleted {count} dead letter" in done.stdout
    assert not exists(cluster, old) and exists(cluster, fresh)


@pytest.mark.parametrize("age", ["0", "0s", "30m", "59m"])
def test_purge_refuses_an_age_below_an_hour(cluster: Cluster, age: str) -> None:
    letter = add_letter(cluster, store_of_its_own())
    for extra in ([], ["--yes"], ["--dry-run"]):
        result = run(cluster, "dead", "purge", "--older-than", age, *extra)
        assert result.returncode == 2, (age, extra, result.stdout, result.stderr)
        assert "at least 1h" in result.stderr and "Traceback" not in result.stderr
    assert exists(cluster, letter)


def test_purge_at_a_terminal_asks_with_the_count(cluster: Cluster) -> None:
    old = add_letter(cluster, store_of_its_own(), age_s=7200)
    count = older_than_an_hour(cluster)

    declined = Terminal(cluster.env, "dead", "purge", "--older-than", "1h")
    prompt = declined.read_until(b"[y/N] ")
    assert f"delete {count} dead letter".encode() in prompt
    declined.type("\n")  # the default is no
    code, output = declined.finish()
    assert code == 1 and b"nothing deleted" in output, output
    assert exists(cluster, old)

    accepted = Terminal(cluster.env, "dead", "purge", "--older-than", "1h")
    accepted.read_until(b"[y/N] ")
    accepted.type("yes\n")
    code, output = accepted.finish()
    assert code == 0 and b"deleted" in output, output
    assert not exists(cluster, old)
