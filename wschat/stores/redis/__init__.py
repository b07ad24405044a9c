"""Redis stores: any number of gunicorn workers and pods share rooms, presence, history.

* :mod:`.keys`: key names, channels, the payload framing, and loading the Lua
  scripts (``scripts/*.lua``, shipped in the package).
* :mod:`.stores`: rooms, presence, messages; every state change is one script
  or one pipeline, so there is no lock and no read-modify-write race between
  workers.
* :mod:`.broker`: pub/sub fan-out, one connection per worker.
* :mod:`.nodes`: each worker's heartbeat, and the reaper that removes a dead
  worker's memberships (with the same leave script as a user's leave).
* :mod:`.pipeline`: auto-pipelining; the hot path's commands (scripts,
  ``PUBLISH``, ``HGET``) of concurrent greenlets go out together.
* :mod:`.epoch`: after Redis lost its data, posts wait until every worker that
  knew it raised its sequences, so that no id is issued twice.

Event JSON is built only by :mod:`wschat.protocol`; the scripts splice ids into
drafts it made and never encode an event themselves.

When Redis goes away, workers keep their WebSockets, answer ``unavailable``
to requests that need Redis, reconnect with back-off, resubscribe, and
re-register their live connections (so presence and rooms come back even if
Redis lost its data), and restore room and DM sequence numbers from the highest
id they delivered, every worker before any takes a post again, so no id is ever
issued twice.
"""

from __future__ import annotations

import logging
import time

import gevent
import gevent.lock

try:
    import hiredis  # noqa: F401  (replies.py reads the hot path's replies with it)
    import redis
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("REDIS_URL needs the redis extra: pip install 'wschat[redis]'") from exc

from ...config import Settings
from ...telemetry import Metrics
from ..base import Stores, Unavailable
from .broker import RedisBroker
from .epoch import Epoch
from .keys import escape_id, room_channel, room_payload, split_room_payload, user_channel
from .moderation import RedisModerationStore
from .nodes import Node, NodeKeeper
from .pipeline import Pipelined
from .ratelimit import RedisRateLimiter
from .stores import RedisMessageStore, RedisPresenceStore, RedisRoomStore

__all__ = [
    "Node", "NodeKeeper", "RedisBroker", "RedisMessageStore", "RedisPresenceStore",
    "RedisRoomStore", "RedisStores", "create_redis_stores", "escape_id", "redis",
    "room_channel", "room_payload", "split_room_payload", "user_channel",
]

log = logging.getLogger("wschat.redis")

_Node = Node  # the name the store tests construct a node by


