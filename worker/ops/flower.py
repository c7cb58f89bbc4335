"""Flower for the mipos workers: ``python -m worker.ops.flower`` (the Procfile's ``flower:`` line).

Flower runs in this process, on the Celery app of ``celery -A worker``, after
the settings below are checked (a bad one: exit code 2 and one line on stderr,
without echoing a password) and the ``mipos_*`` metrics are added to Flower's
``/metrics``.

Environment:

``FLOWER_BASIC_AUTH``
    one ``user:password``. No comma: Flower splits at every comma, so
    ``admin:pa,ss:w0rd`` would be the two logins ``admin:pa`` and ``ss:w0rd``
    (and ``a:x, b:y`` as much as ``a:x,b:y``), so any comma is refused; several
    users, or a password with a comma, go in ``FLOWER_BASIC_AUTH_FILE``.
    Either this or ``FLOWER_BASIC_AUTH_FILE`` is required, unless
    ``FLOWER_LOCAL`` is true. It appears on no command line and in no log line.
    User names and passwords must be ASCII, here and in the file below: Flower
    compares them with ``hmac.compare_digest``, which raises on other
    characters, so one such password made every request a 500. A request whose
    own credentials are not ASCII gets a 401 (``guard_basic_auth``).
``FLOWER_BASIC_AUTH_FILE``
    the path of a file of users, one ``user:password`` per line (blank lines and
    lines starting with ``#`` are skipped; spaces around a line are ignored).
    A password there may contain commas. Setting both this and
    ``FLOWER_BASIC_AUTH`` is refused; an error about the file names the variable
    and the line number, never the file's content.
``FLOWER_LOCAL``
    ``1``/``true``/``yes``/``on``: allowed to run without ``FLOWER_BASIC_AUTH``;
    then Flower has no authentication at all and listens on 127.0.0.1 only,
    whatever ``FLOWER_ADDRESS`` says (a warning line says so). Default: false.
``PORT``
    the port Flower serves on. Default: ``5555``.
``FLOWER_ADDRESS``
    the address it listens on. Default: ``127.0.0.1`` (loopback only). Flower
    serves plain HTTP, and basic auth over plain HTTP sends the password in
    clear: to reach Flower from another host, put a TLS-terminating proxy
    (nginx, Caddy, the platform's router) in front of it and keep Flower on
    loopback or a private interface; set ``FLOWER_ADDRESS=0.0.0.0`` only when
    the proxy is on another host of a private network.
``FLOWER_MAX_TASKS``
    tasks Flower keeps in memory (the oldest are dropped). Default: ``10000``.
``FLOWER_PURGE_OFFLINE_WORKERS``
    seconds after which a worker that went offline leaves the Workers page.
    Default: ``600``.
``FLOWER_TASKS_COLUMNS``
    the Tasks page's columns. Default:
    ``name,state,retries,kwargs,exception,received,runtime,worker,uuid``.
``REDIS_URL``
    the broker, as for the workers. Default: ``redis://localhost:6379/0``.
``MIPOS_TIMEOUT_S``, ``MIPOS_VISIBILITY_TIMEOUT_S``
    as for the workers, and they must be the workers' values: Flower's broker
    connection hands back messages held longer than its visibility timeout,
    so it refuses to start when they are malformed or too small.

Flower itself reads every ``FLOWER_<option>`` variable named after one of its
options (``FLOWER_URL_PREFIX``, ``FLOWER_PERSISTENT``, ...); see its
documentation. ``FLOWER_PORT`` is overridden by ``PORT``.

What the pages show: each task's keyword arguments as the POS passed them (the
tasks set ``kwargsrepr``, so the worker's bookkeeping keys stay out), its
state, the number of retries and the last exception. A retry reuses the task
id, so a task is one row: ``RETRY`` from a failed attempt until the next one
starts (``RetryAwareTask``; its exception reads ``Retry in 3.0s``), then
``SUCCESS`` (without the last retry's exception, which Celery would keep), or
``FAILURE`` for a dead-lettered order. The client secret and the password
(when they are in Flower's environment) and bearer tokens are replaced with
``[redacted]`` on the pages (Flower's ``format_task``; its JSON API under
``/api/``, behind the same authentication, does not apply it). ``/metrics``
(Prometheus: Flower's ``flower_*`` and our ``mipos_*``) and ``/healthcheck``
answer without authentication: Flower serves them so.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import re
import sys
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from celery import states
from celery.events.state import Task as CeleryTask

from config import FALSE_WORDS, SECRET_NAMES, TRUE_WORDS, parse_boolean
from worker.logs.redaction import REDACTED, redact_text, register_secret

PROG = "mipos-worker flower"
DEFAULT_ADDRESS = "127.0.0.1"
DEFAULTS = {
    "FLOWER_MAX_TASKS": "10000",
    "FLOWER_PURGE_OFFLINE_WORKERS": "600",
    "FLOWER_TASKS_COLUMNS": "name,state,retries,kwargs,exception,received,runtime,worker,uuid",
}
BEARER = re.compile(r"(Bearer\s+)[^\s'\",}]+", re.IGNORECASE)
RETRY_LINE = "celery.exceptions.Retry: "
RETRY_DELAY = re.compile(r"^Retry in (\d+(?:\.\d+)?)s")
USERS_VARIABLE = "FLOWER_BASIC_AUTH"
USERS_FILE_VARIABLE = "FLOWER_BASIC_AUTH_FILE"
AUTH_FORMAT = "FLOWER_BASIC_AUTH must be user:password"
ASCII_ONLY = ("user names and passwords must be ASCII: Flower cannot compare other characters "
              "(every request would fail with an error)")


class ConfigError(Exception):
    pass


def fail(message: str) -> NoReturn:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


@dataclass(frozen=True)
class FlowerSettings:
    """What ``configure`` checked: where Flower listens, and its users (none: no authentication)."""

    address: str
    port: int
    users: tuple[str, ...]


def is_user_password(entry: str) -> bool:
    user, colon, password = entry.partition(":")
    return bool(user and colon and password)


def parse_basic_auth(value: str) -> list[str]:
    """FLOWER_BASIC_AUTH's ``user:password`` entries, or ConfigError (whose text never holds a password).

    Flower would split the value at every comma, so a password holding one became two
    logins that nobody meant (``admin:pa,ss:w0rd``: ``admin:pa`` and ``ss:w0rd``), and
    no way of writing a list can tell a separator from a comma in a password: one user
    here, no comma; several in the users file.
    """
    if "," in value:
        raise ConfigError(
            f"{USERS_VARIABLE} has a comma: Flower would split it there into other logins than the "
            f"one meant, so it takes one user:password without a comma; list several users, or a "
            f"password with a comma, in {USERS_FILE_VARIABLE}, one user:password per line")
    entries = [value.strip()]
    if not all(is_user_password(entry) for entry in entries):
        raise ConfigError(AUTH_FORMAT)
    if not value.isascii():
        raise ConfigError(f"{USERS_VARIABLE}: {ASCII_ONLY}")
    return entries


def read_users_file(path: str) -> list[str]:
    """The ``user:password`` lines of FLOWER_BASIC_AUTH_FILE; errors name the line, never its text."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{USERS_FILE_VARIABLE}={path!r} cannot be read "
                          f"({exc.strerror or type(exc).__name__})") from None
    users = []
    for number, line in enumerate(raw.splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith(b"#"):
            continue
        users.append(users_file_entry(text, number))
    if not users:
        raise ConfigError(f"{USERS_FILE_VARIABLE}={path!r} has no user:password line")
    return users


def users_file_entry(line: bytes, number: int) -> str:
    """One line of the users file, checked."""
    try:
        entry = line.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"{USERS_FILE_VARIABLE}, line {number}: {ASCII_ONLY}") from None
    if not is_user_password(entry):
        raise ConfigError(f"{USERS_FILE_VARIABLE}, line {number}: must be user:password")
    return entry


