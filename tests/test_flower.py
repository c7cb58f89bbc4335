"""Flower as the Procfile's ``flower:`` line runs it: its settings, basic auth, the Tasks
page in a real headless Chromium, and ``/metrics``."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from bench.browser import BrowserMissing, chromium_executable, flower_tasks_page
from sandbox import SANDBOX_CREDENTIALS
from support.processes import ROOT, FlowerProcess, RedisServer, free_port, procfile_command, wait_for
from tests.conftest import Cluster, harvest_tokens

USER = "ops"
PASSWORD = f"pw-{secrets.token_urlsafe(12)}"
AUTH_MESSAGE = "mipos-worker flower: FLOWER_BASIC_AUTH must be user:password"


def base_env(redis_server: RedisServer, **extra: str) -> dict[str, str]:
    """This environment without any FLOWER_ variable, pointed at the test Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_") and k != "PORT"}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
        REDIS_URL=redis_server.url,
        FLOWER_ADDRESS="127.0.0.1",
    )
    env.update(extra)
    return env


def run_line(env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """The flower: line run to its end (it must exit on its own, quickly)."""
    return subprocess.run(["bash", "-c", f"exec {procfile_command('flower')}"], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


StartFlower = Callable[..., FlowerProcess]


@pytest.fixture
def start_flower(logdir: Path) -> Iterator[StartFlower]:
    started: list[FlowerProcess] = []

    def start(env: dict[str, str]) -> FlowerProcess:
        flower = FlowerProcess(env, logdir / f"flower-{uuid.uuid4().hex[:8]}.log", free_port())
        started.append(flower)
        flower.wait_ready()
        return flower

    yield start
    for flower in started:
        flower.stop()


# -- refusing to start ----------------------------------------------------------


@pytest.mark.parametrize("extra", [{}, {"FLOWER_BASIC_AUTH": ""}, {"FLOWER_LOCAL": "false"}],
                         ids=["unset", "empty", "local-false"])
def test_refuses_to_start_without_basic_auth(redis_server: RedisServer, extra: dict[str, str]) -> None:
    result = run_line(base_env(redis_server, PORT=str(free_port()), **extra))

    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "FLOWER_BASIC_AUTH" in lines[0] and "FLOWER_LOCAL" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""


@pytest.mark.parametrize("value", ["admin", "admin:", ":{pw}"], ids=["no-colon", "no-password", "no-user"])
def test_malformed_basic_auth_is_refused_without_echoing_it(redis_server: RedisServer, value: str) -> None:
    password = f"Sekr1t-{secrets.token_hex(6)}"
    result = run_line(base_env(redis_server, PORT=str(free_port()),
                               FLOWER_BASIC_AUTH=value.format(pw=password)))

    assert result.returncode == 2, result
    assert result.stderr.strip() == AUTH_MESSAGE
    assert password not in result.stderr + result.stdout


@pytest.mark.parametrize(("extra", "name"), [
    ({"FLOWER_LOCAL": "maybe"}, "FLOWER_LOCAL"),
    ({"PORT": "http"}, "PORT"),
    ({"PORT": "70000"}, "PORT"),
])
def test_other_bad_settings_are_refused(redis_server: RedisServer, extra: dict[str, str], name: str) -> None:
    env = base_env(redis_server, FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}", PORT=str(free_port()))
    result = run_line({**env, **extra})

    assert result.returncode == 2, result
    [line] = result.stderr.strip().splitlines()
    assert name in line and "Traceback" not in result.stderr
    assert PASSWORD not in result.stderr + result.stdout


# -- basic auth -----------------------------------------------------------------


def test_basic_auth(redis_server: RedisServer, start_flower: StartFlower, tmp_path: Path) -> None:
    other_password = secrets.token_urlsafe(9)
    users = tmp_path / "flower-users"  # several users: the users file (FLOWER_BASIC_AUTH takes one)
    users.write_text(f"{USER}:{PASSWORD}\nviewer:{other_password}\n")
    users.chmod(0o600)
    flower = start_flower(base_env(redis_server, FLOWER_BASIC_AUTH_FILE=str(users)))

    assert flower.get("/")[0] == 401
    assert flower.get("/tasks")[0] == 401
    assert flower.get("/", auth=(USER, "wrong"))[0] == 401
    assert flower.get("/", auth=("nobody", PASSWORD))[0] == 401
    assert flower.get("/", auth=(USER, PASSWORD))[0] == 200
    assert flower.get("/tasks", auth=("viewer", other_password))[0] == 200
    # The password is on no command line (ps) and in no log line.
    cmdline = Path(f"/proc/{flower.proc.pid}/cmdline").read_bytes().decode(errors="replace")
    assert PASSWORD not in cmdline and "worker.flower" in cmdline
    log = flower.log_path.read_text(errors="replace")
    assert "Visit me at" in log
    assert PASSWORD not in log and other_password not in log


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on ``port`` (Linux /proc)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_local_without_auth_listens_on_loopback_only(redis_server: RedisServer,
                                                      start_flower: StartFlower) -> None:
    flower = start_flower(base_env(redis_server, FLOWER_LOCAL="true", FLOWER_ADDRESS="0.0.0.0"))

    assert flower.get("/")[0] == 200  # no authentication at all
    assert listening_addresses(flower.port) == {"0100007F"}  # 127.0.0.1, and nothing else
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.2", flower.port), 2):
        pass
    log = flower.log_path.read_text(errors="replace")
    assert "WITHOUT authentication" in log and "FLOWER_LOCAL" in log
    assert f"Visit me at http://127.0.0.1:{flower.port}" in log


def test_listens_on_loopback_unless_told_otherwise(redis_server: RedisServer,
                                                    start_flower: StartFlower) -> None:
    env = base_env(redis_server, FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}")
    del env["FLOWER_ADDRESS"]
    flower = start_flower(env)

    assert flower.get("/", auth=(USER, PASSWORD))[0] == 200
    assert listening_addresses(flower.port) == {"0100007F"}  # 127.0.0.1, and nothing else
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.2", flower.port), 2):
        pass


@pytest.mark.parametrize(("extra", "needle"), [
    ({"MIPOS_VISIBILITY_TIMEOUT_S": "20"}, "MIPOS_VISIBILITY_TIMEOUT_S=20 is too small"),
    ({"MIPOS_TIMEOUT_S": "soon"}, "MIPOS_TIMEOUT_S='soon' is not a number"),
])
def test_refuses_a_visibility_timeout_that_is_not_the_workers(redis_server: RedisServer,
                                                             extra: dict[str, str], needle: str) -> None:
    """Flower's broker connection re-queues messages held longer than its visibility timeout."""
    env = base_env(redis_server, FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}", PORT=str(free_port()), **extra)
    result = run_line(env)

    assert result.returncode == 2, result
    [line] = result.stderr.strip().splitlines()
    assert needle in line and "Traceback" not in result.stderr


# -- the Tasks page in Chromium, and /metrics -------------------------------------


@pytest.fixture(scope="module")
def flower(cluster: Cluster, logdir: Path) -> Iterator[FlowerProcess]:
    """Flower with the workers' environment (the mipos credentials included), as a deployment has it."""
    env = {**cluster.env, "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}", "FLOWER_ADDRESS": "127.0.0.1"}
    process = FlowerProcess(env, logdir / "flower-tasks.log", free_port())
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def require_chromium() -> None:
    try:
        chromium_executable()
    except BrowserMissing as exc:
        if os.environ.get("MIPOS_SKIP_BROWSER") == "1":
            pytest.skip(f"MIPOS_SKIP_BROWSER=1: {exc}")
        pytest.fail(f"{exc} (or set MIPOS_SKIP_BROWSER=1 to skip the browser test)", pytrace=False)


def test_tasks_page_in_chromium_shows_retries_failures_and_arguments_but_no_secrets(
        cluster: Cluster, flower: FlowerProcess, tasks: ModuleType) -> None:
    require_chromium()
    retried, dead = str(uuid.uuid4()), str(uuid.uuid4())
    # Two transient answers, then accepted; the first asks for 3 s, long enough to see RETRY.
    cluster.control.add_faults(retried, {"status": 429, "message": "Too Many Attempts.", "retry_after": 3},
                               {"status": 500, "message": "Server Error"})
    cluster.control.add_faults(dead, {"status": 409, "message": "Order not found.", "times": -1})

    with flower_tasks_page(flower.url, (USER, PASSWORD)) as page:
        retried_task = tasks.accept_order.delay(delivery_id=71, store_id="3", order_external_id=retried)
        dead_task = tasks.accept_order.delay(delivery_id=72, store_id="3", order_external_id=dead)

        page.wait_for_rows([{"name": "mipos.accept_order", "state": "RETRY", "kwargs": retried,
                             "exception": "Retry in 3.0s: TransientError('Too Many Attempts.')"}],
                            timeout=20)
        rows = page.wait_for_rows([
            {"name": "mipos.accept_order", "state": "SUCCESS", "kwargs": retried},
            {"name": "mipos.accept_order", "state": "FAILURE", "kwargs": dead,
             "exception": "dead-letter"},
        ], timeout=30)
        by_order = {order: row for row in rows for order in (retried, dead) if order in row["kwargs"]}
        assert by_order[retried]["retries"] == "2" and by_order[retried]["exception"] == ""
        assert by_order[retried]["uuid"] == retried_task.id and by_order[dead]["uuid"] == dead_task.id
        assert "'delivery_id': '71'" in by_order[retried]["kwargs"]
        assert "Order not found." in by_order[dead]["exception"]
        texts = [page.text(), page.task_text(retried_task.id), page.task_text(dead_task.id)]

    assert retried in texts[0] and dead in texts[0] and "mipos.accept_order" in texts[0]
    harvest_tokens(cluster.sandbox)
    tokens = {r["authorization"][7:] for r in cluster.control.requests()
              if (r.get("authorization") or "").startswith("Bearer ") and len(r["authorization"]) > 7}
    assert tokens, "the worker should have used a token"
    for secret in (SANDBOX_CREDENTIALS["client_secret"], SANDBOX_CREDENTIALS["password"], PASSWORD, *tokens):
        for text in texts:
            assert secret not in text, f"a secret ({secret[:3]}...) is on a Flower page"


def test_metrics_without_auth_carry_flower_and_mipos_metrics(
        cluster: Cluster, flower: FlowerProcess, tasks: ModuleType) -> None:
    order = str(uuid.uuid4())
    tasks.accept_order.delay(delivery_id=73, store_id="3", order_external_id=order)
    cluster.wait_final(order)

    def scrape() -> tuple[int, str] | None:  # workers write their counts about once a second
        status, body = flower.get("/metrics")  # Flower serves /metrics without authentication
        return (status, body) if status != 200 or 'outcome="accepted"' in body else None
    status, body = wait_for(scrape, timeout=10, interval=0.3, what="mipos counts on /metrics")

    assert status == 200
    samples = [line for line in body.splitlines() if line and not line.startswith("#")]
    assert any(line.startswith("flower_events_total{") for line in samples), body[:2000]
    assert any(line.startswith("mipos_attempts_total{") and 'outcome="accepted"' in line
               for line in samples), body[:4000]
    assert PASSWORD not in body and SANDBOX_CREDENTIALS["client_secret"] not in body
