"""Microseconds per frame by step of the transport, in one process (no server).

``python -m loadtest.frame_cost`` times, for a client text frame of ``--size`` bytes
(masked, as clients send them):

* unmasking alone: websockets' C ``apply_mask`` against the pure-Python int trick;
* receive: bytes in -> text out (unmask, frame rules, UTF-8), through wsproto's
  ``Connection`` (what wschat used before #18) and through
  ``WebSocketConnection._receive`` (the handler replaced by a no-op);
* send: one pre-built server frame to a socket (``socket.send`` on a non-blocking
  socketpair, the other end drained), and ``send_frame`` on a connection (the same
  plus the checks on the fan-out path).
"""

from __future__ import annotations

import argparse
import os
import socket
import time
import types
from collections.abc import Callable
from typing import Any

from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from wschat import connection as wsconn
from wschat.connection import EchoConnection, control_frame, unmask
from wschat.protocol import text_frame


def best_us(fn: Callable[[], Any], number: int, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / number * 1e6


def pure_unmask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    key = (mask * ((n + 3) >> 2))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        n, "little")


class _Host:
    max_outbound_bytes = 1 << 30
    max_message_bytes = 1 << 20
    socket_send_buffer = 0
    heartbeat_interval = 30.0
    metrics = types.SimpleNamespace(disconnected=lambda reason: None)

    def spawn(self, *args: Any) -> None:
        raise AssertionError("no greenlet expected")

    def forget(self, conn: Any) -> None:
        pass


class _Null(EchoConnection):
    __slots__ = ()

    def _on_text(self, text: str) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=120)
    ap.add_argument("-n", type=int, default=20000)
    args = ap.parse_args()
    n = args.n
    text = ("x" * args.size).encode()
    mask = os.urandom(4)
    masked = pure_unmask(text, mask)
    frame = bytes((0x81, 0xFE, *len(text).to_bytes(2, "big"))) + mask + masked \
        if len(text) >= 126 else bytes((0x81, 0x80 | len(text))) + mask + masked
    rows: list[tuple[str, float]] = []

    rows.append(("unmask: int trick (pure Python)", best_us(lambda: pure_unmask(masked, mask), n)))
    rows.append(("unmask: websockets.speedups.apply_mask", best_us(lambda: unmask(masked, mask), n)))

    proto = Connection(ConnectionType.SERVER)

    def wsproto_receive() -> None:
        proto.receive_data(frame)
        for event in proto.events():
            assert isinstance(event, TextMessage)

    rows.append(("receive: wsproto Connection (before)", best_us(wsproto_receive, n)))

    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    conn = _Null(_Host(), a, "c1", types.SimpleNamespace(  # type: ignore[arg-type]
        user_id="u", username="u", expires_at=None, rooms=None, mod_rooms=()), True, "")
    rows.append(("receive: WebSocketConnection._receive (after)",
                 best_us(lambda: conn._receive(frame), n)))

    out = text_frame(text)

    def drain() -> None:
        try:
            while b.recv(1 << 20):
                pass
        except BlockingIOError:
            pass

    def raw_send() -> None:
        a.send(out)

    def conn_send() -> None:
        conn.send_frame(out)

    backlog = [out] * 10

    def backlog_each() -> None:  # before #18: the flusher sent queued frames one by one
        for frame in backlog:
            a.send(frame)

    def backlog_joined() -> None:  # now: joined, one send
        a.send(b"".join(backlog))

    for label, fn in (("send: socket.send of the frame (floor)", raw_send),
                      ("send: WebSocketConnection.send_frame", conn_send),
                      ("backlog of 10 frames, one send each (per frame)", backlog_each),
                      ("backlog of 10 frames, joined, one send (per frame)", backlog_joined)):
        best = float("inf")
        inner = 10 if "backlog" in label else 100  # what the socket buffer holds
        for _ in range(5):
            total = 0.0
            for _ in range(n // 100):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                total += time.perf_counter() - t0
                drain()
            best = min(best, total / (n // 100 * inner))
        rows.append((label, best * 1e6 / (10 if "backlog" in label else 1)))
    rows.append(("pong frame built", best_us(lambda: control_frame(0xA, b"x"), n)))
    print(f"frame of {len(text)} bytes of text ({len(frame)} on the wire), best of 5, "
          f"mask in C: {wsconn._apply_mask is not None}")
    for label, us in rows:
        print(f"  {us:7.3f} us  {label}")


if __name__ == "__main__":
    main()
