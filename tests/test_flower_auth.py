"""Flower's basic auth, from the security review (issue 25): a comma in a password (item 3), the
``FLOWER_BASIC_AUTH_FILE`` form that cannot be misread, and non-ASCII credentials (item 4).

Every case runs the Procfile's ``flower:`` line for real and talks to it over loopback HTTP.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.processes import ROOT, FlowerProcess, RedisServer, free_port, procfile_command

PROG = "mipos-worker flower: "


def flower_env(redis_server: RedisServer, **extra: str) -> dict[str, str]:
    """This environment without any FLOWER_ variable, pointed at the test Redis, on loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_") and k != "PORT"}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
        REDIS_URL=redis_server.url,
        FLOWER_ADDRESS="127.0.0.1",
        PORT=str(free_port()),
    )
    env.update(extra)
    return env


def run_line(env: dict[str, str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """The flower: line run to its end (a refused setting makes it exit at once; subprocess.run
    kills it by its PID when it is still running after ``timeout``)."""
    try:
        return subprocess.run(["bash", "-c", f"exec {procfile_command('flower')}"], check=False, cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        started = "Visit me at" in str(exc.stderr or b"")
        pytest.fail(f"the flower: line was still running after {timeout}s instead of refusing its settings"
                    f"{' (Flower had started and was serving)' if started else ''}", pytrace=False)


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused start prints, after checking it is exactly that (exit 2, no traceback)."""
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert lines[0].startswith(PROG), lines[0]
    return lines[0]


def get_with_header(flower: FlowerProcess, path: str, authorization: str) -> int:
    """The status of a GET with this exact Authorization header (an HTTP error is returned, not raised)."""
    request = urllib.request.Request(flower.url + path, headers={"Authorization": authorization})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def basic(raw: bytes) -> str:
    return "Basic " + base64.b64encode(raw).decode()


StartFlower = Callable[[dict[str, str]], FlowerProcess]


@pytest.fixture
def start_flower(logdir: Path) -> Iterator[StartFlower]:
    started: list[FlowerProcess] = []

    def start(env: dict[str, str]) -> FlowerProcess:
        flower = FlowerProcess(env, logdir / f"flower-auth-{uuid.uuid4().hex[:8]}.log", int(env["PORT"]))
        started.append(flower)
        flower.wait_ready()
        return flower

    yield start
    for flower in started:
        flower.stop()


def write_users(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


# -- item 3: a comma in a password -------------------------------------------------


@pytest.mark.parametrize("template", ["admin:pa,ss:{rest}", "admin:{rest},viewer:{rest}2",
                                      "admin:pa, ss:{rest}", "admin:{rest}, viewer:{rest}2"],
                         ids=["comma-in-password", "bare-comma-list", "comma-space-in-password",
                              "comma-space-list"])
def test_a_comma_that_could_be_inside_a_password_is_refused(redis_server: RedisServer, template: str) -> None:
    """``admin:pa,ss:w0rd...`` was two logins, ``admin:pa`` and ``ss:w0rd...``; the intended one refused."""
    rest = f"w0rd-{secrets.token_hex(8)}"
    result = run_line(flower_env(redis_server, FLOWER_BASIC_AUTH=template.format(rest=rest)))

    line = refusal(result)
    assert "FLOWER_BASIC_AUTH" in line and "comma" in line and "FLOWER_BASIC_AUTH_FILE" in line
    assert rest not in result.stderr and "pa,ss" not in result.stderr


def test_users_file_takes_a_password_with_a_comma_and_several_users(
        redis_server: RedisServer, start_flower: StartFlower, tmp_path: Path) -> None:
    first, second = f"pa,ss:w0rd-{secrets.token_hex(8)}", f"x {secrets.token_urlsafe(12)}"
    users = write_users(tmp_path / "flower-users", f"# Flower's users\nadmin:{first}\n\nviewer:{second}\n")
    flower = start_flower(flower_env(redis_server, FLOWER_BASIC_AUTH_FILE=str(users)))

    assert flower.get("/", auth=("admin", first))[0] == 200
    assert flower.get("/tasks", auth=("viewer", second))[0] == 200
    assert flower.get("/", auth=("admin", "pa"))[0] == 401  # the fragments are no logins
    assert flower.get("/", auth=("ss", first.split(":", 1)[1]))[0] == 401
    assert flower.get("/")[0] == 401
    log = flower.log_path.read_text(errors="replace")
    assert first not in log and second not in log


def test_users_file_and_variable_together_are_refused(redis_server: RedisServer, tmp_path: Path) -> None:
    password = secrets.token_urlsafe(12)
    users = write_users(tmp_path / "flower-users", f"admin:{password}\n")
    result = run_line(flower_env(redis_server, FLOWER_BASIC_AUTH=f"ops:{password}",
                                 FLOWER_BASIC_AUTH_FILE=str(users)))

    line = refusal(result)
    assert "FLOWER_BASIC_AUTH" in line and "FLOWER_BASIC_AUTH_FILE" in line
    assert password not in result.stderr


@pytest.mark.parametrize("case", ["missing", "unreadable", "directory", "empty", "malformed"])
def test_a_bad_users_file_is_refused_without_showing_its_content(
        redis_server: RedisServer, tmp_path: Path, case: str) -> None:
    password = secrets.token_urlsafe(12)
    users = tmp_path / "flower-users"
    if case == "unreadable":
        write_users(users, f"admin:{password}\n").chmod(0o000)
        if os.access(users, os.R_OK):
            pytest.skip("running as root: every file is readable")
    elif case == "directory":
        users.mkdir()
    elif case == "empty":
        write_users(users, "# nobody yet\n\n")
    elif case == "malformed":
        write_users(users, f"admin:{password}\nviewer{password}\n")
    result = run_line(flower_env(redis_server, FLOWER_BASIC_AUTH_FILE=str(users)))

    line = refusal(result)
    assert "FLOWER_BASIC_AUTH_FILE" in line
    assert password not in result.stderr
    if case == "malformed":
        assert "line 2" in line


# -- item 4: non-ASCII credentials -----------------------------------------------------


@pytest.mark.parametrize(("user", "password"), [
    ("admin", "pässwörd-{token}"), ("ädmin", "{token}"), ("admin", "{token}\u00a0"),
], ids=["password", "user", "nbsp"])
def test_non_ascii_credentials_are_refused_at_start(redis_server: RedisServer, user: str, password: str) -> None:
    """Flower's ``hmac.compare_digest`` raises on non-ASCII text: every request was a 500."""
    token = secrets.token_hex(8)
    result = run_line(flower_env(redis_server, FLOWER_BASIC_AUTH=f"{user}:{password.format(token=token)}"))

    line = refusal(result)
    assert "FLOWER_BASIC_AUTH" in line and "ASCII" in line
    assert token not in result.stderr


def test_non_ascii_credentials_in_the_users_file_are_refused(redis_server: RedisServer, tmp_path: Path) -> None:
    token = secrets.token_hex(8)
    users = write_users(tmp_path / "flower-users", f"admin:{token}\nviewer:grüß-{token}\n")
    line = refusal(run_line(flower_env(redis_server, FLOWER_BASIC_AUTH_FILE=str(users))))

    assert "FLOWER_BASIC_AUTH_FILE" in line and "ASCII" in line and "line 2" in line
    assert token not in line


def test_a_request_with_non_ascii_credentials_gets_401_not_500(
        redis_server: RedisServer, start_flower: StartFlower) -> None:
    password = f"pw-{secrets.token_urlsafe(12)}"
    flower = start_flower(flower_env(redis_server, FLOWER_BASIC_AUTH=f"ops:{password}"))

    for path in ("/", "/tasks", "/api/workers"):
        assert flower.get(path, auth=("ops", "pässwörd"))[0] == 401, path
        assert flower.get(path, auth=("öps", password))[0] == 401, path
        assert get_with_header(flower, path, basic("ops:pässwörd".encode("latin-1"))) == 401, path
        assert get_with_header(flower, path, basic(f"ops:{password}\u00e9".encode())) == 401, path
        assert get_with_header(flower, path, "Basic not-base64!") == 401, path
    assert flower.get("/", auth=("ops", password))[0] == 200  # the right one still works
    assert flower.get("/api/workers", auth=("ops", password))[0] == 200
    log = flower.log_path.read_text(errors="replace")
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]
