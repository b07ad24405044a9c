"""Room access control and moderation (wschat.access) in the chat core, then on real servers.

The core tests drive :class:`wschat.chat.Chat` with recording sessions, memory
stores and a fake clock (expiry without waiting). The server tests use real
gunicorn servers and WebSocket clients: tokens with ``rooms``/``mod_rooms``,
and two servers on one Redis for what must hold across pods.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import TIMEOUT, Client, Server, redis_url_or_skip
from test_chat import Clock, FakeSession, make_chat, send
from wschat.access import SessionAccess, matches, room_patterns
from wschat.auth import Identity, mint_token
from wschat.chat import Chat
from wschat.config import ConfigError, Settings
from wschat.stores.moderation import (
    EVERYWHERE, MemoryModerationStore, ModerationStore, Standing,
)

SECRET = "access-test-secret-0123456789abcdef0123"
API_KEY = "access-test-api-key-0123456789"
REDIS_DB = 25  # this module's own database on the session's Redis


# -- patterns --------------------------------------------------------------------------

@pytest.mark.parametrize("patterns, room, expected", [
    (("*",), "anything", True),
    (("team-*",), "team-red", True),
    (("team-*",), "teams", False),
    (("team-*",), "xteam-red", False),
    (("a.b",), "aXb", False),  # "." is literal, not a regex wildcard
    (("*-ops",), "eu-ops", True),
    ((), "lobby", False),
    (("Lobby",), "lobby", False),  # case-sensitive, like room names
    (("*a*a*b",), "xaxaxb", True),
    (("*a*a*b",), "aab", True),
    (("*a*a*b",), "ab", False),
    (("a*a",), "a", False),  # the two ends may not share a character
    (("a*a",), "aa", True),
    (("a*",), "a", True),
    (("*a*",), "a", True),
    (("a**b",), "ab", True),
    (("x*y*z",), "xzyz", True),
    (("x*y*z",), "xzzy", False),
    (("nope", "t*-*"), "t-red-", True),  # any of them
])
def test_pattern_matching(patterns: tuple[str, ...], room: str, expected: bool) -> None:
    """`*` matches any run of characters; everything else is literal."""
    assert matches(patterns, room) is expected


@pytest.mark.parametrize("value", ["lobby", [1], ["a b"], ["x" * 65], ["(a|b)"],
                                   ["*"] * 257])
def test_bad_patterns_are_refused(value: Any) -> None:
    """Claims and settings must be lists of room-name characters and `*`."""
    with pytest.raises(ValueError):
        room_patterns(value)


def test_moderation_commands_parse() -> None:
    """kick/mute/unmute become one Moderate command; duration and reason are bounded."""
    from wschat.protocol import Moderate, ProtocolError, parse_command

    assert parse_command('{"type": "mute", "room": "r", "user_id": "u", "duration": 1.5, '
                         '"id": 3}') == Moderate("mute", "r", "u", 1.5, None, 3)
    assert parse_command('{"type": "kick", "room": "r", "user_id": "u", "reason": "spam"}'
                         ) == Moderate("kick", "r", "u", None, "spam")
    for bad in ('{"type": "unmute", "room": "r"}', '{"type": "mute", "room": "r", '
                '"user_id": "u", "duration": true}',
                '{"type": "kick", "room": "r", "user_id": "u", "reason": "%s"}' % ("x" * 201),
                '{"type": "kick", "room": "r", "user_id": ""}',
                # shown to the kicked user: no control or bidi characters (as /api/kick)
                '{"type": "kick", "room": "r", "user_id": "u", "reason": "\\u202eamps"}',
                '{"type": "kick", "room": "r", "user_id": "u", "reason": "a\\u0000b"}',
                '{"type": "kick", "room": "r", "user_id": "u", "reason": "\\u001b[2J"}'):
        with pytest.raises(ProtocolError) as info:
            parse_command(bad)
        assert info.value.code.value == "invalid_message"


# Ids no user can have: control characters (C0, DEL, C1), a lone surrogate, empty, too
# long, the reserved `system` and `api`, and `guest-` ids the server never gives a guest.
NO_USERS_IDS = ["a\x00b", "a\nb", "\x1b[2J", "a\x7fb", "a\x85b", "", "x" * 129,
                "system", "api", "guest-", "guest-x", "guest-0123456789AB", "guest-0123456789abc"]
USERS_IDS = ["u", "google/123", "x" * 128, "Ünïcode ✓", "guest-0123456789ab", "systems",
             "api-2", "guest_1"]


def test_moderation_user_ids_are_those_a_user_can_have() -> None:
    """kick/mute/unmute name a user a token's `sub` may be (wschat.auth's rule) or a
    guest's server-given id; any other is `invalid_message`, not a restriction stored
    for an id nobody has."""
    from wschat.auth import Authenticator, AuthError
    from wschat.protocol import ProtocolError, parse_command

    auth = Authenticator(Settings.from_env({"JWT_SECRET": SECRET_CORE}))
    for kind in ("kick", "mute"):
        for user_id in NO_USERS_IDS:
            with pytest.raises(ProtocolError) as info:
                parse_command(json.dumps({"type": kind, "room": "r", "user_id": user_id}))
            assert info.value.code.value == "invalid_message", user_id
            assert "user_id" in info.value.message
    for kind in ("kick", "mute", "unmute"):
        for user_id in USERS_IDS:
            assert parse_command(json.dumps({"type": kind, "room": "r", "user_id": user_id}
                                            )).user_id == user_id
    # a DM's recipient too (before: "system", "api", "a\x85b" and made-up guest ids were
    # taken, to be answered user_not_found or kept for nobody)
    for user_id in NO_USERS_IDS:
        with pytest.raises(ProtocolError) as info:
            parse_command(json.dumps({"type": "dm", "to": user_id, "text": "hi"}))
        assert info.value.code.value == "invalid_message", user_id
        assert info.value.message.startswith("'to' must be a user's id"), info.value.message
    for user_id in USERS_IDS:
        assert parse_command(json.dumps({"type": "dm", "to": user_id, "text": "hi"})
                             ).to == user_id
    # the same rule as a token's sub, guests' ids apart (no token may hold one)
    for user_id in [*NO_USERS_IDS, "\ud800", *USERS_IDS]:
        if user_id.startswith("guest-"):
            continue
        try:
            accepted = auth.verify(mint_token(SECRET_CORE, user_id)).user_id == user_id
        except AuthError:
            accepted = False
        assert accepted == (user_id in USERS_IDS), user_id


def test_moderators_kick_and_mute_guests(clock: Clock) -> None:
    """A guest's id (`guest-` and 12 hex digits) is moderated as any user's."""
    chat = core(clock)
    mod = user(chat, "mod", mod_rooms=("*",))
    guest = user(chat, "guest-0123456789ab", authenticated=False)
    for s in (mod, guest):
        send(chat, s, type="join", room="r")
    send(chat, mod, type="mute", room="r", user_id=guest.user_id, duration=60)
    send(chat, guest, type="message", room="r", text="x")
    send(chat, mod, type="kick", room="r", user_id=guest.user_id)
    assert codes(guest) == ["muted"] and codes(mod) == []
    assert guest.events("left")[0]["by"] == "mod" and "r" not in guest.rooms


def test_settings_validate_patterns_and_api_key() -> None:
    """GUEST_ROOMS/PRIVATE_ROOMS are comma lists of patterns; API_KEY has a minimum length."""
    settings = Settings.from_env({"GUEST_ROOMS": "lobby, help-*", "PRIVATE_ROOMS": "team-*"})
    assert settings.guest_rooms == ("lobby", "help-*")
    assert settings.private_rooms == ("team-*",)
    assert Settings.from_env({}).guest_rooms == ("*",)
    with pytest.raises(ConfigError, match="PRIVATE_ROOMS"):
        Settings.from_env({"PRIVATE_ROOMS": "team/*"})
    with pytest.raises(ConfigError, match="API_KEY"):
        Settings.from_env({"API_KEY": "short"})


def test_an_api_key_that_clients_send_differently_is_refused_at_start() -> None:
    """API_KEY must be printable ASCII: it travels in an HTTP header, whose bytes the server
    reads as Latin-1 (before: a key with an accent was taken, and curl, sending it as UTF-8,
    got 401 with the right key, while Python's urllib, sending Latin-1, got in)."""
    with pytest.raises(ConfigError, match="API_KEY"):
        Settings.from_env({"API_KEY": "cl\u00e9-secr\u00e8te-0123456789abcdef"})


def test_token_claims_become_grants(capsys: pytest.CaptureFixture[str]) -> None:
    """`rooms`/`mod_rooms` claims reach the identity; malformed ones, and subs "system" and
    "api", are refused."""
    from wschat.__main__ import main as cli_main
    from wschat.auth import Authenticator, AuthError

    auth = Authenticator(Settings.from_env({"JWT_SECRET": SECRET}))
    assert cli_main(["token", "--sub", "al", "--secret", SECRET, "--rooms", "team-red, proj-*",
                     "--mod-rooms", "team-red"]) == 0
    identity = auth.verify(capsys.readouterr().out.strip())
    assert (identity.rooms, identity.mod_rooms) == (("team-red", "proj-*"), ("team-red",))
    assert auth.verify(token("bo")).rooms is None
    for bad in (token("al", rooms="team-red"), token("al", mod_rooms=["a b"]), token("system"),
                token("api")):
        with pytest.raises(AuthError):
            auth.verify(bad)


@pytest.fixture(params=["memory", "redis"])
def moderation_store(request: pytest.FixtureRequest) -> Iterator[ModerationStore]:
    if request.param == "memory":
        yield MemoryModerationStore()
        return
    import redis

    from wschat.stores.redis.moderation import RedisModerationStore

    client = redis.Redis.from_url(redis_url_or_skip(REDIS_DB))
    yield RedisModerationStore(client)
    client.close()


def test_moderation_stores_agree(moderation_store: ModerationStore) -> None:
    """Memory and Redis hold bans, mutes and members alike; ended restrictions are gone."""
    store, now = moderation_store, time.time()
    assert store.standing("r", "u") == Standing()
    store.restrict("ban", "r", "u", now + 60)
    store.restrict("ban", EVERYWHERE, "u", math.inf)
    store.restrict("mute", EVERYWHERE, "u", now + 30)
    store.restrict("mute", "other", "u", math.inf)
    store.restrict("mute", "r", "u", now - 1)  # already over
    standing = store.standing("r", "u")
    assert standing.banned_room == pytest.approx(now + 60, abs=0.002)
    assert standing.banned_everywhere == math.inf and standing.banned == math.inf
    assert standing.muted_room is None
    assert standing.muted_everywhere == pytest.approx(now + 30, abs=0.002)
    assert store.standing(None, "u") == Standing(None, math.inf, None, standing.muted_everywhere)
    assert store.standing("r", "someone-else") == Standing()
    assert store.lift("ban", EVERYWHERE, "u") and not store.lift("ban", EVERYWHERE, "u")
    assert not store.lift("mute", "r", "u")
    assert store.set_member("team", "u", True) and not store.set_member("team", "u", True)
    store.set_member("team", "a", True)
    assert store.members("team") == ["a", "u"] and store.standing("team", "u").member
    assert store.set_member("team", "u", False) and store.members("team") == ["a"]
    assert not store.standing("team", "u").member


# -- the chat core ---------------------------------------------------------------------

@pytest.fixture
def clock() -> Clock:
    return Clock()


def core(clock: Clock, **env: str) -> Chat:
    return make_chat(clock, RATE_LIMIT="1000", RATE_LIMIT_BURST="1000", **env)


def user(chat: Chat, user_id: str, rooms: list[str] | None = None,
         mod_rooms: tuple[str, ...] = (), authenticated: bool = True) -> FakeSession:
    session = FakeSession(user_id, user_id, authenticated=authenticated)
    session.access = SessionAccess(Identity(user_id, user_id, None,
                                            tuple(rooms) if rooms is not None else None,
                                            mod_rooms))
    chat.open(session)
    return session


def codes(session: FakeSession) -> list[str]:
    return [e["code"] for e in session.events("error")]


def test_guest_rooms_limit_guests_only(clock: Clock) -> None:
    """Guests may use only GUEST_ROOMS; signed-in users without a `rooms` claim any room."""
    chat = core(clock, GUEST_ROOMS="lobby")
    guest = user(chat, "g", authenticated=False)
    member = user(chat, "m")
    send(chat, guest, type="join", room="lobby")
    send(chat, guest, type="join", room="staff")
    send(chat, guest, type="history", room="staff")
    send(chat, guest, type="list_users", room="staff")
    send(chat, guest, type="message", room="staff", text="hi")
    send(chat, guest, type="typing", room="staff", status=True)
    assert [e["room"] for e in guest.events("joined")] == ["lobby"]
    assert codes(guest) == ["forbidden"] * 5
    assert all(e["room"] == "staff" for e in guest.events("error"))
    send(chat, member, type="join", room="staff")
    assert member.events("joined") and not codes(member)


def test_token_rooms_claim(clock: Clock) -> None:
    """A token's `rooms` patterns are the only rooms it opens (not_in_room stays for allowed ones)."""
    chat = core(clock)
    s = user(chat, "u", rooms=["proj-*"])
    send(chat, s, type="join", room="proj-a")
    send(chat, s, type="join", room="other", id=7)
    send(chat, s, type="message", room="proj-b", text="x")
    assert [e["room"] for e in s.events("joined")] == ["proj-a"]
    errors = s.events("error")
    assert (errors[0]["code"], errors[0]["id"]) == ("forbidden", 7)
    assert errors[1]["code"] == "not_in_room"


def test_private_room_admits_members_and_exact_grants(clock: Clock) -> None:
    """A private room refuses outsiders and `*` patterns; an exact grant or membership admits."""
    chat = core(clock, PRIVATE_ROOMS="team-*")
    outsider = user(chat, "out")
    pattern = user(chat, "pat", rooms=["team-*"])
    exact = user(chat, "ex", rooms=["team-red"])
    granted = user(chat, "gr")
    chat.access.set_member("team-red", "gr", True)
    for s in (outsider, pattern, exact, granted):
        send(chat, s, type="join", room="team-red")
    assert codes(outsider) == codes(pattern) == ["forbidden"]
    assert "private" in outsider.events("error")[0]["message"]
    assert exact.events("joined") and granted.events("joined")
    send(chat, outsider, type="history", room="team-red")
    assert codes(outsider) == ["forbidden", "forbidden"]


def test_revoked_membership_removes_at_once(clock: Clock) -> None:
    """Revoking membership takes the user out now, unless the token names the room."""
    chat = core(clock, PRIVATE_ROOMS="team-*")
    a, b = user(chat, "a", rooms=["team-red"]), user(chat, "b")
    chat.access.set_member("team-red", "a", True)
    chat.access.set_member("team-red", "b", True)
    send(chat, a, type="join", room="team-red")
    send(chat, b, type="join", room="team-red")
    chat.access.set_member("team-red", "b", False)
    chat.access.set_member("team-red", "a", False)
    assert b.events("left") == [{"type": "left", "room": "team-red",
                                 "reason": "membership revoked", "by": "api"}]
    assert not a.events("left") and "team-red" in a.rooms
    assert a.events("presence")[-1] == {"type": "presence", "room": "team-red", "user": "b",
                                        "user_id": "b", "status": "offline"}


def test_kick_leaves_room_with_reason(clock: Clock) -> None:
    """A kick removes every connection of the user; others see presence; rejoining works."""
    chat = core(clock)
    a, b1, b2 = user(chat, "a"), user(chat, "b"), user(chat, "b")
    for s in (a, b1, b2):
        send(chat, s, type="join", room="r")
    chat.access.kick("r", "b", "spam")
    for s in (b1, b2):
        assert s.events("left") == [{"type": "left", "room": "r", "reason": "spam",
                                     "by": "api"}]
        assert "r" not in s.rooms
    assert [e["status"] for e in a.events("presence")] == ["online", "offline"]
    send(chat, b1, type="join", room="r")
    assert len(b1.events("joined")) == 2


def test_room_ban_and_its_expiry(clock: Clock) -> None:
    """A room ban kicks now and refuses joins until it ends or is lifted; other rooms are open."""
    chat = core(clock)
    b = user(chat, "b")
    send(chat, b, type="join", room="r")
    chat.access.ban("b", "r", clock.now + 60, "flooding")
    left = b.events("left")[0]
    assert (left["reason"], left["note"]) == ("banned", "flooding")
    assert left["until"] == int((clock.now + 60) * 1000)
    send(chat, b, type="join", room="r")
    send(chat, b, type="join", room="elsewhere")
    error = b.events("error")[0]
    assert (error["code"], error["reason"], error["room"]) == ("forbidden", "banned", "r")
    assert [e["room"] for e in b.events("joined")] == ["r", "elsewhere"]
    clock.now += 61
    send(chat, b, type="join", room="r")
    assert [e["room"] for e in b.events("joined")][-1] == "r"
    chat.access.ban("b", "r", float("inf"))
    assert chat.access.unban("b", "r") and not chat.access.unban("b", "r")


def test_ban_everywhere_closes_and_refuses_connections(clock: Clock) -> None:
    """A ban everywhere closes the user's connections (4003) and any new one at once."""
    chat = core(clock)
    b = user(chat, "b")
    chat.access.ban("b", None, float("inf"), "abuse")
    assert b.closed_with == (4003, "banned")
    assert b.events("error")[-1]["reason"] == "banned"
    again = user(chat, "b")
    assert again.closed_with == (4003, "banned") and not again.events("welcome")
    chat.access.unban("b", None)
    assert user(chat, "b").events("welcome")


def test_a_new_identity_whose_standing_cannot_be_read_is_closed_to_connect_again(
        clock: Clock) -> None:
    """The moderation store cannot be read when a signed-in connection opens, or when a
    connection signs in (``auth``): it is closed with 1013 to connect again, not let in
    unchecked (before: a user banned or muted everywhere was let in, and could send DMs,
    which check neither, until the connection ended). A recheck of a connection checked
    before (after a pub/sub outage) keeps it while the store is out."""
    from wschat.stores.base import Unavailable

    chat = core(clock)
    chat.access.ban("b", None, float("inf"), "abuse")
    chat.access.mute("m", None, float("inf"))
    standing = chat.access.store.standing
    out = [True]

    def unreadable(room: str | None, user_id: str) -> Standing:
        if out[0]:
            raise Unavailable("redis: ConnectionError")
        return standing(room, user_id)

    chat.access.store.standing = unreadable  # type: ignore[method-assign]
    banned = user(chat, "b")
    assert banned.closed_with == (1013, "temporarily unavailable; retry")
    assert not banned.events("welcome")
    guest = FakeSession("m", "m", authenticated=False)
    chat.open(guest)
    send(chat, guest, type="auth", token=mint_token(SECRET_CORE, "m"))
    assert guest.closed_with == (1013, "temporarily unavailable; retry")
    out[0] = False
    checked = user(chat, "c")
    out[0] = True
    assert not chat._moderated_meanwhile(checked) and checked.closed_with is None
    out[0] = False
    assert user(chat, "b").closed_with == (4003, "banned")


def test_kick_during_a_join_is_carried_out_after_it(clock: Clock) -> None:
    """A ban's kick that arrives while the join is under way (after its ban check, before
    the room is the session's: Redis round trips) removes the user once the join is done."""
    chat = core(clock)
    b = user(chat, "b")
    chat.access.admit(b, "r", joining=True)  # the join's check passed, the store join pending
    chat.access.ban("b", "r", float("inf"))
    assert not b.events("left")
    b.access.joining.clear()  # as if admitted before the ban: the join itself is not refused
    chat.access.store.lift("ban", "r", "b")
    send(chat, b, type="join", room="r")
    assert b.events("joined")  # joined, then out as the join ends
    assert b.events("left")[0]["reason"] == "banned" and "r" not in b.rooms
    chat.tick()  # carried out once
    assert len(b.events("left")) == 1
    chat.access.kick("r", "b")  # not joining, not in the room: nothing is held back
    send(chat, b, type="join", room="r")
    chat.tick()
    assert "r" in b.rooms


def test_a_ban_written_during_the_joins_ban_check_is_carried_out(clock: Clock) -> None:
    """The ban lands while the join reads the user's standing (which still says "not
    banned"): its kick is held and carried out once the join is done (before: dropped,
    as the connection was neither in the room nor marked joining, and the banned user
    stayed in the room)."""
    chat = core(clock)
    b = user(chat, "b")
    standing = chat.access.store.standing

    def ban_lands_meanwhile(room: str | None, user_id: str) -> Standing:
        before = standing(room, user_id)
        if room == "r":
            chat.access.ban("b", "r", float("inf"))
        return before

    chat.access.store.standing = ban_lands_meanwhile  # type: ignore[method-assign]
    send(chat, b, type="join", room="r")
    assert b.events("joined")
    chat.tick()
    assert b.events("left")[-1]["reason"] == "banned" and "r" not in b.rooms


def test_a_ban_held_during_a_join_is_carried_out_before_the_next_command(clock: Clock) -> None:
    """The ban's kick held while the join was under way is carried out as the join ends,
    so the banned user's next frame (pipelined behind the join) cannot post to the room
    (before: only on the next tick, and the message reached the members)."""
    chat = core(clock)
    a, b = user(chat, "a"), user(chat, "b")
    send(chat, a, type="join", room="r")
    standing = chat.access.store.standing

    def ban_lands_meanwhile(room: str | None, user_id: str) -> Standing:
        before = standing(room, user_id)
        if room == "r" and user_id == "b":
            chat.access.ban("b", "r", float("inf"))
        return before

    chat.access.store.standing = ban_lands_meanwhile  # type: ignore[method-assign]
    send(chat, b, type="join", room="r")
    send(chat, b, type="message", room="r", text="after the ban")
    assert "r" not in b.rooms and b.events("left")[-1]["reason"] == "banned"
    assert [e["code"] for e in b.events("error")] == ["not_in_room"]
    assert not [m for m in a.events("message") if m["text"] == "after the ban"]
    chat.tick()  # carried out once
    assert len(b.events("left")) == 1


def test_a_kick_during_the_joins_store_round_trips_comes_after_joined(clock: Clock) -> None:
    """A ban's kick that reaches the connection after its store join, while the join still
    reads the room (Redis round trips the listener runs during), is carried out as the
    join ends: the client hears `joined`, then `left` (before: `left`, then `joined` for a
    room it was no longer in, so a client took itself for a member of the room it was
    banned from)."""
    chat = core(clock)
    a, b = user(chat, "a"), user(chat, "b")
    send(chat, a, type="join", room="r")
    last_id = chat.stores.messages.last_id

    def ban_lands_meanwhile(room: str) -> int:
        if room == "r" and "r" in b.rooms:
            chat.access.ban("b", "r", float("inf"))
        return last_id(room)

    chat.stores.messages.last_id = ban_lands_meanwhile  # type: ignore[method-assign]
    send(chat, b, type="join", room="r")
    order = [e["type"] for e in b.events() if e["type"] in ("joined", "left")]
    assert order == ["joined", "left"]
    assert b.events("left")[0]["reason"] == "banned" and "r" not in b.rooms
    assert [e["status"] for e in a.events("presence")] == ["online", "offline"]
    send(chat, a, type="message", room="r", text="after")
    assert not b.events("message")
    chat.tick()  # carried out once
    assert len(b.events("left")) == 1


def test_a_mute_arriving_during_a_standing_read_is_not_undone_by_it(clock: Clock) -> None:
    """A mute everywhere lands while a join reads the user's standing (from before the
    mute): the mute stays (before: the read's "not muted" wiped it, and the muted user
    posted)."""
    chat = core(clock)
    a, b = user(chat, "a"), user(chat, "b")
    send(chat, a, type="join", room="lobby")
    send(chat, b, type="join", room="lobby")
    standing = chat.access.store.standing

    def mute_lands_meanwhile(room: str | None, user_id: str) -> Standing:
        before = standing(room, user_id)
        if room == "other":
            chat.access.mute("b", None, float("inf"))
        return before

    chat.access.store.standing = mute_lands_meanwhile  # type: ignore[method-assign]
    send(chat, b, type="join", room="other")
    assert b.events("muted") and b.events("joined")[-1]["room"] == "other"
    send(chat, b, type="message", room="lobby", text="still here?")
    assert codes(b)[-1] == "muted" and not a.events("message")


def test_moderation_missed_during_a_pubsub_outage_is_carried_out_on_resync(
        clock: Clock) -> None:
    """Bans, mutes and revoked memberships written while the worker's pub/sub connection
    was down (their events never arrived: stored only) take effect when it resyncs
    (before: the banned user stayed in the room, the muted one posted)."""
    chat = core(clock, PRIVATE_ROOMS="team-*")
    store = chat.access.store
    store.set_member("team-x", "m", True)
    a, b, c, m, z = (user(chat, u) for u in ("a", "b", "c", "m", "z"))
    for s in (a, b, c, z):
        send(chat, s, type="join", room="hall")
    send(chat, m, type="join", room="team-x")
    store.restrict("ban", "hall", "b", clock.now + 60)
    store.restrict("mute", EVERYWHERE, "c", float("inf"))
    store.set_member("team-x", "m", False)
    store.restrict("ban", EVERYWHERE, "z", float("inf"))
    chat.resync()
    left = b.events("left")[-1]
    assert (left["reason"], left["until"]) == ("banned", int((clock.now + 60) * 1000))
    assert "hall" not in b.rooms
    assert m.events("left")[-1]["reason"] == "membership revoked" and not m.rooms
    assert z.closed_with == (4003, "banned")
    send(chat, c, type="message", room="hall", text="muted?")
    assert codes(c)[-1] == "muted"
    send(chat, a, type="message", room="hall", text="still fine")
    assert a.events("message")[-1]["text"] == "still fine" and not a.events("left")


def test_a_join_refused_for_the_room_cap_holds_no_kick(clock: Clock) -> None:
    """A join refused with too_many_rooms leaves no "joining" mark behind: a kick for
    that room is not held and carried out on a later join (before: the user, told by
    nobody, was kicked from the room they joined afterwards)."""
    chat = core(clock, MAX_ROOMS_PER_CONNECTION="1")
    d = user(chat, "d")
    send(chat, d, type="join", room="a")
    send(chat, d, type="join", room="b")
    assert codes(d)[-1] == "too_many_rooms"
    chat.access.kick("b", "d")
    send(chat, d, type="leave", room="a")
    send(chat, d, type="join", room="b")
    chat.tick()
    assert "b" in d.rooms and [e.get("reason") for e in d.events("left")] == [None]  # a's


def test_mute_refuses_messages_and_typing_not_reading(clock: Clock) -> None:
    """A muted user reads but may not post or type there; the mute ends on time or when lifted."""
    chat = core(clock)
    a, b = user(chat, "a"), user(chat, "b")
    for s in (a, b):
        send(chat, s, type="join", room="r")
        send(chat, s, type="join", room="q")
    chat.access.mute("b", "r", clock.now + 30, by="a")
    assert b.events("muted") == [{"type": "muted", "room": "r", "by": "a",
                                  "until": int((clock.now + 30) * 1000)}]
    send(chat, b, type="message", room="r", text="no")
    send(chat, b, type="typing", room="r", status=True)
    send(chat, b, type="message", room="q", text="yes")
    assert codes(b) == ["muted", "muted"]
    send(chat, a, type="message", room="r", text="still reading")
    assert [m["text"] for m in b.events("message")] == ["yes", "still reading"]
    clock.now += 31
    send(chat, b, type="message", room="r", text="back")
    assert b.events("message")[-1]["text"] == "back"
    chat.access.mute("b", None, float("inf"))
    send(chat, b, type="dm", to="a", text="dm")
    assert codes(b)[-1] == "muted"
    chat.access.unmute("b", None)
    assert b.events("unmuted") == [{"type": "unmuted"}]
    send(chat, b, type="dm", to="a", text="dm")
    assert a.events("dm")


def test_unmute_over_the_websocket_lifts_a_mute_stored_for_any_earlier_id(
        clock: Clock) -> None:
    """An earlier release stored mutes for any id of 1-128 characters (`system`, a made-up
    `guest-` id, a control character). A lift stores nothing: `unmute` takes such an id as
    /api/unmute does, and lifts what was stored (before: `invalid_message`, for good). It
    still refuses what no release could have stored: empty, over 128, not a string."""
    from wschat.protocol import ProtocolError, parse_command

    chat = core(clock)
    mod = user(chat, "mod", mod_rooms=("r",))
    send(chat, mod, type="join", room="r")
    for user_id in ("guest-x", "system", "api", "a\tb"):
        chat.access.store.restrict("mute", "r", user_id, float("inf"))
        send(chat, mod, type="unmute", room="r", user_id=user_id)
        reply = mod.events("moderated")[-1]
        assert (reply["user_id"], reply["lifted"]) == (user_id, True), reply
        assert chat.access.store.standing("r", user_id).muted_room is None
    for user_id in ("", "x" * 129, 7):
        with pytest.raises(ProtocolError) as info:
            parse_command(json.dumps({"type": "unmute", "room": "r", "user_id": user_id}))
        assert info.value.code.value == "invalid_message", user_id
        assert "'user_id'" in info.value.message, info.value.message


def test_mute_is_loaded_on_join(clock: Clock) -> None:
    """A mute made while the user was away holds when it comes back (read on join)."""
    chat = core(clock)
    chat.access.mute("b", "r", float("inf"))
    b = user(chat, "b")
    send(chat, b, type="join", room="r")
    send(chat, b, type="message", room="r", text="x")
    assert codes(b) == ["muted"]
    assert chat.access.store.standing("r", "b").muted_room == float("inf")
    assert EVERYWHERE not in b.access.muted


def test_moderators_kick_and_mute_over_the_websocket(clock: Clock) -> None:
    """mod_rooms lets a user kick, mute and unmute in those rooms; others get forbidden."""
    chat = core(clock)
    mod = user(chat, "mod", mod_rooms=("support-*",))
    b = user(chat, "b")
    for s in (mod, b):
        send(chat, s, type="join", room="support-1")
    send(chat, mod, type="mute", room="support-1", user_id="b", duration=60, id=1)
    reply = mod.events("moderated")[0]
    assert (reply["action"], reply["id"], reply["user_id"]) == ("mute", 1, "b")
    send(chat, b, type="message", room="support-1", text="x")
    assert codes(b) == ["muted"]
    send(chat, mod, type="unmute", room="support-1", user_id="b")
    assert mod.events("moderated")[-1]["lifted"] is True
    send(chat, mod, type="kick", room="support-1", user_id="b", reason="off topic")
    assert b.events("left") == [{"type": "left", "room": "support-1", "reason": "off topic",
                                 "by": "mod"}]
    send(chat, b, type="kick", room="support-1", user_id="mod")
    send(chat, mod, type="kick", room="general", user_id="b")
    assert codes(b)[-1] == "forbidden" and codes(mod) == ["forbidden"]
    assert "support-1" in mod.rooms


def test_guest_cannot_moderate_and_bad_commands_are_refused(clock: Clock) -> None:
    """Guests never moderate; kick/mute fields are validated like every command."""
    chat = core(clock)
    guest = user(chat, "g", mod_rooms=("*",), authenticated=False)
    send(chat, guest, type="kick", room="r", user_id="x")
    mod = user(chat, "mod", mod_rooms=("*",))
    send(chat, mod, type="mute", room="r", user_id="x", duration=-1)
    send(chat, mod, type="kick", room="bad room", user_id="x")
    send(chat, mod, type="kick", room="r")
    assert codes(guest) == ["forbidden"]
    assert codes(mod) == ["invalid_message", "invalid_room", "invalid_message"]


def test_fresh_token_with_fewer_rooms_leaves_them(clock: Clock) -> None:
    """Re-authenticating with a token that no longer grants a room leaves it."""
    chat = core(clock)
    s = FakeSession("u", "u", authenticated=False)
    chat.open(s)
    send(chat, s, type="auth", token=mint_token(SECRET_CORE, "u", rooms=["a", "b"]))
    send(chat, s, type="join", room="a")
    send(chat, s, type="join", room="b")
    chat.access.mute("u", "a", float("inf"))
    send(chat, s, type="auth", token=mint_token(SECRET_CORE, "u", rooms=["a"]))
    assert s.events("left") == [{"type": "left", "room": "b", "reason": "forbidden"}]
    assert s.rooms == {"a"}
    send(chat, s, type="message", room="a", text="x")  # the mute outlives the refresh
    assert codes(s) == ["muted"]
    send(chat, s, type="auth", token=mint_token(SECRET_CORE, "v"))  # another user: no mutes
    assert not s.access.muted and s.access.rooms is None


def test_fresh_token_leaves_private_rooms_it_no_longer_names_while_the_store_fails(
        clock: Clock) -> None:
    """The store cannot say whether the user is a stored member of a private room its
    fresh token no longer names: the connection leaves it (and may join again later),
    and the sign-in goes through (before: `unavailable`, with the new grants in force
    and the room kept)."""
    from wschat.stores.base import Unavailable

    chat = core(clock, PRIVATE_ROOMS="team-*")
    s = FakeSession("u", "u", authenticated=False)
    chat.open(s)
    send(chat, s, type="auth", token=mint_token(SECRET_CORE, "u", rooms=["team-x", "lobby"]))
    send(chat, s, type="join", room="team-x")
    send(chat, s, type="join", room="lobby")

    def down(room: str | None, user_id: str) -> Standing:
        raise Unavailable("redis: ConnectionError")

    chat.access.store.standing = down  # type: ignore[method-assign]
    send(chat, s, type="auth", token=mint_token(SECRET_CORE, "u", rooms=["lobby"]))
    assert s.events("left") == [{"type": "left", "room": "team-x", "reason": "forbidden"}]
    assert s.rooms == {"lobby"} and codes(s) == [] and len(s.events("welcome")) == 3


SECRET_CORE = "unit-secret-0123456789abcdef0123456789"  # test_chat's JWT_SECRET


# -- real servers ----------------------------------------------------------------------

def api_call(server: Server, method: str, path: str, body: Any = None,
             key: str | None = API_KEY) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.metrics_port}{path}", data=data, method=method,
        headers={"Content-Type": "application/json",
                 **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def token(sub: str, **claims: Any) -> str:
    return mint_token(SECRET, sub, **claims)


SERVER_ENV = {"JWT_SECRET": SECRET, "API_KEY": API_KEY, "PRIVATE_ROOMS": "team-*",
              "GUEST_ROOMS": "lobby", "RATE_LIMIT": "1000", "RATE_LIMIT_BURST": "1000"}


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with Server(SERVER_ENV) as srv:
        yield srv


def test_server_enforces_rooms_for_tokens_and_guests(server: Server) -> None:
    """On a real server: guests only in GUEST_ROOMS, the private room only for its members."""
    with Client(server.url, "username=guest") as guest, \
            Client(server.url, f"token={token('alice', rooms=['team-red'])}") as alice, \
            Client(server.url, f"token={token('bob')}") as bob:
        guest.send({"type": "join", "room": "general", "id": 1})
        assert guest.expect("error", id=1)["code"] == "forbidden"
        assert guest.join("lobby")["room"] == "lobby"
        alice.join("team-red")
        bob.send({"type": "join", "room": "team-red", "id": 2})
        assert bob.expect("error", id=2)["code"] == "forbidden"
        assert api_call(server, "POST", "/api/rooms/team-red/members",
                        {"user_id": "bob"})[0] == 200
        assert [u["user_id"] for u in bob.join("team-red")["users"]] == ["alice", "bob"]
        assert alice.expect("presence", user_id="bob")["status"] == "online"


def test_a_pattern_with_many_stars_cannot_stall_the_worker() -> None:
    """A token's ``rooms`` patterns are 1-64 room-name characters and ``*``: matched as a
    backtracking regex, '*a*a*a*a*a*a*a*a*b' against a room of 64 'a's took 93 s, the
    worker stalled all along (nobody else was answered; longer patterns: hours). The
    match is linear now: the join is refused at once, and the others are answered."""
    stars = "*a" * 8 + "*b"
    with Server(SERVER_ENV) as srv, \
            Client(srv.url, f"token={token('eve', rooms=[stars, stars + 'c'])}") as eve, \
            Client(srv.url, f"token={token('bob')}") as bob:
        eve.send({"type": "join", "room": "a" * 64, "id": 1})
        bob.send({"type": "ping", "id": "bob"})
        assert eve.expect("error", id=1)["code"] == "forbidden"
        bob.expect("pong", id="bob")


def test_server_moderator_kick_and_mute(server: Server) -> None:
    """A moderator's kick and mute reach the target over real sockets."""
    mod_token = token("mia", mod_rooms=["help-*"])
    with Client(server.url, f"token={mod_token}") as mia, \
            Client(server.url, f"token={token('carl')}") as carl:
        mia.join("help-1")
        carl.join("help-1")
        mia.expect("presence", user_id="carl")
        mia.request({"type": "mute", "room": "help-1", "user_id": "carl"}, "moderated")
        assert carl.expect("muted")["until"] is None
        carl.send({"type": "message", "room": "help-1", "text": "x", "id": 3})
        assert carl.expect("error", id=3)["code"] == "muted"
        mia.request({"type": "kick", "room": "help-1", "user_id": "carl"}, "moderated")
        assert carl.expect("left")["reason"] == "kicked"
        assert mia.expect("presence", user_id="carl")["status"] == "offline"


def test_no_moderator_poses_as_the_server_api(server: Server) -> None:
    """Moderation through the API reaches users with `by: "api"`, so no token may have sub
    "api", as none may have sub "system" (before: a moderator with sub "api" was accepted,
    and its kick reached the user as `left` `by: "api"`, the server API's mark)."""
    with Client(server.url, "username=guest") as guest, \
            Client(server.url, f"token={token('carl')}") as carl:
        carl.join("help-2")
        guest.send({"type": "auth", "token": token("api", mod_rooms=["help-*"]), "id": 1})
        refused = guest.expect_any(("error", {"id": 1}), ("welcome", {"id": 1}))
        assert (refused["type"], refused.get("code")) == ("error", "auth_failed")
        guest.send({"type": "kick", "room": "help-2", "user_id": "carl", "id": 2})
        assert guest.expect("error", id=2)["code"] == "forbidden"
        carl.assert_silent("left")


@pytest.fixture(scope="module")
def redis_pods() -> Iterator[tuple[Server, Server]]:
    url = redis_url_or_skip(REDIS_DB)
    env = {**SERVER_ENV, "REDIS_URL": url, "PRESENCE_TTL": "5"}
    with Server(env) as a, Server(env) as b:
        yield a, b


def test_ban_mute_kick_hold_across_pods(redis_pods: tuple[Server, Server]) -> None:
    """Moderation through one pod's API holds on the other pod, for live and new connections."""
    a, b = redis_pods
    with Client(b.url, f"token={token('dave')}") as dave, \
            Client(a.url, f"token={token('erin')}") as erin:
        dave.join("ops")
        erin.join("ops")
        assert api_call(a, "POST", "/api/mute", {"user_id": "dave", "room": "ops"})[0] == 200
        dave.expect("muted", room="ops")
        dave.send({"type": "message", "room": "ops", "text": "x", "id": 1})
        assert dave.expect("error", id=1)["code"] == "muted"
        status, body = api_call(a, "POST", "/api/ban",
                                {"user_id": "dave", "room": "ops", "duration": 600})
        assert status == 200 and body["until"] > 0
        assert dave.expect("left")["reason"] == "banned"
        assert erin.expect("presence", user_id="dave")["status"] == "offline"
        dave.send({"type": "join", "room": "ops", "id": 2})
        assert dave.expect("error", id=2)["reason"] == "banned"
    # A reconnect to the other pod is refused too, until the ban is lifted.
    with Client(a.url, f"token={token('dave')}") as again:
        again.send({"type": "join", "room": "ops", "id": 3})
        assert again.expect("error", id=3)["code"] == "forbidden"
        assert api_call(b, "POST", "/api/unban", {"user_id": "dave", "room": "ops"})[1][
            "lifted"] is True
        assert again.join("ops")["room"] == "ops"


def test_private_room_and_ban_everywhere_across_pods(redis_pods: tuple[Server, Server]
                                                     ) -> None:
    """Membership granted through one pod admits on the other; a ban everywhere closes
    connections on every pod and refuses new ones."""
    a, b = redis_pods
    api_call(a, "POST", "/api/rooms/team-blue/members", {"user_id": "fay"})
    with Client(b.url, f"token={token('fay')}") as fay, \
            Client(a.url, f"token={token('fay')}") as fay2:
        assert fay.join("team-blue")["room"] == "team-blue"
        assert api_call(a, "DELETE", "/api/rooms/team-blue/members/fay")[1]["changed"]
        assert fay.expect("left")["reason"] == "membership revoked"
        status, body = api_call(b, "POST", "/api/ban", {"user_id": "fay"})
        assert (status, body["until"], body["room"]) == (200, None, None)
        assert fay.close_code_when_closed() == 4003
        assert fay2.close_code_when_closed() == 4003
    with Client(a.url, f"token={token('fay')}", expect_welcome=False) as again:
        assert again.expect("error")["reason"] == "banned"
        assert again.close_code_when_closed() == 4003
    api_call(a, "POST", "/api/unban", {"user_id": "fay"})


def test_api_figures_and_disconnect_across_pods(redis_pods: tuple[Server, Server]) -> None:
    """With Redis the API's rooms, info and disconnect see every pod's connections."""
    a, b = redis_pods
    with Client(a.url, f"token={token('gus')}") as gus_a, \
            Client(b.url, f"token={token('gus')}") as gus_b, \
            Client(b.url, f"token={token('hal')}") as hal:
        gus_a.join("yard")
        hal.join("yard")
        rooms = api_call(b, "GET", "/api/rooms")[1]["rooms"]
        assert {"room": "yard", "users": 2, "private": False} in rooms
        status, info = api_call(a, "GET", "/api/info")
        assert status == 200 and info["backend"] == "redis"
        assert len(info["workers"]) == 2 and info["pods"] == 1  # two servers, one host
        assert info["connections"] == 3
        status, body = api_call(b, "POST", "/api/disconnect", {"user_id": "gus"})
        assert (status, body["closed"]) == (200, 2)
        assert gus_a.close_code_when_closed() == 4003
        assert gus_b.close_code_when_closed() == 4003
        assert hal.expect("presence", user_id="gus")["status"] == "offline"
        hal.request({"type": "ping"}, "pong")  # the others are untouched
