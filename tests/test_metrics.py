"""Metrics, health and readiness against a real 2-worker server on Redis (db 13).

Every figure is checked for the whole server: connections are spread over both
workers (verified from /proc) and scrapes land on either worker, so a gauge
that only counted one worker, or a counter read from one worker's memory,
would fail here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jwt
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus

from conftest import (
    ROOT, TIMEOUT, Client, Server, own_redis, redis_url, redis_url_or_skip, wait_until,
)

SECRET = "metrics-test-secret-0123456789abcdef"
BURST = 10
SEED_GAUGES = ("wschat_connections_total", "wschat_rooms_total", "wschat_room_members_total",
               "wschat_uptime_seconds")


def room() -> str:
    return f"m-{uuid.uuid4().hex[:10]}"


def token(sub: str, ttl: float = 3600) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "name": sub[:20], "exp": now + int(ttl), "iat": now},
                      SECRET, algorithm="HS256")


def user(srv: Server, sub: str | None = None) -> Client:
    """An authenticated client (guests would share the test machine's IP bucket)."""
    return Client(srv.url, "token=" + token(sub or f"u-{uuid.uuid4().hex[:8]}"))


class Scrape:
    """One /metrics exposition, parsed with prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [(s.name, s.labels, s.value)
                        for f in self.families.values() for s in f.samples]
        # As exposed (counters keep their _total here, unlike the parsed family name).
        self.types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels``."""
        return sum(v for n, ls, v in self.samples
                   if n == name and all(ls.get(k) == w for k, w in labels.items()))


def scrape(srv: Server) -> Scrape:
    status, body = srv.http("/metrics", metrics=True)
    assert status == 200, body
    return Scrape(body.decode())


def metrics_json(srv: Server) -> dict[str, Any]:
    status, body = srv.http("/metrics/json", metrics=True)
    assert status == 200, body
    return json.loads(body)


def wait_for_values(srv: Server, expected: dict[tuple[str, tuple[tuple[str, str], ...]], float],
                    baseline: Scrape | None = None, timeout: float = TIMEOUT) -> Scrape:
    """Scrape until every series reads its expected value (minus ``baseline``), then
    once more to be sure none of them keeps counting past it."""

    def reads(s: Scrape) -> dict[Any, float]:
        return {key: s.value(key[0], **dict(key[1])) - (
            baseline.value(key[0], **dict(key[1])) if baseline else 0) for key in expected}

    last: dict[Any, float] = {}

    def settled() -> Scrape | None:
        nonlocal last
        s = scrape(srv)
        last = reads(s)
        return s if last == expected else None

    try:
        result = wait_until(settled, timeout, message="the expected metric values")
    except AssertionError:
        raise AssertionError(f"expected {expected}, last read {last}") from None
    assert reads(scrape(srv)) == expected
    return result


def series(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def connections_per_worker(srv: Server) -> dict[int, int]:
    """Established server-side sockets on the WebSocket port, per worker, from /proc."""
    suffix = f":{srv.port:04X}"
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1].endswith(suffix) and fields[3] == "01":  # 01: ESTABLISHED
                    inodes.add(fields[9])
    counts = {}
    for pid in srv.worker_pids():
        n = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            n += target.startswith("socket:[") and target[8:-1] in inodes
        counts[pid] = n
    return counts


def open_spread(srv: Server, batch: int = 12, **kwargs: Any) -> list[Client]:
    """Open connections concurrently until both workers hold some of them."""
    clients: list[Client] = []
    with ThreadPoolExecutor(batch) as pool:
        for _ in range(6):
            clients += pool.map(lambda _: Client(srv.url, **kwargs), range(batch))
            counts = connections_per_worker(srv)
            if len(counts) == 2 and all(counts.values()):
                return clients
    for c in clients:
        c.close()
    raise AssertionError(f"connections never spread over both workers: {counts}")


def documented_series() -> set[str]:
    text = (ROOT / "docs" / "operations.md").read_text()
    return set(re.findall(r"^\| `(wschat_\w+)`", text, re.MULTILINE))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Server]:
    """Two workers sharing Redis db 13, a fast heartbeat and a small rate-limit burst."""
    with Server({"REDIS_URL": redis_url_or_skip(13), "JWT_SECRET": SECRET,
                 "HEARTBEAT_INTERVAL": "0.5", "RATE_LIMIT": "0.01",
                 "RATE_LIMIT_BURST": str(BURST)}, workers=2) as srv:
        yield srv


