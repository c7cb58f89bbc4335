"""Secrets from files (issue 23, item 6): ``MIPOS_CLIENT_SECRET_FILE``, ``MIPOS_PASSWORD_FILE``
and ``REDIS_PASSWORD_FILE``, the form Docker and Kubernetes secrets take.

Each file is read once, its trailing newline stripped. Setting a secret and its file form is
an error naming both; a file that cannot be read names the variable, never the content.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from kombu.utils.url import url_to_parts

from bench.sentinel import RedisNode
from config import SettingsError, load_producer_settings, load_worker_settings
from config.settings import configured_secrets
from mipos_worker.redis_url import parse_sentinel_url
from mipos_worker.settings import url_without_password
from support.processes import ROOT, SANDBOX_ENV, RedisServer, Sandbox
from tests.conftest import Cluster

CREDENTIALS = {"MIPOS_CLIENT_ID": "id", "MIPOS_EMAIL": "pos@example.invalid"}
CLIENT_SECRET = "client-secret-from-a-file"
PASSWORD = "password-from-a-file"
# A generated Redis password as they come: each of these breaks a URL unless encoded.
REDIS_PASSWORD = "Pr0d/Secret#99?x;y%41@z:w"


def secret_file(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    path.chmod(0o600)
    return str(path)


def file_env(tmp_path: Path) -> dict[str, str]:
    return {**CREDENTIALS,
            "MIPOS_CLIENT_SECRET_FILE": secret_file(tmp_path, "client-secret", CLIENT_SECRET + "\n"),
            "MIPOS_PASSWORD_FILE": secret_file(tmp_path, "password", PASSWORD + "\r\n")}


def problems_of(env: dict[str, str]) -> list[str]:
    with pytest.raises(SettingsError) as info:
        load_worker_settings(env)
    return info.value.problems


# -- the mipos credentials ------------------------------------------------------------------------


def test_mipos_secrets_come_from_files_without_their_trailing_newline(tmp_path: Path) -> None:
    settings = load_worker_settings(file_env(tmp_path))
    assert (settings.mipos.client_secret, settings.mipos.password) == (CLIENT_SECRET, PASSWORD)
    assert set(settings.mipos.secrets()) == {CLIENT_SECRET, PASSWORD}


def test_a_secret_and_its_file_form_are_one_error_naming_both(tmp_path: Path) -> None:
    env = {**file_env(tmp_path), "MIPOS_PASSWORD": "another-password", "MIPOS_CLIENT_SECRET": "another-secret",
           "LOG_FORMAT": "xml"}
    problems = problems_of(env)
    text = "; ".join(problems)
    assert "MIPOS_PASSWORD and MIPOS_PASSWORD_FILE are both set" in text
    assert "MIPOS_CLIENT_SECRET and MIPOS_CLIENT_SECRET_FILE are both set" in text
    assert "LOG_FORMAT" in text  # every problem in one error
    assert len(problems) == 3, problems
    for value in ("another-password", "another-secret", PASSWORD, CLIENT_SECRET):
        assert value not in text


def test_a_missing_secret_names_both_forms() -> None:
    text = "; ".join(problems_of(CREDENTIALS))
    assert "MIPOS_PASSWORD is required but not set (or set MIPOS_PASSWORD_FILE to a file holding it)" in text
    assert "MIPOS_CLIENT_SECRET is required but not set (or set MIPOS_CLIENT_SECRET_FILE" in text


@pytest.mark.parametrize(("kind", "content", "said"), [
    ("missing", None, "cannot be read (No such file or directory)"),
    ("a directory", "dir", "cannot be read (Is a directory)"),
    ("not UTF-8", b"password-\xff-from-a-file\n", "is not UTF-8 text"),
    ("empty", "\n", "is empty"),
    ("two lines", "password-from-a-file\nsecond-line-of-it\n", "holds more than one line"),
])
def test_a_file_that_cannot_be_used_is_named_never_its_content(
        tmp_path: Path, kind: str, content: str | bytes | None, said: str) -> None:
    path = str(tmp_path / "unusable")
    if content == "dir":
        os.mkdir(path)
    elif content is not None:
        secret_file(tmp_path, "unusable", content)
    env = {**file_env(tmp_path), "MIPOS_PASSWORD_FILE": path}
    [problem] = problems_of(env)
    assert problem.startswith(f"MIPOS_PASSWORD_FILE={path!r} {said}")
    for piece in ("password-", "from-a-file", "second-line"):
        assert piece not in problem.replace(path, "")


def test_a_short_secret_in_a_file_is_refused_naming_the_file_form(tmp_path: Path) -> None:
    env = {**file_env(tmp_path), "MIPOS_PASSWORD_FILE": secret_file(tmp_path, "short", "pw1\n")}
    [problem] = problems_of(env)
    assert problem.startswith("MIPOS_PASSWORD_FILE's content is shorter than 8 characters")
    assert "pw1" not in problem


def test_a_secret_file_is_read_once(tmp_path: Path) -> None:
    env = file_env(tmp_path)
    assert load_worker_settings(env).mipos.password == PASSWORD
    Path(env["MIPOS_PASSWORD_FILE"]).write_text("rotated-while-running\n")
    assert load_worker_settings(env).mipos.password == PASSWORD  # kept: read at start
    Path(env["MIPOS_PASSWORD_FILE"]).unlink()
    assert load_worker_settings(env).mipos.password == PASSWORD


def test_the_secrets_to_redact_come_from_either_form(tmp_path: Path) -> None:
    """What a process without the worker's complete settings (Flower) registers for redaction."""
    env = file_env(tmp_path)
    assert set(configured_secrets(env)) == {CLIENT_SECRET, PASSWORD}
    assert set(configured_secrets({"MIPOS_PASSWORD": PASSWORD})) == {PASSWORD}
    assert configured_secrets({"MIPOS_PASSWORD_FILE": str(tmp_path / "nowhere")}) == ()


