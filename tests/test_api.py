"""The server HTTP API (wschat.api) against real servers: every endpoint, its errors,
its authentication, and its OpenAPI document.

Cross-pod moderation through the API (Redis) is in tests/test_access.py.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from conftest import TIMEOUT, Client, Server, wait_until
from test_chat import Clock, make_chat
from wschat.api import OPENAPI, register_api
from wschat.auth import mint_token

SECRET = "api-test-secret-0123456789abcdef0123456"
API_KEY = "api-test-key-0123456789abcdef"


def call(server: Server, method: str, path: str, body: Any = None, key: str | None = API_KEY,
         raw: bytes | None = None, metrics_port: bool = True) -> tuple[int, Any]:
    port = server.metrics_port if metrics_port else server.port
    data = raw if raw is not None else json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text)
        except ValueError:
            return err.code, text


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    db = tmp_path_factory.mktemp("api") / "api.db"
    with Server({"JWT_SECRET": SECRET, "API_KEY": API_KEY, "PRIVATE_ROOMS": "team-*",
                 "RATE_LIMIT": "1000", "RATE_LIMIT_BURST": "1000", "HISTORY_SIZE": "50",
                 "ENABLE_PERSISTENCE": "true", "DATABASE_URL": f"sqlite:///{db}"}) as srv:
        yield srv


def user(server: Server, sub: str, **claims: Any) -> Client:
    return Client(server.url, f"token={mint_token(SECRET, sub, **claims)}")


def test_publish_goes_the_users_way(server: Server) -> None:
    """An API message gets the room's next id, reaches members, is in history and is
    recovered by join.since, marked user_id "system"; a client_msg_id retry is not re-sent."""
    with user(server, "ann") as ann:
        ann.join("news")
        first = ann.say("news", "from ann")
        status, body = call(server, "POST", "/api/publish",
                            {"room": "news", "text": "deploy at 5", "client_msg_id": "d-1"})
        assert status == 200 and body == {"id": first["id"] + 1, "room": "news",
                                          "duplicate": False}
        event = ann.expect("message", text="deploy at 5")
        assert (event["user_id"], event["from"], event["id"]) == ("system", "system", body["id"])
        assert call(server, "POST", "/api/publish", {"room": "news", "text": "deploy at 5",
                                                     "client_msg_id": "d-1"})[1]["duplicate"]
        ann.assert_silent("message")
        status, named = call(server, "POST", "/api/publish",
                             {"room": "news", "text": "hello", "from": "Release bot"})
        assert ann.expect("message", text="hello")["from"] == "Release bot"
    with user(server, "ann") as again:
        joined = again.join("news", since=first["id"])
        assert joined["recovered"] is True
        assert [again.expect("message")["id"] for _ in range(2)] == [body["id"], named["id"]]
    status, history = call(server, "GET", "/api/rooms/news/history?limit=2")
    assert status == 200
    assert [m["text"] for m in history["messages"]] == ["deploy at 5", "hello"]
    status, older = call(server, "GET", f"/api/rooms/news/history?before={body['id']}")
    assert [m["text"] for m in older["messages"]] == ["from ann"]


def test_dm_from_the_server(server: Server) -> None:
    """/api/dm delivers to an online user; unknown users are 404 user_not_found."""
    with user(server, "bea") as bea:
        status, body = call(server, "POST", "/api/dm", {"to": "bea", "text": "welcome!"})
        assert status == 200 and body["delivered"] is True
        event = bea.expect("dm")
        assert (event["id"], event["user_id"], event["text"]) == (body["id"], "system",
                                                                  "welcome!")
    status, body = call(server, "POST", "/api/dm", {"to": "nobody-ever", "text": "x"})
    assert (status, body["error"]["code"]) == (404, "user_not_found")


def test_dm_to_a_full_inbox_is_409_inbox_full(tmp_path: Path) -> None:
    """Past the kept-DM bound, /api/dm answers 409 inbox_full, as a user's dm gets
    inbox_full (before: 500 internal_error and a traceback)."""
    from test_chat import FakeSession
    from test_delivery import durable_chat

    clock = Clock()
    with durable_chat(tmp_path, clock, API_KEY=API_KEY) as (chat, durable):
        durable.max_kept_dms = 1
        fay = FakeSession("fay", "Fay", True)
        chat.open(fay)
        chat.close(fay)
        app = Flask(__name__)
        register_api(app, chat, 8081, clock)
        client = app.test_client()

        def dm(text: str) -> Any:
            return client.post("/api/dm", json={"to": "fay", "text": text},
                               base_url="http://localhost:8081",
                               headers={"Authorization": f"Bearer {API_KEY}"})

        kept = dm("one")
        assert kept.status_code == 200 and kept.json["delivered"] is False
        full = dm("two")
        assert (full.status_code, full.json["error"]["code"]) == (409, "inbox_full")
        assert "409" in OPENAPI["paths"]["/api/dm"]["post"]["responses"]


def test_a_publish_refused_by_the_store_is_logged_as_a_websocket_request_is(
        caplog: pytest.LogCaptureFixture) -> None:
    """/api/publish refused with 503 because the store cannot take it (Redis away, or a
    worker numbering in the database during a rolling update that turns persistence on or
    off) is logged by the worker as a refused WebSocket request is, at most once per 10 s
    (before: only its caller saw why; a server posting through the API alone logged
    nothing, and its operator could not tell why messages stopped)."""
    from wschat.stores.base import Unavailable

    clock = Clock()
    chat = make_chat(clock, API_KEY=API_KEY)

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise Unavailable("messages are numbered by the database in another worker")

    chat.stores.messages.post_room = refused  # type: ignore[method-assign]
    app = Flask(__name__)
    register_api(app, chat, 8081, clock)
    client = app.test_client()

    def publish() -> Any:
        return client.post("/api/publish", json={"room": "news", "text": "x"},
                           base_url="http://localhost:8081",
                           headers={"Authorization": f"Bearer {API_KEY}"})

    with caplog.at_level("WARNING", logger="wschat.chat"):
        assert [publish().status_code for _ in range(3)] == [503] * 3
    logged = [r.getMessage() for r in caplog.records if "store unavailable" in r.getMessage()]
    assert logged == ["refusing requests: store unavailable (messages are numbered by the "
                      "database in another worker)"]


def test_a_dm_no_worker_heard_is_not_logged_as_a_store_outage(
        caplog: pytest.LogCaptureFixture) -> None:
    """A DM stored but heard by no worker of its users (one was subscribing: churn) is
    refused for a retry, and was logged "refusing requests: store unavailable", sending
    operators after an outage that was not there. It is an INFO line of its own now (at
    most one per 10 s), and does not use up the outage warning's turn."""
    from wschat.stores.base import Unavailable, Unheard
    from wschat.stores.durable import UNHEARD_DM

    clock = Clock()
    chat = make_chat(clock)
    with caplog.at_level("DEBUG", logger="wschat.chat"):
        for _ in range(3):
            chat.log_unavailable(Unheard(UNHEARD_DM))
        chat.log_unavailable(Unavailable("Redis went away"))
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == ["INFO", "WARNING"], lines
    assert "store unavailable" not in lines[0][1] and "retry" in lines[0][1], lines
    assert lines[1][1] == "refusing requests: store unavailable (Redis went away)"


