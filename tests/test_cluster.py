"""Tests that need their own workers: cold tokens, rotation, limits, settings, Redis down."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from types import ModuleType
from typing import Any

from support.processes import ROOT, RedisServer, free_port, procfile_command, read_json_lines, wait_for
from tests.conftest import SANDBOX_ENV, ClusterFactory, new_order_id
from worker.state.deadletters import DeadLetters

ACCEPT_PATH = "/api/v1/integration/order/accept"


def enqueue_many(tasks: ModuleType, count: int, store_id: str = "3") -> list[str]:
    ids = [new_order_id() for _ in range(count)]
    for i, order_id in enumerate(ids):
        tasks.accept_order.delay(delivery_id=i + 1, store_id=store_id, order_external_id=order_id)
    return ids


def accepted_orders(control: Any) -> dict[str, int]:
    return {v["order_external_id"]: v["accepted"] for v in control.orders()["orders"].values()}


def all_accepted(control: Any, ids: list[str]) -> bool:
    accepted = accepted_orders(control)
    return all(accepted.get(i) == 1 for i in ids)


def test_cold_start_of_100_orders_on_two_processes_makes_one_token_call(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    cluster = make_cluster(processes=2)
    ids = enqueue_many(tasks, 100)
    wait_for(lambda: all_accepted(cluster.control, ids), timeout=60, what="100 acceptances")

    stats = cluster.control.stats()
    assert stats["token_calls"] == 1 and stats["refresh_calls"] == 0
    assert stats["accept_calls"] == 100
    served = [w for w in cluster.workers
              if any(line.get("event") == "accept_attempt" for line in read_json_lines(w.log_path))]
    assert len(served) == 2, "both worker processes should have served orders"


def test_token_expiry_and_rotation_mid_stream(make_cluster: ClusterFactory,
                                              tasks: ModuleType) -> None:
    cluster = make_cluster(processes=2)
    cluster.control.config(token_ttl_s=2.0)
    ids: list[str] = []
    started = time.monotonic()
    for _ in range(8):  # ~8 s of orders: several tokens' lifetimes
        ids += enqueue_many(tasks, 10)
        wait_for(lambda: all_accepted(cluster.control, ids), timeout=30,
                 what="the batch to be accepted")
        if len(ids) == 40:
            # An early, unannounced expiry: a 401 and one refresh, unless the worker's
            # own refresh-ahead got there first (test_401_... covers the 401 path).
            cluster.control.expire_token()
        time.sleep(0.5)  # the stream's pace, not synchronisation
    elapsed = time.monotonic() - started

    assert all(accepted_orders(cluster.control)[i] == 1 for i in ids)
    stats = cluster.control.stats()
    assert stats["token_calls"] == 1
    needed = elapsed / 2.0 + 2  # one rotation per lifetime, plus the forced expiry
    assert 1 <= stats["refresh_calls"] <= needed + 2, stats
    mismatches = [r for r in cluster.control.requests(path="/api/oauth/token/refresh")
                  if r["status"] != 200]
    assert mismatches == []


def test_401_gets_one_refresh_and_an_immediate_resend(make_cluster: ClusterFactory,
                                                       tasks: ModuleType) -> None:
    cluster = make_cluster(LOG_LEVEL="DEBUG")  # the most talkative logs, for the secrets check
    [warm] = enqueue_many(tasks, 1)
    cluster.wait_final(warm)
    cluster.control.expire_token()
    [order_id] = enqueue_many(tasks, 1)
    lines = cluster.wait_final(order_id)

    assert [(line["outcome"], line["http_status"]) for line in lines] == [
        ("retrying", 401), ("accepted", 200)]
    assert lines[0]["error_class"] == "auth" and lines[0]["retry_in_s"] == 0
    assert [line["attempt"] for line in lines] == [1, 2]
    assert cluster.control.stats()["refresh_calls"] == 1


def test_user_not_authenticated_is_handled_like_401(make_cluster: ClusterFactory,
                                                    tasks: ModuleType) -> None:
    cluster = make_cluster()
    order_id = new_order_id()
    cluster.control.add_faults(order_id, {"status": 409, "message": "User not authenticated."})
    tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id=order_id)
    lines = cluster.wait_final(order_id)
    assert [line["outcome"] for line in lines] == ["retrying", "accepted"]
    assert lines[0]["error_class"] == "auth"
    assert cluster.control.stats()["refresh_calls"] == 1


def test_never_ending_transient_error_stops_at_the_attempt_cap(
        make_cluster: ClusterFactory, tasks: ModuleType, redis_server: RedisServer) -> None:
    cluster = make_cluster(MIPOS_RETRY_MAX_ATTEMPTS="4")
    order_id = new_order_id()
    cluster.control.add_faults(order_id, {"status": 503, "message": "down", "times": -1})
    tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id=order_id)
    lines = cluster.wait_final(order_id)

    assert [line["outcome"] for line in lines] == ["retrying"] * 3 + ["failed"]
    assert lines[-1]["fail_reason"] == "attempts" and lines[-1]["max_attempts"] == 4
    [letter] = DeadLetters(redis_server.client, "mipos:").list()
    assert letter.reason == "attempts" and len(letter.attempts) == 4
    assert all(a["http_status"] == 503 for a in letter.attempts)


def test_never_ending_transient_error_stops_at_the_deadline(
        make_cluster: ClusterFactory, tasks: ModuleType, redis_server: RedisServer) -> None:
    cluster = make_cluster(MIPOS_RETRY_MAX_ATTEMPTS="1000", MIPOS_RETRY_DEADLINE_S="2")
    order_id = new_order_id()
    cluster.control.add_faults(order_id, {"status": 409, "message": "Unable to get token.",
                                          "times": -1})
    tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id=order_id)
    lines = cluster.wait_final(order_id)

    assert lines[-1]["outcome"] == "failed" and lines[-1]["fail_reason"] == "deadline"
    sent = [r["time"] for r in cluster.control.requests(order_external_id=order_id)]
    assert max(sent) - min(sent) <= 2.0 + 0.5
    [letter] = DeadLetters(redis_server.client, "mipos:").list()
    assert letter.reason == "deadline"


def test_worker_without_settings_exits_naming_every_bad_one(redis_server: RedisServer) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIPOS_", "REDIS_URL"))}
    env.update({
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}",
        "REDIS_URL": redis_server.url,
        "MIPOS_CLIENT_ID": SANDBOX_ENV["MIPOS_CLIENT_ID"],
        "MIPOS_EMAIL": SANDBOX_ENV["MIPOS_EMAIL"],
        "MIPOS_CLIENT_SECRET": SANDBOX_ENV["MIPOS_CLIENT_SECRET"],
        "MIPOS_TIMEOUT_S": "soon",
    })
    proc = subprocess.run(["bash", "-c", procfile_command("worker")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "MIPOS_PASSWORD is required" in proc.stderr
    assert "MIPOS_TIMEOUT_S='soon' is not a number" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert redis_server.client.llen("mipos") == 0


PRODUCER_SCRIPT = textwrap.dedent("""
    import time
    from tasks import accept_order
    started = time.monotonic()
    try:
        accept_order.delay(delivery_id=1, store_id="3", order_external_id="x")
    except Exception as exc:
        print(f"{time.monotonic() - started:.2f} {type(exc).__name__}: {exc}")
    else:
        print("enqueued")
