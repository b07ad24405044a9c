"""Replies read straight off a connected redis-py connection's socket by hiredis.

Why: on the hot path (the pipeline's replies, every pub/sub message) redis-py's
per-reply path cost more than the reply: each ``read_response`` formats an error
label, goes through the protocol checks, sets and restores the socket timeout and,
for a RESP3 push (every pub/sub message), looks up a logger and logs at debug level;
``can_read``, its stale-socket check, builds a ``select.poll`` (under gevent, a
greenlet-aware emulation with watchers of its own). A py-spy profile of a worker at
2,000 room messages/s (loadtest/RESULTS.md, issue 24) put those at about a third of
its Python time. redis-py still connects, greets (``HELLO``, ``AUTH``, ``SELECT``),
sends the pub/sub commands and reconnects; only reading is done here.
"""

from __future__ import annotations

import select
import socket
from typing import Any

import hiredis
import redis
from redis._parsers import BaseParser

_NOT_ENOUGH_DATA = object()
READ_BYTES = 65536


def connection_socket(conn: Any) -> Any:
    """The socket of a connected redis-py connection (``_sock``: redis-py names it so
    from 2.x to 8.x; it has no public accessor)."""
    sock = conn._sock
    if sock is None:
        raise redis.ConnectionError("not connected")
    return sock


class ReplyReader:
    """Parses what one connection's socket receives; :meth:`read` waits (cooperatively,
    under gevent) with the socket's own timeout."""

    __slots__ = ("_buf", "_raw", "_reader", "sock")

    def __init__(self, conn: Any) -> None:
        self.sock = connection_socket(conn)
        self._raw = getattr(self.sock, "_sock", self.sock)  # the OS socket under gevent's
        # Error replies come back as values, as redis-py's own classes (NoScriptError,
        # BusyLoadingError, ...); a malformed stream is a connection error.
        self._reader = hiredis.Reader(protocolError=redis.ConnectionError,
                                      replyError=BaseParser.parse_error,
                                      notEnoughData=_NOT_ENOUGH_DATA)
        self._buf = bytearray(READ_BYTES)

    def read(self) -> Any:
        """The next reply; an error reply is returned (a ``ResponseError``), not raised.

        Raises:
            redis.ConnectionError: the server closed the connection or sent garbage.
            OSError: the socket failed or timed out (``TimeoutError``).
        """
        reader = self._reader
        reply = reader.gets()
        while reply is _NOT_ENOUGH_DATA:
            count = self.sock.recv_into(self._buf)
            if not count:
                raise redis.ConnectionError("Connection closed by server.")
            reader.feed(self._buf, 0, count)
            reply = reader.gets()
        return reply

    def stale(self) -> bool:
        """Is something readable while no reply is owed (EOF after a Redis restart, stray
        data)? One non-blocking peek, no poll object."""
        if self._reader.has_data():
            return True
        raw = self._raw
        if raw.gettimeout() != 0.0:
            # A socket with a timeout (no gevent): Python would wait that long before
            # recv, whatever the flags. Ask poll instead.
            poller = select.poll()
            poller.register(raw, select.POLLIN)
            return bool(poller.poll(0))
        try:
            return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) is not None
        except BlockingIOError:
            return False
        except OSError:
            return True
