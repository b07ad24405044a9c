"""Redis stores: any number of gunicorn workers and pods share rooms, presence, history.

Every state change is one Lua script (or one pipeline), so there is no lock
and no read-modify-write race between workers. A room message is one round
trip: the script deduplicates, takes the next id, appends to the history and
PUBLISHes, all atomically.

Fan-out uses one pub/sub connection per worker, subscribed only to the rooms
and users that have local connections (no pattern subscriptions). Payloads on
a room channel are ``<exclude_user_id>\\n<event JSON>``.

Presence survives dead workers: each worker ("node") refreshes its score in
``wschat:nodes`` every ``PRESENCE_TTL / 3`` seconds and records its
memberships; any node that finds another silent for ``PRESENCE_TTL`` removes
the dead node's memberships (announcing ``offline``) in one script.

When Redis goes away, workers keep their WebSockets, answer ``unavailable``
to requests that need Redis, reconnect with back-off, resubscribe, and
re-register their live connections (so presence and rooms come back even if
Redis lost its data), and restore room sequence numbers from the highest id
they delivered so no id is ever issued twice.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import gevent
import gevent.event
import gevent.lock

try:
    import redis
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("REDIS_URL needs the redis extra: pip install 'wschat[redis]'") from exc

from ..config import Settings
from ..protocol import MessageDraft, message_id_of, stored_id_of
from .base import (
    Broker, JoinResult, LeaveResult, MessageStore, Posted, PresenceStore, Replay, RoomHandler,
    PUBLISHED, RoomStore, Stored, Stores, Unavailable, User, UserHandler,
)

log = logging.getLogger("wschat.redis")

PREFIX = "wschat:"
DEDUPE_TTL = 3600
SUBSCRIBE_TIMEOUT = 15.0
F = TypeVar("F", bound=Callable[..., Any])


def _guarded(method: F) -> F:
    """Turn a Redis outage into :class:`Unavailable` (the request is refused, not lost)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
                OSError) as exc:
            if self._metrics is not None:
                self._metrics.store_error("redis")
            raise Unavailable(f"redis: {exc.__class__.__name__}") from exc

    return wrapper  # type: ignore[return-value]


def _room_keys(room: str) -> list[str]:
    # One hash tag per room: every key a room script touches sits in one slot.
    base = f"{PREFIX}{{r:{room}}}:"
    return [base + k for k in ("conns", "counts", "names", "order", "seq", "hist")]


# KEYS: conns counts names order seq hist rooms memberships node_memberships
# ARGV: room conn user_id username membership_token
JOIN_LUA = """
local conns, counts, names, order, seq, hist = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local first = 0
if redis.call('HEXISTS', conns, ARGV[2]) == 0 then
  if redis.call('HLEN', conns) == 0 then
    redis.call('SADD', KEYS[7], ARGV[1])
    redis.call('PERSIST', seq)
    redis.call('PERSIST', hist)
  end
  redis.call('HSET', conns, ARGV[2], ARGV[3])
  redis.call('SADD', KEYS[9], ARGV[5])
  if redis.call('HINCRBY', counts, ARGV[3], 1) == 1 then
    redis.call('HSET', names, ARGV[3], ARGV[4])
    local t = redis.call('TIME')
    redis.call('ZADD', order, t[1] * 1000000 + t[2], ARGV[3])
    redis.call('INCR', KEYS[8])
    first = 1
  end
end
local out = {first}
local ids = redis.call('ZRANGE', order, 0, -1)
for i = 1, #ids, 500 do
  local chunk = {}
  for j = i, math.min(i + 499, #ids) do chunk[#chunk + 1] = ids[j] end
  local got = redis.call('HMGET', names, unpack(chunk))
  for j = 1, #chunk do
    out[#out + 1] = chunk[j]
    out[#out + 1] = got[j] or chunk[j]
  end
end
return out
"""

