"""Orders that failed for good, kept in Redis with everything known about them."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import redis

from mipos_worker.order.model import order_key
from mipos_worker.state.connection import text
from worker.state.counters import Metrics

DEAD_LETTER_TTL_S = 30 * 24 * 3600
# Why an order failed for good (worker/attempt/story.py); each has an index of its own, for counts.
REASONS = ("permanent", "permanent_after_unknown", "attempts", "deadline", "invalid")


@dataclass(frozen=True)
class DeadLetter:
    id: str
    action: str
    order: dict[str, Any]  # the arguments as received (they may be the invalid ones)
    reason: str  # one of REASONS
    error: str | None
    task_id: str
    enqueued_at: float | None
    failed_at: float
    attempts: list[dict[str, Any]] = field(default_factory=list)
    replay_of: str | None = None  # this failure ended a replay of that dead letter
    replayed: dict[str, Any] | None = None  # {"task_id", "at"} once an operator replayed it

    @property
    def order_key(self) -> str:
        return order_key(self.order.get("store_id"), self.order.get("order_external_id"))


@dataclass(frozen=True)
class DeadLetterPage:
    letters: list[DeadLetter]
    next_before: str | None  # the cursor of the next (older) page; None when this was the last


@dataclass(frozen=True)
class DeadLetterCounts:
    """Live letters of a time range: all of them, and by reason (reasons without one left out).

    ``uncounted``: letters of the range that no reason index holds, those written before the
    indexes by reason were kept; they leave with their 30 days."""

    total: int
    by_reason: dict[str, int]

    @property
    def uncounted(self) -> int:
        return max(0, self.total - sum(self.by_reason.values()))


class DeadLetters:
    """Dead letters by id, in an index by failure time, and by order."""

    def __init__(self, redis_client: redis.Redis, key_prefix: str, metrics: Metrics | None = None) -> None:
        self.redis = redis_client
        self.metrics = metrics
        self.index_key = f"{key_prefix}dead"
        self.item_prefix = f"{key_prefix}dead:"
        self.replay_prefix = f"{key_prefix}dead-replay:"
        self.by_order_prefix = f"{key_prefix}dead-order:"
        self.by_reason_prefix = f"{key_prefix}dead-reason:"

    def reason_key(self, reason: str) -> str:
        """The index of one reason's letters by failure time: counts cost one ZCOUNT each."""
        return self.by_reason_prefix + reason

    def add(
        self,
        *,
        action: str,
        order: dict[str, Any],
        reason: str,
        error: str | None,
        task_id: str,
        enqueued_at: float | None,
        attempts: list[dict[str, Any]],
        replay_of: str | None = None,
    ) -> DeadLetter:
        letter = DeadLetter(
            id=uuid.uuid4().hex[:16],
            action=action,
            order=order,
            reason=reason,
            error=error,
            task_id=task_id,
            enqueued_at=enqueued_at,
            failed_at=time.time(),
            attempts=attempts,
            replay_of=replay_of,
        )
        by_order = self.by_order_prefix + letter.order_key
        pipe = self.redis.pipeline()
        pipe.set(self.item_prefix + letter.id, json.dumps(asdict(letter)), ex=_ttl())
        pipe.zadd(self.index_key, {letter.id: letter.failed_at})
        pipe.zremrangebyscore(self.index_key, "-inf", expired_before(letter.failed_at))
        pipe.zadd(by_order, {letter.id: letter.failed_at})
        pipe.zremrangebyscore(by_order, "-inf", expired_before(letter.failed_at))
        pipe.expire(by_order, _ttl())
        if reason in REASONS:
            by_reason = self.reason_key(reason)
            pipe.zadd(by_reason, {letter.id: letter.failed_at})
            pipe.zremrangebyscore(by_reason, "-inf", expired_before(letter.failed_at))
            pipe.expire(by_reason, _ttl())
        if self.metrics is not None:
            self.metrics.count("mipos_dead_letters_total", pipe, action=action, reason=reason)
        pipe.execute()
        return letter

    def for_order(self, store_id: str, order_external_id: str) -> list[DeadLetter]:
        """Oldest first."""
        key = self.by_order_prefix + order_key(store_id, order_external_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zremrangebyscore(key, "-inf", expired_before())
        pipe.zrange(key, 0, -1)
        ids = [text(i) for i in pipe.execute()[1]]
        return [letter for letter in self._fetch(ids, key) if letter is not None]

    def latest_for(self, store_id: str, order_external_id: str) -> DeadLetter | None:
        letters = self.for_order(store_id, order_external_id)
        return letters[-1] if letters else None

    def get(self, letter_id: str) -> DeadLetter | None:
        return self._fetch([letter_id])[0]

    def _fetch(self, letter_ids: list[str], index_key: str | None = None) -> list[DeadLetter | None]:
        """The letters of ``letter_ids`` in one round trip; ids whose letter is gone
        (expired, purged) leave ``index_key`` on the way."""
        if not letter_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for letter_id in letter_ids:
            pipe.get(self.item_prefix + letter_id)
            pipe.get(self.replay_prefix + letter_id)
        raws = pipe.execute()
        letters: list[DeadLetter | None] = []
        for raw, replay in zip(raws[::2], raws[1::2]):
            if not raw:
                letters.append(None)
                continue
            data = json.loads(raw)
            data["replayed"] = json.loads(replay) if replay else None
            letters.append(DeadLetter(**data))
        gone = [i for i, letter in zip(letter_ids, letters) if letter is None]
        if gone and index_key is not None:
            self.redis.zrem(index_key, *gone)
        return letters

    def trim(self) -> None:
        """Drop the ids of letters past their 30 days from the index (their keys expired)."""
        self.redis.zremrangebyscore(self.index_key, "-inf", expired_before())

    def page(self, limit: int = 100, *, before: str | None = None, since: float | None = None,
             reason: str | None = None, store_id: str | None = None, action: str | None = None,
             max_scan: int | None = None) -> DeadLetterPage:
        """Up to ``limit`` letters, newest first, older than the cursor ``before`` (a page's
        ``next_before``, or a bare time: failed before then), failed since ``since``, of one
        reason, one store or one action.

        Reads the index in slices (ZREVRANGEBYSCORE ... LIMIT) and the letters of each
        slice in one pipeline; examines at most ``max_scan`` ids (default: the page
        size, at least 100) so that filters cost a bounded amount: a page can come
        back short, with a cursor to go on from.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        budget = max_scan if max_scan is not None else max(limit, 100)
        self.trim()
        cursor = _Cursor.parse(before) if before else None
        floor = since if since is not None else "-inf"
        letters: list[DeadLetter] = []
        scanned = 0
        while len(letters) < limit and scanned < budget:
            want = min(max(limit - len(letters), 10), budget - scanned)
            rows = self._slice(cursor, floor, want)
            if not rows:
                return DeadLetterPage(letters, None)
            scanned += len(rows)
            for (letter_id, score), letter in zip(rows, self._fetch([i for i, _ in rows], self.index_key)):
                cursor = _Cursor(score, letter_id)
                if letter is None or not _matches(letter, reason, store_id, action):
                    continue
                letters.append(letter)
                if len(letters) == limit:
                    break
        more = self._slice(cursor, floor, 1) if cursor is not None else []
        return DeadLetterPage(letters, str(cursor) if more and cursor is not None else None)

    def _slice(self, cursor: _Cursor | None, floor: float | str, count: int) -> list[tuple[str, float]]:
        """The next ``count`` (id, score) of the index after ``cursor``, newest first.

        Letters that failed at the same instant sort by id, descending; those the
        cursor has passed are skipped (ties are rare: failure times are microseconds)."""
        top: float | str = cursor.score if cursor is not None else "+inf"
        offset = 0
        rows: list[tuple[str, float]] = []
        while len(rows) < count:
            raw = cast(list[tuple[Any, Any]], self.redis.zrevrangebyscore(
                self.index_key, top, floor, start=offset, num=count - len(rows), withscores=True))
            if not raw:
                break
            offset += len(raw)
            for member, score in raw:
                letter_id, at = text(member), float(score)
                if cursor is None or at < cursor.score or letter_id < cursor.letter_id:
                    rows.append((letter_id, at))
        return rows

    def counts(self, since: float | None = None, until: float | None = None) -> DeadLetterCounts:
        """The letters that failed in [since, until), all and by reason: one ZCOUNT per index,
        whatever the number of letters."""
        floor = since if since is not None else "-inf"
        top = f"({until!r}" if until is not None else "+inf"
        expired = expired_before()
        pipe = self.redis.pipeline(transaction=False)
        for key in (self.index_key, *(self.reason_key(r) for r in REASONS)):
            pipe.zremrangebyscore(key, "-inf", expired)
            pipe.zcount(key, floor, top)
        found = pipe.execute()[1::2]
        by_reason = {reason: int(n) for reason, n in zip(REASONS, found[1:]) if n}
        return DeadLetterCounts(int(found[0]), by_reason)

    def list(self, limit: int | None = None, *, since: float | None = None,
             reason: str | None = None, store_id: str | None = None) -> list[DeadLetter]:
        """Newest first, optionally only those failed since ``since`` (a time), for one
        reason, or for one store; every match unless ``limit``, page by page."""
        letters: list[DeadLetter] = []
        cursor: str | None = None
        while limit is None or len(letters) < limit:
            want = 500 if limit is None else min(500, limit - len(letters))
            page = self.page(want, before=cursor, since=since, reason=reason, store_id=store_id,
                             max_scan=max(want, 500))
            letters += page.letters
            if page.next_before is None:
                break
            cursor = page.next_before
        return letters

    def claim_replay(self, letter_id: str, task_id: str) -> dict[str, Any] | None:
        """Mark the letter replayed as ``task_id``; None if it already was (by anyone)."""
        claim = {"task_id": task_id, "at": time.time()}
        if self.redis.set(self.replay_prefix + letter_id, json.dumps(claim), nx=True, ex=_ttl()):
            return claim
        return None

    def release_replay(self, letter_id: str, task_id: str) -> None:
        """Undo a claim whose enqueue failed, so the letter can be replayed again."""
        raw = self.redis.get(self.replay_prefix + letter_id)
        if raw and json.loads(raw).get("task_id") == task_id:
            self.redis.delete(self.replay_prefix + letter_id)

    def purge(self, older_than: float) -> int:
        """Delete the dead letters that failed before ``older_than`` (a time); how many."""
        ids = [text(i) for i in self.redis.zrangebyscore(self.index_key, "-inf", older_than)]
        for letter_id in ids:
            self.discard(letter_id)
        return len(ids)

    def discard(self, letter_id: str) -> DeadLetter | None:
        """Delete one letter, its replay claim and its place in every index; the letter, or None
        when there was none (already discarded, purged or expired)."""
        letter = self.get(letter_id)
        pipe = self.redis.pipeline()
        pipe.delete(self.item_prefix + letter_id, self.replay_prefix + letter_id)
        pipe.zrem(self.index_key, letter_id)
        for reason in REASONS:
            pipe.zrem(self.reason_key(reason), letter_id)
        if letter is not None:
            pipe.zrem(self.by_order_prefix + letter.order_key, letter_id)
        pipe.execute()
        return letter


def _ttl() -> int:
    return int(DEAD_LETTER_TTL_S)


def expired_before(now: float | None = None) -> float:
    """Index scores at or below this belong to letters whose keys have expired."""
    return (now if now is not None else time.time()) - DEAD_LETTER_TTL_S


def _matches(letter: DeadLetter, reason: str | None, store_id: str | None, action: str | None) -> bool:
    if reason is not None and letter.reason != reason:
        return False
    if action is not None and letter.action != action:
        return False
    return store_id is None or str(letter.order.get("store_id")) == store_id


@dataclass(frozen=True)
class _Cursor:
    """Where a page ended: the last letter's failure time and id, as ``<failed_at>:<id>``.

    A bare time (``<failed_at>``) means "failed before then"."""

    score: float
    letter_id: str

    def __str__(self) -> str:
        return f"{self.score!r}:{self.letter_id}"

    @classmethod
    def parse(cls, text: str) -> _Cursor:
        score, _, letter_id = text.strip().partition(":")
        try:
            value = float(score)
        except ValueError:
            raise ValueError(f"{text!r} is not a dead-letter cursor (<failed_at>:<id>, "
                             "as a page's next_before gives it)") from None
        return cls(value, letter_id or "")
