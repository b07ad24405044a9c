"""What persistence costs: acknowledged messages per second with it off, on SQLite, on PostgreSQL.

Not a test (pytest does not collect ``bench_*``); a plain program:

    python tests/bench_persistence.py [--connections 200] [--seconds 5]

For each configuration it starts the real server (one worker, memory backend),
opens ``--connections`` WebSocket clients, each alone in its own room, and
runs a closed loop: every client sends a message and waits for its echo (the
acknowledgement, which with persistence on means "committed") before sending
the next. It prints acknowledged messages per second, ack latency
percentiles, and the CPU seconds used by the server and by this load generator
(they share the machine's cores). Results go in docs/persistence.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import Server  # noqa: E402

PG_URL = os.environ.get("DATABASE_URL_TEST", "postgresql://postgres@127.0.0.1:5432/wschat_test")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def client(url: str, room: str, stop_at: float, latencies: list[float]) -> int:
    async with websockets.connect(url, max_size=None) as ws:
        await ws.recv()  # welcome
        await ws.send(json.dumps({"type": "join", "room": room}))
        await ws.recv()  # joined
        sent = 0
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            await ws.send(json.dumps({"type": "message", "room": room, "text": f"m{sent}"}))
            while json.loads(await ws.recv()).get("type") != "message":
                pass
            latencies.append(time.perf_counter() - started)
            sent += 1
        return sent


async def run_load(url: str, connections: int, seconds: float) -> tuple[int, list[float], float]:
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds
    started = time.monotonic()
    counts = await asyncio.gather(*(client(url, f"bench-{i}", stop_at, latencies)
                                    for i in range(connections)))
    return sum(counts), latencies, time.monotonic() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def measure(name: str, env: dict[str, str], connections: int, seconds: float) -> dict[str, object]:
    base = {"RATE_LIMIT": "1000000", "RATE_LIMIT_BURST": "1000000", "LOG_LEVEL": "warning",
            "MAX_CONNECTIONS": str(connections + 100)}
    with Server({**base, **env}) as server:
        worker = server.worker_pids()[0]
        server_cpu = cpu_seconds(worker)
        own_cpu = time.process_time()
        total, latencies, elapsed = asyncio.run(run_load(server.url, connections, seconds))
        server_cpu = cpu_seconds(worker) - server_cpu
        own_cpu = time.process_time() - own_cpu
    return {"config": name, "msgs_per_s": total / elapsed,
            "p50_ms": percentile(latencies, 0.5) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000,
            "server_cpu_s": server_cpu, "loadgen_cpu_s": own_cpu, "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
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
        rows = [measure(name, env, args.connections, args.seconds) for name, env in configs]
    print(f"{args.connections} connections, each alone in a room, closed loop, "
          f"{args.seconds:.0f} s per configuration\n")
    print("| configuration | acked msgs/s | p50 ack ms | p99 ack ms | server CPU s | "
          "load generator CPU s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['msgs_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['server_cpu_s']:.2f} | {r['loadgen_cpu_s']:.2f} |")


if __name__ == "__main__":
    main()
