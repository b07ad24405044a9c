"""The store contract, run against the memory and the Redis implementation alike."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from conftest import first_start, listening, redis_url, redis_url_or_skip, wait_until
from wschat.config import Settings
from wschat.protocol import draft_dm, draft_message, message_id_of, stored_id_of
from wschat.stores.base import Stores, User
from wschat.stores.memory import create_memory_stores

ALICE, BOB = User("u-alice", "alice"), User("u-bob", "bob")


@pytest.fixture(params=["memory", "redis", "redis-pipelined"])
def stores(request: Any) -> Iterator[Stores]:
    """redis-pipelined: as the server builds them, hot-path commands through the
    auto-pipelining layer (wschat.stores.redis.pipeline)."""
    if request.param == "memory":
        yield create_memory_stores(history_size=5, room_ttl=3600)
        return
    from wschat.stores import redis as redis_stores

    url = redis_url_or_skip(10)
    settings = Settings.from_env({"REDIS_URL": url, "HISTORY_SIZE": "5"})
    client = redis_stores.redis.Redis.from_url(url)
    if request.param == "redis-pipelined":
        from wschat.stores.redis.pipeline import Pipelined

        client = Pipelined(client)
    node = redis_stores._Node()
    first_start(client)
    with listening(url, BOB.user_id):  # the DMs below are to bob
        yield Stores(redis_stores.RedisRoomStore(client, node, 3600),
                     redis_stores.RedisPresenceStore(client, node),
                     redis_stores.RedisMessageStore(client, settings.history_size),
                     redis_stores.RedisBroker(client), "redis")
    client.close()


def post(stores: Stores, room: str, text: str, cmid: str | None = None,
         user: User = ALICE) -> Any:
    draft = draft_message(room, user.username, user.user_id, text, 1, cmid)
    return stores.messages.post_room(room, user.user_id, draft)


def test_join_counts_connections_per_user(stores: Stores) -> None:
    """A user's second connection is not 'first'; only the last leave is 'last'."""
    assert stores.rooms.join("r", "c1", ALICE).first_of_user
    assert not stores.rooms.join("r", "c2", ALICE).first_of_user
    result = stores.rooms.join("r", "c3", BOB)
    assert result.first_of_user and result.members == [ALICE, BOB]
    assert stores.rooms.totals() == (1, 2)
    assert not stores.rooms.leave("r", "c1", ALICE.user_id).last_of_user
    assert stores.rooms.leave("r", "c2", ALICE.user_id).last_of_user
    assert stores.rooms.members("r") == [BOB]
    final = stores.rooms.leave("r", "c3", BOB.user_id)
    assert final.last_of_user and final.room_empty
    assert stores.rooms.totals() == (0, 0)
    assert stores.rooms.members("r") == []


def test_join_is_idempotent_per_connection(stores: Stores) -> None:
    """Joining twice with one connection counts once (what a resync relies on)."""
    stores.rooms.join("r", "c1", ALICE)
    assert not stores.rooms.join("r", "c1", ALICE).first_of_user
    assert stores.rooms.leave("r", "c1", ALICE.user_id).room_empty


def test_leave_unknown_connection_is_harmless(stores: Stores) -> None:
    """Leaving a room one never joined changes nothing; the user has no connection
    there, which is what ``last_of_user`` says."""
    stores.rooms.join("r", "c1", ALICE)
    result = stores.rooms.leave("r", "nope", BOB.user_id)
    assert result.last_of_user and not result.room_empty
    assert stores.rooms.members("r") == [ALICE]


def test_a_leave_run_twice_still_says_the_user_is_gone(stores: Stores) -> None:
    """A leave retried because its first reply was lost (it ran in the store) still
    reports the user's last connection gone, so ``offline`` is announced once it
    succeeds (before: the retry found nothing and nobody heard the user left); with
    another connection of the user still there it does not."""
    for conn in ("c1", "c2"):
        stores.rooms.join("r", conn, ALICE)
    stores.rooms.join("r", "c3", BOB)
    assert not stores.rooms.leave("r", "c1", ALICE.user_id).last_of_user
    assert not stores.rooms.leave("r", "c1", ALICE.user_id).last_of_user  # c2 is there
    assert stores.rooms.leave("r", "c2", ALICE.user_id).last_of_user
    again = stores.rooms.leave("r", "c2", ALICE.user_id)
    assert again.last_of_user and not again.room_empty
    assert stores.rooms.members("r") == [BOB]


def test_presence_counts_connections(stores: Stores) -> None:
    """A user is online while any of their connections is."""
    stores.presence.connect("c1", ALICE)
    stores.presence.connect("c2", ALICE)
    stores.presence.disconnect("c1", ALICE.user_id)
    assert stores.presence.is_online(ALICE.user_id)
    stores.presence.disconnect("c2", ALICE.user_id)
    assert not stores.presence.is_online(ALICE.user_id)
    stores.presence.disconnect("c2", ALICE.user_id)  # twice: no negative counts
    stores.presence.connect("c3", ALICE)
    assert stores.presence.is_online(ALICE.user_id)


def test_ids_are_sequential_per_room(stores: Stores) -> None:
    """Each room counts its own ids from 1 without gaps."""
    assert [post(stores, "a", f"m{i}").msg_id for i in range(3)] == [1, 2, 3]
    assert post(stores, "b", "x").msg_id == 1
    assert stores.messages.last_id("a") == 3


def test_event_bytes_carry_the_id(stores: Stores) -> None:
    """The stored event is the exact JSON members get, with the id spliced in."""
    posted = post(stores, "a", "hello")
    assert message_id_of(posted.event) == posted.msg_id == stored_id_of(posted.event)
    assert b'"text":"hello"' in posted.event


