"""Workers as nodes: presence survives dead workers.

Each worker ("node") refreshes its score in ``wschat:nodes`` every
``PRESENCE_TTL / 3`` seconds and records its memberships and connections; any
node that finds another silent for ``PRESENCE_TTL`` claims it (one script, so
one reaper wins) and removes its memberships with the leave script every leave
uses, announcing ``offline`` where it was a user's last connection in a room.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import gevent
import redis

from ...protocol import encode_presence
from ...telemetry import Metrics
from ..base import ROOM_NUMBERING_TTL, Unavailable, new_node_id
from .keys import (
    NODES, NUMBERED_BY_DATABASE, PRESENCE, READY, RoomTtls, is_read_only, membership_keys,
    membership_token, node_conns, node_memberships, room_channel, room_payload, script,
    split_token, user_nodes,
)

log = logging.getLogger("wschat.redis")

BEATS_PER_TTL = 3  # a node beats every PRESENCE_TTL / 3: it is reaped after missing ~3


def live_window_ms(presence_ttl: float) -> int:
    """How recent a node's last beat must be for it to count as live before it is
    reaped: two beats' time (a worker that misses one beat still counts)."""
    return int(presence_ttl * 1000 * 2 / BEATS_PER_TTL)


class Node:
    """This worker's identity in Redis and the keys that list what it registered."""

    def __init__(self) -> None:
        self.node_id = new_node_id()
        self.memberships = node_memberships(self.node_id)
        self.conns = node_conns(self.node_id)


def disconnect_registered(disconnect: Any, client: Any, node_id: str, pipe: Any = None) -> int:
    """Run disconnect.lua (``disconnect``, registered) for every connection the node's
    ``conns`` hash lists, on ``pipe`` if given; return how many it listed."""
    conns = node_conns(node_id)
    registered = client.hgetall(conns)
    for conn_id, user_id in registered.items():
        disconnect(keys=[conns, PRESENCE, user_nodes(user_id.decode())],
                   args=[conn_id, user_id, node_id], client=pipe)
    return len(registered)


def leave_memberships(leave: Any, client: Any, memberships: str,
                      tokens: list[tuple[str, str, str]], ttls: RoomTtls) -> list[Any]:
    """Run leave.lua (``leave``) for each ``(room, conn_id, user_id)`` a node's
    ``memberships`` set lists, in one pipeline; return its replies, in order."""
    if not tokens:
        return []
    with client.pipeline(transaction=False) as pipe:
        for room, conn_id, user_id in tokens:
            leave(keys=membership_keys(room, memberships),
                  args=[room, conn_id, user_id, membership_token(room, conn_id, user_id),
                        *ttls], client=pipe)
        return pipe.execute()


def announce_offline(pipe: Any, tokens: list[tuple[str, str, str]], left: list[Any]) -> None:
    """Publish (on ``pipe``) ``offline`` in each room where :func:`leave_memberships` took
    a user's last connection out."""
    for (room, _, user_id), (_, last, _, name) in zip(tokens, left, strict=True):
        if last:
            pipe.publish(room_channel(room), room_payload(
                encode_presence(room, user_id, name.decode(), "offline"), user_id))


