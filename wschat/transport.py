"""The WebSocket edge: admission before the upgrade, then one connection's I/O.

flask-sock registers ``/ws`` and performs the RFC 6455 handshake (through
simple-websocket and wsproto). Then :meth:`Transport.serve` takes the socket
over (a duplicate of its descriptor) and lets the request finish, which frees
Flask's request context, the WSGI environ, gunicorn's request objects and the
deep request stack: about half of an idle connection's memory. From then on
:class:`WebSocketConnection` drives the socket in a greenlet of its own, with
wsproto's frame parser:

* reading: that one greenlet reads, parses and dispatches (simple-websocket's
  reader greenlet is never started);
* writing: ``send_frame`` tries one non-blocking ``send`` of the already-encoded
  frame; only what the kernel does not take is queued, and a flusher greenlet
  exists only while a queue does. A queue over ``MAX_OUTBOUND_BYTES`` closes
  the connection (4101 slow consumer), so one slow member never stalls a room
  and memory stays bounded;
* one timer greenlet per worker sends heartbeats, closes silent peers
  and drives the chat core's timers.
"""

from __future__ import annotations

import enum
import io
import itertools
import logging
import random
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage, CloseConnection, Ping, Pong, TextMessage,
)
from wsproto.utilities import LocalProtocolError

from .auth import Identity
from .chat import Chat
from .protocol import PING_FRAME, CloseCode
from .session import Session
from .stores.base import Unavailable
from .telemetry import Metrics

log = logging.getLogger("wschat.transport")

RECV_BYTES = 65536
PACE_BYTES = 65536  # paced frames go to the socket while less than this is queued for it
CLOSE_HANDSHAKE_TIMEOUT = 3.0  # after our close frame, wait this long for the peer's
# ... and read at most this much meanwhile (enough for the peer's close frame): a
# peer that keeps streaming (a flood cut off with 4102 or 1009) is no longer read,
# so its sends stall, until the close wait ends. (Not reset at once: a reset can
# destroy our close frame in the peer's receive buffer, and with it the reason.)
READ_AFTER_CLOSE_BYTES = 65536
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
# Each fragment of a message but the last counts at least this many bytes against
# MAX_MESSAGE_BYTES, so a message has at most MAX_MESSAGE_BYTES / 64 fragments (1024
# by default) and a stream of empty continuation frames is cut off like an
# oversized message.
MIN_FRAGMENT_CHARGE = 64


