"""The POS outbox: an order enqueued while Redis is down is kept on disk and sent later."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from support.processes import ROOT, RedisServer, free_port

SCRIPT = textwrap.dedent("""
    import sys
    from mipos_worker.file_outbox import Outbox
    outbox = Outbox(sys.argv[1])
    if sys.argv[2] == "accept":
        print(outbox.accept(delivery_id=7, store_id="3", order_external_id=sys.argv[3]))
    elif sys.argv[2] == "bad":
        try:
            outbox.accept(delivery_id=7, store_id="", order_external_id="x")
        except ValueError as exc:
            print("ValueError", exc)
    else:
        print(outbox.flush(), outbox.pending())
""")


def pos(redis_url: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIPOS_")}
    env["REDIS_URL"] = redis_url
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


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