def test_exposition_parses_and_every_series_is_documented(cluster: Server) -> None:
    """The exposition parses; the seed's gauges are there; every wschat_ series is
    documented in docs/operations.md and every documented one is exposed."""
    s = scrape(cluster)
    for name in SEED_GAUGES:
        assert s.types.get(name) == "gauge", name
    for family in s.families.values():
        assert family.documentation, f"{family.name} has no HELP"
    exposed = {n for n in s.types if n.startswith("wschat_")}
    documented = documented_series()
    assert exposed - documented == set(), "exposed but not in docs/operations.md"
    # Appears with the first HTTP handler exception (the exporter has no zero for it).
    assert documented - exposed <= {"wschat_http_request_exceptions_total"}
    assert len(re.findall(r"^wschat_build_info\{.*\} 1\.0$", s.text, re.MULTILINE)) == 1
    wait_for_values(cluster, {series("wschat_workers"): 2})  # the second may still boot


def test_connection_gauges_are_whole_server_figures(cluster: Server) -> None:
    """N connections over both workers read N on every scrape (JSON too), rooms and
    memberships come from Redis, and everything returns to 0 after closing."""
    before = scrape(cluster)
    clients = open_spread(cluster)
    n = len(clients)
    a, b = room(), room()
    try:
        for i, c in enumerate(clients):
            c.join(a)
            if i % 2 == 0:
                c.join(b)
        memberships = n + (n + 1) // 2
        for _ in range(6):  # each scrape may be answered by either worker
            s = scrape(cluster)
            assert s.value("wschat_connections_total") == n
            assert s.value("wschat_rooms_total") == 2
            assert s.value("wschat_room_members_total") == memberships
            figures = metrics_json(cluster)
            assert (figures["connections"], figures["rooms"], figures["total_memberships"]
                    ) == (n, 2, memberships)
            assert figures["workers"] == 2 and figures["backend"] == "redis"
        assert (s.value("wschat_connections_opened_total")
                - before.value("wschat_connections_opened_total")) == n
    finally:
        for c in clients:
            c.close()
    wait_for_values(cluster, {series("wschat_connections_total"): 0,
                              series("wschat_rooms_total"): 0,
                              series("wschat_room_members_total"): 0})
    assert metrics_json(cluster)["connections"] == 0


