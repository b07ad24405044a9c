"""Key names, channels and payload framing, and what every Redis store shares
(:func:`guarded` calls, :func:`script` loading).

A user id inside a key or a payload is escaped (:func:`escape_id`: ``%``,
``:`` and control characters as ``%XX``), so no ``sub`` can make two users'
keys meet or forge a payload's framing; ids without those characters read the
same as before, so workers of the previous release interoperate during a
rolling update.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from importlib import resources
from typing import Any, NamedTuple, TypeVar
from urllib.parse import unquote

import redis

from ...ratelimit import Charge
from ..base import Unavailable

PREFIX = "wschat:"
NODES = PREFIX + "nodes"
ROOMS = PREFIX + "rooms"
MEMBERSHIPS = PREFIX + "memberships"
PRESENCE = PREFIX + "presence"
DM_SEQ = PREFIX + "dm:seq"
CONTROL = PREFIX + "control"
# The data's epoch, and the gate of posts after Redis lost its data (epoch.py); gate.lua
# spells these three names out, and the next one.
EPOCH = PREFIX + "epoch"
READY = PREFIX + "ready"
RECOVERING = PREFIX + "recovering"
# The workers that number messages in the database (ENABLE_PERSISTENCE), scored by the time
# until which each counts as alive (its last heartbeat plus its own PRESENCE_TTL);
# while any lives, READY is not set and posts numbered in Redis are refused (nodes.py;
# gate.lua spells it out).
NUMBERED_BY_DATABASE = PREFIX + "numbered_by_database"
RATE_LIMITS = PREFIX + "rl:"  # + a bucket's key (RedisRateLimiter's default prefix)

F = TypeVar("F", bound=Callable[..., Any])

#: What counts as Redis being out of service: unreachable, slow, still loading, at
#: ``maxmemory`` (``noeviction`` refuses writes: ``OOM``), or refusing every command for
#: now (:data:`REFUSALS`). The client is told to retry, not that the server failed.
OUTAGES = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
           redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError,
           redis.exceptions.MasterDownError, OSError)
#: Error replies (their first word) that say "not now", not "wrong", and that redis-py
#: raises as a plain ``ResponseError``: a script running past ``busy-reply-threshold``,
#: a failed RDB save (``stop-writes-on-bgsave-error``), too few replicas
#: (``min-replicas-to-write``). A failover's demoted master (``READONLY``) and a replica
#: without its master (``MASTERDOWN``) are in :data:`OUTAGES`.
REFUSALS = ("BUSY ", "MISCONF ", "NOREPLICAS ")
#: The same refusals met by a command inside a Lua script, as Redis 6 reports them (Redis 7
#: answers with the command's own error): "Error running script (call to f_...):
#: @user_script:7: -READONLY You can't write against a read only replica."
_IN_SCRIPT = re.compile(r": -(READONLY|MASTERDOWN|OOM|BUSY|MISCONF|NOREPLICAS) ")


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` (raised by a Redis call) means Redis is out of service for now."""
    if isinstance(exc, OUTAGES):
        return True
    if not isinstance(exc, redis.ResponseError):
        return False
    # redis-py's pipelines put "Command # 1 (...) of pipeline caused error: " first
    text = str(exc)
    _, caused, reply = text.partition(" of pipeline caused error: ")
    return (reply if caused else text).startswith(REFUSALS) or bool(_IN_SCRIPT.search(text))


def is_read_only(exc: BaseException) -> bool:
    """Whether ``exc`` says the server reached refuses writes as a replica (``READONLY``:
    a failover demoted it), also from inside a script on Redis 6."""
    return isinstance(exc, redis.ReadOnlyError) or (
        isinstance(exc, redis.ResponseError) and ": -READONLY " in str(exc))


