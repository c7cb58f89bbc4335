"""The operator's pages (worker/pages/) in a real headless Chromium, for the tests, the README's
screenshots and the bench. Chromium and its flags are bench/browser.py's; every wait is bounded.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.browser import CHROMIUM_ARGS, VIEWPORT, chromium_executable
from support.processes import wait_for


class PagesBrowser:
    """One tab on Flower, logged in with basic auth (or not), with the pages' own shortcuts."""

    def __init__(self, page: Any, base_url: str, timeout: float) -> None:
        self.page = page
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def open(self, path: str, status: int = 200) -> Any:
        """Go to ``path`` and check the answer's status."""
        response = self.page.goto(self.base_url + path, wait_until="domcontentloaded")
        answered = response.status if response is not None else None
        if answered != status:
            raise AssertionError(f"{path} answered {answered}, not {status}")
        return response

    def text(self, selector: str) -> str:
        text: str = self.page.inner_text(selector)
        return text

    def has(self, selector: str) -> bool:
        return bool(self.page.locator(selector).count())

    def click_and_wait(self, selector: str) -> None:
        """Click a link or a submit button and wait for the page it leads to."""
        with self.page.expect_navigation(wait_until="domcontentloaded"):
            self.page.click(selector)

    def cookie(self, name: str) -> str | None:
        for cookie in self.page.context.cookies(self.base_url):
            if cookie["name"] == name:
                return str(cookie["value"])
        return None

    def post(self, path: str, form: Mapping[str, str]) -> int:
        """A POST from this browser's context (its cookies and credentials): the status."""
        response = self.page.context.request.post(self.base_url + path, form=dict(form), max_redirects=0)
        return int(response.status)

    def reload_until(self, selector: str, expected: str, timeout: float | None = None) -> str:
        """Reload until the text of ``selector`` holds ``expected`` (a bounded wait): the text then."""
        def shows() -> str | None:
            self.page.reload(wait_until="domcontentloaded")
            text = self.text(selector) if self.has(selector) else ""
            return text if expected in text else None

        return wait_for(shows, timeout=self.timeout if timeout is None else timeout, interval=0.25,
                        what=f"{selector} to show {expected!r} on {self.page.url}")

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=True)


@contextmanager
def pages_browser(base_url: str, credentials: tuple[str, str] | None, *, timeout: float = 30.0,
                  viewport: tuple[int, int] = VIEWPORT) -> Iterator[PagesBrowser]:
    """Headless Chromium, logged in to Flower with HTTP basic auth; one tab."""
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
            yield PagesBrowser(context.new_page(), base_url, timeout)
        finally:
            browser.close()
