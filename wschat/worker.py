"""wschat's gunicorn worker: gunicorn's gevent worker with a bound on the sockets that wait
for their request (``gunicorn.conf.py``: ``worker_class``).

gunicorn's gevent worker serves each accepted socket in a greenlet of a pool of
``worker_connections``, and stops accepting while the pool is full. A socket holds its
slot while it waits for its HTTP request (the WebSocket upgrade, or the next request of
a kept-alive connection) for up to the handshake deadline (``keepalive``, 5 s); the
admission's limits (:mod:`wschat.admission`) see it only once the request has arrived.
Sockets that send their request slowly, or never, opened faster than they time out (about
2,000 a second, each held 5 s, fill a pool of 10,100) would fill the pool, and the worker
would accept no one else.

:class:`Waiting` counts those sockets from the moment their greenlet starts, per client
address (:func:`~wschat.ratelimit.address_key`: an IPv6 /64 is one) and in all, and
closes the oldest one past either limit: ``MAX_HANDSHAKES_PER_IP`` for one address,
:func:`waiting_budget` for the worker. A socket stops waiting while the app handles its
request (a WebSocket leaves for good: the transport takes it over), and waits again from
the moment its response is written: a client that never reads held its greenlet, and
its slot of the pool, for as long as it liked (a page's script asked for over and over
on one socket fills the kernel's buffers, then the write waits), so a few hundred such
sockets from one address kept everyone else out.
"""

from __future__ import annotations

import _socket
import fcntl
import json
import signal
import socket
import struct
import termios
import time
from collections.abc import Callable
from functools import partial
from queue import Empty
from typing import Any

import gevent
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn import util as gunicorn_util
from gunicorn.sock import ssl_context
from gunicorn.workers.ggevent import GeventWorker

from .config import Settings
from .logs import MAX_CLIENT_TEXT
from .ratelimit import address_key

#: The ``code`` of gunicorn's answers to a request it could not read, by status.
REFUSED_REQUEST_CODES = {400: "bad_request", 403: "forbidden", 414: "uri_too_long",
                         417: "expectation_failed", 431: "headers_too_large",
                         501: "not_implemented"}