""")


def run_producer(redis_url: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIPOS_")}
    env["REDIS_URL"] = redis_url
    proc = subprocess.run([sys.executable, "-c", PRODUCER_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_delay_raises_fast_when_redis_refuses_connections() -> None:
    out = run_producer(f"redis://127.0.0.1:{free_port()}/0")
    seconds, error = out.split(" ", 1)
    assert float(seconds) < 10, out
    assert "OperationalError" in error or "Connection" in error, out


def test_delay_raises_fast_when_redis_does_not_answer() -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        out = run_producer(f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
    seconds, error = out.split(" ", 1)
    assert float(seconds) < 15, out
    assert error, out


def test_pos_side_needs_no_mipos_credentials(redis_server: RedisServer) -> None:
    assert run_producer(redis_server.url) == "enqueued"


def test_read_timeout_whose_acceptance_arrived_is_confirmed_without_a_second_send(
        make_cluster: ClusterFactory, tasks: ModuleType) -> None:
    # The retry (1-2 s after the timeout) comes after the sandbox applied the slow accept (1.6 s).
    cluster = make_cluster(MIPOS_RETRY_BASE_DELAY_S="2", MIPOS_RETRY_MAX_DELAY_S="2")
    order_id = new_order_id()
    cluster.control.deliver("3", 41, order_id)
    cluster.control.add_faults(order_id, {"delay_s": 1.6})  # applied after the client gave up at 1 s
    tasks.accept_order.delay(delivery_id=41, store_id="3", order_external_id=order_id)
    lines = cluster.wait_final(order_id)

    assert [line["outcome"] for line in lines] == ["retrying", "accepted"]
    assert lines[0]["outcome_unknown"] is True
    assert lines[1]["confirmed_by"] == "pending_list" and lines[1]["previous_outcome"] == "unknown"
    sent = [r for r in cluster.control.requests(order_external_id=order_id) if r["path"] == ACCEPT_PATH]
    assert len(sent) == 1
    assert cluster.control.orders()["orders"][f"3/{order_id}"]["accepted"] == 1
