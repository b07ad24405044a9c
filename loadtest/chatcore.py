"""In-process micro-benchmark of the chat core's per-message cost (no sockets).

``python -m loadtest.chatcore [--wschat DIR] [-n MESSAGES]`` builds the real
``Chat`` (memory stores, ``MemoryRateLimiter``, Prometheus metrics in
multiprocess mode as under gunicorn) with sessions whose ``send_frame`` only
counts, puts them in rooms of 2, 3, 4 and 5 members, and times:

* ``Chat.receive`` as a whole, for room messages and for DMs;
* each step of it alone, on the same inputs: JSON decode, parse + validation,
  rate limit, encoding the event (draft), store append, hub fan-out (frame +
  handing it to each member), metrics calls.

What it leaves out is the transport (recv, WebSocket frame parsing, the send
syscall, gevent's hub): ``python -m loadtest smallrooms`` plus py-spy measure
those (loadtest/RESULTS.md). ``--wschat DIR`` imports wschat from another
checkout (e.g. ``git archive main wschat | tar -x -C /tmp/main``) so that two
versions are compared in one session.

``python -m loadtest.chatcore --ab DIR_A DIR_B [--rounds R]`` compares two
checkouts on a shared, noisy machine: each side is built in a process of its
own (same rooms, sessions and frames), and the two take turns, in random order,
timing ``-n`` room messages (then DMs) per turn for R rounds. It prints the
median per-message time of each side and the median of the rounds' B/A ratios
with its quartiles; ``--json`` writes every round. Run ``--ab DIR DIR`` first:
it should read ~1.0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable


def bench(fn: Callable[[int], Any], n: int, repeat: int = 5) -> float:
    """Best of ``repeat`` runs of ``fn(i)`` for i in range(n): microseconds per call."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter_ns()
        for i in range(n):
            fn(i)
        best = min(best, (time.perf_counter_ns() - t0) / n / 1000)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wschat", help="import wschat from this directory (another checkout)")
    p.add_argument("-n", type=int, default=None,
                   help="messages per timed run [20000; --ab: per turn, 2000]")
    p.add_argument("--size", type=int, default=100, help="text bytes [100]")
    p.add_argument("--json", nargs="?", const="-", default=None,
                   help="print the figures as JSON (--ab: write every round to this file)")
    p.add_argument("--ab", nargs=2, metavar=("DIR_A", "DIR_B"),
                   help="alternate two checkouts' chat cores, each in its own process")
    p.add_argument("--rounds", type=int, default=40, help="--ab: turns per side [40]")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # an --ab side
    args = p.parse_args(argv)
    if args.ab:
        return ab(args.ab, args.rounds, args.n or 2000, args.size, args.json)
    args.n = args.n or 20000
    # As under gunicorn: multiprocess counters (a lock and an mmap write per update).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="wschat-chatcore-")
    if args.wschat:
        sys.path.insert(0, os.path.abspath(args.wschat))
    import orjson

    import wschat
    from wschat.auth import Authenticator, Identity
    from wschat.chat import Chat
    from wschat.config import Settings
    from wschat.metrics import PrometheusChatMetrics
    from wschat.protocol import draft_dm, draft_message, parse_command, text_frame
    from wschat.ratelimit import MemoryRateLimiter
    from wschat.session import Session
    from wschat.stores.memory import create_memory_stores

    class NullSession(Session):
        __slots__ = ("frames", "errors")

        def __init__(self, user_id: str) -> None:
            super().__init__(f"c-{user_id}", Identity(user_id, user_id, None), False, "127.0.0.2")
            self.frames = self.errors = 0

        def send_frame(self, frame: bytes) -> None:
            self.frames += 1
            if b'{"type":"error"' in frame[:20]:
                self.errors += 1

        def close(self, code: Any, reason: str) -> None:
            pass

    settings = Settings.from_env({"RATE_LIMIT": "1000000", "RATE_LIMIT_BURST": "1000000",
                                  "LOG_LEVEL": "warning"})
    metrics = PrometheusChatMetrics()
    stores = create_memory_stores(settings.history_size, settings.room_ttl,
                                  settings.memory_history_bytes)
    metrics.started(stores.name)
    limiter = MemoryRateLimiter(settings.rate_limit, settings.rate_limit_burst)
    chat = Chat(settings, stores, Authenticator(settings), limiter, metrics)
    sessions: list[NullSession] = []
    rooms: list[str] = []
    sizes = (2, 3, 4, 5)
    for r in range(400):
        room = f"room-{r}"
        rooms.append(room)
        for _ in range(sizes[r % len(sizes)]):
            s = NullSession(f"guest-{len(sessions):012x}")  # a guest id as the server makes them
            chat.open(s)
            chat.receive(s, json.dumps({"type": "join", "room": room}))
            sessions.append(s)
    member_of = {s.user_id: next(iter(s.rooms)) for s in sessions}
    pad = "x" * max(0, args.size - 20)
    n = args.n
    k = len(sessions)
    # Frame i is sent by session i % k: a room message into its own room, a DM to the
    # session half the population away.
    msgs = [orjson.dumps({"type": "message", "room": member_of[sessions[i].user_id],
                          "text": f"{time.time_ns()} {pad}"}).decode() for i in range(k)]
    dms = [orjson.dumps({"type": "dm", "to": sessions[(i + k // 2) % k].user_id,
                         "text": f"{time.time_ns()} {pad}"}).decode() for i in range(k)]
    m = k
    if args.serve:
        return serve(chat, sessions, msgs, dms, os.path.dirname(wschat.__file__))
    out: dict[str, Any] = {"wschat": os.path.dirname(wschat.__file__), "n": n,
                           "avg_room_members": round(len(sessions) / len(rooms), 2)}
    steps: dict[str, float] = {}
    out["receive_message_us"] = bench(lambda i: chat.receive(sessions[i % k], msgs[i % m]), n)
    out["receive_dm_us"] = bench(lambda i: chat.receive(sessions[i % k], dms[i % m]), n)
    steps["json_decode"] = bench(lambda i: orjson.loads(msgs[i % m]), n)
    steps["parse_validate_total"] = bench(lambda i: parse_command(msgs[i % m], chat.limits), n)
    steps["rate_limit"] = bench(lambda i: limiter.hit(f"u:{sessions[i % k].user_id}"), n)
    steps["encode_draft"] = bench(lambda i: draft_message(
        "room-1", "guest-1", "guest-1", msgs[i % m], 1700000000000, None, True), n)
    steps["encode_draft_dm"] = bench(lambda i: draft_dm(
        "guest-2", "guest-1", "guest-1", msgs[i % m], 1700000000000, None, True), n)
    draft = draft_message("room-1", "guest-1", "guest-1", "x" * args.size, 1700000000000, None, True)
    event = draft.with_id(1)
    steps["text_frame"] = bench(lambda i: text_frame(event), n)
    hub = chat.hub
    room3 = rooms[1]  # 3 members
    steps["hub_fanout_3_members"] = bench(lambda i: hub.deliver_room(room3, draft.with_id(10**6 + i)), n)
    # store append alone: a store whose broker publishes nowhere
    bare = create_memory_stores(settings.history_size, settings.room_ttl,
                                settings.memory_history_bytes)
    steps["store_append"] = bench(lambda i: bare.messages.post_room(rooms[i % 400], "u", draft), n)
    steps["metrics_per_room_message"] = bench(lambda i: (
        metrics.received("SendMessage"), metrics.posted("room"), metrics.fanout_seconds(0.0001),
        metrics.delivered(3, event)), n)
    errors = sum(s.errors for s in sessions)
    if errors:  # every timed request must be one the server carries out
        raise SystemExit(f"{errors} error events: the harness is broken")
    out["steps_us"] = {k2: round(v, 3) for k2, v in steps.items()}
    out["receive_message_us"] = round(out["receive_message_us"], 3)
    out["receive_dm_us"] = round(out["receive_dm_us"], 3)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"wschat from {out['wschat']}; {n} calls per figure, best of 5; rooms of "
              f"{out['avg_room_members']} members on average")
        print(f"  Chat.receive, room message: {out['receive_message_us']:8.2f} us")
        print(f"  Chat.receive, dm:           {out['receive_dm_us']:8.2f} us")
        for name, us in out["steps_us"].items():
            print(f"    {name:28s} {us:8.2f} us")
    return 0


def serve(chat: Any, sessions: list[Any], msgs: list[str], dms: list[str],
          imported_from: str) -> int:
    """An --ab side: time what the coordinator asks for ("msg N" or "dm N", one line
    each), answering microseconds per call."""
    k = len(sessions)
    frames = {"msg": msgs, "dm": dms}
    for kind in frames:  # warm up both paths
        for i in range(5000):
            chat.receive(sessions[i % k], frames[kind][i % k])
    print("ready", imported_from, flush=True)
    for line in sys.stdin:
        kind, count = line.split()
        todo, n = frames[kind], int(count)
        t0 = time.perf_counter_ns()
        for i in range(n):
            chat.receive(sessions[i % k], todo[i % k])
        print((time.perf_counter_ns() - t0) / n / 1000, flush=True)
    return 0


def ab(trees: list[str], rounds: int, n: int, size: int, json_path: str | None) -> int:
    import random
    import statistics
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sides = []
    for tree in trees:
        tree = os.path.abspath(tree)
        env = dict(os.environ, PYTHONPATH=root)  # loadtest from here, wschat from the tree
        # Started outside any checkout, so that the working directory on sys.path
        # cannot shadow the tree's wschat.
        proc = subprocess.Popen([sys.executable, "-m", "loadtest.chatcore", "--serve",
                                 "--wschat", tree, "--size", str(size)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=tempfile.gettempdir(), env=env)
        assert proc.stdout is not None and proc.stdin is not None
        ready = proc.stdout.readline().split(maxsplit=1)
        if ready[:1] != ["ready"] or not os.path.abspath(ready[1].strip()).startswith(tree):
            raise SystemExit(f"side {tree} did not start on its own wschat: {ready}")
        sides.append(proc)
    report: dict[str, Any] = {"a": trees[0], "b": trees[1], "n": n, "rounds": rounds}
    try:
        for kind in ("msg", "dm"):
            times: tuple[list[float], list[float]] = ([], [])
            for _ in range(rounds):
                for side in random.sample((0, 1), 2):
                    proc = sides[side]
                    proc.stdin.write(f"{kind} {n}\n")  # type: ignore[union-attr]
                    proc.stdin.flush()  # type: ignore[union-attr]
                    times[side].append(float(proc.stdout.readline()))  # type: ignore[union-attr]
            ratios = [b / a for a, b in zip(*times)]
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            name = "room message" if kind == "msg" else "dm"
            print(f"{name:12s}: A {statistics.median(times[0]):6.2f} us, "
                  f"B {statistics.median(times[1]):6.2f} us (medians); B/A median "
                  f"{statistics.median(ratios):.3f}, quartiles {q1:.3f}-{q3:.3f}")
            report[kind] = {"a_us": times[0], "b_us": times[1],
                            "ratio_median": statistics.median(ratios), "ratio_q1": q1,
                            "ratio_q3": q3}
    finally:
        for proc in sides:
            proc.stdin.close()  # type: ignore[union-attr]
            proc.wait(timeout=30)
    if json_path:
        with open(json_path, "w") as out:
            json.dump(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