# KEYS: conns counts names order seq hist rooms memberships node_memberships
# ARGV: room conn user_id membership_token room_ttl
LEAVE_LUA = """
local conns, counts, names, order, seq, hist = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
if redis.call('HDEL', conns, ARGV[2]) == 0 then
  return {0, redis.call('HLEN', conns) == 0 and 1 or 0}
end
redis.call('SREM', KEYS[9], ARGV[4])
local last = 0
if redis.call('HINCRBY', counts, ARGV[3], -1) <= 0 then
  redis.call('HDEL', counts, ARGV[3])
  redis.call('HDEL', names, ARGV[3])
  redis.call('ZREM', order, ARGV[3])
  redis.call('DECR', KEYS[8])
  last = 1
end
local empty = 0
if redis.call('HLEN', conns) == 0 then
  redis.call('SREM', KEYS[7], ARGV[1])
  redis.call('DEL', counts, names, order)
  redis.call('EXPIRE', seq, ARGV[5])
  redis.call('EXPIRE', hist, ARGV[5])
  empty = 1
end
return {last, empty}
"""

# KEYS: seq hist channel [dedupe]
# ARGV: prefix suffix history_size dedupe_ttl
POST_ROOM_LUA = """
if KEYS[4] then
  local seen = redis.call('GET', KEYS[4])
  if seen then return {1, seen} end
end
local id = redis.call('INCR', KEYS[1])
local msg = ARGV[1] .. string.format('%d', id) .. ARGV[2]
redis.call('RPUSH', KEYS[2], msg)
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
if KEYS[4] then redis.call('SET', KEYS[4], msg, 'EX', ARGV[4]) end
redis.call('PUBLISH', KEYS[3], '\\n' .. msg)
return {0, msg}
"""

# KEYS: dm_seq recipient_channel sender_channel [dedupe]
# ARGV: prefix suffix dedupe_ttl
POST_DM_LUA = """
if KEYS[4] then
  local seen = redis.call('GET', KEYS[4])
  if seen then return {1, seen} end
end
local id = redis.call('INCR', KEYS[1])
local msg = ARGV[1] .. string.format('%d', id) .. ARGV[2]
if KEYS[4] then redis.call('SET', KEYS[4], msg, 'EX', ARGV[3]) end
redis.call('PUBLISH', KEYS[2], msg)
if KEYS[3] ~= KEYS[2] then redis.call('PUBLISH', KEYS[3], msg) end
return {0, msg}
"""

# KEYS: node_conns presence   ARGV: conn user_id
CONNECT_LUA = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
end
return 1
"""

# KEYS: node_conns presence   ARGV: conn user_id
DISCONNECT_LUA = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end
end
return 1
"""

# KEYS: seq   ARGV: at_least   (never lets a room's sequence go backwards)
RAISE_SEQ_LUA = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""

# With persistence the database numbers room messages; this publishes a committed
# one in id order across workers: "seq" is then the highest id published. An id
# whose predecessor is not published yet waits in "held" until it is.
# KEYS: seq hist channel held   ARGV: id msg history_size
# Returns 1 published (with whatever it released), 0 held, -1 already past it.
PUBLISH_STORED_LUA = """
local id = tonumber(ARGV[1])
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
if id <= seq then return -1 end
if id > seq + 1 then
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[2])
  redis.call('EXPIRE', KEYS[4], 300)
  return 0
end
local msg = ARGV[2]
while msg do
  redis.call('RPUSH', KEYS[2], msg)
  redis.call('PUBLISH', KEYS[3], '\\n' .. msg)
  seq = seq + 1
  local nxt = string.format('%d', seq + 1)
  msg = redis.call('HGET', KEYS[4], nxt)
  if msg then redis.call('HDEL', KEYS[4], nxt) end
end
redis.call('SET', KEYS[1], seq, 'KEEPTTL')
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
return 1
"""