def guarded(method: F) -> F:
    """Turn a Redis outage (:func:`is_outage`) into :class:`Unavailable` (the request is
    refused, not lost)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (*OUTAGES, redis.ResponseError) as exc:
            if not is_outage(exc):
                raise
            if self._metrics is not None:
                self._metrics.store_error("redis")
            raise Unavailable(f"redis: {exc.__class__.__name__}") from exc

    return wrapper  # type: ignore[return-value]


@functools.cache
def _source(name: str) -> str:
    return (resources.files(__package__) / "scripts" / f"{name}.lua").read_text(encoding="utf-8")


def script(client: redis.Redis, name: str, prelude: str | tuple[str, ...] = ()) -> Any:
    """The Lua script ``scripts/<name>.lua`` (shipped in the package), registered with
    ``client``; each file's header says its KEYS, ARGV and reply. ``prelude``: scripts
    whose text comes first, in order (shared beginnings, e.g. ``charge``, ``take_id``)."""
    preludes = (prelude,) if isinstance(prelude, str) else prelude
    return client.register_script("".join(_source(p) for p in preludes) + _source(name))


def charged(keys: list[str], args: list[Any], charge: Charge, cost: float = 1.0,
            prefix: str = RATE_LIMITS) -> tuple[list[str], list[Any]]:
    """A script's ``keys`` and ``args`` with charge.lua's tail: the bucket keys
    (``prefix`` + key) after the script's keys, and (rate burst cost) for each
    bucket, then their count, after its arguments."""
    for key, rate, burst in charge:
        keys.append(prefix + key)
        args += (repr(float(rate)), repr(float(burst)), repr(float(cost)))
    args.append(len(charge))
    return keys, args


class RoomTtls(NamedTuple):
    """An empty room's expiries in Redis, in seconds, as leave.lua and the post scripts
    take them: its history's (``ROOM_TTL``) and its sequence's (``ROOM_NUMBERING_TTL``,
    never shorter), so that a room used again goes on from its last id."""

    history: int
    numbering: int

    @classmethod
    def of(cls, room_ttl: float, numbering_ttl: float) -> RoomTtls:
        return cls(int(room_ttl), int(max(room_ttl, numbering_ttl)))


def room_keys(room: str) -> list[str]:
    """conns counts names order seq hist: one hash tag per room, so every key a room
    script touches sits in one slot."""
    base = f"{PREFIX}{{r:{room}}}:"
    return [base + k for k in ("conns", "counts", "names", "order", "seq", "hist")]


def room_epoch_key(room: str) -> str:
    """The name of the room's numbering (room_epoch.lua); numbering.lua names it from
    the seq key."""
    return f"{PREFIX}{{r:{room}}}:epoch"


def typists_key(room: str, user_id: str) -> str:
    """The workers holding the user's typing indicator in the room on (typing.lua)."""
    return f"{PREFIX}{{r:{room}}}:typing:{escape_id(user_id)}"


def held_key(room: str) -> str:
    return f"{PREFIX}{{r:{room}}}:held"


def membership_keys(room: str, node_memberships: str) -> list[str]:
    """The KEYS of join.lua and leave.lua."""
    return [*room_keys(room), ROOMS, MEMBERSHIPS, node_memberships]


def membership_token(room: str, conn_id: str, user_id: str) -> str:
    """One membership in a node's set (what the reaper reads back with :func:`split_token`)."""
    return f"{room}\0{conn_id}\0{user_id}"


def split_token(token: str) -> tuple[str, str, str] | None:
    parts = token.split("\0", 2)
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None


def node_memberships(node_id: str) -> str:
    return f"{PREFIX}node:{node_id}:memberships"


def node_conns(node_id: str) -> str:
    return f"{PREFIX}node:{node_id}:conns"


def user_nodes(user_id: str) -> str:
    """The nodes a user is connected at (node id -> its connections of the user): how
    many workers must hear a DM to the user (post_dm.lua)."""
    return f"{PREFIX}user:{escape_id(user_id)}:nodes"


def user_claims(user_id: str) -> str:
    """Places claimed for the user's connections on their way in (conn id -> when the
    place expires, Redis's clock in ms): MAX_CONNECTIONS_PER_USER counts them (claim.lua)."""
    return f"{PREFIX}user:{escape_id(user_id)}:claims"


def room_channel(room: str) -> str:
    return f"{PREFIX}room:{room}"


def user_channel(user_id: str) -> str:
    return f"{PREFIX}user:{user_id}"


def escape_id(value: str) -> str:
    """``%``, ``:`` and control characters as ``%XX``: an escaped id holds no separator,
    and the usual ids are unchanged."""
    if value.isprintable() and "%" not in value and ":" not in value:
        return value
    return "".join(f"%{ord(c):02X}" if c in "%:" or ord(c) < 0x20 or ord(c) == 0x7F
                   else c for c in value)


def room_payload(event: bytes, exclude_user: str | None = None) -> bytes:
    """A room channel's payload: ``<escaped exclude_user_id>\\n<event JSON>``."""
    return escape_id(exclude_user or "").encode() + b"\n" + event


def split_room_payload(data: bytes) -> tuple[str | None, bytes]:
    """(exclude_user_id, event) of a room channel's payload."""
    exclude, _, event = data.partition(b"\n")
    if not exclude:
        return None, event
    text = exclude.decode()
    return (unquote(text) if "%" in text else text), event


def dedupe_key(scope: str, user_id: str, client_msg_id: str) -> str:
    # The user id is escaped, the client_msg_id comes last: ("acme", "alice:x") and
    # ("acme:alice", "x") no longer share a key.
    return f"{scope}dd:{escape_id(user_id)}:{client_msg_id}"
