"""``mipos-worker outbox relay|status``: the POS database's outbox (tasks/sql_outbox).

    mipos-worker outbox relay --database-url postgresql+psycopg://pos@db/pos
    mipos-worker outbox status --database-url ... [--max-age 60s] [--json]

Registered in the main parser by ``add_outbox_commands(commands, common)``; also
runs alone as ``python -m cli.outbox``. Needs ``mipos-worker[sqlalchemy]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from cli.common import EXIT_FAILED, EXIT_OK, duration_argument
from cli.output import CliError, emit_json, seconds, table

DATABASE_URL_ENV = "MIPOS_OUTBOX_DATABASE_URL"


def add_outbox_commands(commands: Any, common: argparse.ArgumentParser | None = None) -> None:
    parents = [common] if common is not None else []
    outbox = commands.add_parser(
        "outbox", parents=parents, help="relay the POS database's outbox to Redis; its backlog",
        description="The transactional outbox in the POS's own database (tasks.sql_outbox, the "
                    "Django app tasks.django_outbox): rows written in the POS's transactions, "
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
                       help="how often to look for new rows (default 0.5s)")
    relay.add_argument("--report-every", type=duration_argument, default=30.0, metavar="DURATION",
                       help="how often to log the backlog line (default 30s)")
    relay.add_argument("--lease", type=duration_argument, default=30.0, metavar="DURATION",
                       help="SQLite: how long a claimed batch is this relay's (default 30s)")
    relay.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    relay.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port")
    relay.add_argument("--once", action="store_true", help="publish what is there now, then exit")
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
    from config import load_producer_settings
    from tasks.sql_outbox import Relay
    from worker.logs.setup import configure_logging

    configure_logging(os.environ.get("LOG_LEVEL", "INFO"), os.environ.get("LOG_FORMAT", "json"))
    load_producer_settings()  # a malformed REDIS_URL: one clear message now
    relay = Relay(_engine(args), batch_size=args.batch_size, lease_s=args.lease)
    if args.once:
        while relay.run_once().seen >= args.batch_size:
            pass
        relay.report()
        return EXIT_OK
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=args.metrics_host, registry=relay.metrics.registry)
    stop = threading.Event()
    wake = threading.Event()

    def stop_on_signal(signum: int, _frame: Any) -> None:
        stop.set()
        wake.set()

    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGINT, stop_on_signal)
    relay.run_forever(stop, wake, poll_interval_s=args.poll_interval, report_every_s=args.report_every)
    relay.report()
    return EXIT_OK


def cmd_outbox_status(args: argparse.Namespace) -> int:
    from tasks.sql_outbox import Relay

    status = Relay(_engine(args)).status()
    too_old = status.oldest_age_s is not None and status.oldest_age_s > args.max_age
    if args.json:
        emit_json({**status.fields(), "max_age_s": args.max_age, "ok": not too_old})
    else:
        print(table(["BACKLOG", "OLDEST", "MOVED ASIDE"],
                    [[status.backlog, seconds(status.oldest_age_s), status.dead]]))
    return EXIT_FAILED if too_old else EXIT_OK


def outbox_check(database_url: str, max_age_s: float = 60.0) -> Any:
    """The ``doctor`` check for ``--outbox-database-url``: a ``cli.doctor.Check``."""
    from cli.doctor import Check

    try:
        from sqlalchemy import create_engine

        from tasks.sql_outbox import Relay

        engine = create_engine(database_url, pool_pre_ping=True)
        try:
            status = Relay(engine).status()
        finally:
            engine.dispose()
    except Exception as exc:
        return Check("outbox", "fail", f"cannot read the outbox: {type(exc).__name__}: {exc}")
    detail = (f"{status.backlog} waiting, oldest {seconds(status.oldest_age_s)}"
              f"{f', {status.dead} moved aside (mipos_outbox_dead)' if status.dead else ''}")
    if status.oldest_age_s is not None and status.oldest_age_s > max_age_s:
        return Check("outbox", "fail", f"{detail}: older than {seconds(max_age_s)}; is a relay running, "
                                       "and Redis reachable?")
    return Check("outbox", "warn" if status.dead else "ok", detail)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mipos-worker outbox")
    parser.add_argument("--json", action="store_true")
    add_outbox_subcommands(parser, None)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"mipos-worker: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
