"""`make run`'s secrets (scripts/run_local.py), from the security review (issue 25): the local
Redis needs a generated password and keeps its files private (item 5), and ``.run/env``, which
holds that password in REDIS_URL, is never readable by others, not even for a moment (item 6).

The functions of scripts/run_local.py run for real, in a temporary ``.run`` directory: a real
redis-server on a free loopback port, started and stopped (by its PID) through run_local's Stack.
"""

from __future__ import annotations

import importlib.util
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from support.processes import ROOT, RedisServer, free_port


def load_run_local() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_local_under_test", ROOT / "scripts" / "run_local.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """scripts/run_local.py with its ``.run`` directory and Redis port moved out of the way."""
    module = load_run_local()
    monkeypatch.setattr(module, "RUN_DIR", tmp_path / ".run")
    monkeypatch.setattr(module, "LOCAL_REDIS_PORT", free_port())
    return module


@pytest.fixture
def stack(run_local: ModuleType) -> Iterator[Any]:
    started = run_local.Stack()
    yield started
    started.stop()  # each process by its PID (its process group)


def without_redis_url() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name != "REDIS_URL"}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- item 5: the local Redis ---------------------------------------------------------


def test_local_redis_needs_a_generated_password_and_keeps_its_files_private(
        run_local: ModuleType, stack: Any, capsys: pytest.CaptureFixture[str]) -> None:
    env = without_redis_url()
    run_local.start_redis(stack, env)
    port = run_local.LOCAL_REDIS_PORT

    with pytest.raises(redis.AuthenticationError):  # NOAUTH: anyone else on the machine is refused
        redis.Redis(host="127.0.0.1", port=port, socket_timeout=5).ping()
    url = urlsplit(env["REDIS_URL"])
    assert (url.hostname, url.port) == ("127.0.0.1", port)
    assert url.password and len(url.password) >= 32, "REDIS_URL should carry a generated password"
    client = redis.Redis.from_url(env["REDIS_URL"], socket_timeout=5)
    assert client.ping()
    assert client.config_get("requirepass") == {"requirepass": url.password}
    assert client.config_get("bind") == {"bind": "127.0.0.1"}
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    [(_name, server)] = stack.processes
    cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode(errors="replace")
    assert "redis-server" in cmdline and url.password not in cmdline, "the password is on the command line (ps)"
    assert url.password not in capsys.readouterr().out, "the password was printed"

    client.set("mipos:token", "bearer-token-stand-in")
    data = run_local.RUN_DIR / "redis"
    assert mode(run_local.RUN_DIR) == 0o700 and mode(data) == 0o700
    readable = {str(path.relative_to(data)): oct(mode(path)) for path in data.rglob("*") if mode(path) & 0o077}
    assert readable == {}, "files under .run/redis that others may read"


def test_a_redis_on_the_port_that_needs_no_password_is_not_used(
        run_local: ModuleType, stack: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's Redis on the port would receive the orders and the bearer token."""
    other = RedisServer(tmp_path / "someone-elses-redis")
    try:
        monkeypatch.setattr(run_local, "LOCAL_REDIS_PORT", other.port)
        env = without_redis_url()
        with pytest.raises(SystemExit) as refused:
            run_local.start_redis(stack, env)
        assert str(other.port) in str(refused.value) and "REDIS_URL" in str(refused.value)
        assert "REDIS_URL" not in env and stack.processes == []
    finally:
        other.stop()


def test_a_second_start_uses_the_same_password(run_local: ModuleType, stack: Any) -> None:
    """A redis-server left running by an earlier `make run` is used again, as before."""
    first = without_redis_url()
    run_local.start_redis(stack, first)
    second = without_redis_url()
    run_local.start_redis(run_local.Stack(), second)  # finds it listening; starts nothing

    assert second["REDIS_URL"] == first["REDIS_URL"]
    assert len(stack.processes) == 1


# -- item 6: .run/env ----------------------------------------------------------------


def test_env_file_is_private_from_its_creation(run_local: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Written, then chmod-ed, the file was readable by others in between: it must need no chmod."""
    run_dir = run_local.RUN_DIR
    run_dir.mkdir()
    run_dir.chmod(0o755)
    (run_dir / "env").write_text("# an older run's, world-readable\n")
    (run_dir / "env").chmod(0o644)
    ignored: list[str] = []
    real_chmod = os.chmod

    def chmod_directories_only(path: Any, mode_: int, *args: Any, **kwargs: Any) -> None:
        if os.path.isdir(path):
            real_chmod(path, mode_, *args, **kwargs)
        else:
            ignored.append(f"chmod({path}, {oct(mode_)})")

    monkeypatch.setattr(os, "chmod", chmod_directories_only)
    monkeypatch.setattr(os, "fchmod", lambda fd, mode_: ignored.append(f"fchmod({fd}, {oct(mode_)})"))
    url = "redis://:s3cret-password-for-this-test@127.0.0.1:6390/0"
    umask = os.umask(0o022)
    try:
        path = run_local.write_env_file({"REDIS_URL": url}, with_sandbox=False)
    finally:
        os.umask(umask)

    assert oct(mode(path)) == oct(0o600), f"created readable by others, then made private by {ignored}"
    assert oct(mode(run_dir)) == oct(0o700)
    assert sorted(os.listdir(run_dir)) == ["env"]  # no temporary file left behind
    assert f"export REDIS_URL={url}\n" in path.read_text()