def write_refusal(sock: Any, status: int, reason: str, message: str) -> None:
    """gunicorn's answer to a request it refused before the app saw it (a request line over
    its limit, 414; a malformed line or header, 400; too many or too large headers, 431; an
    unknown transfer coding, 501), as wschat's other errors are: ``{"error": {"code",
    "message"}}``, not gunicorn's HTML page (``gunicorn.util.write_error``, which the
    worker's ``handle_error`` calls). The message, which quotes the client's bytes, is cut
    to ``MAX_CLIENT_TEXT`` characters, as in the log line."""
    code = REFUSED_REQUEST_CODES.get(status, "internal_error" if status >= 500 else "bad_request")
    body = json.dumps({"error": {"code": code, "message": message[:MAX_CLIENT_TEXT]}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    gunicorn_util.write_nonblock(sock, head.encode("latin-1") + body)


def waiting_budget(worker_connections: int) -> int:
    """How many sockets of a worker may wait for their request together: the pool but
    100 slots for requests being served (``worker_connections`` is ``MAX_CONNECTIONS +
    100``), and never less than half the pool."""
    return max(1, worker_connections - 100, worker_connections // 2)


def peer_key(host: str) -> Any:
    """An IPv6 peer's key: its /64, as :func:`~wschat.ratelimit.address_key` counts it, in
    ~0.3 us rather than ipaddress's ~8 (an IPv4 peer, as accept() gives it, is its own)."""
    if host.startswith("::ffff:") and "." in host:  # IPv4-mapped: the IPv4 address
        return host[7:]
    try:
        return socket.inet_pton(socket.AF_INET6, host)[:8]
    except OSError:  # a scope ("fe80::1%eth0"), or no IPv6 address at all
        return address_key(host)


class Waiting:
    """The sockets waiting for their request, or for the client to take their response,
    oldest first: in all and per address.

    ``per_address``: at most that many from one address (0: no cap); ``budget``: at most
    that many in all. Past either, the oldest waiting socket (of that address, or of
    all) is shut down: its greenlet's read or write ends, and gunicorn closes it and frees
    its slot. The oldest rather than the new one, so that a client sharing an address with
    the dripping sockets still gets in if its request arrives in time. One shut down while
    its response was being written is reset: what the kernel still held for a client that
    does not read is dropped at once, not kept for minutes behind a closed window."""

    def __init__(self, per_address: int, budget: int,
                 on_close: Callable[[str], None] | None = None) -> None:
        self.per_address = per_address
        self.budget = budget
        self.sockets: dict[Any, Any] = {}  # socket -> its address key, oldest first
        self.by_address: dict[Any, dict[Any, None]] = {}  # key -> its sockets, oldest first
        self.responding: set[Any] = set()  # those of them whose response is being written
        # Those shut down for a limit, until their greenlet ends: a pipelined request it had
        # read already is still answered, and must not make it count (and evict) again.
        self.shut: set[Any] = set()
        self.closed = 0  # shut down for being over a limit
        # Told each time, with the limit ("max_handshakes_per_ip" or "pool"): the metrics.
        self.on_close = on_close

    def arrive(self, sock: Any, addr: Any, responding: bool = False) -> None:
        """``sock`` waits (again): for its request, or with ``responding`` for the client to
        take its response. Counted already (its response began), it keeps its place."""
        if sock in self.shut:
            return
        if sock in self.sockets:
            if not responding:  # the response is written: the next request is awaited
                self.responding.discard(sock)
            return
        host = addr[0] if isinstance(addr, tuple) else str(addr)
        key = host if ":" not in host else peer_key(host)
        if self.per_address:
            mine = self.by_address.get(key)
            if mine is not None and len(mine) >= self.per_address:
                self.close(next(iter(mine)), "max_handshakes_per_ip")
            # Looked up again: closing the address's last socket took its entry away.
            self.by_address.setdefault(key, {})[sock] = None
        if len(self.sockets) >= self.budget:
            self.close(next(iter(self.sockets)), "pool")
        self.sockets[sock] = key
        if responding:
            self.responding.add(sock)

    def leave(self, sock: Any) -> None:
        key = self.sockets.pop(sock, None)
        if key is None:
            return
        self.responding.discard(sock)
        mine = self.by_address.get(key)
        if mine is not None:
            del mine[sock]
            if not mine:
                del self.by_address[key]

    def forget(self, sock: Any) -> None:
        """``sock``'s greenlet is done with it."""
        self.leave(sock)
        self.shut.discard(sock)

    def close(self, sock: Any, reason: str) -> None:
        reset = sock in self.responding
        self.leave(sock)
        self.shut.add(sock)
        self.closed += 1
        if self.on_close is not None:
            self.on_close(reason)
        shut_down(sock, reset)


_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: the close sends a reset


# The ioctl that tells a TCP socket's bytes not yet acknowledged (Linux's SIOCOUTQ).
_OUTQ = getattr(termios, "TIOCOUTQ", None)


def _unsent(raw: Any) -> int:
    """Bytes the kernel still holds for the peer (0 where that cannot be told)."""
    if _OUTQ is None:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(raw.fileno(), _OUTQ, b"\0\0\0\0"))[0])
    except (OSError, ValueError):
        return 0


def shut_down(sock: Any, reset: bool = False) -> None:
    """End ``sock``'s stream both ways from outside the greenlet reading it, in the kernel
    only: that greenlet wakes to an end of stream, which gunicorn takes for a client that
    went away (a debug line). gevent's own ``shutdown`` would wake it with "File descriptor
    was closed in another greenlet", which gunicorn logs with a traceback, once for each
    socket closed. ``reset`` (or bytes of an answer the kernel still holds for the peer,
    between two pipelined requests): gunicorn's close of it then resets the connection,
    dropping what the kernel has not sent yet (a greenlet writing to it wakes to a broken
    pipe), where an end of stream would wait behind them for a peer that does not read."""
    try:
        raw = _socket.socket(sock.family, sock.type, 0, sock.fileno())
    except (OSError, ValueError):  # closed already (its descriptor: -1)
        return
    try:
        if reset or _unsent(raw):
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        raw.shutdown(socket.SHUT_RDWR)
    except OSError:  # the peer is gone already
        pass
    finally:
        raw.detach()  # the descriptor stays the worker's


class CountingResponses:
    """The worker's app, with each socket counted as waiting again (:meth:`Waiting.arrive`,
    ``responding``) once the app has answered and its response is about to be written. A
    WebSocket's request never gets there (flask-sock ends it with StopIteration).

    Everything else is the app's (``extensions`` above all: gunicorn's ``worker_exit``
    hands ``worker.wsgi`` to :func:`wschat.factory.finish_worker`, which finds the
    runtime there and drains the connections)."""

    def __init__(self, app: Callable[..., Any], worker: Worker) -> None:
        self.app = app
        self.worker = worker

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        result = self.app(environ, start_response)
        sock = environ.get("gunicorn.socket")
        addr = self.worker.peers.get(sock)
        if addr is not None:
            self.worker.waiting.arrive(sock, addr, responding=True)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)


