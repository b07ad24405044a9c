"""What each chat operation costs Redis: commands and bytes, measured.

``python -m loadtest.redis_cost [--count N] [--redis-url URL]`` starts wschat
with one worker on Redis (a private redis-server unless ``--redis-url``; the
database is flushed), performs each operation ``N`` times through real
WebSocket clients, waiting for each one's reply, and reads Redis's own
counters (``INFO commandstats``, ``total_net_input_bytes``,
``total_net_output_bytes``) before and after. The cost of reading INFO itself
is measured with an empty interval and subtracted. Prints two Markdown tables
(docs/operations.md, "Sizing Redis", holds their latest output): what each
operation costs, and what Redis keeps (``MEMORY USAGE`` of the keys that grow with
traffic: a ``client_msg_id``'s dedupe key, a message held in the history, a
sender's rate-limit bucket; and, since ``MEMORY USAGE`` leaves out a key's expiry
entry and hash-table slots, how much ``used_memory`` grows per dedupe key when
100,000 copies of a real one are written).

Bytes out include the pub/sub fan-out to the one subscribed worker; each further
worker (or pod) with members in the room adds one copy of the payload.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from . import targets as tg

Snapshot = dict[str, float]


def snapshot(client: Any) -> Snapshot:
    out: Snapshot = {}
    for name, stats in client.info("commandstats").items():
        out[name.removeprefix("cmdstat_").replace("|", " ")] = float(stats["calls"])
    stats = client.info("stats")
    out["@in"] = float(stats["total_net_input_bytes"])
    out["@out"] = float(stats["total_net_output_bytes"])
    return out


def diff(a: Snapshot, b: Snapshot) -> Snapshot:
    return {k: b[k] - a.get(k, 0.0) for k in b if b[k] - a.get(k, 0.0)}


# Signs the tokens of the signed-in row (the server is started with it)
SECRET = "redis-cost-secret-0123456789abcdef01"


class Conn:
    def __init__(self, url: str, name: str, signed_in: bool = False) -> None:
        from websockets.sync.client import connect

        if signed_in:
            import jwt

            claims = {"sub": f"u-{name}", "name": name, "exp": int(time.time()) + 3600}
            token = jwt.encode(claims, SECRET, algorithm="HS256")
            query = f"token={token}"
        else:
            query = f"username={name}"
        self.ws = connect(f"{url}?{query}", max_size=None)
        self.user_id = self.expect("welcome")["user_id"]

    def send(self, **obj: Any) -> None:
        self.ws.send(json.dumps(obj))

    def expect(self, kind: str, **match: Any) -> dict[str, Any]:
        while True:
            event = json.loads(self.ws.recv(timeout=10))
            if event.get("type") == "error":
                raise RuntimeError(f"server error: {event}")
            if event.get("type") == kind and all(event.get(k) == v for k, v in match.items()):
                return event

    def close(self) -> None:
        self.ws.close()


def measure(client: Any, overhead: Snapshot, count: int, op: Callable[[int], None],
            settle: float = 0.0) -> Snapshot:
    before = snapshot(client)
    for i in range(count):
        op(i)
    if settle:
        time.sleep(settle)
    delta = diff(before, snapshot(client))
    return {k: (v - overhead.get(k, 0.0)) / count for k, v in delta.items()}


def main(argv: list[str] | None = None) -> None:
    import redis

    p = argparse.ArgumentParser(prog="python -m loadtest.redis_cost", description=__doc__)
    p.add_argument("--count", type=int, default=200, help="repetitions of each operation [200]")
    p.add_argument("--redis-url", default="", help="a Redis database (flushed!); default: a "
                   "private redis-server")
    o = p.parse_args(argv)
    port = tg.free_port()
    spec = tg.build("wschat-redis", port, tg.free_port(), max_connections=10000, heartbeat=30,
                    redis_url=o.redis_url,
                    env_overrides={"WEB_CONCURRENCY": "1", "JWT_SECRET": SECRET})
    server = tg.Server(spec, port, tg.LOGS / f"redis-cost-{port}.log")
    server.start()
    client = redis.Redis.from_url(spec.redis_url or "")
    try:
        url = f"ws://127.0.0.1:{port}/ws"
        a, b = Conn(url, "ann"), Conn(url, "bob")
        room = "sizing-" + uuid.uuid4().hex[:6]
        a.send(type="join", room=room), a.expect("joined", room=room)
        b.send(type="join", room=room), b.expect("joined", room=room)
        text = "x" * 100
        s0 = snapshot(client)
        overhead = diff(s0, snapshot(client))  # what reading INFO costs by itself
        rows: dict[str, Snapshot] = {}

        def message(i: int) -> None:
            a.send(type="message", room=room, text=text)
            a.expect("message", room=room), b.expect("message", room=room)

        def message_with_id(i: int) -> None:  # what the client libraries send
            a.send(type="message", room=room, text=text, client_msg_id=f"sizing-{i}")
            a.expect("message", room=room), b.expect("message", room=room)

        def dm(i: int) -> None:
            a.send(type="dm", to=b.user_id, text=text)
            b.expect("dm"), a.expect("dm")

        def typing(i: int) -> None:
            a.send(type="typing", room=room, status=i % 2 == 0)
            b.expect("typing", room=room)

        def history(i: int) -> None:
            a.send(type="history", room=room, limit=50)
            a.expect("history", room=room)

        joins = min(o.count, 90)  # a connection may be in at most 100 rooms
        rooms = [f"{room}-{i}" for i in range(joins)]

        def join(i: int) -> None:
            a.send(type="join", room=rooms[i]), a.expect("joined", room=rooms[i])
            b.send(type="join", room=rooms[i]), b.expect("joined", room=rooms[i])

        def leave(i: int) -> None:
            b.send(type="leave", room=rooms[i]), b.expect("left", room=rooms[i])
            a.send(type="leave", room=rooms[i]), a.expect("left", room=rooms[i])

        def connect(i: int) -> None:
            Conn(url, f"guest{i}").close()

        def connect_signed_in(i: int) -> None:
            Conn(url, f"user{i}", signed_in=True).close()

        rows["room message (100 B text, 2 members)"] = measure(client, overhead, o.count, message)
        rows["room message with a client_msg_id"] = measure(client, overhead, o.count,
                                                             message_with_id)
        rows["DM (100 B text, recipient online)"] = measure(client, overhead, o.count, dm)
        rows["typing on/off (one change)"] = measure(client, overhead, o.count, typing)
        rows["history (limit 50, 100 B messages)"] = measure(client, overhead, o.count, history)
        rows["join (first and second member of a new room)"] = measure(
            client, overhead, 2 * joins, lambda i: join(i // 2) if i % 2 == 0 else None)
        rows["leave (second and last member)"] = measure(
            client, overhead, 2 * joins, lambda i: leave(i // 2) if i % 2 == 0 else None)
        rows["connect + disconnect, guest (presence)"] = measure(
            client, overhead, o.count, connect, settle=1.0)
        rows["connect + disconnect, signed in (presence, its place under the user's cap, "
             "the ban check)"] = measure(client, overhead, o.count, connect_signed_in, settle=1.0)
        idle = 10.0
        rows[f"idle worker, per second (node heartbeat, {idle:g} s)"] = measure(
            client, overhead, 1, lambda i: time.sleep(idle))
        rows[f"idle worker, per second (node heartbeat, {idle:g} s)"] = {
            k: v / idle for k, v in rows[f"idle worker, per second (node heartbeat, {idle:g} s)"].items()}
        a.close(), b.close()
        kept = memory_kept(client, room, a.user_id)
    finally:
        server.stop()
        client.close()
    print("| operation | Redis commands per operation | bytes in | bytes out |")
    print("|---|---|---|---|")
    for name, d in rows.items():
        commands = ", ".join(f"{v:.2g} {k.upper()}" for k, v in sorted(d.items())
                             if not k.startswith("@") and abs(v) >= 0.01)
        print(f"| {name} | {commands or '-'} | {d.get('@in', 0):.0f} | {d.get('@out', 0):.0f} |")
    print()
    print("| what Redis keeps | bytes each (MEMORY USAGE, or as named) | of which the value |")
    print("|---|---|---|")
    for name, (usage, value) in kept.items():
        print(f"| {name} | {usage:.0f} | {value:.0f} |")


def used_memory_per_key(client: Any, name: bytes | str, value: bytes, ttl: int,
                        count: int) -> float:
    """used_memory's growth per key when ``count`` copies of ``name`` (suffixed, the same
    value and TTL) are written; the copies are deleted again."""
    base = name.encode() if isinstance(name, str) else name
    copies = [base + b"-" + str(i).encode() for i in range(count)]
    before = client.info("memory")["used_memory"]
    pipe = client.pipeline(transaction=False)
    for i, key in enumerate(copies):
        pipe.set(key, value, ex=max(ttl, 1))
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    grown = client.info("memory")["used_memory"] - before
    for i in range(0, count, 1000):
        client.delete(*copies[i:i + 1000])
    return grown / count


def memory_kept(client: Any, room: str, user_id: str, copies: int = 100_000
                ) -> dict[str, tuple[float, float]]:
    """Bytes per entry of what grows with traffic, as Redis counts them: (usage, value)."""
    from wschat.stores.redis.keys import PREFIX, RATE_LIMITS, dedupe_key, room_keys
    from wschat.stores.redis.ratelimit import RedisRateLimiter

    out: dict[str, tuple[float, float]] = {}
    dedupe = [dedupe_key(f"{PREFIX}{{r:{room}}}:", user_id, f"sizing-{i}") for i in range(50)]
    usage = [client.memory_usage(k, samples=0) for k in dedupe]
    if all(usage):
        out["dedupe key of a message with a client_msg_id (kept 1 hour)"] = (
            sum(usage) / len(usage), sum(client.strlen(k) for k in dedupe) / len(dedupe))
        # MEMORY USAGE leaves out what a key costs the keyspace beside itself: its entry in
        # the expiry table and its share of both hash tables. What sizing needs is the
        # growth of used_memory as such keys pile up, measured with copies of a real one.
        name, value = dedupe[0], client.get(dedupe[0])
        ttl = client.ttl(name)
        out[f"dedupe key, growth of used_memory per key ({copies:,} copies, with their TTL)"] = (
            used_memory_per_key(client, name, value, ttl, copies), float(len(value or b"")))
    hist = room_keys(room)[5]
    held = client.llen(hist)
    if held:
        out[f"a message in a room's history (of {held} held)"] = (
            client.memory_usage(hist, samples=0) / held,
            sum(len(m) for m in client.lrange(hist, 0, -1)) / held)
    # A sender's bucket, spent by the same script a post runs (the server under test
    # runs with limits too high to leave one for long): kept until it is full again.
    RedisRateLimiter(client, 10.0, 20.0).hit(f"u:{user_id}")
    bucket = RATE_LIMITS + f"u:{user_id}"
    if client.exists(bucket):
        out["rate-limit bucket of a recent sender (until full again)"] = (
            client.memory_usage(bucket, samples=0), client.strlen(bucket))
    return out


if __name__ == "__main__":
    main()