class ConnState(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"  # our close frame is queued or sent; waiting for the peer's
    CLOSED = "closed"


class NoReaderThread:
    """Given to simple-websocket as ``thread_class``: we read in the handler greenlet."""

    name = "wschat-no-reader"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def start(self) -> None:
        pass


class WebSocketConnection(Session):
    __slots__ = ("transport", "_sock", "_raw", "_ws", "_outbox", "_outbox_bytes",
                 "_flusher", "_close_timer", "_parts", "_part_size", "state", "last_seen",
                 "close_code", "close_reason", "echo", "_progress_at", "next_ping", "_frame_len",
                 "_read_after_close", "_paced", "_paced_counted")

    def __init__(self, transport: Transport, sock: socket.socket, wsconn: Any,
                 conn_id: str, identity: Identity, authenticated: bool,
                 remote_addr: str, echo: bool = False) -> None:
        super().__init__(conn_id, identity, authenticated, remote_addr)
        # Test-only (WSCHAT_ECHO_ENDPOINT): echo every message back instead of
        # chatting, so conformance suites measure this very frame handling.
        self.echo = echo
        self.transport = transport
        self._sock = sock
        # gevent's socket wraps a non-blocking OS socket: writing to it directly
        # never yields, which is what fan-out wants.
        self._raw = getattr(sock, "_sock", sock)
        if transport.socket_send_buffer:
            # Linux autotunes a send buffer up to 4 MiB: that much kernel memory per
            # client that stops reading, on top of MAX_OUTBOUND_BYTES. A fixed
            # buffer disables the autotuning and keeps the whole backlog bounded.
            try:
                self._raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                     transport.socket_send_buffer)
            except OSError:
                pass
        self._ws = wsconn
        self._outbox: deque[bytes | memoryview] = deque()
        self._outbox_bytes = 0
        self._flusher: gevent.Greenlet | None = None
        self._close_timer: gevent.Greenlet | None = None
        self._progress_at = 0.0  # when the backlog last started or moved
        # Frames written as the client reads (send_paced), and whatever is sent after
        # them meanwhile, in order; only the latter count towards MAX_OUTBOUND_BYTES.
        self._paced: deque[tuple[bytes, bool] | Callable[[], None]] = deque()
        self._paced_counted = 0
        # The message being received: its fragments (a buffer once there are several,
        # so memory follows its bytes, not how finely it was cut) and their charge.
        self._parts: Any = None
        self._part_size = 0
        self._frame_len = 0  # bytes of the current frame so far
        self._read_after_close = 0
        self.state = ConnState.OPEN
        self.last_seen = time.monotonic()
        # Each connection's pings keep their own phase, spread over the interval:
        # 10,000 pings (and 10,000 pongs) at once stalled delivery for ~200 ms.
        self.next_ping = self.last_seen + random.random() * transport.heartbeat_interval
        self.close_code: int | None = None
        self.close_reason = ""

    # -- writing -----------------------------------------------------------------------
    def send_frame(self, frame: bytes) -> None:
        if self.state is ConnState.OPEN:
            if self._paced:  # behind a paced replay: wait, and count
                self._paced.append((frame, True))
                self._paced_counted += len(frame)
                if self._outbox_bytes + self._paced_counted > self.transport.max_outbound_bytes:
                    self._drop_slow_consumer()
                return
            self._write(frame)

    def send_paced(self, frames: list[bytes], on_sent: Callable[[], None] | None = None
                   ) -> None:
        """Write ``frames`` as the client reads them (a replay, kept DMs): a few at a time,
        the next once the kernel took the previous, so they never count as a slow
        consumer's backlog; a client that stops reading is still dropped when its
        backlog has not moved for two heartbeat intervals. ``on_sent`` runs (in a
        greenlet of its own) once every frame has been handed to the kernel; never if
        the connection ends first."""
        if self.state is not ConnState.OPEN:
            return
        self._paced.extend((frame, False) for frame in frames)
        if on_sent is not None:
            self._paced.append(lambda: self.transport.spawn(on_sent))
        self._pump()

    def _pump(self) -> None:
        """Move paced frames to the socket while little is queued for it."""
        paced = self._paced
        low_water = min(PACE_BYTES, self.transport.max_outbound_bytes // 4)
        while paced and self.state is ConnState.OPEN and self._outbox_bytes < low_water:
            item = paced[0]
            if callable(item):
                if self._outbox:
                    return  # runs once what precedes it has left
                paced.popleft()
                item()
                continue
            paced.popleft()
            frame, counted = item
            if counted:
                self._paced_counted -= len(frame)
            self._write(frame)

    @property
    def outbound_bytes(self) -> int:
        return self._outbox_bytes

    def _write(self, data: bytes) -> None:
        if self._outbox:  # keep order behind what already waits
            self._queue(data)
            return
        try:
            sent = self._raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.abort("write failed")
            return
        if sent < len(data):
            self._queue(memoryview(data)[sent:])

    def _queue(self, data: bytes | memoryview) -> None:
        if not self._outbox:
            self._progress_at = time.monotonic()
        self._outbox.append(data)
        self._outbox_bytes += len(data)
        # One frame alone never counts as a backlog: a large reply the client asked
        # for (a full history) may exceed the limit while the client reads fine.
        if (self._outbox_bytes > self.transport.max_outbound_bytes
                and len(self._outbox) > 1 and self.state is ConnState.OPEN):
            self._drop_slow_consumer()
        if self._flusher is None and self.state is not ConnState.CLOSED:
            self._flusher = self.transport.spawn(self._flush)

    def _flush(self) -> None:
        try:
            while self._outbox and self.state is not ConnState.CLOSED:
                chunk = self._outbox[0]
                sent = self._sock.send(chunk)  # cooperative: waits until writable
                self._outbox_bytes -= sent
                self._progress_at = time.monotonic()
                if sent >= len(chunk):
                    self._outbox.popleft()
                else:
                    self._outbox[0] = memoryview(chunk)[sent:]
                if not self._outbox:
                    self._outbox_bytes = 0
                if self._paced:
                    self._pump()
        except OSError:
            self.abort("write failed")
        finally:
            self._flusher = None

    def stalled_for(self, now: float) -> float:
        """Seconds the outbound backlog has not moved (0 without a backlog)."""
        return now - self._progress_at if self._outbox else 0.0

    def _drop_slow_consumer(self) -> None:
        """Backlog over the limit (or stuck): drop it and say why.

        The head stays: it may be half written (or in the flusher's hands), and
        a close frame after half a frame would corrupt the stream. Every other
        entry is a whole frame, so the close frame follows a frame boundary.
        The close timer aborts the socket if even that cannot be written.
        """
        self.transport.metrics.disconnected("slow_consumer")
        self._paced.clear()
        self._paced_counted = 0
        if not self._outbox:
            self._begin_close(CloseCode.SLOW_CONSUMER, "slow consumer", timeout=1.0)
            return
        head = self._outbox[0]
        self._outbox.clear()
        self._outbox.append(head)
        self._outbox_bytes = len(head)
        self._begin_close(CloseCode.SLOW_CONSUMER, "slow consumer", timeout=1.0)

    # -- closing -----------------------------------------------------------------------
    def close(self, code: CloseCode, reason: str = "",
              timeout: float = CLOSE_HANDSHAKE_TIMEOUT) -> None:
        """Start the close handshake; the socket goes when the peer answers or ``timeout``."""
        if self.state is ConnState.OPEN:
            self._begin_close(code, reason, timeout)

    def _begin_close(self, code: int, reason: str, timeout: float) -> None:
        self.state = ConnState.CLOSING
        self.close_code, self.close_reason = int(code), reason
        try:
            self._write(self._ws.send(CloseConnection(code=int(code), reason=reason)))
        except LocalProtocolError:
            pass
        self._close_timer = self.transport.spawn_later(timeout, self.abort, "close timeout")

    def abort(self, reason: str = "aborted") -> None:
        """Drop the TCP connection now; the reader greenlet wakes up and cleans up."""
        if self.state is ConnState.CLOSED:
            return
        if self.close_code is None:
            self.close_code, self.close_reason = 1006, reason
        self.state = ConnState.CLOSED
        try:
            # Close with a reset: otherwise the kernel keeps an orphaned socket
            # (FIN-WAIT-1) holding the send buffer for as long as a peer that does
            # not read keeps its window shut, which is minutes.
            self._raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- reading (runs in the request's greenlet) --------------------------------------
    def run(self) -> None:
        chat = self.transport.chat
        try:
            if not self.echo:
                try:
                    chat.open(self)
                except Unavailable as exc:
                    # The store went away after admission checked it: 1013, retry.
                    log.warning("connection %s not registered (%s); closing with 1013",
                                self.conn_id, exc)
                    self.close(CloseCode.TRY_AGAIN_LATER, "temporarily unavailable; retry")
            # Frames that came in the same TCP segments as the upgrade request
            # (fed to the parser by feed_pipelined) are handled before any wait.
            if not self._handle_events():
                return
            while self.state is not ConnState.CLOSED:
                data = self._sock.recv(RECV_BYTES)
                if not data:
                    break
                self.last_seen = time.monotonic()
                if self.state is ConnState.CLOSING:
                    self._read_after_close += len(data)
                    if self._read_after_close > READ_AFTER_CLOSE_BYTES:
                        if self._close_timer is not None:
                            self._close_timer.join()  # it drops the connection
                        break
                self._ws.receive_data(data)
                if not self._handle_events():
                    break
                # recv() does not yield while data is waiting: without this, a
                # client that never stops sending would starve every other
                # connection and the heartbeat of this worker.
                gevent.sleep(0)
        except (OSError, LocalProtocolError):
            pass
        except gevent.GreenletExit:
            raise
        except Exception:
            log.exception("connection %s failed", self.conn_id)
            self.close_code, self.close_reason = int(CloseCode.INTERNAL_ERROR), "internal error"
        finally:
            self._finish()

    def _handle_events(self) -> bool:
        """Process parsed events; False when the connection is done."""
        for event in self._ws.events():
            if isinstance(event, TextMessage):
                text = self._assemble(event)
                if text is None:
                    continue
                if self.echo:
                    self._write(self._ws.send(TextMessage(data=text)))
                else:
                    self.transport.chat.receive(self, text)
            elif isinstance(event, BytesMessage):
                if not self.echo:
                    self.close(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")
                    continue
                data = self._assemble(event)
                if data is not None:
                    self._write(self._ws.send(BytesMessage(data=data)))
            elif isinstance(event, Ping):
                if self._ws.state is ConnectionState.OPEN:
                    self._write(self._ws.send(event.response()))
            elif isinstance(event, Pong):
                pass
            elif isinstance(event, CloseConnection):
                return self._on_close_event(event)
        return True

    def _assemble(self, event: TextMessage | BytesMessage) -> Any:
        """Add a fragment; the whole message once it is complete, else None.

        The size is checked as fragments arrive, so a peer never makes us hold
        more than ``MAX_MESSAGE_BYTES`` (plus one read) of a message; each
        fragment but the last is charged at least ``MIN_FRAGMENT_CHARGE`` bytes,
        which bounds the number of fragments too.
        """
        if self.state is not ConnState.OPEN:
            return None
        limit = self.transport.max_message_bytes
        data = event.data
        self._part_size += len(data)
        self._frame_len += len(data)
        if event.frame_finished:
            if not event.message_finished:  # a fragment: at least the minimum
                self._part_size += max(0, MIN_FRAGMENT_CHARGE - self._frame_len)
            self._frame_len = 0
        if self._part_size > limit:  # for text: characters <= bytes, surely too big
            self._too_big()
            return None
        if self._parts is None:
            if event.message_finished:  # the common case: one frame, one piece
                self._part_size = 0
                whole = data
            else:
                self._parts = io.StringIO() if isinstance(data, str) else io.BytesIO()
                self._parts.write(data)
                return None
        else:
            self._parts.write(data)
            if not event.message_finished:
                return None
            whole, self._parts, self._part_size = self._parts.getvalue(), None, 0
        if isinstance(event, BytesMessage):
            return bytes(whole)
        text = whole
        if len(text) * 4 > limit and len(text.encode()) > limit:
            self._too_big()
            return None
        return text

    def _too_big(self) -> None:
        self._parts, self._part_size, self._frame_len = None, 0, 0
        self.close(CloseCode.MESSAGE_TOO_BIG, "message too big")

    def _on_close_event(self, event: CloseConnection) -> bool:
        state = self._ws.state
        if state is ConnectionState.REMOTE_CLOSING:  # the peer closes: echo its code
            if self.close_code is None:
                self.close_code, self.close_reason = event.code, event.reason or "peer closed"
            self.state = ConnState.CLOSING
            self._write(self._ws.send(event.response()))
            return False
        if state is ConnectionState.CLOSED:  # the peer answered our close
            return False
        # Still OPEN: wsproto could not parse the peer's bytes (bad UTF-8 -> 1007,
        # unmasked or malformed frame -> 1002, ...): close with that code.
        self.close(event.code, event.reason or "protocol error")
        return False

    def _finish(self) -> None:
        if self._close_timer is not None:
            self._close_timer.kill(block=False)
        if self.state is not ConnState.CLOSED and self._flusher is not None:
            self._flusher.join(timeout=1.0)  # let the close frame out
        self.state = ConnState.CLOSED
        if self._flusher is not None:
            self._flusher.kill(block=False)
        try:
            self._sock.close()
        except OSError:
            pass
        try:
            if not self.echo:
                self.transport.chat.close(self)
        finally:
            self.transport.forget(self)


class Transport:
    """This worker's WebSocket connections: admission, registry, heartbeat, shutdown."""

    def __init__(self, chat: Chat, metrics: Metrics, budget: ConnectionBudget) -> None:
        settings = chat.settings
        self.chat = chat
        self.metrics = metrics
        self.budget = budget
        self.max_outbound_bytes = settings.max_outbound_bytes
        self.socket_send_buffer = settings.socket_send_buffer
        self.max_message_bytes = settings.max_message_bytes
        self.heartbeat_interval = settings.heartbeat_interval
        self.connections: set[WebSocketConnection] = set()
        self.max_per_ip = settings.max_connections_per_ip
        self.per_ip: dict[str, int] = {}  # this worker's connections (and admissions) per address
        self.node_id = chat.stores.node_id  # the same id as its node in Redis
        self._conn_seq = itertools.count(1)
        self.shutting_down = False
        self._ticker: gevent.Greenlet | None = None

    def new_conn_id(self) -> str:
        return f"{self.node_id}:{next(self._conn_seq)}"

    def serve(self, ws: Any, identity: Identity, authenticated: bool, remote_addr: str,
              echo: bool = False) -> WebSocketConnection:
        """Take over one accepted WebSocket (from flask-sock) and serve it in a new greenlet.

        The request greenlet returns at once; gunicorn then closes its copy of the
        descriptor, while ours keeps the connection open.
        """
        self.start()
        sock = ws.sock.dup()
        ws.connected = False  # flask-sock must not write a close frame
        conn = WebSocketConnection(self, sock, ws.ws.connection, self.new_conn_id(), identity,
                                   authenticated, remote_addr, echo)
        self.connections.add(conn)
        self.metrics.connection_opened()
        log.info("open conn=%s user=%s addr=%s", conn.conn_id, conn.user_id, remote_addr,
                 extra={"event": "open", "conn": conn.conn_id, "user": conn.user_id,
                        "addr": remote_addr})
        self.spawn(conn.run)
        return conn

    def forget(self, conn: WebSocketConnection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.budget.release()
            self.release_address(conn.remote_addr)
            self.metrics.connection_closed()
            duration = time.monotonic() - conn.opened_at
            log.info("close conn=%s user=%s code=%s reason=%s duration=%.1fs", conn.conn_id,
                     conn.user_id, conn.close_code, conn.close_reason, duration,
                     extra={"event": "close", "conn": conn.conn_id, "user": conn.user_id,
                            "code": conn.close_code, "reason": conn.close_reason,
                            "duration_s": round(duration, 3)})

    def claim_address(self, addr: str) -> bool:
        """Count one more connection from ``addr``; False (nothing counted) at
        ``MAX_CONNECTIONS_PER_IP``. Released by :meth:`forget` (or
        :meth:`release_address` when the handshake fails before :meth:`serve`)."""
        held = self.per_ip.get(addr, 0)
        if self.max_per_ip and held >= self.max_per_ip:
            return False
        self.per_ip[addr] = held + 1
        return True

    def release_address(self, addr: str) -> None:
        held = self.per_ip.get(addr, 0)
        if held <= 1:
            self.per_ip.pop(addr, None)
        else:
            self.per_ip[addr] = held - 1

    # -- the per-worker timer ----------------------------------------------------------
    def start(self) -> None:
        if self._ticker is None:
            self._ticker = self.spawn(self._tick_forever)

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
        while True:
            gevent.sleep(step)
            try:
                self.chat.tick()
                self.heartbeat(time.monotonic())
            except Exception:
                log.exception("timer failed")

    def heartbeat(self, now: float) -> None:
        """Close peers silent for two intervals and backlogs stuck as long; ping the
        connections whose turn it is (each once per interval, phases spread out).

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
                conn.close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout", close_wait)
            elif conn.stalled_for(now) > limit:
                # It talks but has not read a byte for two intervals: a stuck
                # flusher must not hold the connection and its backlog forever.
                conn._drop_slow_consumer()
            elif now >= conn.next_ping:
                conn.next_ping = now + self.heartbeat_interval
                conn._write(PING_FRAME)

    # -- shutdown ----------------------------------------------------------------------
    def shutdown(self, timeout: float) -> None:
        """Close every connection with 1001 and wait (bounded) until they are gone."""
        self.shutting_down = True
        try:
            self.chat.shutdown()
        except Exception:
            log.exception("releasing this worker's connections from the store failed")
        for conn in list(self.connections):
            conn.close(CloseCode.GOING_AWAY, "server shutting down")
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            gevent.sleep(0.05)
        for conn in list(self.connections):
            conn.abort("shutdown")


class ConnectionBudget:
    """``MAX_CONNECTIONS`` for the whole server: one counter slot per gunicorn worker.

    The slots live in shared memory the gunicorn master creates before forking
    (see ``gunicorn.conf.py``); without gunicorn, a local counter is used.
    Admission reads the sum without a lock, so concurrent workers may overshoot
    the limit by at most (workers - 1) connections.
    """

    def __init__(self, limit: int, slots: Any = None, slot: int = 0) -> None:
        self.limit = limit
        self._slots = slots if slots is not None else [0]
        self._slot = slot if slots is not None else 0

    def attach(self, slots: Any, slot: int) -> None:
        local = self._slots[self._slot]
        self._slots, self._slot = slots, slot
        self._slots[slot] = local

    def try_acquire(self) -> bool:
        if sum(self._slots) >= self.limit:
            return False
        self._slots[self._slot] += 1
        return True

    def release(self) -> None:
        self._slots[self._slot] = max(0, self._slots[self._slot] - 1)



def feed_pipelined(ws: Any, environ: dict[str, Any]) -> None:
    """Hand frames the client sent right behind its upgrade request (in the same TCP
    segment) to the WebSocket parser: gunicorn read them along with the request
    and keeps them in its read-ahead buffer, where nobody would ever look again."""
    reader = getattr(environ.get("wsgi.input"), "reader", None)
    take_buffered = getattr(getattr(reader, "unreader", None), "take_buffered", None)
    if take_buffered is None:
        return
    data = take_buffered()
    if data:
        ws.ws.receive_data(data)


def remote_address(environ: dict[str, Any], trusted_proxies: int = 0) -> str:
    """The client's address: the peer, or with ``trusted_proxies`` N > 0 the address the
    Nth proxy from us recorded in ``X-Forwarded-For`` (entries further left are the
    client's own claims and are never trusted)."""
    peer = str(environ.get("REMOTE_ADDR") or "")
    if trusted_proxies <= 0:
        return peer
    hops = [h.strip() for h in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
    # Fewer entries than proxies: the request did not come through them all (or the
    # header is the client's own invention): only the TCP peer is known for sure.
    return hops[-trusted_proxies] if len(hops) >= trusted_proxies else peer

