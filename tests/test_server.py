"""The chat server end to end: real gunicorn, real sockets, one behaviour per test."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import jwt
import pytest
from websockets.exceptions import InvalidStatus

from conftest import ROOT, TIMEOUT, Client, Server, own_redis, wait_until
from rawws import RawClient
from test_api import API_KEY, call

SECRET = "test-secret-0123456789abcdef0123456789"


def room() -> str:
    return f"r-{uuid.uuid4().hex[:10]}"


def token(sub: str, name: str | None = None, ttl: float = 3600) -> str:
    now = int(time.time())
    claims = {"sub": sub, "exp": now + int(ttl), "iat": now}
    if name:
        claims["name"] = name
    return jwt.encode(claims, SECRET, algorithm="HS256")


def test_browser_page_served(server: Server) -> None:
    """/ serves the browser chat page."""
    status, body = server.http("/")
    assert status == 200 and b"web/app.js" in body


def test_guest_welcome_uses_username(client_factory) -> None:
    """A guest gets a generated user_id and the ?username= it asked for."""
    c = client_factory("username=alice")
    assert c.welcome["username"] == "alice"
    assert c.welcome["user_id"].startswith("guest-")
    assert c.welcome["authenticated"] is False


def test_join_reply_and_presence(client_factory) -> None:
    """joined lists the users; the others get presence online, the joiner does not."""
    r = room()
    a, b = client_factory("username=alice"), client_factory("username=bob")
    joined = a.join(r, id="j1")
    assert joined["id"] == "j1"
    assert joined["users"] == [{"user_id": a.user_id, "username": "alice", "guest": True}]
    joined_b = b.join(r)
    assert [u["username"] for u in joined_b["users"]] == ["alice", "bob"]
    presence = a.expect("presence")
    assert presence == {"type": "presence", "room": r, "user": "bob",
                        "user_id": b.user_id, "status": "online", "guest": True}
    b.assert_silent("presence")


def test_messages_have_sequential_ids_and_echo(client_factory) -> None:
    """Every member, the sender included, gets each message with ids 1, 2, 3."""
    r = room()
    a, b = client_factory("username=alice"), client_factory("username=bob")
    a.join(r)
    b.join(r)
    for i in range(3):
        a.send({"type": "message", "room": r, "text": f"m{i}"})
    got_a = [a.expect("message") for _ in range(3)]
    got_b = [b.expect("message") for _ in range(3)]
    assert [m["id"] for m in got_a] == [1, 2, 3]
    assert got_a == got_b
    first = got_b[0]
    assert first["from"] == "alice" and first["user_id"] == a.user_id
    assert first["room"] == r and first["text"] == "m0"
    assert abs(first["timestamp"] - time.time() * 1000) < 60_000


def test_a_message_sent_right_before_leave_is_echoed_before_left(client_factory) -> None:
    """Message then leave at once: the sender gets its echo (the acknowledgement) before
    ``left``, and so does every message published before the leave. With Redis the echo
    travels through pub/sub and could reach the worker after the connection had left
    the room: never written, the sender never acknowledged a message others got."""
    a, b = client_factory(), client_factory()
    for i in range(20):
        r = room()
        a.join(r)
        b.join(r)
        b.send({"type": "message", "room": r, "text": f"from b {i}"})
        a.send({"type": "message", "room": r, "text": f"bye {i}"})
        a.send({"type": "leave", "room": r, "id": i})
        left = a.expect("left", id=i)
        texts = [e["text"] for e in a.backlog if e.get("type") == "message" and e["room"] == r]
        assert f"bye {i}" in texts, (i, a.backlog, left)
        ids = {text: b.expect("message", text=text)["id"] for text in (f"from b {i}", f"bye {i}")}
        if ids[f"from b {i}"] < ids[f"bye {i}"]:  # published before a's leave: a gets it too
            assert f"from b {i}" in texts, (i, a.backlog)
        a.backlog.clear()
        b.request({"type": "leave", "room": r, "id": "x"}, "left")
        b.backlog.clear()


def test_client_msg_id_dedupe(client_factory) -> None:
    """A resent client_msg_id is not broadcast again; the sender gets the original."""
    r = room()
    a, b = client_factory(), client_factory()
    a.join(r)
    b.join(r)
    first = a.say(r, "once", client_msg_id="c-1")
    assert first["client_msg_id"] == "c-1"
    b.expect("message")
    a.send({"type": "message", "room": r, "text": "once", "client_msg_id": "c-1"})
    again = a.expect("message")
    assert again == first
    b.assert_silent("message")
    assert a.say(r, "next")["id"] == first["id"] + 1


def test_message_to_room_not_joined(client_factory) -> None:
    """Writing to a room you are not in is not_in_room, echoing the request id."""
    c = client_factory()
    c.send({"type": "message", "room": room(), "text": "hi", "id": 7})
    err = c.expect("error")
    assert err["code"] == "not_in_room" and err["id"] == 7


@pytest.mark.parametrize("frame, code", [
    ("not json", "invalid_json"),
    ("[1, 2]", "invalid_message"),
    ('{"no_type": 1}', "invalid_message"),
    ('{"type": "fly"}', "unknown_type"),
    ('{"type": "join"}', "invalid_message"),
    ('{"type": "join", "room": 5}', "invalid_message"),
    ('{"type": "join", "room": "bad room!"}', "invalid_room"),
    ('{"type": "join", "room": ""}', "invalid_room"),
    ('{"type": "message", "room": "r", "text": "   "}', "invalid_message"),
    ('{"type": "message", "room": "r", "text": 42}', "invalid_message"),
    ('{"type": "typing", "room": "r", "status": "yes"}', "invalid_message"),
    ('{"type": "history", "room": "r", "limit": -1}', "invalid_message"),
    ('{"type": "history", "room": "r", "limit": true}', "invalid_message"),
    ('{"type": "join", "room": "r", "since": "x"}', "invalid_message"),
    ('{"type": "ping", "id": {"a": 1}}', "invalid_message"),
])
def test_bad_input_gets_error_and_connection_survives(client_factory, frame: str,
                                                      code: str) -> None:
    """Each kind of bad input gets its stable error code; the connection stays usable."""
    c = client_factory()
    c.send(frame)
    assert c.expect("error")["code"] == code
    assert c.request({"type": "ping", "id": "after"}, "pong")["id"] == "after"


def test_oversized_text_is_message_too_large(client_factory) -> None:
    """Text over MAX_TEXT_CHARS is refused with message_too_large, not broadcast."""
    r = room()
    c = client_factory()
    c.join(r)
    c.send({"type": "message", "room": r, "text": "x" * 5000})
    assert c.expect("error")["code"] == "message_too_large"
    c.assert_silent("message")


def test_bad_input_does_not_disturb_others(client_factory) -> None:
    """A client sending garbage does not affect another client's conversation."""
    r = room()
    good, bad, peer = client_factory(), client_factory(), client_factory()
    good.join(r)
    peer.join(r)
    for frame in ("{", "[]", '{"type": 1}', "\x00" * 100):
        bad.send(frame)
    assert good.say(r, "still fine")["text"] == "still fine"
    assert peer.expect("message")["text"] == "still fine"


