"""Peer: the least Python a chat message can cost on wschat's stack (gevent, no framework).

Speaks the protocol subset in peers/README.md and nothing more: one greenlet per
connection blocked in ``recv``, the RFC 6455 handshake and frame parsing inline (the
mask removed in C by ``websockets.speedups``), orjson, and a fan-out that builds each
frame once and hands it to every member with one ``send``. No validation beyond what
routing needs, no rate limit, history, metrics, flow control or slow-consumer
handling: what wschat's own transport and chat core add on top of this is the
difference the smallrooms scenario shows between the two.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse
import base64
import hashlib
import itertools
import os
import time
from urllib.parse import parse_qs, urlsplit

import gevent
import orjson
from gevent.server import StreamServer
from websockets.speedups import apply_mask

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_ids = itertools.count(1)
_dm_ids = itertools.count(1)
rooms: dict[str, dict] = {}  # room -> {connection: (user_id, username)}
seqs: dict[str, int] = {}
users: dict[str, set] = {}  # user_id -> its connections (a DM goes to each)
conns: set = set()


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


class Conn:
    __slots__ = ("alive", "raw", "rooms", "sock", "user_id", "username")

    def __init__(self, sock, user_id: str, username: str) -> None:
        self.sock = sock
        self.raw = sock._sock  # the non-blocking OS socket: a send that never yields
        self.user_id = user_id
        self.username = username
        self.rooms: set[str] = set()
        self.alive = True

    def send(self, data: bytes) -> None:
        try:
            sent = self.raw.send(data)
            if sent < len(data):  # the kernel's buffer is full: wait, in this greenlet
                self.sock.sendall(data[sent:])
        except BlockingIOError:
            self.sock.sendall(data)
        except OSError:
            pass

    def send_obj(self, obj: dict) -> None:
        self.send(frame(orjson.dumps(obj)))


def broadcast(members, data: bytes, skip=None) -> None:
    for conn in list(members):
        if conn is not skip:
            conn.send(data)


def handshake(sock) -> tuple[str, bytes] | None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk or len(buf) > 16384:
            return None
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    path = lines[0].split(b" ")[1].decode()
    key = b""
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    return path, rest


def handle(sock, _addr) -> None:
    got = handshake(sock)
    if got is None:
        sock.close()
        return
    path, buf = got
    query = parse_qs(urlsplit(path).query)
    user_id = f"{USER_PREFIX}{next(_ids)}"
    me = Conn(sock, user_id, query.get("username", [user_id])[0])
    HOOKS[0](me)
    conns.add(me)
    me.send_obj({"type": "welcome", "user_id": user_id, "username": me.username})
    try:
        while True:
            while len(buf) >= 2:
                b1 = buf[1]
                n = b1 & 0x7F
                head = 6
                if n == 126:
                    head = 8
                    n = int.from_bytes(buf[2:4], "big") if len(buf) >= 4 else 0
                elif n == 127:
                    head = 14
                    n = int.from_bytes(buf[2:10], "big") if len(buf) >= 10 else 0
                if len(buf) < head + n:
                    break
                payload = apply_mask(buf[head:head + n], buf[head - 4:head])
                opcode = buf[0] & 0x0F
                buf = buf[head + n:]
                if opcode == 0x1:
                    on_text(me, payload)
                elif opcode == 0x8:
                    me.send(frame(payload[:2], 0x8))
                    return
                elif opcode == 0x9:
                    me.send(frame(payload, 0xA))
                elif opcode == 0xA:
                    me.alive = True
            data = sock.recv(65536)
            if not data:
                return
            buf = buf + data if buf else data
    except OSError:
        pass
    finally:
        for room in list(me.rooms):
            leave(me, room)
        HOOKS[1](me)
        conns.discard(me)
        sock.close()


def connected(me: Conn) -> None:
    users.setdefault(me.user_id, set()).add(me)


def disconnected(me: Conn) -> None:
    mine = users.get(me.user_id)
    if mine is not None:
        mine.discard(me)
        if not mine:
            del users[me.user_id]


# What gevent_bare_redis.py replaces to route through Redis (with post_message, post_dm,
# enter, announce and leave).
USER_PREFIX = "u-"
HOOKS = (connected, disconnected)


def leave(me: Conn, room: str) -> None:
    me.rooms.discard(room)
    members = rooms.get(room)
    if members is None or members.pop(me, None) is None:
        return
    announce(me, room, "offline")
    if not members:
        del rooms[room]


def on_text(me: Conn, raw: bytes) -> None:
    try:
        cmd = orjson.loads(raw)
        kind = cmd.get("type")
    except (orjson.JSONDecodeError, AttributeError):
        me.send_obj({"type": "error", "code": "invalid_json", "message": "bad JSON"})
        return
    if kind == "message":
        room = cmd.get("room")
        if room not in me.rooms:
            me.send_obj({"type": "error", "code": "not_in_room", "message": "join first"})
            return
        post_message(me, room, cmd)
    elif kind == "dm":
        post_dm(me, cmd)
    elif kind == "join":
        room = str(cmd.get("room"))
        members = enter(me, room)
        me.rooms.add(room)
        reply = {"type": "joined", "room": room,
                 "users": [{"user_id": u, "username": n} for u, n in members.values()]}
        if "id" in cmd:
            reply["id"] = cmd["id"]
        me.send_obj(reply)
        announce(me, room, "online")
    elif kind == "leave":
        room = str(cmd.get("room"))
        leave(me, room)
        me.send_obj({"type": "left", "room": room})
    elif kind == "ping":
        me.send_obj({"type": "pong"})
    else:
        me.send_obj({"type": "error", "code": "unknown_type", "message": str(kind)})


def post_message(me: Conn, room: str, cmd: dict) -> None:
    seqs[room] = seq = seqs.get(room, 0) + 1
    event = {"type": "message", "room": room, "id": seq, "from": me.username,
             "user_id": me.user_id, "text": cmd.get("text", ""),
             "timestamp": time.time_ns() // 1_000_000}
    if "client_msg_id" in cmd:
        event["client_msg_id"] = cmd["client_msg_id"]
    broadcast(rooms[room], frame(orjson.dumps(event)))


def post_dm(me: Conn, cmd: dict) -> None:
    to_id = cmd.get("to")
    to = users.get(to_id)
    if not to:
        me.send_obj({"type": "error", "code": "user_not_found", "message": "no such user online"})
        return
    event = {"type": "dm", "id": next(_dm_ids), "from": me.username, "user_id": me.user_id,
             "to": to_id, "text": cmd.get("text", ""), "timestamp": time.time_ns() // 1_000_000}
    if "client_msg_id" in cmd:
        event["client_msg_id"] = cmd["client_msg_id"]
    data = frame(orjson.dumps(event))
    broadcast(to, data)
    if to_id != me.user_id:
        broadcast(users[me.user_id], data)


def enter(me: Conn, room: str) -> dict:
    """``me`` among ``room``'s members; the members (those the ``joined`` reply lists)."""
    members = rooms.setdefault(room, {})
    members[me] = (me.user_id, me.username)
    return members


def announce(me: Conn, room: str, status: str) -> None:
    """``me``'s presence to the other members of ``room``."""
    broadcast(rooms.get(room, ()), frame(orjson.dumps({
        "type": "presence", "room": room, "user": me.username, "user_id": me.user_id,
        "status": status})), me)


def heartbeat(interval: float) -> None:
    """As wschat: a ping every interval; a peer silent for a whole interval is dropped."""
    ping = frame(b"", 0x9)
    while True:
        gevent.sleep(interval)
        for conn in list(conns):
            if not conn.alive:
                conn.sock.close()
                continue
            conn.alive = False
            conn.send(ping)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    args = p.parse_args()
    gevent.spawn(heartbeat, float(os.environ.get("HEARTBEAT_INTERVAL", "30")))
    server = StreamServer((args.host, args.port), handle, backlog=4096)
    print(f"gevent-bare peer listening on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
