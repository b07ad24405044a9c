"""A small terminal client: ``python -m wschat connect URL``.

It speaks the wire protocol as it is: every line typed (or piped) on stdin is
sent as one text frame, and every frame the server sends is printed as one line
on stdout, so it doubles as a way to script the server from a shell. It runs on
wsproto (already a dependency of the server) over a plain socket, with a thread
for the socket and the main thread for stdin; gevent plays no part here.

When stdin ends, it waits up to ``linger`` seconds for the answers to what it
sent (until the server has been quiet for half a second), then closes with 1000.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterable
from typing import TextIO
from urllib.parse import urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection, CloseConnection, Message, Ping, RejectConnection, RejectData, Request,
    TextMessage,
)

from .errors import WschatError

QUIET = 0.5  # seconds without a frame after stdin ended: the answers are in


class ConnectFailed(WschatError):
    """The server refused the upgrade or could not be reached; the message says why."""


class TerminalClient:
    """One WebSocket connection whose frames are lines on ``out``."""

    def __init__(self, url: str, out: TextIO, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ConnectFailed(f"expected a ws:// or wss:// URL, not {url!r}")
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            sock = socket.create_connection((parts.hostname, port), timeout=timeout)
            if parts.scheme == "wss":
                sock = ssl.create_default_context().wrap_socket(
                    sock, server_hostname=parts.hostname)
        except OSError as exc:
            raise ConnectFailed(f"cannot reach {parts.hostname}:{port}: {exc}") from None
        self.sock = sock
        self.out = out
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.closing = False  # we sent the close frame: the server's answer is no news
        self.close_code: int | None = None
        self.last_frame = time.monotonic()
        host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        self._send(Request(host=host, target=target))
        self._handshake(timeout)
        sock.settimeout(None)

    def _send(self, event: object) -> None:
        with self.lock:
            data = self.ws.send(event)
        self.sock.sendall(data)

    def _handshake(self, timeout: float) -> None:
        rejected: tuple[int, bytearray] | None = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.sock.recv(65536)
            if not data:
                break
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, RejectConnection):
                    rejected = (event.status_code, bytearray())
                    if not event.has_body:
                        raise ConnectFailed(f"upgrade refused: HTTP {event.status_code}")
                elif isinstance(event, RejectData) and rejected is not None:
                    rejected[1].extend(event.data)
                    if event.body_finished:
                        body = rejected[1].decode(errors="replace").strip()
                        raise ConnectFailed(f"upgrade refused: HTTP {rejected[0]} {body}")
        raise ConnectFailed("the server closed the connection during the handshake")

    def read_forever(self) -> None:
        """Print each text frame as a line; answer pings; end when the connection ends."""
        parts: list[str] = []
        try:
            while not self.closed.is_set():
                data = self.sock.recv(65536)
                if not data:
                    break
                with self.lock:
                    self.ws.receive_data(data)
                    events = list(self.ws.events())
                for event in events:
                    self.last_frame = time.monotonic()
                    if isinstance(event, TextMessage):
                        parts.append(event.data)
                        if event.message_finished:
                            print("".join(parts), file=self.out, flush=True)
                            parts.clear()
                    elif isinstance(event, Message):
                        print(f"(binary frame of {len(event.data)} bytes)", file=self.out,
                              flush=True)
                    elif isinstance(event, Ping):
                        self._send(event.response())
                    elif isinstance(event, CloseConnection):
                        self.close_code = event.code
                        if not self.closing:
                            reason = f" {event.reason}" if event.reason else ""
                            print(f"closed by the server: {event.code}{reason}",
                                  file=sys.stderr)
                        try:
                            self._send(event.response())
                        except Exception:
                            pass  # the server may already be gone
                        return
        except OSError:
            pass
        finally:
            self.closed.set()

    def send_line(self, line: str) -> None:
        self._send(TextMessage(data=line))

    def close(self) -> None:
        if not self.closed.is_set():
            self.closing = True
            try:
                self._send(CloseConnection(code=1000))
            except Exception:
                pass
            self.closed.wait(2.0)
        self.sock.close()


def run(url: str, lines: Iterable[str], out: TextIO = sys.stdout, linger: float = 3.0) -> int:
    """Connect, send each non-empty line, print what arrives; 0 unless the connect failed."""
    try:
        client = TerminalClient(url, out)
    except ConnectFailed as exc:
        print(f"wschat: {exc}", file=sys.stderr)
        return 1
    reader = threading.Thread(target=client.read_forever, daemon=True)
    reader.start()
    try:
        for line in lines:
            line = line.strip()
            if line and not client.closed.is_set():
                client.send_line(line)
        ended = time.monotonic()
        while not client.closed.is_set() and time.monotonic() < ended + linger:
            if time.monotonic() - max(client.last_frame, ended) > QUIET:
                break
            client.closed.wait(0.05)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return 0