def test_dedupe_returns_original(stores: Stores) -> None:
    """A known client_msg_id returns the original message and takes no new id."""
    first = post(stores, "a", "once", "cm-1")
    again = post(stores, "a", "once", "cm-1")
    assert again.duplicate and not first.duplicate
    assert again.event == first.event and again.msg_id == first.msg_id
    assert post(stores, "a", "other", "cm-1", user=BOB).msg_id == 2  # per user
    assert stores.messages.last_id("a") == 2


def test_a_retry_gets_the_rooms_copy_while_the_history_holds_it(stores: Stores) -> None:
    """A retry is answered with the room's own copy even if its text differs (the
    dedupe entry holds only the id and timestamp); once the history no longer holds
    the message, the echo is rebuilt from the retry with the original id and time."""
    first = stores.messages.post_room("a", ALICE.user_id, draft_message(
        "a", "alice", ALICE.user_id, "original", 1111, "cm"))
    changed = stores.messages.post_room("a", ALICE.user_id, draft_message(
        "a", "alice", ALICE.user_id, "changed", 2222, "cm"))
    assert changed.duplicate and changed.event == first.event
    for i in range(5):  # HISTORY_SIZE is 5 here: the original leaves the history
        post(stores, "a", f"m{i}")
    late = stores.messages.post_room("a", ALICE.user_id, draft_message(
        "a", "alice", ALICE.user_id, "original", 3333, "cm"))
    assert late.duplicate and late.msg_id == first.msg_id
    assert late.event == first.event  # same text: the same bytes, rebuilt
    assert stores.messages.last_id("a") == 6


def test_a_retry_into_a_renumbered_room_is_not_answered_with_another_message(
        stores: Stores) -> None:
    """A room whose numbering expired starts its ids again; a retry of a message from
    before (its dedupe entry lives an hour) must not be answered with the new message of
    that id."""
    first = stores.messages.post_room("a", ALICE.user_id, draft_message(
        "a", "alice", ALICE.user_id, "before", 1111, "cm"))
    expire_room(stores, "a")
    other = post(stores, "a", "after", "other")
    assert other.msg_id == first.msg_id == 1  # numbering started again
    retry = stores.messages.post_room("a", ALICE.user_id, draft_message(
        "a", "alice", ALICE.user_id, "before", 3333, "cm"))
    assert retry.duplicate and retry.event == first.event != other.event


def expire_room(stores: Stores, room: str, numbering_too: bool = True) -> None:
    """The room's history as after ROOM_TTL with nobody in it, and its ids as after
    ROOM_NUMBERING_TTL (``numbering_too``)."""
    if stores.name == "memory":
        messages = stores.messages
        messages._drop_log(room, 0.0)  # what room_emptied does once ROOM_TTL passed
        if numbering_too:
            messages._retired.pop(room)  # and ROOM_NUMBERING_TTL
        return
    import redis

    from wschat.stores.redis.keys import room_keys

    client = redis.Redis.from_url(redis_url(10))  # the fixture's database
    seq, hist = room_keys(room)[4:]
    try:
        client.delete(*((seq, hist) if numbering_too else (hist,)))  # what EXPIRE does
    finally:
        client.close()


def test_a_room_used_again_after_its_history_expired_goes_on_from_its_last_id(
        stores: Stores) -> None:
    """An empty room's history expires (ROOM_TTL), its last id later (ROOM_NUMBERING_TTL):
    used again in between, it numbers on, and a ``since`` from before is not recovered
    (before: its ids began at 1 again, so a client away longer than ROOM_TTL that had
    seen 2 was told ``recovered: true`` with only the new numbering's 3, its 1 and 2
    missing unannounced, and its old ids named other messages)."""
    for i in range(3):
        post(stores, "back", f"old {i}")
    expire_room(stores, "back", numbering_too=False)
    assert stores.messages.last_id("back") == 3
    assert stores.messages.since("back", 3).complete  # nothing was missed
    assert not stores.messages.since("back", 2).complete
    assert stores.messages.recent("back", 10) == []
    assert [post(stores, "back", f"new {i}").msg_id for i in range(3)] == [4, 5, 6]
    replay = stores.messages.since("back", 2)
    assert not replay.complete, "told recovered over ids it never got"
    assert [message_id_of(e) for e in stores.messages.since("back", 4).messages] == [5, 6]


def test_a_dm_retry_is_rebuilt_with_the_original_id_and_time(stores: Stores) -> None:
    """DMs have no history to find a retry's original in: the echo is the retry's own
    draft with the id and timestamp the first post got."""
    first = stores.messages.post_dm(ALICE.user_id, BOB.user_id,
                                    draft_dm(BOB.user_id, "alice", ALICE.user_id, "hi", 1111, "k"))
    again = stores.messages.post_dm(ALICE.user_id, BOB.user_id,
                                    draft_dm(BOB.user_id, "alice", ALICE.user_id, "hi", 2222, "k"))
    assert again.duplicate and again.event == first.event


