"""Before/after figures for two attacks of issue #17 (loopback only, bounded in time).

    python tests/measure_hostile.py [churn] [fragments]     # from the repository root

Starts a real server with default settings (from this checkout) and runs:

* churn: one guest sends 4,000 join+leave pairs into a 300-member room on one
  connection (as fast as it can, reading its replies, up to 20 s), while a
  well-behaved member pings;
  reports presence frames delivered, join requests handled, and the ping round trip.
* fragments: one connection streams empty continuation frames for 5 s; then 20
  connections each hold a message of 32,000 two-byte fragments; reports bytes
  sent, whether the server closed the stream, and the worker's RSS growth.

Not a test (pytest does not collect it): the figures go to docs/operations.md.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))

from conftest import Server  # noqa: E402
from rawws import Closed, RawClient  # noqa: E402
from test_hostile import (  # noqa: E402
    OP_CONT, OP_TEXT, Watcher, frame, text, upgrade, worker_rss_kib,
)
from test_hostile import metric as _metric  # noqa: E402


def metric(srv: Server, name: str, **labels: str) -> float:
    """A sample, waiting (up to a minute) for a server too busy to answer a scrape."""
    for _ in range(12):
        try:
            return _metric(srv, name, **labels)
        except OSError:
            print("(a /metrics scrape timed out: the server is saturated)")
    raise TimeoutError("no /metrics answer within a minute")


def churn(srv: Server, members: int = 300, pairs: int = 4000, limit: float = 20.0) -> None:
    room = "measure-churn"
    clients = []
    for i in range(members):
        member = RawClient(srv.port, source=f"127.0.{30 + i // 200}.{2 + i % 200}")
        member.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        member.send({"type": "join", "room": room})
        member.expect("joined")
        clients.append(member)
    # Presence of the members' own joins may still be draining: start from quiet.
    last, quiet_since = -1.0, time.monotonic()
    while time.monotonic() - quiet_since < 2.0:
        now = metric(srv, "wschat_messages_delivered_total", type="presence")
        if now != last:
            last, quiet_since = now, time.monotonic()
        time.sleep(0.25)
    presence0 = metric(srv, "wschat_messages_delivered_total", type="presence")
    joins0 = metric(srv, "wschat_messages_received_total", type="join")
    blob = (text({"type": "join", "room": room}) + text({"type": "leave", "room": room}))
    sock = upgrade(srv.port, source="127.0.40.2")
    sock.settimeout(limit)

    def drain() -> None:  # the attacker reads its replies: no slow-consumer cut-off
        try:
            while sock.recv(1 << 20):
                pass
        except OSError:
            pass

    threading.Thread(target=drain, daemon=True).start()
    with Watcher(srv, room) as watcher:
        started = time.monotonic()
        written = 0
        try:
            for _ in range(pairs // 100):
                sock.sendall(blob * 100)
                written += 100
                if time.monotonic() - started > limit:
                    break
        except OSError:
            pass
        # Let the server work through what it was sent (bounded).
        deadline = started + limit
        last = -1.0
        while time.monotonic() < deadline:
            time.sleep(1.0)
            now = metric(srv, "wschat_messages_delivered_total", type="presence")
            if now == last:
                break
            last = now
        elapsed = time.monotonic() - started
    presence = metric(srv, "wschat_messages_delivered_total", type="presence") - presence0
    joins = metric(srv, "wschat_messages_received_total", type="join") - joins0
    rtts = watcher.rtts or [float("nan")]
    print(f"churn: {written} pairs written on one connection, {joins:.0f} joins handled, "
          f"{presence:.0f} presence frames delivered in {elapsed:.1f} s; watcher ping "
          f"max {max(rtts) * 1000:.0f} ms, median {statistics.median(rtts) * 1000:.1f} ms "
          f"({len(watcher.rtts)} pings)")
    sock.close()
    for member in clients:
        member.close()


def fragments(srv: Server, seconds: float = 5.0) -> None:
    rss0 = worker_rss_kib(srv)
    sock = upgrade(srv.port, source="127.0.41.2")
    sock.settimeout(2.0)
    sock.sendall(frame(OP_TEXT, b"{", fin=False))
    chunk = frame(OP_CONT, fin=False) * 10000
    sent, closed = 0, "no"
    started = time.monotonic()
    try:
        while time.monotonic() - started < seconds:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError as exc:
        closed = f"yes ({exc.__class__.__name__} after {time.monotonic() - started:.2f} s)"
    time.sleep(1.0)
    rss1 = worker_rss_kib(srv)
    print(f"fragments: {sent / 1e6:.1f} MB of empty continuation frames written in "
          f"{seconds:.0f} s, connection cut off: {closed}; worker RSS "
          f"{(rss1 - rss0) / 1024:+.1f} MiB")
    sock.close()
    held = []
    for i in range(20):
        s = upgrade(srv.port, source=f"127.0.42.{2 + i}")
        s.settimeout(5.0)
        try:
            s.sendall(frame(OP_TEXT, b"{ ", fin=False)
                      + frame(OP_CONT, b"  ", fin=False) * 32000)
        except OSError:
            pass
        held.append(s)
    time.sleep(1.0)
    rss2 = worker_rss_kib(srv)
    open_count = 0
    for s in held:
        data = b""
        try:
            s.settimeout(0.2)
            while chunk := s.recv(65536):
                data += chunk
        except socket.timeout:
            open_count += b"\x88" not in data  # no close frame (welcome is ASCII JSON)
        except OSError:
            pass  # reset: cut off
        s.close()
    print(f"fragments: 20 connections x 32,000 two-byte fragments: worker RSS "
          f"{(rss2 - rss1) / 1024:+.1f} MiB ({(rss2 - rss1) / 20 / 1024:.2f} MiB per "
          f"connection), {open_count} of 20 still held open")


if __name__ == "__main__":
    # One server each: churn can leave an unpatched server's worker restarting.
    for part in sys.argv[1:] or ["churn", "fragments"]:
        with Server() as server:
            if part == "churn":
                try:
                    churn(server)
                except Closed:
                    print("churn: a member was disconnected")
            else:
                fragments(server)
