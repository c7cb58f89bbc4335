"""``dead list|show|replay|purge``: the orders that failed for good."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, duration_argument, open_redis
from cli.orders import attempts_table
from cli.output import CliError, ago, emit_json, key_values, printable, table, when
from cli.progress import Progress

if TYPE_CHECKING:
    from worker.ops.replay import Replay
    from worker.state.deadletters import DeadLetter, DeadLetters


def _dead_letters() -> DeadLetters:
    from worker.state.deadletters import DeadLetters

    client, prefix = open_redis()
    return DeadLetters(client, prefix)


LIST_MAX_SCAN = 10_000  # letters a filtered listing examines before it stops with a cursor


def cmd_dead_list(args: argparse.Namespace) -> int:
    before = getattr(args, "before", None)
    try:
        page = _dead_letters().page(args.limit, before=before, since=args.since, reason=args.reason,
                                    store_id=args.store, max_scan=max(args.limit, LIST_MAX_SCAN))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    letters, cursor = page.letters, page.next_before
    if args.json:
        emit_json({"dead_letters": [asdict(x) for x in letters], "truncated": cursor is not None,
                   "next_before": cursor})
        return EXIT_OK
    filtered = bool(args.since or args.reason or args.store)
    if not letters:
        print("no dead letters" + (" match" if filtered else "")
              + (" in this page" if cursor else "") + (" before that cursor" if before else ""))
    else:
        print(table(
            ["ID", "FAILED", "ACTION", "STORE", "ORDER", "REASON", "TRIES", "ERROR", "REPLAYED"],
            [[x.id, when(x.failed_at), x.action, x.order.get("store_id"),
              x.order.get("order_external_id"), x.reason, len(x.attempts), x.error,
              (x.replayed or {}).get("task_id", "")[:8] or None]
             for x in letters], max_width=48))
    if cursor:
        shown = f"the newest {args.limit}" if len(letters) == args.limit else \
            f"{len(letters)} found in the letters examined"
        print(f"({shown}; older ones: --before {cursor})")
    return EXIT_OK


def cmd_dead_show(args: argparse.Namespace) -> int:
    letter = _dead_letters().get(args.id)
    if letter is None:
        raise CliError(f"no dead letter {args.id} (it never existed, was purged, or expired after 30 days)")
    if args.json:
        emit_json(asdict(letter))
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
    print(key_values(fields))
    if letter.attempts:
        print()
        print(attempts_table(letter.attempts, with_task=False))
    return EXIT_OK


def cmd_dead_replay(args: argparse.Namespace) -> int:
    letters = _letters_to_replay(_dead_letters(), args)
    if args.all:
        stop = confirm(f"replay {_letters(len(letters))} (send their orders to mipos again)",
                       count=len(letters), assume_yes=args.yes, declined="nothing replayed")
        if stop is not None:
            return stop
    progress = Progress("replay", total=len(letters), enabled=bool(args.all) and not args.quiet)
    results = []
    for letter in letters:
        result = _replay(letter)
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
            print(printable(f"{r.letter.id} {r.letter.action} {r.letter.order_key}: {r.detail}"))
        if args.all:
            counts: dict[str, int] = {}
            for r in results:
                counts[r.result] = counts.get(r.result, 0) + 1
            print("; ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(counts.items())))
    refused = any(r.result == "not_replayable" for r in results)
    return EXIT_FAILED if refused and not args.all else EXIT_OK


def _letters_to_replay(store: DeadLetters, args: argparse.Namespace) -> list[DeadLetter]:
    """The letter ``ID`` names; with ``--all``, the latest letter not replayed of each order."""
    if args.id:
        if args.reason or args.store:
            raise CliError("--reason and --store choose letters for --all; with an id, leave them out")
        letter = store.get(args.id)
        if letter is None:
            raise CliError(f"no dead letter {args.id}")
        return [letter]
    latest: dict[str, DeadLetter] = {}
    for letter in store.list(since=args.since, reason=args.reason, store_id=args.store):
        if not letter.replayed:  # newest first: one replay per order, from its latest failure
            latest.setdefault(letter.order_key, letter)
    return list(latest.values())


def _replay(letter: DeadLetter) -> Replay:
    """Replay one letter; one whose arguments today's checks refuse (a letter written before
    the field limits) is not replayable, like an ``invalid`` one, instead of ending the run."""
    from mipos_worker.order.errors import InvalidOrder
    from worker.ops.replay import Replay, replay_dead_letter

    try:
        return replay_dead_letter(letter)
    except InvalidOrder as exc:
        return Replay(letter, "not_replayable", f"not replayable: {exc}; enqueue a corrected "
                                                "order instead")


def cmd_dead_purge(args: argparse.Namespace) -> int:
    store = _dead_letters()
    cutoff = time.time() - args.older_than  # fixed before asking: a wait at the prompt adds nothing
    store.trim()
    count = int(store.redis.zcount(store.index_key, "-inf", cutoff))
    if not args.dry_run:
        stop = confirm(f"delete {_letters(count)} failed before {when(cutoff)}", count=count,
                       assume_yes=args.yes, declined="nothing deleted")
        if stop is not None:
            return stop
        count = store.purge(cutoff)
    if args.json:
        emit_json({"purged" if not args.dry_run else "would_purge": count, "older_than": when(cutoff)})
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{verb} {_letters(count)} failed before {when(cutoff)}")
    return EXIT_OK


# -- asking first ----------------------------------------------------------------------------

PURGE_FLOOR_S = 3600.0  # doctor's "dead letters in the last hour": younger ones may be unseen yet


def purge_age_argument(text: str) -> float:
    """An argparse type for ``purge --older-than``: a duration of at least ``PURGE_FLOOR_S``."""
    age_s = duration_argument(text)
    if age_s < PURGE_FLOOR_S:
        raise argparse.ArgumentTypeError(
            f"{text!r} is too recent: it must be at least {PURGE_FLOOR_S / 3600:g}h, so that no purge "
            "takes letters failed in the last hour, which no one may have seen yet")
    return age_s


def confirm(action: str, *, count: int, assume_yes: bool, declined: str) -> int | None:
    """None when the command may go on; else the exit code to end with.

    ``--yes`` goes on. At a terminal (stdin), the operator is asked, shown ``action`` with its
    count (nothing is asked when there is nothing to do). Elsewhere (cron, CI, a pipe) the
    command needs ``--yes``, even when there is nothing to do today: exit 2, before acting."""
    if assume_yes or (count == 0 and sys.stdin.isatty()):
        return None
    if not sys.stdin.isatty():
        print(f"mipos-worker: this would {action}; stdin is not a terminal to confirm it at: "
              "add --yes to go on", file=sys.stderr)
        return EXIT_USAGE
    sys.stderr.write(f"{action}? [y/N] ")
    sys.stderr.flush()
    if sys.stdin.readline().strip().lower() in ("y", "yes"):
        return None
    print(declined, file=sys.stderr)
    return EXIT_FAILED


def _letters(count: int) -> str:
    return f"{count} dead letter{'s' if count != 1 else ''}"
