"""The chaos and failover runs' tally: what mipos (the sandbox) got, what was dead-lettered,
and why any order was sent twice.

Where each order ended comes from the sandbox's ``orders()`` (accepts and denies applied)
and the dead letters. Why an order was sent twice comes from the sandbox's request log:
each request says when it arrived (``time``) and when it landed (``landed_at``: mipos
applied it, or, strict, refused it). A second request that reached mipos is explained by
the earlier one that landed:

- ``landed_late``: it landed later than one call's bound after it arrived. The worker had
  waited that bound, read the pending list, found the order listed and sent again: the
  documented exception, allowed, flagged on the line.
- ``after_worker_loss``: its worker was killed before the answer was recorded (a
  ``request_outcome_unknown`` line names a request sent then).
- ``landed_within_bound``: it landed within the bound but its answer never came back (a
  slow answer, a drop): the worker should have waited for it and asked the pending list.
  Must be 0.
- ``unexplained``: it was answered at once and no worker was lost. Must be 0.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench.chaos_setup import CALL_BOUND_S, KEY_PREFIX, STORE_ID, Plan
from sandbox import SandboxControl

ACTION_PATHS = {"/api/v1/integration/order/accept": "accept", "/api/v1/integration/order/deny": "deny"}
LANDED_LATE, WORKER_LOSS, WITHIN_BOUND, UNEXPLAINED = (
    "landed_late", "after_worker_loss", "landed_within_bound", "unexplained")
CAUSE_ORDER = (WITHIN_BOUND, UNEXPLAINED, WORKER_LOSS, LANDED_LATE)  # the worst one names a duplicate
LOST_SEND_MATCH_S = 1.0  # a lost worker's mark (Redis's clock) and the request's arrival
MAX_EVIDENCE = 20
MAX_IDS = 50


@dataclass(frozen=True)
class Letter:
    action: str
    reason: str
    error: str
    task_id: str = ""


@dataclass
class Snapshot:
    """Where the orders stand: {order: {"accept": n, "deny": n}} applied at mipos, and dead letters."""

    applied: dict[str, dict[str, int]]
    letters: dict[str, list[Letter]]

    def count(self, order_id: str, action: str) -> int:
        return self.applied.get(order_id, {}).get(action, 0)

    def ended(self, order_id: str, action: str) -> bool:
        return self.count(order_id, action) > 0 or any(
            letter.action == action for letter in self.letters.get(order_id, []))

    def finished(self, plan: Plan) -> int:
        """Orders whose every task ended: its action applied, or a dead letter."""
        return sum(1 for i in plan.ids if all(self.ended(i, a) for a in plan.actions(i)))


def read_snapshot(control: SandboxControl, client: redis.Redis | None) -> Snapshot:
    applied = {str(v["order_external_id"]): {"accept": int(v["accepted"]), "deny": int(v["denied"])}
               for v in control.orders()["orders"].values() if v["store_id"] == STORE_ID}
    return Snapshot(applied, read_letters(client))


def read_letters(client: redis.Redis | None) -> dict[str, list[Letter]]:
    from worker.state.deadletters import DeadLetters

    letters: dict[str, list[Letter]] = {}
    if client is None:
        return letters
    try:
        found = DeadLetters(client, KEY_PREFIX).list()
    except Exception:  # noqa: BLE001 - Redis restarting or failing over: ask again next round
        return letters
    for letter in found:
        order_id = str(letter.order.get("order_external_id"))
        letters.setdefault(order_id, []).append(Letter(letter.action, letter.reason, letter.error or "",
                                                        letter.task_id))
    return letters


def landings_due_by(requests: Iterable[dict[str, Any]], slow_land_after_s: float) -> float:
    """When every request that lands later than its answer (the random timeout, a
    ``land_after_s`` fault) will have landed (Unix time; 0 if none is waiting)."""
    due = 0.0
    for entry in requests:
        fault = str(entry.get("fault") or "")
        if entry.get("landed_at") is not None or not fault:
            continue
        if fault == "random:timeout":
            due = max(due, float(entry["time"]) + slow_land_after_s)
        elif "land_after_s=" in fault:
            after = fault.split("land_after_s=", 1)[1].split(",", 1)[0]
            due = max(due, float(entry["time"]) + float(after))
    return due


def wait_for_landings(control: SandboxControl, slow_land_after_s: float, bound_s: float) -> None:
    """Before the last count: let the requests still due to land land (at most ``bound_s``)."""
    pause = landings_due_by(control.requests(), slow_land_after_s) + 0.5 - time.time()
    if pause > 0:
        time.sleep(min(pause, bound_s))


def unfinished_tasks(client: redis.Redis | None) -> int | None:
    """Tasks still registered in flight (mipos_worker/state/inflight.py); None: Redis away."""
    if client is None:
        return None
    try:
        return int(client.hlen(f"{KEY_PREFIX}inflight"))
    except redis.RedisError:
        return None


@dataclass
class ChaosResult:
    orders: int
    accepted_once: int = 0
    accepted_twice_or_more: int = 0
    dead_lettered_permanent: int = 0
    dead_lettered_other: int = 0
    lost: int = 0
    wall_time_s: float = 0.0
    wrongly_dead_lettered: int = 0
    permanent_orders: int = 0
    strict: bool = False
    mixed: bool = False
    call_bound_s: float = CALL_BOUND_S
    slow_land_after_s: float | None = None  # the random timeout's landing, after arrival
    slow_answer_after_s: float | None = None
    late_orders: int = 0  # programmed to land later than the bound
    # Requests of one order and action that reached mipos twice or more (lenient: applied
    # twice; strict: the second refused), by the cause of the earlier one (module docstring).
    sent_twice_or_more: int = 0
    duplicates_landed_within_bound: int = 0
    duplicates_landed_late: int = 0
    duplicates_after_worker_loss: int = 0
    duplicates_unexplained: int = 0
    duplicates_unflagged: int = 0  # no line of the order says an earlier request's outcome was unknown
    duplicates_without_possible_duplicate: int = 0  # ... or none says possible_duplicate (or refused_with)
    # cause (or without_possible_duplicate, dead_lettered_twice) -> order ids
    duplicate_orders: dict[str, list[str]] = field(default_factory=dict)
    slow_requests: int = 0  # random timeouts drawn on orders' requests
    slow_requests_landed: int = 0
    confirmed_by_pending_list: int = 0  # lines that recorded an unanswered request as landed
    refusals_settled: int = 0  # ... of which after a refusal (refused_with)
    strict_refusals: int = 0  # requests strict mipos refused (the order no longer pending)
    requests_lost_with_worker: int = 0  # request_outcome_unknown lines
    lost_found_by_other_action: int = 0  # ... read by a task of the other action (a deny after a lost accept)
    orders_waited_for_unanswered: int = 0  # orders a delivery held back (waiting_for_task_id)
    # The mixed mode (issue 24): an accept and a deny of the same order.
    pairs: int = 0
    held_orders: int = 0
    denied_once: int = 0
    denied_twice_or_more: int = 0
    pairs_ended_accepted: int = 0
    pairs_ended_denied: int = 0
    both_accepted_and_denied: int = 0  # at mipos, from orders(): must be 0
    both_landed_late: int = 0  # ... of which after a request that landed later than the bound
    both_reached_mipos: int = 0  # an accept and a deny both landed (strict: one refused)
    both_orders: dict[str, str] = field(default_factory=dict)  # order -> cause
    other_action_dead_lettered: int = 0  # expected: the loser of a pair, refused
    other_action_refused_by_mipos: int = 0  # ... of which sent and refused by mipos (strict)
    dead_letters_repeated: int = 0  # a task's second (third...) dead letter: redelivered after its end
    kills: int = 0
    kills_mid_request: int = 0  # kills made while the sandbox held a request
    redis_restarts: int = 0
    faults_injected: dict[str, int] = field(default_factory=dict)
    token_calls: int = 0
    refresh_calls: int = 0
    timed_out: bool = False
    unfinished_tasks: int | None = None  # still registered in flight when the run ended
    lost_orders: list[str] = field(default_factory=list)
    wrong_letters: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    evidence: dict[str, dict[str, Any]] = field(default_factory=dict)  # order -> requests, lines
    workdir: str = ""

    def problems(self) -> list[str]:
        """What fails the run (exit code 1)."""
        found = []
        if self.lost:
            found.append(f"{self.lost} lost: {', '.join(self.lost_orders[:10])}")
        if self.wrongly_dead_lettered:
            found.append(f"{self.wrongly_dead_lettered} wrongly dead-lettered: "
                         f"{', '.join(list(self.wrong_letters)[:10])}")
        for cause in (WITHIN_BOUND, UNEXPLAINED):
            ids = self.duplicate_orders.get(cause, [])
            if ids:
                found.append(f"{len(ids)} sent twice, cause {cause}: {', '.join(ids[:10])}")
        both = self.both_accepted_and_denied - self.both_landed_late
        if both:
            found.append(f"{both} both accepted and denied: "
                         f"{', '.join(o for o, c in self.both_orders.items() if c != LANDED_LATE)}")
        if self.timed_out:
            found.append("timed out before every order was final")
        return found


# -- the tally ---------------------------------------------------------------------------


def tally(result: ChaosResult, plan: Plan, snap: Snapshot, requests: list[dict[str, Any]],
          lines: list[dict[str, Any]]) -> None:
    """Fill ``result`` from where the orders ended, the request log and the workers' lines."""
    result.permanent_orders = len(plan.permanent)
    result.late_orders = len(plan.late)
    result.pairs, result.held_orders = len(plan.pairs), len(plan.held)
    calls = order_calls(requests)
    by_order = lines_by_order(lines)
    for order_id in plan.ids:
        count_ending(result, plan, snap, order_id)
        count_letters(result, plan, snap, order_id)
        explain_duplicates(result, calls.get(order_id, []), by_order.get(order_id, []), order_id)
        if order_id in plan.pairs:
            count_pair(result, snap, calls.get(order_id, []), by_order.get(order_id, []), order_id)
    count_requests(result, requests, plan)
    count_lines(result, lines)