def test_counters_move_by_exact_amounts(cluster: Server) -> None:
    """Messages, DMs, deliveries, fan-out observations and errors count exactly what
    happened, summed over both workers."""
    r, alice, k = room(), f"alice-{uuid.uuid4().hex[:6]}", 5
    a1, a2, bob = user(cluster, alice), user(cluster, alice), user(cluster)
    try:
        a1.join(r)
        a2.join(r)
        bob.join(r)
        a1.expect("presence", user_id=bob.user_id)
        a2.expect("presence", user_id=bob.user_id)
        wait_until(lambda: len(bob.request({"type": "list_users", "room": r}, "users")["users"])
                   == 2, message="both users in the room")
        before = scrape(cluster)
        store_before = before.value("wschat_store_seconds_count", backend="redis")
        for i in range(k):
            bob.say(r, f"counted {i}")
        for c in (a1, a2):
            for i in range(k):
                c.expect("message", text=f"counted {i}")
        bob.send({"type": "dm", "to": alice, "text": "a counted dm"})
        for c in (a1, a2, bob):
            c.expect("dm")
        bob.send("not json")
        bob.send("{still not json")
        bob.send({"type": "nope"})
        bob.send({"type": "message", "room": room(), "text": "nowhere"})
        codes = [bob.expect("error")["code"] for _ in range(4)]
        assert codes == ["invalid_json", "invalid_json", "unknown_type", "not_in_room"]
        after = wait_for_values(cluster, {
            series("wschat_messages_received_total", type="message"): k + 1,
            series("wschat_messages_received_total", type="dm"): 1,
            series("wschat_messages_posted_total", kind="room"): k,
            series("wschat_messages_posted_total", kind="dm"): 1,
            # Every member gets every room message, the sender its echo too.
            series("wschat_messages_delivered_total", type="message"): 3 * k,
            # Both of alice's connections, and bob's own echo.
            series("wschat_messages_delivered_total", type="dm"): 3,
            series("wschat_fanout_seconds_count"): k,
            series("wschat_errors_total", code="invalid_json"): 2,
            series("wschat_errors_total", code="unknown_type"): 1,
            series("wschat_errors_total", code="not_in_room"): 1,
            series("wschat_rate_limited_total"): 0,
        }, baseline=before)
        assert after.value("wschat_fanout_seconds_bucket", le="+Inf") == after.value(
            "wschat_fanout_seconds_count")
        # Each of bob's posts waited for its own round trip (the next went out after its
        # echo), so Redis' round trips grew by at least the k posts and the DM.
        assert after.value("wschat_store_seconds_count", backend="redis") >= store_before + k + 1
        assert after.value("wschat_store_seconds_bucket", backend="redis", le="+Inf") == (
            after.value("wschat_store_seconds_count", backend="redis"))
        assert after.value("wschat_store_seconds_sum", backend="redis") > 0
        figures = metrics_json(cluster)
        assert figures["messages"]["posted"]["room"] == after.value(
            "wschat_messages_posted_total", kind="room")
        assert figures["fanout_ms_since_start"]["p99"] is not None
        redis_trips = figures["store_ms_since_start"]["redis"]
        assert redis_trips["count"] >= after.value("wschat_store_seconds_count", backend="redis")
        assert 0 < redis_trips["p50"] <= redis_trips["p99"]
    finally:
        for c in (a1, a2, bob):
            c.close()


def test_redis_memory_is_read_at_scrape_time(cluster: Server) -> None:
    """wschat_store_memory_bytes and _limit_bytes are Redis's own used_memory and maxmemory,
    read when the scrape arrives (whichever worker answers it)."""
    import redis

    client = redis.Redis.from_url(redis_url(13))  # the cluster's own: not flushed
    try:
        info = client.info("memory")
        before = client.config_get("maxmemory")["maxmemory"]
        client.config_set("maxmemory", str(64 * 2**20))
        try:
            for _ in range(4):  # either worker may answer
                s = scrape(cluster)
                assert s.value("wschat_store_memory_limit_bytes", backend="redis") == 64 * 2**20
                used = s.value("wschat_store_memory_bytes", backend="redis")
                assert 0.5 * info["used_memory"] < used < 2 * info["used_memory"] + 2**20
        finally:
            client.config_set("maxmemory", before)
        assert scrape(cluster).value("wschat_store_memory_limit_bytes",
                                     backend="redis") == int(before)
    finally:
        client.close()


def test_rate_limited_messages_are_counted(cluster: Server) -> None:
    """Messages past the burst are refused and counted once each, as errors too."""
    r, extra = room(), 3
    with user(cluster) as c:
        c.join(r)
        before = scrape(cluster)
        for i in range(BURST + extra):
            c.send({"type": "message", "room": r, "text": f"burst {i}"})
        for i in range(BURST):
            c.expect("message", text=f"burst {i}")
        assert all(c.expect("error")["code"] == "rate_limited" for _ in range(extra))
        wait_for_values(cluster, {
            series("wschat_rate_limited_total", type="message"): extra,
            series("wschat_errors_total", code="rate_limited"): extra,
            series("wschat_messages_posted_total", kind="room"): BURST,
        }, baseline=before)


