"""Prometheus metrics for the whole server, whatever the number of workers.

Under gunicorn every worker writes its samples to ``PROMETHEUS_MULTIPROC_DIR``
(set and emptied by ``gunicorn.conf.py``); whichever worker answers a scrape
on the metrics port merges every worker's files, so each scrape sees the whole
server:

* counters and histograms add up over every worker that ever ran (a dead
  worker's files stay, so totals never go backwards);
* gauges use a ``live*`` mode: only live workers' files count, and the master
  deletes a worker's gauge files when it reaps it (``child_exit``);
* room and membership figures are read from the room store at scrape time:
  server-wide, and with Redis the same figure on every pod.

``docs/operations.md`` documents every series; a test keeps the two in step.

The per-message series (requests received, messages posted, events delivered,
the fan-out and store-time histograms) and ``wschat_greenlets`` (a reading
greenlet starts and ends per burst of frames) are counted in plain integers on
the message path and folded into the Prometheus series by
:meth:`PrometheusChatMetrics.flush`: about once a second (the chat core's
ticker), before this worker answers a scrape, and when the worker stops. A
multiprocess update costs a lock and an mmap write each, several per message; a
scrape answered by another worker sees this worker's per-message counts up to
about a second late (a worker killed with -9 loses at most that second's counts).
"""

from __future__ import annotations

import atexit
import bisect
import os
import platform
import time
import weakref
from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from .version import __version__
from .protocol import ErrorCode, event_type
from .telemetry import Metrics

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
# Set by the gunicorn master before it forks: uptime is the server's, not a worker's.
_STARTED_AT = float(os.environ.get("WSCHAT_STARTED_AT") or time.time())

# Label values known in advance: initialised to 0 so dashboards and alerts see a
# series (and a rate of 0) before the first event rather than no data.
DELIVERED_TYPES = ("message", "dm", "presence", "typing")
POSTED_KINDS = ("room", "dm")
DISCONNECT_REASONS = ("slow_consumer", "heartbeat_timeout", "auth_timeout",
                      "token_expired", "rate_limited", "missed_messages", "inbound_budget",
                      "slow_message", "banned", "disconnected")
REFUSAL_REASONS = ("not_websocket", "bad_handshake", "origin", "auth", "username",
                   "max_connections", "shutting_down", "unavailable")
REFUSAL_REASONS += ("max_connections_per_ip", "max_connections_per_user")
WAITING_CLOSE_REASONS = ("max_handshakes_per_ip", "pool")  # wschat.worker.Waiting
HELD_TYPES = ("SendMessage", "SendDm")  # what a refused send holds back
AUTH_FAILURE_REASONS = (ErrorCode.AUTH_FAILED.value, ErrorCode.TOKEN_EXPIRED.value)

# The chat core reports command classes (a Moderate: its action, one of three wire
# types); Prometheus labels use the wire names.
_WIRE_TYPES = {"Auth": "auth", "Join": "join", "Leave": "leave", "SendMessage": "message",
               "SendDm": "dm", "Typing": "typing", "ListUsers": "list_users",
               "History": "history", "Ping": "ping",
               "kick": "kick", "mute": "mute", "unmute": "unmute"}

CONNECTIONS = Gauge("wschat_connections_total",
                    "Open WebSocket connections (a gauge despite the _total suffix, as documented)",
                    multiprocess_mode="livesum")
ROOMS = Gauge("wschat_rooms_total", "Rooms with at least one member (read from the room store)",
              multiprocess_mode="livemostrecent")
MEMBERS = Gauge("wschat_room_members_total",
                "User memberships summed over rooms (read from the room store)",
                multiprocess_mode="livemostrecent")
UPTIME = Gauge("wschat_uptime_seconds", "Seconds since the server (gunicorn master) started",
               multiprocess_mode="livemax")
WORKERS = Gauge("wschat_workers", "Live gunicorn workers", multiprocess_mode="livesum")
OUTBOUND = Gauge("wschat_outbound_queued_bytes",
                 "Bytes waiting in connections' outbound queues (sampled every second)",
                 multiprocess_mode="livesum")