@pytest.mark.parametrize("stores", ["redis"], indirect=True)
def test_redis_dedupe_keys_hold_the_id_not_the_event(stores: Stores) -> None:
    """A dedupe key is "<id> <timestamp_ms>" (a key per message for an hour: the event
    would be most of Redis's memory); a key holding a whole event, as before, is still
    understood."""
    import redis

    from wschat.stores.redis.keys import PREFIX, dedupe_key

    client = redis.Redis.from_url(redis_url(10))  # the fixture's database
    try:
        first = post(stores, "a", "x" * 200, "cm")
        key = dedupe_key(f"{PREFIX}{{r:a}}:", ALICE.user_id, "cm")
        assert client.get(key) == f"{first.msg_id} 1".encode()
        old = dedupe_key(f"{PREFIX}{{r:a}}:", ALICE.user_id, "old")
        client.set(old, first.event)
        retry = post(stores, "a", "ignored", "old")
        assert retry.duplicate and retry.event == first.event
    finally:
        client.close()


def test_history_keeps_the_last_n(stores: Stores) -> None:
    """recent() is oldest-first, bounded by HISTORY_SIZE, and pages with before."""
    for i in range(7):
        post(stores, "a", f"m{i}")
    ids = [message_id_of(m) for m in stores.messages.recent("a", 50)]
    assert ids == [3, 4, 5, 6, 7]
    assert [message_id_of(m) for m in stores.messages.recent("a", 2)] == [6, 7]
    assert [message_id_of(m) for m in stores.messages.recent("a", 2, before=6)] == [4, 5]
    assert stores.messages.recent("nothing", 10) == []


def test_since_complete_and_incomplete(stores: Stores) -> None:
    """since() replays what it holds and says whether that is everything."""
    for i in range(7):
        post(stores, "a", f"m{i}")
    replay = stores.messages.since("a", 4)
    assert replay.complete and [message_id_of(m) for m in replay.messages] == [5, 6, 7]
    assert stores.messages.since("a", 2).complete  # 3..7 are all held
    assert not stores.messages.since("a", 1).complete  # 2 is gone
    assert stores.messages.since("a", 7) .complete
    assert not stores.messages.since("a", 8).complete  # never issued


def test_since_over_ids_the_history_never_held_is_not_complete(stores: Stores) -> None:
    """Redis came back from an older snapshot (history 1..3) and the resync raised the
    room's sequence above what its workers had delivered (10): ids 4..10 are gone for
    good. A `since` below them is not complete, and replays only what follows the hole
    (its first id tells the resync whom to close); before, the history's oldest id alone
    decided, and since(2) answered complete with 3 and 11 (a silent gap)."""
    for i in range(3):
        post(stores, "gap", f"m{i}")
    stores.messages.raise_sequence("gap", 10)
    assert not stores.messages.since("gap", 2).complete  # 3 is held, 4..10 are not
    assert not stores.messages.since("gap", 5).complete  # nothing held after 5
    assert stores.messages.since("gap", 10).complete
    post(stores, "gap", "after")  # 11
    replay = stores.messages.since("gap", 2)  # only what follows the hole: 11
    assert not replay.complete and ids_of(replay.messages) == [11]
    assert not stores.messages.since("gap", 3).complete
    assert not stores.messages.since("gap", 9).complete
    tail = stores.messages.since("gap", 10)
    assert tail.complete and ids_of(tail.messages) == [11]


REPLAY_BOUND = 4 * 1024 * 1024  # REPLAY_MAX_BYTES, as README.md documents it
HISTORY_BOUND = 1024 * 1024  # HISTORY_MAX_BYTES, as README.md documents it


def ids_of(events: list[bytes]) -> list[int | None]:
    return [message_id_of(m) for m in events]


def test_a_replay_is_bounded_by_bytes(stores: Stores) -> None:
    """since() replays at most 4 MiB, as the database's replay does: further behind is
    complete=False (`recovered: false`), with the newest messages that fit. Before, the
    whole history came back as complete (5 x 0.9 MiB held per joiner)."""
    for i in range(5):  # the whole history (HISTORY_SIZE 5), 0.9 MiB each
        post(stores, "big", f"{i}" * 943_000)
    replay = stores.messages.since("big", 0)
    assert not replay.complete
    assert ids_of(replay.messages) == [2, 3, 4, 5]
    assert sum(map(len, replay.messages)) <= REPLAY_BOUND
    within = stores.messages.since("big", 1)  # 2..5: 3.6 MiB
    assert within.complete and ids_of(within.messages) == [2, 3, 4, 5]
    assert stores.messages.since("big", 5).complete


def test_a_history_page_is_bounded_by_bytes(stores: Stores) -> None:
    """history_page() holds at most 1 MiB: the newest messages that fit, `truncated`
    when older ones within the limit were left out (paged back with `before`), and
    always the newest one, however large."""
    for i in range(5):
        post(stores, "big", f"{i}" * 300_000)
    page = stores.messages.history_page("big", 50)
    assert page.truncated and ids_of(page.messages) == [3, 4, 5]
    assert sum(map(len, page.messages)) <= HISTORY_BOUND
    older = stores.messages.history_page("big", 50, before=3)
    assert not older.truncated and ids_of(older.messages) == [1, 2]
    limited = stores.messages.history_page("big", 2)  # the limit, not the bound, stops it
    assert not limited.truncated and ids_of(limited.messages) == [4, 5]
    post(stores, "big", "x" * 1_500_000)
    alone = stores.messages.history_page("big", 50)
    assert alone.truncated and ids_of(alone.messages) == [6]
    small = stores.messages.history_page("small", 50)
    assert small.messages == [] and not small.truncated


@pytest.mark.parametrize("stores", ["redis"], indirect=True)
def test_raise_sequence_never_goes_back(stores: Stores) -> None:
    """After Redis lost its data, the sequence resumes above what was delivered."""
    post(stores, "a", "m")
    stores.messages.raise_sequence("a", 10)
    stores.messages.raise_sequence("a", 4)
    assert post(stores, "a", "next").msg_id == 11