class RedisStores(Stores):
    keeper: NodeKeeper
    epoch: Epoch
    _recovering: gevent.lock.Semaphore  # one recovery at a time (set by the factory)
    _epoch_checked = 0.0  # when the gate's refusal last made this worker check
    _check_waiting = False  # a check waits for the recovery running to be over
    _failed_over = 0.0  # when a READONLY answer last made this worker connect again
    _released = False  # shutting down: its memberships are gone, no recovery brings them back

    def start(self) -> None:
        super().start()
        try:
            # A first start names the epoch, or learns it. A worker just started has no
            # sequence to raise: if it is the first to find Redis restarted, the others
            # are waited for, not it.
            if self.epoch.begin():
                self.epoch.done()
        except (redis.RedisError, OSError, Unavailable) as exc:
            log.warning("redis epoch not read at start (%s); read at the reconnect", exc)
        self.keeper.start()

    def recover(self) -> None:
        """After a reconnect (or this node found reaped): the chat core's re-registration
        (``broker.on_reconnect``), inside the epoch's check: if Redis lost its data, no
        worker takes a post until this one's sequences are raised too. Not once the
        worker released its registrations to shut down: its closing connections would
        be registered again, and nobody would take them out (no longer listed, this
        worker is nobody's to reap)."""
        if self._released:
            log.info("pub/sub connection made again while shutting down: nothing to "
                     "register again")
            return
        with self._recovering:
            self._resync_in_epoch(always=True)

    def check_epoch(self) -> None:
        """The gate refused a post, or another worker found Redis's data lost (it says so
        on the control channel). If no connection of this worker noticed (a flush keeps
        them open), recover now rather than at the next heartbeat. At most once a
        second and never beside a recovery already running, but never dropped: one check
        waits for the second to pass, or for the recovery to be over (which may have read
        the epoch before another worker named a new one and said so)."""
        if self._check_waiting:
            return  # one is queued, and looks after whatever asked this
        wait = 1.0 - (time.monotonic() - self._epoch_checked)
        if wait > 0 or self._recovering.locked():
            self._check_waiting = True
            gevent.spawn_later(max(0.0, wait), self._check_epoch, True)
            return
        self._epoch_checked = time.monotonic()
        gevent.spawn(self._check_epoch)

    def _check_epoch(self, waiting: bool = False) -> None:
        if self._released:
            return
        try:
            with self._recovering:
                if waiting:
                    self._check_waiting = False
                    self._epoch_checked = time.monotonic()
                self._resync_in_epoch(always=False)
        except (redis.RedisError, OSError, Unavailable) as exc:  # the resync's: Unavailable
            log.warning("redis epoch check failed (%s); the next heartbeat tries again", exc)

    def _resync_in_epoch(self, always: bool) -> None:
        lost = self.epoch.begin(self.keeper.peers)
        if (lost or always) and self.broker.on_reconnect is not None:
            if lost:
                # Lost, or rolled back to a snapshot listing connections closed since:
                # all out, the live ones back in (posts wait for this recovery meanwhile),
                # and out of their rooms the memberships this worker no longer has.
                self.presence.disconnect_all()  # type: ignore[attr-defined]
                self.rooms.leave_gone()  # type: ignore[attr-defined]
            self.broker.on_reconnect()
        if lost:
            self.epoch.done()

    def connect_again(self) -> None:
        """Redis answered ``READONLY``: a failover demoted the server this worker's
        connections reached, and its address (a DNS name, a virtual IP) now names the new
        primary. Every connection is made again, through a new lookup: the pool's, the
        pipeline's, and the pub/sub one, whose reconnect runs the recovery (the new
        primary is another run of Redis, which may be behind: epoch.py). At most once a
        second."""
        now = time.monotonic()
        if now - self._failed_over < 1.0:
            return
        self._failed_over = now
        log.warning("redis answered READONLY (a failover demoted it); connecting again")
        if self.client is not None:
            _disconnect_pool(self.client.connection_pool)
        if self.pipelined is not None:
            self.pipelined.pipeliner.reconnect()
        self.broker.reconnect()  # type: ignore[attr-defined]

    def release_local(self) -> bool:
        self._released = True
        try:
            count = self.keeper.release()
        except (redis.RedisError, OSError) as exc:
            log.warning("could not release this node's memberships (%s); they expire "
                        "within PRESENCE_TTL", exc)
            return False
        log.info("released %d memberships of node %s", count, self.keeper.node_id)
        return True

    pipelined: Pipelined | None = None
    client: redis.Redis | None = None  # the pool's client (not the pipeline)

    def memory_bytes(self) -> tuple[int, int] | None:
        if self.client is None:
            return None
        try:
            info = self.client.info("memory")
            return int(info["used_memory"]), int(info.get("maxmemory", 0))
        except (redis.RedisError, OSError, KeyError, ValueError) as exc:
            # Down (the room totals warn of it), or INFO refused (some managed services).
            log.debug("redis memory unavailable for this scrape: %s", exc)
            return None

    def close(self) -> None:
        self._released = True
        self.messages.close()  # flushes persistence while Redis can still publish
        self.keeper.stop()
        self.broker.close()
        if self.pipelined is not None:
            self.pipelined.pipeliner.close()