# KEYS: nodes   ARGV: node_id ttl_ms   -> ids of nodes silent longer than ttl
NODE_BEAT_LUA = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
"""

# KEYS: nodes node_memberships node_conns presence rooms memberships
# ARGV: dead_node prefix room_ttl
# Removes everything a dead node had registered; publishes "offline" where it was
# a user's last connection. ZREM first makes concurrent reapers harmless.
REAP_LUA = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
local prefix = ARGV[2]
local reaped = 0
for _, token in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local room, conn, user = string.match(token, '^(.-)%z(.-)%z(.*)$')
  if room then
    local base = prefix .. '{r:' .. room .. '}:'
    if redis.call('HDEL', base .. 'conns', conn) == 1 then
      reaped = reaped + 1
      if redis.call('HINCRBY', base .. 'counts', user, -1) <= 0 then
        local name = redis.call('HGET', base .. 'names', user) or user
        redis.call('HDEL', base .. 'counts', user)
        redis.call('HDEL', base .. 'names', user)
        redis.call('ZREM', base .. 'order', user)
        redis.call('DECR', KEYS[6])
        local event = cjson.encode({type = 'presence', room = room, user = name,
                                    user_id = user, status = 'offline'})
        redis.call('PUBLISH', prefix .. 'room:' .. room, user .. '\\n' .. event)
      end
      if redis.call('HLEN', base .. 'conns') == 0 then
        redis.call('SREM', KEYS[5], room)
        redis.call('DEL', base .. 'counts', base .. 'names', base .. 'order')
        redis.call('EXPIRE', base .. 'seq', ARGV[3])
        redis.call('EXPIRE', base .. 'hist', ARGV[3])
      end
    end
  end
end
local conns = redis.call('HGETALL', KEYS[3])
for i = 1, #conns, 2 do
  if redis.call('HINCRBY', KEYS[4], conns[i + 1], -1) <= 0 then
    redis.call('HDEL', KEYS[4], conns[i + 1])
  end
end
redis.call('DEL', KEYS[2], KEYS[3])
return reaped
"""


class _Node:
    """This worker's identity in Redis and the keys that list what it registered."""

    def __init__(self) -> None:
        self.node_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.memberships = f"{PREFIX}node:{self.node_id}:memberships"
        self.conns = f"{PREFIX}node:{self.node_id}:conns"


NODES = PREFIX + "nodes"
ROOMS = PREFIX + "rooms"
MEMBERSHIPS = PREFIX + "memberships"
PRESENCE = PREFIX + "presence"
DM_SEQ = PREFIX + "dm:seq"


def room_channel(room: str) -> str:
    return f"{PREFIX}room:{room}"


def user_channel(user_id: str) -> str:
    return f"{PREFIX}user:{user_id}"


def _token(room: str, conn_id: str, user_id: str) -> str:
    return f"{room}\0{conn_id}\0{user_id}"


class RedisRoomStore(RoomStore):
    def __init__(self, client: redis.Redis, node: _Node, room_ttl: float,
                 metrics: Any = None) -> None:
        self._client = client
        self._node = node
        self._room_ttl = int(room_ttl)
        self._metrics = metrics
        self._join = client.register_script(JOIN_LUA)
        self._leave = client.register_script(LEAVE_LUA)

    def _keys(self, room: str) -> list[str]:
        return [*_room_keys(room), ROOMS, MEMBERSHIPS, self._node.memberships]

    @_guarded
    def join(self, room: str, conn_id: str, user: User) -> JoinResult:
        out = self._join(keys=self._keys(room), args=[
            room, conn_id, user.user_id, user.username,
            _token(room, conn_id, user.user_id)])
        members = [User(out[i].decode(), out[i + 1].decode()) for i in range(1, len(out), 2)]
        return JoinResult(bool(out[0]), members)

    @_guarded
    def leave(self, room: str, conn_id: str, user_id: str) -> LeaveResult:
        last, empty = self._leave(keys=self._keys(room), args=[
            room, conn_id, user_id, _token(room, conn_id, user_id), self._room_ttl])
        return LeaveResult(bool(last), bool(empty))

    @_guarded
    def members(self, room: str) -> list[User]:
        keys = _room_keys(room)
        ids = self._client.zrange(keys[3], 0, -1)
        if not ids:
            return []
        names = self._client.hmget(keys[2], ids)
        return [User(i.decode(), (n or i).decode()) for i, n in zip(ids, names)]

    @_guarded
    def totals(self) -> tuple[int, int]:
        with self._client.pipeline(transaction=False) as pipe:
            rooms, memberships = pipe.scard(ROOMS).get(MEMBERSHIPS).execute()
        return int(rooms), int(memberships or 0)