def test_an_api_dm_kept_for_a_user_who_connects_meanwhile_reaches_her_connection(
        tmp_path: Path) -> None:
    """/api/dm to a user its check found offline, who connects before the DM is
    committed as kept (her connection read her kept DMs first), reaches that connection,
    as a user's dm does (before: 200, and she got nothing until her next connection)."""
    from test_delivery import (
        _away,
        _connects_during_the_dm_check,
        _HeldSession,
        _read_all,
        durable_chat,
    )

    clock = Clock()
    with durable_chat(tmp_path, clock, API_KEY=API_KEY) as (chat, durable):
        _away(chat, "fay", "Fay")
        again = _HeldSession("fay", "Fay", True)
        _connects_during_the_dm_check(chat, durable, again)
        app = Flask(__name__)
        register_api(app, chat, 8081, clock)
        sent = app.test_client().post("/api/dm", json={"to": "fay", "text": "race"},
                                      base_url="http://localhost:8081",
                                      headers={"Authorization": f"Bearer {API_KEY}"})
        assert sent.status_code == 200 and sent.json["delivered"] is False
        _read_all(again)  # she reads what is written to her
        assert [(e["id"], e["text"]) for e in again.events("dm")] == [(sent.json["id"],
                                                                       "race")]


def test_rooms_users_members_and_info(server: Server) -> None:
    """Listing rooms and users, private-room membership, and the server's figures."""
    with user(server, "cid") as cid, user(server, "dot") as dot:
        cid.join("plaza")
        dot.join("plaza")
        rooms = call(server, "GET", "/api/rooms")[1]["rooms"]
        assert {"room": "plaza", "users": 2, "private": False} in rooms
        status, users = call(server, "GET", "/api/rooms/plaza/users")
        assert [u["user_id"] for u in users["users"]] == ["cid", "dot"]
        status, body = call(server, "POST", "/api/rooms/team-x/members", {"user_id": "dot"})
        assert (status, body["changed"], body["private"]) == (200, True, True)
        assert call(server, "GET", "/api/rooms/team-x/members")[1]["members"] == ["dot"]
        dot.join("team-x")
        cid.send({"type": "join", "room": "team-x", "id": 1})
        assert cid.expect("error", id=1)["code"] == "forbidden"
        status, body = call(server, "DELETE", "/api/rooms/team-x/members/dot")
        assert (status, body["member"], body["changed"]) == (200, False, True)
        assert dot.expect("left", room="team-x")["reason"] == "membership revoked"
        # a token's sub may hold "/" (only control characters are refused)
        for path in ("google/123", "google%2F123"):
            call(server, "POST", "/api/rooms/team-x/members", {"user_id": "google/123"})
            status, body = call(server, "DELETE", f"/api/rooms/team-x/members/{path}")
            assert (status, body["user_id"], body["changed"]) == (200, "google/123", True)
        assert call(server, "GET", "/api/rooms/team-x/members")[1]["members"] == []
        status, info = call(server, "GET", "/api/info")
        assert status == 200 and info["backend"] == "memory" and info["pods"] == 1
        assert info["connections"] >= 2 and len(info["workers"]) == 1
        assert info["private_rooms"] == ["team-*"]