def test_leave_reply_and_offline_presence(client_factory) -> None:
    """leave answers left; the others see offline; leaving again is not_in_room."""
    r = room()
    a, b = client_factory(), client_factory()
    a.join(r)
    b.join(r)
    a.expect("presence", status="online")
    assert b.request({"type": "leave", "room": r, "id": "l"}, "left") == {
        "type": "left", "room": r, "id": "l"}
    assert a.expect("presence", status="offline")["user_id"] == b.user_id
    b.send({"type": "leave", "room": r})
    assert b.expect("error")["code"] == "not_in_room"


def test_disconnect_sends_offline(client_factory) -> None:
    """Closing the socket makes the user go offline for the room."""
    r = room()
    a, b = client_factory(), client_factory()
    a.join(r)
    b.join(r)
    b.close()
    assert a.expect("presence", status="offline")["user_id"] == b.user_id
    users = a.request({"type": "list_users", "room": r}, "users")["users"]
    assert [u["user_id"] for u in users] == [a.user_id]


def test_two_tabs_offline_only_when_last_leaves(server: Server, client_factory) -> None:
    """A user with two connections stays online until the last one leaves."""
    r = room()
    watcher = client_factory()
    watcher.join(r)
    t = token("carol", "Carol")
    tab1 = client_factory(f"token={t}")
    tab2 = client_factory(f"token={t}")
    assert tab1.user_id == tab2.user_id == "carol"
    tab1.join(r)
    assert watcher.expect("presence", status="online")["user"] == "Carol"
    tab2.join(r)
    watcher.assert_silent("presence")
    users = watcher.request({"type": "list_users", "room": r}, "users")["users"]
    assert [u["user_id"] for u in users].count("carol") == 1
    tab1.close()
    watcher.assert_silent("presence", within=0.5)
    tab2.close()
    assert watcher.expect("presence", status="offline")["user_id"] == "carol"


