"""``mipos-worker outbox relay|status``: the POS database's outbox (mipos_worker/sql_outbox).

    mipos-worker outbox relay --database-url postgresql+psycopg://pos@db/pos
    mipos-worker outbox status --database-url ... [--max-age 60s] [--json]

This is the ``mipos-worker`` command a POS installs: it runs beside the POS
and needs ``mipos-worker[sqlalchemy]`` (``[metrics]`` for ``--metrics-port``).
The operator's commands (``doctor``, ``dead``, ``order``, ...) belong to the
worker, which runs from its checkout; there, ``mipos-worker`` hands every
command to its CLI (``cli/main.py``, which registers these outbox commands
too, through ``add_outbox_commands``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import signal
import sys
import threading
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mipos_worker.terminal import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    duration_argument,
    emit_json,
    seconds,
    table,
)

DATABASE_URL_ENV = "MIPOS_OUTBOX_DATABASE_URL"
DISTRIBUTION = "mipos-worker"
# Beside the package in the worker's checkout; not in a POS's site-packages.
CHECKOUT_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def version() -> str:
    """The installed distribution's version (pyproject.toml's, when it was installed); in a
    checkout that is not installed, its pyproject.toml's; else ``unknown``."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return _checkout_version() or "unknown"


def _checkout_version() -> str | None:
    try:
        project = tomllib.loads(CHECKOUT_PYPROJECT.read_text(encoding="utf-8")).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return None
    found = project.get("version") if project.get("name") == DISTRIBUTION else None
    return found if isinstance(found, str) else None


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    """``--version``: ``mipos-worker 0.2.0``, and exit."""
    parser.add_argument("--version", action="version", version=f"{DISTRIBUTION} {version()}")


def add_outbox_commands(commands: Any, common: argparse.ArgumentParser | None = None) -> None:
    parents = [common] if common is not None else []
    outbox = commands.add_parser(
        "outbox", parents=parents, help="relay the POS database's outbox to Redis; its backlog",
        description="The transactional outbox in the POS's own database (mipos_worker.sql_outbox, the "
                    "Django app mipos_worker.django_outbox): rows written in the POS's transactions, "
                    "published to Redis by a relay.")
    add_outbox_subcommands(outbox, common)


def add_outbox_subcommands(outbox: argparse.ArgumentParser, common: argparse.ArgumentParser | None) -> None:
    parents = [common] if common is not None else []
    sub = outbox.add_subparsers(dest="outbox_command", metavar="SUBCOMMAND", required=True)

    relay = sub.add_parser("relay", parents=parents, help="publish committed rows, oldest first, until stopped",
                           description="Publish committed outbox rows to Redis (REDIS_URL), oldest first, "
                                       "deleting each only once Redis has it. Several relays may run "
                                       "on one database. Stops cleanly on SIGTERM/SIGINT.")
    _database_argument(relay)
    relay.add_argument("--batch-size", type=int, default=100, help="rows per batch (default 100)")
    relay.add_argument("--poll-interval", type=duration_argument, default=0.5, metavar="DURATION",
                       help="how often to look for new rows (default 0.5s); on PostgreSQL (psycopg) "
                            "the relay is woken by each commit's NOTIFY and this is the safety net")
    relay.add_argument("--report-every", type=duration_argument, default=30.0, metavar="DURATION",
                       help="how often to log the backlog line (default 30s)")
    relay.add_argument("--lease", type=duration_argument, default=30.0, metavar="DURATION",
                       help="SQLite: how long a claimed batch is this relay's (default 30s)")
    relay.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    relay.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port")
    relay.add_argument("--once", action="store_true", help="publish what is there now, then exit")
    relay.add_argument("--no-listen", action="store_true", help="PostgreSQL: poll only, no LISTEN")
    relay.set_defaults(func=cmd_outbox_relay)

    status = sub.add_parser("status", parents=parents, help="backlog, oldest row, rows moved aside",
                            description="Backlog and age of the oldest unpublished row; exit 1 when the "
                                        "oldest is older than --max-age.")
    _database_argument(status)
    status.add_argument("--max-age", type=duration_argument, default=60.0, metavar="DURATION",
                        help="fail when the oldest row is older (default 60s)")
    status.set_defaults(func=cmd_outbox_status)


def _database_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", default=os.environ.get(DATABASE_URL_ENV),
                        help=f"SQLAlchemy URL of the POS database (default ${DATABASE_URL_ENV})")


