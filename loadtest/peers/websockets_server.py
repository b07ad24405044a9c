"""Peer: a minimal chat-room server on the `websockets` library (asyncio).

Speaks the protocol subset in peers/README.md. Fan-out uses ``broadcast()``, which
frames a message once and writes it to every member without awaiting.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import time
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import broadcast, serve

_ids = itertools.count(1)
rooms: dict[str, dict] = {}  # room -> {connection: (user_id, username)}
seqs: dict[str, int] = {}
users: dict[str, set] = {}  # user_id -> its connections (a DM goes to each)
_dm_ids = itertools.count(1)


def dumps(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"))


async def handler(ws) -> None:
    query = parse_qs(urlsplit(ws.request.path).query)
    user_id = f"u-{next(_ids)}"
    username = query.get("username", [user_id])[0]
    me = (user_id, username)
    mine: set[str] = set()
    users.setdefault(user_id, set()).add(ws)
    await ws.send(dumps({"type": "welcome", "user_id": user_id, "username": username}))
    try:
        async for raw in ws:
            try:
                cmd = json.loads(raw)
                kind = cmd.get("type")
            except (ValueError, AttributeError):
                await ws.send(dumps({"type": "error", "code": "invalid_json", "message": "bad JSON"}))
                continue
            if kind == "message":
                room = cmd.get("room")
                if room not in mine:
                    await ws.send(dumps({"type": "error", "code": "not_in_room", "message": "join first"}))
                    continue
                seqs[room] = seq = seqs.get(room, 0) + 1
                event = {"type": "message", "room": room, "id": seq, "from": username,
                         "user_id": user_id, "text": cmd.get("text", ""),
                         "timestamp": time.time_ns() // 1_000_000}
                if "client_msg_id" in cmd:
                    event["client_msg_id"] = cmd["client_msg_id"]
                broadcast(rooms[room], dumps(event))
            elif kind == "dm":
                to = users.get(cmd.get("to"))
                if not to:
                    await ws.send(dumps({"type": "error", "code": "user_not_found",
                                         "message": "no such user online"}))
                    continue
                event = {"type": "dm", "id": next(_dm_ids), "from": username, "user_id": user_id,
                         "to": cmd["to"], "text": cmd.get("text", ""),
                         "timestamp": time.time_ns() // 1_000_000}
                if "client_msg_id" in cmd:
                    event["client_msg_id"] = cmd["client_msg_id"]
                broadcast(to | users[user_id], dumps(event))
            elif kind == "join":
                room = str(cmd.get("room"))
                members = rooms.setdefault(room, {})
                others = list(members)
                members[ws] = me
                mine.add(room)
                reply = {"type": "joined", "room": room,
                         "users": [{"user_id": u, "username": n} for u, n in members.values()]}
                if "id" in cmd:
                    reply["id"] = cmd["id"]
                await ws.send(dumps(reply))
                broadcast(others, dumps({"type": "presence", "room": room, "user": username,
                                         "user_id": user_id, "status": "online"}))
            elif kind == "leave":
                room = str(cmd.get("room"))
                _leave(ws, room, me, mine)
                await ws.send(dumps({"type": "left", "room": room}))
            elif kind == "ping":
                await ws.send('{"type":"pong"}')
            else:
                await ws.send(dumps({"type": "error", "code": "unknown_type", "message": str(kind)}))
    finally:
        for room in list(mine):
            _leave(ws, room, me, mine)
        conns = users.get(user_id)
        if conns is not None:
            conns.discard(ws)
            if not conns:
                del users[user_id]


def _leave(ws, room: str, me: tuple[str, str], mine: set[str]) -> None:
    mine.discard(room)
    members = rooms.get(room)
    if members is None or members.pop(ws, None) is None:
        return
    broadcast(list(members), dumps({"type": "presence", "room": room, "user": me[1],
                                    "user_id": me[0], "status": "offline"}))
    if not members:
        del rooms[room]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    args = parser.parse_args()
    interval = float(os.environ.get("HEARTBEAT_INTERVAL", "30"))
    async with serve(handler, args.host, args.port, compression=None, backlog=4096,
                     ping_interval=interval, ping_timeout=interval,
                     max_size=65536):
        print(f"websockets peer listening on {args.host}:{args.port}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