def test_typing_to_others_and_expiry(client_factory) -> None:
    """typing reaches the others, not the typist; an uncleared true expires to false."""
    r = room()
    a, b = client_factory(), client_factory()
    a.join(r)
    b.join(r)
    b.send({"type": "typing", "room": r, "status": True})
    started = time.monotonic()
    on = a.expect("typing")
    assert on["status"] is True and on["user_id"] == b.user_id
    off = a.expect("typing", timeout=TIMEOUT)
    assert off["status"] is False
    assert time.monotonic() - started >= 0.3  # TYPING_TIMEOUT is 0.5 s in this server
    b.assert_silent("typing")


def test_typing_cleared_explicitly(client_factory) -> None:
    """typing false is relayed at once."""
    r = room()
    a, b = client_factory(), client_factory()
    a.join(r)
    b.join(r)
    b.send({"type": "typing", "room": r, "status": True})
    a.expect("typing", status=True)
    b.send({"type": "typing", "room": r, "status": False})
    a.expect("typing", status=False, timeout=0.4)


def test_message_from_another_tab_ends_typing(client_factory) -> None:
    """A message ends its user's typing indicator in the room, whichever of the user's
    connections set it: one tab types, the other sends (typing events name the user).
    With Redis and two workers the tabs may be on either."""
    r = room()
    t = token("dora", "Dora")
    watcher = client_factory()
    typist, writer = client_factory(f"token={t}"), client_factory(f"token={t}")
    for client in (watcher, typist, writer):
        client.join(r)
    sent = time.monotonic()  # its expiry: TYPING_TIMEOUT (0.5 s) after this at the earliest
    typist.send({"type": "typing", "room": r, "status": True})
    assert watcher.expect("typing", status=True)["user_id"] == "dora"
    writer.send({"type": "message", "room": r, "text": "from the other tab"})
    watcher.expect("message", text="from the other tab")
    off = watcher.expect("typing", status=False, timeout=sent + 0.49 - time.monotonic())
    assert off["user_id"] == "dora"
    watcher.assert_silent("typing", within=0.6)  # and once: no expiry after it
    typist.send({"type": "typing", "room": r, "status": True})  # typing again: shown again
    assert watcher.expect("typing", status=True)["user_id"] == "dora"


def test_list_users(client_factory) -> None:
    """list_users answers users with {user_id, username} objects and echoes id."""
    r = room()
    a, b = client_factory("username=ann"), client_factory("username=ben")
    a.join(r)
    b.join(r)
    reply = a.request({"type": "list_users", "room": r, "id": 3}, "users")
    assert reply["id"] == 3 and reply["room"] == r
    assert sorted(u["username"] for u in reply["users"]) == ["ann", "ben"]


def test_history_limit_and_order(client_factory) -> None:
    """history returns the last `limit` messages, oldest first."""
    r = room()
    c = client_factory()
    c.join(r)
    for i in range(5):
        c.say(r, f"h{i}")
    reply = c.request({"type": "history", "room": r, "limit": 3, "id": "h"}, "history")
    assert reply["id"] == "h"
    assert [m["text"] for m in reply["messages"]] == ["h2", "h3", "h4"]
    assert [m["id"] for m in reply["messages"]] == [3, 4, 5]
    before = c.request({"type": "history", "room": r, "limit": 10, "before": 3}, "history")
    assert [m["id"] for m in before["messages"]] == [1, 2]


def test_history_keeps_last_history_size() -> None:
    """Only the last HISTORY_SIZE messages are kept; ids keep counting."""
    with Server({"HISTORY_SIZE": "5", "RATE_LIMIT": "1000", "RATE_LIMIT_BURST": "1000"}) as srv:
        r = room()
        with Client(srv.url) as c:
            c.join(r)
            for i in range(8):
                c.say(r, f"k{i}")
            reply = c.request({"type": "history", "room": r, "limit": 50}, "history")
            assert [m["id"] for m in reply["messages"]] == [4, 5, 6, 7, 8]
            replay = c.request({"type": "join", "room": r, "since": 1}, "joined")
            assert replay["recovered"] is False


