"""A WebSocket client on a bare socket, for peers the ``websockets`` library will not play.

It never answers pings, reads only when asked (so it can stall on purpose with a
tiny receive buffer), and checks every byte the server sends: frames must be
well formed, back to back, with nothing after the close frame.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from typing import Any

from conftest import TIMEOUT

OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA


def client_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = None
                 ) -> bytes:
    """One masked client frame (``fin`` False: a fragment to be continued)."""
    mask = os.urandom(4) if mask is None else mask
    n = len(payload)
    header = bytes(((0x80 if fin else 0) | opcode,))
    if n < 126:
        header += bytes((0x80 | n,))
    elif n < 65536:
        header += bytes((0x80 | 126,)) + struct.pack("!H", n)
    else:
        header += bytes((0x80 | 127,)) + struct.pack("!Q", n)
    if mask == b"\0\0\0\0":
        return header + mask + payload
    return header + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(payload))


class Closed(Exception):
    """The server ended the TCP stream."""


class RawClient:
    def __init__(self, port: int, query: str = "", rcvbuf: int | None = None,
                 source: str = "127.0.0.1", read_welcome: bool = True) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(TIMEOUT)
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        path = "/ws" + (f"?{query}" if query else "")
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise AssertionError(f"handshake refused: {head[:200]!r}")
        self.close_code: int | None = None
        self.welcome = self.next_event() if read_welcome else None

    @property
    def user_id(self) -> str:
        assert self.welcome is not None
        return self.welcome["user_id"]

    # -- sending (client frames are masked) ------------------------------------------------
    def send_frame(self, opcode: int, payload: bytes) -> None:
        self.sock.sendall(client_frame(opcode, payload))

    def send(self, obj: dict[str, Any]) -> None:
        self.send_frame(OP_TEXT, json.dumps(obj).encode())

    def send_close(self, code: int = 1000) -> None:
        self.send_frame(OP_CLOSE, struct.pack("!H", code))

    # -- receiving -------------------------------------------------------------------------
    def _fill(self, timeout: float | None = None) -> None:
        if timeout is not None:
            self.sock.settimeout(max(timeout, 0.001))
        data = self.sock.recv(262144)
        if not data:
            raise Closed("the server closed the TCP connection")
        self.buf += data

    def next_frame(self, timeout: float = TIMEOUT) -> tuple[int, bytes]:
        """The next whole frame as (opcode, payload); the server's frames are never masked."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no whole frame within {timeout}s")
            self._fill(left)

    def _parse(self) -> tuple[int, bytes] | None:
        buf = self.buf
        if len(buf) < 2:
            return None
        first, second = buf[0], buf[1]
        assert first & 0x70 == 0, f"reserved bits set: {first:#x}"
        assert first & 0x80, "the server fragments nothing"
        assert second & 0x80 == 0, "server frames must not be masked"
        length, offset = second & 0x7F, 2
        if length == 126:
            if len(buf) < 4:
                return None
            length, offset = struct.unpack("!H", buf[2:4])[0], 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length, offset = struct.unpack("!Q", buf[2:10])[0], 10
        if len(buf) < offset + length:
            return None
        payload = buf[offset:offset + length]
        self.buf = buf[offset + length:]
        opcode = first & 0x0F
        assert opcode in (OP_TEXT, OP_CLOSE, OP_PING, OP_PONG), f"opcode {opcode}"
        if opcode == OP_CLOSE:
            self.close_code = struct.unpack("!H", payload[:2])[0] if payload else 1005
        return opcode, payload

    def next_event(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next text frame's JSON, skipping pings (which are never answered)."""
        deadline = time.monotonic() + timeout
        while True:
            opcode, payload = self.next_frame(max(0.0, deadline - time.monotonic()))
            if opcode == OP_TEXT:
                return json.loads(payload)
            if opcode == OP_CLOSE:
                raise Closed(f"close frame {self.close_code}")

    def expect(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event = self.next_event(max(0.0, deadline - time.monotonic()))
            if event.get("type") == kind:
                return event

    def drain_to_close(self, timeout: float = TIMEOUT, truncated_ok: bool = False
                       ) -> list[tuple[int, bytes]]:
        """Every frame up to the end of the stream; the close frame must come last, whole.

        ``truncated_ok``: the server may have aborted the TCP connection (a close
        timer ran out) in the middle of a frame; what came before must still parse.
        """
        frames: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                frame = self.next_frame(max(0.0, deadline - time.monotonic()))
            except (Closed, ConnectionResetError):
                assert truncated_ok or not self.buf, (
                    f"the stream ends inside a frame: {len(self.buf)} bytes")
                return frames
            frames.append(frame)
            if frame[0] == OP_CLOSE:
                try:
                    self._fill(1.0)
                except (Closed, ConnectionResetError, TimeoutError):
                    pass
                assert not self.buf, "bytes after the close frame"
                return frames

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