class RedisPresenceStore(PresenceStore):
    def __init__(self, client: redis.Redis, node: _Node, metrics: Any = None) -> None:
        self._client = client
        self._node = node
        self._metrics = metrics
        self._connect = client.register_script(CONNECT_LUA)
        self._disconnect = client.register_script(DISCONNECT_LUA)

    @_guarded
    def connect(self, conn_id: str, user: User) -> None:
        self._connect(keys=[self._node.conns, PRESENCE], args=[conn_id, user.user_id])

    @_guarded
    def disconnect(self, conn_id: str, user_id: str) -> None:
        self._disconnect(keys=[self._node.conns, PRESENCE], args=[conn_id, user_id])

    @_guarded
    def is_online(self, user_id: str) -> bool:
        count = self._client.hget(PRESENCE, user_id)
        return bool(count) and int(count) > 0


class RedisMessageStore(MessageStore):
    def __init__(self, client: redis.Redis, history_size: int, metrics: Any = None) -> None:
        self._client = client
        self._size = history_size
        self._metrics = metrics
        self._post_room = client.register_script(POST_ROOM_LUA)
        self._post_dm = client.register_script(POST_DM_LUA)
        self._raise_seq = client.register_script(RAISE_SEQ_LUA)
        self._publish_stored = client.register_script(PUBLISH_STORED_LUA)
        #: Whether posts can be delivered: the broker's health, set by the factory.
        self.delivering: Callable[[], bool] = lambda: True

    def _check_delivering(self) -> None:
        if not self.delivering():
            raise Unavailable("redis: resubscribing after an outage")

    @staticmethod
    def _posted(out: list[Any]) -> Posted:
        duplicate, event = out
        return Posted(stored_id_of(event), bytes(event), bool(duplicate))

    @_guarded
    def post_room(self, room: str, user_id: str, draft: MessageDraft) -> Posted:
        self._check_delivering()
        keys = _room_keys(room)
        script_keys = [keys[4], keys[5], room_channel(room)]
        if draft.client_msg_id:
            script_keys.append(f"{PREFIX}{{r:{room}}}:dd:{user_id}:{draft.client_msg_id}")
        return self._posted(self._post_room(keys=script_keys, args=[
            draft.prefix, draft.suffix, self._size, DEDUPE_TTL]))

    @_guarded
    def post_dm(self, sender_id: str, recipient_id: str, draft: MessageDraft,
                recipient_online: bool = True) -> Posted:
        self._check_delivering()
        script_keys = [DM_SEQ, user_channel(recipient_id), user_channel(sender_id)]
        if draft.client_msg_id:
            script_keys.append(f"{PREFIX}dm:dd:{sender_id}:{draft.client_msg_id}")
        return self._posted(self._post_dm(keys=script_keys, args=[
            draft.prefix, draft.suffix, DEDUPE_TTL]))

    @_guarded
    def recent(self, room: str, limit: int, before: int | None = None) -> list[bytes]:
        hist = _room_keys(room)[5]
        if before is None:
            return list(self._client.lrange(hist, -limit, -1))
        held = [m for m in self._client.lrange(hist, 0, -1)
                if (message_id_of(m) or 0) < before]
        return held[-limit:]

    @_guarded
    def since(self, room: str, after_id: int) -> Replay:
        keys = _room_keys(room)
        with self._client.pipeline(transaction=False) as pipe:
            last, held = pipe.get(keys[4]).lrange(keys[5], 0, -1).execute()
        last = int(last or 0)
        if after_id > last:
            return Replay([], False)
        if after_id == last:
            return Replay([], True)
        newer = [m for m in held if (message_id_of(m) or 0) > after_id]
        oldest = message_id_of(held[0]) if held else last + 1
        return Replay(newer, oldest is not None and after_id >= oldest - 1)

    @_guarded
    def last_id(self, room: str) -> int:
        return int(self._client.get(_room_keys(room)[4]) or 0)

    def room_emptied(self, room: str) -> None:
        pass  # the leave script already set the TTLs

    def room_occupied(self, room: str) -> None:
        pass  # the join script already removed them

    @_guarded
    def raise_sequence(self, room: str, at_least: int) -> None:
        self._raise_seq(keys=[_room_keys(room)[4]], args=[at_least])

    @_guarded
    def publish_stored(self, messages: list[Stored]) -> list[int]:
        # One pipeline for the whole committed batch: one round trip, in id order.
        with self._client.pipeline(transaction=False) as pipe:
            for m in messages:
                if m.room is None:
                    if m.recipient_id:
                        pipe.publish(user_channel(m.recipient_id), m.event)
                    if m.sender_id != m.recipient_id:
                        pipe.publish(user_channel(m.sender_id), m.event)
                    continue
                keys = _room_keys(m.room)
                self._publish_stored(keys=[keys[4], keys[5], room_channel(m.room),
                                           f"{PREFIX}{{r:{m.room}}}:held"],
                                     args=[m.msg_id, m.event, self._size], client=pipe)
            replies = pipe.execute()
        out: list[int] = []
        it = iter(replies)
        for m in messages:
            if m.room is None:
                for _ in range(bool(m.recipient_id) + (m.sender_id != m.recipient_id)):
                    next(it)
                out.append(PUBLISHED)
            else:
                out.append(int(next(it)))
        return out