def test_held_refusals_are_told_apart_from_bucket_refusals(cluster: Server) -> None:
    """A send refused because an earlier refused one of its connection is awaited (the
    sender's order) counts as reason "held"; the bucket's refusal as reason "bucket"."""
    r, held = room(), 2
    with user(cluster) as c:
        c.join(r)
        before = scrape(cluster)
        for i in range(BURST + 1):
            c.send({"type": "message", "room": r, "text": f"b{i}", "client_msg_id": f"b{i}"})
        for i in range(BURST):
            c.expect("message", text=f"b{i}")
        assert c.expect("error")["code"] == "rate_limited"  # b10: the bucket is empty
        for i in range(held):  # newer sends wait behind b10 (not sent again)
            c.send({"type": "message", "room": r, "text": f"n{i}", "client_msg_id": f"n{i}",
                    "id": f"n{i}"})
            assert c.expect("error", id=f"n{i}")["code"] == "rate_limited"
        after = wait_for_values(cluster, {
            series("wschat_rate_limited_total", type="message", reason="bucket"): 1,
            series("wschat_rate_limited_total", type="message", reason="held"): held,
            series("wschat_rate_limited_total", type="message"): 1 + held,
            series("wschat_errors_total", code="rate_limited"): 1 + held,
        }, baseline=before)
        assert after.value("wschat_rate_limited_total", type="dm", reason="held") == 0
        # Each series is there from the start, at 0: "held" only for what can be held.
        reasons = {(labels["type"], labels["reason"]) for name, labels, _ in after.samples
                   if name == "wschat_rate_limited_total"}
        assert {("message", "held"), ("dm", "held"), ("join", "bucket"),
                ("invalid", "bucket")} <= reasons
        assert ("join", "held") not in reasons


def test_refusals_and_auth_failures_are_counted(cluster: Server) -> None:
    """Each refused upgrade counts once by reason; bad tokens count as auth failures
    whether they came with the upgrade or in an auth message."""
    before = scrape(cluster)
    assert cluster.http("/ws")[0] == 426
    with pytest.raises(InvalidStatus):
        Client(cluster.url, "token=not-a-jwt")
    with pytest.raises(InvalidStatus):
        Client(cluster.url, "token=" + token("expired", ttl=-3600))
    with user(cluster) as c:
        c.send({"type": "auth", "token": "still-not-a-jwt"})
        assert c.expect("error")["code"] == "auth_failed"
    wait_for_values(cluster, {
        series("wschat_handshakes_refused_total", reason="not_websocket"): 1,
        series("wschat_handshakes_refused_total", reason="auth"): 2,
        series("wschat_auth_failures_total", reason="auth_failed"): 2,
        series("wschat_auth_failures_total", reason="token_expired"): 1,
        series("wschat_errors_total", code="auth_failed"): 1,
    }, baseline=before)


def test_heartbeat_disconnect_is_counted(cluster: Server) -> None:
    """A peer that never answers pings is closed with 4100 and counted once."""
    before = scrape(cluster)
    raw = socket.create_connection(("127.0.0.1", cluster.port), timeout=TIMEOUT)
    try:
        raw.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n")
        received = b""
        deadline = time.monotonic() + TIMEOUT
        # Close frame: FIN+opcode 8, a payload length, then the code 4100 (0x1004).
        while not re.search(rb"\x88[\x02-\x7d]\x10\x04", received):
            assert time.monotonic() < deadline, f"no close 4100 in {received[-200:]!r}"
            chunk = raw.recv(4096)
            assert chunk, f"closed without a 4100 close frame: {received[-200:]!r}"
            received += chunk
    finally:
        raw.close()
    wait_for_values(cluster, {
        series("wschat_disconnects_total", reason="heartbeat_timeout"): 1,
        series("wschat_connections_total"): 0,
    }, baseline=before)


