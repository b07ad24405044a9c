"""One WebSocket connection's I/O, after the handshake.

:class:`WebSocketConnection` owns its socket once flask-sock has answered the
upgrade (the handshake is simple-websocket's and wsproto's; the frames after it
are parsed here: :func:`unmask` and :meth:`WebSocketConnection._receive`, strict
RFC 6455 for a server without extensions).

* reading: an idle connection holds no greenlet. It is *parked*: one libev read
  watcher and this object. When bytes arrive, a greenlet from a small pool of
  reusable ones (:func:`_dispatch`) reads until the socket would block, runs the
  handlers (blocking-style code: a Redis round trip just waits), and parks the
  connection again. A greenlet's saved stack and its frame-data chunk cost ~10 KB,
  which was two thirds of an idle connection's memory. What a message still
  arriving holds is charged to the worker's ``MAX_INBOUND_BUFFER_BYTES`` (over
  it: 1013), and the heartbeat closes one still arriving after two intervals;
* writing: ``send_frame`` tries one non-blocking ``send`` of the already-encoded
  frame; only what the kernel does not take is queued, and a flusher greenlet
  exists only while a queue does. A queue over ``MAX_OUTBOUND_BYTES`` closes
  the connection (4101 slow consumer), so one slow member never stalls a room
  and memory stays bounded. Queues are created when needed, not per connection.
  A close for 4100 or 4101 drops the queue but the frame being written; any
  close waits on while the peer still takes what precedes our close frame.

:class:`EchoConnection` is the test-only ``/echo`` endpoint's variant.
"""

from __future__ import annotations

import codecs
import enum
import fcntl
import io
import itertools
import logging
import random
import socket
import struct
import termios
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import gevent
from gevent.hub import get_hub
from greenlet import getcurrent, greenlet

from .auth import Identity
from .chat import Chat
from .protocol import CloseCode, text_frame
from .ratelimit import take
from .session import Session
from .stores.base import Unavailable
from .telemetry import Metrics

try:  # C: ~0.2 us for a chat message's mask, against ~2 us for the int trick below
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - websockets is a dependency; this is a fallback
    _apply_mask = None

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
# The ioctl that tells a TCP socket's bytes not yet acknowledged (Linux's SIOCOUTQ).
_OUTQ = getattr(termios, "TIOCOUTQ", None)
# Each fragment of a message but the last counts at least this many bytes against
# MAX_MESSAGE_BYTES, so a message has at most MAX_MESSAGE_BYTES / 64 fragments (1024
# by default) and a stream of empty continuation frames is cut off like an
# oversized message.
MIN_FRAGMENT_CHARGE = 64
# Reading greenlets kept for reuse between bursts (each keeps a stack and a 16 KiB
# frame-data chunk): enough for the connections busy at one moment in one worker.
IDLE_RUNNERS = 32
# A backlog goes out in sends of up to this much: the frames queued behind the head
# are joined (one syscall instead of one per frame; the kernel takes what fits).
COALESCE_BYTES = 65536

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA_OPS = (OP_CONT, OP_TEXT, OP_BINARY)
_CONTROL_OPS = (OP_CLOSE, OP_PING, OP_PONG)
# The first byte of our ping and pong frames (FIN set; we never fragment them).
_CONTROL_FIRST_BYTES = (0x80 | OP_PING, 0x80 | OP_PONG)
# Close codes a peer may send (RFC 6455 7.4.1 and the IANA registry; 3000-4999 are
# for libraries and applications). 1004-1006 and 1015 must never be on the wire.
_PEER_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012,
                               1013, 1014))
_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


def unmask(payload: bytes, mask: bytes) -> bytes:
    """A client frame's payload, unmasked (RFC 6455 5.3)."""
    if _apply_mask is not None:
        return _apply_mask(payload, mask)
    n = len(payload)
    key = (mask * ((n + 3) >> 2))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        n, "little")


def _frame_size(buf: bytes | bytearray) -> int | None:
    """The size of the frame ``buf`` starts with (header and payload), or None while
    its header is not all there."""
    if len(buf) < 2:
        return None
    length = buf[1] & 0x7F
    if length == 126:
        return 8 + int.from_bytes(buf[2:4], "big") if len(buf) >= 8 else None
    if length == 127:
        return 14 + int.from_bytes(buf[2:10], "big") if len(buf) >= 14 else None
    return 6 + length


