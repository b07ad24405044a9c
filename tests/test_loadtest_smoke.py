"""Smoke runs of the load generator (``python -m loadtest``) against the real wschat.

Tiny N and a few seconds each, so the benchmark tool cannot silently rot; the full
benchmark runs (loadtest/RESULTS.md) are not part of the test suite. These tests
start real gunicorn servers on free ports through the tool itself and fail, never
skip, when the tool or its dependencies (picows, uvloop, psutil) are missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCALE = float(os.environ.get("WSCHAT_TEST_TIMEOUT_SCALE", "1"))


def run_loadtest(tmp_path: Path, *args: str, timeout: float = 30.0, target: str = "wschat"
                 ) -> dict[str, Any]:
    """Run ``python -m loadtest ARGS --json FILE`` and return its single run report."""
    out = tmp_path / "report.json"
    # --quiet-gate 0: a smoke run checks the tool, not the figures; it must not wait for a quiet machine.
    proc = subprocess.run([sys.executable, "-m", "loadtest", *args, "--quiet-gate", "0", "--json", str(out)],
                          cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout * SCALE)
    assert proc.returncode == 0, f"loadtest failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    data = json.loads(out.read_text())
    assert data["command"].startswith("python -m loadtest")
    assert data["machine"]["nproc"] >= 1
    [report] = data["runs"]
    assert report["ok"], report.get("error")
    assert report["target"] == target
    assert report["problems"] == [], report["problems"]
    # Every report carries both sides' CPU, so a client-bound run is visible.
    assert report["server"]["cpu_s"] is not None and report["server"]["cpu_s"] > 0
    assert report["generator"]["cpu_s"] is not None and report["generator"]["cpu_s"] > 0
    assert report["server"]["rss_end"] > 0
    assert report["server"]["alive_at_end"] is True
    return report


def test_fanout_smoke(tmp_path: Path) -> None:
    """A tiny open-loop fan-out delivers every message and reports sane latencies."""
    report = run_loadtest(tmp_path, "fanout", "--target", "wschat", "--connections", "20",
                          "--rooms", "2", "--rate", "20", "--duration", "3", "--warmup", "0.5",
                          "--drain", "5", "--workers", "2", "--source-ips", "2")
    result = report["result"]
    assert result["setup"]["opened"] == 20
    [level] = result["levels"]
    assert level["sent"] > 0
    assert level["expected_deliveries"] == level["sent"] * 10  # every member, sender included
    assert level["delivered"] > 0
    assert level["lost"] == 0 and level["gaps"] == 0 and level["dups"] == 0
    lat = level["latency_ms"]
    assert lat["count"] > 0
    assert 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert level["cpu_window"]["server_cpu_s"] >= 0
    assert "generator_cpu_s" in level["cpu_window"]


def test_idle_smoke(tmp_path: Path) -> None:
    """Holding a few joined connections yields a memory slope and idle CPU per 1k."""
    report = run_loadtest(tmp_path, "idle", "--target", "wschat", "--connections", "40",
                          "--rooms", "4", "--idle-steps", "2", "--idle-window", "2", "--settle", "0.5",
                          "--workers", "1", "--source-ips", "2")
    result = report["result"]
    assert result["connections_held"] == 40
    assert [p["connections"] for p in result["points"]] == [0, 20, 40]
    assert all(p["server_rss"] > 0 for p in result["points"])
    assert isinstance(result["server_bytes_per_connection"], int)
    assert result["server_cpu_pct_per_1k"] >= 0
    assert result["idle_window"]["wall_s"] >= 2


def test_smallrooms_smoke(tmp_path: Path) -> None:
    """Small rooms plus DMs, every client publishing: nothing lost, DMs owed twice."""
    report = run_loadtest(tmp_path, "smallrooms", "--target", "wschat", "--connections", "28",
                          "--room-sizes", "2,3,4,5", "--dm-share", "0.25", "--rate", "100",
                          "--duration", "3", "--warmup", "0.5", "--drain", "5", "--workers", "2",
                          "--source-ips", "2")
    result = report["result"]
    assert result["setup"]["opened"] == 28
    assert result["rooms"] == 8 and result["members_per_room"] == 3.5  # 2+3+4+5, twice
    [level] = result["levels"]
    assert level["publishers"] == 28  # every member publishes
    assert level["dm_sent"] > 0 and level["sent"] > level["dm_sent"]
    # every DM reaches its recipient and comes back to its sender as the echo
    assert level["delivered_dm"] == 2 * level["dm_sent"]
    assert level["lost"] == 0 and level["gaps"] == 0 and level["dups"] == 0
    assert level["delivered"] == level["expected_deliveries"] > level["sent"]
    assert level["latency_ms"]["count"] > 0
    assert level["published_per_server_cpu_s"] > 0 and level["deliveries_per_server_cpu_s"] > 0
    assert "generator_cpu_s" in level["cpu_window"] and "other_cpu_pct" in level["cpu_window"]


def test_the_gevent_floor_peer_speaks_the_scenario(tmp_path: Path) -> None:
    """The bare gevent peer (the stack's floor in RESULTS.md) serves smallrooms whole:
    its figures mean nothing if it drops, repeats or reorders what it routes."""
    report = run_loadtest(tmp_path, "smallrooms", "--target", "gevent-bare", "--connections", "28",
                          "--room-sizes", "2,3,4,5", "--dm-share", "0.25", "--rate", "100",
                          "--duration", "2", "--warmup", "0.5", "--drain", "5", "--workers", "2",
                          "--source-ips", "2", target="gevent-bare")
    [level] = report["result"]["levels"]
    assert level["dm_sent"] > 0 and level["delivered_dm"] == 2 * level["dm_sent"]
    assert level["lost"] == 0 and level["gaps"] == 0 and level["dups"] == 0
    assert level["delivered"] == level["expected_deliveries"] > level["sent"]


def test_the_node_peer_with_wschats_features_speaks_the_scenario(tmp_path: Path) -> None:
    """The Node peer doing wschat's per-message work (RESULTS.md, twenty-second session)
    serves smallrooms whole, with a client_msg_id on every send (its dedupe looked at
    each time) and its buckets refusing nothing at the loadtest's RATE_LIMIT. Its
    packages (ws, prom-client; not Bun's 100 MB) are installed first if missing."""
    from loadtest.targets import NODE_WS_FULL, node_ws_full_missing

    if node_ws_full_missing():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_WS_FULL, check=True,
                       capture_output=True, timeout=300)
    assert node_ws_full_missing() == []
    report = run_loadtest(tmp_path, "smallrooms", "--target", "node-ws-full", "--connections",
                          "28", "--room-sizes", "2,3,4,5", "--dm-share", "0.25", "--rate", "100",
                          "--duration", "2", "--warmup", "0.5", "--drain", "5", "--workers", "2",
                          "--source-ips", "2", "--client-msg-id", target="node-ws-full")
    [level] = report["result"]["levels"]
    assert level["dm_sent"] > 0 and level["delivered_dm"] == 2 * level["dm_sent"]
    assert level["lost"] == 0 and level["gaps"] == 0 and level["dups"] == 0
    assert level["delivered"] == level["expected_deliveries"] > level["sent"]
    assert not level.get("errors"), level.get("errors")


def test_the_gevent_peer_through_redis_speaks_the_scenario(tmp_path: Path) -> None:
    """Its Redis twin (two workers, ids and fan-out through Redis, redis-py used plainly:
    issue 24's reference for wschat's pipelining) too."""
    report = run_loadtest(tmp_path, "smallrooms", "--target", "gevent-bare-redis",
                          "--connections", "28", "--room-sizes", "2,3,4,5", "--dm-share", "0.25",
                          "--rate", "100", "--duration", "2", "--warmup", "0.5", "--drain", "5",
                          "--workers", "2", "--source-ips", "2", target="gevent-bare-redis",
                          timeout=60.0)
    [level] = report["result"]["levels"]
    assert level["dm_sent"] > 0 and level["delivered_dm"] == 2 * level["dm_sent"]
    assert level["lost"] == 0 and level["gaps"] == 0 and level["dups"] == 0
    assert level["delivered"] == level["expected_deliveries"] > level["sent"]
    assert level["cpu_window"]["redis_cpu_s"] > 0  # Redis's CPU is counted beside the workers'


def test_fanout_smoke_on_redis_starts_its_own_redis(tmp_path: Path) -> None:
    """wschat-redis without --redis-url: the tool starts a private redis-server, reports
    its CPU beside the server's (and server+Redis CPU per message), and stops it."""
    import psutil

    def redis_servers() -> set[int]:
        """The tool's private redis-servers (they run in a loadtest-redis-* directory)."""
        found = set()
        for p in psutil.process_iter(["name"]):
            try:
                if p.info["name"] == "redis-server" and "loadtest-redis-" in p.cwd():
                    found.add(p.pid)
            except psutil.Error:
                continue
        return found

    before = redis_servers()
    report = run_loadtest(tmp_path, "fanout", "--target", "wschat-redis", "--connections", "20",
                          "--rooms", "2", "--rate", "20", "--duration", "3", "--warmup", "0.5",
                          "--drain", "5", "--workers", "2", "--source-ips", "2",
                          timeout=60.0, target="wschat-redis")
    [level] = report["result"]["levels"]
    assert level["lost"] == 0 and level["gaps"] == 0 and level["dups"] == 0
    assert report["redis"]["cpu_s"] > 0
    assert level["cpu_window"]["redis_cpu_s"] >= 0
    assert level["server_redis_cpu_us_per_msg"] > 0
    assert redis_servers() <= before  # ours is gone


def test_send_floor_smoke() -> None:
    """``python -m loadtest.send_floor``: every connection gets every round's frame (the
    reading process drains them all), and each figure is the sender's CPU per send."""
    proc = subprocess.run([sys.executable, "-m", "loadtest.send_floor", "-n", "20", "--rounds", "5",
                           "--period", "0.001,0", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60 * SCALE)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    assert [f["period_s"] for f in figures] == [0.001, 0.0]
    for figure in figures:
        assert figure["sends"] == 100
        assert figure["us_per_send"] > 0 and figure["sends_per_cpu_s"] > 0


def test_redis_cost_reports_what_redis_keeps() -> None:
    """loadtest.redis_cost's memory table (docs/operations.md, "Sizing Redis") measures
    real keys: a dedupe key, a held message and a bucket, each with its value inside."""
    import redis
    from conftest import first_start, redis_url_or_skip

    from loadtest.redis_cost import memory_kept
    from wschat.protocol import draft_message
    from wschat.stores.redis import RedisMessageStore

    client = redis.Redis.from_url(redis_url_or_skip(26))  # no other module uses it
    try:
        messages = RedisMessageStore(client, 100)
        first_start(client)
        for i in range(50):
            messages.post_room("sizing", "ann", draft_message(
                "sizing", "ann", "ann", "x" * 100, 1, f"sizing-{i}"))
        kept = memory_kept(client, "sizing", "ann", copies=20_000)
        left = client.dbsize()
    finally:
        client.flushdb()
        client.close()
    at_scale = "dedupe key, growth of used_memory per key (20,000 copies, with their TTL)"
    assert set(kept) == {
        "dedupe key of a message with a client_msg_id (kept 1 hour)", at_scale,
        "a message in a room's history (of 50 held)",
        "rate-limit bucket of a recent sender (until full again)"}
    for usage, value in kept.values():
        assert 0 < value < usage
    # the history holds the event; the dedupe key only "<id> <timestamp_ms>"
    assert kept["a message in a room's history (of 50 held)"][1] > 100
    single = kept["dedupe key of a message with a client_msg_id (kept 1 hour)"]
    assert single[1] < 30
    # At scale a key also costs its expiry entry and hash-table slots, which MEMORY USAGE
    # leaves out; the copies are gone afterwards.
    assert kept[at_scale][0] > single[0] + 16 and kept[at_scale][1] < 30
    assert left < 100


def test_ab_compares_two_checkouts_in_pairs(tmp_path: Path) -> None:
    """``python -m loadtest.ab`` runs the baseline (git archive) and this tree in
    alternating pairs and reports the ratio of CPU per message with its interval."""
    out = tmp_path / "ab.json"
    proc = subprocess.run([sys.executable, "-m", "loadtest.ab", "--pairs", "2", "--json", str(out),
                           # Enough messages (~500) for tens of ms of server CPU: psutil's
                           # CPU times tick every 10 ms, and a run under one tick reads 0.
                           "--", "smallrooms", "-n", "40", "--rate", "250", "-d", "2",
                           "--warmup", "0.5", "--quiet-gate", "0", "--workers", "1",
                           "--source-ips", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120 * SCALE)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    data = json.loads(out.read_text())
    assert [r["order"] for r in data["runs"]] == ["AB", "BA"]
    assert all(r[side]["250.0"] > 0 for r in data["runs"] for side in "AB")
    [summary] = data["summary"].values()
    assert summary["pairs"] == 2 and summary["low"] <= summary["ratio"] <= summary["high"]
    assert "250 msg/s, 2 pairs: B/A" in proc.stdout


def test_a_server_tree_runs_its_own_wschat(tmp_path: Path) -> None:
    """``--server-tree`` (what loadtest.ab's two sides are) starts that tree's wschat.
    gunicorn puts its working directory first on sys.path before it reads its config,
    so a server started in this repository ran this repository's wschat whatever the
    tree: every A/B before the fix compared a checkout with itself."""
    tree = tmp_path / "tree"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD", "wschat", "gunicorn.conf.py"],
                             cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    conf = tree / "gunicorn.conf.py"
    conf.write_text(conf.read_text() + "\nimport pathlib as _p, wschat as _w\n"
                    "_p.Path(__file__).with_name('imported-from').write_text(_w.__file__)\n")
    proc = subprocess.run([sys.executable, "-m", "loadtest", "smallrooms", "-n", "4", "--rate",
                           "20", "-d", "1", "--warmup", "0.2", "--quiet-gate", "0", "--workers",
                           "1", "--source-ips", "2", "--server-tree", str(tree)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120 * SCALE)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    imported = Path((tree / "imported-from").read_text()).resolve()
    assert imported.is_relative_to(tree.resolve()), f"the server ran {imported}"


def test_ab_verdicts() -> None:
    """A difference is resolved only when the interval of the pairs excludes none."""
    from loadtest.ab import describe, verdict

    assert describe(verdict([0.90, 0.92, 0.91, 0.89])).endswith("B is cheaper")
    assert describe(verdict([1.10, 1.12, 1.09])).endswith("B costs more")
    assert describe(verdict([0.9, 1.1, 1.0, 0.95])).endswith("no difference resolved")
    assert describe(verdict([0.9])).endswith("one pair: no interval")


def test_late_growth_is_the_slope_of_the_second_half() -> None:
    """The soak figure: MiB per minute over the phase's second half only, so a server that
    fills its caches early and then holds still reads ~0, and one that keeps growing does not."""
    from loadtest.scenarios import late_growth

    mib = 2**20
    # 10 MiB in the first half (filling), then flat: no growth.
    filling = [(t / 2, min(t / 2, 30.0) / 30 * 10 * mib) for t in range(0, 121)]
    assert late_growth(filling, 60.0) == 0.0
    # 1 MiB per second all along: 60 MiB per minute.
    leaking = [(t / 2, t / 2 * mib) for t in range(0, 121)]
    assert late_growth(leaking, 60.0) == 60.0
    assert late_growth(leaking[:3], 60.0) is None  # too few points in the second half


def test_the_chat_core_ab_runs_each_side_on_its_own_wschat(tmp_path: Path) -> None:
    """``loadtest.chatcore --ab`` builds each side from its own tree, and refuses a tree
    without wschat instead of timing this repository's twice."""
    tree = tmp_path / "tree"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD", "wschat"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    out = tmp_path / "ab.json"
    proc = subprocess.run([sys.executable, "-m", "loadtest.chatcore", "--ab", str(tree),
                           str(ROOT), "--rounds", "2", "-n", "100", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120 * SCALE,
                          check=False)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    report = json.loads(out.read_text())
    assert (report["a"], report["b"]) == (str(tree), str(ROOT))
    for kind in ("msg", "dm"):
        assert len(report[kind]["a_us"]) == len(report[kind]["b_us"]) == 2
        assert all(us > 0 for us in report[kind]["a_us"] + report[kind]["b_us"])
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "loadtest.chatcore", "--ab", str(empty),
                           str(ROOT), "--rounds", "1", "-n", "10"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120 * SCALE,
                          check=False)
    assert proc.returncode != 0 and "did not start on its own wschat" in proc.stderr, \
        f"{proc.stdout}\n{proc.stderr}"
