"""What persistence costs: acknowledged messages per second with it off, on SQLite, on PostgreSQL.

Not a test (pytest does not collect ``bench_*``); a plain program:

    python tests/bench_persistence.py [--connections 200] [--seconds 5] [--room-size 1]
                                      [--rounds 1] [--open-loop RATES]

For each configuration it starts the real server (one worker, memory backend),
opens ``--connections`` WebSocket clients in rooms of ``--room-size`` members
(1: each client alone in its own room, the worst case for persistence: every
message of a batch goes to a different room), and runs a closed loop: every
client sends a message and waits for its echo (the acknowledgement, which with
persistence on means "committed") before sending the next; the other members'
messages are received on the way. It prints acknowledged messages per second and
their share of "persistence off" in the same round (``--rounds`` interleaves the
configurations, so a noisy machine moves all three together), ack latency
percentiles, and the CPU seconds used during the loop by the server, by a local
PostgreSQL and by this load generator (they share the machine's cores).

``--open-loop 500,1000`` measures the other way: every member of every room
publishes at fixed total rates, through the project's load generator
(``python -m loadtest fanout``), which reports latency and CPU per rate. Results
go in docs/persistence.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import Server  # noqa: E402

PG_URL = os.environ.get("DATABASE_URL_TEST", "postgresql://postgres@127.0.0.1:5432/wschat_test")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU of ``pid`` and its live children (a worker's SQLite writer process)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return cpu_seconds(pid) + sum(process_tree_cpu_seconds(int(c)) for c in children)


@dataclass
class Load:
    acked: int
    latencies: list[float]
    seconds: float
    cpu: dict[str, float]  # CPU seconds used during the closed loop, by whom


class Loops:
    """Where the clients' closed loops report their end."""

    def __init__(self, clients: int) -> None:
        self.everyone_in = asyncio.Barrier(clients + 1)
        self.latencies: list[float] = []
        self.acked = 0
        self.running = clients
        self.last_end = 0.0
        self.all_ended = asyncio.Event()

    def ended(self, acked: int) -> None:
        self.acked += acked
        self.last_end = time.monotonic()
        self.running -= 1
        if not self.running:
            self.all_ended.set()


async def client(url: str, name: str, room: str, seconds: float, loops: Loops) -> None:
    async with websockets.connect(url, max_size=None) as ws:
        await ws.recv()  # welcome
        await ws.send(json.dumps({"type": "join", "room": room}))
        while json.loads(await ws.recv()).get("type") != "joined":
            pass
        await loops.everyone_in.wait()
        stop_at = time.monotonic() + seconds
        sent = 0
        while time.monotonic() < stop_at:
            text = f"{name}:{sent}"
            echo = f'"text":"{text}"'
            started = time.perf_counter()
            await ws.send(json.dumps({"type": "message", "room": room, "text": text}))
            while echo not in await ws.recv():  # the room's other messages pass by
                pass
            loops.latencies.append(time.perf_counter() - started)
            sent += 1
        # Reported before the close: a client that stops reading leaves the room's later
        # messages unread, and its close handshake can wait behind them (close_timeout).
        loops.ended(sent)


async def run_load(url: str, connections: int, seconds: float, room_size: int,
                   cpu_now: Callable[[], dict[str, float]]) -> Load:
    """Connect and join everyone, then run the closed loop; CPU is counted for the loop only."""
    loops = Loops(connections)
    clients = [asyncio.create_task(client(url, f"c{i}", f"bench-{i // room_size}", seconds,
                                          loops))
               for i in range(connections)]
    await loops.everyone_in.wait()
    cpu_before, started = cpu_now(), time.monotonic()
    await asyncio.wait_for(loops.all_ended.wait(), seconds + 30)
    cpu_after = cpu_now()
    await asyncio.gather(*clients)
    return Load(loops.acked, loops.latencies, loops.last_end - started,
                {who: cpu_after[who] - cpu_before[who] for who in cpu_before})