def test_dm_ids_and_dedupe(stores: Stores) -> None:
    """DMs get increasing ids and dedupe on the sender's client_msg_id."""
    d1 = stores.messages.post_dm(ALICE.user_id, BOB.user_id,
                                 draft_dm(BOB.user_id, "alice", ALICE.user_id, "hi", 1, "k"))
    d2 = stores.messages.post_dm(ALICE.user_id, BOB.user_id,
                                 draft_dm(BOB.user_id, "alice", ALICE.user_id, "hi", 1, "k"))
    d3 = stores.messages.post_dm(ALICE.user_id, BOB.user_id,
                                 draft_dm(BOB.user_id, "alice", ALICE.user_id, "yo", 1, None))
    assert d2.duplicate and d2.event == d1.event
    assert d3.msg_id > d1.msg_id
    assert stored_id_of(d3.event) == d3.msg_id


@pytest.mark.parametrize("stores", ["redis", "redis-pipelined"], indirect=True)
@pytest.mark.parametrize("kind", ["room", "dm"])
def test_a_redis_post_answers_with_the_id_not_the_event(stores: Stores, kind: str) -> None:
    """The post scripts answer with the id alone: the worker splices it into the draft it
    holds, the same bytes the script stored and published (before: the whole event came
    back, a second copy of every message on Redis's network besides the pub/sub ones)."""
    import redis

    counters = redis.Redis.from_url(redis_url(10))
    text = "x" * 20_000
    before = int(counters.info("stats")["total_net_output_bytes"])
    if kind == "room":
        draft = draft_message("big", ALICE.username, ALICE.user_id, text, 1, "c-1")
        posted = stores.messages.post_room("big", ALICE.user_id, draft)
    else:
        draft = draft_dm(BOB.user_id, ALICE.username, ALICE.user_id, text, 1, "c-1")
        posted = stores.messages.post_dm(ALICE.user_id, BOB.user_id, draft)
    sent = int(counters.info("stats")["total_net_output_bytes"]) - before
    counters.close()
    assert posted.event == draft.with_id(posted.msg_id)
    if kind == "room":
        assert stores.messages.recent("big", 1) == [posted.event]
    # What Redis sent: the DM's one pub/sub copy (the fixture listens for bob; nobody
    # for the room), the post's answer and one INFO reply.
    copies = 0 if kind == "room" else 1
    assert sent < copies * len(posted.event) + 5_000, f"Redis sent {sent} bytes"


def test_a_leave_during_leave_gone_is_not_announced_twice() -> None:
    """After a rollback, leave_gone takes out the memberships Redis lists for this worker
    that it no longer has. One whose own leave runs meanwhile (a connection leaving
    while the recovery runs: out of the worker's memberships already, its leave script
    not yet run when leave_gone read the list) was announced ``offline`` by that leave's
    caller; leave_gone, finding it gone, must announce nothing (before: a second
    ``offline``, named with the user's id, as leave.lua names a user it finds gone)."""
    import time
    import uuid

    import redis

    from wschat.stores import redis as redis_stores
    from wschat.stores.redis.keys import room_channel

    url = redis_url_or_skip(10)
    client = redis.Redis.from_url(url)
    watcher = redis.Redis.from_url(url)
    pubsub = watcher.pubsub()
    try:
        first_start(client)
        node = redis_stores._Node()
        rooms = redis_stores.RedisRoomStore(client, node, 3600)
        room = f"gone-{uuid.uuid4().hex[:8]}"
        rooms.join(room, "c-alice", ALICE)
        rooms.join(room, "c-bob", BOB)
        pubsub.subscribe(room_channel(room))
        assert pubsub.get_message(timeout=5) is not None, "subscription not confirmed"
        smembers = client.smembers
        announced: list[Any] = []

        def smembers_then_bob_leaves(key: str) -> Any:
            listed = smembers(key)
            del client.smembers
            announced.append(rooms.leave(room, "c-bob", BOB.user_id).last_of_user)
            return listed

        client.smembers = smembers_then_bob_leaves  # type: ignore[method-assign]
        assert rooms.leave_gone() == 0
        assert "smembers" not in vars(client) and announced == [True]
        client.publish(room_channel(room), b"marker")
        seen: list[bytes] = []
        deadline = time.monotonic() + 5
        while not seen or seen[-1] != b"marker":
            assert time.monotonic() < deadline, seen
            message = pubsub.get_message(timeout=1)
            if message is not None and message["type"] == "message":
                seen.append(message["data"])
        assert seen == [b"marker"], seen
        assert sorted(u.user_id for u in rooms.members(room)) == [ALICE.user_id]
    finally:
        pubsub.close()
        watcher.close()
        client.close()


def test_memory_rooms_published_to_without_members_expire_after_room_ttl() -> None:
    """A room posted to while nobody is in it (``/api/publish``), never joined or
    emptied, keeps its history for ``ROOM_TTL`` from that post, not for good (before:
    each such room stayed in the worker's memory, so a script publishing to many room
    names grew it without bound); a later post does not extend it, and a room with
    members is never dropped."""
    from wschat.stores.memory import MemoryBroker, MemoryMessageStore

    now = [0.0]
    store = MemoryMessageStore(MemoryBroker(), 5, room_ttl=10, clock=lambda: now[0])

    def post(room: str) -> None:
        store.post_room(room, "system", draft_message(room, "api", "system", "x", 0, None))

    store.room_occupied("lived-in")
    store.room_occupied("emptied")
    store.room_emptied("emptied")  # no history yet: its first post starts the clock
    for room in ("lived-in", "never-joined", "emptied"):
        post(room)
    empty = store.held_bytes
    now[0] = 9
    post("never-joined")  # does not extend it
    assert store.last_id("never-joined") == 2
    now[0] = 11
    post("elsewhere")
    assert store.recent("never-joined", 10) == store.recent("emptied", 10) == []
    # their last ids stay (ROOM_NUMBERING_TTL, default 7 days)
    assert store.last_id("never-joined") == 2 and store.last_id("emptied") == 1
    assert store.last_id("lived-in") == 1
    assert store.held_bytes < empty  # two rooms gone, one added
    store.room_occupied("elsewhere")  # joined in time: kept
    now[0] = 100
    post("another")
    assert store.last_id("elsewhere") == 1 and store.last_id("lived-in") == 1