class RedisBroker(Broker):
    """One pub/sub connection per worker; a listener greenlet delivers to the local hub."""

    RECONNECT_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0)

    def __init__(self, client: redis.Redis, url: str, metrics: Any = None) -> None:
        self._client = client
        self._url = url
        self._metrics = metrics
        self._on_room: RoomHandler | None = None
        self._on_user: UserHandler | None = None
        self._channels: set[bytes] = set()  # what this worker wants to hear
        self._pending: dict[bytes, gevent.event.Event] = {}
        self._pubsub: Any = None
        self._lock = gevent.lock.RLock()
        self._listener: gevent.Greenlet | None = None
        self._healthy = False
        self._stopping = False

    def start(self, on_room: RoomHandler, on_user: UserHandler) -> None:
        self._on_room, self._on_user = on_room, on_user
        try:
            self._connect()
            self._healthy = True
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            # A worker (re)started during an outage must still boot: gunicorn stops
            # the whole server when a worker fails to. /ready stays 503 meanwhile.
            log.warning("redis unreachable at start (%s); retrying in the background", exc)
            self._healthy = False
        self._listener = gevent.spawn(self._listen_forever)

    def _connect(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=False)
        # A pub/sub connection needs at least one subscription before it can listen.
        pubsub.subscribe(PREFIX + "control")
        if self._channels:
            pubsub.subscribe(*self._channels)
        self._pubsub = pubsub

    def healthy(self) -> bool:
        return self._healthy

    def _listen_forever(self) -> None:
        attempt = 0
        while not self._stopping:
            try:
                if self._pubsub is None:
                    with self._lock:
                        self._connect()
                    log.warning("redis pub/sub reconnected; resubscribed %d channels",
                                len(self._channels))
                    attempt = 0
                    if self.on_reconnect is not None:
                        self.on_reconnect()
                    # Only now: a message posted before the resync raised the room
                    # sequences could reuse an id, and one posted before the
                    # resubscription would reach no worker (not even its sender).
                    self._healthy = True
                self._listen()
            except (redis.ConnectionError, redis.TimeoutError, OSError, ValueError) as exc:
                # ValueError: redis-py dropped the socket under us ("Invalid file object").
                if self._stopping:
                    return
                if self._healthy:
                    log.warning("redis pub/sub lost (%s); reconnecting", exc)
                    if self._metrics is not None:
                        self._metrics.store_error("redis")
                self._healthy = False
                self._drop_pubsub()
                gevent.sleep(self.RECONNECT_DELAYS[min(attempt, len(self.RECONNECT_DELAYS) - 1)])
                attempt += 1
            except Exception:
                log.exception("redis listener failed; restarting it")
                self._healthy = False
                self._drop_pubsub()
                gevent.sleep(1.0)

    def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.reset()
            except Exception:
                pass

    def _listen(self) -> None:
        pubsub = self._pubsub
        on_room, on_user = self._on_room, self._on_user
        room_prefix = (PREFIX + "room:").encode()
        user_prefix = (PREFIX + "user:").encode()
        while not self._stopping and pubsub is self._pubsub:
            message = pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            kind = message["type"]
            channel = message["channel"]
            if kind == "message" or kind == b"message":
                data = message["data"]
                if channel.startswith(room_prefix):
                    room = channel[len(room_prefix):].decode()
                    exclude, _, event = data.partition(b"\n")
                    if on_room is not None:
                        on_room(room, event, exclude.decode() or None)
                elif channel.startswith(user_prefix) and on_user is not None:
                    on_user(channel[len(user_prefix):].decode(), data)
            elif kind in ("subscribe", b"subscribe"):
                waiter = self._pending.pop(channel, None)
                if waiter is not None:
                    waiter.set()

    def _subscribe(self, channel: str, wait: bool = True) -> None:
        key = channel.encode()
        self._channels.add(key)
        if self._pubsub is None:
            return  # the reconnect resubscribes everything in _channels
        shared = self._pending.get(key)
        if shared is not None:
            # Another greenlet's SUBSCRIBE is on its way (several connections of this
            # worker joining the room at once, as after a reconnect storm): its
            # confirmation is ours too. Replacing its waiter would leave that greenlet
            # waiting SUBSCRIBE_TIMEOUT for a confirmation already taken by ours.
            if wait and not shared.wait(timeout=SUBSCRIBE_TIMEOUT):
                raise Unavailable("redis: subscription not confirmed")
            return
        waiter = gevent.event.Event() if wait else None
        if waiter is not None:
            self._pending[key] = waiter
        try:
            with self._lock:
                self._pubsub.subscribe(key)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._pending.pop(key, None)
            raise Unavailable(f"redis: {exc.__class__.__name__}") from exc
        # Wait until Redis confirms, so nothing published after this returns is missed.
        # Generous: during a reconnect storm the listener greenlet queues behind
        # thousands of handshakes on a saturated worker.
        if waiter is not None and not waiter.wait(timeout=SUBSCRIBE_TIMEOUT):
            self._pending.pop(key, None)
            raise Unavailable("redis: subscription not confirmed")

    def _unsubscribe(self, channel: str) -> None:
        key = channel.encode()
        self._channels.discard(key)
        if self._pubsub is not None:
            try:
                with self._lock:
                    self._pubsub.unsubscribe(key)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                pass  # the reconnect subscribes only what is still wanted

    def subscribe_room(self, room: str) -> None:
        self._subscribe(room_channel(room), wait=True)

    def await_room(self, room: str) -> None:
        waiter = self._pending.get(room_channel(room).encode())
        if waiter is not None and not waiter.wait(timeout=SUBSCRIBE_TIMEOUT):
            raise Unavailable("redis: subscription not confirmed")

    def unsubscribe_room(self, room: str) -> None:
        self._unsubscribe(room_channel(room))

    def subscribe_user(self, user_id: str) -> None:
        # Confirmed before the user counts as online: a DM accepted for them must arrive.
        self._subscribe(user_channel(user_id), wait=True)

    def unsubscribe_user(self, user_id: str) -> None:
        self._unsubscribe(user_channel(user_id))

    @_guarded
    def publish_room(self, room: str, event: bytes, exclude_user: str | None = None) -> None:
        self._client.publish(room_channel(room), (exclude_user or "").encode() + b"\n" + event)

    @_guarded
    def publish_user(self, user_id: str, event: bytes) -> None:
        self._client.publish(user_channel(user_id), event)

    def close(self) -> None:
        self._stopping = True
        if self._listener is not None:
            self._listener.kill(block=False)
        self._drop_pubsub()


