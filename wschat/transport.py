"""The WebSocket edge: this worker's connections, their heartbeat, and shutdown.

flask-sock registers ``/ws`` and performs the RFC 6455 handshake (through
simple-websocket and wsproto), after the admission checks
(:mod:`wschat.admission`). Then :meth:`Transport.serve` takes the socket over
(a duplicate of its descriptor) and lets the request finish, which frees
Flask's request context, the WSGI environ, gunicorn's request objects,
simple-websocket's and wsproto's objects and the deep request stack. From then
on a :class:`~wschat.connection.WebSocketConnection` drives the socket: parked
as a read watcher while idle, served by a pooled greenlet while it has bytes to
handle. One timer greenlet per worker sends heartbeats, closes silent peers and
drives the chat core's timers.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import gevent
import gevent.pool

from .admission import AddressLimit, ConnectionBudget, remote_address
from .auth import Identity
from .chat import Chat
from .connection import CLOSE_HANDSHAKE_TIMEOUT, ConnState, EchoConnection, WebSocketConnection
from .logs import flush_client_lines
from .protocol import PING_FRAME, CloseCode
from .telemetry import Metrics

__all__ = ["Transport", "remote_address"]  # remote_address: its old home

log = logging.getLogger("wschat.transport")

# While presence changes are held or typing indicators are on, the timer releases
# the one and expires the other this often (seconds).
PRESENCE_STEP = 0.05


# Connections a recovery (Chat.resync) registers again at once: enough for each round
# trip to carry dozens of them in one pipeline, few enough not to flood Redis.
RECOVERY_CONCURRENCY = 64


def each_in_greenlets(limit: int) -> Callable[[Callable[[Any], None], Iterable[Any]], None]:
    """Chat.each_concurrently for gevent: at most ``limit`` greenlets at once. After the
    first failure no more start, those under way finish (none is cut off in the middle of
    its round trips), and it is raised in the caller (a recovery is then made again)."""
    def run(step: Callable[[Any], None], items: Iterable[Any]) -> None:
        pool = gevent.pool.Pool(limit)
        failures: list[Exception] = []

        def guarded(item: Any) -> None:
            try:
                step(item)
            except Exception as exc:
                failures.append(exc)

        try:
            for item in items:
                if failures:
                    break
                pool.spawn(guarded, item)  # waits for a free slot
            pool.join()
        finally:
            pool.kill()  # the caller itself was stopped (a worker's shutdown)
        if failures:
            raise failures[0]
    return run


class Transport:
    """This worker's WebSocket connections: registry, heartbeat, shutdown."""

    def __init__(self, chat: Chat, metrics: Metrics, budget: ConnectionBudget) -> None:
        settings = chat.settings
        self.chat = chat
        chat.each_concurrently = each_in_greenlets(RECOVERY_CONCURRENCY)
        self.metrics = metrics
        self.budget = budget
        self.max_outbound_bytes = settings.max_outbound_bytes
        self.socket_send_buffer = settings.socket_send_buffer
        self.max_message_bytes = settings.max_message_bytes
        # Bytes this worker's unfinished incoming messages hold, and their budget.
        self.max_inbound_buffer_bytes = settings.max_inbound_buffer_bytes
        self.inbound_held = 0
        self.heartbeat_interval = settings.heartbeat_interval
        self.connections: set[WebSocketConnection] = set()
        self.addresses = AddressLimit(settings.max_connections_per_ip)
        self.node_id = chat.stores.node_id  # the same id as its node in Redis
        self._conn_seq = itertools.count(1)
        self.shutting_down = False
        self._ticker: gevent.Greenlet | None = None

    def new_conn_id(self) -> str:
        return f"{self.node_id}:{next(self._conn_seq)}"

    def serve(self, ws: Any, identity: Identity, authenticated: bool, remote_addr: str,
              conn_id: str, echo: bool = False) -> WebSocketConnection:
        """Take over one accepted WebSocket (from flask-sock) and serve it.

        The request greenlet returns at once; gunicorn then closes its copy of the
        descriptor, while ours keeps the connection open. Nothing of the request
        (``ws`` included) is kept: only the socket and the bytes already read
        behind the upgrade request (``feed_pipelined``).
        """
        self.start()
        sock = ws.sock.dup()
        kind = EchoConnection if echo else WebSocketConnection
        try:
            conn = kind(self, sock, conn_id, identity, authenticated, remote_addr,
                        getattr(ws, "wschat_pending", b""))
        except BaseException:
            sock.close()
            raise
        ws.connected = False  # ours now: flask-sock must not write a close frame
        self.connections.add(conn)
        self.metrics.connection_opened()
        log.info("open conn=%s user=%s addr=%s", conn.conn_id, conn.user_id, remote_addr,
                 extra={"event": "open", "conn": conn.conn_id, "user": conn.user_id,
                        "addr": remote_addr})
        conn.start()
        return conn

    def forget(self, conn: WebSocketConnection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.budget.release()
            self.addresses.release(conn.remote_addr)
            self.metrics.connection_closed()
            duration = time.monotonic() - conn.opened_at
            log.info("close conn=%s user=%s code=%s reason=%s duration=%.1fs", conn.conn_id,
                     conn.user_id, conn.close_code, conn.close_reason, duration,
                     extra={"event": "close", "conn": conn.conn_id, "user": conn.user_id,
                            "code": conn.close_code, "reason": conn.close_reason,
                            "duration_s": round(duration, 3)})

    # -- the per-worker timer ----------------------------------------------------------
    def start(self) -> None:
        if self._ticker is None:
            self._ticker = self.spawn(self._tick_forever)

    def stop(self) -> None:
        """Stop the timer (after :meth:`shutdown` and the stores' close: nothing is left)."""
        if self._ticker is not None:
            self._ticker.kill(block=False)
            self._ticker = None

    def spawn(self, func: Any, *args: Any) -> gevent.Greenlet:
        """A helper greenlet, counted in ``wschat_greenlets`` until it ends (or is killed)."""
        return self._counted(gevent.spawn(func, *args))

    def spawn_later(self, seconds: float, func: Any, *args: Any) -> gevent.Greenlet:
        return self._counted(gevent.spawn_later(seconds, func, *args))

    def _counted(self, greenlet: gevent.Greenlet) -> gevent.Greenlet:
        self.metrics.greenlets(1)
        # rawlink also fires for a greenlet killed before it ever ran.
        greenlet.rawlink(self._greenlet_ended)
        return greenlet

    def _greenlet_ended(self, greenlet: gevent.Greenlet) -> None:
        self.metrics.greenlets(-1)

    def _tick_forever(self) -> None:
        # Silence is checked every step, so a dead peer goes within two
        # intervals plus one step, not up to three intervals.
        step = min(1.0, self.heartbeat_interval / 4, self.chat.settings.typing_timeout / 4)
        next_tick = time.monotonic() + step
        while True:
            wait = next_tick - time.monotonic()
            if self.chat.presence_held or self.chat.typing_pending:
                # Held presence goes out as its buckets refill, a little every
                # PRESENCE_STEP: a room's second's worth at once (20 changes, each to
                # every member) held the worker for ~70 ms in a room of 1,000. Typing
                # indicators expire as they come due, in bounded steps, for the same
                # reason (40 a second in a room of 1,000: ~100 ms at once).
                wait = min(wait, PRESENCE_STEP)
            gevent.sleep(max(0.0, wait))
            now = time.monotonic()
            if now < next_tick:
                try:
                    self.chat.release_presence()
                    self.chat.expire_typing()
                except Exception:
                    log.exception("timer failed")
                continue
            next_tick = now + step
            try:
                self.chat.tick()
            except Exception:
                log.exception("timer failed")
            try:  # a flood of bad requests that stopped: the count of its last lines
                flush_client_lines()
            except Exception:
                log.exception("timer failed")
            try:  # whatever the chat core's duties did, peers are pinged and checked
                self.heartbeat(now)
            except Exception:
                log.exception("heartbeat failed")

    def heartbeat(self, now: float) -> None:
        """Close peers silent for two intervals, backlogs stuck as long and messages
        that take as long to arrive; ping the connections whose turn it is (each once
        per interval, phases spread out).

        One loop and one shared ping frame per worker, never a timer per connection.
        A silent peer is not waiting for our close frame: it gets at most one
        interval (3 s at most) to answer before the socket is dropped.
        """
        limit = 2 * self.heartbeat_interval
        close_wait = min(CLOSE_HANDSHAKE_TIMEOUT, self.heartbeat_interval)
        for conn in list(self.connections):
            if conn.state is not ConnState.OPEN:
                continue
            if now - conn.last_seen > limit:
                self.metrics.disconnected("heartbeat_timeout")
                conn.close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout", close_wait,
                           discard_backlog=True)
            elif conn.unfinished_since and now - conn.unfinished_since > limit:
                # Not silent (its bytes keep coming) but dribbling one message: without
                # this, a few bytes a minute held the message's buffer, and its share of
                # MAX_INBOUND_BUFFER_BYTES, for as long as the client liked.
                self.metrics.disconnected("slow_message")
                conn.close(CloseCode.TRY_AGAIN_LATER, "message too slow; retry")
            elif conn.stalled_for(now) > limit:
                # It talks but has not read a byte for two intervals: a stuck
                # flusher must not hold the connection and its backlog forever.
                conn.drop_slow_consumer()
            elif now >= conn.next_ping:
                conn.next_ping = now + self.heartbeat_interval
                conn.write_control(PING_FRAME)  # ahead of a backlog (RFC 6455 5.5)

    # -- shutdown ----------------------------------------------------------------------
    def shutdown(self, timeout: float) -> None:
        """Close every connection with 1001 and wait (bounded) until they are gone.

        ``timeout`` counts from here: a store slow to release the connections (a hung
        Redis, up to its socket timeout) shortens the wait for close handshakes rather
        than adding to it, so the worker is done before gunicorn's graceful timeout."""
        deadline = time.monotonic() + timeout
        self.shutting_down = True
        try:
            self.chat.shutdown()
        except Exception:
            log.exception("releasing this worker's connections from the store failed")
        for conn in list(self.connections):
            conn.close(CloseCode.GOING_AWAY, "server shutting down")
        while self.connections and time.monotonic() < deadline:
            gevent.sleep(0.05)
        for conn in list(self.connections):
            conn.abort("shutdown")