def test_memory_last_ids_outlive_the_history_and_give_way_before_rooms_in_use() -> None:
    """The memory store keeps an emptied room's last id ``ROOM_NUMBERING_TTL`` from when
    it emptied, charged to ``MEMORY_HISTORY_BYTES``; over that bound, those ids go (oldest
    first) after the emptied rooms' histories and before any message of a room in use
    (an id given up is a room numbered anew, as every emptied room was before)."""
    from wschat.stores.memory import RETIRED_OVERHEAD, MemoryBroker, MemoryMessageStore

    now = [0.0]
    store = MemoryMessageStore(MemoryBroker(), 5, room_ttl=10, clock=lambda: now[0],
                               numbering_ttl=100)

    def post(room: str) -> int:
        return store.post_room(room, "u", draft_message(room, "a", "u", "x" * 50, 0,
                                                        None)).msg_id

    for i, room in enumerate(("gone-1", "gone-2", "gone-3")):
        now[0] = i
        store.room_occupied(room)
        post(room)
        post(room)
        store.room_emptied(room)
    store.room_occupied("in-use")
    post("in-use")
    now[0] = 12.5  # past ROOM_TTL for all three
    post("in-use")
    assert all(store.recent(f"gone-{i}", 5) == [] for i in (1, 2, 3))
    assert all(store.last_id(f"gone-{i}") == 2 for i in (1, 2, 3))
    one_more = len(draft_message("in-use", "a", "u", "x" * 50, 0, None).with_id(3)) + 100
    store._max_bytes = store.held_bytes + one_more - RETIRED_OVERHEAD // 2
    post("in-use")  # over the bound by half a last id's charge
    assert store.last_id("gone-1") == 0, "the oldest last id goes first"
    assert store.last_id("gone-2") == store.last_id("gone-3") == 2
    assert len(store.recent("in-use", 5)) == 3
    now[0] = 101.5  # ROOM_NUMBERING_TTL since gone-2 emptied, not since it was dropped
    held = store.held_bytes
    assert store.last_id("gone-2") == 0 and store.held_bytes == held - RETIRED_OVERHEAD
    assert store.last_id("gone-3") == 2
    assert post("gone-2") == 1  # numbered anew


def test_memory_a_last_id_is_kept_while_its_room_has_members_again() -> None:
    """A room joined again after its history expired keeps its last id while members are in
    it, as Redis's join takes its sequence's expiry off, and counts ROOM_NUMBERING_TTL
    anew when it empties again (before: the id stayed among the dropped rooms' ones, to
    expire ROOM_NUMBERING_TTL after the first emptying or to give way to the memory bound
    with members in, and the room's next message was 1: the hub drops ids at or below a
    member's join point, so members that joined at 3 never got the new 1 to 3)."""
    from wschat.stores.memory import MemoryBroker, MemoryMessageStore

    now = [0.0]
    store = MemoryMessageStore(MemoryBroker(), 5, room_ttl=10, clock=lambda: now[0],
                               numbering_ttl=100)

    def post(room: str) -> int:
        return store.post_room(room, "u", draft_message(room, "a", "u", "x", 0,
                                                        None)).msg_id

    store.room_occupied("back")
    assert [post("back") for _ in range(3)] == [1, 2, 3]
    store.room_emptied("back")
    now[0] = 11
    store.last_id("elsewhere")  # past ROOM_TTL: the history goes, the last id stays
    assert store.recent("back", 5) == [] and store.last_id("back") == 3
    store.room_occupied("back")  # members back; nobody posts for a while
    store.room_occupied("busy")
    post("busy")
    store._max_bytes = store.held_bytes
    post("busy")  # over the bound: a room in use gives up its oldest message, not its id
    assert store.last_id("back") == 3 and len(store.recent("busy", 5)) == 1
    now[0] = 150  # ROOM_NUMBERING_TTL since the first emptying, members in all along
    assert post("back") == 4
    store.room_emptied("back")
    now[0] = 200  # past ROOM_TTL since the second emptying, ROOM_NUMBERING_TTL from it too
    assert store.last_id("back") == 4 and store.recent("back", 5) == []
    assert post("back") == 5


