"""Flower for the mipos workers: ``python -m worker.ops.flower`` (the Procfile's ``flower:`` line).

Flower runs in this process, on the Celery app of ``celery -A worker``, after
the settings below are checked (a bad one: exit code 2 and one line on stderr,
without echoing a password) and the ``mipos_*`` metrics are added to Flower's
``/metrics``.

Environment:

``FLOWER_BASIC_AUTH``
    ``user:password``, or several separated by commas (spaces around the commas
    are ignored; a password cannot contain a comma). Required, unless
    ``FLOWER_LOCAL`` is true. Flower reads it from the environment itself, so
    it appears on no command line and in no log line.
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

import os
import re
import sys
from collections.abc import MutableMapping
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


class ConfigError(Exception):
    pass


def fail(message: str) -> NoReturn:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def parse_basic_auth(value: str) -> list[str]:
    """The ``user:password`` entries, or ConfigError (whose text never holds a password)."""
    entries = [entry.strip() for entry in value.split(",")]
    for entry in entries:
        user, colon, password = entry.partition(":")
        if not (user and colon and password):
            raise ConfigError("FLOWER_BASIC_AUTH must be user:password[,user:password...]")
    return entries


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


def configure(environ: MutableMapping[str, str]) -> tuple[str, int, bool]:
    """Check the settings and prepare the environment Flower reads; (address, port, unauthenticated)."""
    local = parse_bool("FLOWER_LOCAL", environ.get("FLOWER_LOCAL", ""))
    port = parse_port(environ.get("PORT", "").strip() or "5555")
    address = environ.get("FLOWER_ADDRESS", "").strip() or DEFAULT_ADDRESS
    auth = environ.get("FLOWER_BASIC_AUTH", "").strip()
    if auth:
        environ["FLOWER_BASIC_AUTH"] = ",".join(parse_basic_auth(auth))
    elif local:
        # An empty FLOWER_BASIC_AUTH would reach Flower as [''] and lock everyone out.
        environ.pop("FLOWER_BASIC_AUTH", None)
        address = "127.0.0.1"
    else:
        raise ConfigError(
            "FLOWER_BASIC_AUTH is not set: set it to user:password (several: comma-separated), "
            "or set FLOWER_LOCAL=true to run without authentication on 127.0.0.1 only"
        )
    for name, value in DEFAULTS.items():
        if not environ.get(name):
            environ[name] = value
    return address, port, local and not auth


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


def run_flower(address: str, port: int) -> int:
    from celery.bin.celery import celery as celery_command
    from flower.events import EventsState
    from flower.options import options  # defines Flower's options before we set one

    options.format_task = make_task_formatter()
    EventsState.Task = RetryAwareTask  # Celery's State makes its tasks from this attribute
    # The credentials stay in FLOWER_BASIC_AUTH, where Flower reads them.
    args = ["-A", "worker", "flower", f"--address={address}", f"--port={port}"]
    try:
        celery_command.main(args=args, prog_name="celery", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def main() -> int:
    try:
        address, port, unauthenticated = configure(os.environ)
    except ConfigError as exc:
        fail(str(exc))
    from config import broker_settings_problems

    problems = broker_settings_problems()
    if problems:
        fail("; ".join(problems))
    if unauthenticated:
        print(f"{PROG}: warning: FLOWER_LOCAL is set and FLOWER_BASIC_AUTH is not: Flower runs "
              f"WITHOUT authentication, on 127.0.0.1:{port} only", file=sys.stderr, flush=True)

    from worker.ops.metrics import register_prometheus_collector

    register_prometheus_collector()
    return run_flower(address, port)


if __name__ == "__main__":
    sys.exit(main())
