"""Flower's Tasks page in a real headless Chromium (playwright), for the tests and the README's screenshot.

Chromium is Debian's ``chromium`` package (``/usr/bin/chromium``; another binary:
``MIPOS_CHROMIUM``); playwright drives it, and never downloads a browser of its own.
Every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Without the background-networking flags Chromium dials out at start, and a closed
# network refuses it; the rest keep a headless run quiet and reproducible.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
VIEWPORT = (1400, 900)

# One row of the Tasks page as {column: text}; the columns are Flower's slugs
# (name, uuid, state, kwargs, retries, exception, ...). An expectation is a
# mapping {column: substring}; a row matches when each of its columns holds its substring.
Row = dict[str, str]
Expectation = Mapping[str, str]


class BrowserMissing(RuntimeError):
    pass


def chromium_executable() -> str:
    """The Chromium binary, or BrowserMissing with what to install."""
    configured = os.environ.get("MIPOS_CHROMIUM")
    path = configured or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        raise BrowserMissing(
            f"Chromium not found ({path}): install the Debian package `chromium` "
            "(scripts/install-system-packages does, as root), or point MIPOS_CHROMIUM at a Chromium binary"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        raise BrowserMissing(
            "the Python package playwright is missing: pip install -e '.[test]'"
        ) from exc
    return path


def matches(row: Row, expected: Expectation) -> bool:
    return all(part in row.get(column, "") for column, part in expected.items())


class FlowerTasksPage:
    """Flower's Tasks page, open in a browser tab with the credentials in its context."""

    def __init__(self, page: Any, base_url: str, timeout: float) -> None:
        self.page = page
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def open(self) -> None:
        response = self.page.goto(f"{self.base_url}/tasks", wait_until="domcontentloaded")
        if response is None or response.status != 200:
            status = response.status if response is not None else "no answer"
            raise AssertionError(f"Flower's Tasks page answered {status}")
        # The table fills itself from /tasks/datatable; ajax.json() is set once that answered.
        self.page.wait_for_function(
            "() => window.jQuery && jQuery.fn.dataTable && jQuery.fn.dataTable.isDataTable('#tasks-table')"
            " && jQuery('#tasks-table').DataTable().ajax.json() !== undefined",
            timeout=self.timeout * 1000,
        )

    def refresh(self) -> None:
        """Reload the table from Flower (the Tasks page does not refresh by itself)."""
        self.page.evaluate(
            """(ms) => new Promise((resolve, reject) => {
                const timer = setTimeout(() => reject(new Error('tasks table reload timed out')), ms);
                jQuery('#tasks-table').DataTable().ajax.reload(() => { clearTimeout(timer); resolve(); }, false);
            })""",
            min(10_000, int(self.timeout * 1000)),
        )

    def rows(self) -> list[Row]:
        """The rows as shown, one {column: text} each."""
        rows: list[Row] = self.page.evaluate(
            """() => {
                const table = jQuery('#tasks-table').DataTable();
                const columns = table.columns().dataSrc().toArray();
                return jQuery('#tasks-table tbody tr').toArray()
                    .filter(tr => !tr.querySelector('td.dataTables_empty'))
                    .map(tr => Object.fromEntries(
                        Array.from(tr.cells).map((td, i) => [columns[i], td.innerText.trim()])));
            }"""
        )
        return rows

    def text(self) -> str:
        text: str = self.page.inner_text("body")
        return text

    def wait_for_rows(self, expected: Sequence[Expectation], timeout: float | None = None,
                      interval: float = 0.2) -> list[Row]:
        """Refresh until, for each expectation, some row matches it; the rows then."""
        limit = self.timeout if timeout is None else timeout
        give_up = time.monotonic() + limit
        while True:
            self.refresh()
            rows = self.rows()
            missing = [dict(e) for e in expected if not any(matches(row, e) for row in rows)]
            if not missing:
                return rows
            if time.monotonic() > give_up:
                shown = "\n".join(str(row) for row in rows) or "(no rows)"
                raise AssertionError(
                    f"timed out after {limit}s: Flower's Tasks page has no row matching {missing}; "
                    f"it shows:\n{shown}"
                )
            self.page.wait_for_timeout(interval * 1000)

    def task_text(self, task_id: str) -> str:
        """The text of one task's page (/task/<id>), in another tab."""
        page = self.page.context.new_page()
        try:
            response = page.goto(f"{self.base_url}/task/{task_id}", wait_until="domcontentloaded")
            if response is None or response.status != 200:
                raise AssertionError(f"Flower's page of task {task_id} did not answer 200")
            text: str = page.inner_text("body")
            return text
        finally:
            page.close()

    def screenshot(self, path: Path) -> None:
        """The whole page as a PNG."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.evaluate("() => jQuery('#tasks-table').DataTable().columns.adjust()")
        self.page.screenshot(path=str(path), full_page=True)


@contextmanager
def flower_tasks_page(base_url: str, credentials: tuple[str, str] | None, *,
                      timeout: float = 30.0, viewport: tuple[int, int] = VIEWPORT) -> Iterator[FlowerTasksPage]:
    """Headless Chromium on Flower's Tasks page, logged in with HTTP basic auth."""
    executable = chromium_executable()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS,
                                             timeout=timeout * 1000)
        try:
            context = browser.new_context(
                http_credentials=({"username": credentials[0], "password": credentials[1]}
                                  if credentials else None),
                viewport={"width": viewport[0], "height": viewport[1]},
            )
            context.set_default_timeout(timeout * 1000)
            tasks_page = FlowerTasksPage(context.new_page(), base_url, timeout)
            tasks_page.open()
            yield tasks_page
        finally:
            browser.close()


def tasks_page_text(base_url: str, credentials: tuple[str, str] | None,
                    expected: Sequence[Expectation], *, timeout: float = 30.0,
                    screenshot: Path | None = None, viewport: tuple[int, int] = VIEWPORT) -> str:
    """Open the Tasks page, wait until rows match ``expected``, maybe save a screenshot; the page text."""
    with flower_tasks_page(base_url, credentials, timeout=timeout, viewport=viewport) as page:
        page.wait_for_rows(expected, timeout)
        if screenshot is not None:
            page.screenshot(screenshot)
        return page.text()
