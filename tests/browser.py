"""Driving the browser page with Playwright and the system's Chromium.

Playwright (PyPI ``playwright``, extra ``test``) ships its driver; the browser is Debian's
``chromium`` (``CHROMIUM`` overrides the path), so nothing is downloaded. Used by
``test_web_page.py`` and by ``web_screenshots.py`` (the README's pictures).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from services import SCALE, Server

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# Playwright's expect()/wait_for timeouts, ms: generous, the machine is shared.
WAIT_MS = int(10_000 * SCALE)
DESKTOP = {"width": 1100, "height": 700}
PHONE = {"width": 390, "height": 780}


def chromium_path() -> str | None:
    """The Chromium to drive: ``$CHROMIUM``, else ``chromium`` on PATH (Debian's package)."""
    given = os.environ.get("CHROMIUM")
    if given:
        return given if os.access(given, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def launched() -> Iterator[Any]:
    """A headless Chromium for the duration of the block (raises LookupError without one)."""
    path = chromium_path()
    if path is None:
        raise LookupError("no Chromium: install Debian's `chromium` package (or set CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


class ChatPage:
    """One person's tab: a browser context of its own (its own localStorage), on ``server``."""

    def __init__(self, browser: Any, server: Server, viewport: dict[str, int] = DESKTOP) -> None:
        self.server = server
        self.context = browser.new_context(viewport=viewport)
        self.context.set_default_timeout(WAIT_MS)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.closed = False
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/"

    def open(self) -> ChatPage:
        self.page.goto(self.url)
        return self

    def sign_in(self, name: str) -> ChatPage:
        """Picks a guest name in the sign-in dialog, as a new user does, and waits to be online."""
        self.page.locator("#signin-name").fill(name)
        self.page.locator("#signin-go").click()
        self.wait_online()
        return self

    def sign_in_with_token(self, token: str) -> ChatPage:
        """Pastes a JWT in the sign-in dialog and waits to be online."""
        self.page.locator("#signin-token-box summary").click()
        self.page.locator("#signin-token").fill(token)
        self.page.locator("#signin-go").click()
        self.wait_online()
        return self

    def wait_online(self) -> None:
        self.expect(self.page.locator("#status")).to_have_attribute("data-state", "connected")

    def expect(self, locator: Any) -> Any:
        from playwright.sync_api import expect

        return expect(locator)

    def open_conversation(self, key: str) -> None:
        self.page.locator(f'[data-conv="{key}"] > .open').click()

    def say(self, text: str) -> None:
        """Types ``text`` into the composer and presses Enter."""
        self.page.locator("#draft").fill(text)
        self.page.locator("#draft").press("Enter")

    def messages(self, text: str) -> Any:
        return self.page.locator("#messages .msg", has_text=text)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.context.close()