class NodeKeeper:
    """Heartbeats this node and reaps nodes that died without cleaning up."""

    def __init__(self, client: redis.Redis, node: _Node, presence_ttl: float, room_ttl: float,
                 metrics: Any = None) -> None:
        self._client = client
        self._node = node
        self._ttl_ms = int(presence_ttl * 1000)
        self._interval = presence_ttl / 3
        self._room_ttl = int(room_ttl)
        self._metrics = metrics
        self._beat = client.register_script(NODE_BEAT_LUA)
        self._reap = client.register_script(REAP_LUA)
        self._greenlet: gevent.Greenlet | None = None

    @property
    def node_id(self) -> str:
        return self._node.node_id

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            try:
                self.beat_and_reap()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                log.debug("node heartbeat failed: %s", exc)
            except Exception:
                log.exception("node heartbeat failed")
            gevent.sleep(self._interval)

    def beat_and_reap(self) -> int:
        dead = self._beat(keys=[NODES], args=[self._node.node_id, self._ttl_ms])
        reaped = 0
        for raw in dead:
            node_id = raw.decode()
            if node_id == self._node.node_id:
                continue
            count = self._reap_node(node_id)
            if count:
                log.warning("reaped %d memberships of dead node %s", count, node_id)
            reaped += count
        return reaped

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
        try:
            self._client.zrem(NODES, self._node.node_id)
        except Exception:
            pass

    def release(self) -> int:
        """Remove everything this node registered (announcing offline), as if it had died:
        one script instead of a leave per connection and room at shutdown."""
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
        self._client.zadd(NODES, {self._node.node_id: 0})  # the script removes it again
        return self._reap_node(self._node.node_id)

    def _reap_node(self, node_id: str) -> int:
        """Run REAP_LUA on one node's registrations (see _Node for the key names)."""
        keys = [NODES, f"{PREFIX}node:{node_id}:memberships", f"{PREFIX}node:{node_id}:conns",
                PRESENCE, ROOMS, MEMBERSHIPS]
        return int(self._reap(keys=keys, args=[node_id, PREFIX, self._room_ttl]) or 0)