def control_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A final, unmasked server frame with a payload under 126 bytes."""
    return bytes((0x80 | opcode, len(payload))) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; 1005 (no status received) is sent as an empty one."""
    if code == 1005:
        return control_frame(OP_CLOSE)
    return control_frame(OP_CLOSE, code.to_bytes(2, "big")
                         + reason.encode()[:123].decode("utf-8", "ignore").encode())


def binary_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x82, n)) + payload
    if n < 65536:
        return bytes((0x82, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x82, 127)) + n.to_bytes(8, "big") + payload


class ConnState(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"  # our close frame is queued or sent; waiting for the peer's
    CLOSED = "closed"


_OPEN, _CLOSING, _CLOSED = ConnState.OPEN, ConnState.CLOSING, ConnState.CLOSED


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
    max_inbound_buffer_bytes: int
    inbound_held: int  # what the connections' unfinished messages hold, all together
    socket_send_buffer: int
    heartbeat_interval: float

    def spawn(self, func: Any, *args: Any) -> gevent.Greenlet: ...
    def spawn_later(self, seconds: float, func: Any, *args: Any) -> gevent.Greenlet: ...
    def forget(self, conn: WebSocketConnection) -> None: ...


# -- the reading greenlets ------------------------------------------------------------
_idle_runners: list[greenlet] = []


def _dispatch(conn: WebSocketConnection) -> None:
    """In the hub (a read watcher's callback, or a loop callback): serve ``conn`` in an
    idle runner greenlet. The runner returns here when it parks (its connection's
    socket would block) or waits for something (then the hub carries on)."""
    watch = conn._watch
    if watch is not None:
        watch.stop()
    runner = _idle_runners.pop() if _idle_runners else greenlet(_runner, get_hub())
    runner.switch(conn)


def _runner(conn: Any) -> None:
    """A reading greenlet: serves one connection at a time, then waits in the pool.
    ``wschat_greenlets`` counts it while it serves (an idle pool is not work)."""
    hub = get_hub()
    me = getcurrent()
    while True:
        if isinstance(conn, WebSocketConnection):
            metrics = conn.transport.metrics
            metrics.greenlets(1)
            try:
                conn._serve()
            finally:
                metrics.greenlets(-1)
        conn = None
        if len(_idle_runners) >= IDLE_RUNNERS:
            return
        _idle_runners.append(me)
        conn = hub.switch()  # parked in the pool until _dispatch switches here


class WebSocketConnection(Session):
    __slots__ = ("transport", "_raw", "_watch", "_buf", "_skip", "_outbox", "_outbox_bytes",
                 "_flusher", "_wwatch", "_close_timer", "_parts", "_part_size", "_msg_op",
                 "_utf8", "_pcheck", "state", "last_seen", "close_code", "close_reason", "_progress_at",
                 "next_ping", "_read_after_close", "_paced", "_paced_counted", "_started",
                 "_control", "_held", "unfinished_since", "_head_started")

    def __init__(self, transport: Host, sock: socket.socket, conn_id: str,
                 identity: Identity, authenticated: bool, remote_addr: str,
                 pending: bytes = b"") -> None:
        """``sock``: the connected socket (a gevent or a plain one; only the OS-level
        socket object is kept); ``pending``: bytes read along with the upgrade request."""
        super().__init__(conn_id, identity, authenticated, remote_addr)
        self.transport = transport
        # The non-blocking OS socket: writing to it directly never yields, which is
        # what fan-out wants; reads wait on our own watcher, not on a greenlet.
        self._raw = getattr(sock, "_sock", sock)
        self._raw.setblocking(False)
        if transport.socket_send_buffer:
            # Linux autotunes a send buffer up to 4 MiB: that much kernel memory per
            # client that stops reading, on top of MAX_OUTBOUND_BYTES. A fixed
            # buffer disables the autotuning and keeps the whole backlog bounded.
            try:
                self._raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                     transport.socket_send_buffer)
            except OSError:
                pass
        self._watch: Any = None  # the read watcher, while the connection is parked
        # Bytes of an incomplete frame (a bytearray, grown in place), or b"". At first the
        # bytes read along with the upgrade request, handled before any read.
        self._buf: bytes | bytearray = pending
        self._skip = 0  # payload bytes still to discard (an oversized frame)
        # What waits for the kernel to take it (created on the first backlog): whole frames,
        # but for the first, which may be the rest of a frame partly written.
        self._outbox: deque[bytes | memoryview] | None = None
        self._head_started = False  # the first entry is such a rest
        self._outbox_bytes = 0
        self._flusher: gevent.Greenlet | None = None
        self._wwatch: Any = None  # the flusher's write watcher
        self._close_timer: gevent.Greenlet | None = None
        self._progress_at = 0.0  # when the backlog last started or moved
        # Frames written as the client reads (send_paced), and whatever is sent after
        # them meanwhile, in order; only the latter count towards MAX_OUTBOUND_BYTES.
        self._paced: deque[tuple[bytes, bool] | Callable[[], None]] | None = None
        self._paced_counted = 0
        # The message being received: its opcode, fragments (a buffer, so memory
        # follows its bytes, not how finely it was cut), their charge, and for text
        # the UTF-8 decoder (invalid text fails on the fragment that has it).
        self._msg_op = 0
        self._parts: Any = None
        self._part_size = 0
        self._utf8: Any = None
        self._pcheck: list[Any] | None = None  # [decoder, bytes checked] of a partial text frame
        # What the unfinished message holds (the incomplete frame and earlier fragments),
        # charged to the worker's MAX_INBOUND_BUFFER_BYTES.
        self._held = 0
        # When the message still arriving began (its first byte came), 0 without one: the
        # heartbeat closes a connection that takes longer than two intervals over one.
        self.unfinished_since = 0.0
        self._read_after_close = 0
        self._started = False
        self._control: tuple[float, float] | None = None  # pings' bucket, once one came
        self.state = _OPEN
        # The peer's last sign of life: bytes from it, or bytes of its backlog it took.
        self.last_seen = time.monotonic()
        # Each connection's pings keep their own phase, spread over the interval:
        # 10,000 pings (and 10,000 pongs) at once stalled delivery for ~200 ms.
        self.next_ping = self.last_seen + random.random() * transport.heartbeat_interval
        self.close_code: int | None = None
        self.close_reason = ""

    def start(self) -> None:
        """Greet the client and serve the connection (from any greenlet; returns at once)."""
        get_hub().loop.run_callback(_dispatch, self)

    # -- writing -----------------------------------------------------------------------
    def send_frame(self, frame: bytes) -> None:
        if self.state is not _OPEN:
            return
        if self._paced is not None:  # behind a paced replay: wait, and count
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
        if self.state is not _OPEN:
            return
        if self._paced is None:
            self._paced = deque()
        self._paced.extend((frame, False) for frame in frames)
        if on_sent is not None:
            self._paced.append(lambda: self.transport.spawn(on_sent))
        self._pump()

    def _pump(self) -> None:
        """Move paced frames to the socket while little is queued for it."""
        paced = self._paced
        low_water = min(PACE_BYTES, self.transport.max_outbound_bytes // 4)
        while paced and self.state is _OPEN and self._outbox_bytes < low_water:
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
        if not paced and self._paced is paced:
            self._paced = None

    @property
    def outbound_bytes(self) -> int:
        return self._outbox_bytes

    def write(self, data: bytes) -> None:
        """Write encoded frame bytes now, ahead of any paced frames (pings, control
        replies): one non-blocking send, the rest queued behind what already waits."""
        if self._outbox is not None:  # keep order behind what already waits
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
            self._head_started = sent > 0

    def write_control(self, frame: bytes) -> None:
        """Write a ping or a pong ahead of any backlog, at its first frame boundary:
        behind the entry being written (the head may be half sent; every entry after it
        is whole frames) and the control frames already put there, before the data
        frames. RFC 6455 5.5 lets control frames come between data frames, never inside
        one. A heartbeat then measures whether the peer reads, not how long the backlog
        takes (a slow but steady reader of up to MAX_OUTBOUND_BYTES answers in time),
        and the peer's own pings are answered as soon as it reads on."""
        if self.state is not _OPEN:
            return  # our close frame is queued or sent: nothing may follow it
        outbox = self._outbox
        if outbox is None:
            self.write(frame)  # no backlog: at once
            return
        at = 1
        while at < len(outbox) and outbox[at][0] in _CONTROL_FIRST_BYTES:
            at += 1
        outbox.insert(at, frame)
        self._outbox_bytes += len(frame)

    def _queue(self, data: bytes | memoryview) -> None:
        outbox = self._outbox
        if outbox is None:
            outbox = self._outbox = deque()
            self._progress_at = time.monotonic()
        outbox.append(data)
        self._outbox_bytes += len(data)
        # One frame alone never counts as a backlog: a large reply the client asked
        # for (a full history) may exceed the limit while the client reads fine.
        if (self._outbox_bytes > self.transport.max_outbound_bytes
                and len(outbox) > 1 and self.state is _OPEN):
            self.drop_slow_consumer()
        if self._flusher is None and self.state is not _CLOSED:
            self._flusher = self.transport.spawn(self._flush)

    def _flush(self) -> None:
        hub = get_hub()
        try:
            while self._outbox and self.state is not _CLOSED:
                outbox = self._outbox
                chunk = outbox[0]
                if len(outbox) > 1 and len(chunk) < COALESCE_BYTES:
                    # Joined for the send only: the queue keeps its frames, so a close
                    # can still follow the frame being written (drop_slow_consumer).
                    parts = [chunk]
                    size = len(chunk)
                    for part in itertools.islice(outbox, 1, None):
                        if size >= COALESCE_BYTES:
                            break
                        parts.append(part)
                        size += len(part)
                    chunk = b"".join(parts)
                try:
                    sent = self._raw.send(chunk)
                except BlockingIOError:
                    if self._wwatch is None:
                        self._wwatch = hub.loop.io(self._raw.fileno(), 2)
                    hub.wait(self._wwatch)  # until writable
                    continue
                self._outbox_bytes -= sent
                # The kernel took bytes it had no room for: the peer read (its ACKs made
                # the room). That is a sign of life for the heartbeat as a pong is: a
                # ping cannot go inside the frame being written, and a peer reading one
                # large frame (a full history) slowly was closed as silent mid-frame.
                self._progress_at = self.last_seen = time.monotonic()
                while outbox and sent >= len(outbox[0]):
                    sent -= len(outbox.popleft())
                    self._head_started = False
                if sent:
                    outbox[0] = memoryview(outbox[0])[sent:]
                    self._head_started = True
                if not outbox:
                    self._outbox_bytes = 0
                    self._outbox = None
                if self._paced:
                    self._pump()
        except OSError:
            self.abort("write failed")
        finally:
            self._flusher = None
            if self._wwatch is not None:
                self._wwatch.close()
                self._wwatch = None
            if not self._outbox:
                self._outbox = None

    def stalled_for(self, now: float) -> float:
        """Seconds the outbound backlog has not moved (0 without a backlog)."""
        return now - self._progress_at if self._outbox else 0.0

    def drop_slow_consumer(self) -> None:
        """Backlog over the limit (or stuck): drop it and say why, right after the frame
        being written. Counted once: a connection already closing is left as it is."""
        if self.state is not _OPEN:
            return
        self.transport.metrics.disconnected("slow_consumer")
        self._begin_close(CloseCode.SLOW_CONSUMER, "slow consumer", 1.0, discard_backlog=True)

    def _discard_backlog(self) -> None:
        """Drop every frame not yet begun, paced ones too. The rest of a frame partly
        written stays: a close frame after half a frame would corrupt the stream."""
        self._paced = None
        self._paced_counted = 0
        outbox = self._outbox
        if outbox:
            head = outbox[0]
            outbox.clear()
            if self._head_started:
                outbox.append(head)
            self._outbox_bytes = len(outbox[0]) if outbox else 0

    # -- closing -----------------------------------------------------------------------
    def close(self, code: CloseCode, reason: str = "",
              timeout: float = CLOSE_HANDSHAKE_TIMEOUT, discard_backlog: bool = False
              ) -> None:
        """Start the close handshake; the socket goes when the peer answers or ``timeout``
        (longer while the peer still reads what precedes our close frame: _close_wait).

        ``discard_backlog``: the close frame goes right after the frame being written,
        not behind the whole backlog (a peer that does not read it, 4100 and 4101); every
        other close (1001 at shutdown above all) delivers what was queued first."""
        if self.state is _OPEN:
            self._begin_close(code, reason, timeout, discard_backlog)

    def _begin_close(self, code: int, reason: str, timeout: float,
                     discard_backlog: bool = False) -> None:
        self.state = _CLOSING
        self.close_code, self.close_reason = int(code), reason
        if discard_backlog:
            self._discard_backlog()
        self.write(close_frame(int(code), reason))
        self._close_timer = self.transport.spawn(self._close_wait, timeout)

    def _close_wait(self, timeout: float) -> None:
        """Wait ``timeout`` for the peer's close frame, then drop the connection. But while
        the peer takes what precedes our close frame (our queue and the kernel's shrink),
        wait on, until CLOSE_HANDSHAKE_TIMEOUT after the last time some was left, up to two
        heartbeat intervals in all: a slow reader still gets the close frame and its code,
        which a reset would destroy unread. A peer that takes nothing goes after
        ``timeout``, as before."""
        now = time.monotonic()
        deadline = now + timeout
        until = now + max(timeout, 2 * self.transport.heartbeat_interval)
        unsent = self._unsent()
        while now < deadline:
            gevent.sleep(min(timeout / 4, deadline - now))
            now = time.monotonic()
            left = self._unsent()
            if 0 < left < unsent:
                deadline = min(until, max(deadline, now + CLOSE_HANDSHAKE_TIMEOUT))
            unsent = left
        self.abort("close timeout")

    def _unsent(self) -> int:
        """Our bytes the peer has not acknowledged yet: our queue and the kernel's."""
        kernel = 0
        if _OUTQ is not None:
            try:
                kernel = struct.unpack("i", fcntl.ioctl(self._raw.fileno(), _OUTQ,
                                                        b"\0\0\0\0"))[0]
            except (OSError, ValueError):
                pass
        return self._outbox_bytes + kernel

    def abort(self, reason: str = "aborted") -> None:
        """Drop the TCP connection now; the connection's reader (woken by the
        socket's end if it was parked) cleans up."""
        if self.state is _CLOSED:
            return
        if self.close_code is None:
            self.close_code, self.close_reason = 1006, reason
        self.state = _CLOSED
        try:
            # Close with a reset: otherwise the kernel keeps an orphaned socket
            # (FIN-WAIT-1) holding the send buffer for as long as a peer that does
            # not read keeps its window shut, which is minutes.
            self._raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
        try:
            self._raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- reading -----------------------------------------------------------------------
    def run(self) -> None:
        """Serve the connection in the calling greenlet until it is parked or done
        (tests; the transport uses :meth:`start`)."""
        self._serve()

    def _serve(self) -> None:
        """Read once and handle what it completes, then park (or finish at the end).

        Runs in a runner greenlet; handlers may block it (a store round trip)."""
        try:
            alive = True
            if not self._started:
                self._started = True
                self._opened()
                # Frames that came in the same TCP segments as the upgrade request
                # are handled before any wait.
                if self._buf:
                    data, self._buf = self._buf, b""
                    alive = self._receive(data)
            if alive and self.state is not _CLOSED and self._read():
                # One read per turn, then back to the poller, behind every other
                # socket that is ready: a client that never stops sending cannot
                # starve the others. (gevent.sleep(0) between reads was not enough:
                # gevent runs about 50 callbacks before it polls again, so a flooder
                # had 50 turns of up to 64 KiB in a row.) The watcher is
                # level-triggered: what is left in the socket wakes it again.
                self._park()
                return
        except OSError:
            pass
        except Exception:
            log.exception("connection %s failed", self.conn_id)
            # Said on the wire too (unless a close frame went already), then the socket goes.
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
            self.close_code, self.close_reason = int(CloseCode.INTERNAL_ERROR), "internal error"
        self._finish()

    def _read(self) -> bool:
        """One ``recv`` and the frames it completes; False when the connection is done."""
        try:
            data = self._raw.recv(RECV_BYTES)
        except BlockingIOError:
            return True  # woken with nothing to read after all
        if not data:
            return False
        self.last_seen = time.monotonic()
        if self.state is _CLOSING:
            self._read_after_close += len(data)
            if self._read_after_close > READ_AFTER_CLOSE_BYTES:
                if self._close_timer is not None:
                    self._close_timer.join()  # it drops the connection
                return False
        return self._receive(data) and self.state is not _CLOSED

    def _park(self) -> None:
        """Wait for the socket to be readable as a watcher, without a greenlet."""
        watch = self._watch
        if watch is None:
            watch = self._watch = get_hub().loop.io(self._raw.fileno(), 1)
        watch.start(_dispatch, self)

    def _receive(self, data: bytes) -> bool:
        """Parse and handle the frames in ``data`` (after what an incomplete frame left),
        and charge what the unfinished message then holds; False when the connection is
        done."""
        if not self._parse(data):
            return False  # _finish gives back what it held
        held = len(self._buf) + self._part_size
        if not held:  # every frame whole, no message between fragments: nothing arriving
            self.unfinished_since = 0.0
        elif not self.unfinished_since:
            self.unfinished_since = time.monotonic()
        return held == self._held or self._charge(held) or self._over_budget()

    def _charge(self, held: int) -> bool:
        """Hold ``held`` bytes of the worker's MAX_INBOUND_BUFFER_BYTES (instead of what
        this connection held so far); False, charging nothing more, if that passes it."""
        host = self.transport
        grows = held - self._held
        if grows > 0 and host.inbound_held + grows > host.max_inbound_buffer_bytes:
            return False
        host.inbound_held += grows
        self._held = held
        return True

    def _over_budget(self) -> bool:
        """The unfinished message would take the worker past MAX_INBOUND_BUFFER_BYTES:
        drop it, skip the rest of its frame (the peer's close frame is still read) and
        close with 1013, try again later (the server is short of room, the client is not
        at fault). False when the connection is done."""
        self._reset_message()
        size = _frame_size(self._buf)
        if size is not None:
            self._skip = size - len(self._buf)
            self._buf = b""
        host = self.transport
        host.inbound_held -= self._held - len(self._buf)  # a header's 13 bytes at most stay
        self._held = len(self._buf)
        if self.state is not _OPEN:
            return False  # closing already: read no more of it
        # Counted, and logged by its close line: no line of its own, which an attack would
        # repeat for every connection it opens.
        host.metrics.disconnected("inbound_budget")
        self.close(CloseCode.TRY_AGAIN_LATER, "server busy; retry")
        return True

    def _parse(self, data: bytes) -> bool:
        """Parse and handle the frames in ``data`` (after what an incomplete frame left);
        False when the connection is done."""
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return True
            data = data[self._skip:]
            self._skip = 0
        buf: bytes | bytearray = data
        if self._buf:
            # Appended in place (amortised): a frame that comes in many small reads is
            # not copied whole at each one (a 16 MiB frame in 8 KiB reads was 16 GiB).
            buf = self._buf if isinstance(self._buf, bytearray) else bytearray(self._buf)
            buf += data
        end = len(buf)
        pos = 0
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            head = pos + 6
            if length == 126:
                head = pos + 8
                if end < head:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 4], "big")
            elif length == 127:
                head = pos + 14
                if end < head:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                if length >> 63:  # RFC 6455 5.2: the most significant bit MUST be 0
                    return self._protocol_error(CloseCode.PROTOCOL_ERROR, "invalid length")
            opcode = b0 & 0x0F
            # Checked on the header, before any of the payload is held.
            if b0 & 0x70:
                return self._protocol_error(CloseCode.PROTOCOL_ERROR, "reserved bits set")
            if not b1 & 0x80:
                return self._protocol_error(CloseCode.PROTOCOL_ERROR, "unmasked client frame")
            if opcode >= 8:
                if opcode not in _CONTROL_OPS:
                    return self._protocol_error(CloseCode.PROTOCOL_ERROR, "unknown opcode")
                if not b0 & 0x80 or length > 125:
                    return self._protocol_error(CloseCode.PROTOCOL_ERROR,
                                                "fragmented or long control frame")
            elif opcode > 2:
                return self._protocol_error(CloseCode.PROTOCOL_ERROR, "unknown opcode")
            elif self.state is _OPEN:
                if (opcode == OP_CONT) is not (self._msg_op != 0):
                    return self._protocol_error(
                        CloseCode.PROTOCOL_ERROR,
                        "unexpected continuation frame" if opcode == OP_CONT
                        else "expected a continuation frame")
                charge = length if b0 & 0x80 else max(length, MIN_FRAGMENT_CHARGE)
                if self._part_size + charge > self.transport.max_message_bytes:
                    self._too_big()
                    if end < head:  # the rest of the header too: wait for it
                        self._skip = length + head - end
                        self._buf = b""
                        return True
                    missing = head + length - end
                    if missing > 0:
                        self._skip = missing
                        self._buf = b""
                        return True
                    pos = head + length
                    continue
            if end < head + length:  # the payload is not all here yet
                if (end > head and self.state is _OPEN
                        and (opcode == OP_TEXT or (opcode == OP_CONT and self._utf8 is not None))
                        and not self._check_text_prefix(opcode, buf, head, end)):
                    return False
                break
            payload_at = head
            frame_end = head + length
            pos = frame_end
            self._pcheck = None
            if opcode != OP_CLOSE and self.state is not _OPEN:
                continue  # closing: only the peer's close frame is still read
            payload = unmask(buf[payload_at:frame_end], buf[payload_at - 4:payload_at])
            if not self._frame(b0 & 0x80, opcode, payload):
                self._buf = b""
                return False
            if self.state is _CLOSED:
                return False
        if pos >= end:
            self._buf = b""
        elif buf is data:
            self._buf = bytearray(memoryview(data)[pos:])
        else:  # after parsed frames, a fresh bytearray: no room kept for them
            self._buf = buf[pos:] if pos else buf
        return True

    def _check_text_prefix(self, opcode: int, buf: bytes | bytearray, head: int, end: int
                           ) -> bool:
        """Fail fast on invalid UTF-8 in the part of a text frame that has arrived (each
        byte checked once, however finely the frame comes in); False if it is invalid."""
        check = self._pcheck
        if check is None:
            decoder = _Utf8Decoder()
            if opcode == OP_CONT:
                decoder.setstate(self._utf8.getstate())
            check = self._pcheck = [decoder, 0]
        decoder, done = check
        start = head + done
        if end <= start:
            return True
        mask = buf[head - 4:head]
        phase = done & 3
        try:
            decoder.decode(unmask(buf[start:end], mask[phase:] + mask[:phase]), False)
        except UnicodeDecodeError:
            return self._protocol_error(CloseCode.INVALID_PAYLOAD, "invalid UTF-8")
        check[1] = end - head
        return True

    def _frame(self, fin: int, opcode: int, payload: bytes) -> bool:
        """One whole frame, unmasked; False when the connection is done."""
        if opcode == OP_TEXT and fin:  # the common case: a message in one frame
            try:
                text = payload.decode()
            except UnicodeDecodeError:
                return self._protocol_error(CloseCode.INVALID_PAYLOAD, "invalid UTF-8")
            self.unfinished_since = 0.0
            self._on_text(text)
            return True
        if opcode < 8:
            return self._fragment(fin, opcode, payload)
        if opcode == OP_CLOSE:
            return self._on_close_frame(payload)
        if not self._control_allowed():
            self.transport.chat.cut_off_flooder(self)
            return False
        if opcode == OP_PING and self.state is _OPEN:
            self.write_control(control_frame(OP_PONG, payload))
        if self._parts is None:  # between messages: the one arriving, if any, is newer
            self.unfinished_since = 0.0
        return True

    def _control_allowed(self) -> bool:
        """Pings and pongs from the peer spend a bucket of the connection's own
        (``RATE_LIMIT_REQUESTS`` per second, ``RATE_LIMIT_REQUESTS_BURST`` at once): a
        client answers our pings and may send its own every few seconds, while a flood
        (64 KiB of reads holds 10,000 pings, each a pong to write) is closed with 4102."""
        settings = self.transport.chat.settings
        now = time.monotonic()
        tokens, last = self._control or (settings.request_burst, now)
        tokens, last, retry_ms = take(tokens, last, now, settings.request_rate,
                                      settings.request_burst)
        self._control = (tokens, last)
        return not retry_ms

    def _fragment(self, fin: int, opcode: int, payload: bytes) -> bool:
        if opcode != OP_CONT:  # the first frame of a message
            self._msg_op = opcode
            if opcode == OP_TEXT:
                self._utf8 = _Utf8Decoder()
            self._parts = io.BytesIO()
        self._part_size += len(payload) if fin else max(len(payload), MIN_FRAGMENT_CHARGE)
        if self._utf8 is not None:
            # Checked as it comes, kept as UTF-8: decoded fragments were kept as str before,
            # and a fragment with one emoji in it made a str of 4 bytes a character, so an
            # unfinished message held up to 4 x MAX_MESSAGE_BYTES.
            try:
                self._utf8.decode(payload, bool(fin))
            except UnicodeDecodeError:
                return self._protocol_error(CloseCode.INVALID_PAYLOAD, "invalid UTF-8")
        self._parts.write(payload)
        if not fin:
            return True
        whole = self._parts.getvalue()
        op = self._msg_op
        self._reset_message()
        if op == OP_TEXT:
            self._on_text(whole.decode())
        else:
            self._on_bytes(whole)
        return True

    def _reset_message(self) -> None:
        self._msg_op, self._parts, self._part_size, self._utf8 = 0, None, 0, None
        self._pcheck = None
        self.unfinished_since = 0.0

    def _too_big(self) -> None:
        self._reset_message()
        self.close(CloseCode.MESSAGE_TOO_BIG, "message too big")

    def _protocol_error(self, code: int, reason: str) -> bool:
        """The peer broke RFC 6455: close with ``code`` and stop reading (False)."""
        self._reset_message()
        self.close(code, reason)  # type: ignore[arg-type]
        return False

    def _on_close_frame(self, payload: bytes) -> bool:
        if not payload:
            code, reason = 1005, ""
        elif len(payload) == 1:
            return self._protocol_error(CloseCode.PROTOCOL_ERROR, "invalid close frame")
        else:
            code = int.from_bytes(payload[:2], "big")
            if code not in _PEER_CLOSE_CODES and not 3000 <= code <= 4999:
                return self._protocol_error(CloseCode.PROTOCOL_ERROR, "invalid close code")
            try:
                reason = payload[2:].decode()
            except UnicodeDecodeError:
                return self._protocol_error(CloseCode.INVALID_PAYLOAD, "invalid UTF-8")
        if self.state is _OPEN:  # the peer closes: echo its code
            self.close_code, self.close_reason = code, reason or "peer closed"
            self.state = _CLOSING
            self.write(close_frame(code, reason))
        return False  # else the peer answered our close

    def _finish(self) -> None:
        # First, whatever ended the connection: its unfinished message leaves the budget.
        self._buf = b""
        self._reset_message()
        self._charge(0)
        if self._close_timer is not None:
            self._close_timer.kill(block=False)
        if self.state is not _CLOSED and self._flusher is not None:
            self._flusher.join(timeout=1.0)  # let the close frame out
        self.state = _CLOSED
        if self._flusher is not None:
            if self._wwatch is not None:
                self._wwatch.stop()  # before the descriptor goes
            self._flusher.kill(block=False)
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        try:
            self._raw.close()
        except OSError:
            pass
        try:
            self._closed()
        finally:
            self.transport.forget(self)

    # -- what a connection is for: the chat (EchoConnection overrides these) ---------
    def _opened(self) -> None:
        """Registered by the chat; a signed-in connection admitted leaves the hub's count
        of its user's connections on their way in then (Admission.check counted it)."""
        try:
            self.transport.chat.open(self, arriving=self.authenticated)
        except Unavailable as exc:
            # The store went away after admission checked it: 1013, retry.
            log.warning("connection %s not registered (%s); closing with 1013",
                        self.conn_id, exc)
            self.close(CloseCode.TRY_AGAIN_LATER, "temporarily unavailable; retry")

    def _on_text(self, text: str) -> None:
        self.transport.chat.receive(self, text)

    def _on_bytes(self, data: bytes) -> None:
        self.close(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")

    def _closed(self) -> None:
        self.transport.chat.close(self)


class EchoConnection(WebSocketConnection):
    """Test-only (``WSCHAT_ECHO_ENDPOINT``, ``/echo``): every message comes back instead
    of going to the chat, so conformance suites measure this very frame handling."""

    __slots__ = ()

    def _opened(self) -> None:
        if self.authenticated:  # admitted as its user, as a chat connection is, never registered
            self.transport.chat.hub.arriving.remove(self.user_id)
            self.transport.chat.stores.presence.release_claim(self.conn_id, self.user_id)

    def _on_text(self, text: str) -> None:
        self.write(text_frame(text.encode()))

    def _on_bytes(self, data: bytes) -> None:
        self.write(binary_frame(data))

    def _closed(self) -> None:
        pass


def feed_pipelined(ws: Any, environ: dict[str, Any]) -> None:
    """Keep the frames the client sent right behind its upgrade request (in the same
    TCP segment) for the connection that takes the socket over (``ws.wschat_pending``):
    gunicorn read them along with the request and keeps them in its read-ahead
    buffer, where nobody would ever look again."""
    reader = getattr(environ.get("wsgi.input"), "reader", None)
    take_buffered = getattr(getattr(reader, "unreader", None), "take_buffered", None)
    if take_buffered is None:
        return
    data = take_buffered()
    if data:
        ws.wschat_pending = data