def order_calls(requests: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Accept and deny requests by order id, oldest first, each with its ``action``."""
    calls: dict[str, list[dict[str, Any]]] = {}
    for entry in requests:
        action = ACTION_PATHS.get(str(entry.get("path")))
        body = entry.get("body")
        if action is None or not isinstance(body, dict):
            continue
        calls.setdefault(str(body.get("order_external_id")), []).append({**entry, "action": action})
    for entries in calls.values():
        entries.sort(key=lambda e: float(e["time"]))
    return calls


def lines_by_order(lines: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        if "order_external_id" in line:
            found.setdefault(str(line["order_external_id"]), []).append(line)
    return found


def count_ending(result: ChaosResult, plan: Plan, snap: Snapshot, order_id: str) -> None:
    accepted, denied = snap.count(order_id, "accept"), snap.count(order_id, "deny")
    letters = snap.letters.get(order_id, [])
    if not all(snap.ended(order_id, a) for a in plan.actions(order_id)):
        result.lost += 1
        result.lost_orders.append(order_id)
    if accepted == 1:
        result.accepted_once += 1
    elif accepted > 1:
        result.accepted_twice_or_more += 1
    elif denied == 1:
        result.denied_once += 1
    elif denied > 1:
        result.denied_twice_or_more += 1
    elif letters and letters[0].reason == "permanent":
        result.dead_lettered_permanent += 1
    elif letters:
        result.dead_lettered_other += 1


def count_letters(result: ChaosResult, plan: Plan, snap: Snapshot, order_id: str) -> None:
    """Each dead letter is expected (a permanent fault; the loser of a pair) or wrong; a task
    dead-lettered twice (its worker killed before the ack) is counted apart."""
    wrong = []
    letters = snap.letters.get(order_id, [])
    tasks = Counter(letter.task_id for letter in letters)
    result.dead_letters_repeated += sum(n - 1 for n in tasks.values())
    if any(n > 1 for n in tasks.values()):
        add_id(result.duplicate_orders, "dead_lettered_twice", order_id)
    losers = set()
    for letter in letters:
        other = "deny" if letter.action == "accept" else "accept"
        if order_id in plan.permanent:
            continue
        if (order_id in plan.pairs and letter.reason == "permanent" and snap.count(order_id, other) > 0
                and snap.count(order_id, letter.action) == 0):
            if letter.action not in losers:
                result.other_action_dead_lettered += 1
                result.other_action_refused_by_mipos += "cannot be" not in letter.error
            losers.add(letter.action)
            continue
        wrong.append(asdict(letter))
    if wrong:
        result.wrongly_dead_lettered += 1
        if len(result.wrong_letters) < MAX_EVIDENCE:
            result.wrong_letters[order_id] = wrong


def lost_sends(lines: Iterable[dict[str, Any]]) -> list[float]:
    """When the requests of killed workers were sent (their ``request_outcome_unknown`` lines)."""
    return [float(line["sent_at"]) for line in lines
            if line.get("event") == "request_outcome_unknown" and line.get("sent_at") is not None]


def request_cause(entry: dict[str, Any], lost_at: list[float], bound_s: float) -> str:
    """Why a request that landed did not stop the next one (module docstring)."""
    if float(entry["landed_at"]) - float(entry["time"]) > bound_s:
        return LANDED_LATE
    if any(abs(at - float(entry["time"])) < LOST_SEND_MATCH_S for at in lost_at):
        return WORKER_LOSS
    if entry.get("fault"):
        return WITHIN_BOUND
    return UNEXPLAINED


def worst(causes: Iterable[str]) -> str:
    return min(causes, key=CAUSE_ORDER.index)


def landed(entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("landed_at") is not None]


def explain_duplicates(result: ChaosResult, calls: list[dict[str, Any]], lines: list[dict[str, Any]],
                       order_id: str) -> None:
    for action in ("accept", "deny"):
        reached = landed(e for e in calls if e["action"] == action)
        if len(reached) < 2:
            continue
        result.sent_twice_or_more += 1
        cause = worst(request_cause(e, lost_sends(lines), result.call_bound_s) for e in reached[:-1])
        setattr(result, f"duplicates_{cause}", getattr(result, f"duplicates_{cause}") + 1)
        add_id(result.duplicate_orders, cause, order_id)
        if not unknown_said(lines, action):
            result.duplicates_unflagged += 1
        if not flagged(lines, action):
            result.duplicates_without_possible_duplicate += 1
            add_id(result.duplicate_orders, "without_possible_duplicate", order_id)
        if cause in (WITHIN_BOUND, UNEXPLAINED):
            keep_evidence(result, order_id, calls, lines)


def unknown_said(lines: Iterable[dict[str, Any]], action: str) -> bool:
    """A line says a request of that action went unanswered (or its worker was lost)."""
    return any((line.get("event") == f"{action}_attempt" and line.get("outcome_unknown"))
               or (line.get("event") == "request_outcome_unknown" and line.get("lost_action") == action)
               for line in lines)


def flagged(lines: Iterable[dict[str, Any]], action: str) -> bool:
    """A line of that action says the order may have been sent twice."""
    return any(line.get("event") == f"{action}_attempt" and (line.get("possible_duplicate")
                                                             or line.get("refused_with"))
               for line in lines)


def count_pair(result: ChaosResult, snap: Snapshot, calls: list[dict[str, Any]],
               lines: list[dict[str, Any]], order_id: str) -> None:
    accepted, denied = snap.count(order_id, "accept") > 0, snap.count(order_id, "deny") > 0
    result.pairs_ended_accepted += accepted and not denied
    result.pairs_ended_denied += denied and not accepted
    reached = landed(calls)
    if len({e["action"] for e in reached}) < 2:
        return
    result.both_reached_mipos += 1
    first = min(reached, key=lambda e: float(e["landed_at"]))
    cause = request_cause(first, lost_sends(lines), result.call_bound_s)
    if accepted and denied:
        result.both_accepted_and_denied += 1
        result.both_landed_late += cause == LANDED_LATE
        result.both_orders[order_id] = cause
        if cause != LANDED_LATE:
            keep_evidence(result, order_id, calls, lines)


def count_requests(result: ChaosResult, requests: list[dict[str, Any]], plan: Plan) -> None:
    faults = Counter(str(r["fault"]) for r in requests if r.get("fault"))
    result.faults_injected = dict(sorted(faults.items()))
    for entry in requests:
        if ACTION_PATHS.get(str(entry.get("path"))) is None:
            continue
        order_id = str((entry.get("body") or {}).get("order_external_id"))
        if entry.get("fault") == "random:timeout":
            result.slow_requests += 1
            result.slow_requests_landed += entry.get("landed_at") is not None
        if entry.get("landed_status") == 409 and order_id not in plan.permanent:
            result.strict_refusals += 1


def count_lines(result: ChaosResult, lines: list[dict[str, Any]]) -> None:
    waited = set()
    lost = set()
    actions = {line.get("task_id"): line.get("action") for line in lines
               if line.get("event") in ("accept_attempt", "deny_attempt")}
    for line in lines:
        if line.get("confirmed_by") == "pending_list":
            result.confirmed_by_pending_list += 1
            result.refusals_settled += bool(line.get("refused_with"))
        if line.get("waiting_for_task_id"):
            waited.add(str(line.get("order_external_id")))
        if line.get("event") == "request_outcome_unknown":
            lost.add((line.get("lost_task_id"), line.get("lost_attempt")))
            result.lost_found_by_other_action += actions.get(line.get("task_id")) not in (
                None, line.get("lost_action"))
    result.orders_waited_for_unanswered = len(waited)
    result.requests_lost_with_worker = len(lost)


def add_id(ids: dict[str, list[str]], key: str, order_id: str) -> None:
    found = ids.setdefault(key, [])
    if len(found) < MAX_IDS:
        found.append(order_id)


def keep_evidence(result: ChaosResult, order_id: str, calls: list[dict[str, Any]],
                  lines: list[dict[str, Any]]) -> None:
    """The order's requests and lines, for a post-mortem (the first few such orders)."""
    if order_id in result.evidence or len(result.evidence) >= MAX_EVIDENCE:
        return
    shown = [{k: e.get(k) for k in ("action", "time", "status", "landed_at", "landed_status",
                                    "applied", "fault")} for e in calls]
    result.evidence[order_id] = {"requests": shown, "lines": lines}


def keep_record(workdir: Path, plan: Plan, requests: list[dict[str, Any]]) -> None:
    """The plan and the sandbox's accept/deny requests (no tokens), beside the workers' logs."""
    kept = [{k: v for k, v in entry.items() if k != "authorization"} for entry in requests
            if entry.get("path") in ACTION_PATHS]
    (workdir / "sandbox-requests.json").write_text(json.dumps(kept))
    roles = {"permanent": sorted(plan.permanent), "late": sorted(plan.late), "held": sorted(plan.held),
             "pairs": {k: asdict(v) for k, v in plan.pairs.items()}}
    (workdir / "plan.json").write_text(json.dumps(roles))


# -- the report --------------------------------------------------------------------------


def report(result: Any, render: Callable[[Any], str], json_path: Path | None) -> int:
    """Print the table, write the JSON; exit 0 only when ``result.problems()`` is empty: nothing
    lost, nothing wrongly dead-lettered, no order sent twice within the bound or unexplained,
    none both accepted and denied (but after a late landing), in time."""
    print(render(result))
    if json_path:
        json_path.write_text(json.dumps(asdict(result), indent=2, default=str))
    problems = result.problems()
    for problem in problems:
        print(f"FAILED: {problem}")
    return 1 if problems else 0


def duplicate_notes(result: ChaosResult) -> list[str]:
    """The lines under a table that say why orders were sent twice."""
    return [
        (f"sent twice or more (a second request of one order and action reached mipos"
         f"{'; strict mipos refused it' if result.strict else ''}): {result.sent_twice_or_more}: "
         f"{result.duplicates_landed_within_bound} after a request that landed within one call's bound "
         f"({result.call_bound_s:g} s; must be 0), {result.duplicates_landed_late} after one that landed "
         f"later (allowed, flagged), {result.duplicates_after_worker_loss} after a lost worker, "
         f"{result.duplicates_unexplained} unexplained; {result.duplicates_unflagged} without an "
         f"outcome_unknown line, {result.duplicates_without_possible_duplicate} without a possible_duplicate "
         f"(or refused_with) line"),
        (f"slow requests (random timeout: lands {result.slow_land_after_s:g} s after arriving, answered "
         f"at {result.slow_answer_after_s:g} s, the client gives up at 1 s): {result.slow_requests} drawn, "
         f"{result.slow_requests_landed} landed; {result.late_orders} orders programmed to land "
         f"{2 * result.call_bound_s:g} s after arriving (later than the bound)"),
        (f"tasks dead-lettered twice (the worker killed after the letter, before the ack; the message "
         f"delivered again): {result.dead_letters_repeated}"),
        (f"settled through the pending list: {result.confirmed_by_pending_list} confirmed as landed "
         f"({result.refusals_settled} after a refusal); {result.orders_waited_for_unanswered} orders held "
         f"back while an unanswered request could land; {result.requests_lost_with_worker} requests "
         f"left unanswered by a killed worker ({result.lost_found_by_other_action} found by a task of the "
         f"other action); {result.strict_refusals} requests refused by strict mipos"),
    ]
