"""Peer: gevent_bare.py's chat across worker processes through Redis, redis-py used plainly.

The same protocol subset and frame handling as gevent_bare.py (imported from it), with
what spreading a chat over processes needs at the least: per-room ids and DM ids from
Redis, and every event through Redis pub/sub (a channel per room and per user, each
worker subscribed to those its connections are in). A room message or DM is one
``EVALSHA`` (``INCR`` and ``PUBLISH`` in one script, the id spliced into the encoded
event there); each worker with a member gets one copy and writes one frame per
member. redis-py is used the plain way: one client per worker, each command issued
from its connection's greenlet on a pooled connection (one round trip per command, no
pipelining), one pub/sub connection read by one greenlet. No history, rate limit,
dedupe, validation or metrics; the ``joined`` reply lists only the members on the
joining worker.

It is what wschat's Redis store (its own pipelining of the commands of concurrent
greenlets, issue 24) is measured against: the same work, done the straightforward way.

``--workers N`` starts N processes accepting from one listening socket, as gunicorn
does; ``REDIS_URL`` (or ``--redis-url``) says where Redis is.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

import gevent
import gevent_bare as bare  # (this folder is the script's, so on sys.path)
import orjson
import redis
from gevent.server import StreamServer

POST = """local id = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', KEYS[2], ARGV[1] .. id .. ARGV[2])
return id"""
# A DM: the recipient's channel, and the sender's for its echo; 0 when nobody has the
# recipient (its id is then spent: DM ids are unique, not gap-free, as in the peers' README).
DM = """local id = redis.call('INCR', KEYS[1])
local event = ARGV[1] .. id .. ARGV[2]
if redis.call('PUBLISH', KEYS[2], event) == 0 then return 0 end
if KEYS[3] ~= KEYS[2] then redis.call('PUBLISH', KEYS[3], event) end
return id"""

rooms: dict[str, dict] = {}  # room -> {connection: (user_id, username)}, this worker's members
users: dict[str, set] = {}  # user_id -> its connections on this worker
client: redis.Redis
pubsub: redis.client.PubSub
post_script = dm_script = None


def split_at_id(head: dict, rest: dict) -> tuple[bytes, bytes]:
    """The encoded event around its id: ``{...head,"id":`` and ``,...rest}``."""
    return orjson.dumps(head)[:-1] + b',"id":', b"," + orjson.dumps(rest)[1:]


def announce(me: bare.Conn, room: str, status: str) -> None:
    event = orjson.dumps({"type": "presence", "room": room, "user": me.username,
                          "user_id": me.user_id, "status": status})
    client.publish(f"r:{room}", b"P" + me.user_id.encode() + b"\n" + event)


def post_message(me: bare.Conn, room: str, cmd: dict) -> None:
    rest = {"from": me.username, "user_id": me.user_id, "text": cmd.get("text", ""),
            "timestamp": time.time_ns() // 1_000_000}
    if "client_msg_id" in cmd:
        rest["client_msg_id"] = cmd["client_msg_id"]
    head, tail = split_at_id({"type": "message", "room": room}, rest)
    post_script(keys=[f"seq:{room}", f"r:{room}"], args=[head, tail])


def post_dm(me: bare.Conn, cmd: dict) -> None:
    to_id = cmd.get("to")
    rest = {"from": me.username, "user_id": me.user_id, "to": to_id,
            "text": cmd.get("text", ""), "timestamp": time.time_ns() // 1_000_000}
    if "client_msg_id" in cmd:
        rest["client_msg_id"] = cmd["client_msg_id"]
    head, tail = split_at_id({"type": "dm"}, rest)
    if not dm_script(keys=["seq:dm", f"u:{to_id}", f"u:{me.user_id}"], args=[head, tail]):
        me.send_obj({"type": "error", "code": "user_not_found", "message": "no such user online"})


def enter(me: bare.Conn, room: str) -> dict:
    members = rooms.get(room)
    if members is None:
        members = rooms[room] = {}
        pubsub.subscribe(f"r:{room}")
    members[me] = (me.user_id, me.username)
    return members


def leave(me: bare.Conn, room: str) -> None:
    me.rooms.discard(room)
    members = rooms.get(room)
    if members is None or members.pop(me, None) is None:
        return
    if not members:
        del rooms[room]
        pubsub.unsubscribe(f"r:{room}")
    announce(me, room, "offline")


def deliver_forever() -> None:
    """This worker's copy of every event of its rooms and users: one frame, each member."""
    for item in pubsub.listen():
        if item["type"] != "message":
            continue
        channel, data = item["channel"], item["data"]
        skip = None
        if data[:1] == b"P":  # presence: not to the user it is about
            skip, _, data = data[1:].partition(b"\n")
            skip = skip.decode()
        members = (rooms.get(channel[2:].decode()) if channel[:2] == b"r:"
                   else users.get(channel[2:].decode()))
        if not members:
            continue
        frame = bare.frame(data)
        for conn in list(members):
            if conn.user_id != skip:
                conn.send(frame)


def on_connect(me: bare.Conn) -> None:
    users.setdefault(me.user_id, set()).add(me)
    pubsub.subscribe(f"u:{me.user_id}")


def on_disconnect(me: bare.Conn) -> None:
    mine = users.get(me.user_id)
    if mine is not None:
        mine.discard(me)
        if not mine:
            del users[me.user_id]
            pubsub.unsubscribe(f"u:{me.user_id}")


def serve(fd: int, redis_url: str) -> None:
    global client, pubsub, post_script, dm_script
    client = redis.Redis.from_url(redis_url)
    post_script = client.register_script(POST)
    dm_script = client.register_script(DM)
    pubsub = client.pubsub()
    pubsub.subscribe("bare:workers")  # listen() returns at once without a subscription
    # gevent_bare's connection handling, routed through Redis instead of its dicts.
    bare.post_message, bare.post_dm, bare.enter, bare.announce, bare.leave = (
        post_message, post_dm, enter, announce, leave)
    bare.HOOKS = (on_connect, on_disconnect)
    bare.USER_PREFIX = f"u-{os.getpid()}-"
    gevent.spawn(deliver_forever)
    gevent.spawn(bare.heartbeat, float(os.environ.get("HEARTBEAT_INTERVAL", "30")))
    listener = socket.socket(fileno=fd)
    StreamServer(listener, bare.handle).serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    p.add_argument("--workers", type=int, default=int(os.environ.get("WEB_CONCURRENCY", "2")))
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    p.add_argument("--fd", type=int, help=argparse.SUPPRESS)  # a worker: the listener to serve
    args = p.parse_args()
    if args.fd is not None:
        serve(args.fd, args.redis_url)
        return
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(4096)
    workers = [subprocess.Popen([sys.executable, __file__, "--fd", str(listener.fileno()),
                                 "--redis-url", args.redis_url], pass_fds=(listener.fileno(),))
               for _ in range(args.workers)]
    print(f"gevent-bare-redis peer: {args.workers} workers on {args.host}:{args.port}", flush=True)

    def stop(*_: object) -> None:
        for w in workers:
            w.terminate()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    for w in workers:
        w.wait()


if __name__ == "__main__":
    main()