def test_websocket_route_not_in_http_request_series(cluster: Server) -> None:
    """HTTP series count probes but never the /ws route (it would be an hour-long request)."""
    before = scrape(cluster)
    with user(cluster) as c:
        c.join(room())
    assert cluster.http("/health")[0] == 200
    s = wait_for_values(cluster, {
        series("wschat_http_request_duration_seconds_count", endpoint="health"): 1,
    }, baseline=before)
    endpoints = {labels.get("endpoint") for name, labels, _ in s.samples
                 if name.startswith("wschat_http_request_duration_seconds")}
    assert "health" in endpoints and not endpoints & {"websocket", "echo", None, "None"}


def test_health_and_ready_on_both_ports(cluster: Server) -> None:
    """/health and /ready answer 200 on both ports while Redis is up."""
    for on_metrics_port in (False, True):
        assert cluster.http("/health", metrics=on_metrics_port)[0] == 200
        status, body = cluster.http("/ready", metrics=on_metrics_port)
        assert status == 200 and json.loads(body)["status"] == "ready"


def test_metrics_json_has_the_seed_fields(cluster: Server) -> None:
    """/metrics/json keeps the seed's four fields (integers, a current timestamp)."""
    figures = metrics_json(cluster)
    for key in ("connections", "rooms", "total_memberships", "timestamp"):
        assert isinstance(figures[key], int), key
    assert abs(figures["timestamp"] - time.time()) < 60
    assert figures["ready"] is True and figures["uptime_seconds"] > 0


def test_dead_worker_leaves_the_gauges(cluster: Server) -> None:
    """A worker killed with SIGKILL stops counting in the gauges; counters keep its
    share, and its replacement counts as a worker again."""
    clients = open_spread(cluster, batch=8)
    try:
        n = len(clients)
        wait_for_values(cluster, {series("wschat_connections_total"): n})
        before = scrape(cluster)
        counts = connections_per_worker(cluster)
        victim, lost = max(counts.items(), key=lambda item: item[1])
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in cluster.worker_pids() and len(
            cluster.worker_pids()) == 2, message="the worker to be replaced")
        # The replacement counts once it has booted: seconds on a loaded machine.
        after = wait_for_values(cluster, {series("wschat_connections_total"): n - lost,
                                          series("wschat_workers"): 2}, timeout=6 * TIMEOUT)
        assert after.value("wschat_connections_opened_total") >= before.value(
            "wschat_connections_opened_total")
        assert metrics_json(cluster)["connections"] == n - lost
    finally:
        for c in clients:
            try:
                c.close()
            except Exception:
                pass


# -- readiness against a Redis this test can stop -------------------------------------

def test_ready_flips_while_redis_is_down() -> None:
    """/ready turns 503 on both ports when Redis stops (liveness and scrapes still
    answer, counting store errors) and 200 again once Redis is back."""
    with own_redis() as redis, Server({"REDIS_URL": redis.url}, workers=2) as srv:
        def readiness() -> set[int]:
            return {srv.http("/ready", metrics=m)[0] for m in (False, True, False, True)}

        assert readiness() == {200}
        redis.stop()
        wait_until(lambda: readiness() == {503}, message="/ready to fail")
        status, body = srv.http("/ready", metrics=True)
        assert "redis unreachable" in json.loads(body)["problems"]
        assert srv.http("/health")[0] == 200 and srv.http("/health", metrics=True)[0] == 200
        assert scrape(srv).value("wschat_store_errors_total", backend="redis") >= 1
        assert metrics_json(srv)["ready"] is False
        redis.start()
        wait_until(lambda: readiness() == {200}, timeout=3 * TIMEOUT,
                   message="/ready to recover")