# -- the Redis password -----------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected_user"), [
    ("redis://127.0.0.1:6379/0", None),
    ("redis://worker@127.0.0.1:6379/0", "worker"),
    ("rediss://cache.example:6380/2?ssl_cert_reqs=none", None),
])
def test_the_redis_password_file_gives_redis_url_its_password(
        tmp_path: Path, url: str, expected_user: str | None) -> None:
    path = secret_file(tmp_path, "redis-password", REDIS_PASSWORD + "\n")
    settings = load_producer_settings({"REDIS_URL": url, "REDIS_PASSWORD_FILE": path})
    parsed = redis.connection.parse_url(settings.url)  # as redis-py reads it
    assert parsed["password"] == REDIS_PASSWORD and parsed.get("username") == expected_user
    kombu = url_to_parts(settings.url)  # as the broker reads it
    assert kombu.password == REDIS_PASSWORD and kombu.hostname == parsed["host"]
    assert REDIS_PASSWORD in settings.secrets()
    assert "Pr0d" not in url_without_password(settings.url)


def test_the_redis_password_file_gives_every_sentinel_url_the_masters_password(tmp_path: Path) -> None:
    path = secret_file(tmp_path, "redis-password", REDIS_PASSWORD + "\n")
    settings = load_producer_settings({"REDIS_URL": "sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380/1",
                                       "REDIS_SENTINEL_MASTER": "mymaster", "REDIS_PASSWORD_FILE": path})
    target, problems = parse_sentinel_url(settings.url)
    assert problems == [] and target is not None
    assert (target.password, target.db, len(target.sentinels)) == (REDIS_PASSWORD, 1, 2)
    assert all(url_to_parts(piece).password == REDIS_PASSWORD for piece in settings.url.split(";"))


@pytest.mark.parametrize("url", [
    "redis://:url-password-1@127.0.0.1:6379/0",
    "sentinel://:url-password-1@127.0.0.1:26379;sentinel://127.0.0.1:26380/0",
])
def test_a_url_with_its_own_password_and_the_file_is_refused_naming_both(tmp_path: Path, url: str) -> None:
    env = {"REDIS_URL": url, "REDIS_SENTINEL_MASTER": "mymaster",
           "REDIS_PASSWORD_FILE": secret_file(tmp_path, "redis-password", REDIS_PASSWORD)}
    if url.startswith("redis://"):
        del env["REDIS_SENTINEL_MASTER"]
    with pytest.raises(SettingsError) as info:
        load_producer_settings(env)
    [problem] = info.value.problems
    assert "REDIS_URL has a password and REDIS_PASSWORD_FILE is set" in problem
    assert "url-password-1" not in problem and "Pr0d" not in problem


