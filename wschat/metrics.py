"""Prometheus metrics for the whole server, whatever the number of workers.

Under gunicorn every worker writes its samples to ``PROMETHEUS_MULTIPROC_DIR``
(set and emptied by ``gunicorn.conf.py``); whichever worker answers a scrape
on the metrics port aggregates all live workers' files, so every scrape sees
the whole server. Room and membership figures come from the room store at
scrape time (server-wide, and with Redis the same on every pod).
"""

from __future__ import annotations

import os
import time

from prometheus_client import Counter, Gauge, Histogram

from .chat import ChatMetrics

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
_STARTED_AT = float(os.environ.get("WSCHAT_STARTED_AT") or time.time())


def _gauge(name: str, doc: str, mode: str, labels: tuple[str, ...] = ()) -> Gauge:
    return Gauge(name, doc, labels, multiprocess_mode=mode)


CONNECTIONS = _gauge("wschat_connections_total",
                     "Active WebSocket connections (a gauge; name kept from the seed)", "livesum")
ROOMS = _gauge("wschat_rooms_total", "Rooms with at least one member", "livemostrecent")
MEMBERS = _gauge("wschat_room_members_total", "User memberships summed over rooms",
                 "livemostrecent")
UPTIME = _gauge("wschat_uptime_seconds", "Seconds since the server started", "livemax")
OUTBOUND = _gauge("wschat_outbound_queued_bytes",
                  "Bytes waiting in connections' outbound queues", "livesum")
BUILD = _gauge("wschat_build_info", "Build information (always 1)", "livemax",
               ("version", "backend"))
MESSAGES_IN = Counter("wschat_messages_received_total", "Client frames handled, by type",
                      ["type"])
DELIVERED = Counter("wschat_messages_delivered_total",
                    "Events written to client connections (room fan-out and DMs)")
ERRORS = Counter("wschat_errors_total", "error events sent to clients, by code", ["code"])
RATE_LIMITED = Counter("wschat_rate_limited_total", "Client messages refused by rate limiting")
DISCONNECTS = Counter("wschat_disconnects_total",
                      "Connections closed by the server, by reason", ["reason"])
CONNECTIONS_OPENED = Counter("wschat_connections_opened_total", "WebSocket connections accepted")
HANDSHAKES_REFUSED = Counter("wschat_handshakes_refused_total",
                             "Upgrade requests refused before the handshake, by reason",
                             ["reason"])
AUTH_FAILURES = Counter("wschat_auth_failures_total", "Rejected tokens, by reason", ["reason"])
STORE_ERRORS = Counter("wschat_store_errors_total",
                       "Failed operations against Redis or the database", ["backend"])
FANOUT = Histogram("wschat_fanout_seconds",
                   "Time to store and hand a room message to every local member",
                   buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                            0.1, 0.25, 1.0))


class PrometheusChatMetrics(ChatMetrics):
    """The chat core's and transport's events, counted in Prometheus series."""

    def received(self, kind: str) -> None:
        MESSAGES_IN.labels(kind).inc()

    def delivered(self, count: int) -> None:
        if count:
            DELIVERED.inc(count)

    def error(self, code: str) -> None:
        ERRORS.labels(code).inc()

    def rate_limited(self) -> None:
        RATE_LIMITED.inc()

    def disconnected(self, reason: str) -> None:
        DISCONNECTS.labels(reason).inc()

    def fanout_seconds(self, seconds: float) -> None:
        FANOUT.observe(seconds)

    def connection_opened(self) -> None:
        CONNECTIONS.inc()
        CONNECTIONS_OPENED.inc()

    def connection_closed(self) -> None:
        CONNECTIONS.dec()

    def handshake_refused(self, reason: str) -> None:
        HANDSHAKES_REFUSED.labels(reason).inc()

    def auth_failed(self, reason: str) -> None:
        AUTH_FAILURES.labels(reason).inc()

    def store_error(self, backend: str) -> None:
        STORE_ERRORS.labels(backend).inc()


def refresh_scrape_gauges(rooms: int, members: int, outbound_bytes: int) -> None:
    """Set the figures that are read, not counted, just before an exposition."""
    ROOMS.set(rooms)
    MEMBERS.set(members)
    OUTBOUND.set(outbound_bytes)
    UPTIME.set(time.time() - _STARTED_AT)


def started_at() -> float:
    return _STARTED_AT
