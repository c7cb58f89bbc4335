"""A password that breaks REDIS_URL (issue 25, item 1).

A password with an unencoded ``/``, ``#`` or ``?`` ends the URL's host part
early: no process may print it, the settings name the problem, and the same
password percent-encoded works for every client. The helpers here serve the
tests of items 2 and 10 too (test_sentinel_url_passwords.py, test_tls_options.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from bench.sentinel import RedisNode
from mipos_worker.names import QUEUE
from mipos_worker.settings import (
    SettingsError,
    load_producer_settings,
    url_without_password,
)
from support.processes import ROOT, SANDBOX_ENV, free_port

CLI = str(Path(sys.executable).parent / "mipos-worker")
# A generated password as they come: '/', '#', '?', ';', '%', '@' and ':' in it.
RAW_PASSWORD = "Pr0d/Secret#99?x;y%41@z:w"
ENCODED_PASSWORD = quote(RAW_PASSWORD, safe="")
# Written into REDIS_URL as is: each of these ends the host part early for urlsplit.
BROKEN_URLS = [
    "redis://:Pr0d/Secret#99@127.0.0.1:6379/0",
    "rediss://:Pr0d?Secret#99@127.0.0.1:6380/0",
    "redis://:Pr0d#Secret99@127.0.0.1/0",
    "redis://user:Pr0d/Secret99@127.0.0.1/0",
]
BROKEN_SENTINEL_URL = "sentinel://:Pr0d/Secret#99@127.0.0.1:26379;sentinel://127.0.0.1:26380/0"
PASSWORD_PIECES = ("Pr0d", "Secret")
ENQUEUE = ("import sys; from tasks import accept_order; "
           "accept_order.delay(delivery_id=1, store_id='3', order_external_id=sys.argv[1])")


def environment(**extra: str) -> dict[str, str]:
    """This process's environment without any mipos or Redis setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MIPOS_", "REDIS_", "FLOWER_", "SSL_CERT_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def doctor(env: dict[str, str]) -> tuple[dict[str, dict[str, Any]], subprocess.CompletedProcess[str]]:
    result = run([CLI, "doctor", "--json", "--skip-mipos", "--ping-timeout", "0.5"], env)
    assert result.stdout.strip(), result.stderr
    return {c["name"]: c for c in json.loads(result.stdout)["checks"]}, result


def assert_no_password(text: str, *pieces: str) -> None:
    for piece in pieces:
        assert piece not in text, text


# -- item 1: a password that breaks the URL is named, never shown ----------------------------


@pytest.mark.parametrize("url", BROKEN_URLS)
def test_a_password_that_breaks_the_url_is_a_settings_problem_that_never_shows_it(url: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_producer_settings({"REDIS_URL": url})
    [problem] = info.value.problems
    assert problem.startswith("REDIS_URL is not a valid URL: ")
    assert "percent-encode them (%2F, %23, %3F)" in problem
    assert_no_password(str(info.value), *PASSWORD_PIECES)
    assert_no_password(url_without_password(url), *PASSWORD_PIECES)


def test_a_sentinel_password_that_breaks_its_url_is_named_never_shown() -> None:
    with pytest.raises(SettingsError) as info:
        load_producer_settings({"REDIS_URL": BROKEN_SENTINEL_URL, "REDIS_SENTINEL_MASTER": "m"})
    assert "part 1 of REDIS_URL is not a valid URL" in str(info.value)
    assert "percent-encode" in str(info.value)
    assert_no_password(str(info.value) + url_without_password(BROKEN_SENTINEL_URL), *PASSWORD_PIECES)


def test_a_percent_encoded_password_is_hidden_and_redacted_in_both_forms() -> None:
    url = f"redis://:{ENCODED_PASSWORD}@127.0.0.1:6379/0"
    settings = load_producer_settings({"REDIS_URL": url})
    assert settings.url == url
    assert url_without_password(url) == "redis://:***@127.0.0.1:6379/0"
    assert {RAW_PASSWORD, ENCODED_PASSWORD} <= set(settings.secrets())


def test_doctor_names_the_broken_url_without_printing_the_password() -> None:
    checks, result = doctor(environment(REDIS_URL=BROKEN_URLS[0], **SANDBOX_ENV))
    assert_no_password(result.stdout + result.stderr, *PASSWORD_PIECES)
    assert checks["settings"]["status"] == "fail" and "percent-encode" in checks["settings"]["detail"]
    assert checks["redis"]["status"] == "skipped" and "percent-encode" in checks["redis"]["detail"]


def worker_with_broken_url() -> subprocess.CompletedProcess[str]:
    env = environment(REDIS_URL=BROKEN_URLS[0], **SANDBOX_ENV)
    return run([sys.executable, "-m", "celery", "-A", "worker", "worker", "--pool=solo"], env)


def test_a_worker_refuses_the_broken_url_with_exit_2_without_printing_the_password() -> None:
    result = worker_with_broken_url()
    assert result.returncode == 2, result
    assert_no_password(result.stdout + result.stderr, *PASSWORD_PIECES)
    assert "REDIS_URL is not a valid URL" in result.stderr and "percent-encode" in result.stderr


def test_a_worker_refuses_the_broken_url_in_one_line() -> None:
    result = worker_with_broken_url()
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_flower_does_not_print_the_password_of_a_broken_url() -> None:
    env = environment(REDIS_URL=BROKEN_URLS[0], FLOWER_LOCAL="true", PORT=str(free_port()))
    result = run([sys.executable, "-m", "worker.flower"], env)
    assert result.returncode != 0
    assert_no_password(result.stdout + result.stderr, *PASSWORD_PIECES)
    assert "percent-encode" in result.stderr


@pytest.fixture
def special_redis(tmp_path: Path) -> Iterator[RedisNode]:
    """A redis-server whose password has every character a URL treats specially."""
    node = RedisNode(tmp_path, "node", password=RAW_PASSWORD)
    yield node
    node.stop()


def queued(node: RedisNode) -> int:
    return int(node.client.llen(QUEUE))


def enqueue(env: dict[str, str], order_id: str) -> subprocess.CompletedProcess[str]:
    """``delay()`` from a fresh POS process."""
    return run([sys.executable, "-c", ENQUEUE, order_id], env)


def test_the_percent_encoded_password_reaches_redis_from_doctor_and_delay(special_redis: RedisNode) -> None:
    env = environment(REDIS_URL=f"redis://:{ENCODED_PASSWORD}@127.0.0.1:{special_redis.port}/0",
                      **SANDBOX_ENV)
    producer = enqueue(env, "enc-1")
    assert producer.returncode == 0, producer.stderr
    assert queued(special_redis) == 1
    checks, result = doctor(env)
    assert checks["redis"]["status"] == "ok", checks["redis"]
    assert_no_password(result.stdout + result.stderr, RAW_PASSWORD, ENCODED_PASSWORD, *PASSWORD_PIECES)