@pytest.mark.parametrize("stores", ["redis", "redis-pipelined"], indirect=True)
def test_redis_rooms_posted_to_without_members_expire_after_room_ttl(stores: Stores) -> None:
    """Redis as the memory store: a room posted to while nobody is in it (``/api/publish``)
    keeps its history ``ROOM_TTL`` and its sequence ``ROOM_NUMBERING_TTL`` from that post
    (before: never joined, they had no expiry and stayed for good); a later post does not
    extend them, a join takes them off, a room with members gets none, and a post to a
    room whose history expired while its sequence lives gives the new history its TTL, as
    does a member's post that began the history of a room its sender's leave emptied
    (before: that history, kept by nobody, stayed in Redis for good)."""
    import redis

    from wschat.stores.base import API_USER
    from wschat.stores.redis.keys import room_keys

    API = User(API_USER, "the server API")
    WEEK = 7 * 24 * 3600

    client = redis.Redis.from_url(redis_url(10))  # the fixture's database

    def ttls(room: str) -> list[int]:
        return [client.ttl(key) for key in room_keys(room)[4:]]  # seq, hist

    def expiring(room: str) -> bool:
        seq, hist = ttls(room)
        return 3600 < seq <= WEEK and 0 < hist <= 3600

    try:
        post(stores, "a-member-posts", "x")  # the member's leave came first: it began
        assert expiring("a-member-posts"), "kept for good"  # the history of an empty room
        client.persist(room_keys("a-member-posts")[5])
        post(stores, "a-member-posts", "y")  # a member's later posts skip the check
        assert ttls("a-member-posts")[1] == -1
        post(stores, "never-joined", "x", user=API)
        assert expiring("never-joined"), ttls("never-joined")
        client.expire(room_keys("never-joined")[4], 100)  # as if time had passed
        client.expire(room_keys("never-joined")[5], 100)
        post(stores, "never-joined", "y", user=API)
        assert all(0 < ttl <= 100 for ttl in ttls("never-joined")), "extended"
        stores.rooms.join("never-joined", "c1", ALICE)
        assert ttls("never-joined") == [-1, -1]
        post(stores, "never-joined", "z", user=API)
        assert ttls("never-joined") == [-1, -1]  # a room with members keeps its keys
        stores.rooms.leave("never-joined", "c1", ALICE.user_id)
        assert expiring("never-joined"), ttls("never-joined")
        client.delete(room_keys("never-joined")[5])  # ROOM_TTL passed, the numbering lives
        assert post(stores, "never-joined", "again", user=API).msg_id == 4
        assert expiring("never-joined"), ttls("never-joined")
    finally:
        client.close()


@pytest.mark.parametrize("stores", ["redis", "redis-pipelined"], indirect=True)
def test_redis_a_members_message_published_into_an_emptied_room_expires(
        stores: Stores) -> None:
    """With persistence a member's committed message is published after the room emptied
    (its sender left in between, its history had expired): the history it begins gets
    ``ROOM_TTL`` and the sequence ``ROOM_NUMBERING_TTL`` (before: only the API's and the
    releaser's did, and this history stayed in Redis for good)."""
    import redis

    from wschat.stores.base import PUBLISHED, Stored
    from wschat.stores.redis.keys import room_keys

    client = redis.Redis.from_url(redis_url(10))  # the fixture's database
    seq, hist = room_keys("left-first")[4:]
    try:
        event = draft_message("left-first", "alice", ALICE.user_id, "x", 1, None).with_id(1)
        assert stores.messages.publish_stored(
            [Stored(1, event, "left-first", ALICE.user_id)]) == [PUBLISHED]
        assert 3600 < client.ttl(seq) <= 7 * 24 * 3600 and 0 < client.ttl(hist) <= 3600
    finally:
        client.close()


@pytest.mark.parametrize("stores", ["redis", "redis-pipelined"], indirect=True)
def test_redis_raising_an_emptied_rooms_sequence_keeps_its_expiry(stores: Stores) -> None:
    """A sequence raised (a worker's resync after an outage, the durable releaser moving
    past ids the log lost) keeps the expiry its room's last leave gave it
    (``ROOM_NUMBERING_TTL``) (before: raise_seq.lua's SET took it off, and the sequence
    stayed in Redis for good)."""
    import redis

    from wschat.stores.redis.keys import room_keys

    client = redis.Redis.from_url(redis_url(10))  # the fixture's database
    seq = room_keys("raised")[4]
    try:
        stores.rooms.join("raised", "c1", ALICE)
        post(stores, "raised", "x")
        stores.rooms.leave("raised", "c1", ALICE.user_id)
        assert 3600 < client.ttl(seq) <= 7 * 24 * 3600
        stores.messages.raise_sequence("raised", 40)
        assert stores.messages.last_id("raised") == 40
        assert 3600 < client.ttl(seq) <= 7 * 24 * 3600
    finally:
        client.close()

@pytest.mark.parametrize("stores", ["redis", "redis-pipelined"], indirect=True)
def test_redis_a_sequence_raised_in_a_room_nobody_is_in_expires(stores: Stores) -> None:
    """A sequence raised where Redis has none for a room nobody is in (a worker's resync
    after Redis lost its data, for a room whose only local members closed before they were
    registered again; the durable store continuing a room from the log, or moving past ids
    it lost, with nothing left to publish) expires ``ROOM_NUMBERING_TTL`` from then, as
    after a leave; with members in, it has none, and the DM sequence never has one (before:
    raise_seq.lua's SET made the key without expiry, and it stayed in Redis for good)."""
    import redis

    from wschat.stores.redis.keys import DM_SEQ, room_keys

    client = redis.Redis.from_url(redis_url(10))  # the fixture's database
    seq = room_keys("raised-empty")[4]
    try:
        stores.messages.raise_sequence("raised-empty", 40)
        assert stores.messages.last_id("raised-empty") == 40
        assert 3600 < client.ttl(seq) <= 7 * 24 * 3600, client.ttl(seq)
        stores.rooms.join("raised-empty", "c1", ALICE)
        stores.messages.raise_sequence("raised-empty", 50)
        assert client.ttl(seq) == -1  # a room with members keeps its sequence
        stores.rooms.leave("raised-empty", "c1", ALICE.user_id)
        assert 3600 < client.ttl(seq) <= 7 * 24 * 3600
        stores.messages.raise_dm_sequence(7)
        assert client.ttl(DM_SEQ) == -1
    finally:
        client.close()