def test_orphaned_sample_directories_are_swept(tmp_path: Any, monkeypatch: Any) -> None:
    """A sample directory left by a SIGKILLed master is deleted; a live master's is kept.
    One named with the starting master's own pid is a dead one's too: in a container the
    master is PID 1 every time, and a /tmp kept across restarts (an emptyDir) kept the
    old one forever, since pid 1 is always alive."""
    import runpy
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait(TIMEOUT)
    other_master = subprocess.Popen(["sleep", "30"])
    try:
        orphan = tmp_path / f"wschat-prometheus-{gone.pid}-abc"
        alive = tmp_path / f"wschat-prometheus-{other_master.pid}-def"
        same_pid = tmp_path / f"wschat-prometheus-{os.getpid()}-ghi"
        for d in (orphan, alive, same_pid):
            d.mkdir()
            (d / "counter_1.db").write_bytes(b"")
        runpy.run_path(str(ROOT / "gunicorn.conf.py"))["_sweep_orphaned_metrics_dirs"]()
        assert (orphan.exists(), alive.exists(), same_pid.exists()) == (False, True, False)
    finally:
        other_master.kill()
        other_master.wait(TIMEOUT)


def test_every_disconnect_reason_is_exported_before_the_first() -> None:
    """Every reason the server closes connections for is a series from the start, at 0:
    the 1013 closes for MAX_INBOUND_BUFFER_BYTES and for a message too slow, and the
    server API's 4003 closes (before: absent until the first one, so an alert on their
    rate saw no data rather than 0)."""
    from prometheus_client import REGISTRY

    from wschat.metrics import PrometheusChatMetrics

    PrometheusChatMetrics()
    for reason in ("inbound_budget", "slow_message", "banned", "disconnected"):
        sample = REGISTRY.get_sample_value("wschat_disconnects_total", {"reason": reason})
        assert sample is not None, reason


def test_message_path_counts_are_folded_in_exactly_at_flush() -> None:
    """The per-message calls count in plain ints; flush() adds exactly those counts to
    the series, the fan-out histogram's buckets and sum as observe() would have."""
    from prometheus_client import REGISTRY

    from wschat.metrics import FANOUT, PrometheusChatMetrics, flush_all

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    m = PrometheusChatMetrics()
    flush_all()
    bounds = [str(b) if b != float("inf") else "+Inf" for b in FANOUT._upper_bounds]
    before = {b: value("wschat_fanout_seconds_bucket", le=b) for b in bounds}
    base = (value("wschat_messages_received_total", type="message"),
            value("wschat_messages_posted_total", kind="dm"),
            value("wschat_messages_delivered_total", type="message"),
            value("wschat_messages_delivered_total", type="other"),
            value("wschat_fanout_seconds_sum"))
    observed = [0.00005, 0.0001, 0.0003, 0.02, 5.0]  # 0.0001: on a bound, counted in its bucket
    for seconds in observed:
        m.received("SendMessage")
        m.fanout_seconds(seconds)
    m.posted("dm")
    m.delivered(3, b'{"type":"message","id":1}')
    m.delivered(2, b'{"type":"who-knows"}')
    m.delivered(0, b'{"type":"message","id":2}')
    assert value("wschat_messages_received_total", type="message") == base[0]  # not yet
    m.flush()
    assert value("wschat_messages_received_total", type="message") == base[0] + 5
    assert value("wschat_messages_posted_total", kind="dm") == base[1] + 1
    assert value("wschat_messages_delivered_total", type="message") == base[2] + 3
    assert value("wschat_messages_delivered_total", type="other") == base[3] + 2
    assert value("wschat_fanout_seconds_sum") == pytest.approx(base[4] + sum(observed))
    for b in bounds:  # cumulative buckets, as observe() would have filled them
        expected = sum(1 for s in observed if b == "+Inf" or s <= float(b))
        assert value("wschat_fanout_seconds_bucket", le=b) - before[b] == expected, b
    m.flush()  # nothing pending: nothing moves
    assert value("wschat_messages_received_total", type="message") == base[0] + 5