LOOK_SECONDS = 0.05  # how often the worker's loop looks at `alive` and, stopping, its pool
NOTIFY_SECONDS = 1.0  # how often it tells the master it lives (gunicorn's: every loop)


def taken_signals(queue: Any) -> list[int]:
    """What a gunicorn master's signal queue holds, emptied: a ``queue.SimpleQueue``
    (gunicorn 27) or a list (older releases); none for ``None``."""
    if queue is None:
        return []
    if isinstance(queue, list):
        taken = list(queue)
        queue.clear()
        return taken
    taken = []
    while True:
        try:
            taken.append(queue.get_nowait())
        except Empty:
            return taken


class Worker(GeventWorker):
    """gunicorn's gevent worker (``-k gevent``) whose sockets waiting for a request are
    counted by :class:`Waiting`, and whose loop sees a signal to stop within
    ``LOOK_SECONDS`` (:meth:`_serve`, :meth:`handle_quit`)."""

    waiting: Waiting
    # The master's signal queue as this process's memory holds it (gunicorn.conf.py's
    # pre_fork sets it): see init_signals.
    arbiter_signals: Any = None

    def init_signals(self) -> None:
        """gunicorn's handlers, then the stop signals that came before them.

        From the fork until here the worker still has the master's handlers, which only
        queue a signal in the master's queue (this process's copy of it, which no one
        reads): gunicorn's patching of the worker by gevent and the master's
        ``post_fork`` run meanwhile. A SIGTERM then (the master told to stop while a
        worker boots, as a rolling update or a scale-down can) was lost, and the worker
        served on until the master's SIGKILL, ``GRACEFUL_TIMEOUT`` later, without its
        drain (gunicorn issue #1910). Such a signal is taken now."""
        super().init_signals()
        for sig in taken_signals(self.arbiter_signals):
            if sig == signal.SIGTERM:
                self.handle_exit(sig, None)
            elif sig in (signal.SIGINT, signal.SIGQUIT):
                self.handle_quit(sig, None)

    def run(self) -> None:
        gunicorn_util.write_error = write_refusal  # (this process serves nothing else)
        settings = Settings.from_env()  # validated by the master: the same environment
        # Behind proxies (TRUSTED_PROXIES) every socket comes from one of them, and the
        # client's address is known only from the request: no cap per peer address then.
        per_address = 0 if settings.trusted_proxies else settings.max_handshakes_per_ip
        # Set by wschat.factory.attach_worker (gunicorn's post_worker_init, before run).
        on_close = getattr(self, "wschat_waiting_closed", None)
        self.waiting = Waiting(per_address, waiting_budget(self.worker_connections), on_close)
        self.peers: dict[Any, Any] = {}  # each socket being handled -> its peer's address
        self.wsgi = CountingResponses(self.wsgi, self)
        self._serve()

    def _serve(self) -> None:
        """gunicorn's ``GeventWorker.run`` (its ``server_class`` is None: a
        ``StreamServer`` per listening socket), but for how often it looks at ``alive``,
        which gunicorn's SIGTERM handler clears, and at its pool while it stops: every
        ``LOOK_SECONDS``, not every second. gunicorn's loop slept a second between looks,
        so a worker's stop began up to a second after the signal, and then waited for its
        pool in steps of a second: every stop took ~1.3 s, even of an idle worker
        (a rolling update's pods, and each of the test suite's hundreds of servers).
        The worker still tells the master it lives (``notify``) once a second."""
        ssl_args = {"ssl_context": ssl_context(self.cfg)} if self.cfg.is_ssl else {}
        servers = []
        for listener in self.sockets:
            listener.setblocking(1)
            server = StreamServer(listener, handle=partial(self.handle, listener),
                                  spawn=Pool(self.worker_connections), **ssl_args)
            if self.cfg.workers > 1:
                server.max_accept = 1
            server.start()
            servers.append(server)
        notified = 0.0
        while self.alive:
            notified = self._look(notified)
        try:
            for server in servers:  # accept no one else
                server.close()
            if self.quitting:  # a quick shutdown: the requests under way are not waited for
                return
            # Serve the requests under way for up to graceful_timeout.
            started = time.monotonic()
            while time.monotonic() - started <= self.cfg.graceful_timeout:
                if all(server.pool.free_count() == server.pool.size for server in servers):
                    return
                notified = self._look(notified)
            self.log.warning("Worker graceful timeout (pid:%s)", self.pid)
            for server in servers:
                server.stop(timeout=1)
        except Exception:  # the worker exits regardless, as gunicorn's
            self.log.exception("Worker stop failed (pid:%s)", self.pid)

    quitting = False  # told to quit (SIGQUIT, SIGINT) rather than to stop (SIGTERM)

    def handle_quit(self, sig: int, frame: Any) -> None:
        """SIGQUIT (the master's quick shutdown, on its SIGINT or SIGQUIT) or SIGINT
        (Ctrl-C reaches the whole process group): the worker stops without waiting for the
        requests under way, but its WebSockets still get their 1001 (``worker_exit``:
        :func:`wschat.factory.finish_worker`, bounded by ``GRACEFUL_TIMEOUT``, as the
        master's SIGKILL is).

        gunicorn's handler clears ``alive`` and, 0.1 s later, exits the process (its
        ``SystemExit`` thrown into the main greenlet). Its own loop, sleeping a second,
        was mostly still asleep then, and the exit came before ``worker_exit``; this
        worker's loop looks every ``LOOK_SECONDS`` and reaches ``worker_exit`` first, and
        that exit would land in the middle of the drain. So the loop's end is the exit."""
        self.quitting = True
        gevent.spawn(self._quit)

    def _quit(self) -> None:
        self.alive = False
        self.cfg.worker_int(self)  # gunicorn's hook, called where its handler calls it

    def _look(self, notified: float) -> float:
        """One step of the worker's loop: tell the master it lives once a second, then
        wait ``LOOK_SECONDS``; returns when it last told it."""
        now = time.monotonic()
        if now - notified >= NOTIFY_SECONDS:
            self.notify()
            notified = now
        gevent.sleep(LOOK_SECONDS)
        return notified

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        waiting = self.waiting
        waiting.arrive(client, addr)
        self.peers[client] = addr
        try:
            super().handle(listener, client, addr)
        finally:
            waiting.forget(client)
            self.peers.pop(client, None)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        self.waiting.leave(sock)
        kept = super().handle_request(listener_name, req, sock, addr)
        # Kept alive (no exception: a WebSocket's request ends with StopIteration, and
        # a closing response too): it waits for its next request (counted already while
        # its response was written, CountingResponses, in the same place).
        self.waiting.arrive(sock, addr)
        # Back to the hub before the next request: one already read (pipelined behind this
        # one) was handled without any wait, so a client sending thousands of them in a
        # row, and reading the answers, held the worker, every WebSocket of it included,
        # until the last was answered (50,000 of /health: 13.5 s for a ping). Measured with
        # this: the ping's round trip at most ~25 ms (the hub polls the sockets after a
        # run of callbacks), the flood's answers 16 s instead of 13.5 (a timer's pause,
        # which polls at each request, made it 78 s for 2 ms less).
        gevent.sleep(0)
        return kept
