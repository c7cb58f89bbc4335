"""The ``mipos-worker`` command: orders, dead letters, health, metrics and the sandbox.

Every command reads the same environment as the worker (``REDIS_URL``,
``MIPOS_*``), prints a table by default and JSON with ``--json``, and answers
bad input or an unreachable Redis with one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import redis

from cli.common import (
    DEAD_REASONS,
    EXIT_FAILED,
    EXIT_OK,
    duration_argument,
    id_argument,
    letter_id_argument,
    open_redis,
    since_argument,
)
from cli.dead import (
    cmd_dead_list,
    cmd_dead_purge,
    cmd_dead_replay,
    cmd_dead_show,
    purge_age_argument,
)
from cli.orders import cmd_enqueue, cmd_order, cmd_pending
from cli.output import CliError, emit_json, table
from mipos_worker.command import add_outbox_commands, add_version_argument


def cmd_doctor(args: argparse.Namespace) -> int:
    from cli.doctor import DoctorOptions, as_json, run_checks

    checks = run_checks(DoctorOptions(max_wait_s=args.max_wait, ping_timeout_s=args.ping_timeout,
                                      skip_mipos=args.skip_mipos))
    if args.outbox_database_url:
        from cli.outbox import outbox_check

        checks.append(outbox_check(args.outbox_database_url, args.max_wait))
    failed = [c for c in checks if c.status == "fail"]
    if args.json:
        emit_json(as_json(checks))
    else:
        print(table(["CHECK", "STATUS", "DETAIL"], [[c.name, c.status.upper(), c.detail] for c in checks],
                    max_width=200))
        warnings = sum(1 for c in checks if c.status == "warn")
        if failed:
            print(f"\n{len(failed)} problem{'s' if len(failed) != 1 else ''} found")
        else:
            print("\nno problems" + (f" ({warnings} warning{'s' if warnings != 1 else ''})" if warnings else ""))
    return EXIT_FAILED if failed else EXIT_OK


def cmd_metrics(args: argparse.Namespace) -> int:
    from config import load_producer_settings
    from config.timing import QUEUE
    from worker.ops.metrics import render

    client, prefix = open_redis()
    client.ping()
    sys.stdout.write(render(client, prefix, QUEUE, load_producer_settings()).decode())
    return EXIT_OK


def cmd_sandbox(args: argparse.Namespace) -> int:
    from sandbox.__main__ import serve

    return serve(args)


# -- the parser ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON for scripts instead of a table")
    parser = argparse.ArgumentParser(
        prog="mipos-worker", parents=[common],
        description="Operate the mipos worker: find out what happened to an order, replay dead "
                    "letters, check the deployment's health. Reads the worker's environment "
                    "(REDIS_URL, MIPOS_*).",
        epilog="Exit codes: 0 ok, 1 a problem (one line on stderr; doctor: a failed check), 2 bad usage.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    add_version_argument(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    enqueue = commands.add_parser("enqueue", parents=[common], help="enqueue an accept or deny, as the POS does",
                                  description="Enqueue an accept or deny with the same checks as "
                                              "accept_order.delay() / deny_order.delay().")
    enqueue.add_argument("action", choices=("accept", "deny"))
    enqueue.add_argument("--delivery-id", required=True)
    enqueue.add_argument("--store-id", required=True)
    enqueue.add_argument("--order-external-id", required=True)
    enqueue.add_argument("--message", help="why the order was denied (deny only; required there)")
    enqueue.set_defaults(func=cmd_enqueue)

    order = commands.add_parser("order", parents=[common], help="everything known about one order",
                                description="State (pending, retrying, held, accepted, denied, "
                                            "dead-lettered) and every attempt of one order.")
    order.add_argument("store_id", metavar="STORE_ID", type=id_argument("STORE_ID"))
    order.add_argument("order_external_id", metavar="ORDER_EXTERNAL_ID", type=id_argument("ORDER_EXTERNAL_ID"))
    order.set_defaults(func=cmd_order)

    pending = commands.add_parser("pending", parents=[common],
                                  help="orders mipos still lists as pending for a store, with our state",
                                  description="Asks mipos (with the worker's credentials) which orders "
                                              "of a store are still pending, and says what we know of each.")
    pending.add_argument("store_id", metavar="STORE_ID", type=id_argument("STORE_ID"))
    pending.set_defaults(func=cmd_pending)

    dead = commands.add_parser("dead", parents=[common], help="list, show, replay and purge dead letters",
                               description="Orders that failed for good.")
    dead_commands = dead.add_subparsers(dest="dead_command", metavar="SUBCOMMAND", required=True)
    listing = dead_commands.add_parser("list", parents=[common], help="dead letters, newest first")
    listing.add_argument("--since", type=since_argument, help="only those failed since: a duration back (1h, "
                         "30m) or a time (2026-11-29T08:00:00Z)")
    listing.add_argument("--reason", choices=DEAD_REASONS)
    listing.add_argument("--store", type=id_argument("--store"), help="only this store's")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    listing.add_argument("--before", metavar="CURSOR",
                         help="only letters older than this cursor: the next page, as the last "
                              "listing printed it (next_before in --json)")
    listing.set_defaults(func=cmd_dead_list)
    show = dead_commands.add_parser("show", parents=[common], help="one dead letter with its attempts")
    show.add_argument("id", metavar="ID", type=letter_id_argument)
    show.set_defaults(func=cmd_dead_show)
    replay = dead_commands.add_parser(
        "replay", parents=[common], help="enqueue dead letters again (fresh attempts and deadline)",
        description="Enqueue a dead-lettered order again as a new task, with a fresh attempt budget "
                    "and deadline; the old attempts stay in the history. A letter is replayed at most "
                    "once, and an order already accepted or denied is not sent again. --all asks "
                    "first at a terminal, showing the count; elsewhere it needs --yes.")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("id", metavar="ID", nargs="?", type=letter_id_argument)
    which.add_argument("--all", action="store_true", help="every dead letter not replayed yet "
                       "(the latest per order), or those --reason/--store/--since choose")
    replay.add_argument("--reason", choices=DEAD_REASONS)
    replay.add_argument("--store", type=id_argument("--store"))
    replay.add_argument("--since", type=since_argument)
    replay.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    replay.add_argument("--yes", "-y", action="store_true",
                        help="--all without asking; required when stdin is not a terminal")
    replay.set_defaults(func=cmd_dead_replay)
    purge = dead_commands.add_parser(
        "purge", parents=[common], help="delete old dead letters",
        description="Delete the dead letters that failed more than --older-than ago (at least 1h). "
                    "At a terminal it asks first, showing the count; elsewhere it needs --yes.")
    purge.add_argument("--older-than", type=purge_age_argument, required=True, metavar="DURATION",
                       help="failed more than this long ago (7d, 12h; at least 1h)")
    purge.add_argument("--dry-run", action="store_true", help="count, delete nothing (no --yes needed)")
    purge.add_argument("--yes", "-y", action="store_true",
                       help="delete without asking; required when stdin is not a terminal")
    purge.set_defaults(func=cmd_dead_purge)

    doctor = commands.add_parser(
        "doctor", parents=[common], help="check settings, Redis, mipos, workers, queue; exit 1 on a problem",
        description="Checks settings, Redis (reachable, persistent, no eviction), the mipos token call "
                    "(the token is not shown), workers (Celery ping), queue depth and the oldest "
                    "waiting message, dead letters in the last hour and the circuit breaker. Exit "
                    "code 1 when a check fails, so it can serve as a health check.")
    doctor.add_argument("--max-wait", type=duration_argument, default=60.0, metavar="DURATION",
                        help="fail when the oldest waiting message is older (default 60s)")
    doctor.add_argument("--ping-timeout", type=duration_argument, default=2.0, metavar="DURATION",
                        help="how long to wait for workers to answer (default 2s)")
    doctor.add_argument("--skip-mipos", action="store_true", help="do not call mipos's token endpoint")
    doctor.add_argument("--outbox-database-url", default=os.environ.get("MIPOS_OUTBOX_DATABASE_URL"),
                        metavar="URL", help="also check the backlog of the POS database's outbox "
                                            "(default: MIPOS_OUTBOX_DATABASE_URL)")
    doctor.set_defaults(func=cmd_doctor)

    metrics = commands.add_parser("metrics", parents=[common],
                                  help="print the Prometheus metrics (as Flower's /metrics serves them)")
    metrics.set_defaults(func=cmd_metrics)

    from sandbox.__main__ import add_arguments as add_sandbox_arguments

    sandbox = commands.add_parser(
        "sandbox", help="run the sandbox mipos server",
        description="A local mipos for development and demos: tokens that expire and rotate, and "
                    "faults per order (see README) or at random rates.")
    add_sandbox_arguments(sandbox)
    sandbox.set_defaults(func=cmd_sandbox)
    add_outbox_commands(commands, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.json = getattr(args, "json", False)
    try:
        return int(args.func(args))
    except CliError as exc:
        _error(str(exc))
    except redis.AuthenticationError as exc:
        _error(f"Redis refused the password in REDIS_URL: {exc}")
    except redis.RedisError as exc:
        _error(f"cannot reach Redis at {_redis_where()}: {exc}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from config import SettingsError

        if isinstance(exc, SettingsError):
            _error(str(exc))
        elif args.debug:
            raise
        else:
            _error(f"unexpected error: {type(exc).__name__}: {exc} (run with --debug for the traceback)")
    return EXIT_FAILED


def _redis_where() -> str:
    import os

    from config import url_without_password
    from mipos_worker.settings import DEFAULT_REDIS_URL

    return url_without_password(os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL)


def _error(message: str) -> None:
    from mipos_worker.terminal import printable
    from worker.logs.redaction import redact

    print(f"mipos-worker: {printable(redact(message))}", file=sys.stderr)