def test_store_times_are_folded_per_backend_at_flush() -> None:
    """store_seconds() counts per backend in plain ints; flush() adds them to that
    backend's buckets and sum, as observe() would have, and to no other backend's."""
    from prometheus_client import REGISTRY

    from wschat.metrics import STORE_SECONDS, PrometheusChatMetrics, flush_all

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    m = PrometheusChatMetrics()
    flush_all()
    bounds = [str(b) if b != float("inf") else "+Inf" for b in STORE_SECONDS._upper_bounds]
    before = {(backend, b): value("wschat_store_seconds_bucket", backend=backend, le=b)
              for backend in ("redis", "database") for b in bounds}
    sums = {backend: value("wschat_store_seconds_sum", backend=backend)
            for backend in ("redis", "database")}
    redis_times = [0.00004, 0.001, 0.001, 0.3]  # 0.001: on a bound, counted in its bucket
    for seconds in redis_times:
        m.store_seconds("redis", seconds)
    m.store_seconds("database", 3.0)
    assert value("wschat_store_seconds_sum", backend="redis") == sums["redis"]  # not yet
    m.flush()
    assert value("wschat_store_seconds_sum", backend="redis") == pytest.approx(
        sums["redis"] + sum(redis_times))
    assert value("wschat_store_seconds_sum", backend="database") == pytest.approx(
        sums["database"] + 3.0)
    for b in bounds:
        expected = sum(1 for s in redis_times if b == "+Inf" or s <= float(b))
        assert value("wschat_store_seconds_bucket", backend="redis", le=b) - before[
            ("redis", b)] == expected, b
        assert value("wschat_store_seconds_bucket", backend="database", le=b) - before[
            ("database", b)] == (1 if b == "+Inf" else 0), b


def test_worker_restarts_do_not_grow_the_sample_directory() -> None:
    """Every worker writes its own counter and histogram files; a dead worker's were kept
    (its counts must stay in the totals), so each restart left two more files for every
    scrape to read, without bound. They are folded into one file per type: the directory
    stays the live workers' files plus those, and no total goes backwards."""
    import glob
    import tempfile

    with Server() as srv:
        assert srv.proc is not None
        directory, = glob.glob(os.path.join(tempfile.gettempdir(),
                                            f"wschat-prometheus-{srv.proc.pid}-*"))
        restarts = 3
        for generation in range(restarts + 1):
            with Client(srv.url) as c:
                r = room()
                c.join(r)
                c.say(r, f"generation {generation}")
            wait_for_values(srv, {series("wschat_connections_opened_total"): generation + 1,
                                  series("wschat_fanout_seconds_count"): generation + 1,
                                  series("wschat_connections_total"): 0})
            if generation == restarts:
                break
            [victim] = srv.worker_pids()
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda victim=victim: srv.worker_pids() not in ([], [victim]),
                       timeout=3 * TIMEOUT, message="the replacement worker")
            wait_until(lambda: srv.http("/ready")[0] == 200, timeout=6 * TIMEOUT,
                       message="the replacement to be ready")
        assert scrape(srv).value("wschat_worker_restarts_total") == restarts
        files = sorted(os.listdir(directory))
        for kind in ("counter", "histogram"):
            assert len([f for f in files if f.startswith(f"{kind}_")]) <= 2, files


