"""One visibility timeout for every process that opens a broker connection (issue 11, items 5 and 7).

kombu hands a message back to the queue when its delivery stamp (the score in
the ``unacked_index`` sorted set) is older than the *sweeping* process's
visibility timeout, and every consuming connection sweeps: the worker's, and
also ``doctor``'s ping, Flower's event receiver and any ``app.control`` call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from config import load_checked_worker_settings, load_delivery_settings, load_worker_settings
from config import timing as delivery
from support.processes import ROOT, RedisServer, procfile_command, wait_for
from tests.conftest import ClusterFactory, new_order_id

ACCEPT_PATH = "/api/v1/integration/order/accept"
CLI = str(Path(sys.executable).parent / "mipos-worker")
CREDENTIALS = {
    "MIPOS_CLIENT_ID": "id",
    "MIPOS_CLIENT_SECRET": "client-secret-1",
    "MIPOS_EMAIL": "pos@example.invalid",
    "MIPOS_PASSWORD": "password-1",
}
# An attempt of 10 s (the sandbox holds the answer) fits the 2 x 15 s call bound; the
# worker's visibility timeout, 900 s, is far above the 180 s other processes used to sweep with.
LONG_ENV = {"MIPOS_TIMEOUT_S": "15", "MIPOS_VISIBILITY_TIMEOUT_S": "900"}
ATTEMPT_S = 10.0
HELD_FOR_S = 400.0  # past the old fixed 180 s, well inside the worker's 900 s

PRODUCER_SCRIPT = """
import json, sys
from tasks import accept_order
from worker.wiring.celery_app import app
accept_order.delay(delivery_id=2, store_id="3", order_external_id=sys.argv[1])
options = app.conf.broker_transport_options
print(json.dumps({k: options[k] for k in ("visibility_timeout", "unacked_restore_interval")}))
"""


# -- the numbers ---------------------------------------------------------------------


def test_the_default_numbers() -> None:
    settings = load_worker_settings(CREDENTIALS)
    assert delivery.call_bound_s(settings) == 20.0  # connect + read, as one total deadline
    assert delivery.attempt_bound_s(settings) == 120.0  # 6 calls
    assert delivery.visibility_timeout_s(settings) == 180.0  # hop 30 + attempt 120 + slack 30
    assert delivery.attempt_bound_s(settings) < delivery.order_lock_ttl_s(settings) \
        <= delivery.visibility_timeout_s(settings)
    assert delivery.minimum_visibility_timeout_s(settings) <= 180.0


@pytest.mark.parametrize("timeout_s", ["0.05", "0.5", "1", "5", "10", "30", "120"])
def test_the_derived_timeout_always_passes_the_check(timeout_s: str) -> None:
    settings = load_delivery_settings({"MIPOS_TIMEOUT_S": timeout_s})
    derived = delivery.visibility_timeout_s(settings)
    assert delivery.delivery_problems(settings) == []
    assert derived >= delivery.countdown_hop_s(settings) + delivery.attempt_bound_s(settings) \
        + delivery.attempt_margin_s(settings)
    assert delivery.order_lock_ttl_s(settings) <= derived


@pytest.mark.parametrize("timeout_s", ["0.05", "1", "10", "30"])
def test_the_minimum_is_the_smallest_timeout_that_holds_a_hop_and_an_attempt(timeout_s: str) -> None:
    at_minimum = load_delivery_settings({"MIPOS_TIMEOUT_S": timeout_s})
    minimum = delivery.minimum_visibility_timeout_s(at_minimum)
    for value, ok in ((minimum, True), (minimum * 0.99, False)):
        settings = load_delivery_settings({"MIPOS_TIMEOUT_S": timeout_s,
                                           "MIPOS_VISIBILITY_TIMEOUT_S": repr(value)})
        held = delivery.countdown_hop_s(settings) + delivery.attempt_bound_s(settings) \
            + delivery.attempt_margin_s(settings)
        assert (held <= value + 1e-9) is ok
        assert (delivery.delivery_problems(settings) == []) is ok


def test_a_visibility_timeout_too_small_is_named_with_its_minimum() -> None:
    env = {**CREDENTIALS, "MIPOS_TIMEOUT_S": "10", "MIPOS_VISIBILITY_TIMEOUT_S": "60",
           "MIPOS_PASSWORD": ""}
    with pytest.raises(Exception) as info:
        load_checked_worker_settings(env)
    text = str(info.value)
    assert "MIPOS_PASSWORD is required" in text  # one message, every bad setting
    assert "MIPOS_VISIBILITY_TIMEOUT_S=60" in text
    minimum = delivery.minimum_visibility_timeout_s(load_delivery_settings({"MIPOS_TIMEOUT_S": "10"}))
    assert f"at least {minimum:g}" in text


# -- real processes --------------------------------------------------------------------


def test_worker_refuses_a_visibility_timeout_too_small_for_an_attempt(redis_server: RedisServer) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIPOS_", "REDIS_URL"))}
    env.update(CREDENTIALS, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               REDIS_URL=redis_server.url, MIPOS_TIMEOUT_S="10", MIPOS_VISIBILITY_TIMEOUT_S="60")
    proc = subprocess.Popen(["bash", "-c", f"exec {procfile_command('worker')}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        pytest.fail("the worker started with MIPOS_VISIBILITY_TIMEOUT_S=60 and MIPOS_TIMEOUT_S=10")
    assert proc.returncode != 0
    assert "MIPOS_VISIBILITY_TIMEOUT_S=60" in stderr and "at least" in stderr, stderr
    assert "Traceback" not in stdout + stderr


def unacked_tags(redis_server: RedisServer) -> list[Any]:
    return list(redis_server.client.zrange("unacked_index", 0, -1))


def test_doctor_and_a_producer_leave_a_message_a_live_worker_holds(
        make_cluster: ClusterFactory, tasks: ModuleType, redis_server: RedisServer) -> None:
    cluster = make_cluster(**LONG_ENV)
    order_id, second_id = new_order_id(), new_order_id()
    cluster.control.add_faults(order_id, {"delay_s": ATTEMPT_S})  # mipos answers 200 after 10 s
    tasks.accept_order.delay(delivery_id=1, store_id="3", order_external_id=order_id)
    wait_for(lambda: cluster.control.requests(order_external_id=order_id), timeout=15,
             what="the accept to be in flight")
    [tag] = wait_for(lambda: unacked_tags(redis_server), timeout=5, what="the held message")
    # As if the worker had held it for 400 s: the stamp is all kombu's sweep looks at.
    redis_server.client.zadd("unacked_index", {tag: time.time() - HELD_FOR_S})

    # A ping shorter than kombu's 1 s BRPOP wait ends in an empty poll, and an empty poll sweeps.
    doctor = subprocess.run([CLI, "doctor", "--json", "--skip-mipos", "--ping-timeout", "0.5"], cwd=ROOT,
                            env=cluster.env, capture_output=True, text=True, timeout=60, check=False)
    pos_env = {k: v for k, v in cluster.env.items()
               if k not in ("MIPOS_CLIENT_ID", "MIPOS_CLIENT_SECRET", "MIPOS_EMAIL", "MIPOS_PASSWORD")}
    producer = subprocess.run([sys.executable, "-c", PRODUCER_SCRIPT, second_id], cwd=ROOT,
                              env=pos_env, capture_output=True, text=True, timeout=60, check=False)
    still_held = redis_server.client.hexists("unacked", tag)
    in_flight_still = not cluster.attempt_lines(order_id)

    checks: dict[str, Any] = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["workers"]["status"] == "ok", doctor.stdout
    assert producer.returncode == 0, producer.stderr
    assert json.loads(producer.stdout) == {
        "visibility_timeout": 900.0,
        "unacked_restore_interval": delivery.restore_interval_s(load_delivery_settings(LONG_ENV)),
    }
    assert in_flight_still, "the attempt ended before doctor and the producer were done"
    assert still_held, "doctor handed a message a live worker holds back to the queue"

    cluster.wait_final(order_id, timeout=30)
    cluster.wait_final(second_id, timeout=30)
    lines = cluster.attempt_lines(order_id)
    assert [line["outcome"] for line in lines] == ["accepted"], lines
    accepts = [r for r in cluster.control.requests(order_external_id=order_id) if r["path"] == ACCEPT_PATH]
    assert len(accepts) == 1
