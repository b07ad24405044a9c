"""One WebSocket connection's I/O, after the handshake.

:class:`WebSocketConnection` drives its socket in a greenlet of its own, with
wsproto's frame parser:

* reading: that one greenlet reads, parses and dispatches (simple-websocket's
  reader greenlet is never started: :class:`NoReaderThread`);
* writing: ``send_frame`` tries one non-blocking ``send`` of the already-encoded
  frame; only what the kernel does not take is queued, and a flusher greenlet
  exists only while a queue does. A queue over ``MAX_OUTBOUND_BYTES`` closes
  the connection (4101 slow consumer), so one slow member never stalls a room
  and memory stays bounded.

:class:`EchoConnection` is the test-only ``/echo`` endpoint's variant.
"""

from __future__ import annotations

import enum
import io
import logging
import random
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import gevent
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage, CloseConnection, Ping, Pong, TextMessage,
)
from wsproto.utilities import LocalProtocolError

from .auth import Identity
from .chat import Chat
from .protocol import CloseCode
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


class Host(Protocol):
    """What a connection needs from the transport that serves it."""

    chat: Chat
    metrics: Metrics
    max_outbound_bytes: int
    max_message_bytes: int
    socket_send_buffer: int
    heartbeat_interval: float

    def spawn(self, func: Any, *args: Any) -> gevent.Greenlet: ...
    def spawn_later(self, seconds: float, func: Any, *args: Any) -> gevent.Greenlet: ...
    def forget(self, conn: WebSocketConnection) -> None: ...


class WebSocketConnection(Session):
    __slots__ = ("transport", "_sock", "_raw", "_ws", "_outbox", "_outbox_bytes",
                 "_flusher", "_close_timer", "_parts", "_part_size", "state", "last_seen",
                 "close_code", "close_reason", "_progress_at", "next_ping", "_frame_len",
                 "_read_after_close", "_paced", "_paced_counted")

    def __init__(self, transport: Host, sock: socket.socket, wsconn: Any,
                 conn_id: str, identity: Identity, authenticated: bool,
                 remote_addr: str) -> None:
        super().__init__(conn_id, identity, authenticated, remote_addr)
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
                    self.drop_slow_consumer()
                return
            self.write(frame)

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
            self.write(frame)

    @property
    def outbound_bytes(self) -> int:
        return self._outbox_bytes

    def write(self, data: bytes) -> None:
        """Write encoded frame bytes now, ahead of any paced frames (pings, control
        replies): one non-blocking send, the rest queued behind what already waits."""
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
            self.drop_slow_consumer()
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

    def drop_slow_consumer(self) -> None:
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
            self.write(self._ws.send(CloseConnection(code=int(code), reason=reason)))
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
        try:
            self._opened()
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
                if text is not None:
                    self._on_text(text)
            elif isinstance(event, BytesMessage):
                self._on_bytes(event)
            elif isinstance(event, Ping):
                if self._ws.state is ConnectionState.OPEN:
                    self.write(self._ws.send(event.response()))
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
            self.write(self._ws.send(event.response()))
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
            self._closed()
        finally:
            self.transport.forget(self)

    # -- what a connection is for: the chat (EchoConnection overrides these) ---------
    def _opened(self) -> None:
        try:
            self.transport.chat.open(self)
        except Unavailable as exc:
            # The store went away after admission checked it: 1013, retry.
            log.warning("connection %s not registered (%s); closing with 1013",
                        self.conn_id, exc)
            self.close(CloseCode.TRY_AGAIN_LATER, "temporarily unavailable; retry")

    def _on_text(self, text: str) -> None:
        self.transport.chat.receive(self, text)

    def _on_bytes(self, event: BytesMessage) -> None:
        self.close(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")

    def _closed(self) -> None:
        self.transport.chat.close(self)


class EchoConnection(WebSocketConnection):
    """Test-only (``WSCHAT_ECHO_ENDPOINT``, ``/echo``): every message comes back instead
    of going to the chat, so conformance suites measure this very frame handling."""

    __slots__ = ()

    def _opened(self) -> None:
        pass

    def _on_text(self, text: str) -> None:
        self.write(self._ws.send(TextMessage(data=text)))

    def _on_bytes(self, event: BytesMessage) -> None:
        data = self._assemble(event)
        if data is not None:
            self.write(self._ws.send(BytesMessage(data=data)))

    def _closed(self) -> None:
        pass


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
