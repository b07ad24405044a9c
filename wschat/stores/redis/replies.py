"""Replies read straight off a connected redis-py connection's socket by hiredis.

Why: on the hot path (the pipeline's replies, every pub/sub message) redis-py's
per-reply path cost more than the reply: each ``read_response`` formats an error
label, goes through the protocol checks, sets and restores the socket timeout and,
for a RESP3 push (every pub/sub message), looks up a logger and logs at debug level;
``can_read``, its stale-socket check, builds a ``select.poll`` (under gevent, a
greenlet-aware emulation with watchers of its own). A py-spy profile of a worker at
2,000 room messages/s (loadtest/RESULTS.md, issue 24) put those at about a third of
its Python time. redis-py still connects (TLS included), greets (``HELLO``, ``AUTH``,
``SELECT``), sends the pub/sub commands and reconnects; the hot path's reads, and the
pipeline's writes, are done here.
"""

from __future__ import annotations

import select
import socket
from typing import Any

import hiredis
import redis
from gevent import get_hub, getcurrent
from redis._parsers import BaseParser

_NOT_ENOUGH_DATA = object()
READ_BYTES = 65536
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)  # an int: IntFlag's | costs per call


def connection_socket(conn: Any) -> Any:
    """The socket of a connected redis-py connection (``_sock``: redis-py names it so
    from 2.x to 8.x; it has no public accessor)."""
    sock = conn._sock
    if sock is None:
        raise redis.ConnectionError("not connected")
    return sock


class ReplyReader:
    """Writes to and parses what one connection's socket receives. Under gevent, on a
    plain TCP socket, it uses the OS socket directly and waits on watchers of its own
    (no ``Timeout`` object per wait, no ``SO_SNDBUF`` lookup per write)."""

    __slots__ = ("_buf", "_raw", "_read_timeout", "_reader", "_timeout", "_timer", "_waiter",
                 "_watch", "sock", "waits")

    def __init__(self, conn: Any, read_timeout: float | None = None) -> None:
        """``read_timeout``: seconds :meth:`read` waits for data (TimeoutError after), if
        not the socket's timeout, which writes keep."""
        self.sock = connection_socket(conn)
        self._read_timeout = read_timeout
        raw = getattr(self.sock, "_sock", self.sock)  # the OS socket under gevent's
        # Error replies come back as values, as redis-py's own classes (NoScriptError,
        # BusyLoadingError, ...); a malformed stream is a connection error.
        self._reader = hiredis.Reader(protocolError=redis.ConnectionError,
                                      replyError=BaseParser.parse_error,
                                      notEnoughData=_NOT_ENOUGH_DATA)
        self._buf = bytearray(READ_BYTES)
        self._watch: Any = None
        self._timer: Any = None
        self._timeout: float | None = None  # the timer's
        self._waiter: Any = None  # the greenlet in _wait
        self.waits = 0  # times a read waited for the socket (the listener's turns)
        if (raw is not self.sock and raw.gettimeout() == 0.0
                and not hasattr(self.sock, "pending")):  # gevent's socket, not TLS
            self._raw = raw
            self._watch = get_hub().loop.io(raw.fileno(), 1)
        else:
            # TLS (rediss://: the bytes under it are encrypted), or a blocking socket
            # (no gevent: tests, tools): through the socket object, with its timeout.
            self._raw = None

    def send(self, data: bytes) -> None:
        """Write all of ``data``."""
        raw = self._raw
        if raw is not None:
            try:
                sent = raw.send(data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        self.sock.sendall(data)  # a full buffer (or no gevent): wait as the socket does

    def read(self) -> Any:
        """The next reply; an error reply is returned (a ``ResponseError``), not raised.

        Raises:
            redis.ConnectionError: the server closed the connection or sent garbage.
            OSError: the socket failed or timed out (``TimeoutError``).
        """
        reader = self._reader
        reply = reader.gets()
        while reply is _NOT_ENOUGH_DATA:
            raw = self._raw
            if raw is None:
                count = self._recv_through_socket()
            else:
                try:
                    count = raw.recv_into(self._buf)
                except BlockingIOError:
                    self._wait()
                    continue
            if not count:
                raise redis.ConnectionError("Connection closed by server.")
            reader.feed(self._buf, 0, count)
            reply = reader.gets()
        return reply

    def _recv_through_socket(self) -> int:
        self.waits += 1  # it may wait inside the socket: counted as a wait
        sock, timeout = self.sock, self._read_timeout
        if timeout is None:
            return sock.recv_into(self._buf)
        saved = sock.gettimeout()
        sock.settimeout(timeout)
        try:
            return sock.recv_into(self._buf)
        finally:
            sock.settimeout(saved)

    def _wait(self) -> None:
        """Until the socket is readable, or TimeoutError after the read timeout."""
        timeout = self._read_timeout
        if timeout is None:
            timeout = self.sock.gettimeout()
        hub, me = get_hub(), getcurrent()
        timer = self._timer
        if timeout is not None:
            if timer is None or self._timeout != timeout:
                if timer is not None:
                    timer.close()
                # again() below (re)starts it for its repeat: one watcher per reader,
                # not a Timeout object per wait
                timer = self._timer = hub.loop.timer(timeout, timeout)
                self._timeout = timeout
            timer.again(me.throw, TimeoutError("timed out"), update=False)
        self._waiter = me
        self.waits += 1
        try:
            hub.wait(self._watch)
        finally:
            self._waiter = None
            if timer is not None:
                timer.stop()

    def stale(self) -> bool:
        """Is something readable while no reply is owed (EOF after a Redis restart, stray
        data)? One non-blocking peek, no poll object."""
        if self._reader.has_data():
            return True
        raw = self._raw
        if raw is None:
            # TLS may hold decrypted bytes above the socket; a socket with a timeout
            # would wait that long before recv, whatever the flags. Ask poll instead.
            if hasattr(self.sock, "pending") and self.sock.pending():
                return True
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            return bool(poller.poll(0))
        try:
            return raw.recv(1, _PEEK) is not None
        except BlockingIOError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        """Release the watchers (the connection itself is redis-py's to close); a greenlet
        waiting for a reply gets ``ConnectionError``."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None and waiter is not getcurrent():
            get_hub().loop.run_callback(waiter.throw, redis.ConnectionError("connection closed"))
        for watcher in (self._watch, self._timer):
            if watcher is not None:
                watcher.stop()
                watcher.close()
        self._watch = self._timer = None