INBOUND = Gauge("wschat_inbound_buffered_bytes",
                "Bytes held by unfinished incoming messages (sampled every second); each "
                "worker's are bounded by MAX_INBOUND_BUFFER_BYTES",
                multiprocess_mode="livesum")
GREENLETS = Gauge("wschat_greenlets",
                  "Greenlets serving WebSockets: one per connection whose bytes are being "
                  "handled (an idle connection holds none), plus flushers, close timers and "
                  "the ticker", multiprocess_mode="livesum")
BUILD = Gauge("wschat_build_info", "Version, store backend and Python of the running server",
              ["version", "backend", "python"], multiprocess_mode="livemax")
RECEIVED = Counter("wschat_messages_received_total",
                   "Client requests parsed, by type (before rate limiting and checks)", ["type"])
POSTED = Counter("wschat_messages_posted_total",
                 "Room messages and DMs stored and published (retries excluded), by kind",
                 ["kind"])
DELIVERED = Counter("wschat_messages_delivered_total",
                    "Events written to client connections by fan-out, by event type", ["type"])
ERRORS = Counter("wschat_errors_total", "error events sent to clients, by code", ["code"])
RATE_LIMITED = Counter("wschat_rate_limited_total",
                       "Client requests refused by rate limiting, by type ('invalid': a "
                       "frame that is no command) and reason ('bucket': over a rate limit; "
                       "'held': a message or DM waiting behind an earlier refused one of "
                       "its connection)", ["type", "reason"])
DISCONNECTS = Counter("wschat_disconnects_total",
                      "Connections closed by the server, by reason", ["reason"])
OPENED = Counter("wschat_connections_opened_total", "WebSocket connections accepted")
REFUSED = Counter("wschat_handshakes_refused_total",
                  "Upgrade requests refused before the handshake, by reason", ["reason"])
WAITING_CLOSED = Counter("wschat_waiting_sockets_closed_total",
                         "Sockets closed while still waiting for their HTTP request (or "
                         "reset while their response waits for a client that does not read "
                         "it), the oldest past a limit, by reason ('max_handshakes_per_ip': "
                         "of one address; 'pool': of all, near the worker's pool size)",
                         ["reason"])
AUTH_FAILURES = Counter("wschat_auth_failures_total",
                        "Rejected tokens (upgrade request or auth message), by reason",
                        ["reason"])
WORKER_RESTARTS = Counter("wschat_worker_restarts_total",
                          "Workers started in place of one that exited (crash, OOM kill, "
                          "timeout); the first workers of a server are not counted")
STORE_ERRORS = Counter("wschat_store_errors_total",
                       "Failed operations against Redis or the database, by backend",
                       ["backend"])
STORE_MEMORY = Gauge("wschat_store_memory_bytes",
                     "Memory the shared store uses (Redis: used_memory), read at scrape time; "
                     "the same on every pod", ["backend"], multiprocess_mode="livemostrecent")
STORE_MEMORY_LIMIT = Gauge("wschat_store_memory_limit_bytes",
                           "The shared store's memory limit (Redis: maxmemory; 0: none), read at "
                           "scrape time; at the limit Redis refuses posts", ["backend"],
                           multiprocess_mode="livemostrecent")
STORE_SECONDS = Histogram("wschat_store_seconds",
                          "Time of one Redis round trip of the hot path (a pipelined batch of "
                          "posts, joins, leaves, presence and rate-limit commands, as its "
                          "callers waited for it) or of one database commit (a group of "
                          "writes), by backend",
                          ["backend"],
                          buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                   0.05, 0.1, 0.25, 1.0, 2.5))
FANOUT = Histogram("wschat_fanout_seconds",
                   "Time from a room message's arrival to its being stored and published "
                   "(memory backend: and written to every member)",
                   buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                            0.05, 0.1, 0.25, 1.0))


_LIVE: "weakref.WeakSet[PrometheusChatMetrics]" = weakref.WeakSet()