class RedisStores(Stores):
    keeper: NodeKeeper

    def release_local(self) -> bool:
        try:
            count = self.keeper.release()
        except (redis.RedisError, OSError) as exc:
            log.warning("could not release this node's memberships (%s); they expire "
                        "within PRESENCE_TTL", exc)
            return False
        log.info("released %d memberships of node %s", count, self.keeper.node_id)
        return True

    def close(self) -> None:
        self.messages.close()  # flushes persistence while Redis can still publish
        self.keeper.stop()
        self.broker.close()


def create_redis_stores(settings: Settings, metrics: Any = None) -> Stores:
    assert settings.redis_url
    pool = redis.BlockingConnectionPool.from_url(
        # Many greenlets share few sockets; under a connect or disconnect storm a
        # greenlet may wait its turn for a while rather than fail its leave.
        settings.redis_url, max_connections=256, timeout=20, socket_timeout=5,
        socket_connect_timeout=3, health_check_interval=30)
    client = redis.Redis(connection_pool=pool)
    node = _Node()
    broker = RedisBroker(client, settings.redis_url, metrics)
    messages = RedisMessageStore(client, settings.history_size, metrics)
    messages.delivering = broker.healthy
    stores = RedisStores(
        RedisRoomStore(client, node, settings.room_ttl, metrics),
        RedisPresenceStore(client, node, metrics),
        messages, broker, "redis")
    stores.keeper = NodeKeeper(client, node, settings.presence_ttl, settings.room_ttl, metrics)
    try:
        from ..ratelimit import RedisRateLimiter
    except ImportError:
        pass
    else:
        stores.rate_limiter = RedisRateLimiter(client, settings.rate_limit,
                                               settings.rate_limit_burst)
    from .redis_moderation import RedisModerationStore

    stores.moderation = RedisModerationStore(client, metrics)
    stores.keeper.start()
    log.info("redis stores: node %s at %s", node.node_id, time.strftime("%H:%M:%S"))
    return stores