def postgres_cpu_seconds() -> float:
    """CPU of this machine's PostgreSQL processes (0 if it runs elsewhere)."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "postgres":
                total += cpu_seconds(int(proc.name))
        except OSError:
            pass  # gone meanwhile
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def bench_server(env: dict[str, str], connections: int) -> Server:
    """One worker with ``env`` on top of the bench settings (rate limit out of the way)."""
    return Server({"RATE_LIMIT": "1000000", "RATE_LIMIT_BURST": "1000000",
                   "LOG_LEVEL": "warning", "MAX_CONNECTIONS": str(connections + 100), **env})


def measure(name: str, env: dict[str, str], connections: int, seconds: float,
            room_size: int) -> dict[str, object]:
    with bench_server(env, connections) as server:
        worker = server.worker_pids()[0]

        def cpu_now() -> dict[str, float]:
            return {"server": process_tree_cpu_seconds(worker), "loadgen": time.process_time(),
                    "postgres": postgres_cpu_seconds()}

        load = asyncio.run(run_load(server.url, connections, seconds, room_size, cpu_now))
    return {"config": name, "msgs_per_s": load.acked / load.seconds,
            "p50_ms": percentile(load.latencies, 0.5) * 1000,
            "p99_ms": percentile(load.latencies, 0.99) * 1000,
            "server_us": load.cpu["server"] / load.acked * 1e6,
            **{f"{who}_cpu_s": spent for who, spent in load.cpu.items()}}


def open_loop(name: str, env: dict[str, str], connections: int, seconds: float,
              room_size: int, rates: str) -> str:
    """The project's load generator (``python -m loadtest fanout``) against this
    configuration: every member of every room publishes, at fixed total rates."""
    with bench_server(env, connections) as server:
        command = [sys.executable, "-m", "loadtest", "fanout", "-q",
                   "--url", f"ws://127.0.0.1:{server.port}",
                   "--server-pid", str(server.worker_pids()[0]), "-n", str(connections),
                   "-r", str(connections // room_size), "--publishers-per-room", str(room_size),
                   "--rate", rates, "-d", str(seconds), "--warmup", "1"]
        done = subprocess.run(command, cwd=Path(__file__).resolve().parent.parent,
                              capture_output=True, text=True, timeout=600, check=True)
    table = [line for line in done.stdout.splitlines() if line.startswith(("target", "wschat "))]
    return f"{name}:\n" + "\n".join(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--room-size", type=int, default=1,
                        help="members per room (1: each client alone in its own room)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every configuration this many times, interleaved")
    parser.add_argument("--open-loop", metavar="RATES",
                        help="instead of the closed loop: every member publishes, at these total "
                             "messages/s (comma-separated), through python -m loadtest fanout")
    parser.add_argument("--postgres-url", default=PG_URL)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wschat-bench-") as tmp:
        configs = [
            ("persistence off", {}),
            ("SQLite (WAL, synchronous=FULL)", {"ENABLE_PERSISTENCE": "true",
                                                "DATABASE_URL": f"sqlite:///{tmp}/bench.db"}),
            ("PostgreSQL (local, synchronous_commit=on)", {"ENABLE_PERSISTENCE": "true",
                                                           "DATABASE_URL": args.postgres_url}),
        ]
        if args.open_loop:
            print(f"{args.connections} connections in rooms of {args.room_size}, open loop, "
                  f"{args.seconds:.0f} s per rate\n")
            for name, env in configs:
                print(open_loop(name, env, args.connections, args.seconds, args.room_size,
                                args.open_loop) + "\n")
            return
        rounds = [[measure(name, env, args.connections, args.seconds, args.room_size)
                   for name, env in configs] for _ in range(args.rounds)]
    rooms = ("each alone in a room" if args.room_size == 1
             else f"in rooms of {args.room_size}")
    print(f"{args.connections} connections, {rooms}, closed loop, "
          f"{args.seconds:.0f} s per configuration, {args.rounds} round(s)\n")
    print("| round | configuration | acked msgs/s | of persistence off | p50 ack ms | p99 ack ms "
          "| server CPU s | server CPU µs per msg | PostgreSQL CPU s | load generator CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, rows in enumerate(rounds, start=1):
        for r in rows:
            kept = r["msgs_per_s"] / rows[0]["msgs_per_s"]  # type: ignore[operator]
            print(f"| {n} | {r['config']} | {r['msgs_per_s']:.0f} | {kept:.0%} | "
                  f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['server_cpu_s']:.2f} | "
                  f"{r['server_us']:.0f} | {r['postgres_cpu_s']:.2f} | {r['loadgen_cpu_s']:.2f} |")


if __name__ == "__main__":
    main()