def flush_all() -> None:
    """Fold every live :class:`PrometheusChatMetrics`' pending counts into its series."""
    for m in list(_LIVE):
        m.flush()


atexit.register(flush_all)  # a worker that exits normally leaves no count behind


class PrometheusChatMetrics(Metrics):
    """The chat core's and the transport's events, counted in Prometheus series.

    The per-message calls (``received``, ``posted``, ``delivered``,
    ``fanout_seconds``, ``store_seconds``) only add to plain ints here;
    :meth:`flush` moves them into the series (see the module's docstring for when).
    """

    def __init__(self) -> None:
        # Children are looked up once (at flush, off the message path).
        self._received_children = {name: RECEIVED.labels(wire)
                                    for name, wire in _WIRE_TYPES.items()}
        self._delivered_children = {t: DELIVERED.labels(t) for t in DELIVERED_TYPES}
        self._posted_children = {k: POSTED.labels(k) for k in POSTED_KINDS}
        # Every type exported from the start (0), as for received; "held" only for the
        # kinds a refused send holds back (Chat._keep_send_order).
        self._rate_limited_children = {
            (name, False): RATE_LIMITED.labels(wire, "bucket")
            for name, wire in (*_WIRE_TYPES.items(), ("", "invalid"))}
        self._rate_limited_children.update(
            {(name, True): RATE_LIMITED.labels(_WIRE_TYPES[name], "held")
             for name in HELD_TYPES})
        # Pending counts: command class / event type / kind -> n, since the last flush.
        self._received: dict[str, int] = {}
        self._delivered: dict[str, int] = {}
        self._posted: dict[str, int] = {}
        self._fanout = _PendingObservations(FANOUT)
        self._store: dict[str, _PendingObservations] = {}  # backend -> its pending times
        self._greenlets_delta = 0
        _LIVE.add(self)
        self._errors = {code.value: ERRORS.labels(code.value) for code in ErrorCode}
        for reason in DISCONNECT_REASONS:
            DISCONNECTS.labels(reason)
        for reason in REFUSAL_REASONS:
            REFUSED.labels(reason)
        for reason in AUTH_FAILURE_REASONS:
            AUTH_FAILURES.labels(reason)
        self._waiting_closed = {r: WAITING_CLOSED.labels(r) for r in WAITING_CLOSE_REASONS}

    def started(self, backend: str, persistence: bool = False) -> None:
        """This worker is serving: count it and say what it runs. The store-error series of
        what can fail (Redis, the database) start at 0."""
        BUILD.labels(__version__, backend, platform.python_version()).set(1)
        WORKERS.set(1)
        if backend != "memory":
            STORE_ERRORS.labels(backend)
            STORE_SECONDS.labels(backend)
        if persistence:
            STORE_ERRORS.labels("database")
            STORE_SECONDS.labels("database")
        UPTIME.set(time.time() - _STARTED_AT)

    def received(self, kind: str) -> None:
        pending = self._received
        pending[kind] = pending.get(kind, 0) + 1

    def posted(self, kind: str) -> None:
        pending = self._posted
        pending[kind] = pending.get(kind, 0) + 1

    def delivered(self, count: int, event: bytes = b"", kind: str | None = None) -> None:
        if count:
            if kind is None:
                kind = event_type(event) or ""
            if kind not in self._delivered_children:
                kind = "other"
            pending = self._delivered
            pending[kind] = pending.get(kind, 0) + count

    def fanout_seconds(self, seconds: float) -> None:
        self._fanout.observe(seconds)

    def store_seconds(self, backend: str, seconds: float) -> None:
        pending = self._store.get(backend)
        if pending is None:
            pending = self._store[backend] = _PendingObservations(STORE_SECONDS.labels(backend))
        pending.observe(seconds)

    def flush(self) -> None:
        """Add the counts gathered since the last flush to the Prometheus series."""
        for pending, children, family in ((self._received, self._received_children, RECEIVED),
                                          (self._posted, self._posted_children, POSTED),
                                          (self._delivered, self._delivered_children,
                                           DELIVERED)):
            if not pending:
                continue
            counts = list(pending.items())
            pending.clear()
            for key, n in counts:
                child = children.get(key)
                (child if child is not None else family.labels(key)).inc(n)
        if self._greenlets_delta:
            GREENLETS.inc(self._greenlets_delta)
            self._greenlets_delta = 0
        self._fanout.fold()
        for pending in list(self._store.values()):
            pending.fold()

    def error(self, code: str) -> None:
        (self._errors.get(code) or ERRORS.labels(code)).inc()

    def rate_limited(self, kind: str = "", held: bool = False) -> None:
        """``kind``: the refused command's class name, as for :meth:`received` ("": a
        frame that is no command); ``held``: refused behind an earlier refused send
        (reason "held"), not by a bucket (reason "bucket")."""
        child = (self._rate_limited_children.get((kind, held))
                 or self._rate_limited_children[("", False)])
        child.inc()

    def disconnected(self, reason: str) -> None:
        DISCONNECTS.labels(reason).inc()

    def connection_opened(self) -> None:
        CONNECTIONS.inc()
        OPENED.inc()

    def connection_closed(self) -> None:
        CONNECTIONS.dec()

    def greenlets(self, delta: int) -> None:
        # Once per read burst (a reading greenlet starts and ends): folded at flush.
        self._greenlets_delta += delta

    def handshake_refused(self, reason: str) -> None:
        REFUSED.labels(reason).inc()

    def auth_failed(self, reason: str) -> None:
        AUTH_FAILURES.labels(reason).inc()

    def waiting_closed(self, reason: str) -> None:
        self._waiting_closed[reason].inc()

    def store_error(self, backend: str) -> None:
        STORE_ERRORS.labels(backend).inc()


