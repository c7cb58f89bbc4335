"""`make run`: the whole system on one machine, with an embedded default for each part.

- Redis: ``REDIS_URL`` if set; else a local redis-server on 127.0.0.1:6390 with
  its append-only file under ``.run/redis`` (started here, stopped on exit). It
  requires a password generated on the first run and kept in
  ``.run/redis/password``; every process started here gets the REDIS_URL that
  carries it, and so does ``.run/env``. ``.run`` and ``.run/redis`` are 0700.
- mipos: the real API when ``MIPOS_CLIENT_ID`` is set; else the sandbox on
  127.0.0.1:8765, and a few demo orders, some of which meet transient faults.
- the worker, beat (the reconciliation sweep) and Flower, each from its Procfile line.

Ctrl-C stops everything this script started (by PID).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUN_DIR = ROOT / ".run"
LOCAL_REDIS_PORT = 6390
SANDBOX_PORT = 8765
FLOWER_PORT = 5555


def log(message: str) -> None:
    print(f"[make run] {message}", flush=True)


def procfile_command(name: str) -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise SystemExit(f"Procfile has no {name}: line")


class Stack:
    def __init__(self) -> None:
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, command: list[str], env: dict[str, str], **kw: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, **kw)  # type: ignore[call-overload]
        self.processes.append((name, proc))
        log(f"started {name} (pid {proc.pid})")
        return proc

    def stop(self) -> None:
        for _name, proc in reversed(self.processes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in reversed(self.processes):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            log(f"stopped {name} (pid {proc.pid})")


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner can enter (0700), made so even if it existed."""
    path.mkdir(mode=0o700, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """``path`` replaced by a file holding ``text`` that is 0600 from its creation on.

    mkstemp creates the temporary file with O_EXCL and mode 0600, whatever the umask;
    the rename makes it ``path`` at once (an older, more readable file is replaced).
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def wait_until(check: object, timeout: float, what: str) -> None:
    give_up = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > give_up:
            raise SystemExit(f"[make run] timed out waiting for {what}")
        time.sleep(0.1)


def redis_password(data: Path) -> str:
    """The local Redis's password: generated once, kept in ``.run/redis/password`` (0600, in a 0700 directory)."""
    path = data / "password"
    if path.exists():
        password = path.read_text().strip()
        if re.fullmatch(r"[A-Za-z0-9_-]{32,}", password):
            return password
    password = secrets.token_urlsafe(32)
    write_private(path, password + "\n")
    return password


def redis_answers(password: str) -> bool | None:
    """True: the Redis on the local port requires ``password`` and accepts it; None: nothing
    listens there; False: something else does (a Redis that needs no password, or another)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    def ping(with_password: bool) -> bool:
        client = redis.Redis(host="127.0.0.1", port=LOCAL_REDIS_PORT, password=password if with_password else None,
                             socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
        try:
            return bool(client.ping())
        finally:
            client.close()

    try:
        ping(with_password=False)  # redis-py's AUTH passes on a Redis that has no password
        return False
    except redis.AuthenticationError:
        pass  # NOAUTH: a Redis that requires a password; is it ours?
    except redis.ConnectionError as exc:
        return None if isinstance(exc.__cause__ or exc.__context__, ConnectionRefusedError) else False
    except redis.RedisError:
        return False
    try:
        return ping(with_password=True)
    except redis.RedisError:
        return False


def start_redis(stack: Stack, env: dict[str, str]) -> None:
    """A redis-server on 127.0.0.1 that requires the password of ``.run/redis/password``; sets REDIS_URL.

    The password reaches redis-server on its standard input, not its command line (which
    ``ps`` shows to every user); its files are created 0600 (umask 077) in a 0700 directory.
    """
    data = private_dir(private_dir(RUN_DIR) / "redis")
    password = redis_password(data)
    shown = f"redis://127.0.0.1:{LOCAL_REDIS_PORT}/0"
    url = f"redis://:{password}@127.0.0.1:{LOCAL_REDIS_PORT}/0"
    found = redis_answers(password)
    if found is False:
        raise SystemExit(f"[make run] something on 127.0.0.1:{LOCAL_REDIS_PORT} answers, but not as the Redis "
                         f"`make run` starts (with the password of {data / 'password'}): stop it, or set "
                         "REDIS_URL to a Redis of your own")
    if found:
        env["REDIS_URL"] = url
        log(f"using the Redis already listening on {shown} (started by an earlier `make run`)")
        return
    proc = stack.start(
        "redis-server",
        ["redis-server", "-", "--bind", "127.0.0.1", "--port", str(LOCAL_REDIS_PORT),
         "--dir", str(data), "--appendonly", "yes", "--appendfsync", "everysec",
         "--maxmemory-policy", "noeviction"],
        env, stdin=subprocess.PIPE, umask=0o077,
        stdout=open(RUN_DIR / "redis.log", "ab"), stderr=subprocess.STDOUT,
    )
    assert proc.stdin is not None
    proc.stdin.write(f"requirepass {password}\n".encode())  # "-": the configuration, read from stdin
    proc.stdin.close()

    def up() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"[make run] redis-server exited (port {LOCAL_REDIS_PORT} busy?); "
                             f"see {RUN_DIR / 'redis.log'}")
        return bool(redis_answers(password))

    wait_until(up, 15, "redis-server")
    env["REDIS_URL"] = url  # for every process started after this one
    log(f"Redis on {shown}, with a password (in .run/env's REDIS_URL); append-only file in {data}")


def start_sandbox(stack: Stack, env: dict[str, str]) -> str:
    from sandbox import SANDBOX_CREDENTIALS, SandboxControl

    proc = stack.start(
        "sandbox mipos",
        [sys.executable, "-m", "sandbox", "--host", "127.0.0.1", "--port", str(SANDBOX_PORT), "--quiet"],
        env, stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    match = re.search(r"http://\S+", line)
    if not match:
        raise SystemExit(f"[make run] the sandbox did not start (port {SANDBOX_PORT} busy?): {line!r}")
    url = match.group(0)
    SandboxControl(url).wait_until_up(10)
    env["MIPOS_BASE_URL"] = url
    env["MIPOS_CLIENT_ID"] = SANDBOX_CREDENTIALS["client_id"]
    env["MIPOS_CLIENT_SECRET"] = SANDBOX_CREDENTIALS["client_secret"]
    env["MIPOS_EMAIL"] = SANDBOX_CREDENTIALS["email"]
    env["MIPOS_PASSWORD"] = SANDBOX_CREDENTIALS["password"]
    log(f"no MIPOS_CLIENT_ID set: using the sandbox mipos at {url}")
    return url


def start_flower(stack: Stack, env: dict[str, str]) -> None:
    """The flower: line on 127.0.0.1:5555, with a fresh local password unless FLOWER_BASIC_AUTH is set."""
    import urllib.request

    flower_env = dict(env, PORT=str(FLOWER_PORT), FLOWER_ADDRESS="127.0.0.1")
    generated = not flower_env.get("FLOWER_BASIC_AUTH") and not flower_env.get("FLOWER_BASIC_AUTH_FILE")
    if generated:
        flower_env["FLOWER_BASIC_AUTH"] = f"admin:{secrets.token_urlsafe(9)}"
    flower_log = RUN_DIR / "flower.log"
    with open(flower_log, "ab") as out:
        proc = stack.start("flower", ["bash", "-c", f"exec {procfile_command('flower')}"], flower_env,
                           stdout=out, stderr=subprocess.STDOUT)

    def up() -> bool:
        if proc.poll() is not None:
            tail = flower_log.read_text(errors="replace").strip().splitlines()[-5:]
            raise SystemExit(f"[make run] Flower exited (port {FLOWER_PORT} busy?):\n" + "\n".join(tail))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{FLOWER_PORT}/healthcheck", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    wait_until(up, 30, "Flower to answer on /healthcheck")
    if generated:
        user, password = flower_env["FLOWER_BASIC_AUTH"].split(":", 1)
        log(f"Flower: http://127.0.0.1:{FLOWER_PORT} (user {user!r}, password {password!r}; "
            "set FLOWER_BASIC_AUTH=user:password to choose them)")
    else:
        log(f"Flower: http://127.0.0.1:{FLOWER_PORT} (the user and password of FLOWER_BASIC_AUTH)")


def order_page_url(order_external_id: str, store_id: str = "3") -> str:
    """The operator's page of one order, in the Flower started here (worker/pages/)."""
    from urllib.parse import urlencode

    return f"http://127.0.0.1:{FLOWER_PORT}/order?{urlencode({'store': store_id, 'id': order_external_id})}"


DEMO_ORDERS = [
    ("accept", "plain acceptance", []),
    ("accept", "'Unable to get token.' twice, then accepted",
     [{"status": 409, "message": "Unable to get token.", "times": 2}]),
    ("accept", "a 500 and a dropped connection, then accepted",
     [{"status": 500, "message": "Server Error"}, {"drop": True}]),
    ("accept", "429 with Retry-After: 2", [{"status": 429, "message": "Too Many Attempts.", "retry_after": 2}]),
    ("deny", "deny: out of stock", []),
    ("accept", "'Order not found.': permanent, dead-lettered",
     [{"status": 409, "message": "Order not found.", "times": -1}]),
]


def enqueue_demo(sandbox_url: str) -> list[str]:
    from sandbox import SandboxControl
    from tasks import accept_order, deny_order

    control = SandboxControl(sandbox_url)
    forgotten = str(uuid.uuid4())
    control.deliver("3", 99, forgotten, order_number="A-99", total=18.5, created_at=time.time() - 180)
    log(f"delivered order A-99 ({forgotten}) to the POS three minutes ago, and the POS never "
        "enqueued it: the reconciliation sweep will report it (order_unacknowledged)")
    ids = []
    for number, (action, label, faults) in enumerate(DEMO_ORDERS, start=1):
        order_id = str(uuid.uuid4())
        control.deliver("3", number, order_id, order_number=f"A-{number}")  # the webhook side
        if faults:
            control.add_faults(order_id, *faults)
        if action == "accept":
            accept_order.delay(delivery_id=number, store_id="3", order_external_id=order_id)
        else:
            deny_order.delay(delivery_id=number, store_id="3", order_external_id=order_id,
                             message="Out of stock")
        log(f"enqueued demo order {number}: {label} ({order_id})")
        ids.append(order_id)
    return ids


def write_env_file(env: dict[str, str], with_sandbox: bool) -> Path:
    """``.run/env``: what a second terminal sources to use ``mipos-worker`` on this system.

    The sandbox's credentials are public; real ones are never written to disk. REDIS_URL
    may hold the local Redis's password: the file is 0600 from its creation on (never
    written first and chmod-ed after), in a 0700 directory.
    """
    names = ["REDIS_URL", "MIPOS_REDIS_PREFIX"]
    if with_sandbox:
        names += ["MIPOS_BASE_URL", "MIPOS_CLIENT_ID", "MIPOS_CLIENT_SECRET", "MIPOS_EMAIL", "MIPOS_PASSWORD"]
    lines = [f"export {name}={shlex.quote(env[name])}" for name in names if env.get(name)]
    lines.append(f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\"")
    path = private_dir(RUN_DIR) / "env"
    write_private(path, "# written by `make run`: source it to use mipos-worker with this system\n"
                  + "\n".join(lines) + "\n")
    return path


def demo_finished(redis_url: str, ids: list[str]) -> bool:
    import redis

    from worker.state.deadletters import DeadLetters

    client = redis.Redis.from_url(redis_url)
    prefix = os.environ.get("MIPOS_REDIS_PREFIX", "mipos:")
    dead = {letter.order.get("order_external_id") for letter in DeadLetters(client, prefix).list(100)}
    done = [i for i in ids if client.exists(f"{prefix}done:3/{i}") or i in dead]
    return len(done) == len(ids)


def reconciled(redis_url: str) -> bool:
    import redis

    from worker.state.counters import Metrics

    prefix = os.environ.get("MIPOS_REDIS_PREFIX", "mipos:")
    values = Metrics(redis.Redis.from_url(redis_url), prefix).read()
    return any(key.startswith("mipos_orders_unacknowledged_total") for key in values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exit-after-demo", action="store_true",
                        help="stop once the demo orders are accepted, denied or dead-lettered")
    options = parser.parse_args()

    private_dir(RUN_DIR)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("LOG_FORMAT", "console")
    env.setdefault("WORKER_CONCURRENCY", "4")
    env.setdefault("BEAT_SCHEDULE_FILE", str(RUN_DIR / "celerybeat-schedule"))
    stack = Stack()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        if not env.get("REDIS_URL"):
            start_redis(stack, env)
        sandbox_url = None
        if not env.get("MIPOS_CLIENT_ID"):
            sandbox_url = start_sandbox(stack, env)
            # Reconcile the demo store often, so its sweep shows up within seconds.
            env.setdefault("MIPOS_RECONCILE_STORES", "3")
            env.setdefault("MIPOS_RECONCILE_INTERVAL_S", "10")
        os.environ["REDIS_URL"] = env["REDIS_URL"]

        worker = stack.start("worker", ["bash", "-c", f"exec {procfile_command('worker')}"], env)
        stack.start("beat", ["bash", "-c", f"exec {procfile_command('beat')}"], env,
                    stdout=open(RUN_DIR / "beat.log", "ab"), stderr=subprocess.STDOUT)
        start_flower(stack, env)
        env_file = write_env_file(env, with_sandbox=sandbox_url is not None)

        if sandbox_url:
            time.sleep(2)  # let the worker connect before the demo lines start to scroll
            ids = enqueue_demo(sandbox_url)
            log(f"in another terminal: `source {env_file.relative_to(ROOT)}`, then "
                f"`mipos-worker order 3 {ids[-1]}` (the dead-lettered demo order), "
                "`mipos-worker dead list`, `mipos-worker doctor`")
            log(f"the dead-lettered demo order's page, with its Replay button: {order_page_url(ids[-1])} "
                f"(the sandbox keeps refusing it until told otherwise: `curl -X POST {sandbox_url}/_sandbox/faults "
                f"-d '{{\"order_external_id\": \"{ids[-1]}\", \"faults\": [], \"replace\": true}}'`)")
            if options.exit_after_demo:
                wait_until(lambda: demo_finished(env["REDIS_URL"], ids), 90, "the demo orders")
                wait_until(lambda: reconciled(env["REDIS_URL"]), 60, "a reconciliation sweep")
                log("demo finished: every order accepted, denied or dead-lettered")
                return 0
        log("running; press Ctrl-C to stop")
        while worker.poll() is None:
            time.sleep(0.5)
        log(f"the worker exited with code {worker.returncode}")
        return worker.returncode or 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