def test_kick_ban_unban_mute_unmute_disconnect(server: Server) -> None:
    """The moderation endpoints act on live connections and say what they did."""
    with user(server, "eve") as eve, user(server, "eve") as eve2:
        eve.join("hall")
        status, body = call(server, "POST", "/api/kick",
                            {"room": "hall", "user_id": "eve", "reason": "cool down"})
        assert (status, body["kicked"]) == (200, True)
        assert eve.expect("left") == {"type": "left", "room": "hall", "reason": "cool down",
                                      "by": "api"}
        assert call(server, "POST", "/api/kick", {"room": "hall", "user_id": "eve"})[1][
            "kicked"] is False
        status, body = call(server, "POST", "/api/mute",
                            {"user_id": "eve", "room": "hall", "duration": 30})
        assert status == 200 and body["until"] > time.time() * 1000
        assert eve.expect("muted")["room"] == "hall"
        assert call(server, "POST", "/api/unmute", {"user_id": "eve", "room": "hall"})[1][
            "lifted"] is True
        eve.expect("unmuted")
        status, body = call(server, "POST", "/api/ban", {"user_id": "eve", "room": "hall"})
        assert (status, body["until"]) == (200, None)
        eve.send({"type": "join", "room": "hall", "id": 4})
        assert eve.expect("error", id=4)["reason"] == "banned"
        assert call(server, "POST", "/api/unban", {"user_id": "eve", "room": "hall"})[1][
            "lifted"] is True
        assert call(server, "POST", "/api/unban", {"user_id": "eve", "room": "hall"})[1][
            "lifted"] is False
        status, body = call(server, "POST", "/api/disconnect", {"user_id": "eve"})
        assert (status, body["closed"]) == (200, 2)
        assert eve.close_code_when_closed() == 4003
        assert eve2.close_code_when_closed() == 4003
    wait_until(lambda: call(server, "GET", "/api/info")[1]["connections"] == 0,
               message="eve's connections to close")