class NodeKeeper:
    """Heartbeats this node and reaps nodes that died without cleaning up."""

    def __init__(self, client: redis.Redis, node: Node, presence_ttl: float, room_ttl: float,
                 metrics: Metrics | None = None, numbers_in_database: bool = False,
                 numbering_ttl: float = ROOM_NUMBERING_TTL) -> None:
        self._client = client
        self._node = node
        #: ENABLE_PERSISTENCE: this node numbers messages in the database. Its beats list
        #: it in NUMBERED_BY_DATABASE, and while any such node lives, posts numbered in
        #: Redis are refused (gate.lua): during a rolling update that turns persistence
        #: on or off, two numberings of one room would otherwise issue an id twice.
        self._database = "1" if numbers_in_database else "0"
        self._ttl_ms = int(presence_ttl * 1000)
        self._interval = presence_ttl / BEATS_PER_TTL
        self._ttls = RoomTtls.of(room_ttl, numbering_ttl)
        self._metrics = metrics
        self._beat = script(client, "node_beat")
        self._claim = script(client, "claim_node")
        self._leave = script(client, "leave", prelude="numbering")
        self._disconnect = script(client, "disconnect")
        self._greenlet: gevent.Greenlet | None = None
        self._registered = False
        self._reregister = False
        #: The nodes alive at the last heartbeat (this one too): the workers waited for
        #: if Redis loses its data (epoch.py).
        self.peers: list[str] = []
        # Called when this node finds it was reaped as dead (it stalled longer than
        # PRESENCE_TTL) while its connections lived on: they must be registered again.
        self.on_reaped: Callable[[], None] | None = None
        # Called when Redis answered READONLY: a failover demoted the server reached.
        self.on_read_only: Callable[[], None] | None = None
        # Called when a beat listed this database-numbering node anew in
        # NUMBERED_BY_DATABASE: its listing may have run out (it stalled past its TTL),
        # and posts numbered in Redis were taken meanwhile (MessageStore.sequences_moved).
        self.on_listed_anew: Callable[[], None] | None = None

    @property
    def node_id(self) -> str:
        return self._node.node_id

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            try:
                self.beat_and_reap()
            except (redis.ConnectionError, redis.TimeoutError, OSError, Unavailable) as exc:
                log.debug("node heartbeat failed: %s", exc)
            except redis.ResponseError as exc:
                if not is_read_only(exc):
                    log.exception("node heartbeat failed")
                elif self.on_read_only is not None:
                    self.on_read_only()
            except Exception:
                log.exception("node heartbeat failed")
            gevent.sleep(self._interval)

    def beat_and_reap(self) -> int:
        known, dead, alive, anew = self._beat(
            keys=[NODES, NUMBERED_BY_DATABASE, READY],
            args=[self._node.node_id, self._ttl_ms, self._database])
        if anew and self.on_listed_anew is not None:
            self.on_listed_anew()
        if self._registered and not known:
            log.warning("node %s was reaped as dead (stalled, or Redis lost its data); "
                        "registering its connections again", self._node.node_id)
            self._reregister = True
        self._registered = True
        if self._reregister and self.on_reaped is not None:
            # With the peers of the beat before: if Redis lost its data, this beat's
            # registry lists only the workers that beat since (epoch.py waits for all).
            self.on_reaped()  # if it fails, it is tried again on the next beat
            self._reregister = False
        self.peers = [raw.decode() for raw in alive]
        reaped = 0
        for raw in dead:
            node_id = raw.decode()
            if node_id == self._node.node_id:
                continue
            count = self._reap_node(node_id, self._ttl_ms)
            if count:
                log.warning("reaped %d memberships of dead node %s", count, node_id)
            reaped += count
        return reaped

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
        try:
            with self._client.pipeline(transaction=False) as pipe:
                pipe.zrem(NODES, self._node.node_id)
                pipe.zrem(NUMBERED_BY_DATABASE, self._node.node_id)
                pipe.execute()
        except Exception:
            pass

    def release(self) -> int:
        """Remove everything this node registered (announcing offline), as if it had died:
        a few pipelined round trips instead of a leave per connection and room at shutdown."""
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
        self._client.zadd(NODES, {self._node.node_id: 0})  # claimed at once, then removed
        return self._reap_node(self._node.node_id)

    def _reap_node(self, node_id: str, silent_ms: int | None = None) -> int:
        """Remove one node's registrations if this caller claims it (with ``silent_ms``:
        only if it is still silent that long), then the node; return how many
        memberships went. The claim (claim_node.lua) is a lease of one TTL."""
        claim_args: list[Any] = [node_id] if silent_ms is None else [node_id, silent_ms]
        if not self._claim(keys=[NODES], args=claim_args):
            return 0  # alive again, or another reaper has it
        memberships = node_memberships(node_id)
        tokens = [t for t in (split_token(raw.decode())
                              for raw in self._client.smembers(memberships)) if t]
        left = leave_memberships(self._leave, self._client, memberships, tokens, self._ttls)
        with self._client.pipeline(transaction=False) as pipe:
            announce_offline(pipe, tokens, left)
            disconnect_registered(self._disconnect, self._client, node_id, pipe)
            # Not `conns`: each disconnect above takes its connection out, and one the
            # node (alive after all) registered since it was read stays, counted where
            # connect.lua counted it (its user's presence and nodes); deleting it would
            # leave those counts behind for as long as the node lives.
            pipe.delete(memberships)
            # Only now, all gone: a reaper that failed before this leaves the node
            # listed, and a later beat reaps it again (leaving twice is a no-op).
            pipe.zrem(NODES, node_id)
            pipe.execute()
        return sum(int(removed) for removed, *_ in left)