def configured_users(environ: MutableMapping[str, str]) -> list[str]:
    """The users from FLOWER_BASIC_AUTH or FLOWER_BASIC_AUTH_FILE (not both); [] when neither is set.

    Both variables leave ``environ``: Flower reads every ``FLOWER_*`` variable itself, would
    split the first at its commas again and stop at the second (not one of its options).
    """
    value = environ.pop(USERS_VARIABLE, "")  # not stripped: str.strip() drops non-ASCII spaces too
    path = environ.pop(USERS_FILE_VARIABLE, "").strip()
    if value.strip() and path:
        raise ConfigError(f"both {USERS_VARIABLE} and {USERS_FILE_VARIABLE} are set: set only one")
    if path:
        return read_users_file(path)
    return parse_basic_auth(value) if value.strip() else []


def parse_bool(name: str, value: str) -> bool:
    """The settings' boolean words (config.parse_boolean); empty is false."""
    if not value.strip():
        return False
    try:
        return parse_boolean(value)
    except ValueError:
        raise ConfigError(f"{name} must be true or false ({'/'.join(TRUE_WORDS)}, {'/'.join(FALSE_WORDS)}), "
                          f"got {value!r}") from None


def parse_port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise ConfigError(f"PORT must be a port number (1-65535), got {value!r}")
    return port


def configure(environ: MutableMapping[str, str]) -> FlowerSettings:
    """Check the settings and prepare the environment Flower reads."""
    local = parse_bool("FLOWER_LOCAL", environ.get("FLOWER_LOCAL", ""))
    port = parse_port(environ.get("PORT", "").strip() or "5555")
    address = environ.get("FLOWER_ADDRESS", "").strip() or DEFAULT_ADDRESS
    users = configured_users(environ)
    if not users and not local:
        raise ConfigError(
            f"FLOWER_BASIC_AUTH is not set: set it to user:password (several: ', '-separated), or "
            f"{USERS_FILE_VARIABLE} to a file of user:password lines, or set FLOWER_LOCAL=true to run "
            "without authentication on 127.0.0.1 only"
        )
    if not users:
        address = "127.0.0.1"
    for name, value in DEFAULTS.items():
        if not environ.get(name):
            environ[name] = value
    return FlowerSettings(address, port, tuple(users))