def test_room_users_are_as_the_openapi_document_says(server: Server) -> None:
    """GET /api/rooms/{room}/users marks a guest `guest: true`, as `joined` does; the OpenAPI
    document names every field an entry has (it left `guest` out)."""
    item = OPENAPI["paths"]["/api/rooms/{room}/users"]["get"]["responses"]["200"]["content"][
        "application/json"]["schema"]["properties"]["users"]["items"]
    with user(server, "uma") as uma, Client(server.url, "username=gil") as gil:
        uma.join("porch")
        gil.join("porch")
        status, body = call(server, "GET", "/api/rooms/porch/users")
    assert status == 200 and body["users"] == [
        {"user_id": "uma", "username": "uma"},
        {"user_id": gil.user_id, "username": "gil", "guest": True}]
    for entry in body["users"]:
        assert set(entry) <= set(item["properties"]), entry


def test_a_ban_until_lifted_says_until_null_as_it_happens(server: Server) -> None:
    """A ban without `duration` is told with `until: null` (README: "Unix ms, null: until
    lifted") in the `left` of a room ban and the `error` `forbidden` before 4003 of a ban
    everywhere, as a later `join` or connection is refused: the live events left `until`
    out, so a client reading `until` got nothing (undefined, a missing key) instead of
    null."""
    with user(server, "ivy") as ivy:
        ivy.join("den")
        assert call(server, "POST", "/api/ban", {"user_id": "ivy", "room": "den"})[1][
            "until"] is None
        assert ivy.expect("left") == {"type": "left", "room": "den", "reason": "banned",
                                      "by": "api", "until": None}
        ivy.send({"type": "join", "room": "den", "id": 1})
        assert ivy.expect("error", id=1)["until"] is None
        assert call(server, "POST", "/api/ban", {"user_id": "ivy", "reason": "spam"})[0] == 200
        assert ivy.expect("error") == {"type": "error", "code": "forbidden",
                                       "message": "you are banned from this server",
                                       "reason": "banned", "note": "spam", "until": None}
        assert ivy.close_code_when_closed() == 4003
    for room in (None, "den"):
        call(server, "POST", "/api/unban", {"user_id": "ivy", "room": room})


def test_user_ids_are_those_a_user_can_have(server: Server) -> None:
    """Every endpoint that stores or sends something for a user_id takes one a token's sub
    may be, or a guest's server-given id: control characters, `system`, `api` or a
    `guest-` id no guest has are 400 (and nothing is stored for them); a guest is kicked,
    muted and banned as any user. The lifts take those too (what an earlier release
    stored: test_restrictions_stored_for_ids_no_user_can_have_can_still_be_lifted), never
    one over 128 characters."""
    bad = ["a\x00b", "a\nb", "a\x85b", "system", "api", "guest-x", "x" * 129]
    for user_id in bad:
        for path, body in (("/api/kick", {"room": "hall"}), ("/api/ban", {}),
                           ("/api/mute", {"room": "hall"}), ("/api/disconnect", {}),
                           ("/api/rooms/team-x/members", {})):
            status, got = call(server, "POST", path, {**body, "user_id": user_id})
            assert (status, got["error"]["code"]) == (400, "invalid_request"), (path, user_id)
            assert "user_id" in got["error"]["message"]
    for path in ("/api/unban", "/api/unmute"):
        status, got = call(server, "POST", path, {"user_id": "x" * 129})
        assert (status, got["error"]["code"]) == (400, "invalid_request"), path
        assert "user_id" in got["error"]["message"]
    status, got = call(server, "DELETE", f"/api/rooms/team-x/members/{'x' * 129}")
    assert (status, got["error"]["code"]) == (400, "invalid_request")
    assert call(server, "GET", "/api/rooms/team-x/members")[1]["members"] == []
    with Client(server.url) as guest:
        guest.join("hall")
        assert call(server, "POST", "/api/mute", {"user_id": guest.user_id, "room": "hall"}
                    )[0] == 200
        guest.expect("muted")
        status, body = call(server, "POST", "/api/kick", {"user_id": guest.user_id,
                                                          "room": "hall"})
        assert (status, body["kicked"]) == (200, True)
        assert guest.expect("left")["by"] == "api"
        status, body = call(server, "POST", "/api/ban", {"user_id": guest.user_id})
        assert status == 200
        assert guest.close_code_when_closed() == 4003


