"""The Dead letters pages: the list (``/dead-letters``), one letter (``/dead-letter/<id>``), and
their writes, each a confirmation page (GET) and then a POST with the CSRF token: replay or
discard one letter, replay the letters selected in the list."""

from __future__ import annotations

import re

import tornado.web

from worker.ops.order_status import describe_order
from worker.pages import actions
from worker.pages.base import PageHandler
from worker.pages.filters import arguments, describe, parse_filters
from worker.pages.order_view import order_page
from worker.state.deadletters import DeadLetter, DeadLetterCounts, DeadLetterPage

PAGE_SIZE = 50
LIST_MAX_SCAN = 1000  # letters one filtered page examines at most, then it offers the next page
LETTER_ID = re.compile(r"^[0-9a-f]{16}$")
VERBS = {"replay": "Replay", "discard": "Discard"}


class DeadLettersHandler(PageHandler):
    active_tab = "mipos-dead-letters"

    async def get(self) -> None:
        filters, problems = parse_filters(arguments(self.request.query_arguments))

        def read() -> tuple[DeadLetterPage, DeadLetterCounts]:
            letters = self.pages.letters
            try:
                page = letters.page(PAGE_SIZE, before=filters.start(), since=filters.since, reason=filters.reason,
                                    store_id=filters.store, action=filters.action, max_scan=LIST_MAX_SCAN)
            except ValueError as exc:  # a cursor the store refuses
                problems.append(str(exc))
                page = DeadLetterPage([], None)
            return page, letters.counts(filters.since, filters.until)

        page, counts = await self.blocking(read)
        self.page("mipos-dead-letters.html", title="Dead letters", filters=filters, problems=problems,
                  letters=page.letters, next_before=page.next_before, counts=counts, range_text=describe(filters),
                  short=page.next_before is not None and len(page.letters) < PAGE_SIZE, scan=LIST_MAX_SCAN)


class LetterHandler(PageHandler):
    active_tab = "mipos-dead-letters"

    async def get(self, letter_id: str) -> None:
        letter = await self.blocking(self.pages.letters.get, letter_id)
        if letter is None:
            raise tornado.web.HTTPError(404, f"no dead letter {letter_id}: it never existed, was discarded or "
                                             "purged, or expired after 30 days")
        store, order_id = str(letter.order.get("store_id")), str(letter.order.get("order_external_id"))
        status = await self.blocking(describe_order, self.pages.redis, self.pages.key_prefix, store, order_id)
        self.page("mipos-letter.html", title=f"Dead letter {letter.id}", letter=letter,
                  order=order_page(status) if status is not None else None,
                  others=[x for x in (status.dead_letters if status else []) if x.id != letter.id])


class LetterActionHandler(PageHandler):
    """``/dead-letter/<id>/replay`` and ``.../discard``: GET asks, POST does."""

    active_tab = "mipos-dead-letters"

    async def get(self, letter_id: str, verb: str) -> None:
        letter = await self.blocking(self.pages.letters.get, letter_id)
        if letter is None:
            raise tornado.web.HTTPError(404, f"no dead letter {letter_id}")
        self.confirm(verb, [letter], self.link("mipos-letter-action", letter_id, verb))

    async def post(self, letter_id: str, verb: str) -> None:
        self.require_writer()
        do = actions.replay if verb == "replay" else actions.discard
        outcome = await self.blocking(do, self.pages.letters, letter_id, self.user)
        self.page("mipos-result.html", title=f"{VERBS[verb]} dead letter", verb=verb, outcomes=[outcome])

    def confirm(self, verb: str, letters: list[DeadLetter], action: str) -> None:
        self.page("mipos-confirm.html", title=f"{VERBS[verb]} dead letters?", verb=verb, letters=letters,
                  action=action, missing=[])


class ReplaySelectedHandler(LetterActionHandler):
    """``/dead-letters/replay?id=..&id=..``: the letters selected in the list."""

    def selected(self) -> list[str]:
        ids: list[str] = []
        for raw in self.get_arguments("id"):
            value = raw.strip()
            if LETTER_ID.match(value) and value not in ids:
                ids.append(value)
        if not ids:
            raise tornado.web.HTTPError(400, "no dead letter selected")
        if len(ids) > actions.MAX_SELECTED:
            raise tornado.web.HTTPError(400, f"at most {actions.MAX_SELECTED} dead letters at a time")
        return ids

    async def get(self) -> None:  # type: ignore[override]
        ids = self.selected()
        found = await self.blocking(lambda: [self.pages.letters.get(i) for i in ids])
        letters = [x for x in found if x is not None]
        self.page("mipos-confirm.html", title="Replay dead letters?", verb="replay", letters=letters,
                  action=self.link("mipos-replay-selected"),
                  missing=[i for i, x in zip(ids, found) if x is None])

    async def post(self) -> None:  # type: ignore[override]
        self.require_writer()
        ids = self.selected()
        letters = self.pages.letters
        outcomes = await self.blocking(lambda: [actions.replay(letters, i, self.user) for i in ids])
        self.page("mipos-result.html", title="Replay dead letters", verb="replay", outcomes=outcomes)
