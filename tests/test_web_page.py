"""The browser page (wschat/web) in a real Chromium against real servers.

Playwright drives Debian's ``chromium`` (see ``browser.py``); each person is a browser
context of their own, as two people on two machines. Outside CI a missing Chromium or
Playwright skips these tests; under ``CI=true`` it fails them.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest

from browser import WAIT_MS, ChatPage, chromium_path, launched
from conftest import (
    SCALE, TIMEOUT, Client, Server, redis_url_or_skip, service_unavailable,
)

JWT_SECRET = "browser-tests-secret-0123456789abcdef"
API_KEY = "browser-tests-api-key-0123456789"
RECONNECT_MS = int(40_000 * SCALE)  # the library's backoff grows to 20 s while a server is down
ANNOUNCED_KEPT_MS = 10_000  # app.js: a line said in #arrivals goes after this
MINE = re.compile(r"\bmine\b")
PENDING = re.compile(r"\bpending\b")
# Short enough that a test can write one message the server refuses (the page allows 4000).
SERVER_ENV = {"TYPING_TIMEOUT": "5", "RATE_LIMIT": "1000", "RATE_LIMIT_BURST": "1000",
              "MAX_TEXT_CHARS": "60", "MAX_ROOMS_PER_CONNECTION": "3", "JWT_SECRET": JWT_SECRET,
              "API_KEY": API_KEY}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        import playwright  # noqa: F401
    except ImportError:
        service_unavailable("Playwright is not installed (pip install -e '.[test]')")
    if chromium_path() is None:
        service_unavailable("Chromium is not installed (apt-get install chromium)")
    with launched() as chromium:
        yield chromium


@pytest.fixture(scope="module")
def web_server() -> Iterator[Server]:
    with Server(SERVER_ENV) as srv:
        yield srv


OPENED: list[ChatPage] = []  # the pages people() opened in the running test


@pytest.fixture
def people(browser: Any) -> Iterator[Callable[..., ChatPage]]:
    """Opens the page for a new person (``people(server, "alice")``); closes them all after."""
    opened = OPENED

    def person(server: Server, name: str = "", token: str = "", **kwargs: Any) -> ChatPage:
        page = ChatPage(browser, server, **kwargs)
        opened.append(page)
        page.open()
        return page.sign_in_with_token(token) if token else page.sign_in(name)

    try:
        yield person
        errors = [e for p in opened for e in p.errors]
        for p in opened:
            p.close()
        assert not errors, f"uncaught errors in the page: {errors}"
    finally:
        opened.clear()


@contextlib.contextmanager
def served(env: dict[str, str]) -> Iterator[Server]:
    """``Server(env)`` for one test. When the test is done its pages see it stop (their
    status leaves "connected"), then they close, then it finishes stopping: a page's idle
    HTTP keep-alive connection held gunicorn's stop for its ``keepalive`` (5 s a test)."""
    with Server(env) as srv:
        try:
            yield srv
        except BaseException:
            for page in OPENED:
                if page.server is srv:
                    page.close()
            raise
        pages = [p for p in OPENED if p.server is srv and not p.closed]
        if pages and srv.proc is not None and srv.proc.poll() is None:
            srv.proc.send_signal(signal.SIGTERM)  # Server.__exit__ waits for it to end
            for page in pages:
                expect(page.page.locator("#status")).not_to_have_attribute("data-state",
                                                                           "connected")
                page.close()


def expect(locator: Any, timeout: int | None = None) -> Any:
    """Playwright's ``expect``; with ``timeout`` (ms), every assertion made on it waits that long."""
    from playwright.sync_api import expect as pw_expect

    assertions = pw_expect(locator)
    if timeout is None:
        return assertions

    class Patient:
        def __getattr__(self, name: str) -> Any:
            check = getattr(assertions, name)
            return lambda *args, **kwargs: check(*args, **{"timeout": timeout, **kwargs})

    return Patient()


def texts(person: ChatPage) -> list[str]:
    return person.page.locator("#messages .msg .text").all_inner_texts()


def watch_live_regions(person: ChatPage) -> None:
    """From now on, ``window.announced`` lists the texts put into live regions (an element
    with aria-live other than "off", or role log, status or alert): what a screen reader
    would be told."""
    person.page.evaluate("""() => {
        window.announced = [];
        const live = (node) => {
          const region = (node.nodeType === 1 ? node : node.parentElement)
            ?.closest('[aria-live], [role="log"], [role="status"], [role="alert"]');
          return region && region.getAttribute('aria-live') !== 'off';
        };
        new MutationObserver((records) => {
          for (const r of records) {
            for (const node of r.type === 'characterData' ? [r.target] : r.addedNodes) {
              const text = node.textContent.trim();
              if (text && live(node)) window.announced.push(text);
            }
          }
        }).observe(document.body, { childList: true, subtree: true, characterData: true });
    }""")


def announced(person: ChatPage) -> list[str]:
    return person.page.evaluate("window.announced")


def cuttable(person: ChatPage, drop: Callable[[dict[str, Any], bool], bool] | None = None,
             alter: Callable[[dict[str, Any], bool], None] | None = None
             ) -> Callable[[bool], None]:
    """Routes ``person``'s WebSocket through the test (the page is reloaded for it) and
    returns ``down``: ``down(True)`` cuts the connection and turns away new ones until
    ``down(False)``. With ``drop``, ``drop(frame, to_server)`` sees every JSON frame (the
    page's when ``to_server``, else the server's) and one it returns true for is lost. With
    ``alter``, ``alter(frame, to_server)`` may change a JSON frame that goes on."""
    network: dict[str, Any] = {"down": False, "sockets": []}

    def passed(frame: str | bytes, to_server: bool) -> str | bytes | None:
        try:
            parsed = json.loads(frame)
        except (TypeError, ValueError):
            return frame
        if not isinstance(parsed, dict):
            return frame
        if drop is not None and drop(parsed, to_server):
            return None
        if alter is None:
            return frame
        alter(parsed, to_server)
        return json.dumps(parsed)

    def route(ws: Any) -> None:
        if network["down"]:
            ws.close(code=1001, reason="test: network down")
            return
        server = ws.connect_to_server()
        if drop is not None or alter is not None:
            def forward(to: Any, frame: str | bytes, to_server: bool) -> None:
                frame_out = passed(frame, to_server)
                if frame_out is not None:
                    to.send(frame_out)

            ws.on_message(lambda frame: forward(server, frame, True))
            server.on_message(lambda frame: forward(ws, frame, False))
        network["sockets"].append(ws)

    def down(on: bool) -> None:
        network["down"] = on
        if on:
            for ws in network["sockets"]:
                ws.close(code=1001, reason="test: network down")
            network["sockets"].clear()
            expect(person.page.locator("#status")).not_to_have_attribute("data-state", "connected")

    person.context.route_web_socket(re.compile(r"/ws(\?|$)"), route)
    person.page.reload()
    person.wait_online()
    return down


# ---- serving ------------------------------------------------------------------------------

def test_page_and_its_files_are_served(web_server: Server) -> None:
    """/ and its script, styles and the library bundle come from the package, nothing else."""
    status, page = web_server.http("/")
    assert status == 200
    for name, kind in [("app.js", b"javascript"), ("app.css", b"css"),
                       ("wschat-client.js", b"javascript")]:
        status, body = web_server.http(f"/web/{name}")
        assert status == 200 and body, name
        assert name.encode() in page or name == "wschat-client.js"
    _, script = web_server.http("/web/app.js")
    imports = re.findall(rb'^import .* from "([^"]+)";', script, re.M)
    assert imports == [b"./wschat-client.js"]
    assert not re.search(rb'(src|href)="(https?:)?//', page), "the page loads nothing from elsewhere"
    assert web_server.http("/web/../factory.py")[0] == 404
    assert web_server.http("/web/app.js", metrics=True)[0] == 404


