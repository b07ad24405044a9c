"""Backend selection: the one place that picks memory or Redis from the settings."""

from __future__ import annotations

from typing import Any

from ..config import Settings
from .base import Stores


def create_stores(settings: Settings, metrics: Any = None) -> Stores:
    if settings.redis_url:
        from .redis import create_redis_stores

        return create_redis_stores(settings, metrics)
    from .memory import create_memory_stores

    return create_memory_stores(settings.history_size, settings.room_ttl)
