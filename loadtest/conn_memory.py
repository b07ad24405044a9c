"""Bytes per idle joined connection, by object, in one process (no HTTP, no generator).

``python -m loadtest.conn_memory -n 2000`` serves N socketpairs with the real
:class:`~wschat.transport.Transport`, chat core and memory stores (the handshake is
done by wsproto, as flask-sock would; the connection then takes the socket over
through ``Transport.serve``), joins each to one of ``--rooms`` rooms, lets every
connection go idle, and reports:

* RSS growth per connection (``/proc/self/statm``; includes what tracemalloc cannot
  see: greenlet frame-data chunks, the C stack copies' page rounding, allocator slack);
* tracemalloc's growth per connection, grouped by the source file that allocated it;
* live objects per connection by type (``gc``), with ``sys.getsizeof`` per object.

The client ends of the pairs are kept open (and drained) in the same process; their
kernel buffers are not in RSS, their Python objects are subtracted (they exist in
the baseline as well: all pairs are created before the first measurement).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import resource
import sys
import tracemalloc
import types
from typing import Any

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402
import gevent.socket  # noqa: E402
from wsproto import ConnectionType, WSConnection  # noqa: E402
from wsproto.events import AcceptConnection, Request  # noqa: E402

from wschat.admission import ConnectionBudget  # noqa: E402
from wschat.auth import Authenticator, Identity  # noqa: E402
from wschat.chat import Chat  # noqa: E402
from wschat.config import Settings  # noqa: E402
from wschat.ratelimit import MemoryRateLimiter  # noqa: E402
from wschat.stores.memory import create_memory_stores  # noqa: E402
from wschat.telemetry import NoMetrics  # noqa: E402
from wschat.transport import Transport  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


def type_census() -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    sizes: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        name = f"{type(obj).__module__}.{type(obj).__qualname__}"
        counts[name] += 1
        try:
            sizes[name] += sys.getsizeof(obj)
        except TypeError:
            pass
    return counts, sizes  # type: ignore[return-value]


REQUEST = WSConnection(ConnectionType.CLIENT).send(Request(host="localhost", target="/ws"))


def handshake() -> WSConnection:
    """The server side of the handshake, as flask-sock leaves it (the answer is not sent:
    the client end here writes prebuilt masked frames and never parses)."""
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(REQUEST)
    list(server.events())
    server.send(AcceptConnection())
    return server


def client_text(payload: bytes) -> bytes:
    assert len(payload) < 126
    return bytes((0x81, 0x80 | len(payload))) + b"\0\0\0\0" + payload


def drain(socks: list[Any]) -> None:
    for s in socks:
        try:
            while s._sock.recv(65536, 0x40):  # MSG_DONTWAIT, past gevent's wait
                pass
        except BlockingIOError:
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--rooms", type=int, default=100)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--trace", action="store_true",
                    help="tracemalloc by file too (its own bookkeeping inflates RSS)")
    ap.add_argument("--json")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    settings = Settings.from_env({"HEARTBEAT_INTERVAL": "30", "RATE_LIMIT": "1000000",
                                  "RATE_LIMIT_BURST": "1000000",
                                  "MAX_CONNECTIONS": str(args.n + 10)})
    chat = Chat(settings, create_memory_stores(settings.history_size, settings.room_ttl),
                Authenticator(settings),
                MemoryRateLimiter(settings.rate_limit, settings.rate_limit_burst))
    transport = Transport(chat, NoMetrics(), ConnectionBudget(args.n + 10))
    transport.start()
    # Warm up every code path once (imports, caches, the first room), then build
    # all pairs and handshakes before the baseline.
    pairs = [gevent.socket.socketpair() for _ in range(args.n + 1)]
    clients = [c for _, c in pairs]

    def open_one(i: int) -> None:
        server_sock, client_sock = pairs[i]
        ws = types.SimpleNamespace(sock=server_sock, ws=handshake(), connected=True)
        transport.serve(ws, Identity(f"u-{i}", f"user{i}", None), True, "127.0.0.1",
                        transport.new_conn_id())
        join = {"type": "join", "room": f"room-{i % args.rooms}"}
        client_sock.sendall(client_text(json.dumps(join).encode()))

    open_one(args.n)
    gevent.sleep(0.2)
    drain(clients)
    gc.collect()
    gevent.sleep(0.2)

    if args.trace:
        tracemalloc.start(1)
    gc.collect()
    counts0, sizes0 = type_census()
    snap0 = tracemalloc.take_snapshot() if args.trace else None
    rss0 = rss()
    for i in range(args.n):
        open_one(i)
        if i % 200 == 199:
            gevent.sleep(0.01)
            drain(clients)
    for _ in range(5):
        gevent.sleep(0.1)
        drain(clients)
    pairs.clear()
    gc.collect()
    gevent.sleep(0.5)
    drain(clients)
    rss1 = rss()
    snap1 = tracemalloc.take_snapshot() if args.trace else None
    counts1, sizes1 = type_census()
    n = args.n
    held = len(transport.connections)
    by_file = collections.Counter()
    for stat in snap1.compare_to(snap0, "filename") if snap1 else ():
        by_file[stat.traceback[0].filename] += stat.size_diff
    traced = sum(by_file.values())
    site = os.path.dirname(os.path.dirname(gevent.__file__))

    def short(path: str) -> str:
        return path.replace(site + "/", "").replace(os.getcwd() + "/", "")

    report: dict[str, Any] = {
        "connections": n, "held": held,
        "rss_bytes_per_conn": round((rss1 - rss0) / n),
        "tracemalloc_bytes_per_conn": round(traced / n),
        "by_file": {short(f): round(b / n) for f, b in by_file.most_common(args.top)},
        "objects_per_conn": {},
    }
    for name, c in (counts1 - counts0).most_common(40):
        per = c / n
        if per >= 0.5:
            report["objects_per_conn"][name] = {
                "count": round(per, 2),
                "bytes": round((sizes1[name] - sizes0[name]) / n)}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    print(f"connections {n} (held {held}); RSS {report['rss_bytes_per_conn']} B/conn; "
          f"tracemalloc {report['tracemalloc_bytes_per_conn']} B/conn")
    print("tracemalloc by file (B/conn):")
    for f, b in report["by_file"].items():
        print(f"  {b:7d}  {f}")
    print("objects per connection (gc census: count, getsizeof bytes):")
    for name, v in report["objects_per_conn"].items():
        print(f"  {v['count']:5.2f}  {v['bytes']:6d}  {name}")
    for conn in list(transport.connections):
        conn.abort("done")
    gevent.sleep(0.2)


if __name__ == "__main__":
    main()