def scrub(text: str) -> str:
    """The registered secrets out of a page's text, in any escaped form a repr or JSON gave them."""
    return BEARER.sub(rf"\g<1>{REDACTED}", redact_text(text))


def make_task_formatter() -> Any:
    """Flower's ``format_task``: Flower applies it to a copy of each task before a page shows it."""
    for name in SECRET_NAMES:  # those in Flower's environment; the redaction skips short ones
        register_secret(os.environ.get(name), permanent=True)

    def format_task(task: Any) -> Any:
        state = getattr(task, "state", None)
        if state == states.SUCCESS:
            task.exception = task.traceback = None  # Celery keeps the last retry's; it did succeed
        elif state == states.RETRY and isinstance(task.traceback, str):
            # Celery reports the Retry as "None" or "Retry(Retry(...), None, 3.0)"; its line says more.
            last = task.traceback.strip().rsplit("\n", 1)[-1]
            if last.startswith(RETRY_LINE):
                task.exception = RETRY_DELAY.sub(lambda m: f"Retry in {float(m[1]):.1f}s", last[len(RETRY_LINE):])
        for field in ("args", "kwargs", "result", "exception", "traceback"):
            value = getattr(task, field, None)
            if isinstance(value, str):
                setattr(task, field, scrub(value))
        return task

    return format_task


class RetryAwareTask(CeleryTask):  # type: ignore[misc]  # celery has no type hints
    """A task whose retry is scheduled shows RETRY until its next attempt starts.

    A retry publishes the next message (same task id), then the worker reports
    ``task-retried``; it buffers its events, and whether ``task-retried`` or
    the new message's ``task-received`` reaches Flower first varies from run
    to run. Celery's state keeps the last one, so a retry's wait showed RETRY
    in some runs and RECEIVED in others. Attempts are ordered by the worker's
    own timestamps: retried at or after the last start means still waiting.
    """

    state: str
    retried: float | None
    started: float | None

    def event(self, type_: str, timestamp: float | None = None, local_received: float | None = None,
              fields: dict[str, Any] | None = None, *args: Any, **kwargs: Any) -> None:
        super().event(type_, timestamp, local_received, fields, *args, **kwargs)
        if (self.state in (states.RECEIVED, states.PENDING) and self.retried
                and self.retried >= (self.started or 0)):
            self.state = states.RETRY


def credentials_match(authorization: str, users: Sequence[str]) -> bool:
    """Whether a ``Basic`` Authorization header carries one of ``users``, compared as bytes.

    Flower compares the decoded text with ``hmac.compare_digest``, which raises TypeError
    on non-ASCII text: a request with such credentials got a 500 and a traceback.
    """
    scheme, _, token = authorization.strip().partition(" ")
    if scheme != "Basic":
        return False
    try:
        given = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    matched = False
    for user in users:  # every entry, so the time taken does not tell which one matched
        matched |= hmac.compare_digest(given, user.encode("ascii"))
    return matched


def guard_basic_auth() -> None:
    """Flower's basic-auth check, behind ours: credentials that match none of its users get a
    401 before Flower compares them (a match is ASCII, which Flower compares without error)."""
    import tornado.web
    from flower.views import BaseHandler

    flower_check = BaseHandler.get_current_user
    if getattr(flower_check, "guarded", False):
        return

    def get_current_user(self: Any) -> Any:
        users = self.application.options.basic_auth
        if users and not credentials_match(self.request.headers.get("Authorization", ""), users):
            raise tornado.web.HTTPError(401)
        return flower_check(self)

    get_current_user.guarded = True  # type: ignore[attr-defined]
    BaseHandler.get_current_user = get_current_user


def run_flower(settings: FlowerSettings) -> int:
    from celery.bin.celery import celery as celery_command
    from flower.events import EventsState
    from flower.options import options  # defines Flower's options before we set one

    options.format_task = make_task_formatter()
    EventsState.Task = RetryAwareTask  # Celery's State makes its tasks from this attribute
    guard_basic_auth()
    if settings.users:
        # Set here, not through FLOWER_BASIC_AUTH: on no command line, and never split at a comma.
        options.basic_auth = list(settings.users)
    args = ["-A", "worker", "flower", f"--address={settings.address}", f"--port={settings.port}"]
    try:
        celery_command.main(args=args, prog_name="celery", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def main() -> int:
    try:
        settings = configure(os.environ)
    except ConfigError as exc:
        fail(str(exc))
    from config import broker_settings_problems

    problems = broker_settings_problems()
    if problems:
        fail("; ".join(problems))
    if not settings.users:
        print(f"{PROG}: warning: FLOWER_LOCAL is set and FLOWER_BASIC_AUTH is not: Flower runs "
              f"WITHOUT authentication, on 127.0.0.1:{settings.port} only", file=sys.stderr, flush=True)

    from worker.ops.metrics import register_prometheus_collector

    register_prometheus_collector()
    return run_flower(settings)


if __name__ == "__main__":
    sys.exit(main())
