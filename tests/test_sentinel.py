"""Redis behind Sentinel: settings, clients that follow a failover, WAIT for replicas, doctor,
and a short failover chaos run (real Sentinels, a replica, a SIGKILLed master)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.sentinel import SentinelCluster
from config import SettingsError, load_producer_settings, url_without_password
from support.processes import ROOT, wait_for
from tests.conftest import write_done
from mipos_worker.order.model import Order
from mipos_worker.state.replication import NotReplicated, ReplicaAck

REDIS_PASSWORD = "redis-pass-for-tests"
SENTINEL_PASSWORD = "sentinel-pass-for-tests"


# -- settings ------------------------------------------------------------------------


def test_a_sentinel_url_needs_the_master_name() -> None:
    with pytest.raises(SettingsError) as info:
        load_producer_settings({"REDIS_URL": "sentinel://h1:26379;sentinel://h2:26379/0"})
    assert "REDIS_URL" in str(info.value) and "REDIS_SENTINEL_MASTER" in str(info.value)


def test_sentinel_settings_on_a_plain_url_are_refused() -> None:
    with pytest.raises(SettingsError) as info:
        load_producer_settings({"REDIS_URL": "redis://h:6379/0", "REDIS_SENTINEL_MASTER": "mymaster",
                                "REDIS_MIN_REPLICAS_ACK": "-1"})
    text = str(info.value)
    assert "REDIS_SENTINEL_MASTER is set but REDIS_URL is not a Sentinel URL" in text
    assert "REDIS_MIN_REPLICAS_ACK=-1 must be 0 or more" in text


def test_a_sentinel_url_is_spelled_out_for_kombu_and_hides_its_password() -> None:
    settings = load_producer_settings({
        "REDIS_URL": "sentinel://:s3cret-pass@h1:26379;sentinel://h2/2?ssl_ca_certs=/ca.crt",
        "REDIS_SENTINEL_MASTER": "mymaster", "REDIS_SENTINEL_PASSWORD": "sentinel-secret",
        "REDIS_MIN_REPLICAS_ACK": "1", "REDIS_REPLICA_ACK_TIMEOUT_S": "0.5"})
    # kombu reads the credentials, the database and TLS from the first URL only: every URL has them.
    assert settings.url == ("sentinel://:s3cret-pass@h1:26379/2?ssl_ca_certs=/ca.crt&ssl_cert_reqs=required;"
                            "sentinel://:s3cret-pass@h2:26379/2?ssl_ca_certs=/ca.crt&ssl_cert_reqs=required")
    assert (settings.sentinel_master, settings.min_replicas_ack, settings.replica_ack_timeout_s) == (
        "mymaster", 1, 0.5)
    assert set(settings.secrets()) >= {"s3cret-pass", "sentinel-secret"}
    assert "s3cret-pass" not in url_without_password(settings.url)
    with pytest.raises(SettingsError) as info:
        load_producer_settings({"REDIS_URL": "sentinel://:s3cret-pass@h1:x;redis://h2/0",
                                "REDIS_SENTINEL_MASTER": "m"})
    assert "s3cret-pass" not in str(info.value) and "part 2" in str(info.value)


def test_single_redis_makes_no_extra_round_trip() -> None:
    settings = load_producer_settings({"REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert settings.sentinel_master is None and not ReplicaAck.of(settings).enabled


# -- a real Sentinel deployment ------------------------------------------------------


@pytest.fixture
def deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SentinelCluster]:
    cluster = SentinelCluster(tmp_path / "redis", password=REDIS_PASSWORD,
                              sentinel_password=SENTINEL_PASSWORD)
    for name, value in cluster.env().items():
        monkeypatch.setenv(name, value)
    yield cluster
    cluster.stop()


def test_clients_follow_a_failover_and_log_it_once(deployment: SentinelCluster) -> None:
    from mipos_worker.state.connection import redis_from_url
    from worker.state.topology import follow_master_changes, master_address, tracker

    follow_master_changes()  # as every worker process does (worker/wiring/runtime.py, celery_app.py)
    settings = load_producer_settings()
    client = redis_from_url(settings.url, timeout_s=2.0, retries=1)
    client.set("before", "1")
    first = master_address(client)
    assert first is not None and first[1] == deployment.master().port
    changes = tracker.changes
    seen: list[tuple[Any, Any]] = []
    tracker.listen("test", lambda _name, old, new: seen.append((old, new)))

    old, _ = deployment.kill_master()
    deployment.wait_promoted(old)

    def write() -> bool:
        try:
            return bool(client.set("after", "1"))
        except redis.RedisError:
            return False
    wait_for(write, timeout=30, interval=0.1, what="a write through the new master")
    assert master_address(client) == ("127.0.0.1", deployment.master().port) != first
    assert client.get("before") == b"1"  # replicated before the kill
    assert tracker.changes == changes + 1 and seen == [(first, master_address(client))]


def test_wait_for_a_replica_guards_the_done_record(deployment: SentinelCluster) -> None:
    from mipos_worker.state.connection import redis_from_url

    client = redis_from_url(load_producer_settings().url, timeout_s=3.0, retries=1)
    order = Order("1", "7", str(uuid.uuid4()))
    write_done(client, "mipos:", order, "task-1", ReplicaAck(1, 0.5))
    replica = next(node for node in deployment.nodes if node.port != deployment.master().port)
    assert replica.client.get(f"mipos:done:{order.key}") is not None  # on the replica on return

    replica.kill()
    with pytest.raises(NotReplicated, match="0 of the 1 replicas"):
        write_done(client, "mipos:", order, "task-2", ReplicaAck(1, 0.3))
    write_done(client, "mipos:", order, "task-3")  # 0: no WAIT


def test_delay_fails_fast_without_a_replica_and_doctor_says_why(deployment: SentinelCluster,
                                                                 tmp_path: Path) -> None:
    env = {**os.environ, "REDIS_MIN_REPLICAS_ACK": "1", "REDIS_REPLICA_ACK_TIMEOUT_S": "0.5"}
    script = (
        "import time, uuid\n"
        "from tasks import accept_order\n"
        "def enqueue():\n"
        "    started = time.monotonic()\n"
        "    try:\n"
        "        accept_order.delay(delivery_id=1, store_id='7', order_external_id=str(uuid.uuid4()))\n"
        "        return 'ok', time.monotonic() - started\n"
        "    except Exception as exc:\n"
        "        return f'{type(exc).__name__}: {exc}', time.monotonic() - started\n"
        "print(enqueue()); import sys; sys.stdin.readline(); print(enqueue())\n"
    )
    pos = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, text=True,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert pos.stdout is not None and pos.stdin is not None
    first = pos.stdout.readline()
    assert first.startswith("('ok'"), first + (pos.stderr.read() if pos.stderr else "")
    doctor = _doctor(env)
    assert doctor["redis topology"]["status"] == "ok", doctor["redis topology"]
    assert "online" in doctor["redis topology"]["detail"]
    assert doctor["sentinel quorum"]["status"] == "ok" and "3 of 3 Sentinels" in \
        doctor["sentinel quorum"]["detail"]

    replica = next(node for node in deployment.nodes if node.port != deployment.master().port)
    replica.kill()
    pos.stdin.write("\n")
    pos.stdin.flush()
    second = pos.stdout.readline()
    pos.wait(timeout=30)
    assert "OperationalError" in second and "0 of the 1 replicas" in second, second
    assert float(second.rsplit(",", 1)[1].strip(" )\n")) < 5  # fails fast, never hangs

    def doctor_sees_it() -> dict[str, dict[str, str]] | None:
        checks = _doctor(env)
        return checks if checks["redis topology"]["status"] == "fail" else None
    checks = wait_for(doctor_sees_it, timeout=30, interval=0.5, what="doctor to see no replica")
    assert "REDIS_MIN_REPLICAS_ACK=1 but 0 online" in checks["redis topology"]["detail"]


def _doctor(env: dict[str, str]) -> dict[str, dict[str, str]]:
    result = subprocess.run([sys.executable, "-m", "cli", "doctor", "--skip-mipos", "--json"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    assert REDIS_PASSWORD not in result.stdout + result.stderr
    assert SENTINEL_PASSWORD not in result.stdout + result.stderr
    return {c["name"]: c for c in json.loads(result.stdout)["checks"]}


# -- the short failover chaos run ----------------------------------------------------


def test_short_failover_run_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "failover.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.failover", "--orders", "200", "--failovers", "1",
         "--permanent", "4", "--timeout", "150", "--quiet", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=200, check=False,
    )
    assert out.exists(), proc.stdout + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert result["lost"] == 0 and result["wrongly_dead_lettered"] == 0
    assert result["duplicates_unexplained"] == 0
    assert result["dead_lettered_permanent"] == 4
    assert len(result["failovers"]) == 1 and result["failovers"][0]["promoted"]
    assert len(result["worker_follow_s"]) == 3  # every worker logged redis_master_changed once
    assert "| REDIS_MIN_REPLICAS_ACK | orders |" in proc.stdout
