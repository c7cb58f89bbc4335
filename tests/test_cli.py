"""``mipos-worker``, run as the installed console script against real Redis, workers and the sandbox."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sandbox import SANDBOX_CREDENTIALS
from support.processes import ROOT, RedisServer, Sandbox, free_port, stop_process, wait_for
from tests.conftest import Cluster, ClusterStarter, new_order_id
from tests.test_dead_safety import backdate

ACCEPT_PATH = "/api/v1/integration/order/accept"
NOT_FOUND = {"status": 409, "message": "Order not found.", "times": -1}
CLI = str(Path(sys.executable).parent / "mipos-worker")


def cli(cluster: Cluster, *args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """stdin at /dev/null: as from a script, whatever terminal pytest runs in (so `dead replay
    --all` and `dead purge` need --yes, tests/test_dead_safety.py)."""
    return subprocess.run([CLI, *args], cwd=ROOT, env={**cluster.env, **(env or {})},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def cli_json(cluster: Cluster, *args: str) -> Any:
    result = cli(cluster, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert lines, "no error message"
    message = lines[-1] if result.returncode == 2 else "\n".join(lines)
    if result.returncode != 2:  # argparse's usage errors print the usage line first
        assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in message, message


def wait_state(cluster: Cluster, store: str, order_id: str, state: str, timeout: float = 30) -> Any:
    def reached() -> Any:
        result = cli(cluster, "order", store, order_id, "--json")
        if result.returncode == 0 and json.loads(result.stdout)["state"] == state:
            return json.loads(result.stdout)
        return None
    return wait_for(reached, timeout=timeout, interval=0.2, what=f"{order_id} to be {state}")


def dead_letter_id(cluster: Cluster, order_id: str) -> str:
    def find() -> str | None:
        for letter in cli_json(cluster, "dead", "list")["dead_letters"]:
            if letter["order"]["order_external_id"] == order_id:
                return str(letter["id"])
        return None
    return wait_for(find, timeout=30, interval=0.2, what=f"dead letter of {order_id}")


def accepts_at_mipos(cluster: Cluster, order_id: str) -> list[dict[str, Any]]:
    return [r for r in cluster.control.requests(order_external_id=order_id, path=ACCEPT_PATH)
            if r.get("status") == 200]


# -- help and usage ------------------------------------------------------------------

COMMANDS = [[], ["enqueue"], ["order"], ["pending"], ["dead"], ["dead", "list"], ["dead", "show"],
            ["dead", "replay"], ["dead", "purge"], ["doctor"], ["metrics"], ["sandbox"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_every_command_has_help(command: list[str]) -> None:
    result = subprocess.run([CLI, *command, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: mipos-worker")


def test_malformed_ids_are_refused_before_anything_runs() -> None:
    for args, needle in [
        (["order", "3", "has space"], "ORDER_EXTERNAL_ID"),
        (["order", "", "abc"], "STORE_ID must not be empty"),
        (["order", "3", "tab\there"], "ORDER_EXTERNAL_ID"),
        (["dead", "show", "nothex"], "not a dead letter id"),
        (["dead", "purge", "--older-than", "soon"], "not a duration"),
        (["dead", "purge", "--older-than", "0s"], "must be at least 1h"),
        (["dead", "list", "--since", "yesterday-ish"], "neither a duration"),
    ]:
        result = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr


# -- enqueue and order ----------------------------------------------------------------


def test_enqueue_accept_then_order_shows_it_accepted(cluster: Cluster) -> None:
    order_id = new_order_id()
    result = cli(cluster, "enqueue", "accept", "--delivery-id", "7", "--store-id", "31",
                 "--order-external-id", order_id)
    assert result.returncode == 0, result.stderr
    assert f"order 31/{order_id}" in result.stdout
    status = wait_state(cluster, "31", order_id, "accepted")
    assert status["order"] == {"delivery_id": "7", "store_id": "31", "order_external_id": order_id}
    assert [a["outcome"] for a in status["attempts"]] == ["accepted"]
    human = cli(cluster, "order", "31", order_id)
    assert human.returncode == 0
    assert "state: accepted" in human.stdout and "OUTCOME" in human.stdout
    assert len(accepts_at_mipos(cluster, order_id)) == 1


def test_enqueue_deny_json(cluster: Cluster) -> None:
    order_id = new_order_id()
    out = cli_json(cluster, "enqueue", "deny", "--delivery-id", "8", "--store-id", "31",
                   "--order-external-id", order_id, "--message", "Out of stock")
    assert out["action"] == "deny" and out["message"] == "Out of stock" and out["task_id"]
    status = wait_state(cluster, "31", order_id, "denied")
    assert status["done"]["message"] == "Out of stock"


def test_enqueue_checks_like_the_python_api(cluster: Cluster) -> None:
    queued_before = cluster.redis.client.llen("mipos")
    blank = cli(cluster, "enqueue", "accept", "--delivery-id", "1", "--store-id", " ",
                "--order-external-id", "x")
    assert_one_line_error(blank, "not enqueued", "store_id", "must not be empty")
    no_reason = cli(cluster, "enqueue", "deny", "--delivery-id", "1", "--store-id", "3",
                    "--order-external-id", "x")
    assert_one_line_error(no_reason, "message", "required")
    accept_with_reason = cli(cluster, "enqueue", "accept", "--delivery-id", "1", "--store-id", "3",
                             "--order-external-id", "x", "--message", "no")
    assert_one_line_error(accept_with_reason, "--message is for deny only")
    assert cluster.redis.client.llen("mipos") == queued_before


def test_unknown_order_is_one_line_and_exit_1(cluster: Cluster) -> None:
    result = cli(cluster, "order", "31", new_order_id())
    assert_one_line_error(result, "no order 31/", "is known")


def test_order_shows_retrying_with_the_next_attempt_time(logdir: Path, tmp_path: Path) -> None:
    # Its own Redis and sandbox: away from the module's fast-retrying worker.
    own_redis, own_sandbox = RedisServer(tmp_path / "redis"), Sandbox(tmp_path)
    starter = ClusterStarter(own_redis, own_sandbox, logdir)
    slow = starter(processes=1, MIPOS_RETRY_BASE_DELAY_S="20", MIPOS_RETRY_MAX_DELAY_S="20")
    try:
        order_id = new_order_id()
        slow.control.add_faults(order_id, {"status": 500, "message": "Server Error", "times": -1})
        enqueued = cli(slow, "enqueue", "accept", "--delivery-id", "5", "--store-id", "32",
                       "--order-external-id", order_id)
        assert enqueued.returncode == 0, enqueued.stderr
        status = wait_state(slow, "32", order_id, "retrying")
        [attempt] = status["attempts"]
        assert attempt["http_status"] == 500 and attempt["error"] == "Server Error"
        assert attempt["error_class"] == "transient" and 10 <= attempt["retry_in_s"] <= 20
        [task] = status["tasks"]
        assert task["next_attempt_at"] >= attempt["at"] + 9
        human = cli(slow, "order", "32", order_id)
        assert re.search(r"state: retrying: attempt 1 failed \(Server Error\); next attempt in \d", human.stdout)
    finally:
        starter.stop_all()
        own_redis.stop()
        own_sandbox.stop()


# -- the newcomer's story: a failed order, found, fixed, replayed, accepted -----------------


def test_find_fix_replay_accept(cluster: Cluster, tasks: ModuleType) -> None:
    order_id = new_order_id()
    cluster.control.add_faults(order_id, NOT_FOUND)
    tasks.accept_order.delay(delivery_id=12, store_id="33", order_external_id=order_id)

    status = wait_state(cluster, "33", order_id, "dead-lettered")
    assert "Order not found." in status["summary"] and "permanent" in status["summary"]
    # The task ends as a Celery failure (what Flower shows), logged without a traceback.
    failed_task = status["tasks"][0]["task_id"]
    [ending] = wait_for(lambda: [line for line in cluster.lines()
                                 if line.get("logger") == "celery.app.trace"
                                 and failed_task in str(line.get("event"))], timeout=10,
                        what="Celery's line about the failed task")
    assert "raised expected: OrderFailed('dead-lettered (permanent): Order not found." in ending["event"]
    assert ending["level"] == "info" and "exception" not in ending
    human = cli(cluster, "order", "33", order_id)
    letter_id = dead_letter_id(cluster, order_id)
    assert f"mipos-worker dead replay {letter_id}" in human.stdout

    listed = cli(cluster, "dead", "list", "--reason", "permanent", "--store", "33", "--since", "1h")
    assert letter_id in listed.stdout and "Order not found." in listed.stdout
    assert letter_id not in cli(cluster, "dead", "list", "--reason", "deadline").stdout
    assert letter_id not in cli(cluster, "dead", "list", "--store", "34").stdout
    shown = cli_json(cluster, "dead", "show", letter_id)
    assert shown["reason"] == "permanent" and shown["attempts"][-1]["http_status"] == 409
    assert "Order not found." in cli(cluster, "dead", "show", letter_id).stdout

    cluster.control.clear_faults(order_id)  # the cause is fixed
    replayed = cli(cluster, "dead", "replay", letter_id)
    assert replayed.returncode == 0 and "replayed: enqueued as task" in replayed.stdout
    status = wait_state(cluster, "33", order_id, "accepted")
    outcomes = [a["outcome"] for a in status["attempts"]]
    assert outcomes == ["failed", "accepted"], outcomes  # the history is kept
    assert len(status["tasks"]) == 2 and status["tasks"][1]["replay_of"] == letter_id

    again = cli(cluster, "dead", "replay", letter_id)
    assert again.returncode == 0 and "already replayed" in again.stdout
    assert len(accepts_at_mipos(cluster, order_id)) == 1
    replay_lines = [line for line in cluster.attempt_lines(order_id) if line.get("replay_of")]
    assert [line["outcome"] for line in replay_lines] == ["accepted"]


def test_replay_all_shows_progress_and_sends_each_order_once(cluster: Cluster, tasks: ModuleType) -> None:
    orders = [new_order_id() for _ in range(3)]
    for order_id in orders:
        cluster.control.add_faults(order_id, NOT_FOUND)
        tasks.accept_order.delay(delivery_id=1, store_id="35", order_external_id=order_id)
    for order_id in orders:
        dead_letter_id(cluster, order_id)
        cluster.control.clear_faults(order_id)

    result = cli(cluster, "dead", "replay", "--all", "--store", "35", "--yes")
    assert result.returncode == 0, result.stderr
    assert "[replay] 3/3 (100%)" in result.stderr and "replayed=3" in result.stderr
    assert "3 replayed" in result.stdout
    for order_id in orders:
        wait_state(cluster, "35", order_id, "accepted")
    second = cli_json(cluster, "dead", "replay", "--all", "--store", "35", "--yes")
    assert second["results"] == []
    assert all(len(accepts_at_mipos(cluster, o)) == 1 for o in orders)


def test_replay_refuses_invalid_and_skips_done_orders(cluster: Cluster, tasks: ModuleType) -> None:
    from worker.wiring.celery_app import app

    app.send_task("mipos.accept_order", kwargs={"delivery_id": 1, "store_id": "36",
                                                "order_external_id": ""})
    invalid = wait_for(lambda: cli_json(cluster, "dead", "list", "--reason", "invalid",
                                        "--store", "36")["dead_letters"], timeout=30, interval=0.2,
                       what="the invalid order's dead letter")
    refused = cli(cluster, "dead", "replay", invalid[0]["id"])
    assert refused.returncode == 1 and "not replayable" in refused.stdout

    order_id = new_order_id()
    tasks.deny_order.delay(delivery_id=2, store_id="36", order_external_id=order_id, message="Closed")
    wait_state(cluster, "36", order_id, "denied")
    tasks.accept_order.delay(delivery_id=2, store_id="36", order_external_id=order_id)
    letter = dead_letter_id(cluster, order_id)  # an accept after a deny: refused for good
    skipped = cli(cluster, "dead", "replay", letter)
    assert skipped.returncode == 0 and "already denied at mipos" in skipped.stdout


def test_replay_of_unknown_letter(cluster: Cluster) -> None:
    assert_one_line_error(cli(cluster, "dead", "replay", "0123456789abcdef"), "no dead letter")
    assert_one_line_error(cli(cluster, "dead", "show", "0123456789abcdef"), "no dead letter")


def test_purge(cluster: Cluster, tasks: ModuleType) -> None:
    order_id = new_order_id()
    cluster.control.add_faults(order_id, NOT_FOUND)
    tasks.accept_order.delay(delivery_id=1, store_id="37", order_external_id=order_id)
    letter = dead_letter_id(cluster, order_id)
    assert "deleted 0 dead letters" in cli(cluster, "dead", "purge", "--older-than", "1h", "--yes").stdout
    backdate(cluster, letter, 2 * 3600)  # purge takes nothing younger than an hour
    dry = cli_json(cluster, "dead", "purge", "--older-than", "1h", "--dry-run")
    assert dry["would_purge"] >= 1
    assert cli(cluster, "dead", "show", letter).returncode == 0
    purged = cli_json(cluster, "dead", "purge", "--older-than", "1h", "--yes")
    assert purged["purged"] == dry["would_purge"]
    assert cli(cluster, "dead", "show", letter).returncode == 1
    assert letter not in [x["id"] for x in cli_json(cluster, "dead", "list")["dead_letters"]]


def test_dead_list_pages_with_a_cursor(cluster: Cluster) -> None:
    from worker.state.deadletters import DeadLetters

    store = DeadLetters(cluster.redis.client, "mipos:")
    letters = [store.add(action="accept", order={"delivery_id": "1", "store_id": "38",
                                                 "order_external_id": new_order_id()},
                         reason="attempts", error="Server Error", task_id=new_order_id(),
                         enqueued_at=None, attempts=[]) for _ in range(3)]
    newest_first = [x.id for x in reversed(letters)]

    first = cli_json(cluster, "dead", "list", "--store", "38", "--limit", "2")
    assert [x["id"] for x in first["dead_letters"]] == newest_first[:2]
    assert first["truncated"] is True and first["next_before"]
    human = cli(cluster, "dead", "list", "--store", "38", "--limit", "2").stdout
    assert f"--before {first['next_before']}" in human

    second = cli_json(cluster, "dead", "list", "--store", "38", "--limit", "2",
                      "--before", first["next_before"])
    assert [x["id"] for x in second["dead_letters"]] == newest_first[2:]
    assert second["truncated"] is False and second["next_before"] is None
    assert_one_line_error(cli(cluster, "dead", "list", "--before", "yesterday"), "cursor")


# -- pending, metrics -------------------------------------------------------------------


def test_pending_says_what_we_know_of_each_listed_order(cluster: Cluster, tasks: ModuleType) -> None:
    never, failing = new_order_id(), new_order_id()
    cluster.control.deliver("38", 1, never)
    cluster.control.deliver("38", 2, failing)
    cluster.control.add_faults(failing, NOT_FOUND)
    tasks.accept_order.delay(delivery_id=2, store_id="38", order_external_id=failing)
    wait_state(cluster, "38", failing, "dead-lettered")
    rows = {r["order_external_id"]: r for r in cli_json(cluster, "pending", "38")["pending"]}
    assert rows[never]["our_state"] == "never enqueued"
    assert rows[failing]["our_state"] == "dead-lettered"
    assert "never enqueued" in cli(cluster, "pending", "38").stdout


def test_pending_errors_are_one_line(cluster: Cluster) -> None:
    unreachable = cli(cluster, "pending", "38", env={"MIPOS_BASE_URL": f"http://127.0.0.1:{free_port()}"})
    assert_one_line_error(unreachable, "mipos did not give store 38's pending orders")
    unset = cli(cluster, "pending", "38", env={"MIPOS_CLIENT_SECRET": ""})
    assert_one_line_error(unset, "MIPOS_CLIENT_SECRET is required")


def test_metrics_count_attempts_dead_letters_tokens_and_latency(cluster: Cluster, tasks: ModuleType) -> None:
    order_id, doomed = new_order_id(), new_order_id()
    cluster.control.add_faults(order_id, {"status": 500, "message": "Server Error"})
    cluster.control.add_faults(doomed, NOT_FOUND)
    tasks.accept_order.delay(delivery_id=3, store_id="39", order_external_id=order_id)
    tasks.accept_order.delay(delivery_id=4, store_id="39", order_external_id=doomed)
    wait_state(cluster, "39", order_id, "accepted")
    wait_state(cluster, "39", doomed, "dead-lettered")

    def scrape() -> str | None:  # workers write their counts about once a second
        result = cli(cluster, "metrics")
        assert result.returncode == 0, result.stderr
        return result.stdout if 'error_class="permanent",outcome="failed"' in result.stdout else None
    text = wait_for(scrape, timeout=10, interval=0.3, what="the workers' counts in /metrics")

    def value(series: str) -> float:
        match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
        assert match, f"{series} not in\n{text}"
        return float(match.group(1))

    assert value('mipos_attempts_total{action="accept",error_class="transient",outcome="retrying"}') >= 1
    assert value('mipos_attempts_total{action="accept",error_class="none",outcome="accepted"}') >= 1
    assert value('mipos_token_calls_total{kind="token",result="ok"}') >= 1
    assert value('mipos_order_latency_seconds_count{action="accept"}') >= 1
    assert value('mipos_dead_letters_total{action="accept",reason="permanent"}') >= 1
    assert value('mipos_attempts_total{action="accept",error_class="permanent",outcome="failed"}') >= 1
    assert value("mipos_queue_depth") >= 0 and value("mipos_redis_up") == 1


# -- doctor --------------------------------------------------------------------------------


def checks_of(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in json.loads(result.stdout)["checks"]}


def test_doctor_healthy(cluster: Cluster) -> None:
    result = cli(cluster, "doctor", "--json")
    checks = checks_of(result)
    assert result.returncode == 0, result.stdout
    for name in ("settings", "redis", "mipos token", "workers", "queue", "oldest waiting", "circuit breaker"):
        assert checks[name]["status"] == "ok", checks[name]
    assert "1 answered" in checks["workers"]["detail"]
    assert checks["redis persistence"]["status"] == "warn"  # the test Redis has no AOF
    human = cli(cluster, "doctor")
    assert human.returncode == 0 and re.search(r"\nno problems \(\d+ warnings?\)\n$", human.stdout)


def test_doctor_reports_an_open_breaker(cluster: Cluster) -> None:
    client = cluster.redis.client
    client.set("mipos:breaker:state", "open")  # as a worker writes it (tests/test_breaker.py opens it for real)
    client.zadd("mipos:breaker:waiting", {"task-a": 1.0, "task-b": 2.0})
    try:
        check = checks_of(cli(cluster, "doctor", "--json", "--skip-mipos"))["circuit breaker"]
    finally:
        client.delete("mipos:breaker:state", "mipos:breaker:waiting")
    assert check["status"] == "warn" and "open" in check["detail"] and "2 orders held" in check["detail"]


def test_doctor_catches_a_wrong_mipos_password(cluster: Cluster) -> None:
    result = cli(cluster, "doctor", "--json", env={"MIPOS_PASSWORD": "not-the-password-42"})
    assert result.returncode == 1
    check = checks_of(result)["mipos token"]
    assert check["status"] == "fail" and "Invalid credentials." in check["detail"]
    assert "MIPOS_PASSWORD" in check["detail"]
    assert "not-the-password-42" not in result.stdout + result.stderr
    assert SANDBOX_CREDENTIALS["client_secret"] not in result.stdout + result.stderr


def test_doctor_catches_a_stopped_redis(cluster: Cluster) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = cli(cluster, "doctor", "--json", env={"REDIS_URL": url})
    assert result.returncode == 1
    checks = checks_of(result)
    assert checks["redis"]["status"] == "fail" and "cannot reach Redis" in checks["redis"]["detail"]
    assert checks["workers"]["status"] == "skipped"
    human = cli(cluster, "doctor", env={"REDIS_URL": url})
    assert human.returncode == 1 and "FAIL" in human.stdout and "Traceback" not in human.stderr


def test_doctor_catches_no_workers_and_a_stale_queue(cluster: Cluster, tmp_path: Path) -> None:
    lonely = RedisServer(tmp_path / "redis")
    try:
        env = {"REDIS_URL": lonely.url}
        subprocess.run([CLI, "enqueue", "accept", "--delivery-id", "1", "--store-id", "3",
                        "--order-external-id", "waiting"], env={**cluster.env, **env},
                       check=True, capture_output=True, timeout=60)
        result = cli(cluster, "doctor", "--json", "--max-wait", "0s", "--ping-timeout", "0.5s", env=env)
        assert result.returncode == 1
        checks = checks_of(result)
        assert checks["workers"]["status"] == "fail"
        assert "no worker answered" in checks["workers"]["detail"]
        assert checks["oldest waiting"]["status"] == "fail"
        assert "order 3/waiting" in checks["oldest waiting"]["detail"]
        assert "1 waiting" in checks["queue"]["detail"]
    finally:
        lonely.stop()


def test_doctor_names_bad_settings(cluster: Cluster) -> None:
    result = cli(cluster, "doctor", "--json", env={"MIPOS_CLIENT_ID": "", "MIPOS_TIMEOUT_S": "soon"})
    assert result.returncode == 1
    detail = checks_of(result)["settings"]["detail"]
    assert "MIPOS_CLIENT_ID is required" in detail and "MIPOS_TIMEOUT_S='soon'" in detail


# -- Redis down, for every command that needs it ----------------------------------------------


@pytest.mark.parametrize("args", [
    ["order", "3", "abc"],
    ["dead", "list"],
    ["dead", "show", "0123456789abcdef"],
    ["dead", "replay", "--all"],
    ["dead", "purge", "--older-than", "7d"],
    ["metrics"],
    ["enqueue", "accept", "--delivery-id", "1", "--store-id", "3", "--order-external-id", "x"],
], ids=lambda a: " ".join(a[:2]))
def test_redis_down_is_one_line(cluster: Cluster, args: list[str]) -> None:
    url = f"redis://:hunter2secret@127.0.0.1:{free_port()}/0"
    result = cli(cluster, *args, env={"REDIS_URL": url}, timeout=30)
    assert_one_line_error(result)
    assert "Redis" in result.stderr and "hunter2secret" not in result.stderr


# -- the sandbox command ------------------------------------------------------------------------


def test_sandbox_command_serves_with_fault_rates(cluster: Cluster) -> None:
    proc = subprocess.Popen([CLI, "sandbox", "--port", "0", "--fault-rate", "http_500=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=cluster.env)
    try:
        assert proc.stdout is not None
        match = re.search(r"http://127\.0\.0\.1:\d+", proc.stdout.readline())
        assert match, "the sandbox did not print its address"
        from sandbox import SandboxControl

        control = SandboxControl(match.group(0))
        control.wait_until_up(10)
        assert control.config()["fault_rates"] == {"http_500": 1.0}
    finally:
        stop_process(proc)
    bad = subprocess.run([CLI, "sandbox", "--fault-rate", "meteor=2"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "meteor" in bad.stderr and "http_500" in bad.stderr


def test_no_traceback_on_unexpected_errors_without_debug() -> None:
    env = {**os.environ, "REDIS_URL": "http://not-redis"}
    result = subprocess.run([CLI, "dead", "list"], capture_output=True, text=True, timeout=60, env=env)
    assert_one_line_error(result, "REDIS_URL")
