"""Bans, mutes and private-room members in Redis: one state for every worker and pod.

Keys: ``wschat:ban:<scope>:<user_id>`` and ``wschat:mute:<scope>:<user_id>`` hold
the end in Unix milliseconds (``0``: until lifted) and expire with it
(PEXPIREAT), so nothing needs sweeping; ``wschat:members:<room>`` is the set of
user ids granted a private room. A join reads all of a user's standing in one
round trip (one MGET and one SISMEMBER, pipelined).
"""

from __future__ import annotations

import math
from typing import Any

import redis

from ...telemetry import Metrics
from ..moderation import EVERYWHERE, ModerationStore, Standing
from .keys import (
    NODES, PREFIX, PRESENCE, ROOMS, escape_id, guarded, node_conns, room_keys,
)


def _key(kind: str, scope: str, user_id: str) -> str:
    # Both parts escaped (":" in a room name or a sub): a ban of "b:c" in room "a" is
    # not one of "c" in room "a:b".
    return f"{PREFIX}{kind}:{escape_id(scope)}:{escape_id(user_id)}"


def _members_key(room: str) -> str:
    return f"{PREFIX}members:{room}"


def _end(raw: bytes | None) -> float | None:
    if raw is None:
        return None
    ms = int(raw)
    return math.inf if ms == 0 else ms / 1000


class RedisModerationStore(ModerationStore):
    def __init__(self, client: redis.Redis, metrics: Metrics | None = None) -> None:
        self._client = client
        self._metrics = metrics

    @guarded
    def standing(self, room: str | None, user_id: str) -> Standing:
        scopes = [room, EVERYWHERE] if room else [EVERYWHERE]
        keys = [_key(kind, s, user_id) for kind in ("ban", "mute") for s in scopes]
        with self._client.pipeline(transaction=False) as pipe:
            pipe.mget(keys)
            if room:
                pipe.sismember(_members_key(room), user_id)
            replies = pipe.execute()
        ends = [_end(v) for v in replies[0]]
        if not room:
            return Standing(None, ends[0], None, ends[1])
        return Standing(ends[0], ends[1], ends[2], ends[3], bool(replies[1]))

    @guarded
    def restrict(self, kind: str, scope: str, user_id: str, until: float) -> None:
        key = _key(kind, scope, user_id)
        if until == math.inf:
            self._client.set(key, 0)
        else:
            self._client.set(key, int(until * 1000), pxat=int(until * 1000))

    @guarded
    def lift(self, kind: str, scope: str, user_id: str) -> bool:
        return bool(self._client.delete(_key(kind, scope, user_id)))

    @guarded
    def set_member(self, room: str, user_id: str, member: bool) -> bool:
        key = _members_key(room)
        changed = self._client.sadd(key, user_id) if member else self._client.srem(key, user_id)
        return bool(changed)

    @guarded
    def members(self, room: str) -> list[str]:
        return sorted(m.decode() for m in self._client.smembers(_members_key(room)))

    @guarded
    def connections(self, user_id: str) -> int | None:
        return int(self._client.hget(PRESENCE, user_id) or 0)

    @guarded
    def rooms(self) -> list[tuple[str, int]] | None:
        names = sorted(r.decode() for r in self._client.smembers(ROOMS))
        with self._client.pipeline(transaction=False) as pipe:
            for room in names:
                pipe.zcard(room_keys(room)[3])  # the room's distinct users, in join order
            counts = pipe.execute()
        return [(room, int(n)) for room, n in zip(names, counts) if n]

    @guarded
    def workers(self) -> list[dict[str, Any]] | None:
        nodes = [n.decode() for n in self._client.zrange(NODES, 0, -1)]
        with self._client.pipeline(transaction=False) as pipe:
            for node in nodes:
                pipe.hlen(node_conns(node))
            counts = pipe.execute()
        # node ids are "<hostname>-<pid>-<random>" (stores.base.new_node_id): the pod is the host.
        return [{"node": node, "host": node.rsplit("-", 2)[0], "connections": int(n)}
                for node, n in zip(nodes, counts)]