def test_memory_a_rooms_epoch_lasts_as_long_as_its_numbering() -> None:
    """A room's epoch (the name of its numbering, ``joined``'s) stays while its ids go on:
    through an emptying, its history's expiry and its last id kept meanwhile; once that
    last id is given up (``ROOM_NUMBERING_TTL``) the room numbers from 1 under a new
    one. Another room, or another server (a restart), has another."""
    from wschat.stores.memory import MemoryBroker, MemoryMessageStore

    now = [0.0]
    store = MemoryMessageStore(MemoryBroker(), 5, room_ttl=10, clock=lambda: now[0],
                               numbering_ttl=100)

    def post(room: str) -> int:
        return store.post_room(room, "u", draft_message(room, "a", "u", "x", 0, None)).msg_id

    store.room_occupied("r")
    epoch = store.epoch("r")
    assert post("r") == 1 and store.epoch("r") == epoch
    store.room_emptied("r")
    now[0] = 50  # past ROOM_TTL: the history goes, the numbering stays
    assert store.epoch("r") == epoch and store.recent("r", 5) == []
    assert post("r") == 2
    store.room_emptied("r")
    now[0] = 200  # ROOM_NUMBERING_TTL after it emptied: its ids start again
    assert store.last_id("r") == 0
    store.room_occupied("r")
    assert store.epoch("r") != epoch and post("r") == 1
    assert store.epoch("other") != store.epoch("r")
    restarted = MemoryMessageStore(MemoryBroker(), 5, room_ttl=10)
    assert restarted.epoch("r") != store.epoch("r")


@pytest.mark.parametrize("stores", ["redis", "redis-pipelined"], indirect=True)
def test_redis_a_rooms_epoch_expires_with_its_sequence_never_after_it(stores: Stores) -> None:
    """Redis keeps a room's epoch beside its sequence and gives it the same expiry in
    the same step wherever the sequence gets one (a leave, a post to a room nobody is in,
    a raise) or loses it (a join), so a numbering that starts again from 1 is never named
    as the old one was; a join names one where there is none, with the sequence's
    remaining time, and heals one left without an expiry beside a sequence with one (a
    leave by a worker of the release before epochs)."""
    import redis

    from wschat.stores.base import API_USER
    from wschat.stores.redis.keys import room_epoch_key, room_keys

    client = redis.Redis.from_url(redis_url(10))  # the fixture's database
    seq, epoch = room_keys("numbered")[4], room_epoch_key("numbered")

    def in_step() -> bool:  # the epoch never outlives a sequence that expires
        seq_at, epoch_at = (client.execute_command("PEXPIRETIME", key) for key in (seq, epoch))
        return seq_at < 0 or 0 < epoch_at <= seq_at or epoch_at == -2

    try:
        stores.rooms.join("numbered", "c1", ALICE)
        named = stores.messages.epoch("numbered")
        assert client.pttl(epoch) == -1 and in_step()
        post(stores, "numbered", "x")
        stores.rooms.leave("numbered", "c1", ALICE.user_id)
        assert 3600_000 < client.pttl(epoch) and in_step()
        assert stores.messages.epoch("numbered") == named
        post(stores, "numbered", "y", user=User(API_USER, "the server API"))
        stores.messages.raise_sequence("numbered", 40)
        assert in_step() and stores.messages.epoch("numbered") == named
        stores.rooms.join("numbered", "c1", ALICE)
        assert client.pttl(seq) == client.pttl(epoch) == -1
        stores.rooms.leave("numbered", "c1", ALICE.user_id)
        client.persist(epoch)  # as an older release's leave.lua left it
        assert stores.messages.epoch("numbered") == named and in_step()
        client.persist(epoch)  # as an older release's leave.lua left it, and then
        client.delete(seq)  # its sequence expired: the emptied room's next join renames it
        stores.rooms.join("numbered", "c1", ALICE)
        renamed = stores.messages.epoch("numbered")
        assert renamed != named
        stores.rooms.join("numbered", "c2", BOB)  # a second member: the same numbering
        assert stores.messages.epoch("numbered") == renamed
        for conn, user in (("c1", ALICE), ("c2", BOB)):
            stores.rooms.leave("numbered", conn, user.user_id)
        client.delete(seq, epoch)  # expired together (ROOM_NUMBERING_TTL)
        stores.messages.raise_sequence("numbered", 3)  # a room nobody is in: expiring
        stores.rooms.join("numbered", "c1", ALICE)
        assert stores.messages.epoch("numbered") not in (named, renamed)
        assert client.pttl(seq) == client.pttl(epoch) == -1
    finally:
        client.close()