def _disconnect_pool(pool: redis.ConnectionPool) -> None:
    """Drop the pool's idle connections; one a greenlet is using (a join's pipeline,
    moderation, the heartbeat, the pub/sub one being made) is not closed under its
    command, which Redis may have carried out, but made again when it goes back to the
    pool (redis-py's ``mark_for_reconnect``; where it has none, it stays until a later
    READONLY finds it idle)."""
    in_use = getattr(pool, "_get_in_use_connections", None)
    for conn in (in_use() if in_use is not None else ()):
        mark = getattr(conn, "mark_for_reconnect", None)
        if mark is not None:
            mark()
    try:
        pool.disconnect(inuse_connections=False)
    except TypeError:  # redis-py 5's BlockingConnectionPool drops all or nothing
        pool.disconnect()


def create_redis_stores(settings: Settings, metrics: Metrics | None = None) -> Stores:
    assert settings.redis_url
    pool = redis.BlockingConnectionPool.from_url(
        # Many greenlets share few sockets; under a connect or disconnect storm a
        # greenlet may wait its turn for a while rather than fail its leave.
        settings.redis_url, max_connections=256, timeout=20, socket_timeout=5,
        socket_connect_timeout=3, health_check_interval=30)
    client = redis.Redis(connection_pool=pool)
    # The hot path (posts, joins, leaves, presence, typing, rate limits) auto-pipelined;
    # the node keeper, moderation and the rest on the pool.
    fast: redis.Redis = Pipelined(client, metrics)  # type: ignore[assignment]
    node = Node()
    broker = RedisBroker(fast, metrics, node.node_id)
    messages = RedisMessageStore(fast, settings.history_size, metrics, settings.presence_ttl,
                                 room_ttl=settings.room_ttl,
                                 numbering_ttl=settings.room_numbering_ttl)
    messages.delivering = broker.healthy
    stores = RedisStores(
        RedisRoomStore(fast, node, settings.room_ttl, metrics,
                       numbering_ttl=settings.room_numbering_ttl),
        RedisPresenceStore(fast, node, metrics, claim_ttl=settings.presence_ttl),
        messages, broker, "redis", node_id=node.node_id)
    stores.pipelined = fast  # type: ignore[assignment]
    stores.client = client
    stores.keeper = NodeKeeper(client, node, settings.presence_ttl, settings.room_ttl, metrics,
                               numbers_in_database=settings.enable_persistence,
                               numbering_ttl=settings.room_numbering_ttl)
    # A worker that never comes back is waited for as long as a silent one counts as alive.
    stores.epoch = Epoch(client, node.node_id, settings.presence_ttl,
                         numbers_in_database=settings.enable_persistence)
    # Listed anew as numbering in the database: its listing may have run out meanwhile, and
    # workers numbering in Redis taken posts (stores.messages: the durable store, once
    # create_stores wrapped the window in it).
    stores.keeper.on_listed_anew = stores.epoch.on_listed_anew = (
        lambda: stores.messages.sequences_moved())
    stores._recovering = gevent.lock.Semaphore()
    # The chat core's re-registration (set as the broker's on_reconnect), in the epoch's
    # check, serves both.
    broker.recover = stores.recover
    fast.pipeliner.on_read_only = stores.connect_again  # type: ignore[attr-defined]
    stores.keeper.on_reaped = stores.recover
    stores.keeper.on_read_only = stores.connect_again
    messages.on_gate_closed = stores.check_epoch
    broker.on_control = lambda _: stores.check_epoch()  # another worker found a loss
    stores.rate_limiter = RedisRateLimiter(fast, settings.rate_limit, settings.rate_limit_burst)

    stores.moderation = RedisModerationStore(client, metrics)
    log.info("redis stores: node %s at %s", node.node_id, time.strftime("%H:%M:%S"))
    return stores
