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

Event JSON is built only by :mod:`wschat.protocol`; the scripts splice ids into
drafts it made and never encode an event themselves.

When Redis goes away, workers keep their WebSockets, answer ``unavailable``
to requests that need Redis, reconnect with back-off, resubscribe, and
re-register their live connections (so presence and rooms come back even if
Redis lost its data), and restore room sequence numbers from the highest id
they delivered so no id is ever issued twice.
"""

from __future__ import annotations

import logging
import time

try:
    import hiredis  # noqa: F401  (replies.py reads the hot path's replies with it)
    import redis
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("REDIS_URL needs the redis extra: pip install 'wschat[redis]'") from exc

from ...config import Settings
from ...telemetry import Metrics
from ..base import Stores
from .broker import RedisBroker
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

    def start(self) -> None:
        super().start()
        self.keeper.start()

    def release_local(self) -> bool:
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
        self.messages.close()  # flushes persistence while Redis can still publish
        self.keeper.stop()
        self.broker.close()
        if self.pipelined is not None:
            self.pipelined.pipeliner.close()


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
    broker = RedisBroker(fast, metrics)
    messages = RedisMessageStore(fast, settings.history_size, metrics)
    messages.delivering = broker.healthy
    stores = RedisStores(
        RedisRoomStore(fast, node, settings.room_ttl, metrics),
        RedisPresenceStore(fast, node, metrics),
        messages, broker, "redis", node_id=node.node_id)
    stores.pipelined = fast  # type: ignore[assignment]
    stores.client = client
    stores.keeper = NodeKeeper(client, node, settings.presence_ttl, settings.room_ttl, metrics)
    # The chat core's re-registration (set as the broker's on_reconnect) serves both.
    stores.keeper.on_reaped = lambda: broker.on_reconnect and broker.on_reconnect()
    stores.rate_limiter = RedisRateLimiter(fast, settings.rate_limit, settings.rate_limit_burst)

    stores.moderation = RedisModerationStore(client, metrics)
    log.info("redis stores: node %s at %s", node.node_id, time.strftime("%H:%M:%S"))
    return stores