def test_an_unreadable_redis_password_file_is_named(tmp_path: Path) -> None:
    path = str(tmp_path / "nowhere")
    with pytest.raises(SettingsError) as info:
        load_producer_settings({"REDIS_PASSWORD_FILE": path})
    assert info.value.problems == [f"REDIS_PASSWORD_FILE={path!r} cannot be read (No such file or directory)"]


# -- real processes ---------------------------------------------------------------------------------


@dataclass
class PasswordRedis:
    """A redis-server requiring REDIS_PASSWORD, as the cluster helper sees one."""

    node: RedisNode

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.node.port}/0"  # no password: it comes from the file

    @property
    def client(self) -> redis.Redis:
        return self.node.client


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[PasswordRedis]:
    node = RedisNode(tmp_path, "protected", password=REDIS_PASSWORD)
    yield PasswordRedis(node)
    node.stop()


def secrets_in_files(env: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    """``env`` with every secret moved into a file of its own, as a container gets them."""
    moved = {k: v for k, v in env.items() if k not in ("MIPOS_CLIENT_SECRET", "MIPOS_PASSWORD")}
    moved["MIPOS_CLIENT_SECRET_FILE"] = secret_file(tmp_path, "client-secret",
                                                    SANDBOX_ENV["MIPOS_CLIENT_SECRET"] + "\n")
    moved["MIPOS_PASSWORD_FILE"] = secret_file(tmp_path, "password", SANDBOX_ENV["MIPOS_PASSWORD"] + "\n")
    moved["REDIS_PASSWORD_FILE"] = secret_file(tmp_path, "redis-password", REDIS_PASSWORD + "\n")
    return moved


def test_a_worker_with_every_secret_in_a_file_delivers_an_order(
        tmp_path: Path, password_redis: PasswordRedis, sandbox: Sandbox, logdir: Path) -> None:
    """The worker reaches Redis and the sandbox (a fresh token: its credentials came from the
    files), and a POS process enqueues through REDIS_PASSWORD_FILE."""
    sandbox.control.reset()
    cluster = Cluster(cast(RedisServer, password_redis), sandbox, logdir, 0, {})
    cluster.env = secrets_in_files(cluster.env, tmp_path)
    try:
        cluster.start_worker()
        order_id = str(uuid.uuid4())
        enqueue = ("import sys; from mipos_worker import accept_order; "
                   "accept_order.delay(delivery_id=7, store_id='3', order_external_id=sys.argv[1])")
        producer = subprocess.run([sys.executable, "-c", enqueue, order_id], cwd=tmp_path, env=cluster.env,
                                  capture_output=True, text=True, timeout=60, check=False)
        assert producer.returncode == 0, producer.stderr
        [line] = cluster.wait_final(order_id)
        assert line["outcome"] == "accepted"
        [request] = [r for r in sandbox.control.requests(order_external_id=order_id)
                     if r["path"].endswith("/order/accept")]
        assert request["token_valid"] is True
    finally:
        cluster.stop()
    log = "".join(w.log_path.read_text() for w in cluster.workers)
    for secret in (SANDBOX_ENV["MIPOS_PASSWORD"], SANDBOX_ENV["MIPOS_CLIENT_SECRET"], REDIS_PASSWORD):
        assert secret not in log


@pytest.mark.parametrize("case", ["both forms", "unreadable file"])
def test_a_worker_refuses_to_start_naming_the_setting_never_the_secret(tmp_path: Path, case: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIPOS_", "REDIS_"))}
    env.update(SANDBOX_ENV, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    if case == "both forms":
        env["MIPOS_PASSWORD_FILE"] = secret_file(tmp_path, "password", "password-in-the-file\n")
        expected = "MIPOS_PASSWORD and MIPOS_PASSWORD_FILE are both set"
    else:
        del env["MIPOS_PASSWORD"]
        env["MIPOS_PASSWORD_FILE"] = str(tmp_path / "password")
        expected = f"MIPOS_PASSWORD_FILE={str(tmp_path / 'password')!r} cannot be read"
    result = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "worker", "--pool=solo"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr
    output = result.stdout + result.stderr
    assert SANDBOX_ENV["MIPOS_PASSWORD"] not in output and "password-in-the-file" not in output
