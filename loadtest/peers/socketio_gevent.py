"""Peer: a minimal chat-room server on python-socketio + gevent (pywsgi, simple-websocket).

Speaks the protocol subset in peers/README.md inside socket.io events: every object,
in both directions, is the payload of the event ``msg``. Clients connect straight to
the WebSocket transport (``/socket.io/?EIO=4&transport=websocket``), as the load
generator's socket.io adapter does.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import itertools  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from urllib.parse import parse_qs  # noqa: E402

import socketio  # noqa: E402
from gevent import pywsgi  # noqa: E402

HEARTBEAT = float(os.environ.get("HEARTBEAT_INTERVAL", "30"))
sio = socketio.Server(async_mode="gevent", cors_allowed_origins="*", transports=["websocket"],
                      ping_interval=HEARTBEAT, ping_timeout=HEARTBEAT, max_http_buffer_size=65536)
_ids = itertools.count(1)
users: dict[str, tuple[str, str]] = {}  # sid -> (user_id, username)
rooms: dict[str, dict[str, tuple[str, str]]] = {}  # room -> {sid: user}
joined: dict[str, set[str]] = {}  # sid -> rooms
seqs: dict[str, int] = {}


@sio.event
def connect(sid, environ):
    query = parse_qs(environ.get("QUERY_STRING", ""))
    user_id = f"u-{next(_ids)}"
    username = query.get("username", [user_id])[0]
    users[sid] = (user_id, username)
    joined[sid] = set()
    sio.emit("msg", {"type": "welcome", "user_id": user_id, "username": username}, to=sid)


@sio.event
def disconnect(sid, *args):
    for room in list(joined.get(sid, ())):
        _leave(sid, room)
    users.pop(sid, None)
    joined.pop(sid, None)


@sio.on("msg")
def on_msg(sid, cmd):
    if not isinstance(cmd, dict):
        sio.emit("msg", {"type": "error", "code": "invalid_message", "message": "object expected"}, to=sid)
        return
    kind = cmd.get("type")
    user_id, username = users[sid]
    if kind == "message":
        room = cmd.get("room")
        if room not in joined[sid]:
            sio.emit("msg", {"type": "error", "code": "not_in_room", "message": "join first"}, to=sid)
            return
        seqs[room] = seq = seqs.get(room, 0) + 1
        event = {"type": "message", "room": room, "id": seq, "from": username, "user_id": user_id,
                 "text": cmd.get("text", ""), "timestamp": time.time_ns() // 1_000_000}
        if "client_msg_id" in cmd:
            event["client_msg_id"] = cmd["client_msg_id"]
        sio.emit("msg", event, room=room)
    elif kind == "join":
        room = str(cmd.get("room"))
        members = rooms.setdefault(room, {})
        members[sid] = users[sid]
        joined[sid].add(room)
        sio.enter_room(sid, room)
        reply = {"type": "joined", "room": room,
                 "users": [{"user_id": u, "username": n} for u, n in members.values()]}
        if "id" in cmd:
            reply["id"] = cmd["id"]
        sio.emit("msg", reply, to=sid)
        sio.emit("msg", {"type": "presence", "room": room, "user": username, "user_id": user_id,
                         "status": "online"}, room=room, skip_sid=sid)
    elif kind == "leave":
        room = str(cmd.get("room"))
        _leave(sid, room)
        sio.emit("msg", {"type": "left", "room": room}, to=sid)
    elif kind == "ping":
        sio.emit("msg", {"type": "pong"}, to=sid)
    else:
        sio.emit("msg", {"type": "error", "code": "unknown_type", "message": str(kind)}, to=sid)


def _leave(sid, room):
    joined.get(sid, set()).discard(room)
    members = rooms.get(room)
    if members is None or members.pop(sid, None) is None:
        return
    sio.leave_room(sid, room)
    user_id, username = users[sid]
    sio.emit("msg", {"type": "presence", "room": room, "user": username, "user_id": user_id,
                     "status": "offline"}, room=room, skip_sid=sid)
    if not members:
        del rooms[room]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    args = parser.parse_args()
    server = pywsgi.WSGIServer((args.host, args.port), socketio.WSGIApp(sio), log=None,
                               backlog=4096)
    print(f"socketio peer listening on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
