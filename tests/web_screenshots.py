"""Takes the README's screenshots of the browser page: docs/screenshots/*.png.

    .venv/bin/python tests/web_screenshots.py

Starts a memory server, has three people chat in Chromium (as the browser tests do), and
photographs the main states at desktop and phone width, a server restart included.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from browser import PHONE, WAIT_MS, ChatPage, launched  # noqa: E402
from playwright.sync_api import expect  # noqa: E402
from services import ROOT, Server  # noqa: E402

OUT = ROOT / "docs" / "screenshots"
RECONNECT_MS = 4 * WAIT_MS


def shoot(person: ChatPage, name: str) -> None:
    path = OUT / f"{name}.png"
    person.page.screenshot(path=str(path))
    print(f"{path.relative_to(ROOT)}: {path.stat().st_size // 1024} KiB")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with Server({"RATE_LIMIT": "1000", "RATE_LIMIT_BURST": "1000"}) as srv, launched() as browser:
        bob = ChatPage(browser, srv).open().sign_in("bob")
        carol = ChatPage(browser, srv).open().sign_in("carol")
        alice = ChatPage(browser, srv).open().sign_in("alice")
        for room in ("release", "random"):
            for person in (alice, bob):
                person.page.locator("#join-room").fill(room)
                person.page.locator("#join-room").press("Enter")
                expect(person.page.locator("#title")).to_have_text(f"# {room}")
        for person in (alice, bob):
            person.open_conversation("room:general")
        bob.say("Morning all! The release train leaves at 3.")
        alice.say("Morning! The changelog will be ready by 2.")
        carol.say("I can review it after lunch.")
        expect(alice.messages("after lunch")).to_have_count(1)
        bob.open_conversation("room:random")
        bob.say("Who broke the coffee machine?")
        carol.page.locator("#members button", has_text="alice").click()
        carol.say("Lunch after the release?")
        expect(alice.page.locator("#dms .unread")).to_have_text("1")
        bob.open_conversation("room:general")
        bob.page.locator("#draft").press_sequentially("I'll tag the")
        expect(alice.page.locator("#typing")).to_have_text("bob (guest) is typing…")
        shoot(alice, "desktop-chat")

        phone = ChatPage(browser, srv, PHONE).open()
        expect(phone.page.locator("#signin")).to_be_visible()
        phone.page.locator("#signin-name").fill("dave")
        shoot(phone, "phone-signin")
        phone.page.locator("#signin-go").click()
        phone.wait_online()
        phone.say("On my phone, reading along.")
        expect(phone.messages("reading along")).not_to_have_class(re.compile("pending"))
        shoot(phone, "phone-chat")
        phone.page.locator("#menu").click()
        expect(phone.page.locator("#sidebar")).to_be_in_viewport()
        phone.page.wait_for_timeout(300)  # the menu's slide-in transition
        shoot(phone, "phone-menu")
        phone.close()

        srv.stop()
        expect(alice.page.locator("#status")).to_contain_text("restarting")
        alice.say("Is the server down?")
        expect(alice.messages("server down")).to_contain_text("Waiting for the connection")
        shoot(alice, "desktop-reconnecting")
        srv.start()
        expect(alice.page.locator("#status")).to_have_attribute("data-state", "connected",
                                                                 timeout=RECONNECT_MS)
        expect(alice.page.locator("#messages .notice.warn")).to_be_visible(timeout=RECONNECT_MS)
        expect(bob.page.locator("#status")).to_have_attribute("data-state", "connected",
                                                               timeout=RECONNECT_MS)
        expect(bob.messages("server down")).to_have_count(1, timeout=RECONNECT_MS)
        bob.say("Back again: it restarted, nothing is stuck.")
        expect(alice.messages("nothing is stuck")).to_have_count(1)
        shoot(alice, "desktop-restarted")


if __name__ == "__main__":
    main()
