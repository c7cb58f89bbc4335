"""``enqueue``, ``order`` and ``pending``: one order, from the POS's side and from mipos's."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from cli.common import EXIT_OK, open_redis
from cli.output import CliError, emit_json, printable, seconds, table, when


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
        print(printable(f"enqueued {args.action} of order {args.store_id}/{args.order_external_id} "
                        f"as task {result.id}"))
    return EXIT_OK




def cmd_order(args: argparse.Namespace) -> int:
    from worker.ops.order_status import describe_order

    client, prefix = open_redis()
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
            "dead_letters": [asdict(x) for x in status.dead_letters],
        })
        return EXIT_OK
    order = status.order
    print(printable(f"order {order.store_id}/{order.order_external_id} (delivery {order.delivery_id})"))
    print(printable(f"state: {status.state}: {status.summary}"))
    if attempts:
        print()
        print(attempts_table(attempts, with_task=len(status.tasks) > 1))
    for letter in status.dead_letters:
        replay = f", replayed as task {letter.replayed['task_id']}" if letter.replayed else ""
        print()
        print(printable(f"dead letter {letter.id}: {letter.action} failed ({letter.reason}) at "
                        f"{when(letter.failed_at)}{replay}"))
    if status.state == "dead-lettered":
        last = status.dead_letters[-1]
        if not last.replayed and last.reason != "invalid":
            print(f"\nonce the cause is fixed: mipos-worker dead replay {last.id}")
    return EXIT_OK


def attempts_table(attempts: list[dict[str, Any]], with_task: bool) -> str:
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




def cmd_pending(args: argparse.Namespace) -> int:
    from worker.mipos.errors import MiposError
    from worker.mipos.pending import fetch_pending
    from worker.ops.order_status import describe_order
    from worker.wiring.runtime import get_runtime

    rt = get_runtime()
    try:
        pending, _answer = fetch_pending(rt.client, rt.tokens, args.store_id)
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