def test_replays_and_history_replies_are_bounded_by_bytes() -> None:
    """Without persistence too, a join's replay is at most 4 MiB (further behind:
    `recovered: false`, then the newest messages that fit) and a history reply at most
    1 MiB (the newest that fit, `truncated: true`; `before` pages back for the rest)."""
    env = {"HISTORY_SIZE": "300", "MAX_TEXT_CHARS": "16000", "RATE_LIMIT": "1000",
           "RATE_LIMIT_BURST": "1000", "RATE_LIMIT_REQUESTS": "1000",
           "RATE_LIMIT_REQUESTS_BURST": "1000", "API_KEY": API_KEY}
    with Server(env) as srv:
        r = room()
        with Client(srv.url) as writer:
            writer.join(r)
            for i in range(300):  # 300 x ~15 KB: 4.5 MB, all of it held (HISTORY_SIZE)
                writer.say(r, f"{i:05d}" + "x" * 14995)
        with Client(srv.url) as c:
            c.send({"type": "join", "room": r, "since": 0})
            c.send({"type": "ping"})  # answered after the joined and the whole replay
            joined = c.expect("joined")
            c.expect("pong")
            replayed = [e for e in c.backlog if e["type"] == "message"]
            size = sum(len(json.dumps(e, separators=(",", ":"), ensure_ascii=False))
                       for e in replayed)
            assert joined["recovered"] is False, (len(replayed), size)
            ids = [e["id"] for e in replayed]
            assert ids == list(range(ids[0], 301)) and ids[0] > 1
            assert joined["last_id"] == 300
            assert size <= 4 * 1024 * 1024
            c.backlog.clear()
            page = c.request({"type": "history", "room": r, "limit": 300}, "history")
            ids = [m["id"] for m in page["messages"]]
            assert page.get("truncated") is True, (len(ids), ids[:1])
            assert ids == list(range(ids[0], 301)) and 200 < ids[0]
            assert len(json.dumps(page, separators=(",", ":"))) <= 1024 * 1024 + 200
            older = c.request({"type": "history", "room": r, "limit": 10, "before": ids[0]},
                              "history")
            assert [m["id"] for m in older["messages"]] == list(range(ids[0] - 10, ids[0]))
            assert "truncated" not in older
        # The server API's history (metrics port) is bounded the same way.
        status, page = call(srv, "GET", f"/api/rooms/{r}/history?limit=300")
        assert status == 200 and page.get("truncated") is True
        api_ids = [m["id"] for m in page["messages"]]
        assert api_ids == list(range(api_ids[0], 301)) and 200 < api_ids[0]
        assert len(json.dumps(page, separators=(",", ":"))) <= 1024 * 1024 + 200
        status, older = call(srv, "GET", f"/api/rooms/{r}/history?limit=10&before={api_ids[0]}")
        assert status == 200 and "truncated" not in older and len(older["messages"]) == 10


def test_join_since_replays_missed_messages(client_factory) -> None:
    """join with since replays every later message in order, then recovered: true."""
    r = room()
    a = client_factory()
    a.join(r)
    for i in range(4):
        a.say(r, f"s{i}")
    b = client_factory()
    joined = b.join(r, since=1)
    assert joined["recovered"] is True
    replayed = [b.expect("message") for _ in range(3)]
    assert [m["id"] for m in replayed] == [2, 3, 4]
    assert a.say(r, "live")["id"] == 5
    assert b.expect("message")["id"] == 5


def test_join_since_unknown_future_id_not_recovered(client_factory) -> None:
    """since beyond anything the server issued: recovered false (the client reloads)."""
    c = client_factory()
    assert c.join(room(), since=999)["recovered"] is False


def test_dm_to_every_connection_and_echo(client_factory) -> None:
    """A dm reaches every connection of the recipient and echoes to the sender."""
    t = token("dave", "Dave")
    d1, d2 = client_factory(f"token={t}"), client_factory(f"token={t}")
    sender = client_factory("username=erin")
    sender.send({"type": "dm", "to": "dave", "text": "psst", "client_msg_id": "d-1"})
    echo = sender.expect("dm")
    for conn in (d1, d2):
        got = conn.expect("dm")
        assert got == echo
    assert echo["to"] == "dave" and echo["from"] == "erin"
    assert echo["user_id"] == sender.user_id and echo["text"] == "psst"
    assert isinstance(echo["id"], int) and echo["timestamp"] > 0
    sender.send({"type": "dm", "to": "dave", "text": "psst", "client_msg_id": "d-1"})
    assert sender.expect("dm") == echo
    d1.assert_silent("dm")