def test_restrictions_stored_for_ids_no_user_can_have_can_still_be_lifted() -> None:
    """Before user ids were checked, the API stored memberships, bans and mutes for any
    id of 1-128 characters (`system`, a made-up `guest-` id, a sub tokens may no longer
    hold). Lifting stores nothing: DELETE of a member, unban and unmute still take such an
    id, so what an earlier release stored can be taken out (GET members listed it, and
    its DELETE was 400 for good)."""
    from wschat.stores.moderation import EVERYWHERE

    clock = Clock()
    chat = make_chat(clock, API_KEY=API_KEY, PRIVATE_ROOMS="team-*")
    store = chat.access.store
    legacy = ["guest-x", "system", "api", "a\tb"]
    for user_id in legacy:
        store.set_member("team-x", user_id, True)
        store.restrict("ban", EVERYWHERE, user_id, float("inf"))
        store.restrict("mute", "hall", user_id, float("inf"))
    app = Flask(__name__)
    register_api(app, chat, 8081, clock)
    client = app.test_client()
    auth = {"Authorization": f"Bearer {API_KEY}"}

    def api(method: str, path: str, body: Any = None) -> Any:
        return client.open(path, method=method, json=body, headers=auth,
                           base_url="http://localhost:8081")

    assert sorted(api("GET", "/api/rooms/team-x/members").json["members"]) == sorted(legacy)
    for user_id in legacy:
        quoted = urllib.parse.quote(user_id, safe="")
        got = api("DELETE", f"/api/rooms/team-x/members/{quoted}")
        assert (got.status_code, got.json.get("changed")) == (200, True), (user_id, got.json)
        got = api("POST", "/api/unban", {"user_id": user_id})
        assert (got.status_code, got.json.get("lifted")) == (200, True), (user_id, got.json)
        got = api("POST", "/api/unmute", {"user_id": user_id, "room": "hall"})
        assert (got.status_code, got.json.get("lifted")) == (200, True), (user_id, got.json)
    assert api("GET", "/api/rooms/team-x/members").json["members"] == []
    # never anything that could not have been stored: empty, too long, no string
    for user_id in ("", "x" * 129, 7):
        got = api("POST", "/api/unban", {"user_id": user_id})
        assert (got.status_code, got.json["error"]["code"]) == (400, "invalid_request")
    # and what stores one is as strict as before
    for user_id in legacy:
        got = api("POST", "/api/ban", {"user_id": user_id})
        assert (got.status_code, got.json["error"]["code"]) == (400, "invalid_request")