def test_a_scrape_during_a_fold_never_counts_a_dead_worker_twice(tmp_path: Any,
                                                                   monkeypatch: Any) -> None:
    """When the master reaps a worker it replaces counter_dead.db with one that holds the
    dead worker's counts, then deletes the worker's own file. A scrape that read the files
    between the two counted that worker twice: the totals jumped up and fell back, which
    Prometheus takes for a counter reset (rate() and increase() then spike by the whole
    total). The fold and a scrape now exclude each other."""
    import runpy
    import threading

    from prometheus_client import CollectorRegistry
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    from wschat.factory import SampleFilesCollector

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    name = "wschat_connections_opened_total"
    for pid, value in ((111, 5.0), (222, 7.0)):  # a worker that died, one still alive
        sample_file = MmapedDict(str(tmp_path / f"counter_{pid}.db"))
        sample_file.write_value(mmap_key(name, name, [], [], "opened"), value, 0.0)
        sample_file.close()
    collector = SampleFilesCollector(CollectorRegistry(), path=str(tmp_path))

    def total() -> float:
        return sum(s.value for family in collector.collect() for s in family.samples
                   if s.name == name)

    assert total() == 12.0
    conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    seen: list[float] = []
    real_unlink = os.unlink
    scrapes: list[threading.Thread] = []

    def unlink_with_a_scrape(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).endswith("counter_111.db") and not scrapes:
            # The dead worker's counts are in counter_dead.db now: a scrape arrives.
            scrape = threading.Thread(target=lambda: seen.append(total()))
            scrapes.append(scrape)
            scrape.start()
            scrape.join(0.5)  # a scrape that is not kept out reads both files meanwhile
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink_with_a_scrape)
    conf["_fold_worker_totals"](111, logging.getLogger("test"))
    monkeypatch.setattr(os, "unlink", real_unlink)
    [scrape] = scrapes
    scrape.join(TIMEOUT)
    assert not scrape.is_alive()
    assert seen == [12.0], "a scrape during the fold counted the dead worker twice"
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["counter_222.db",
                                                             "counter_dead.db"]
    assert total() == 12.0
    # A worker stopped (SIGSTOP) in the middle of a scrape, holding the lock, never hangs
    # the master: it folds the next dead worker's counts after a second regardless.
    import fcntl

    from wschat.fold_lock import FOLD_LOCK

    with open(tmp_path / FOLD_LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_SH)
        os.replace(tmp_path / "counter_222.db", tmp_path / "counter_333.db")
        started = time.monotonic()
        conf["_fold_worker_totals"](333, logging.getLogger("test"))
        assert time.monotonic() - started < 3 * conf["FOLD_LOCK_WAIT"]
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["counter_dead.db"]
    assert total() == 12.0


def test_moderation_commands_count_under_their_wire_types() -> None:
    """kick, mute and unmute are one command class (Moderate) in the chat core: they were
    counted as type="Moderate" in wschat_messages_received_total (the class name: no
    series before the first, in no document, unlike every other type), and one refused
    by the request rate limit as type="invalid", the label of frames that are no command."""
    from prometheus_client import REGISTRY
    from test_access import user as moderator
    from test_chat import Clock, make_chat, send

    from wschat.metrics import PrometheusChatMetrics

    def received(kind: str) -> float:
        return REGISTRY.get_sample_value("wschat_messages_received_total", {"type": kind}) or 0

    def refused(kind: str) -> float:
        return REGISTRY.get_sample_value("wschat_rate_limited_total",
                                         {"type": kind, "reason": "bucket"}) or 0

    metrics = PrometheusChatMetrics()
    for kind in ("kick", "mute", "unmute"):  # series from the start, as for every type
        assert REGISTRY.get_sample_value("wschat_messages_received_total",
                                         {"type": kind}) is not None, kind
        assert REGISTRY.get_sample_value("wschat_rate_limited_total",
                                         {"type": kind, "reason": "bucket"}) is not None, kind
    before = {kind: received(kind) for kind in ("kick", "mute", "unmute", "Moderate")}
    refused_before = refused("kick"), refused("invalid")
    chat = make_chat(Clock(), RATE_LIMIT_REQUESTS="0.001", RATE_LIMIT_REQUESTS_BURST="4")
    chat.metrics = metrics
    mod = moderator(chat, "mod", mod_rooms=("*",))
    send(chat, mod, type="mute", room="r", user_id="b", duration=60)
    send(chat, mod, type="unmute", room="r", user_id="b")
    for _ in range(4):  # the last ones are over the request budget
        send(chat, mod, type="kick", room="r", user_id="b")
    metrics.flush()
    assert "rate_limited" in [e["code"] for e in mod.events("error")]
    assert {kind: received(kind) - n for kind, n in before.items()} == {
        "kick": 4, "mute": 1, "unmute": 1, "Moderate": 0}
    kicks_refused = refused("kick") - refused_before[0]
    assert kicks_refused >= 1 and refused("invalid") == refused_before[1]