def test_dm_to_unknown_user(client_factory) -> None:
    """A dm to nobody connected is user_not_found."""
    c = client_factory()
    c.send({"type": "dm", "to": "nobody-here", "text": "hello?", "id": "x"})
    err = c.expect("error")
    assert err["code"] == "user_not_found" and err["id"] == "x"


def test_ping_pong_echoes_id(client_factory) -> None:
    """ping answers pong with the request id."""
    c = client_factory()
    assert c.request({"type": "ping", "id": 41}, "pong") == {"type": "pong", "id": 41}


def test_auth_message_switches_identity(client_factory) -> None:
    """auth with a valid token re-sends welcome with the token's identity."""
    c = client_factory("username=guesty")
    c.send({"type": "auth", "token": token("frank", "Frank"), "id": "a"})
    welcome = c.expect("welcome")
    assert (welcome["user_id"], welcome["username"], welcome["authenticated"]) == (
        "frank", "Frank", True)
    c.send({"type": "auth", "token": "not.a.token"})
    assert c.expect("error")["code"] == "auth_failed"


def test_a_token_cannot_take_a_guests_user_id(client_factory) -> None:
    """Guest ids are the server's (``guest-`` and 12 hex digits), and every room a guest
    joins sees its id: a token whose ``sub`` begins with ``guest-`` is refused, 401 on
    the upgrade and auth_failed on ``auth``. Accepted, its holder became that guest's
    user: it got the guest's DMs, spent its buckets, and sat in its rooms unseen (no
    presence, one entry in the users list, marked a guest)."""
    guest = client_factory()
    stolen = token(guest.user_id, "Mallory")
    with pytest.raises(InvalidStatus) as refused:
        client_factory(f"token={stolen}")
    assert refused.value.response.status_code == 401
    other = client_factory()
    other.send({"type": "auth", "token": stolen, "id": "a"})
    assert other.expect("error", id="a")["code"] == "auth_failed"
    other.send({"type": "auth", "token": token("guest-of-honour"), "id": "b"})
    assert other.expect("error", id="b")["code"] == "auth_failed"
    other.send({"type": "dm", "to": guest.user_id, "text": "for the guest only"})
    assert guest.expect("dm")["text"] == "for the guest only"
    assert other.expect("dm")["to"] == guest.user_id  # its own echo, and nothing else


def test_binary_frame_closes_1003(server: Server) -> None:
    """A binary frame closes the connection with 1003."""
    c = Client(server.url)
    c.ws.send(b"\x00\x01")
    assert c.close_code_when_closed() == 1003


def test_oversized_frame_closes_1009(server: Server) -> None:
    """A frame over MAX_MESSAGE_BYTES closes with 1009."""
    c = Client(server.url)
    c.send("x" * 70_000)
    assert c.close_code_when_closed() == 1009


def test_no_permessage_deflate(server: Server) -> None:
    """The server never accepts permessage-deflate, even when offered."""
    c = Client(server.url)  # websockets offers permessage-deflate by default
    assert c.ws.response.headers.get("Sec-WebSocket-Extensions") is None


def test_many_rooms_per_connection_limit() -> None:
    """Joining more than MAX_ROOMS_PER_CONNECTION rooms is too_many_rooms."""
    with Server({"MAX_ROOMS_PER_CONNECTION": "2"}) as srv, Client(srv.url) as c:
        c.join(room())
        c.join(room())
        c.send({"type": "join", "room": room()})
        assert c.expect("error")["code"] == "too_many_rooms"