@pytest.mark.parametrize("method, path, body, status, code", [
    ("POST", "/api/publish", {"room": "bad room", "text": "x"}, 400, "invalid_room"),
    ("POST", "/api/publish", {"room": "r"}, 400, "invalid_message"),
    ("POST", "/api/publish", {"room": "r", "text": "x" * 5000}, 413, "message_too_large"),
    ("POST", "/api/publish", {"room": "r", "text": "x", "from": ""}, 400, "invalid_request"),
    ("POST", "/api/publish", [1], 400, "invalid_request"),
    ("POST", "/api/ban", {"user_id": "u", "duration": -5}, 400, "invalid_request"),
    ("POST", "/api/mute", {"user_id": 7}, 400, "invalid_request"),
    ("POST", "/api/kick", {"user_id": "u"}, 400, "invalid_message"),
    ("GET", "/api/rooms/r/history?limit=x", None, 400, "invalid_request"),
    # what Python's int() takes but is no integer in a URL: "1_0" was 10, "%D9%A5" (an
    # Arabic-Indic 5) was 5, and " 5", "+5" were 5
    ("GET", "/api/rooms/r/history?limit=1_0", None, 400, "invalid_request"),
    ("GET", "/api/rooms/r/history?limit=%D9%A5", None, 400, "invalid_request"),
    ("GET", "/api/rooms/r/history?limit=%205", None, 400, "invalid_request"),
    ("GET", "/api/rooms/r/history?before=%2B5", None, 400, "invalid_request"),
    ("GET", "/api/nothing-here", None, 404, "not_found"),
    ("GET", "/api/publish", None, 405, "method_not_allowed"),
])
def test_errors_are_json_with_fitting_status(server: Server, method: str, path: str,
                                             body: Any, status: int, code: str) -> None:
    """Bad requests get {error: {code, message}} and the status that fits."""
    got_status, got = call(server, method, path, body)
    assert got_status == status
    assert got["error"]["code"] == code and got["error"]["message"]


def _raw_post(server: Server, framing: bytes) -> bytes:
    """POST /api/publish with a hand-made body (``framing``: its headers' end and the
    body); the answer, read to the end of the stream (the client sends no more)."""
    with socket.create_connection(("127.0.0.1", server.metrics_port), timeout=TIMEOUT) as s:
        s.sendall(b"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  + f"Authorization: Bearer {API_KEY}\r\n".encode() + framing)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("framing", [
    b"Transfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n",  # no chunk size
    b"Transfer-Encoding: chunked\r\n\r\n50\r\n{\"room\"",  # cut short
    b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n",  # no CRLF after the chunk
    b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFF\r\nxx",  # a chunk larger than any
])
def test_a_body_that_cannot_be_read_is_400(server: Server, framing: bytes) -> None:
    """A request body broken in its framing (chunked encoding gone wrong) is the client's
    error: 400 invalid_request, and no ERROR line. It was 500 internal_error, logged with a
    traceback as the server's own failure."""
    logged = len(server.output())
    answer = _raw_post(server, framing)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer[:300]
    assert json.loads(body)["error"]["code"] == "invalid_request"
    assert " ERROR " not in server.output()[logged:]