class _PendingObservations:
    """A histogram's observations kept in plain ints until :meth:`fold` adds them to it."""

    __slots__ = ("bounds", "counts", "histogram", "total")

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        self.bounds = list(histogram._upper_bounds)  # type: ignore[attr-defined]
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        # The first bucket whose upper bound is >= seconds, as Histogram.observe picks it.
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def fold(self) -> None:
        counts, total = self.counts, self.total
        if not any(counts):
            return
        self.counts, self.total = [0] * len(self.bounds), 0.0
        _fold_histogram(self.histogram, counts, total)


def _fold_histogram(histogram: Histogram, counts: list[int], total: float) -> None:
    """Add ``counts`` observations per bucket (and their sum) to ``histogram``: what as many
    ``observe`` calls would have done, one update per bucket instead of two per call."""
    buckets = getattr(histogram, "_buckets", None)
    value_sum = getattr(histogram, "_sum", None)
    if buckets is None or value_sum is None or len(buckets) != len(counts):
        # prometheus_client changed its insides: replay at the buckets' bounds (the sum
        # then is approximate, the counts exact).
        for bound, n in zip(histogram._upper_bounds, counts):  # type: ignore[attr-defined]
            for _ in range(n):
                histogram.observe(bound)
        return
    for value, n in zip(buckets, counts):
        if n:
            value.inc(n)
    value_sum.inc(total)


def refresh_scrape_gauges(rooms: int | None, members: int | None,
                          store_memory: tuple[str, int, int] | None = None) -> None:
    """Set the figures that are read, not counted, just before an exposition (and fold
    this worker's pending per-message counts into their series). ``store_memory`` is
    (backend, bytes used, limit).

    ``None`` (the store could not be read) keeps the last values: a scrape must
    still answer while Redis is down, which is when operators look.
    """
    flush_all()
    if rooms is not None and members is not None:
        ROOMS.set(rooms)
        MEMBERS.set(members)
    if store_memory is not None:
        backend, used, limit = store_memory
        STORE_MEMORY.labels(backend).set(used)
        STORE_MEMORY_LIMIT.labels(backend).set(limit)
    UPTIME.set(time.time() - _STARTED_AT)


def sample_worker_gauges(outbound_bytes: int, inbound_bytes: int) -> None:
    """Called about once a second by every worker: its share of the live-summed gauges."""
    OUTBOUND.set(outbound_bytes)
    INBOUND.set(inbound_bytes)
    UPTIME.set(time.time() - _STARTED_AT)