def test_redis_a_rooms_history_never_ends_after_its_sequence() -> None:
    """With ROOM_TTL equal to ROOM_NUMBERING_TTL, an emptied room's history is never
    kept a moment after its sequence (leave.lua and unattended.lua count both from one
    reading of the clock: Redis 7.0 reads it anew for each EXPIRE of a script, so the
    history could outlive the sequence by a millisecond, and a post in it would have
    numbered from 1 beside the old ids). Many rounds: each crossed a millisecond seldom."""
    import uuid

    from wschat.stores import redis as redis_stores
    from wschat.stores.redis.keys import room_keys

    client = redis_stores.redis.Redis.from_url(redis_url_or_skip(10))
    first_start(client)
    settings = Settings.from_env({"HISTORY_SIZE": "5"})
    rooms = redis_stores.RedisRoomStore(client, redis_stores._Node(), 3600, numbering_ttl=3600)
    messages = redis_stores.RedisMessageStore(client, settings.history_size, room_ttl=3600,
                                              numbering_ttl=3600)

    def ends(name: str) -> tuple[int, int]:
        seq, hist = room_keys(name)[4], room_keys(name)[5]
        return tuple(client.execute_command("PEXPIRETIME", k) for k in (seq, hist))

    try:
        for _ in range(150):
            name = f"ttl-{uuid.uuid4().hex[:8]}"
            rooms.join(name, "c1", ALICE)
            draft = draft_message(name, ALICE.username, ALICE.user_id, "x", 1, None)
            messages.post_room(name, ALICE.user_id, draft)
            rooms.leave(name, "c1", ALICE.user_id)
            seq_at, hist_at = ends(name)
            assert 0 < hist_at <= seq_at, "a leave's"
            unattended = f"ttl-{uuid.uuid4().hex[:8]}"  # posted to with nobody in it
            draft = draft_message(unattended, "api", "api", "x", 1, None)
            messages.post_room(unattended, "api", draft)
            seq_at, hist_at = ends(unattended)
            assert 0 < hist_at <= seq_at, "a post's to a room nobody is in"
    finally:
        client.close()


def test_a_committed_message_published_twice_reaches_the_window_once(stores: Stores) -> None:
    """Every store as Redis's publish script: an id the window is past already is STALE,
    neither kept nor published again (before, the memory store appended and published it
    a second time: two workers' durable stores, or two greenlets of one, refilling a room
    from the log at once would have put every message into its history twice)."""
    from wschat.stores.base import PUBLISHED, STALE, Stored

    event = draft_message("twice", "a", "alice", "x", 1, None).with_id(1)
    assert stores.messages.publish_stored([Stored(1, event, "twice", "alice")]) == [PUBLISHED]
    assert stores.messages.publish_stored([Stored(1, event, "twice", "alice")]) == [STALE]
    assert [message_id_of(e) for e in stores.messages.recent("twice", 10)] == [1]


def test_redis_a_users_places_are_her_connections_and_claims() -> None:
    """MAX_CONNECTIONS_PER_USER across workers (claim.lua): the user's registered
    connections plus the places claimed for connections on their way in. A place is
    taken over by its connection's connect (counted once), given back by release_claim,
    and ends by itself (a worker that died holding it)."""
    import uuid

    from wschat.stores import redis as redis_stores

    client = redis_stores.redis.Redis.from_url(redis_url_or_skip(10))
    node = redis_stores._Node()
    presence = redis_stores.RedisPresenceStore(client, node)
    carol = User(f"u-carol-{uuid.uuid4().hex[:8]}", "carol")
    try:
        assert presence.claim("k1", carol.user_id, 2)
        assert presence.claim("k2", carol.user_id, 2)
        assert not presence.claim("k3", carol.user_id, 2)
        presence.connect("k1", carol)  # its place taken over: still two
        assert not presence.claim("k3", carol.user_id, 2)
        presence.release_claim("k2", carol.user_id)
        assert presence.claim("k3", carol.user_id, 2)
        presence.disconnect("k1", carol.user_id)
        assert presence.claim("k4", carol.user_id, 2)
        assert not presence.claim("k5", carol.user_id, 2)
        presence.release_claim("k3", carol.user_id)
        presence.release_claim("k4", carol.user_id)
        brief = redis_stores.RedisPresenceStore(client, node, claim_ttl=0.2)
        assert brief.claim("k6", carol.user_id, 1)
        assert not presence.claim("k7", carol.user_id, 1)
        wait_until(lambda: presence.claim("k7", carol.user_id, 1),
                   message="the unused place to expire")
    finally:
        client.close()


def test_redis_a_users_typing_on_many_workers_is_one_indicator() -> None:
    """typing.lua: the room hears `true` when the first worker holds the user's indicator
    on and `false` when the last one stops; a worker's field whose time is up (a worker
    that died) counts as nobody's, and goes."""
    import uuid

    from wschat.stores import redis as redis_stores
    from wschat.stores.redis.keys import typists_key

    client = redis_stores.redis.Redis.from_url(redis_url_or_skip(10))
    one, two = (redis_stores.RedisBroker(client, node_id=n) for n in ("w1", "w2"))
    room, user = f"r-{uuid.uuid4().hex[:8]}", "u-dana"
    on, off = b'{"status":true}', b'{"status":false}'
    try:
        assert one.publish_typing(room, user, on, 5.0, True)
        assert not two.publish_typing(room, user, on, 5.0, True)  # one typist
        assert not one.publish_typing(room, user, on, 5.0, False)  # still, renewed
        assert not one.publish_typing(room, user, off, None, False)  # the other types on
        assert two.publish_typing(room, user, off, None, False)  # the last one
        assert not two.publish_typing(room, user, off, None, False)  # told already
        assert one.publish_typing(room, user, on, 0.05, True)

        def lapsed() -> bool:
            seconds, micros = client.time()
            until = int(client.hget(typists_key(room, user), "w1"))
            return until <= seconds * 1000 + micros // 1000

        wait_until(lapsed, message="the first worker's time to be up (Redis's clock)")
        assert two.publish_typing(room, user, on, 5.0, True)
        assert client.hkeys(typists_key(room, user)) == [b"w2"]
        assert two.publish_typing(room, user, off, None, False)
    finally:
        client.close()