def test_page_headers_forbid_framing_foreign_code_and_sniffing(web_server: Server) -> None:
    """The page runs only its own files, talks only to its own server, and may not be
    framed by another site (clickjacking: before, none of these headers was sent)."""
    for path in ("/", "/web/app.js"):
        with urllib.request.urlopen(f"http://127.0.0.1:{web_server.port}{path}",
                                    timeout=TIMEOUT) as response:
            headers = response.headers
        policy = headers["Content-Security-Policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy, path
        assert f"ws://127.0.0.1:{web_server.port}" in policy, path
        assert headers["X-Frame-Options"] == "DENY", path
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert headers["Referrer-Policy"] == "no-referrer", path
    request = urllib.request.Request(f"http://127.0.0.1:{web_server.port}/",
                                     headers={"Host": "evil; script-src *"})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        assert "evil" not in response.headers["Content-Security-Policy"]


# ---- two people ---------------------------------------------------------------------------

def test_two_people_chat_and_dm(web_server: Server, people: Callable[..., ChatPage]) -> None:
    """Alice and Bob chat in #general, tell their own messages apart, and DM from the member list."""
    alice = people(web_server, "alice")
    bob = people(web_server, "bob")
    alice.say("hello from alice")
    expect(alice.messages("hello from alice")).to_have_class(MINE)
    expect(alice.messages("hello from alice")).not_to_have_class(PENDING)
    theirs = bob.messages("hello from alice")
    expect(theirs).to_have_count(1)
    expect(theirs).not_to_have_class(MINE)
    expect(theirs.locator(".badge.guest")).to_be_visible()  # guests are marked
    expect(bob.page.locator("#me .badge.guest")).to_be_visible()

    bob.page.locator("#members button", has_text="alice").click()
    expect(bob.page.locator("#title")).to_have_text("alice (direct)")
    bob.say("a secret for alice")
    expect(bob.messages("a secret for alice")).to_have_class(MINE)
    conversation = alice.page.locator("#dms li", has_text="bob")
    expect(conversation.locator(".unread")).to_have_text("1")
    conversation.locator(".open").click()
    expect(alice.messages("a secret for alice")).to_have_count(1)
    expect(conversation.locator(".unread")).to_have_count(0)
    alice.say("a secret for bob")
    expect(bob.messages("a secret for bob")).to_have_count(1)

    # Several rooms: Bob joins #random; Alice's message there counts as unread for him.
    bob.page.locator("#join-room").fill("random")
    bob.page.locator("#join-room").press("Enter")
    expect(bob.page.locator("#title")).to_have_text("# random")
    alice.page.locator("#join-room").fill("random")
    alice.page.locator("#join-room").press("Enter")
    bob.open_conversation("room:general")
    alice.say("over in random")
    expect(bob.page.locator('[data-conv="room:random"] .unread')).to_have_text("1")


def test_sign_in_with_a_token(web_server: Server, people: Callable[..., ChatPage]) -> None:
    """A pasted JWT signs in under its name; such a user is not marked as a guest."""
    token = jwt.encode({"sub": "u-alice", "name": "Alice Liddell", "exp": int(time.time()) + 600},
                       JWT_SECRET, algorithm="HS256")
    alice = people(web_server, token=token)
    expect(alice.page.locator("#me")).to_have_text("Alice Liddell")
    bob = people(web_server, "bob")
    alice.say("signed in for real")
    theirs = bob.messages("signed in for real")
    expect(theirs).to_have_count(1)
    expect(theirs.locator(".badge.guest")).to_have_count(0)
    expect(bob.page.locator("#members li", has_text="Alice Liddell").locator(".badge.guest")
           ).to_have_count(0)
    expect(alice.page.locator("#members li", has_text="bob").locator(".badge.guest")).to_be_visible()
    alice.page.reload()  # the token is kept too
    alice.wait_online()
    expect(alice.page.locator("#me")).to_have_text("Alice Liddell")
    # for this tab only: never in localStorage, where it would outlive the tab
    stored = alice.page.evaluate("JSON.stringify(Object.entries(localStorage))")
    assert token not in stored


def test_a_token_in_the_address_leaves_the_address_bar(
        web_server: Server, browser: Any) -> None:
    """``?token=`` signs the tab in and is taken out of the address (and so of the
    history); a reload keeps the identity (before: the JWT stayed in the address bar
    and in localStorage)."""
    token = jwt.encode({"sub": "u-tom", "name": "Tom", "exp": int(time.time()) + 600},
                       JWT_SECRET, algorithm="HS256")
    tom = ChatPage(browser, web_server)
    try:
        tom.page.goto(f"{tom.url}?token={token}&x=1")
        tom.wait_online()
        expect(tom.page.locator("#me")).to_have_text("Tom")
        assert token not in tom.page.url and tom.page.url.endswith("?x=1")
        assert token not in tom.page.evaluate("JSON.stringify(Object.entries(localStorage))")
        tom.page.reload()
        tom.wait_online()
        expect(tom.page.locator("#me")).to_have_text("Tom")
        assert not tom.errors
    finally:
        tom.close()


# An init script: localStorage and sessionStorage throw, as where the browser keeps no site data.
BLOCK_STORAGE = """
    for (const name of ["localStorage", "sessionStorage"]) {
      Object.defineProperty(window, name, { get() {
        throw new DOMException("blocked", "SecurityError"); } });
    }"""


def test_the_page_works_where_the_browser_keeps_no_site_data(
        web_server: Server, browser: Any) -> None:
    """With localStorage and sessionStorage blocked (a browser set to keep no site data,
    a third-party frame) the page still connects and chats, its outbox in memory
    (before: it stayed on "Connecting…")."""
    blocked = ChatPage(browser, web_server)
    try:
        blocked.page.add_init_script(BLOCK_STORAGE)
        blocked.open().sign_in("nodata")
        blocked.say("no storage needed")
        expect(blocked.messages("no storage needed")).not_to_have_class(PENDING)
        assert not blocked.errors
    finally:
        blocked.close()


def test_without_site_data_a_pending_send_survives_a_new_client(
        web_server: Server, browser: Any) -> None:
    """Where the browser keeps no site data the outbox is in memory; a send not yet
    acknowledged still goes out, once, after the client is replaced (here: signing in again;
    before: the new client started with an empty outbox, and the send sat at "Sending…")."""
    network = {"drop_sends": True}

    def route(ws: Any) -> None:
        server = ws.connect_to_server()

        def from_page(frame: str | bytes) -> None:
            if not (network["drop_sends"] and '"type":"message"' in str(frame)):
                server.send(frame)

        ws.on_message(from_page)

    blocked = ChatPage(browser, web_server)
    try:
        blocked.page.add_init_script(BLOCK_STORAGE)
        blocked.context.route_web_socket(re.compile(r"/ws(\?|$)"), route)
        blocked.open().sign_in("nodata2")
        blocked.say("kept in memory")
        waiting = blocked.messages("kept in memory")
        expect(waiting).to_contain_text("Sending…")
        network["drop_sends"] = False
        blocked.page.locator("#switch-user").click()
        blocked.page.locator("#signin-go").click()  # the same name: a new ChatClient
        blocked.wait_online()
        expect(waiting).not_to_have_class(PENDING)
        expect(waiting).to_have_class(MINE)
        expect(waiting).to_have_count(1)
        with Client(web_server.url, "username=check") as check:
            check.join("general")
            history = check.request({"type": "history", "room": "general"}, "history")
        assert [m["text"] for m in history["messages"]].count("kept in memory") == 1
        assert not blocked.errors
    finally:
        blocked.close()


def test_long_names_and_wide_characters(web_server: Server,
                                        people: Callable[..., ChatPage]) -> None:
    """A 32-character guest name does not push the page sideways, and the length check
    counts characters as the server does (2,500 emoji are 5,000 UTF-16 units: before,
    the page refused them as too long; here MAX_TEXT_CHARS is 60, so 50 of them)."""
    wide = people(web_server, "W" * 32)
    other = people(web_server, "reader")
    wide.say("x")
    expect(other.messages("x").first).to_be_visible()
    for person in (wide, other):
        overflow = person.page.evaluate(
            "[...document.querySelectorAll('body *')].filter("
            "e => e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).overflowX !== 'visible'"
            " && getComputedStyle(e).overflowX !== 'clip').length"
            " + (document.documentElement.scrollWidth - document.documentElement.clientWidth)")
        assert overflow <= 0, overflow
    wide.say("😀" * 50)
    expect(other.messages("😀" * 50)).to_have_count(1)
    wide.say("y" * 61)  # the server's limit, in its own words
    expect(wide.page.locator("#messages .msg.failed")).to_contain_text("longer than 60")


def test_typing_shows_and_clears(web_server: Server, people: Callable[..., ChatPage]) -> None:
    """Bob's typing shows for Alice, and clears when he sends and when he stops typing."""
    alice = people(web_server, "alice")
    bob = people(web_server, "bob")
    # "connected" comes with the welcome; Bob's typing counts only once his join is done,
    # which Alice sees as his arrival in the room's member list.
    expect(alice.page.locator("#members li", has_text="bob")).to_be_visible()
    typing = alice.page.locator("#typing")
    bob.page.locator("#draft").press_sequentially("hel")
    expect(typing).to_have_text("bob (guest) is typing…")
    expect(alice.page.locator("#members li", has_text="bob").locator(".typing-dots")).to_be_visible()
    bob.page.locator("#draft").press("Enter")
    expect(alice.messages("hel")).not_to_have_count(0)
    expect(typing).to_have_text("")
    bob.page.locator("#draft").press_sequentially("and then nothing")
    expect(typing).to_have_text("bob (guest) is typing…")
    # The library sends typing: false after 3 s without a keystroke.
    expect(typing, timeout=int(15_000 * SCALE)).to_have_text("")


def test_name_and_own_messages_survive_a_reload(web_server: Server,
                                                people: Callable[..., ChatPage]) -> None:
    """After a reload the chosen name and the draft are kept, and earlier messages are still
    one's own (a guest's user_id is new on every connection)."""
    alice = people(web_server, "alice")
    alice.say("said before the reload")
    expect(alice.messages("said before the reload")).not_to_have_class(PENDING)
    alice.page.locator("#draft").fill("half a thought")
    alice.page.reload()
    alice.wait_online()
    expect(alice.page.locator("#signin")).not_to_be_visible()
    expect(alice.page.locator("#me")).to_contain_text("alice")
    expect(alice.messages("said before the reload")).to_have_class(MINE)
    expect(alice.page.locator("#draft")).to_have_value("half a thought")  # drafts are kept


def test_changing_the_name(web_server: Server, people: Callable[..., ChatPage]) -> None:
    """"change" switches to another name; the first name's messages are no longer one's own."""
    person = people(web_server, "first-name")
    person.say("said under my first name")
    expect(person.messages("said under my first name")).not_to_have_class(PENDING)
    person.page.locator("#switch-user").click()
    person.page.locator("#signin-name").fill("second-name")
    person.page.locator("#signin-go").click()
    expect(person.page.locator("#me")).to_contain_text("second-name")
    person.wait_online()
    expect(person.messages("said under my first name")).not_to_have_class(MINE)
    person.say("and now the second")
    expect(person.messages("and now the second")).to_have_class(MINE)


def test_name_from_the_address(web_server: Server, browser: Any) -> None:
    """?username= picks the tab's name; an invalid one asks for another instead of failing."""
    person = ChatPage(browser, web_server)
    try:
        person.page.goto(person.url + "?username=zed")
        person.wait_online()
        expect(person.page.locator("#me")).to_contain_text("zed")
        person.page.goto(person.url + "?username=no%20way!")
        expect(person.page.locator("#signin-error")).to_contain_text("cannot be a name")
    finally:
        person.close()


def test_errors_show_next_to_their_cause(web_server: Server,
                                         people: Callable[..., ChatPage]) -> None:
    """A refused join leaves the view alone; a refused message keeps its text, ready to edit."""
    alice = people(web_server, "alice")
    alice.say("still here")
    expect(alice.messages("still here")).not_to_have_class(PENDING)
    join = alice.page.locator("#join-room")
    join.fill("not a room!")
    join.press("Enter")
    expect(alice.page.locator("#join-error")).to_contain_text("Room names")
    for room in ("second", "third"):
        join.fill(room)
        join.press("Enter")
        expect(alice.page.locator("#title")).to_have_text(f"# {room}")
    join.fill("fourth")  # MAX_ROOMS_PER_CONNECTION is 3: the server refuses
    join.press("Enter")
    expect(alice.page.locator("#join-error")).to_contain_text("too many rooms")
    expect(alice.page.locator("#title")).to_have_text("# third")
    expect(alice.page.locator('[data-conv="room:fourth"]')).to_have_count(0)
    alice.open_conversation("room:general")
    expect(alice.messages("still here")).to_have_count(1)

    long_text = "x" * 70  # over the server's MAX_TEXT_CHARS (60)
    alice.say(long_text)
    refused = alice.page.locator("#messages .msg.failed")
    expect(refused).to_contain_text(long_text)
    expect(refused.locator(".error")).to_contain_text("Too long")
    refused.get_by_role("button", name="Edit").click()
    expect(alice.page.locator("#draft")).to_have_value(long_text)
    expect(refused).to_have_count(0)


def test_a_room_guests_may_not_join(people: Callable[..., ChatPage]) -> None:
    """A join the server forbids (GUEST_ROOMS) is explained next to the join box."""
    with served({**SERVER_ENV, "GUEST_ROOMS": "general"}) as srv:
        alice = people(srv, "alice")
        alice.page.locator("#join-room").fill("staff")
        alice.page.locator("#join-room").press("Enter")
        expect(alice.page.locator("#join-error")).to_contain_text("may not use this room")
        expect(alice.page.locator('[data-conv="room:staff"]')).to_have_count(0)
        expect(alice.page.locator("#title")).to_have_text("# general")


def api(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """A call of the server HTTP API (METRICS_PORT, bearer API_KEY)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.metrics_port}{path}", data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as reply:
        return json.loads(reply.read())


def test_mute_and_kick_are_explained(web_server: Server, people: Callable[..., ChatPage]) -> None:
    """A mute disables the composer with a notice, an unmute enables it; a kick marks the room."""
    alice = people(web_server, "alice")
    bob = people(web_server, "bob")
    alice_id = bob.page.locator("#members li", has_text="alice").get_attribute("data-user-id")
    assert alice_id
    api(web_server, "/api/mute", {"user_id": alice_id, "room": "general", "duration": 600})
    expect(alice.page.locator("#messages .notice", has_text="You are muted here")).to_be_visible()
    expect(alice.page.locator("#draft")).to_be_disabled()
    api(web_server, "/api/unmute", {"user_id": alice_id, "room": "general"})
    expect(alice.page.locator("#messages .notice", has_text="post here again")).to_be_visible()
    expect(alice.page.locator("#draft")).to_be_enabled()
    api(web_server, "/api/kick", {"user_id": alice_id, "room": "general"})
    expect(alice.page.locator("#messages .notice", has_text="You were removed from # general")
           ).to_be_visible()
    expect(alice.page.locator('[data-conv="room:general"]')).to_contain_text("(removed)")
    expect(alice.page.locator("#draft")).to_be_disabled()
    expect(bob.page.locator("#members li", has_text="alice")).to_have_count(0)
    alice.page.locator("#join-room").fill("general")  # joining again is allowed after a kick
    alice.page.locator("#join-room").press("Enter")
    expect(alice.page.locator("#draft")).to_be_enabled()
    expect(bob.page.locator("#members li", has_text="alice")).to_have_count(1)


def dm_after_they_left(sender: ChatPage, peer: ChatPage, name: str, text: str) -> Any:
    """``sender`` opens a DM with ``peer`` (shown as ``name``), ``peer`` leaves, and then
    ``sender`` writes ``text``: the message's entry, refused or not."""
    sender.page.locator("#members button", has_text=name).click()
    peer.close()
    expect(sender.page.locator("#members li", has_text=name)).to_have_count(0)
    sender.say(text)
    return sender.page.locator("#messages .msg", has_text=text)


def test_dm_to_someone_who_left_says_why(web_server: Server,
                                        people: Callable[..., ChatPage]) -> None:
    """A DM the server refuses (the peer went offline) stays, marked, with the reason."""
    alice = people(web_server, "alice")
    refused = dm_after_they_left(alice, people(web_server, "bob"), "bob", "are you there?")
    expect(refused).to_have_class(re.compile(r"\bfailed\b"))
    expect(refused.locator(".error")).to_contain_text("bob is not online")
    expect(alice.page.locator("#dms li", has_text="bob")).to_have_count(1)
    # Closing the conversation drops it and opens the room again.
    alice.page.get_by_role("button", name="Close the conversation with bob").click()
    expect(alice.page.locator("#dms li", has_text="bob")).to_have_count(0)
    expect(alice.page.locator('[data-conv="room:general"]')).to_have_attribute("aria-current",
                                                                             "true")


def test_history_on_join_and_older_on_scroll(web_server: Server,
                                             people: Callable[..., ChatPage]) -> None:
    """Joining shows the latest 50 messages; scrolling to the top loads the older ones."""
    with Client(web_server.url, "username=writer") as writer:
        writer.join("long")
        for i in range(1, 71):
            writer.say("long", f"line {i}")
    alice = people(web_server, "alice")
    alice.page.locator("#join-room").fill("long")
    alice.page.locator("#join-room").press("Enter")
    shown = alice.page.locator("#messages .msg")
    expect(shown).to_have_count(50)
    assert texts(alice) == [f"line {i}" for i in range(21, 71)]
    alice.page.locator("#scroller").evaluate("el => { el.scrollTop = 0; }")
    expect(shown).to_have_count(70)
    assert texts(alice) == [f"line {i}" for i in range(1, 71)]
    expect(alice.page.locator("#messages .notice", has_text="start of # long")).to_be_visible()


# ---- restarts and reloads ------------------------------------------------------------------

def test_memory_server_restart_mid_conversation(people: Callable[..., ChatPage]) -> None:
    """A restarted memory server (ids start again at 1) is detected; new messages show, no reload."""
    with served(SERVER_ENV) as srv:
        alice = people(srv, "alice")
        bob = people(srv, "bob")
        for text in ("first words", "second words", "third words"):
            alice.say(text)
        expect(bob.messages("third words")).to_have_count(1)
        alice.page.evaluate("window.notReloaded = true")
        watch_live_regions(alice)

        srv.stop()
        expect(alice.page.locator("#status")).to_contain_text("The server is restarting")
        srv.start()
        for person in (alice, bob):
            expect(person.page.locator("#status"), RECONNECT_MS).to_have_attribute(
                "data-state", "connected")
            expect(person.page.locator("#messages .notice", has_text="history began again")
                   ).to_be_visible()
        alice.say("after the restart")
        expect(bob.messages("after the restart")).to_have_count(1)
        bob.say("bob hears you")
        expect(alice.messages("bob hears you")).to_have_count(1)
        expect(alice.messages("after the restart")).to_have_class(MINE)
        assert alice.page.evaluate("window.notReloaded") is True
        heard = announced(alice)
        assert len([t for t in heard if "history began again" in t]) == 1, heard


def test_redis_server_restart_recovers_in_order(people: Callable[..., ChatPage]) -> None:
    """With Redis, messages sent while Alice's server restarted arrive in order, once, no reset."""
    url = redis_url_or_skip(8)
    env = {**SERVER_ENV, "REDIS_URL": url}
    with served(env) as srv, Server(env) as other:
        alice = people(srv, "alice")
        alice.say("before")
        expect(alice.messages("before")).not_to_have_class(PENDING)
        srv.stop()
        with Client(other.url, "username=carol") as carol:
            carol.request({"type": "join", "room": "general"}, "joined")
            for i in range(1, 6):
                carol.say("general", f"while away {i}")
        srv.start()
        expect(alice.page.locator("#status"), RECONNECT_MS).to_have_attribute(
            "data-state", "connected")
        expect(alice.messages("while away 5")).to_have_count(1)
        shown = texts(alice)
        assert shown[shown.index("before"):] == ["before"] + [f"while away {i}" for i in range(1, 6)]
        expect(alice.page.locator("#messages .notice.warn")).to_have_count(0)


def test_pending_send_survives_a_reload(web_server: Server,
                                        people: Callable[..., ChatPage]) -> None:
    """A send that got no acknowledgement stays pending (the outbox) across a reload, then
    goes out once. The network between Alice's tab and the server drops her sends until
    the test lets them through (Playwright's WebSocket routing)."""
    alice = people(web_server, "alice")
    bob = people(web_server, "bob")
    alice.say("hi bob")
    expect(bob.messages("hi bob")).to_have_count(1)

    network = {"drop_sends": True, "sockets": []}

    def route(ws: Any) -> None:
        server = ws.connect_to_server()
        network["sockets"].append(ws)

        def from_page(frame: str | bytes) -> None:
            if network["drop_sends"] and '"type":"message"' in str(frame):
                return
            server.send(frame)

        ws.on_message(from_page)

    alice.context.route_web_socket(re.compile(r"/ws(\?|$)"), route)
    alice.page.reload()  # from now on through the route
    alice.wait_online()
    alice.say("kept in the outbox")
    waiting = alice.messages("kept in the outbox")
    expect(waiting).to_have_class(PENDING)
    alice.page.reload()
    alice.wait_online()
    expect(waiting).to_have_class(PENDING)  # restored from sessionStorage, sent, dropped again
    expect(waiting).to_contain_text("Sending…")

    network["drop_sends"] = False
    for ws in network["sockets"]:
        ws.close(code=1001, reason="test: network back")
    expect(waiting, RECONNECT_MS).not_to_have_class(PENDING)
    expect(waiting).to_have_class(MINE)
    expect(waiting).to_have_count(1)
    expect(bob.messages("kept in the outbox")).to_have_count(1)
    with Client(web_server.url, "username=check") as check:
        check.request({"type": "join", "room": "general"}, "joined")
        history = check.request({"type": "history", "room": "general"}, "history")
    assert [m["text"] for m in history["messages"]].count("kept in the outbox") == 1


def test_the_reconnect_countdown_is_shown_but_said_once(
        web_server: Server, people: Callable[..., ChatPage]) -> None:
    """While the page waits to reconnect, #status counts the seconds down, but a screen
    reader is told why once, not each second (before: #status, a live region, was
    rewritten every second, and every second was announced)."""
    alice = people(web_server, "alice")
    sockets: list[Any] = []

    def route(ws: Any) -> None:
        ws.connect_to_server()
        sockets.append(ws)

    alice.context.route_web_socket(re.compile(r"/ws(\?|$)"), route)
    alice.page.reload()  # from now on through the route
    alice.wait_online()
    watch_live_regions(alice)
    sockets[-1].close(code=4102, reason="test: too many")  # the page waits 5 s and more
    status = alice.page.locator("#status")
    shown: list[str] = []
    deadline = time.monotonic() + RECONNECT_MS / 1000
    while status.get_attribute("data-state") != "connected" and time.monotonic() < deadline:
        text = status.inner_text()
        if not shown or shown[-1] != text:
            shown.append(text)
        time.sleep(0.1)
    alice.wait_online()
    counted = [t for t in shown if re.search(r"reconnecting in \d+ s", t)]
    assert len(counted) >= 3, f"the countdown is not shown: {shown}"
    assert all(t.startswith("Too many messages at once") for t in counted), shown
    heard = announced(alice)
    assert [t for t in heard if re.search(r"\d+ s", t)] == [], f"the seconds were announced: {heard}"
    assert len([t for t in heard if "Too many messages at once" in t]) == 1, heard


def test_phone_width(web_server: Server, people: Callable[..., ChatPage]) -> None:
    """At phone width the sidebar is a menu; the chat still works."""
    from browser import PHONE

    alice = people(web_server, "alice", viewport=PHONE)
    sidebar = alice.page.locator("#sidebar")
    expect(sidebar).not_to_be_in_viewport()
    alice.page.locator("#menu").click()
    expect(sidebar).to_be_in_viewport()
    alice.open_conversation("room:general")
    expect(sidebar).not_to_be_in_viewport()
    alice.say("from a phone")
    expect(alice.messages("from a phone")).not_to_have_class(PENDING)
    width = alice.page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, "no sideways scrolling on a phone"


# ---- a steady view: incremental rendering, keyboard, rate limits, refused sends -------------

def token_for(sub: str, name: str) -> str:
    return jwt.encode({"sub": sub, "name": name, "exp": int(time.time()) + 600},
                      JWT_SECRET, algorithm="HS256")


def join_room(person: ChatPage, room: str) -> None:
    person.page.locator("#join-room").fill(room)
    person.page.locator("#join-room").press("Enter")
    expect(person.page.locator("#title")).to_have_text(f"# {room}")


def test_focus_stays_put_while_events_arrive(web_server: Server,
                                             people: Callable[..., ChatPage]) -> None:
    """A focused sidebar button, leave "×" or member name keeps the focus while messages,
    unread counts and presence change around it (before: every event rebuilt the lists,
    and the focus fell back to the page)."""
    alice = people(web_server, "alice")
    bob = people(web_server, "bob")
    for person in (alice, bob):
        join_room(person, "random")
    expect(alice.page.locator("#members li", has_text="bob")).to_be_visible()
    targets = {"the open room's leave button": alice.page.locator('[data-conv="room:random"] .leave'),
               "another room's button": alice.page.locator('[data-conv="room:general"] > .open'),
               "a member's name": alice.page.locator("#members li", has_text="bob").locator("button")}
    for i, (target, locator) in enumerate(targets.items()):
        locator.focus()
        alice.page.evaluate("window.focusedBefore = document.activeElement")
        bob.say(f"here {i}")  # into the room Alice looks at
        expect(alice.messages(f"here {i}")).to_have_count(1)
        bob.open_conversation("room:general")
        bob.say(f"there {i}")  # an unread count changes in Alice's sidebar
        expect(alice.page.locator('[data-conv="room:general"] .unread')).to_have_text(str(i + 1))
        bob.open_conversation("room:random")
        with Client(web_server.url, f"username=visitor{i}") as visitor:  # presence, both ways
            visitor.join("random")
            expect(alice.page.locator("#members li", has_text=f"visitor{i}")).to_have_count(1)
        expect(alice.page.locator("#members li", has_text=f"visitor{i}")).to_have_count(0)
        kept = alice.page.evaluate("document.activeElement === window.focusedBefore")
        assert kept, f"the focus left {target}"


def test_new_messages_leave_the_shown_ones_alone(web_server: Server,
                                                 people: Callable[..., ChatPage]) -> None:
    """Arriving messages are appended: the nodes already shown stay the same nodes, none is
    removed (so aria-live announces only the new ones), an acknowledged send updates its own
    node, and a reader scrolled up stays where they are (before: the whole list was rebuilt)."""
    with Client(web_server.url, "username=writer") as writer:
        writer.join("steady")
        for i in range(1, 41):
            writer.say("steady", f"old line {i}")
        alice = people(web_server, "alice")
        join_room(alice, "steady")
        expect(alice.page.locator("#messages .msg")).to_have_count(40)
        alice.page.evaluate("""() => {
            window.firstShown = document.querySelector('#messages .msg');
            window.changes = { added: 0, removed: 0 };
            new MutationObserver((records) => {
              for (const r of records) {
                window.changes.added += r.addedNodes.length;
                window.changes.removed += r.removedNodes.length;
              }
            }).observe(document.getElementById('messages'), { childList: true });
        }""")
        for i in range(1, 4):
            writer.say("steady", f"new line {i}")
        expect(alice.messages("new line 3")).to_have_count(1)
        alice.say("my own line")
        expect(alice.messages("my own line")).not_to_have_class(PENDING)
        same = alice.page.evaluate(
            "window.firstShown.isConnected && window.firstShown === "
            "document.querySelector('#messages .msg')")
        assert same, "the first message's node was replaced"
        assert alice.page.evaluate("window.changes") == {"added": 4, "removed": 0}

        scroller = alice.page.locator("#scroller")
        at_bottom = "el => el.scrollHeight - el.scrollTop - el.clientHeight < 2"
        assert scroller.evaluate(at_bottom), "the view follows the newest message"
        scroller.evaluate("el => { el.scrollTop = el.scrollHeight / 2; }")
        before = scroller.evaluate("el => el.scrollTop")
        writer.say("steady", "while reading")
        expect(alice.messages("while reading")).to_have_count(1)
        assert scroller.evaluate("el => el.scrollTop") == before, "a reader scrolled up stays put"
        scroller.evaluate("el => { el.scrollTop = el.scrollHeight; }")
        writer.say("steady", "at the bottom")
        expect(alice.messages("at the bottom")).to_be_in_viewport()
        assert scroller.evaluate(at_bottom), "a reader at the bottom stays at the bottom"


def test_opening_a_conversation_announces_only_what_arrives(
        web_server: Server, people: Callable[..., ChatPage]) -> None:
    """Joining a room, switching rooms, opening a DM and loading older messages put nothing
    old in a live region (nor a refused send's reason again); a message that arrives in the
    open conversation is announced, and so is a send refused there (before: #messages was
    the live region, so each switch read out the whole conversation)."""
    with Client(web_server.url, "username=writer") as writer:
        writer.join("archive")
        for i in range(1, 56):
            writer.say("archive", f"archived {i}")
        alice = people(web_server, "alice")
        writer.send({"type": "dm", "to": alice.page.locator("#members li.self").get_attribute(
            "data-user-id"), "text": "archived dm"})
        expect(alice.page.locator("#dms li", has_text="writer").locator(".unread")).to_have_text("1")
        alice.say("z" * 70)  # over MAX_TEXT_CHARS: refused, shown with its reason in #general
        expect(alice.page.locator("#messages .msg.failed")).to_have_count(1)
        watch_live_regions(alice)
        join_room(alice, "archive")
        expect(alice.messages("archived 55")).to_have_count(1)
        alice.page.locator("#scroller").evaluate("el => { el.scrollTop = 0; }")
        expect(alice.page.locator("#messages .msg")).to_have_count(55)  # the older ones
        alice.open_conversation("room:general")
        alice.page.locator("#dms li", has_text="writer").locator(".open").click()
        expect(alice.messages("archived dm")).to_have_count(1)
        alice.open_conversation("room:archive")
        expect(alice.messages("archived 55")).to_have_count(1)
        writer.say("archive", "fresh news")
        expect(alice.messages("fresh news")).to_have_count(1)
        expect(alice.page.locator("#messages .msg")).to_have_count(56)
        heard = announced(alice)
        old = [t for t in heard if "archived" in t or "Too long" in t]
        assert not old, f"{len(old)} old messages announced, such as {old[:3]}"
        assert [t for t in heard if "fresh news" in t], f"the new message was not announced: {heard}"
        alice.say("y" * 70)  # refused now: that is said
        expect(alice.page.locator("#messages .msg.failed")).to_have_count(1)
        assert [t for t in announced(alice) if "Too long" in t], announced(alice)


def seen_before_the_cut(person: ChatPage, writer: Client, room: str) -> None:
    """``writer`` joins ``room`` and posts "before the cut", which ``person``'s page shows;
    what its live regions say is recorded from here (``announced``)."""
    writer.join(room)
    writer.say(room, "before the cut")
    expect(person.messages("before the cut")).to_have_count(1)
    watch_live_regions(person)


def written_while_cut(down: Callable[[bool], None], writer: Client, room: str,
                      count: int) -> None:
    """``writer`` posts "while away 1".."while away ``count``" to ``room`` while the page
    is cut off (``cuttable``'s ``down``), then the page may connect again."""
    down(True)
    for i in range(1, count + 1):
        writer.say(room, f"while away {i}")
    down(False)


def test_missed_messages_are_said_once(people: Callable[..., ChatPage]) -> None:
    """When the server no longer has all that was missed during an outage, the page shows
    the latest and says why, once (before: the notice was shown but not said)."""
    with served({**SERVER_ENV, "HISTORY_SIZE": "5"}) as srv:
        alice = people(srv, "alice")
        down = cuttable(alice)
        expect(alice.page.locator("#messages .notice", has_text="start of # general")).to_be_visible()
        with Client(srv.url, "username=writer") as writer:
            seen_before_the_cut(alice, writer, "general")
            written_while_cut(down, writer, "general", 10)  # more than the server keeps
            expect(alice.page.locator("#messages .notice", has_text="Some messages were missed"),
                   RECONNECT_MS).to_be_visible()
            expect(alice.messages("while away 10")).to_have_count(1)
        heard = announced(alice)
        assert len([t for t in heard if "Some messages were missed" in t]) == 1, heard
        assert not [t for t in heard if "while away" in t], f"the replay was read out: {heard}"


@pytest.mark.parametrize("lost", ["request", "reply"])
def test_a_cut_before_the_first_history_comes_hides_no_gap(
        people: Callable[..., ChatPage], lost: str) -> None:
    """The connection goes right after joining a room, before its history came (the page's
    request, or the server's reply, is lost with it); meanwhile more is posted than the
    server keeps. Back online the page shows what the server still holds, in order, once,
    and says that some messages were missed (before: the room counted as not loaded, the
    rejoin only reloaded the history, and the gap went unsaid)."""
    with served({**SERVER_ENV, "HISTORY_SIZE": "5"}) as srv:
        alice = people(srv, "alice")
        lost_frames: list[dict[str, Any]] = []

        def drop(frame: dict[str, Any], to_server: bool) -> bool:
            first = (frame.get("type") == "history" and frame.get("room") == "fresh"
                     and to_server == (lost == "request") and not lost_frames)
            if first:
                lost_frames.append(frame)
            return first

        down = cuttable(alice, drop)
        with Client(srv.url, "username=writer") as writer:
            writer.join("fresh")
            writer.say("fresh", "before alice came")
            join_room(alice, "fresh")
            writer.say("fresh", "seen live")  # reaches Alice, her history does not
            expect(alice.messages("seen live")).to_have_count(1)
            assert len(lost_frames) == 1, lost_frames
            expect(alice.messages("before alice came")).to_have_count(0)
            watch_live_regions(alice)
            written_while_cut(down, writer, "fresh", 10)  # more than the server keeps
            expect(alice.page.locator("#status"), RECONNECT_MS).to_have_attribute(
                "data-state", "connected")
            expect(alice.messages("while away 10")).to_have_count(1)
            missed = alice.page.locator("#messages .notice", has_text="Some messages were missed")
            expect(missed).to_be_visible()
            writer.say("fresh", "back live")
            expect(alice.messages("back live")).to_have_count(1)
        assert texts(alice) == [f"while away {i}" for i in range(6, 11)] + ["back live"]
        heard = announced(alice)
        assert len([t for t in heard if "Some messages were missed" in t]) == 1, heard
        assert not [t for t in heard if "could not be loaded" in t], heard
        assert [t for t in heard if "back live" in t], heard


def lose_first_history(room: str, to_server: bool, lost: list[dict[str, Any]]
                       ) -> Callable[[dict[str, Any], bool], bool]:
    """A ``drop`` for ``cuttable``: loses the first history frame of ``room`` (the page's
    request if ``to_server``, else the server's reply) and keeps it in ``lost``."""
    def drop(frame: dict[str, Any], going_to_server: bool) -> bool:
        first = (frame.get("type") == "history" and frame.get("room") == room
                 and going_to_server == to_server and not lost)
        if first:
            lost.append(frame)
        return first
    return drop


def first_items(person: ChatPage, n: int) -> list[str]:
    """The texts of the first ``n`` entries of the message list (notices included)."""
    return person.page.locator("#messages > li").all_inner_texts()[:n]


def test_the_start_is_shown_only_where_the_room_starts(people: Callable[..., ChatPage]) -> None:
    """"This is the start of # room." heads the list only when its first message (id 1) is
    there. A server that keeps only HISTORY_SIZE messages answers a page of 50 with fewer
    although older ones were written: the list then says they are no longer kept (before:
    it said "This is the start", also above "Some messages were missed…" after a
    `recovered: false` reload)."""
    with served({**SERVER_ENV, "HISTORY_SIZE": "5"}) as srv:
        alice = people(srv, "alice")
        down = cuttable(alice)
        start = alice.page.locator("#messages .notice", has_text="This is the start")
        gone = alice.page.locator("#messages .notice", has_text="Older messages are no longer kept")
        with Client(srv.url, "username=writer") as writer:
            for room, count in (("short", 3), ("trimmed", 8)):
                writer.join(room)
                for i in range(1, count + 1):
                    writer.say(room, f"{room} {i}")
            join_room(alice, "trimmed")
            expect(alice.messages("trimmed 8")).to_have_count(1)
            assert texts(alice) == [f"trimmed {i}" for i in range(4, 9)]
            expect(gone).to_have_count(1)
            expect(start).to_have_count(0)
            assert first_items(alice, 1) == ["Older messages are no longer kept."]

            join_room(alice, "short")
            expect(alice.messages("short 3")).to_have_count(1)
            expect(start).to_have_count(1)
            expect(gone).to_have_count(0)
            assert first_items(alice, 1) == ["This is the start of # short."]

            written_while_cut(down, writer, "short", 10)  # more than the server keeps
            expect(alice.page.locator("#messages .notice", has_text="Some messages were missed"),
                   RECONNECT_MS).to_be_visible()
            expect(alice.messages("while away 10")).to_have_count(1)
            assert texts(alice) == [f"while away {i}" for i in range(6, 11)]
            expect(gone).to_have_count(1)
            expect(start).to_have_count(0)
            assert first_items(alice, 2) == [
                "Older messages are no longer kept.",
                "Some messages were missed while you were away; showing the latest."]


def test_a_room_whose_history_expired_while_away_is_no_server_restart(
        people: Callable[..., ChatPage]) -> None:
    """Alice is cut off; a message is written to a room, and the room stays empty longer
    than ROOM_TTL: its history expires, its ids go on (ROOM_NUMBERING_TTL). Back, her rejoin
    gets `recovered: false` with a last_id above hers and history holds nothing: the room
    says some messages were missed, that older ones are no longer kept, and goes on (before:
    the empty history was taken for a server that lost its ids, every room said "The server
    restarted and lost earlier messages" and the client was replaced; then the room said it
    started at its next message)."""
    with served({**SERVER_ENV, "ROOM_TTL": "1"}) as srv:
        alice = people(srv, "alice")
        down = cuttable(alice)
        with Client(srv.url, "username=writer") as writer:
            writer.join("quiet")
            join_room(alice, "quiet")
            writer.say("quiet", "before")
            expect(alice.messages("before")).to_have_count(1)
            watch_live_regions(alice)
            down(True)
            writer.say("quiet", "while away")
        time.sleep(1.5)  # ROOM_TTL must pass with the room empty: time, not an event
        with Client(srv.url, "username=carl") as carl:
            carl.join("elsewhere")  # the memory store drops expired rooms when next used
        down(False)
        expect(alice.page.locator("#status"), RECONNECT_MS).to_have_attribute(
            "data-state", "connected")
        missed = alice.page.locator("#messages .notice", has_text="Some messages were missed")
        expect(missed).to_be_visible()
        with Client(srv.url, "username=writer") as writer:
            writer.join("quiet")
            writer.say("quiet", "back live")
            expect(alice.messages("back live")).to_have_count(1)
        assert texts(alice) == ["back live"]
        # Its first messages went with the history: no "This is the start of # quiet."
        assert first_items(alice, 2) == [
            "Older messages are no longer kept.",
            "Some messages were missed while you were away; showing the latest."]
        began = alice.page.locator("#messages .notice", has_text="history began again")
        expect(began).to_have_count(0)
        assert not [t for t in announced(alice) if "began again" in t], announced(alice)


def test_a_numbering_begun_again_while_away_resets_the_room_by_its_epoch(
        people: Callable[..., ChatPage]) -> None:
    """Alice holds no message at her last id (the room's history expired while it was empty,
    its ids going on). She is cut off while the memory server restarts and a writer posts
    five messages in the new numbering, past her last id. Back, her rejoin names the old
    epoch: the room starts again from the new numbering's history and says that its history
    began again on the server (before: the rejoin, with no epoch, was answered recovered:
    true with the new 4 and 5 as what followed her 3; the history probe had no message of
    hers at 3 to compare, so the room showed them alone, the new 1 to 3 missing,
    unannounced)."""
    with served({**SERVER_ENV, "ROOM_TTL": "1"}) as srv:
        with Client(srv.url, "username=writer") as writer:
            writer.join("quiet")
            for i in range(1, 4):
                writer.say("quiet", f"old {i}")
        time.sleep(1.5)  # ROOM_TTL must pass with the room empty: time, not an event
        with Client(srv.url, "username=carl") as carl:
            carl.join("elsewhere")  # the memory store drops expired rooms when next used
        alice = people(srv, "alice")
        down = cuttable(alice)
        join_room(alice, "quiet")
        expect(alice.page.locator("#messages .notice", has_text="no longer kept")).to_be_visible()
        assert texts(alice) == []
        alice.page.evaluate("window.notReloaded = true")
        watch_live_regions(alice)
        down(True)
        srv.stop()
        srv.start()
        with Client(srv.url, "username=writer") as writer:
            writer.join("quiet")
            for i in range(1, 6):
                writer.say("quiet", f"new {i}")
            down(False)
            expect(alice.page.locator("#status"), RECONNECT_MS).to_have_attribute(
                "data-state", "connected")
            began = alice.page.locator("#messages .notice", has_text="history began again")
            expect(began).to_be_visible()
            expect(alice.messages("new 1")).to_have_count(1)
            expect(alice.messages("new 5")).to_have_count(1)
            writer.say("quiet", "live")
            expect(alice.messages("live")).to_have_count(1)
        assert texts(alice) == [f"new {i}" for i in range(1, 6)] + ["live"]
        assert alice.page.evaluate("window.notReloaded") is True
        heard = announced(alice)
        assert len([t for t in heard if "history began again" in t]) == 1, heard


def until(person: ChatPage, done: Callable[[], bool], what: str) -> None:
    """Waits for ``done()`` (what a ``cuttable`` route saw): its callbacks run only while
    Playwright waits, so this is a bounded poll."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while not done():
        assert time.monotonic() < deadline, f"never: {what}"
        person.page.wait_for_timeout(20)


def numbering_retired_while_cut(down: Callable[[bool], None], srv: Server, room: str,
                                new: int) -> None:
    """Cuts the page off while ``room`` (no one else in it) stays empty past
    ROOM_NUMBERING_TTL, without the server restarting: its ids retire. A writer then posts
    "new 1".."new ``new``", numbered from 1 under another epoch; the page may connect again."""
    down(True)
    time.sleep(1.5)  # ROOM_NUMBERING_TTL must pass with the room empty: time, not an event
    with Client(srv.url, "username=carl") as carl:
        carl.join("elsewhere")  # the memory store drops expired rooms when next used
    with Client(srv.url, "username=writer") as writer:
        writer.join(room)
        ids = [writer.say(room, f"new {i}")["id"] for i in range(1, new + 1)]
    assert ids == list(range(1, new + 1)), ids  # numbered from 1 again
    down(False)


def test_a_numbering_retired_while_away_is_not_called_a_server_restart(
        people: Callable[..., ChatPage]) -> None:
    """Alice is cut off and the room stays empty past ROOM_NUMBERING_TTL: its ids start
    again from 1 under another epoch, the server never restarted. Back, the room starts
    again from the new numbering and says what the page knows, that the room's history
    began again on the server (before: "The server restarted and lost earlier messages")."""
    with served({**SERVER_ENV, "ROOM_TTL": "1", "ROOM_NUMBERING_TTL": "1"}) as srv:
        alice = people(srv, "alice")
        down = cuttable(alice)
        join_room(alice, "quiet")
        with Client(srv.url, "username=writer") as writer:
            writer.join("quiet")
            for i in range(1, 4):
                writer.say("quiet", f"old {i}")
            expect(alice.messages("old 3")).to_have_count(1)
        watch_live_regions(alice)
        numbering_retired_while_cut(down, srv, "quiet", 2)
        expect(alice.page.locator("#status"), RECONNECT_MS).to_have_attribute(
            "data-state", "connected")
        began = alice.page.locator("#messages .notice", has_text="history began again")
        expect(began).to_be_visible()
        expect(alice.messages("new 2")).to_have_count(1)
        assert texts(alice) == ["new 1", "new 2"]
        notices = alice.page.locator("#messages .notice").all_inner_texts()
        assert not [t for t in notices if "restarted" in t], notices
        heard = announced(alice)
        assert not [t for t in heard if "restarted" in t], heard
        assert len([t for t in heard if "history began again" in t]) == 1, heard


def test_ids_begun_again_on_a_server_without_epochs_are_not_called_a_restart(
        people: Callable[..., ChatPage]) -> None:
    """A server of the release before names no `epoch` (its `joined` frames lose it here).
    When its ids start again (a memory server restarted), the page finds it by ids (the
    rejoin's last_id is below the one it holds in # general), resets every room and starts a
    new client. # general says its history began again; # other, where nothing told, says it
    was reloaded because # general's did (before: both said "The server restarted and lost
    earlier messages", which the page could not know)."""
    def no_epoch(frame: dict[str, Any], to_server: bool) -> None:
        if not to_server and frame.get("type") == "joined":
            frame.pop("epoch", None)

    with served(SERVER_ENV) as srv:
        alice = people(srv, "alice")
        down = cuttable(alice, alter=no_epoch)
        for text in ("first words", "second words", "third words"):
            alice.say(text)
        expect(alice.messages("third words")).not_to_have_class(PENDING)
        join_room(alice, "other")  # empty: nothing there to tell by
        down(True)
        srv.stop()
        srv.start()
        down(False)
        expect(alice.page.locator("#status"), RECONNECT_MS).to_have_attribute(
            "data-state", "connected")
        reloaded = alice.page.locator(
            "#messages .notice", has_text="the history of # general began again there")
        expect(reloaded).to_be_visible()
        alice.open_conversation("room:general")
        began = alice.page.locator("#messages .notice", has_text="history began again on the")
        expect(began).to_be_visible()
        expect(alice.messages("first words")).to_have_count(0)
        alice.say("after it began again")
        expect(alice.messages("after it began again")).not_to_have_class(PENDING)
        for room in ("general", "other"):
            alice.open_conversation(f"room:{room}")
            notices = alice.page.locator("#messages .notice").all_inner_texts()
            assert not [t for t in notices if "restarted" in t], (room, notices)


def test_a_history_check_answered_after_the_numbering_began_again_is_dropped(
        people: Callable[..., ChatPage]) -> None:
    """Back from a cut in which more was written than the server keeps, Alice's rejoin gets
    `recovered: false` and the page checks the room's history (checkRejoin). The check is
    lost with the next cut, in which the room stays empty past ROOM_NUMBERING_TTL: its ids
    start again. The library sends the check again on the new connection, after the rejoin
    that reset the room to the new numbering (another epoch): its answer, for the view
    before the reset, is dropped, and the room goes on saying that its history began again
    (before: the check went on with the old numbering's `since` and replaced that notice
    with "Some messages were missed…")."""
    env = {**SERVER_ENV, "HISTORY_SIZE": "5", "ROOM_TTL": "1", "ROOM_NUMBERING_TTL": "1"}
    with served(env) as srv:
        alice = people(srv, "alice")
        frames: dict[str, Any] = {"armed": False, "check": None, "resent": False,
                                  "loads": [], "answered": set()}

        def drop(frame: dict[str, Any], to_server: bool) -> bool:
            if not to_server:
                frames["answered"].add(frame.get("id"))
                return False
            if frame.get("type") != "history" or frame.get("room") != "quiet":
                return False
            if frame.get("before") is None:
                if frames["resent"]:
                    frames["loads"].append(frame.get("id"))
                return False
            if frames["armed"] and frames["check"] is None:
                frames["check"] = frame  # lost with the connection: sent again after it
                return True
            if frames["check"] is not None and frame.get("id") == frames["check"].get("id"):
                frames["resent"] = True
            return False

        down = cuttable(alice, drop)
        join_room(alice, "quiet")
        with Client(srv.url, "username=writer") as writer:
            seen_before_the_cut(alice, writer, "quiet")
            frames["armed"] = True
            written_while_cut(down, writer, "quiet", 10)  # more than the server keeps
            expect(alice.page.locator("#status"), RECONNECT_MS).to_have_attribute(
                "data-state", "connected")
            until(alice, lambda: frames["check"] is not None, "the rejoin's history check")
        # The library's requests time out after 10 s: the next connection must come before.
        numbering_retired_while_cut(down, srv, "quiet", 3)
        expect(alice.page.locator("#status"), RECONNECT_MS).to_have_attribute(
            "data-state", "connected")
        began = alice.page.locator("#messages .notice", has_text="history began again")
        expect(began).to_be_visible()
        until(alice, lambda: frames["resent"], "the check sent again")
        # The reset's history load, then the check's page of the latest, both answered:
        until(alice, lambda: len(frames["loads"]) >= 2
              and all(i in frames["answered"] for i in frames["loads"][:2]),
              "the history loads after the reset answered")
        with Client(srv.url, "username=writer") as writer:
            writer.join("quiet")
            writer.say("quiet", "after the check")  # reaches the page after those answers
        expect(alice.messages("after the check")).to_have_count(1)
        expect(began).to_be_visible()
        missed = alice.page.locator("#messages .notice", has_text="Some messages were missed")
        expect(missed).to_have_count(0)
        assert texts(alice) == ["new 1", "new 2", "new 3", "after the check"]


def test_older_messages_answered_after_the_numbering_began_again_are_dropped(
        people: Callable[..., ChatPage]) -> None:
    """Alice asks for the messages before the 50 shown ("Load older messages"); the request
    is lost with a cut, in which the room stays empty past ROOM_NUMBERING_TTL and then
    gets 70 messages numbered from 1 again. Back, the rejoin resets the room to the new
    numbering's latest 50 (new 21 to 70); the library sends the old request again, `before`
    the old numbering's oldest (11): its answer, new 1 to 10, is dropped (before: it was
    shown above new 21, the 11 to 20 between them missing, under "This is the start")."""
    env = {**SERVER_ENV, "ROOM_TTL": "1", "ROOM_NUMBERING_TTL": "1"}
    with served(env) as srv:
        alice = people(srv, "alice")
        frames: dict[str, Any] = {"armed": False, "older": None, "resent": False,
                                  "answered": set()}

        def drop(frame: dict[str, Any], to_server: bool) -> bool:
            if not to_server:
                frames["answered"].add(frame.get("id"))
                return False
            if not (frame.get("type") == "history"
                    and frame.get("before") is not None):
                return False
            if frames["armed"] and frames["older"] is None:
                frames["older"] = frame  # lost with the connection: sent again after it
                return True
            if frames["older"] is not None and frame.get("id") == frames["older"].get("id"):
                frames["resent"] = True
            return False

        down = cuttable(alice, drop)
        with Client(srv.url, "username=writer") as writer:
            writer.join("quiet")
            for i in range(1, 61):
                writer.say("quiet", f"old {i}")
        join_room(alice, "quiet")
        expect(alice.messages("old 60")).to_have_count(1)
        assert len(texts(alice)) == 50
        frames["armed"] = True
        alice.page.locator("#load-older").click()
        until(alice, lambda: frames["older"] is not None, "the request for older messages")
        # The library's requests time out after 10 s: the next connection must come before.
        numbering_retired_while_cut(down, srv, "quiet", 70)
        expect(alice.page.locator("#status"), RECONNECT_MS).to_have_attribute(
            "data-state", "connected")
        expect(alice.page.locator("#messages .notice", has_text="history began again")
               ).to_be_visible()
        expect(alice.messages("new 70")).to_have_count(1)
        until(alice, lambda: frames["resent"] and frames["older"]["id"] in frames["answered"],
              "the request for older messages sent again, and answered")
        with Client(srv.url, "username=writer") as writer:
            writer.join("quiet")
            writer.say("quiet", "after the answer")  # reaches the page after that answer
        expect(alice.messages("after the answer")).to_have_count(1)
        assert texts(alice) == [f"new {i}" for i in range(21, 71)] + ["after the answer"]
        expect(alice.page.locator("#messages .notice", has_text="This is the start")
               ).to_have_count(0)
        expect(alice.page.locator("#load-older")).to_be_visible()


@pytest.mark.parametrize("away", [3, 10])
def test_a_cut_before_an_empty_room_s_first_history_comes(
        people: Callable[..., ChatPage], away: int) -> None:
    """Alice joins an empty room (`joined` last_id 0: the library rejoins with `since` 0)
    and the connection goes before the history reply comes. Messages are written meanwhile:
    fewer than the server keeps (3: `recovered: true`, all replayed) or more (10:
    `recovered: false`). Back online the page shows what the server holds, in order, once,
    and says that some were missed only when some were."""
    with served({**SERVER_ENV, "HISTORY_SIZE": "5"}) as srv:
        alice = people(srv, "alice")
        lost: list[dict[str, Any]] = []
        down = cuttable(alice, lose_first_history("empty", False, lost))
        join_room(alice, "empty")
        for _ in range(200):
            if lost:
                break
            alice.page.wait_for_timeout(25)
        assert len(lost) == 1 and lost[0]["messages"] == [], lost
        watch_live_regions(alice)
        down(True)
        with Client(srv.url, "username=writer") as writer:
            writer.join("empty")
            for i in range(1, away + 1):
                writer.say("empty", f"while away {i}")
            down(False)
            expect(alice.page.locator("#status"), RECONNECT_MS).to_have_attribute(
                "data-state", "connected")
            expect(alice.messages(f"while away {away}")).to_have_count(1)
            missed = alice.page.locator("#messages .notice", has_text="Some messages were missed")
            if away > 5:
                expect(missed).to_be_visible()
            writer.say("empty", "back live")
            expect(alice.messages("back live")).to_have_count(1)
        kept = range(max(1, away - 4), away + 1)
        assert texts(alice) == [f"while away {i}" for i in kept] + ["back live"]
        heard = announced(alice)
        assert len([t for t in heard if "Some messages were missed" in t]) == (away > 5), heard
        assert not [t for t in heard if "could not be loaded" in t], heard
        expect(missed).to_have_count(int(away > 5))
        start = alice.page.locator("#messages .notice", has_text="This is the start")
        gone = alice.page.locator("#messages .notice", has_text="Older messages are no longer kept")
        expect(start).to_have_count(int(away <= 5))
        expect(gone).to_have_count(int(away > 5))


@pytest.mark.parametrize("away", [3, 10])
def test_a_first_history_load_that_timed_out_in_a_long_cut(
        people: Callable[..., ChatPage], away: int) -> None:
    """Alice's first history request for a room is lost, then the connection goes for
    longer than the library's request timeout (the page keeps its default, 10 s): the page
    says "History could not be loaded". Back online it loads the history, and the notice
    goes (before: it stayed above the loaded history when the rejoin said
    `recovered: true`); with more missed than the server keeps (`recovered: false`) it shows
    the latest and says some were missed."""
    with served({**SERVER_ENV, "HISTORY_SIZE": "5"}) as srv:
        alice = people(srv, "alice")
        lost: list[dict[str, Any]] = []
        down = cuttable(alice, lose_first_history("slow", True, lost))
        failed = alice.page.locator("#messages .notice", has_text="History could not be loaded")
        with Client(srv.url, "username=writer") as writer:
            writer.join("slow")
            writer.say("slow", "before alice came")
            join_room(alice, "slow")
            writer.say("slow", "seen live")
            expect(alice.messages("seen live")).to_have_count(1)
            assert len(lost) == 1, lost
            down(True)
            expect(failed, int(20_000 * SCALE)).to_contain_text("No answer from the server in time")
            for i in range(1, away + 1):
                writer.say("slow", f"while away {i}")
            down(False)
            expect(alice.page.locator("#status"), RECONNECT_MS).to_have_attribute(
                "data-state", "connected")
            expect(alice.messages(f"while away {away}")).to_have_count(1)
            if away > 5:  # the server keeps 5: some are gone
                expect(alice.page.locator("#messages .notice", has_text="Some messages were missed")
                       ).to_be_visible()
            else:
                expect(alice.messages("before alice came")).to_have_count(1)
            writer.say("slow", "back live")
            expect(alice.messages("back live")).to_have_count(1)
        expect(failed).to_have_count(0)
        written = ["before alice came", "seen live", *(f"while away {i}" for i in range(1, away + 1))]
        assert texts(alice) == (written[-5:] if away > 5 else written) + ["back live"]


def tab_to(person: ChatPage, target: Any, start: str = "#join-room", most: int = 40) -> None:
    """Focuses ``start``, then presses Tab until ``target`` has the focus (fails after ``most``)."""
    person.page.locator(start).focus()
    for _ in range(most):
        person.page.keyboard.press("Tab")
        if target.evaluate("el => el === document.activeElement"):
            return
    raise AssertionError(f"{target} not reached with Tab from {start}")


def test_older_messages_load_with_a_button_when_the_list_does_not_scroll(
        people: Callable[..., ChatPage], tmp_path: Any) -> None:
    """With persistence and HISTORY_SIZE 3 a page of history is 3 messages: a list too short
    to scroll, even with all 7 of the room's messages. "Load older messages" (reached with Tab, pressed with Enter) loads them, is
    busy while it does, keeps the focus, is not left busy when its client is replaced
    (another name) before the reply comes, and at the room's start gives way (and the focus)
    to "This is the start of # room." (before: only scrolling to the top loaded them, so
    such a list, and a keyboard, had no way to)."""
    env = {**SERVER_ENV, "ENABLE_PERSISTENCE": "true", "HISTORY_SIZE": "3",
           "DATABASE_URL": f"sqlite:///{tmp_path}/wschat.db"}
    with served(env) as srv:
        with Client(srv.url, "username=writer") as writer:
            writer.join("archive")
            for i in range(1, 8):
                writer.say("archive", f"archived {i}")
        alice = people(srv, "alice")
        # The page's `history` requests with `before` wait here while hold["on"].
        hold: dict[str, Any] = {"on": False, "held": []}

        def route(ws: Any) -> None:
            server = ws.connect_to_server()

            def from_page(frame: str | bytes) -> None:
                try:
                    parsed = json.loads(frame)
                except (TypeError, ValueError):
                    parsed = None
                if (hold["on"] and isinstance(parsed, dict) and parsed.get("type") == "history"
                        and "before" in parsed):
                    hold["held"].append(lambda: server.send(frame))
                    return
                server.send(frame)

            ws.on_message(from_page)

        alice.context.route_web_socket(re.compile(r"/ws(\?|$)"), route)
        alice.page.reload()
        alice.wait_online()
        join_room(alice, "archive")
        expect(alice.messages("archived 7")).to_have_count(1)
        button = alice.page.locator("#load-older")
        start = alice.page.locator("#messages .notice", has_text="This is the start of # archive")
        expect(button).to_be_visible()
        expect(button).to_have_text("Load older messages")
        assert texts(alice) == [f"archived {i}" for i in range(5, 8)]
        scroller = alice.page.locator("#scroller")
        assert scroller.evaluate("el => el.scrollHeight <= el.clientHeight"), "the list scrolls"

        tab_to(alice, button)
        hold["on"] = True
        alice.page.keyboard.press("Enter")
        expect(button).to_have_text("Loading older messages…")
        expect(button).to_have_attribute("aria-disabled", "true")
        expect(button).to_be_focused()
        alice.page.keyboard.press("Enter")  # busy: pressing again asks nothing more
        assert len(hold["held"]) == 1, hold
        hold["on"] = False
        hold["held"].pop()()
        expect(alice.messages("archived 2")).to_have_count(1)
        assert texts(alice) == [f"archived {i}" for i in range(2, 8)]
        expect(button).to_have_text("Load older messages")  # more before 2
        expect(button).not_to_have_attribute("aria-disabled", "true")
        expect(button).to_be_focused()
        expect(start).to_have_count(0)
        assert scroller.evaluate("el => el.scrollHeight <= el.clientHeight"), "the list scrolls"

        # A load whose client is replaced (another name: restartClient) before the reply came:
        # the button is not left busy, and the next client loads the page.
        hold["on"] = True
        alice.page.keyboard.press("Enter")
        expect(button).to_have_text("Loading older messages…")
        assert len(hold["held"]) == 1, hold
        alice.page.locator("#switch-user").click()
        alice.page.locator("#signin-name").fill("alice2")
        alice.page.locator("#signin-go").click()
        expect(alice.page.locator("#me")).to_contain_text("alice2")
        alice.wait_online()
        hold["on"] = False
        expect(button).to_have_text("Load older messages")
        expect(button).not_to_have_attribute("aria-disabled", "true")
        assert texts(alice) == [f"archived {i}" for i in range(2, 8)]

        tab_to(alice, button)
        alice.page.keyboard.press("Enter")
        expect(alice.messages("archived 1")).to_have_count(1)
        assert texts(alice) == [f"archived {i}" for i in range(1, 8)]
        assert scroller.evaluate("el => el.scrollHeight <= el.clientHeight"), "the list scrolls"
        expect(button).to_be_hidden()
        expect(start).to_be_visible()
        expect(start).to_be_focused()  # the line that took the button's place


def test_messages_missed_while_away_are_said_in_one_line(
        web_server: Server, people: Callable[..., ChatPage]) -> None:
    """What the server replays after a reconnect is said in one line ("12 new messages in
    # replayed while you were away."), and what comes after it one by one, as it comes
    (before: each replayed message was said, 12 in a row)."""
    alice = people(web_server, "alice")
    down = cuttable(alice)
    join_room(alice, "replayed")
    expect(alice.page.locator("#messages .notice", has_text="start of # replayed")).to_be_visible()
    with Client(web_server.url, "username=writer") as writer:
        seen_before_the_cut(alice, writer, "replayed")
        written_while_cut(down, writer, "replayed", 12)
        expect(alice.messages("while away 12"), RECONNECT_MS).to_have_count(1)
        writer.say("replayed", "back live")
        expect(alice.messages("back live")).to_have_count(1)
    heard = [t for t in announced(alice) if "away" in t or "live" in t]
    assert heard == ["12 new messages in # replayed while you were away.", "writer: back live"], heard


def test_announced_lines_leave_the_live_region(web_server: Server,
                                               people: Callable[..., ChatPage]) -> None:
    """A line said in #arrivals goes some seconds later, so one reading the page through
    does not meet old arrivals after the conversation (before: the last 20 stayed there)."""
    alice = people(web_server, "alice")
    bob = people(web_server, "bob")
    bob.say("said, then gone")
    lines = alice.page.locator("#arrivals p")
    expect(lines.filter(has_text="said, then gone")).to_have_count(1)
    expect(lines, ANNOUNCED_KEPT_MS + WAIT_MS).to_have_count(0)


def test_thirty_messages_appear_quickly_with_1500_loaded(people: Callable[..., ChatPage]) -> None:
    """With 1,500 messages loaded (scrolled back through history), 30 new ones all show
    within 3 s (before: each one rebuilt the list, and they took 12.5 s)."""
    env = {**SERVER_ENV, "HISTORY_SIZE": "2000", "RATE_LIMIT": "100000",
           "RATE_LIMIT_BURST": "10000"}
    with served(env) as srv, Client(srv.url, "username=writer") as writer:
        writer.join("big")
        for i in range(1, 1501):
            writer.send({"type": "message", "room": "big", "text": f"old {i}"})
        writer.expect("message", text="old 1500", timeout=60 * SCALE)
        alice = people(srv, "alice")
        join_room(alice, "big")
        shown = alice.page.locator("#messages .msg")
        for count in range(50, 1501, 50):
            expect(shown, int(30_000 * SCALE)).to_have_count(count)
            alice.page.locator("#scroller").evaluate("el => { el.scrollTop = 0; }")
        expect(alice.page.locator("#messages .notice", has_text="start of # big")).to_be_visible()

        started = time.monotonic()
        for i in range(1, 31):
            writer.send({"type": "message", "room": "big", "text": f"live {i}"})
        expect(alice.messages("live 30"), int(60_000 * SCALE)).to_have_count(1)
        took = time.monotonic() - started
        assert took < 3 * SCALE, f"30 new messages took {took:.1f} s to show"
        assert texts(alice)[-30:] == [f"live {i}" for i in range(1, 31)]
        writer.expect("message", text="live 30")  # read its echoes: its socket stays healthy


def test_leave_buttons_are_reachable_with_tab(web_server: Server,
                                              people: Callable[..., ChatPage]) -> None:
    """Tab reaches every conversation's "×" (before: only the open one's, the others were
    hidden from the keyboard), it says what it does, and leaving keeps the focus in the list."""
    alice = people(web_server, "alice")
    join_room(alice, "random")  # #general is not the open conversation now
    alice.page.locator('[data-conv="room:general"] > .open').focus()
    alice.page.keyboard.press("Tab")
    leave = alice.page.get_by_role("button", name="Leave general")
    expect(leave).to_be_focused()
    assert leave.evaluate("el => getComputedStyle(el).opacity") == "1", "focused, it shows"
    alice.page.keyboard.press("Tab")
    expect(alice.page.locator('[data-conv="room:random"] > .open')).to_be_focused()
    alice.page.keyboard.press("Tab")
    expect(alice.page.get_by_role("button", name="Leave random")).to_be_focused()
    alice.page.keyboard.press("Shift+Tab")
    alice.page.keyboard.press("Shift+Tab")
    expect(leave).to_be_focused()
    alice.page.keyboard.press("Enter")
    expect(alice.page.locator('[data-conv="room:general"]')).to_have_count(0)
    expect(alice.page.locator('[data-conv="room:random"] > .open')).to_be_focused()


def test_rate_limit_is_explained_and_goes_away(people: Callable[..., ChatPage]) -> None:
    """Sending faster than RATE_LIMIT shows "Slow down: you can send again in N s", which
    goes by itself, and the messages still go out (before: they sat at "Sending…" with no
    word of why)."""
    # Each message also spends a token on its typing indicator: 4 messages need 8 tokens.
    # At most 2 x burst refusals in a row are allowed before the server closes with 4102.
    env = {**SERVER_ENV, "RATE_LIMIT": "0.5", "RATE_LIMIT_BURST": "4",
           "RATE_LIMIT_REQUESTS": "100", "RATE_LIMIT_REQUESTS_BURST": "100"}
    with served(env) as srv:
        alice = people(srv, "alice")
        for i in range(1, 5):
            alice.say(f"quick {i}")
        notice = alice.page.get_by_role("status").filter(has_text="Slow down")
        expect(notice).to_have_text(re.compile(r"^Slow down: you can send again in [1-9]\d* s\.?$"))
        expect(notice).to_be_visible()
        for i in range(1, 5):
            expect(alice.messages(f"quick {i}"), int(20_000 * SCALE)).not_to_have_class(PENDING)
        expect(notice, int(10_000 * SCALE)).to_have_count(0)
        expect(alice.page.locator("#send-error")).to_be_hidden()


def test_a_refused_send_survives_a_reload_and_can_be_discarded(
        web_server: Server, people: Callable[..., ChatPage]) -> None:
    """A message the server refused stays, marked "Not sent" with its reason, after a reload
    of the tab (before: the reload lost it); Discard removes it for good."""
    alice = people(web_server, "alice")
    long_text = "z" * 70  # over the server's MAX_TEXT_CHARS (60)
    alice.say(long_text)
    refused = alice.page.locator("#messages .msg.failed", has_text=long_text)
    expect(refused.locator(".error")).to_contain_text("Too long")
    alice.page.reload()
    alice.wait_online()
    expect(refused).to_have_count(1)
    expect(refused).to_contain_text("Not sent")
    expect(refused.locator(".error")).to_contain_text("Too long")
    refused.get_by_role("button", name="Discard").click()
    expect(refused).to_have_count(0)
    alice.page.reload()
    alice.wait_online()
    alice.say("after the discard")
    expect(alice.messages("after the discard")).not_to_have_class(PENDING)
    expect(refused).to_have_count(0)


def test_someone_else_s_message_with_the_id_of_a_refused_send_leaves_it(
        web_server: Server, people: Callable[..., ChatPage]) -> None:
    """A send the server refused stays with its error until Alice retries, edits or
    discards it. A message of someone else that carries its client_msg_id (a client that
    reuses ids, or copies them) is no acknowledgement of it: the refused send stays (before:
    any message naming that id took it away, and its text with it)."""
    alice = people(web_server, "alice")
    join_room(alice, "same-ids")
    long_text = "y" * 70  # over the server's MAX_TEXT_CHARS (60)
    alice.say(long_text)
    refused = alice.page.locator("#messages .msg.failed", has_text=long_text)
    expect(refused.locator(".error")).to_contain_text("Too long")
    cmid = refused.get_attribute("data-cmid")
    assert cmid
    with Client(web_server.url, "username=mallory") as mallory:
        mallory.join("same-ids")
        mallory.say("same-ids", "the same id, from someone else", client_msg_id=cmid)
    expect(alice.messages("the same id, from someone else")).to_have_count(1)
    expect(refused).to_have_count(1)
    expect(refused.locator(".error")).to_contain_text("Too long")
    alice.say("mine again")
    expect(alice.messages("mine again")).not_to_have_class(PENDING)
    expect(refused).to_have_count(1)


def test_a_guest_s_dm_whose_echo_was_lost_is_filed_with_its_reader(
        web_server: Server, people: Callable[..., ChatPage]) -> None:
    """A guest's DM whose echo is lost, written again after a reload (restored from the
    outbox) and after a reconnect, each time as a new guest id: the echo that comes at last
    settles the pending entry, in the conversation with Bob (none with herself). Every echo
    carries the id of the connection it came on: the server dedupes a client_msg_id per
    sender, so a new guest id's write is stored anew (Bob gets a copy each time: the
    client's documented limit for guests), never answered with the DM of an earlier id."""
    bob = people(web_server, token=token_for("u-bob20", "Bob"))
    alice = people(web_server, "alice")
    text = "did you get this?"
    network: dict[str, Any] = {"lose_echo": True, "echoes": []}

    def drop(frame: dict[str, Any], to_server: bool) -> bool:
        if to_server or frame.get("type") != "dm" or frame.get("text") != text:
            return False
        network["echoes"].append(frame["user_id"])
        return bool(network["lose_echo"])

    down = cuttable(alice, drop)
    alice.page.locator("#members button", has_text="Bob").click()
    expect(alice.page.locator("#title")).to_have_text("Bob (direct)")
    alice.say(text)
    sent = alice.messages(text)
    expect(sent).to_have_class(PENDING)
    copies = bob.page.locator("#dms li", has_text="alice")
    expect(copies).to_have_count(1)  # stored and delivered; only Alice's echo was lost
    # Bob's copy and Alice's echo come on two connections in either order: wait for the echo
    until(alice, lambda: len(network["echoes"]) == 1, "the first echo")
    alice.page.reload()  # restored from the outbox, written as a new guest: lost again
    alice.wait_online()
    expect(sent).to_have_class(PENDING)
    expect(copies).to_have_count(2)
    until(alice, lambda: len(network["echoes"]) == 2, "the second echo")
    network["lose_echo"] = False
    down(True)
    down(False)  # a third guest id; the library writes it again
    expect(sent, RECONNECT_MS).not_to_have_class(PENDING)
    expect(sent).to_have_class(MINE)
    expect(sent).to_have_count(1)
    expect(alice.page.locator("#title")).to_have_text("Bob (direct)")
    expect(alice.page.locator("#dms li")).to_have_count(1)
    expect(alice.page.locator("#dms li", has_text="Bob")).to_have_count(1)
    assert len(network["echoes"]) == 3
    assert len(set(network["echoes"])) == 3, network["echoes"]


def test_someone_else_s_dm_with_the_id_of_a_restored_dm_leaves_it_pending(
        web_server: Server, people: Callable[..., ChatPage]) -> None:
    """A DM to Bob restored from the outbox (a reload) waits for its echo. Mallory's DM to
    Alice naming the same client_msg_id (a client that copies ids) is no echo of it: it is
    filed with Mallory, Alice's DM stays pending and reaches Bob once the network lets it
    through. (Before: the library took any sender's DM for the echo of a restored send, so
    Alice's DM left the outbox unsent and stayed "Sending…" for ever.)"""
    bob = people(web_server, token=token_for("u-bob21", "Bob"))
    alice = people(web_server, token=token_for("u-alice21", "Alice"))
    network = {"hold_dms": True}

    def drop(frame: dict[str, Any], to_server: bool) -> bool:
        return network["hold_dms"] and to_server and frame.get("type") == "dm"

    down = cuttable(alice, drop)
    alice.page.locator("#members button", has_text="Bob").click()
    expect(alice.page.locator("#title")).to_have_text("Bob (direct)")
    alice.say("held back")
    waiting = alice.messages("held back")
    expect(waiting).to_have_class(PENDING)
    alice.page.reload()  # restored from sessionStorage, written again, held back again
    alice.wait_online()
    expect(waiting).to_have_class(PENDING)
    cmid = waiting.get_attribute("data-cmid")
    assert cmid
    with Client(web_server.url, "username=mallory") as mallory:
        mallory.request({"type": "dm", "to": "u-alice21", "text": "the same id, from mallory",
                         "client_msg_id": cmid}, "dm")
    from_mallory = alice.page.locator("#dms li", has_text="mallory")
    expect(from_mallory.locator(".unread")).to_have_text("1")
    expect(alice.page.locator("#dms li")).to_have_count(2)  # Bob and Mallory: none with herself
    expect(waiting).to_have_class(PENDING)
    network["hold_dms"] = False
    down(True)
    down(False)
    expect(waiting, RECONNECT_MS).not_to_have_class(PENDING)
    expect(waiting).to_have_class(MINE)
    bob.page.locator("#dms li", has_text="Alice").locator(".open").click()
    expect(bob.messages("held back")).to_have_count(1)
    from_mallory.locator(".open").click()
    expect(alice.messages("the same id, from mallory")).to_have_count(1)
    expect(alice.messages("the same id, from mallory")).not_to_have_class(MINE)


def test_a_refused_dm_survives_a_reload_and_can_be_retried(
        web_server: Server, people: Callable[..., ChatPage]) -> None:
    """A DM refused because its reader was offline is still there after a reload, and Retry
    sends it once the reader is back."""
    alice = people(web_server, token=token_for("u-alice2", "Alice"))
    refused = dm_after_they_left(alice, people(web_server, token=token_for("u-bob2", "Bob")),
                                 "Bob", "call me back")
    expect(refused).to_have_class(re.compile(r"\bfailed\b"))
    expect(refused.locator(".error")).to_contain_text("Bob is not online")
    alice.page.reload()
    alice.wait_online()
    expect(alice.page.locator("#title")).to_have_text("Bob (direct)")
    expect(refused.locator(".error")).to_contain_text("Bob is not online")
    bob = people(web_server, token=token_for("u-bob2", "Bob"))
    refused.get_by_role("button", name="Retry").click()
    sent = alice.messages("call me back")
    expect(sent).to_have_count(1)
    expect(sent).to_have_class(MINE)
    expect(sent).not_to_have_class(re.compile(r"\b(pending|failed)\b"))
    bob.page.locator("#dms li", has_text="Alice").locator(".open").click()
    expect(bob.messages("call me back")).to_have_count(1)


def test_dm_notices_say_what_persistence_keeps(people: Callable[..., ChatPage],
                                               tmp_path: Any) -> None:
    """With ENABLE_PERSISTENCE a DM to a signed-in user who is away is kept for them (no
    error; it arrives when they connect), and a DM the server refuses says why in those
    terms: only signed-in users who have connected before get DMs while away. (The page
    said "direct messages reach only connected users" whatever the server did.)"""
    env = {**SERVER_ENV, "ENABLE_PERSISTENCE": "true",
           "DATABASE_URL": f"sqlite:///{tmp_path}/page.db"}
    with served(env) as srv:
        alice = people(srv, token=token_for("u-alice3", "Alice"))
        bob = people(srv, token=token_for("u-bob3", "Bob"))
        guest = people(srv, "carol")
        kept = dm_after_they_left(alice, bob, "Bob", "see you tomorrow")
        expect(kept).not_to_have_class(PENDING)
        expect(alice.page.locator("#messages .msg.failed")).to_have_count(0)
        bob = people(srv, token=token_for("u-bob3", "Bob"))
        bob.page.locator("#dms button.open", has_text="Alice").click()
        expect(bob.messages("see you tomorrow")).to_have_count(1)

        refused = dm_after_they_left(alice, guest, "carol", "still there?")
        expect(refused.locator(".error")).to_contain_text(
            "carol is not online, and direct messages are kept only for signed-in users")


# ---- a review in the browser: focus, the phone menu, typing, bans, the page's own requests --

def test_the_send_button_gives_the_focus_back_to_the_draft(
        web_server: Server, people: Callable[..., ChatPage]) -> None:
    """A message sent with the Send button (mouse, or Tab and Space) leaves the focus in the
    composer, ready for the next one (before: it stayed on the button, and typing went nowhere)."""
    alice = people(web_server, "alice")
    alice.page.locator("#draft").fill("sent with the button")
    alice.page.locator("#send").click()
    expect(alice.messages("sent with the button")).to_have_count(1)
    expect(alice.page.locator("#draft")).to_be_focused()
    alice.page.keyboard.type("and the next one")
    expect(alice.page.locator("#draft")).to_have_value("and the next one")


def test_the_closed_phone_menu_is_out_of_the_keyboard_s_way(
        web_server: Server, people: Callable[..., ChatPage]) -> None:
    """At phone width the closed sidebar is off screen: Tab skips it (before: seven stops on
    buttons nobody could see, which screen readers read out too). The menu button says
    whether it is open, opening it takes the focus into it, Escape closes it and gives the
    focus back, and opening a conversation from it leaves the focus in the composer."""
    from browser import PHONE

    alice = people(web_server, "alice", viewport=PHONE)
    menu = alice.page.locator("#menu")
    expect(menu).to_have_attribute("aria-expanded", "false")
    alice.page.evaluate("document.activeElement.blur()")
    alice.page.keyboard.press("Tab")
    expect(menu).to_be_focused()
    alice.page.keyboard.press("Enter")
    expect(menu).to_have_attribute("aria-expanded", "true")
    expect(alice.page.locator("#sidebar")).to_be_in_viewport()
    expect(alice.page.locator('[data-conv="room:general"] > .open')).to_be_focused()
    alice.page.keyboard.press("Escape")
    expect(menu).to_have_attribute("aria-expanded", "false")
    expect(alice.page.locator("#sidebar")).not_to_be_in_viewport()
    expect(menu).to_be_focused()
    alice.page.keyboard.press("Enter")
    alice.page.keyboard.press("Enter")  # on the focused conversation: open it
    expect(menu).to_have_attribute("aria-expanded", "false")
    expect(alice.page.locator("#draft")).to_be_focused()
    # Wide again (a phone turned, a window widened), the sidebar is in reach.
    alice.page.set_viewport_size({"width": 1100, "height": 700})
    expect(alice.page.locator("#sidebar")).not_to_have_attribute("inert", re.compile(".*"))
    alice.page.locator('[data-conv="room:general"] > .open').focus()
    expect(alice.page.locator('[data-conv="room:general"] > .open')).to_be_focused()


SPY_SENT_FRAMES = """
window.sentFrames = [];
const realSend = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
  window.sentFrames.push(String(data));
  return realSend.call(this, data);
};
"""


def test_emptying_the_draft_ends_typing_at_once(web_server: Server,
                                                people: Callable[..., ChatPage]) -> None:
    """A draft deleted down to nothing says "stopped typing" then and there (before: the
    others saw "bob is typing…" for another 3 s, until the library's idle timer)."""
    alice = people(web_server, "alice")
    bob = people(web_server, "bob")
    bob.page.add_init_script(SPY_SENT_FRAMES)
    bob.page.reload()
    bob.wait_online()
    expect(bob.page.locator("#draft")).to_be_enabled()  # #general joined again
    bob.page.locator("#draft").press_sequentially("hel")
    expect(alice.page.locator("#typing")).to_contain_text("bob")
    bob.page.locator("#draft").fill("")
    # Read as the input event returns: the library's idle timer (3 s) cannot have run yet.
    frames = [json.loads(f) for f in bob.page.evaluate("window.sentFrames")]
    typing = [f["status"] for f in frames if f.get("type") == "typing"]
    assert typing[-1:] == [False], f"typing frames sent: {typing}"
    expect(alice.page.locator("#typing")).to_have_text("")


def test_a_ban_everywhere_is_said_in_words_once(web_server: Server,
                                                people: Callable[..., ChatPage]) -> None:
    """A ban from the whole server says so in the status, with its end, and nothing else:
    before, "connection closed for good: 4003 banned" (the library's words) also stood
    under the composer, and the status spoke of "disconnected or banned"."""
    alice = people(web_server, token=token_for("u-banned-everywhere", "Alice"))
    api(web_server, "/api/ban", {"user_id": "u-banned-everywhere", "duration": 600})
    status = alice.page.locator("#status")
    expect(status).to_have_attribute("data-state", "failed")
    expect(status).to_contain_text(re.compile(r"You are banned from this server until \d"))
    expect(alice.page.locator("#send-error")).to_be_hidden()
    expect(alice.page.locator("#draft")).to_have_attribute(
        "placeholder", re.compile(r"^Not connected"))


def test_loading_the_page_asks_for_nothing_missing(web_server: Server,
                                                  people: Callable[..., ChatPage]) -> None:
    """The page names its icon, so the browser asks for no /favicon.ico (before: a 404 on
    every visit, "Failed to load resource" in the console), and nothing it loads fails."""
    alice = people(web_server, "alice")
    failed: list[str] = []
    alice.page.on("console", lambda m: failed.append(f"{m.text} {m.location.get('url')}")
                  if m.type == "error" and "Failed to load" in m.text else None)
    alice.page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)
    alice.page.reload()
    alice.wait_online()
    alice.page.wait_for_load_state("networkidle")
    assert alice.page.locator('head link[rel~="icon"]').count() == 1
    assert not failed, failed


def test_a_name_typed_while_a_join_is_on_its_way_stays(
        web_server: Server, people: Callable[..., ChatPage]) -> None:
    """The join box is emptied when its join is answered only if it still holds that room:
    the next name typed meanwhile stays (before: the answer wiped it)."""
    alice = people(web_server, "alice")
    held: dict[str, Any] = {"frames": [], "release": False}

    def route(ws: Any) -> None:
        server = ws.connect_to_server()

        def from_server(frame: str | bytes) -> None:
            if not held["release"] and '"joined"' in str(frame) and '"slow"' in str(frame):
                held["frames"].append(frame)  # the answer to the join of #slow waits
            else:
                ws.send(frame)

        ws.on_message(server.send)
        server.on_message(from_server)
        held["page"] = ws

    alice.context.route_web_socket(re.compile(r"/ws(\?|$)"), route)
    alice.page.reload()
    alice.wait_online()
    alice.page.locator("#join-room").fill("slow")
    alice.page.locator("#join-room").press("Enter")
    expect(alice.page.locator('[data-conv="room:slow"]')).to_have_count(1)
    until(alice, lambda: bool(held["frames"]), "the join's answer held")
    alice.page.locator("#join-room").fill("next")
    held["release"] = True
    for frame in held["frames"]:
        held["page"].send(frame)
    expect(alice.page.locator("#title")).to_have_text("# slow")
    expect(alice.page.locator("#join-room")).to_have_value("next")


def test_a_room_not_joined_yet_does_not_offer_to_keep_messages(
        web_server: Server, people: Callable[..., ChatPage]) -> None:
    """Reloaded while offline, a room is not joined yet and its composer is off: it says
    so (before: "Offline: messages wait and go out when the connection is back", in a box
    that took no text)."""
    alice = people(web_server, "alice")
    down = cuttable(alice)
    down(True)
    alice.page.reload()
    expect(alice.page.locator("#status")).to_have_attribute("data-state", "reconnecting")
    draft = alice.page.locator("#draft")
    expect(draft).to_be_disabled()
    expect(draft).to_have_attribute("placeholder", "Joining # general…")
    down(False)
    expect(alice.page.locator("#status"), RECONNECT_MS).to_have_attribute("data-state",
                                                                          "connected")
    expect(draft).to_be_enabled()
    expect(draft).to_have_attribute("placeholder", "Message # general")


def test_a_time_on_another_day_names_the_day(web_server: Server,
                                             people: Callable[..., ChatPage]) -> None:
    """A mute for three days says until which day (before: only the hour, "until 03:07 PM",
    read as today); a message from today still shows just its time."""
    alice = people(web_server, "alice")
    alice.say("today's message")
    stamp = alice.messages("today's message").locator("time")
    expect(stamp).to_have_text(re.compile(r"^\d\d:\d\d"))
    alice_id = alice.page.locator("#members li.self").get_attribute("data-user-id")
    until = api(web_server, "/api/mute",
                {"user_id": alice_id, "room": "general", "duration": 3 * 86400})["until"]
    day = alice.page.evaluate(
        "until => new Date(until).toLocaleString([], {month: 'short', day: 'numeric'})", until)
    expect(alice.page.locator("#messages .notice", has_text="You are muted here")
           ).to_contain_text(f"until {day}")


def test_a_mute_that_runs_out_says_so(web_server: Server,
                                      people: Callable[..., ChatPage]) -> None:
    """When a timed mute ends (the server sends nothing then) the room says one can post
    again, as after an unmute (before: the composer came back without a word, below a
    notice that still said "muted")."""
    alice = people(web_server, "alice")
    watch_live_regions(alice)
    alice_id = alice.page.locator("#members li.self").get_attribute("data-user-id")
    api(web_server, "/api/mute", {"user_id": alice_id, "room": "general", "duration": 2})
    expect(alice.page.locator("#draft")).to_be_disabled()
    expect(alice.page.locator("#messages .notice", has_text="post here again")).to_be_visible()
    expect(alice.page.locator("#draft")).to_be_enabled()
    assert any("post here again" in line for line in announced(alice))


def test_a_month_long_mute_does_not_end_at_once(web_server: Server,
                                               people: Callable[..., ChatPage]) -> None:
    """A mute for 30 days stays on: setTimeout takes at most 2^31 - 1 ms (24.8 days), and
    the longer delay to the mute's end wrapped around (before: "Your mute ended" came at
    once, and the composer came back for a mute with a month to run)."""
    alice = people(web_server, "alice")
    alice_id = alice.page.locator("#members li.self").get_attribute("data-user-id")
    api(web_server, "/api/mute",
        {"user_id": alice_id, "room": "general", "duration": 30 * 86400})
    expect(alice.page.locator("#messages .notice", has_text="You are muted here")
           ).to_be_visible()
    # A timer the page sets now runs after every one due before it: the wrapped one too.
    alice.page.evaluate("() => new Promise((done) => setTimeout(done, 100))")
    expect(alice.page.locator("#messages .notice", has_text="post here again")
           ).to_have_count(0)
    expect(alice.page.locator("#draft")).to_be_disabled()


def test_a_long_room_name_stays_inside_the_sidebar(web_server: Server,
                                                   people: Callable[..., ChatPage]) -> None:
    """A room name of 64 characters without a break wraps in "Members in # …" (before: the
    heading ran out of the sidebar, which scrolled sideways, on a phone and a desktop)."""
    from browser import PHONE

    room = "r" + "x" * 63
    for viewport in (PHONE, None):
        alice = people(web_server, "alice", **({"viewport": viewport} if viewport else {}))
        if viewport:
            alice.page.locator("#menu").click()
        join_room(alice, room)
        if viewport:
            alice.page.locator("#menu").click()
        expect(alice.page.locator("#members-room")).to_contain_text(room)
        sidebar = alice.page.locator("#sidebar")
        wide, room_for = sidebar.evaluate("el => [el.scrollWidth, el.clientWidth]")
        assert wide <= room_for, f"the sidebar scrolls sideways: {wide} > {room_for}"


def test_banned_or_muted_while_away_is_said_on_return(web_server: Server,
                                                      people: Callable[..., ChatPage]) -> None:
    """Banned from a room while the connection was down, the rejoin is refused: the room
    says "banned until" (before: "You were removed from # room: forbidden."). Muted in
    another while away, the first send there is refused: the composer goes off with the
    mute's notice (before: it stayed on, and each send failed in turn)."""
    alice = people(web_server, token=token_for("u-away", "Alice"))
    join_room(alice, "second")
    alice.open_conversation("room:general")
    down = cuttable(alice)
    expect(alice.page.locator("#draft")).to_be_enabled()  # #general joined again
    down(True)
    alice.say("written while away")
    api(web_server, "/api/ban", {"user_id": "u-away", "room": "general", "duration": 600})
    api(web_server, "/api/mute", {"user_id": "u-away", "room": "second", "duration": 600})
    down(False)
    notice = alice.page.locator("#messages .notice.warn", has_text="You were banned from # general")
    expect(notice, RECONNECT_MS).to_contain_text(re.compile(r"until \d"))
    expect(alice.messages("written while away")).to_have_class(re.compile(r"\bfailed\b"))
    alice.open_conversation("room:second")
    alice.say("muted, unknowing")
    expect(alice.messages("muted, unknowing")).to_have_class(re.compile(r"\bfailed\b"))
    expect(alice.page.locator("#messages .notice", has_text="You are muted here until")
           ).to_be_visible()
    expect(alice.page.locator("#draft")).to_be_disabled()
