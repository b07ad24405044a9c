"""The CPU one ``send()`` per delivery costs on this machine, with no server around it.

``python -m loadtest.send_floor`` opens ``-n`` loopback TCP connections (a child
process reads them all, as the load generator would), then sends one frame of
``--size`` bytes to every connection, ``--rounds`` times, in a bare Python loop:
what any server making one ``send`` per delivery pays at least. A round starts
every ``--period`` seconds (the sender sleeps out the rest); several values give
one figure each:

* ``0.01``: 1 x 1000 at 100 messages/s, the fan-out target's shape (a burst of
  1,000 sends every 10 ms, the sender idle for what is left of each 10 ms);
* ``0``: back to back, the sender never sleeps.

The sender's CPU time (user + system, from ``getrusage``) over the rounds, per send,
is the floor: on loopback the kernel runs the receiving side's TCP processing in
the sender's system call as well, so it counts here as it does for a server.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import selectors
import socket
import time
from typing import Any


def _drain(port: int, count: int, expected: int, ready: Any) -> None:
    selector = selectors.DefaultSelector()
    for _ in range(count):
        conn = socket.create_connection(("127.0.0.1", port))
        conn.setblocking(False)
        selector.register(conn, selectors.EVENT_READ)
    ready.set()
    received = 0
    deadline = time.monotonic() + 120
    while received < expected and time.monotonic() < deadline:
        for key, _ in selector.select(1.0):
            try:
                received += len(key.fileobj.recv(65536))
            except BlockingIOError:
                pass


def measure(count: int, rounds: int, size: int, period: float) -> dict[str, float]:
    """One figure: µs of this process's CPU per send, and sends per CPU-second."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=count)
    port = listener.getsockname()[1]
    ready = multiprocessing.Event()
    reader = multiprocessing.Process(target=_drain, args=(port, count, count * rounds * size,
                                                          ready))
    reader.start()
    conns = [listener.accept()[0] for _ in range(count)]
    listener.close()
    if not ready.wait(60):
        raise RuntimeError("the reading process did not connect")
    for conn in conns:
        conn.setblocking(False)
    frame = b"\x81\x7e" + size.to_bytes(2, "big") + b"x" * (size - 4)
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    for i in range(rounds):
        for conn in conns:
            conn.send(frame)
        if period:
            time.sleep(max(0.0, started + (i + 1) * period - time.monotonic()))
    after, ended = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    reader.join(120)
    for conn in conns:
        conn.close()
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    cpu = user + system
    sends = count * rounds
    return {"period_s": period, "sends": sends, "cpu_s": round(cpu, 3),
            "system_share": round(system / cpu, 2) if cpu else 0.0,
            "us_per_send": round(cpu / sends * 1e6, 2),
            "sends_per_cpu_s": round(sends / cpu) if cpu else 0,
            "sends_per_s": round(sends / (ended - started))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=1000, help="connections [1000]")
    parser.add_argument("--rounds", type=int, default=300, help="sends per connection [300]")
    parser.add_argument("--size", type=int, default=150, help="frame bytes [150]")
    parser.add_argument("--period", default="0.01,0",
                        help="seconds from the start of one round to the next [0.01,0]")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    figures = [measure(args.n, args.rounds, args.size, float(p)) for p in args.period.split(",")]
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"one send() per delivery, {args.n} loopback connections, {args.size}-byte frames, "
          f"{args.rounds} rounds; the sender's CPU")
    for f in figures:
        print(f"  a round every {f['period_s'] * 1000:g} ms: {f['us_per_send']:.2f} us "
              f"per send ({f['system_share']:.0%} in the kernel), "
              f"{f['sends_per_cpu_s']:,} sends per CPU-second, {f['sends_per_s']:,} sends/s")


if __name__ == "__main__":
    main()
