"""The ``mipos-worker`` command: orders, dead letters, health, metrics and the sandbox.

Every command reads the same environment as the worker (``REDIS_URL``,
``MIPOS_*``), prints a table by default and JSON with ``--json``, and answers
bad input or an unreachable Redis with one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from cli.output import (
    CliError,
    ago,
    emit_json,
    parse_duration,
    parse_since,
    seconds,
    table,
    when,
)
from cli.progress import Progress

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEAD_REASONS = ("permanent", "attempts", "deadline", "invalid")


# -- plumbing -------------------------------------------------------------------


def _redis() -> tuple[redis.Redis, str]:
    from config import load_producer_settings
    from worker.runtime import redis_from_url

    settings = load_producer_settings()
    return redis_from_url(settings.url, timeout_s=3.0, retries=0), settings.key_prefix


def _id(kind: str) -> Callable[[str], str]:
    """An argparse type for store and order ids: non-empty, printable, no spaces or '/'."""
    def parse(text: str) -> str:
        value = text.strip()
        if not value:
            raise argparse.ArgumentTypeError(f"{kind} must not be empty")
        if len(value) > 200 or any(c.isspace() or not c.isprintable() or c == "/" for c in value):
            raise argparse.ArgumentTypeError(
                f"{kind} {text[:40]!r} is malformed (at most 200 printable characters, "
                "no spaces or '/')")
        return value
    return parse


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _since(text: str) -> float:
    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _letter_id(text: str) -> str:
    value = text.strip().lower()
    if not (len(value) == 16 and all(c in "0123456789abcdef" for c in value)):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a dead letter id (16 hex digits, as `dead list` shows)")
    return value


# -- enqueue ----------------------------------------------------------------------


def cmd_enqueue(args: argparse.Namespace) -> int:
    from kombu.exceptions import OperationalError

    from tasks import accept_order, deny_order

    task = accept_order if args.action == "accept" else deny_order
    kwargs = {"delivery_id": args.delivery_id, "store_id": args.store_id,
              "order_external_id": args.order_external_id}
    if args.action == "deny":
        kwargs["message"] = args.message
    elif args.message is not None:
        raise CliError("--message is for deny only: an acceptance carries no message")
    try:
        result = task.delay(**kwargs)
    except ValueError as exc:
        raise CliError(f"not enqueued: {exc}") from None
    except OperationalError as exc:
        raise CliError(f"not enqueued: {exc}") from None
    if args.json:
        emit_json({"task_id": result.id, "action": args.action, **kwargs})
    else:
        print(f"enqueued {args.action} of order {args.store_id}/{args.order_external_id} "
              f"as task {result.id}")
    return EXIT_OK


# -- order ---------------------------------------------------------------------------


def cmd_order(args: argparse.Namespace) -> int:
    from worker.order_status import describe_order

    client, prefix = _redis()
    status = describe_order(client, prefix, args.store_id, args.order_external_id)
    if status is None:
        raise CliError(f"no order {args.store_id}/{args.order_external_id} is known here: it was "
                       "never enqueued through this Redis, or its records expired (7 days)")
    attempts = status.attempts()
    if args.json:
        emit_json({
            "order": status.order.fields(),
            "state": status.state,
            "summary": status.summary,
            "done": status.done.__dict__ if status.done else None,
            "tasks": [t.__dict__ for t in status.tasks],
            "attempts": attempts,
            "dead_letters": [_letter_json(x) for x in status.dead_letters],
        })
        return EXIT_OK
    order = status.order
    print(f"order {order.store_id}/{order.order_external_id} (delivery {order.delivery_id})")
    print(f"state: {status.state}: {status.summary}")
    if attempts:
        print()
        print(_attempts_table(attempts, with_task=len(status.tasks) > 1))
    for letter in status.dead_letters:
        replay = f", replayed as task {letter.replayed['task_id']}" if letter.replayed else ""
        print(f"\ndead letter {letter.id}: {letter.action} failed ({letter.reason}) at "
              f"{when(letter.failed_at)}{replay}")
    if status.state == "dead-lettered":
        last = status.dead_letters[-1]
        if not last.replayed and last.reason != "invalid":
            print(f"\nonce the cause is fixed: mipos-worker dead replay {last.id}")
    return EXIT_OK


def _attempts_table(attempts: list[dict[str, Any]], with_task: bool) -> str:
    headers = ["#", "TIME", "OUTCOME", "HTTP", "ERROR CLASS", "ERROR", "TOOK", "DELAY"]
    if with_task:
        headers.insert(0, "TASK")
    rows = []
    for a in attempts:
        elapsed = a.get("elapsed_ms")
        row = [a.get("attempt"), when(a.get("at")), a.get("outcome"), a.get("http_status"),
               a.get("error_class"), a.get("error"),
               seconds(elapsed / 1000) if isinstance(elapsed, (int, float)) else None,
               seconds(a["retry_in_s"]) if isinstance(a.get("retry_in_s"), (int, float)) else None]
        if with_task:
            row.insert(0, str(a.get("task_id", ""))[:8])
        rows.append(row)
    return table(headers, rows)


# -- pending -------------------------------------------------------------------------


def cmd_pending(args: argparse.Namespace) -> int:
    from worker.errors import MiposError
    from worker.order_status import describe_order
    from worker.reconcile import fetch_pending
    from worker.runtime import get_runtime

    rt = get_runtime()
    try:
        pending, _answer = fetch_pending(rt, args.store_id)
    except MiposError as exc:
        raise CliError(f"mipos did not give store {args.store_id}'s pending orders: {exc.message}") from None
    prefix = rt.settings.redis.key_prefix
    rows: list[dict[str, Any]] = []
    for item in pending:
        status = describe_order(rt.redis, prefix, args.store_id, item.external_id)
        rows.append({"order_external_id": item.external_id, "delivery_id": item.delivery_id,
                     "order_number": item.order_number, "created_at": item.created_at,
                     "our_state": status.state if status else "never enqueued",
                     "summary": status.summary if status else
                     "mipos delivered it and the POS never enqueued an accept or deny"})
    if args.json:
        emit_json({"store_id": args.store_id, "pending": rows})
        return EXIT_OK
    if not rows:
        print(f"mipos lists no pending orders for store {args.store_id}")
        return EXIT_OK
    print(table(["ORDER", "DELIVERY", "NUMBER", "CREATED", "OUR STATE", "DETAIL"],
                [[r["order_external_id"], r["delivery_id"], r["order_number"], when(r["created_at"]),
                  r["our_state"], r["summary"]] for r in rows]))
    return EXIT_OK


# -- dead letters ------------------------------------------------------------------


def _letter_json(letter: Any) -> dict[str, Any]:
    return dict(letter.__dict__)


def _dead_letters() -> Any:
    from worker.deadletters import DeadLetters

    client, prefix = _redis()
    return DeadLetters(client, prefix)


def cmd_dead_list(args: argparse.Namespace) -> int:
    letters = _dead_letters().list(args.limit + 1, since=args.since, reason=args.reason,
                                   store_id=args.store)
    more = len(letters) > args.limit
    letters = letters[: args.limit]
    if args.json:
        emit_json({"dead_letters": [_letter_json(x) for x in letters], "truncated": more})
        return EXIT_OK
    if not letters:
        print("no dead letters" + (" match" if args.since or args.reason or args.store else ""))
        return EXIT_OK
    print(table(
        ["ID", "FAILED", "ACTION", "STORE", "ORDER", "REASON", "TRIES", "ERROR", "REPLAYED"],
        [[x.id, when(x.failed_at), x.action, x.order.get("store_id"), x.order.get("order_external_id"),
          x.reason, len(x.attempts), x.error, (x.replayed or {}).get("task_id", "")[:8] or None]
         for x in letters], max_width=48))
    if more:
        print(f"(the newest {args.limit}; --limit shows more)")
    return EXIT_OK


def cmd_dead_show(args: argparse.Namespace) -> int:
    letter = _dead_letters().get(args.id)
    if letter is None:
        raise CliError(f"no dead letter {args.id} (it never existed, was purged, or expired after 30 days)")
    if args.json:
        emit_json(_letter_json(letter))
        return EXIT_OK
    fields = [
        ("id", letter.id), ("action", letter.action),
        *[(k, v) for k, v in letter.order.items()],
        ("reason", letter.reason), ("error", letter.error), ("task", letter.task_id),
        ("enqueued", when(letter.enqueued_at)), ("failed", f"{when(letter.failed_at)} ({ago(letter.failed_at)})"),
        ("replay of", letter.replay_of),
        ("replayed", f"as task {letter.replayed['task_id']} at {when(letter.replayed['at'])}"
         if letter.replayed else "no"),
    ]
    for name, value in fields:
        if value is not None:
            print(f"{name + ':':<18}{value}")
    if letter.attempts:
        print()
        print(_attempts_table(letter.attempts, with_task=False))
    return EXIT_OK


def cmd_dead_replay(args: argparse.Namespace) -> int:
    from tasks.replay import replay_dead_letter

    store = _dead_letters()
    if args.id:
        if args.reason or args.store:
            raise CliError("--reason and --store choose letters for --all; with an id, leave them out")
        letter = store.get(args.id)
        if letter is None:
            raise CliError(f"no dead letter {args.id}")
        letters = [letter]
    else:
        letters = [x for x in store.list(since=args.since, reason=args.reason, store_id=args.store)
                   if not x.replayed]
        latest: dict[str, Any] = {}
        for letter in letters:  # newest first: one replay per order, from its latest failure
            latest.setdefault(letter.order_key, letter)
        letters = list(latest.values())
    progress = Progress("replay", total=len(letters), enabled=bool(args.all) and not args.quiet)
    results = []
    for letter in letters:
        result = replay_dead_letter(letter)
        results.append(result)
        progress.advance(outcome=result.result)
    progress.finish()
    if args.json:
        emit_json({"results": [{"id": r.letter.id, "order": r.letter.order_key, "result": r.result,
                                "detail": r.detail, "task_id": r.task_id} for r in results]})
    elif not results:
        print("no dead letters to replay")
    else:
        for r in results:
            print(f"{r.letter.id} {r.letter.action} {r.letter.order_key}: {r.detail}")
        if args.all:
            counts: dict[str, int] = {}
            for r in results:
                counts[r.result] = counts.get(r.result, 0) + 1
            print("; ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(counts.items())))
    refused = any(r.result == "not_replayable" for r in results)
    return EXIT_FAILED if refused and not args.all else EXIT_OK


def cmd_dead_purge(args: argparse.Namespace) -> int:
    store = _dead_letters()
    cutoff = time.time() - args.older_than
    if args.dry_run:
        count = len(store.redis.zrangebyscore(store.index_key, "-inf", cutoff))
        verb = "would delete"
    else:
        count = store.purge(cutoff)
        verb = "deleted"
    if args.json:
        emit_json({"purged" if not args.dry_run else "would_purge": count, "older_than": when(cutoff)})
    else:
        print(f"{verb} {count} dead letter{'s' if count != 1 else ''} failed before {when(cutoff)}")
    return EXIT_OK


# -- doctor, metrics, sandbox -------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from cli.doctor import DoctorOptions, as_json, run_checks

    checks = run_checks(DoctorOptions(max_wait_s=args.max_wait, ping_timeout_s=args.ping_timeout,
                                      skip_mipos=args.skip_mipos))
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
    from worker.delivery import QUEUE
    from worker.metrics import render

    client, prefix = _redis()
    client.ping()
    sys.stdout.write(render(client, prefix, QUEUE).decode())
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
    order.add_argument("store_id", metavar="STORE_ID", type=_id("STORE_ID"))
    order.add_argument("order_external_id", metavar="ORDER_EXTERNAL_ID", type=_id("ORDER_EXTERNAL_ID"))
    order.set_defaults(func=cmd_order)

    pending = commands.add_parser("pending", parents=[common],
                                  help="orders mipos still lists as pending for a store, with our state",
                                  description="Asks mipos (with the worker's credentials) which orders "
                                              "of a store are still pending, and says what we know of each.")
    pending.add_argument("store_id", metavar="STORE_ID", type=_id("STORE_ID"))
    pending.set_defaults(func=cmd_pending)

    dead = commands.add_parser("dead", parents=[common], help="list, show, replay and purge dead letters",
                               description="Orders that failed for good.")
    dead_commands = dead.add_subparsers(dest="dead_command", metavar="SUBCOMMAND", required=True)
    listing = dead_commands.add_parser("list", parents=[common], help="dead letters, newest first")
    listing.add_argument("--since", type=_since, help="only those failed since: a duration back (1h, "
                         "30m) or a time (2026-11-29T08:00:00Z)")
    listing.add_argument("--reason", choices=DEAD_REASONS)
    listing.add_argument("--store", type=_id("--store"), help="only this store's")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    listing.set_defaults(func=cmd_dead_list)
    show = dead_commands.add_parser("show", parents=[common], help="one dead letter with its attempts")
    show.add_argument("id", metavar="ID", type=_letter_id)
    show.set_defaults(func=cmd_dead_show)
    replay = dead_commands.add_parser(
        "replay", parents=[common], help="enqueue dead letters again (fresh attempts and deadline)",
        description="Enqueue a dead-lettered order again as a new task, with a fresh attempt budget "
                    "and deadline; the old attempts stay in the history. A letter is replayed at most "
                    "once, and an order already accepted or denied is not sent again.")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("id", metavar="ID", nargs="?", type=_letter_id)
    which.add_argument("--all", action="store_true", help="every dead letter not replayed yet "
                       "(the latest per order), or those --reason/--store/--since choose")
    replay.add_argument("--reason", choices=DEAD_REASONS)
    replay.add_argument("--store", type=_id("--store"))
    replay.add_argument("--since", type=_since)
    replay.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    replay.set_defaults(func=cmd_dead_replay)
    purge = dead_commands.add_parser("purge", parents=[common], help="delete old dead letters")
    purge.add_argument("--older-than", type=_duration, required=True, metavar="DURATION",
                       help="failed more than this long ago (7d, 12h, 30m)")
    purge.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    purge.set_defaults(func=cmd_dead_purge)

    doctor = commands.add_parser(
        "doctor", parents=[common], help="check settings, Redis, mipos, workers, queue; exit 1 on a problem",
        description="Checks settings, Redis (reachable, persistent, no eviction), the mipos token call "
                    "(the token is not shown), workers (Celery ping), queue depth and the oldest "
                    "waiting message, dead letters in the last hour and the circuit breaker. Exit "
                    "code 1 when a check fails, so it can serve as a health check.")
    doctor.add_argument("--max-wait", type=_duration, default=60.0, metavar="DURATION",
                        help="fail when the oldest waiting message is older (default 60s)")
    doctor.add_argument("--ping-timeout", type=_duration, default=2.0, metavar="DURATION",
                        help="how long to wait for workers to answer (default 2s)")
    doctor.add_argument("--skip-mipos", action="store_true", help="do not call mipos's token endpoint")
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
    from config.settings import DEFAULT_REDIS_URL

    return url_without_password(os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL)


def _error(message: str) -> None:
    from worker.redaction import redact

    print(f"mipos-worker: {redact(message)}", file=sys.stderr)
