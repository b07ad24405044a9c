"""What wschat reports, as one typed interface (:class:`Metrics`).

Every module that counts something takes a :class:`Metrics`; the no-op
:class:`NoMetrics` keeps the core and the stores (and their tests) free of
Prometheus, and :class:`wschat.metrics.PrometheusChatMetrics` counts each call
in a Prometheus series (docs/operations.md lists them).
"""

from __future__ import annotations

from typing import Protocol


class Metrics(Protocol):
    # -- the worker ------------------------------------------------------------------
    def started(self, backend: str, persistence: bool = False) -> None: ...
    def greenlets(self, delta: int) -> None: ...
    # -- connections (transport, admission) ------------------------------------------
    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...
    def handshake_refused(self, reason: str) -> None: ...
    def disconnected(self, reason: str) -> None: ...
    # -- the chat core ---------------------------------------------------------------
    def received(self, kind: str) -> None: ...
    def posted(self, kind: str) -> None: ...  # "room" or "dm", stored and published
    # kind: the event's type when the caller knows it (else read from the event)
    def delivered(self, count: int, event: bytes = b"", kind: str | None = None) -> None: ...
    def auth_failed(self, reason: str) -> None: ...
    def error(self, code: str) -> None: ...
    def rate_limited(self, kind: str = "") -> None: ...  # command class name, "" for junk
    def fanout_seconds(self, seconds: float) -> None: ...
    def flush(self) -> None: ...  # counts kept back on the message path go out now
    # -- the stores ------------------------------------------------------------------
    def store_error(self, backend: str) -> None: ...  # "redis" or "database"
    # One Redis round trip of the message path, or one database commit: its seconds.
    def store_seconds(self, backend: str, seconds: float) -> None: ...


class NoMetrics(Metrics):
    """Reports nothing: the default where no metrics are wanted."""
