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
``FLOWER_READONLY_USERS``
    user names (of ``FLOWER_BASIC_AUTH`` or the users file), comma-separated, who may
    look but not act: the operator's pages show them no Replay or Discard button, and
    any request of theirs but GET, HEAD or OPTIONS gets a 403, on the pages and on
    Flower's own (its API included). A name that is no configured user is refused at
    start (a typo would otherwise leave that user every right). Default: none.
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
``LOG_LEVEL``, ``LOG_FORMAT``
    as for the workers: Flower's lines, and those of the operator's pages
    (``dead_letter_replayed``, ``dead_letter_discarded``), go through the workers'
    logging, secrets redacted. Defaults: ``INFO``, ``json``.
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
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from celery import states
from celery.events.state import Task as CeleryTask

from config import FALSE_WORDS, TRUE_WORDS, parse_boolean
from config.settings import configured_secrets
from worker.logs.redaction import REDACTED, redact_text, register_secret
from worker.logs.setup import configure_logging

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
READONLY_VARIABLE = "FLOWER_READONLY_USERS"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("json", "console")
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
    readonly_users: frozenset[str] = frozenset()  # user names who may look, not act
    log_level: str = "INFO"
    log_format: str = "json"

    def is_readonly(self, user: str | None) -> bool:
        return user is not None and user in self.readonly_users


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


def user_name(entry: str) -> str:
    return entry.partition(":")[0]


def parse_readonly_users(value: str, users: Sequence[str]) -> frozenset[str]:
    """FLOWER_READONLY_USERS's names, each one of ``users``; ConfigError names the unknown ones
    (names only: no password is ever in this variable)."""
    names = {name.strip() for name in value.split(",") if name.strip()}
    if names and not users:
        raise ConfigError(f"{READONLY_VARIABLE} is set but Flower has no users ({USERS_VARIABLE} or "
                          f"{USERS_FILE_VARIABLE}): without authentication every visitor may act")
    unknown = sorted(names - {user_name(entry) for entry in users})
    if unknown:
        raise ConfigError(f"{READONLY_VARIABLE} names {', '.join(repr(n) for n in unknown)}, not a user of "
                          f"{USERS_VARIABLE} or {USERS_FILE_VARIABLE}: a misspelt name would leave that user "
                          "every right")
    return frozenset(names)


def parse_choice(name: str, value: str, default: str, choices: Sequence[str]) -> str:
    word = value.strip() or default
    word = word.upper() if name == "LOG_LEVEL" else word
    if word not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return word


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
    readonly = parse_readonly_users(environ.pop(READONLY_VARIABLE, ""), users)
    log_level = parse_choice("LOG_LEVEL", environ.get("LOG_LEVEL", ""), "INFO", LOG_LEVELS)
    log_format = parse_choice("LOG_FORMAT", environ.get("LOG_FORMAT", ""), "json", LOG_FORMATS)
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
    return FlowerSettings(address, port, tuple(users), readonly, log_level, log_format)


def scrub(text: str) -> str:
    """The registered secrets out of a page's text, in any escaped form a repr or JSON gave them."""
    return BEARER.sub(rf"\g<1>{REDACTED}", redact_text(text))


def make_task_formatter() -> Any:
    """Flower's ``format_task``: Flower applies it to a copy of each task before a page shows it."""
    for secret in configured_secrets():  # either form (the variable or its *_FILE); short ones skipped
        register_secret(secret, permanent=True)

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


def matched_user(authorization: str, users: Sequence[str]) -> str | None:
    """The name of the one of ``users`` whose credentials a ``Basic`` Authorization header
    carries, compared as bytes; None when it carries none of them.

    Flower compares the decoded text with ``hmac.compare_digest``, which raises TypeError
    on non-ASCII text: a request with such credentials got a 500 and a traceback.
    """
    scheme, _, token = authorization.strip().partition(" ")
    if scheme != "Basic":
        return None
    try:
        given = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    matched: str | None = None
    for user in users:  # every entry, so the time taken does not tell which one matched
        if hmac.compare_digest(given, user.encode("ascii")):
            matched = user_name(user)
    return matched


def credentials_match(authorization: str, users: Sequence[str]) -> bool:
    """Whether a ``Basic`` Authorization header carries one of ``users`` (``matched_user``)."""
    return matched_user(authorization, users) is not None


def request_user(handler: Any) -> str | None:
    """The user name a request to Flower authenticated as; None when Flower has no users."""
    users = handler.application.options.basic_auth
    if not users:
        return None
    return matched_user(handler.request.headers.get("Authorization", ""), users)


def guard_basic_auth(readonly_users: frozenset[str] = frozenset()) -> None:
    """Flower's basic-auth check, behind ours: credentials that match none of its users get a
    401 before Flower compares them (a match is ASCII, which Flower compares without error);
    a user of ``readonly_users`` gets a 403 on anything but a read (GET, HEAD, OPTIONS)."""
    import tornado.web
    from flower.views import BaseHandler

    flower_check = getattr(BaseHandler.get_current_user, "flower_check", BaseHandler.get_current_user)

    def get_current_user(self: Any) -> Any:
        users = self.application.options.basic_auth
        if users:
            user = matched_user(self.request.headers.get("Authorization", ""), users)
            if user is None:
                raise tornado.web.HTTPError(401)
            if user in readonly_users and self.request.method not in READ_METHODS:
                raise tornado.web.HTTPError(403, f"{user} may look, not act ({READONLY_VARIABLE})")
        return flower_check(self)

    get_current_user.flower_check = flower_check  # type: ignore[attr-defined]
    BaseHandler.get_current_user = get_current_user


# Given Flower's Tornado application once it is built, before it serves: adds pages to it.
AppHook = Callable[[Any], None]
# Checks its own settings (ConfigError: exit 2 before Flower starts) and gives its AppHook.
Extension = Callable[[FlowerSettings, Mapping[str, str]], AppHook]


def extend_flower_app(hooks: Sequence[AppHook]) -> None:
    """Flower's command builds its application from ``flower.command.Flower``: a subclass
    that runs ``hooks`` on the application it builds."""
    import flower.command

    base = getattr(flower.command.Flower, "unextended", flower.command.Flower)

    class ExtendedFlower(base):  # type: ignore[misc, valid-type]  # flower has no type hints
        unextended = base

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            for hook in hooks:
                hook(self)

    flower.command.Flower = ExtendedFlower


def run_flower(settings: FlowerSettings, hooks: Sequence[AppHook] = ()) -> int:
    from celery.bin.celery import celery as celery_command
    from flower.events import EventsState
    from flower.options import options  # defines Flower's options before we set one

    options.format_task = make_task_formatter()
    EventsState.Task = RetryAwareTask  # Celery's State makes its tasks from this attribute
    guard_basic_auth(settings.readonly_users)
    extend_flower_app([lambda _app: configure_logging(settings.log_level, settings.log_format), *hooks])
    if settings.users:
        # Set here, not through FLOWER_BASIC_AUTH: on no command line, and never split at a comma.
        options.basic_auth = list(settings.users)
    args = ["-A", "worker", "flower", f"--address={settings.address}", f"--port={settings.port}"]
    try:
        celery_command.main(args=args, prog_name="celery", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def main(extensions: Sequence[Extension] = ()) -> int:
    """The flower: line; ``extensions`` add pages to Flower (worker/flower.py gives the
    operator's pages, a room above this one)."""
    try:
        settings = configure(os.environ)
        hooks = [extension(settings, os.environ) for extension in extensions]
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
    return run_flower(settings, hooks)


if __name__ == "__main__":
    sys.exit(main())
