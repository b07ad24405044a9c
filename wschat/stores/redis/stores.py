"""The Redis room, presence and message stores (see the package's docstring).

Every state change is one Lua script (``scripts/*.lua``) or one pipeline, so
there is no lock and no read-modify-write race between workers. A room message
is one round trip: the script spends the sender's rate-limit tokens,
deduplicates, takes the next id, appends to the history and PUBLISHes, all
atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis

from ...protocol import MessageDraft, message_id_of, stored_id_of
from ...ratelimit import Charge, RateLimited
from ...telemetry import Metrics
from ..base import (
    API_USER, HISTORY_MAX_BYTES, PUBLISHED, REPLAY_MAX_BYTES, HistoryPage, JoinResult,
    LeaveResult, MessageStore, Posted, PresenceStore, RecipientOffline, ROOM_NUMBERING_TTL,
    UNHEARD, Replay, RoomStore, Stored, Unavailable, User, new_epoch, retry_echo, run_to,
)
from .keys import (
    DM_SEQ, MEMBERSHIPS, NODES, PREFIX, PRESENCE, ROOMS, RoomTtls, charged, dedupe_key, guarded,
    held_key, membership_keys, membership_token, room_channel, room_epoch_key, room_keys, script,
    split_token, user_channel, user_claims, user_nodes,
)
from .pipeline import Pipelined
from .nodes import (
    Node, announce_offline, disconnect_registered, leave_memberships, live_window_ms,
)

log = logging.getLogger("wschat.redis")

DEDUPE_TTL = 3600


class RedisRoomStore(RoomStore):
    def __init__(self, client: redis.Redis, node: Node, room_ttl: float,
                 metrics: Metrics | None = None,
                 numbering_ttl: float = ROOM_NUMBERING_TTL) -> None:
        self._client = client
        self._node = node
        self._ttls = RoomTtls.of(room_ttl, numbering_ttl)
        self._metrics = metrics
        self._join = script(client, "join", prelude="numbering")
        self._leave = script(client, "leave", prelude="numbering")
        # The memberships (their tokens) this worker joined and has not left since, made
        # in Redis or on their way: see leave_gone.
        self._local: set[str] = set()

    @guarded
    def join(self, room: str, conn_id: str, user: User) -> JoinResult:
        token = membership_token(room, conn_id, user.user_id)
        self._local.add(token)
        out = self._join(keys=membership_keys(room, self._node.memberships), args=[
            room, conn_id, user.user_id, user.username, token])
        members = [User(out[i].decode(), out[i + 1].decode()) for i in range(1, len(out), 2)]
        return JoinResult(bool(out[0]), members)

    @guarded
    def leave(self, room: str, conn_id: str, user_id: str) -> LeaveResult:
        token = membership_token(room, conn_id, user_id)
        self._local.discard(token)
        _, last, empty, _ = self._leave(keys=membership_keys(room, self._node.memberships),
                                        args=[room, conn_id, user_id, token, *self._ttls])
        return LeaveResult(bool(last), bool(empty))

    @guarded
    def leave_gone(self) -> int:
        """Take out of their rooms the memberships Redis lists for this node that it no
        longer has (announcing ``offline`` where one was a user's last there), as the
        reaper does for a dead node's; return how many. After Redis rolled back to a
        snapshot (or a failover to a replica behind), the node's memberships are as the
        snapshot has them: ones that ended since (connections closed, rooms left) would
        stay in their rooms' member lists and counts for as long as the worker lives,
        since the worker's re-registration only adds its live ones again."""
        memberships = self._node.memberships
        listed = (raw.decode() for raw in self._client.smembers(memberships))
        tokens = [t for t in (split_token(raw) for raw in listed if raw not in self._local) if t]
        left = leave_memberships(self._leave, self._client, memberships, tokens, self._ttls)
        # Only those it took out: one found gone already was left meanwhile, by its
        # connection's own leave (discarded from _local after the list was read), whose
        # caller announced it, with the user's name (leave.lua names a gone user by id).
        taken = [(token, reply) for token, reply in zip(tokens, left, strict=True)
                 if int(reply[0])]
        if any(last for _, (_, last, _, _) in taken):
            with self._client.pipeline(transaction=False) as pipe:
                announce_offline(pipe, [t for t, _ in taken], [r for _, r in taken])
                pipe.execute()
        return len(taken)

    @guarded
    def members(self, room: str) -> list[User]:
        keys = room_keys(room)
        ids = self._client.zrange(keys[3], 0, -1)
        if not ids:
            return []
        names = self._client.hmget(keys[2], ids)
        return [User(i.decode(), (n or i).decode()) for i, n in zip(ids, names)]

    @guarded
    def totals(self) -> tuple[int, int]:
        with self._client.pipeline(transaction=False) as pipe:
            rooms, memberships = pipe.scard(ROOMS).get(MEMBERSHIPS).execute()
        return int(rooms), int(memberships or 0)


class RedisPresenceStore(PresenceStore):
    def __init__(self, client: redis.Redis, node: Node, metrics: Metrics | None = None,
                 claim_ttl: float = 30.0) -> None:
        self._client = client
        self._node = node
        self._metrics = metrics
        # A claimed place outlives a slow registration (PRESENCE_TTL: as long as a dead
        # worker's connections count before they are reaped)
        self._claim_ttl_ms = max(1, int(claim_ttl * 1000))
        self._claim = script(client, "claim")
        self._connect = script(client, "connect")
        self._disconnect = script(client, "disconnect")
        # user id -> this worker's connections of the user: at a user's last one,
        # disconnect.lua takes this node out of her `nodes` whatever its count says
        # (a reaper of the previous release, which does not keep that count, may have
        # taken her connections here out of Redis before this worker registered them again)
        self._local: dict[str, set[str]] = {}

    @guarded
    def connect(self, conn_id: str, user: User) -> None:
        node = self._node
        self._local.setdefault(user.user_id, set()).add(conn_id)
        self._connect(keys=[node.conns, PRESENCE, user_nodes(user.user_id),
                            user_claims(user.user_id)],
                      args=[conn_id, user.user_id, node.node_id])

    @guarded
    def claim(self, conn_id: str, user_id: str, cap: int) -> bool:
        return bool(self._claim(keys=[PRESENCE, user_claims(user_id)],
                                args=[user_id, conn_id, cap, self._claim_ttl_ms]))

    def release_claim(self, conn_id: str, user_id: str) -> None:
        try:
            self._unclaim(conn_id, user_id)
        except Unavailable as exc:  # it expires by itself (claim.lua)
            log.info("place of %s among %s's connections left to expire: %s",
                     conn_id, user_id, exc)

    @guarded
    def _unclaim(self, conn_id: str, user_id: str) -> None:
        self._client.zrem(user_claims(user_id), conn_id)

    @guarded
    def disconnect(self, conn_id: str, user_id: str) -> None:
        node = self._node
        local = self._local.get(user_id)
        if local is not None:
            local.discard(conn_id)
            if not local:
                del self._local[user_id]
        last = "1" if user_id not in self._local else "0"
        self._disconnect(keys=[node.conns, PRESENCE, user_nodes(user_id)],
                         args=[conn_id, user_id, node.node_id, last])

    @guarded
    def disconnect_all(self) -> int:
        """Take every connection this node registered out (Redis rolled back to a snapshot:
        it may list some that closed since; the worker's resync registers its live ones
        again). Left, a closed one would count its user online and, in the user's
        ``nodes``, this worker among hers for as long as it lives: dm_heard.lua would
        refuse every DM to her, since this worker is not subscribed to her channel."""
        return disconnect_registered(self._disconnect, self._client, self._node.node_id)

    @guarded
    def is_online(self, user_id: str) -> bool:
        count = self._client.hget(PRESENCE, user_id)
        return bool(count) and int(count) > 0


class RedisMessageStore(MessageStore):
    charges_posts = True  # the post scripts spend the sender's tokens (charge.lua)
    checks_recipient = True  # post_dm(recipient_online=None): dm_online.lua

    def __init__(self, client: redis.Redis, history_size: int, metrics: Metrics | None = None,
                 presence_ttl: float = 30.0, replay_max_bytes: int = REPLAY_MAX_BYTES,
                 room_ttl: float = 3600.0, numbering_ttl: float = ROOM_NUMBERING_TTL) -> None:
        self._client = client
        self._size = history_size
        self._ttls = RoomTtls.of(room_ttl, numbering_ttl)  # a room posted to with nobody in it
        self._replay_max_bytes = replay_max_bytes
        self._live_ms = live_window_ms(presence_ttl)  # dm_heard.lua's fresh_ms
        self._metrics = metrics
        self._post_room = script(client, "post_room",
                                 prelude=("gate", "charge", "take_id", "numbering", "unattended"))
        self._post_dm = script(client, "post_dm",
                               prelude=("gate", "charge", "dm_heard", "take_id"))
        self._post_dm_online = script(
            client, "post_dm", prelude=("gate", "charge", "dm_heard", "dm_online", "take_id"))
        self._raise_seq = script(client, "raise_seq", prelude="numbering")
        self._room_epoch = script(client, "room_epoch")
        # Reads of the history stay off the auto-pipeline (large replies), as LRANGE did.
        self._tail = script(client.client if isinstance(client, Pipelined) else client, "tail")
        self._publish_stored = script(client, "publish_stored",
                                      prelude=("numbering", "unattended"))
        self._publish_dm = script(client, "publish_dm", prelude=("charge", "dm_heard"))
        self._publish_kept = script(client, "publish_kept", prelude=("charge", "dm_heard"))
        #: Whether posts can be delivered: the broker's health, set by the factory.
        self.delivering: Callable[[], bool] = lambda: True
        #: Told when the gate refused a post (gate.lua: Redis lost its data): the
        #: factory's check of the epoch, which finds a flush no connection noticed.
        self.on_gate_closed: Callable[[], None] = lambda: None

    def _expiries(self, sender_id: str) -> tuple[int, int, int]:
        """The post scripts' ``room_ttl numbering_ttl unattended``: the expiries they give
        a room nobody is in, and 1 for the server API's posts, the only ones meant for a
        room nobody may be in, and for messages the durable store's releaser publishes from
        the log (no sender: the room may have emptied since they were committed, before
        their keys existed for its last leave to give them expiries): the script then looks
        whether the room has connections. A member's post is looked at only when it began
        the room's history (the member's leave came first); its others skip that check (two
        commands less)."""
        return (*self._ttls, 1 if sender_id in (API_USER, "") else 0)

    def check_delivering(self) -> None:
        if not self.delivering():
            raise Unavailable("redis: resubscribing after an outage")

    def _posted(self, out: list[Any], draft: MessageDraft, room: str | None = None) -> Posted:
        outcome, value = out
        if outcome == 0:  # the id: the event is the draft with it, as the script stored it
            return Posted(value, draft.with_id(value), False)
        if outcome == 2:
            raise RateLimited(int(value))
        if outcome == 3:
            raise RecipientOffline("no such user online")
        if outcome == 4:  # post_dm.lua: no worker would have delivered it
            raise Unavailable("redis: the recipient's workers are not subscribed")
        if outcome == 5:  # gate.lua: Redis lost its data, sequences are being raised
            self.on_gate_closed()
            raise Unavailable("redis: recovering from a loss of its data")
        if outcome == 6:  # gate.lua: another worker numbers messages in the database
            # Logged as every refusal is (Chat: "refusing requests: store unavailable").
            holder = value.decode() if isinstance(value, bytes) else str(value)
            raise Unavailable(f"messages are numbered by the database in another worker "
                              f"({holder}, and maybe others: ENABLE_PERSISTENCE there, a "
                              f"rolling update turning it on or off); posts wait until "
                              f"none is left")
        return self._retried(bytes(value), draft, room)

    def _retried(self, seen: bytes, draft: MessageDraft, room: str | None) -> Posted:
        """A retry's echo from its dedupe key's ``<id> <timestamp_ms>``: the room's copy
        while its history holds it, else rebuilt from the retry's own draft."""
        if seen.startswith(b"{"):  # a key written before keys held only the id
            return Posted(stored_id_of(seen), seen, True)
        msg_id, timestamp_ms = (int(part) for part in seen.split(b" "))
        held = reversed(self._client.lrange(room_keys(room)[5], 0, -1)) if room else ()
        return retry_echo(draft, msg_id, timestamp_ms, (bytes(event) for event in held))

    @guarded
    def post_room(self, room: str, user_id: str, draft: MessageDraft,
                  charge: Charge = ()) -> Posted:
        self.check_delivering()
        keys = room_keys(room)
        script_keys = [keys[4], keys[5], room_channel(room)]
        if draft.client_msg_id:
            script_keys.append(dedupe_key(f"{PREFIX}{{r:{room}}}:", user_id,
                                           draft.client_msg_id))
        script_keys, args = charged(script_keys, [
            draft.prefix, draft.suffix, DEDUPE_TTL, draft.timestamp_ms, self._size,
            *self._expiries(user_id)], charge)
        return self._posted(self._post_room(keys=script_keys, args=args), draft, room)

    @guarded
    def post_dm(self, sender_id: str, recipient_id: str, draft: MessageDraft,
                recipient_online: bool | None = True, charge: Charge = ()) -> Posted:
        self.check_delivering()
        script_keys = [DM_SEQ, user_channel(recipient_id), user_channel(sender_id)]
        if draft.client_msg_id:
            script_keys.append(dedupe_key(f"{PREFIX}dm:", sender_id, draft.client_msg_id))
        args: list[Any] = [draft.prefix, draft.suffix, DEDUPE_TTL, draft.timestamp_ms,
                           self._live_ms]
        post = self._post_dm
        if recipient_online is None:  # checked in the same call (dm_online.lua)
            script_keys.append(PRESENCE)
            args.append(recipient_id)
            post = self._post_dm_online
        script_keys += (NODES, user_nodes(recipient_id), user_nodes(sender_id))  # dm_heard.lua
        script_keys, args = charged(script_keys, args, charge)
        return self._posted(post(keys=script_keys, args=args), draft)

    @guarded
    def recent(self, room: str, limit: int, before: int | None = None) -> list[bytes]:
        hist = room_keys(room)[5]
        if before is None:
            return list(self._client.lrange(hist, -limit, -1))
        held = [m for m in self._client.lrange(hist, 0, -1)
                if (message_id_of(m) or 0) < before]
        return held[-limit:]

    @guarded
    def history_page(self, room: str, limit: int, before: int | None = None,
                     max_bytes: int = HISTORY_MAX_BYTES) -> HistoryPage:
        keys = room_keys(room)
        _, _, cut, *events = self._tail(keys=[keys[4], keys[5]],
                                        args=[-1, before or 0, limit, max_bytes, 1])
        return HistoryPage([bytes(e) for e in events], bool(cut))

    @guarded
    def since(self, room: str, after_id: int) -> Replay:
        """Read by tail.lua newest first, at most ``replay_max_bytes`` of it (and one
        message more) leaving Redis."""
        keys = room_keys(room)
        last, oldest, cut, *events = self._tail(
            keys=[keys[4], keys[5]], args=[after_id, 0, 0, self._replay_max_bytes, 0])
        if after_id > last:
            return Replay([], False)
        if after_id == last:
            return Replay([], True)
        # Every id after `since` up to the sequence, not only the oldest one held: after
        # Redis came back from an older snapshot the resync raised the sequence above the
        # history, and the ids between are gone for good.
        newer, unbroken = run_to([bytes(e) for e in events], after_id, last)
        return Replay(newer, after_id >= oldest - 1 and unbroken and not cut)

    @guarded
    def last_id(self, room: str) -> int:
        return int(self._client.get(room_keys(room)[4]) or 0)

    @guarded
    def epoch(self, room: str) -> str:
        # Lost with Redis's data, the next join names a new one (no id is issued twice
        # then either, but the history went: a `since` from before is not recovered).
        keys = room_keys(room)
        epoch = self._room_epoch(keys=[keys[4], room_epoch_key(room), keys[0]],
                                 args=[new_epoch()])
        return epoch.decode() if isinstance(epoch, bytes) else str(epoch)

    def room_emptied(self, room: str) -> None:
        pass  # the leave script already set the TTLs

    def room_occupied(self, room: str) -> None:
        pass  # the join script already removed them

    @guarded
    def raise_sequence(self, room: str, at_least: int) -> None:
        # With the room's conns and ROOM_NUMBERING_TTL: a sequence this makes for a room
        # nobody is in (a resync's, the durable store's with nothing left to publish)
        # expires as after a leave, rather than stay in Redis for good.
        keys = room_keys(room)
        self._raise_seq(keys=[keys[4], keys[0]], args=[at_least, self._ttls.numbering])

    @guarded
    def dm_last_id(self) -> int:
        return int(self._client.get(DM_SEQ) or 0)

    @guarded
    def raise_dm_sequence(self, at_least: int) -> None:
        self._raise_seq(keys=[DM_SEQ], args=[at_least])

    @guarded
    def publish_stored(self, messages: list[Stored]) -> list[int]:
        # One pipeline for the whole committed batch: one round trip, in id order.
        with self._client.pipeline(transaction=False) as pipe:
            for m in messages:
                if m.room is None and m.recipient_id:  # UNHEARD if nobody could get it
                    self._publish_dm(keys=[user_channel(m.recipient_id),
                                           user_channel(m.sender_id), NODES,
                                           user_nodes(m.recipient_id), user_nodes(m.sender_id)],
                                     args=[m.event, self._live_ms, 0],  # no bucket (charge.lua)
                                     client=pipe)
                    continue
                if m.room is None:  # kept for later: the sender's other connections
                    if m.sender_id:  # UNHEARD if one of them could not get it
                        sender_nodes = user_nodes(m.sender_id)
                        self._publish_kept(keys=[user_channel(m.sender_id), NODES,
                                                 sender_nodes, sender_nodes],
                                           args=[m.event, self._live_ms, 0], client=pipe)
                    continue
                keys = room_keys(m.room)
                self._publish_stored(keys=[keys[4], keys[5], room_channel(m.room),
                                           held_key(m.room)],
                                     args=[m.msg_id, m.event, self._size,
                                           *self._expiries(m.sender_id)],
                                     client=pipe)
            # The database numbers DMs while persistence is on: Redis's sequence follows
            # it, so that turning persistence off again reuses no id a client holds.
            dm_ids = [m.msg_id for m in messages if m.room is None]
            if dm_ids:
                self._raise_seq(keys=[DM_SEQ], args=[max(dm_ids)], client=pipe)
            replies = pipe.execute()
        out: list[int] = []
        it = iter(replies)
        for m in messages:
            if m.room is None and (m.recipient_id or m.sender_id):
                out.append(PUBLISHED if int(next(it)) else UNHEARD)
            elif m.room is None:
                out.append(PUBLISHED)
            else:
                out.append(int(next(it)))
        return out
