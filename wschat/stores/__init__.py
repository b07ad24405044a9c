"""Backend selection: the one place that picks memory or Redis, and persistence, from settings.

Building the stores opens no connection and starts nothing: :meth:`Stores.start` does.
"""

from __future__ import annotations

from ..config import Settings
from ..telemetry import Metrics
from .base import Stores


def create_stores(settings: Settings, metrics: Metrics | None = None) -> Stores:
    if settings.redis_url:
        from .redis import create_redis_stores

        stores = create_redis_stores(settings, metrics)
    else:
        from .memory import create_memory_stores

        stores = create_memory_stores(settings.history_size, settings.room_ttl,
                                      settings.memory_history_bytes,
                                      settings.room_numbering_ttl)
    if settings.enable_persistence:
        from ..persistence import open_message_log
        from .durable import DurableMessageStore

        durable = DurableMessageStore(stores.messages, open_message_log(settings.database_url),
                                      metrics)
        stores.messages = durable
        stores.persistence = durable.log.url_for_logs
    return stores
