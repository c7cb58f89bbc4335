"""The POS outbox: an order enqueued while Redis is down is kept on disk and sent later."""

from __future__ import annotations

import ast
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from support.processes import ROOT, RedisServer, free_port, stop_process, wait_for

SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from mipos_worker import order_tasks
    from mipos_worker.file_outbox import Outbox
    lease = os.environ.get("OUTBOX_LEASE_S")
    outbox = Outbox(sys.argv[1], lease_s=float(lease)) if lease else Outbox(sys.argv[1])
    publish = order_tasks.publish_order
    if sys.argv[2] == "crash-after-publish":  # killed between the publish and the delete
        def publish_then_die(*args, **options):
            publish(*args, **options)
            os.kill(os.getpid(), signal.SIGKILL)
        order_tasks.publish_order = publish_then_die
        outbox.flush()
    elif sys.argv[2] == "pause-after-publish":  # the first publish done, waits for a line on stdin
        def publish_then_wait(*args, **options):
            publish(*args, **options)
            if not os.path.exists(sys.argv[3]):
                open(sys.argv[3], "w").close()
                sys.stdin.readline()
        order_tasks.publish_order = publish_then_wait
        print(outbox.flush(), outbox.pending())
    elif sys.argv[2] == "task-ids":
        import sqlite3
        print(json.dumps([r[0] for r in sqlite3.connect(sys.argv[1]).execute(
            "SELECT task_id FROM outbox ORDER BY id")]))
    elif sys.argv[2] == "accept":
        print(outbox.accept(delivery_id=7, store_id="3", order_external_id=sys.argv[3]))
    elif sys.argv[2] == "bad":
        try:
            outbox.accept(delivery_id=7, store_id="", order_external_id="x")
        except ValueError as exc:
            print("ValueError", exc)
    else:
        print(outbox.flush(), outbox.pending())
""")


def pos_env(redis_url: str, lease_s: float | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIPOS_")}
    env["REDIS_URL"] = redis_url
    if lease_s is not None:
        env["OUTBOX_LEASE_S"] = str(lease_s)
    return env


def pos(redis_url: str, *args: str, returncode: int = 0, lease_s: float | None = None) -> str:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=ROOT, env=pos_env(redis_url, lease_s),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == returncode, proc.stderr
    return proc.stdout.strip()


def queued(redis: RedisServer) -> list[tuple[str, str]]:
    """(task id, order external id) of each message in the queue, oldest first."""
    found = []
    for raw in reversed(redis.client.lrange("mipos", 0, -1)):
        message = json.loads(raw)
        order = ast.literal_eval(message["headers"]["kwargsrepr"])["order_external_id"]
        found.append((message["headers"]["id"], order))
    return found


def test_order_kept_while_redis_is_down_is_sent_when_it_is_back(tmp_path: Path) -> None:
    db = str(tmp_path / "outbox.sqlite3")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"

    assert pos(url, db, "accept", "order-1") == "kept"
    assert pos(url, db, "accept", "order-2") == "kept"
    assert pos(url, db, "flush") == "0 2"

    redis = RedisServer(tmp_path / "redis", port=port)
    try:
        assert pos(url, db, "flush") == "2 0"
        messages = redis.client.lrange("mipos", 0, -1)
        assert len(messages) == 2
        assert b"order-1" in messages[-1] and b"order-2" in messages[0]  # oldest first
        assert pos(url, db, "accept", "order-3") == "enqueued"
    finally:
        redis.stop()


def test_bad_arguments_are_refused_before_they_are_kept(tmp_path: Path) -> None:
    db = str(tmp_path / "outbox.sqlite3")
    out = pos(f"redis://127.0.0.1:{free_port()}/0", db, "bad")
    assert out.startswith("ValueError store_id")
    assert pos(f"redis://127.0.0.1:{free_port()}/0", db, "flush") == "0 0"


def test_a_crash_between_the_publish_and_the_delete_resends_under_the_same_task_id(tmp_path: Path) -> None:
    db = str(tmp_path / "outbox.sqlite3")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    assert pos(url, db, "accept", "order-1") == "kept"

    redis = RedisServer(tmp_path / "redis", port=port)
    try:
        pos(url, db, "crash-after-publish", returncode=-9, lease_s=0.5)  # published; the row stays
        # Sent again once the dead process's lease on the row is over.
        wait_for(lambda: pos(url, db, "flush", lease_s=0.5) == "1 0", timeout=20, interval=0.2,
                 what="the row sent again")
        [first, again] = queued(redis)
        assert first == again  # the same task id: the worker's ledger sends the order once
    finally:
        redis.stop()


def test_two_processes_sharing_a_file_send_each_row_once(tmp_path: Path) -> None:
    db = str(tmp_path / "outbox.sqlite3")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    for order in ("order-1", "order-2", "order-3"):
        assert pos(url, db, "accept", order) == "kept"

    redis = RedisServer(tmp_path / "redis", port=port)
    marker = tmp_path / "first-published"
    first = subprocess.Popen([sys.executable, "-c", SCRIPT, db, "pause-after-publish", str(marker)],
                             cwd=ROOT, env=pos_env(url), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(marker.exists, timeout=30, what="the first process's first publish")
        second = pos(url, db, "flush")  # while the first process is in the middle of its flush
        out, err = first.communicate("go\n", timeout=60)
        assert first.returncode == 0, err
        assert sorted(order for _, order in queued(redis)) == ["order-1", "order-2", "order-3"]
        assert (second, out.strip()) == ("0 3", "3 0")  # the rows were the first process's
    finally:
        stop_process(first)
        redis.stop()


OLD_SCHEMA = """
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    action TEXT NOT NULL,
    arguments TEXT NOT NULL,
    enqueued_at REAL NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
)
"""


def test_a_file_of_an_earlier_version_gets_task_ids_and_keeps_its_rows(tmp_path: Path) -> None:
    db = str(tmp_path / "outbox.sqlite3")
    with sqlite3.connect(db) as old:
        old.execute(OLD_SCHEMA)
        for order in ("order-1", "order-2"):
            old.execute("INSERT INTO outbox (action, arguments, enqueued_at) VALUES ('accept', ?, 1.7e9)",
                        (json.dumps({"delivery_id": "7", "store_id": "3", "order_external_id": order}),))
    old.close()
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"

    task_ids = json.loads(pos(url, db, "task-ids"))
    assert len(set(task_ids)) == 2 and all(task_ids)
    assert json.loads(pos(url, db, "task-ids")) == task_ids  # given once, kept

    redis = RedisServer(tmp_path / "redis", port=port)
    try:
        assert pos(url, db, "flush") == "2 0"
        assert queued(redis) == list(zip(task_ids, ["order-1", "order-2"], strict=True))
    finally:
        redis.stop()