def test_method_not_allowed_names_the_allowed_ones(server: Server) -> None:
    """A 405 says which methods the path takes (Allow, which RFC 9110 requires of it), as
    the server's other paths do; its body is the API's error, as before."""
    for method, path, allowed in (("PUT", "/api/publish", {"POST"}),
                                  ("POST", "/api/info", {"GET", "HEAD"}),
                                  ("GET", "/api/rooms/r/members/u", {"DELETE"})):
        request = urllib.request.Request(f"http://127.0.0.1:{server.metrics_port}{path}",
                                         method=method,
                                         headers={"Authorization": f"Bearer {API_KEY}"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=TIMEOUT)
        err = caught.value
        assert err.code == 405
        assert allowed <= {m.strip() for m in err.headers.get("Allow", "").split(",")}, path
        assert err.headers.get("Content-Type") == "application/json"
        assert json.loads(err.read())["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("metrics_port", [True, False])
def test_a_method_http_does_not_define_is_answered_as_the_apis_errors(
        server: Server, metrics_port: bool) -> None:
    """A method HTTP does not define (PURGE) on an API path is 501 not_implemented as the
    API's JSON error, on either port; it was text/plain ("method not implemented"), the
    one answer under /api/ an API client could not read as {error: {code, message}}."""
    port = server.metrics_port if metrics_port else server.port
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/info", method="PURGE",
                                     headers={"Authorization": f"Bearer {API_KEY}"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=TIMEOUT)
    err = caught.value
    assert err.code == 501
    assert err.headers.get("Content-Type") == "application/json"
    assert json.loads(err.read())["error"]["code"] == "not_implemented"
    assert server.http("/health")[0] == 200  # elsewhere, as before
    assert _purge(server, "/health") == (501, b"method not implemented\n")


def _purge(server: Server, path: str) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", method="PURGE")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_invalid_json_and_oversized_bodies(server: Server) -> None:
    """A body that is not JSON is 400; one over 256 KiB is 413 before it is parsed."""
    status, body = call(server, "POST", "/api/publish", raw=b"{nope")
    assert (status, body["error"]["code"]) == (400, "invalid_json")
    status, body = call(server, "POST", "/api/publish", raw=b" " * (256 * 1024 + 1))
    assert (status, body["error"]["code"]) == (413, "too_large")


def test_what_the_document_says_of_every_call_holds_for_a_get(server: Server) -> None:
    """The OpenAPI document lists 413 for every call, a GET's too (a body over 256 KiB is
    refused before it is read, whatever the call), and says HEAD answers as GET without
    the body and OPTIONS 200 with Allow."""
    assert "413" in OPENAPI["paths"]["/api/info"]["get"]["responses"]
    with socket.create_connection(("127.0.0.1", server.metrics_port), timeout=TIMEOUT) as s:
        s.sendall(b"GET /api/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  + f"Authorization: Bearer {API_KEY}\r\n".encode()
                  + b"Content-Length: 300000\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    assert json.loads(body)["error"]["code"] == "too_large"
    for method, status in (("HEAD", 200), ("OPTIONS", 200)):
        request = urllib.request.Request(f"http://127.0.0.1:{server.metrics_port}/api/info",
                                         method=method,
                                         headers={"Authorization": f"Bearer {API_KEY}"})
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            assert resp.status == status and resp.read() == b""
            if method == "OPTIONS":
                assert {"GET", "HEAD", "OPTIONS"} <= {
                    m.strip() for m in resp.headers["Allow"].split(",")}


def test_api_key_is_required_and_only_on_the_metrics_port(server: Server) -> None:
    """No or a wrong key: 401; the public port never serves /api."""
    for key in (None, "wrong-key-0123456789", API_KEY + "x"):
        status, body = call(server, "GET", "/api/info", key=key)
        assert (status, body["error"]["code"]) == (401, "unauthorized")
    status, body = call(server, "GET", "/api/info", metrics_port=False)
    assert status == 404
    assert server.http("/health")[0] == 200  # the rest of the server is untouched


def test_openapi_document_matches_the_routes(server: Server) -> None:
    """/api/openapi.json is valid OpenAPI 3.1, and every route under /api is in it with its
    methods, and nothing else."""
    from openapi_spec_validator import validate

    status, served = call(server, "GET", "/api/openapi.json")
    assert status == 200 and served == json.loads(json.dumps(OPENAPI))
    validate(served)  # a valid OpenAPI 3.1 document
    app = Flask(__name__)
    register_api(app, make_chat(Clock()), 8081, time.time)
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/"):
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
            routes.setdefault(path, set()).update(
                m.lower() for m in rule.methods - {"HEAD", "OPTIONS"})
    documented = {path: set(ops) for path, ops in OPENAPI["paths"].items()}
    assert routes == documented
    for path, ops in OPENAPI["paths"].items():
        for op in ops.values():
            names = {p["name"] for p in op.get("parameters", ()) if p["in"] == "path"}
            assert names == set(re.findall(r"{(\w+)}", path)), path
            assert "413" in op["responses"], path  # any call's body is bound, a GET's too

    def body(path: str) -> dict[str, Any]:
        return dict(OPENAPI["paths"][path]["post"]["requestBody"]["content"][
            "application/json"]["schema"]["properties"])

    assert "reason" in body("/api/ban") and "reason" not in body("/api/mute")  # as served
    assert body("/api/publish")["from"]["maxLength"] == 64


def test_readme_documents_every_endpoint() -> None:
    """The README's API reference names every documented endpoint."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for path, ops in OPENAPI["paths"].items():
        for method in ops:
            assert f"`{method.upper()} {path}`" in readme, f"{method.upper()} {path}"