def _engine(args: argparse.Namespace) -> Any:
    if not args.database_url:
        raise CliError(f"--database-url (or {DATABASE_URL_ENV}) is required")
    try:
        from sqlalchemy import create_engine
    except ImportError as exc:
        raise CliError("the outbox needs SQLAlchemy: pip install 'mipos-worker[sqlalchemy]'") from exc
    try:
        return create_engine(args.database_url, pool_pre_ping=True)
    except Exception as exc:  # a malformed URL, a driver not installed
        raise CliError(f"cannot use --database-url: {type(exc).__name__}: {exc}") from exc


def cmd_outbox_relay(args: argparse.Namespace) -> int:
    from mipos_worker.logs import configure_logging
    from mipos_worker.settings import load_producer_settings

    configure_logging(os.environ.get("LOG_LEVEL", "INFO"), os.environ.get("LOG_FORMAT", "json"))
    load_producer_settings()  # a malformed REDIS_URL: one clear message now
    engine = _engine(args)
    from mipos_worker.sql_outbox import Relay

    relay = Relay(engine, batch_size=args.batch_size, lease_s=args.lease)
    if args.once:
        from mipos_worker.sql_outbox import PublishFailed, RedisUnavailable

        try:
            while relay.run_once().seen >= args.batch_size:
                pass
        except (RedisUnavailable, PublishFailed) as exc:  # the rows wait; say why, no traceback
            relay.report()
            raise CliError(f"the outbox's rows wait: {exc}") from None
        relay.report()
        return EXIT_OK
    if args.metrics_port is not None:
        from mipos_worker.sql_outbox.metrics import serve_metrics

        serve_metrics(relay, args.metrics_host, args.metrics_port)
    stop = threading.Event()
    wake = threading.Event()

    def stop_on_signal(signum: int, _frame: Any) -> None:
        stop.set()
        wake.set()

    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGINT, stop_on_signal)
    relay.run_forever(stop, wake, poll_interval_s=args.poll_interval, report_every_s=args.report_every,
                      listen=False if args.no_listen else None)
    relay.report()
    return EXIT_OK


def cmd_outbox_status(args: argparse.Namespace) -> int:
    engine = _engine(args)
    from mipos_worker.sql_outbox import Relay

    status = Relay(engine).status()
    too_old = status.oldest_age_s is not None and status.oldest_age_s > args.max_age
    if args.json:
        emit_json({**status.fields(), "max_age_s": args.max_age, "ok": not too_old})
    else:
        print(table(["BACKLOG", "OLDEST", "MOVED ASIDE"],
                    [[status.backlog, seconds(status.oldest_age_s), status.dead]]))
    return EXIT_FAILED if too_old else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The ``mipos-worker`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if _checkout_cli() is not None:  # the worker's checkout: every command, the outbox's too
        return int(importlib.import_module("cli.main").main(argv))
    if argv and not argv[0].startswith("-") and argv[0] != "outbox":
        print(f"mipos-worker: {argv[0]!r} is an operator command of the worker, which runs from its "
              "checkout (see its README); the POS side's mipos-worker has 'outbox' only", file=sys.stderr)
        return EXIT_USAGE
    parser = argparse.ArgumentParser(
        prog="mipos-worker",
        description="The POS side of mipos-worker: the relay of the outbox in the POS's database. "
                    "The operator's commands (doctor, dead, order, ...) run from the worker's checkout.")
    add_version_argument(parser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON for scripts instead of a table")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_outbox_commands(commands, common)
    args = parser.parse_args(argv)
    args.json = getattr(args, "json", False)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"mipos-worker: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        from mipos_worker.settings import SettingsError

        if isinstance(exc, SettingsError):
            print(f"mipos-worker: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise


def _checkout_cli() -> Path | None:
    """The worker's checkout this package was imported from, if it was (never a POS's install).

    An installed package sits in site-packages, beside other distributions' top-level
    modules (a ``cli`` among them, perhaps): only a checkout has our pyproject.toml and
    the worker's wiring beside the package.
    """
    root = Path(__file__).resolve().parent.parent
    try:
        marker = (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    if 'name = "mipos-worker"' not in marker or not (root / "worker" / "wiring" / "celery_app.py").is_file():
        return None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


if __name__ == "__main__":
    sys.exit(main())