def test_slow_member_does_not_stall_room() -> None:
    """A member that stops reading is cut off; the others keep getting messages."""
    with Server({"MAX_OUTBOUND_BYTES": "262144", "RATE_LIMIT": "100000",
                 "RATE_LIMIT_BURST": "100000"}) as srv:
        r = room()
        raw = socket.create_connection(("127.0.0.1", srv.port))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.sendall(("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        raw.recv(4096)  # handshake response (and maybe welcome)
        join = json.dumps({"type": "join", "room": r}).encode()
        raw.sendall(bytes((0x81, 0x80 | len(join))) + b"\0\0\0\0" + join)
        # The writer never reads its echoes here: let its client buffer them all.
        with Client(srv.url, max_queue=None) as writer, Client(srv.url) as reader:
            writer.join(r)
            reader.join(r)
            # More than the kernel's socket buffers (4 MiB send here) can absorb.
            text = "y" * 3000
            ids: list[int] = []
            for batch in range(30):
                for i in range(100):
                    writer.send({"type": "message", "room": r, "text": text})
                ids += [reader.expect("message")["id"] for _ in range(100)]
            assert ids == list(range(1, 3001))
            wait_until(lambda: reader.request({"type": "list_users", "room": r},
                                              "users")["users"].__len__() == 2,
                       message="the slow member to be dropped")
        status, body = srv.http("/metrics", metrics=True)
        assert b'wschat_disconnects_total{reason="slow_consumer"} 1.0' in body
        raw.close()


def test_sigterm_closes_clients_with_1001() -> None:
    """SIGTERM: every client, of many, gets close 1001 and the server exits in time."""
    srv = Server().start()
    try:
        # Enough that closing them all outlasts one turn of gunicorn's worker loop.
        clients = [Client(srv.url) for _ in range(200)]
        started = time.monotonic()
        assert srv.stop() == 0
        assert time.monotonic() - started < 10
        for c in clients:
            assert c.close_code_when_closed() == 1001
    finally:
        srv.kill()


@pytest.mark.parametrize("to_worker", [False, True], ids=["master", "group"])
def test_sigint_still_drains_the_worker(to_worker: bool) -> None:
    """SIGINT (Ctrl-C: to the master, or to the whole process group) is gunicorn's quick
    shutdown: the master sends its workers SIGQUIT, whose gunicorn handler exits the worker
    0.1 s later. The worker's drain still runs to its end: here it waits for a client that
    never answers its close frame, and logs that connection's close (before: the worker's
    loop, looking every 50 ms, reached worker_exit first, and that exit cut the drain, the
    stores' flush with it, short)."""
    with Server() as srv:
        [worker] = srv.worker_pids()
        raw = RawClient(srv.port)
        if to_worker:
            os.kill(worker, signal.SIGINT)
        assert srv.stop(signal.SIGINT) == 0
        raw.drain_to_close()
        assert raw.close_code == 1001
        output = srv.output()
        assert f"user={raw.user_id} code=1001 reason=server shutting down" in output, output
        raw.close()


# gunicorn.conf.py, and a post_fork hook that holds the new worker, still without its own
# signal handlers, until the test lets it go on.
HELD_BOOT_CONFIG = """
import os, time
__file__ = {config!r}
exec(compile(open(__file__).read(), __file__, "exec"))

def post_fork(server, worker):
    open({held!r}, "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists({go!r}) and time.monotonic() < deadline:
        time.sleep(0.01)
"""


def test_sigterm_while_a_worker_boots_stops_it(tmp_path: Path) -> None:
    """A SIGTERM that reaches a worker before it has its handlers (it boots: gevent
    patches it, the app loads) stops it once it has booted. Before, the master's handler,
    which the worker inherits at the fork, queued it where no one reads, and the worker
    served on until the master's SIGKILL, GRACEFUL_TIMEOUT (30 s here) later."""
    held, go = tmp_path / "held", tmp_path / "go"
    config = tmp_path / "held_boot.conf.py"
    config.write_text(HELD_BOOT_CONFIG.format(config=str(ROOT / "gunicorn.conf.py"),
                                              held=str(held), go=str(go)))
    srv = Server({"GRACEFUL_TIMEOUT": "30"}, config=config).start(wait=False)
    try:
        wait_until(held.exists, message="the worker held in post_fork")
        [worker] = srv.worker_pids()
        os.kill(worker, signal.SIGTERM)  # as the master's stop does, while the worker boots
        srv.terminate()
        go.touch()
        assert srv.stop(timeout=20) == 0  # before: the master's SIGKILL at 30 s
        output = srv.output()
        assert f"Worker exiting (pid: {worker})" in output, output
    finally:
        srv.kill()


def test_a_worker_freezes_what_it_was_built_from() -> None:
    """Each worker, once started, collects and freezes its start-up heap (gc.freeze):
    full collections later scan only the connections' objects, not the ~56,000 the
    modules, app and stores are made of (loadtest/RESULTS.md: their pauses shrink by
    15-25 ms at 10,000 connections)."""
    with Server() as srv:
        [worker] = srv.worker_pids()
        found: list[str] = []

        def logged() -> bool:
            found[:] = re.findall(rf"worker {worker}: (\d+) objects from start-up frozen",
                                  srv.output())
            return bool(found)

        wait_until(logged, message="the worker's freeze line")
        assert int(found[0]) > 10_000, found


def test_stopping_worker_keeps_its_heartbeat() -> None:
    """A worker told to stop while the master runs on (SIGTTOU, a worker signalled
    itself, the old workers of a SIGHUP once gunicorn stops waiting for them) keeps its
    heartbeat while it closes its connections: gunicorn aborts a worker silent for
    `timeout` (WORKER TIMEOUT, exit 1), which would cut the closes and the stores'
    flush short. Scaled down: gunicorn's --timeout 2 against a client that never
    answers its close frame (3 s); in production 30 s against a store that hangs."""
    with Server({"GUNICORN_CMD_ARGS": "--timeout 2"}) as srv:
        [worker] = srv.worker_pids()
        raw = RawClient(srv.port)
        os.kill(worker, signal.SIGTERM)
        raw.drain_to_close()
        assert raw.close_code == 1001

        def exited() -> bool:
            try:
                os.kill(worker, 0)  # until the master has reaped it
            except ProcessLookupError:
                return True
            return False

        wait_until(exited, 4 * TIMEOUT, message=f"worker {worker} to exit")
        output = srv.output()
        assert "WORKER TIMEOUT" not in output, output
        assert f"user={raw.user_id} code=1001 reason=server shutting down" in output, output
        assert "exited with code" not in output, output
        raw.close()
        # Its replacement serves (and, booted, will heed the SIGTERM that ends the test).
        wait_until(lambda: srv.http("/ready")[0] == 200, message="the replacement worker")


def test_worker_with_a_hung_store_exits_within_graceful_timeout() -> None:
    """SIGTERM while Redis hangs (SIGSTOP: the drain waits out its 5 s socket timeout): the
    worker gives up on the drain and exits by itself before the master's SIGKILL, due
    GRACEFUL_TIMEOUT (3 s) after the master's SIGTERM, though the worker's loop calls
    worker_exit later than the signal."""
    graceful = 3
    with own_redis() as redis, Server({"REDIS_URL": redis.url,
                                       "GRACEFUL_TIMEOUT": str(graceful)}) as srv:
        assert redis.proc is not None
        with Client(srv.url) as c:
            c.join("hung-store")
            os.kill(redis.proc.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                assert srv.stop() == 0
                took = time.monotonic() - started
            finally:
                os.kill(redis.proc.pid, signal.SIGCONT)
        output = srv.output()
        assert "shutdown not done" in output, output  # the worker's limit ended the drain
        assert took < graceful, f"{took:.2f} s: the master had to kill the worker\n{output}"


@pytest.mark.parametrize("value, seconds", [("2.9", 3), ("1.5", 2), ("25", 25)])
def test_fractional_graceful_timeout_rounded_up(value: str, seconds: int) -> None:
    """gunicorn counts GRACEFUL_TIMEOUT in whole seconds (the master SIGKILLs the workers
    that long after SIGTERM): a fraction is rounded up, never down below the time the
    worker budgets its drain with."""
    done = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
         "--print-config", "wschat:app"],
        env={**os.environ, "GRACEFUL_TIMEOUT": value}, cwd=ROOT, capture_output=True,
        text=True, timeout=6 * TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr
    printed = re.search(r"^graceful_timeout\s*=\s*(\S+)$", done.stdout, re.MULTILINE)
    assert printed is not None, done.stdout
    assert printed.group(1) == str(seconds), f"GRACEFUL_TIMEOUT={value}: {printed.group(0)}"


def test_many_workers_without_redis_refused() -> None:
    """WEB_CONCURRENCY=2 without REDIS_URL stops at start with a clear message."""
    srv = Server({"REDIS_URL": ""}, workers=2)
    srv.start(wait=False)
    assert srv.proc is not None
    assert srv.proc.wait(20) != 0
    assert "WEB_CONCURRENCY" in srv.output() and "REDIS_URL" in srv.output()


def test_workers_from_gunicorn_options_without_redis_refused() -> None:
    """gunicorn's own --workers (here through GUNICORN_CMD_ARGS, which overrides the config
    file) cannot start a second worker without REDIS_URL either: rooms would split."""
    srv = Server({"REDIS_URL": "", "GUNICORN_CMD_ARGS": "--workers 2"})
    srv.start(wait=False)
    assert srv.proc is not None
    try:
        assert srv.proc.wait(20) != 0, srv.output()
    finally:
        srv.kill()
    assert "2 workers need REDIS_URL" in srv.output(), srv.output()


def test_sigttin_without_redis_adds_no_worker() -> None:
    """SIGTTIN asks gunicorn for one more worker; without REDIS_URL the master refuses
    (the two would hold separate rooms) and keeps serving with one."""
    import signal

    with Server({"REDIS_URL": ""}) as srv:
        assert srv.proc is not None
        [worker] = srv.worker_pids()
        srv.proc.send_signal(signal.SIGTTIN)
        wait_until(lambda: "2 workers need REDIS_URL" in srv.output(),
                   message="the refusal in the master's log")
        # The change is refused before gunicorn acts on it, in the same turn of its loop.
        assert srv.worker_pids() == [worker], srv.output()
        assert srv.http("/ready")[0] == 200


def test_ipv6_host_listens() -> None:
    """HOST=:: (every address, IPv6 and, dual-stack, IPv4) is a listen address like
    0.0.0.0: gunicorn needs it bracketed in its bind address."""
    with Server({"HOST": "::"}) as srv:  # the helper reaches it on 127.0.0.1
        assert srv.http("/health")[0] == 200 and srv.http("/ready", metrics=True)[0] == 200
        with Client(srv.url) as c:
            assert c.welcome["type"] == "welcome"


def test_bad_config_value_names_variable() -> None:
    """A malformed variable stops the server and names the variable."""
    srv = Server({"HISTORY_SIZE": "lots"})
    srv.start(wait=False)
    assert srv.proc is not None
    assert srv.proc.wait(20) != 0
    assert "HISTORY_SIZE" in srv.output()


def test_worker_connections_allows_max_connections() -> None:
    """gunicorn's worker_connections is raised to reach MAX_CONNECTIONS."""
    import runpy

    cfg = runpy.run_path(str(__import__("conftest").ROOT / "gunicorn.conf.py"))
    assert cfg["worker_connections"] >= 10000


def test_heartbeat_pings_are_spread_over_the_interval() -> None:
    """Each connection's ping has its own phase: 40 connections opened together are not
    all pinged in the same instant (10,000 at once stalled delivery for ~200 ms)."""
    from concurrent.futures import ThreadPoolExecutor

    from rawws import OP_PING, RawClient

    interval = 2.0
    with Server({"HEARTBEAT_INTERVAL": str(interval)}) as srv:
        clients = [RawClient(srv.port) for _ in range(40)]

        def first_ping(client: RawClient) -> float:
            while client.next_frame(timeout=2 * interval + TIMEOUT)[0] != OP_PING:
                pass
            return time.monotonic()

        try:
            with ThreadPoolExecutor(len(clients)) as pool:
                times = list(pool.map(first_ping, clients))
        finally:
            for client in clients:
                client.close()
    assert max(times) - min(times) > interval / 4, sorted(t - min(times) for t in times)


@pytest.mark.parametrize("xff, trusted, expected", [
    ("", 0, "10.0.0.9"),
    ("6.6.6.6", 0, "10.0.0.9"),  # no proxy trusted: a client's header is ignored
    ("1.2.3.4", 1, "1.2.3.4"),
    ("6.6.6.6, 1.2.3.4", 1, "1.2.3.4"),  # the client prepended a fake entry
    ("6.6.6.6, 1.2.3.4, 10.1.1.1", 2, "1.2.3.4"),
    ("1.2.3.4", 2, "10.0.0.9"),  # fewer entries than proxies: not through them all
])
def test_client_address_behind_trusted_proxies(xff: str, trusted: int, expected: str) -> None:
    """TRUSTED_PROXIES picks the address the outermost trusted proxy saw, never a claim."""
    from wschat.transport import remote_address

    environ = {"REMOTE_ADDR": "10.0.0.9", "HTTP_X_FORWARDED_FOR": xff}
    assert remote_address(environ, trusted) == expected