def worker_restarted() -> None:
    """This worker replaces one that exited: the master re-forked it without the pod
    restarting, which Kubernetes' restart counts never show."""
    WORKER_RESTARTS.inc()


# -- /metrics/json ----------------------------------------------------------------------

class Snapshot:
    """One collection of the registry (every worker's samples), queried by name."""

    def __init__(self, registry: Any) -> None:
        self._samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in registry.collect():
            for sample in family.samples:
                self._samples.setdefault(sample.name, []).append((sample.labels, sample.value))

    def value(self, name: str) -> float:
        return sum(v for _, v in self._samples.get(name, ()))

    def by_label(self, name: str, label: str, nonzero: bool = False) -> dict[str, int]:
        out: dict[str, int] = {}
        for labels, value in self._samples.get(name, ()):
            key = labels.get(label, "")
            out[key] = out.get(key, 0) + int(value)
        return {k: v for k, v in sorted(out.items()) if v or not nonzero}

    def quantile(self, name: str, q: float, **match: str) -> float | None:
        """``histogram_quantile`` over all observations since start (linear in the bucket),
        of the series whose labels include ``match`` (their buckets summed)."""
        summed: dict[float, float] = {}
        for labels, value in self._samples.get(name + "_bucket", ()):
            if all(labels.get(k) == v for k, v in match.items()):
                bound = float(labels["le"])
                summed[bound] = summed.get(bound, 0.0) + value
        return histogram_quantile(q, sorted(summed.items()))


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """Prometheus' estimate from cumulative ``(upper_bound, count)`` buckets."""
    buckets = list(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound  # Prometheus answers the highest finite bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def server_summary(snapshot: Snapshot) -> dict[str, Any]:
    """What ``/metrics/json`` adds to the four core figures, for a person at a glance."""
    p50 = snapshot.quantile("wschat_fanout_seconds", 0.5)
    p99 = snapshot.quantile("wschat_fanout_seconds", 0.99)
    store = {backend: {"count": count,
                       "p50": _ms(snapshot.quantile("wschat_store_seconds", 0.5, backend=backend)),
                       "p99": _ms(snapshot.quantile("wschat_store_seconds", 0.99,
                                                    backend=backend))}
             for backend, count in snapshot.by_label("wschat_store_seconds_count",
                                                     "backend").items()}
    return {
        "workers": int(snapshot.value("wschat_workers")),
        "uptime_seconds": round(snapshot.value("wschat_uptime_seconds"), 1),
        "connections_opened": int(snapshot.value("wschat_connections_opened_total")),
        "messages": {
            "received": snapshot.by_label("wschat_messages_received_total", "type"),
            "posted": snapshot.by_label("wschat_messages_posted_total", "kind"),
            "delivered": snapshot.by_label("wschat_messages_delivered_total", "type"),
        },
        "rate_limited": int(snapshot.value("wschat_rate_limited_total")),
        "errors": snapshot.by_label("wschat_errors_total", "code", nonzero=True),
        "disconnects": snapshot.by_label("wschat_disconnects_total", "reason", nonzero=True),
        "handshakes_refused": snapshot.by_label("wschat_handshakes_refused_total", "reason",
                                                nonzero=True),
        "auth_failures": snapshot.by_label("wschat_auth_failures_total", "reason",
                                           nonzero=True),
        "store_errors": int(snapshot.value("wschat_store_errors_total")),
        "outbound_queued_bytes": int(snapshot.value("wschat_outbound_queued_bytes")),
        "inbound_buffered_bytes": int(snapshot.value("wschat_inbound_buffered_bytes")),
        "greenlets": int(snapshot.value("wschat_greenlets")),
        "fanout_ms_since_start": {
            "count": int(snapshot.value("wschat_fanout_seconds_count")),
            "p50": _ms(p50),
            "p99": _ms(p99),
        },
        "store_ms_since_start": store,
    }
