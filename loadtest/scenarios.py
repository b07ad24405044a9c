"""The scenarios (idle, fanout, smallrooms, churn, slow) and the run around them.

``run(scenario, target, opts)`` starts the target server on free ports, starts the
generator processes, runs the scenario, stops everything (also on error or Ctrl-C)
and returns one JSON-able report. Every report carries the server's and the
generator's CPU seconds and RSS, so a run bound by the generator is visible.
"""

from __future__ import annotations

import math
import os
import platform
import secrets
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import targets as tg
from .hist import Histogram
from .pool import Pool
from .procstats import RedisMeter, TreeMeter

SCENARIOS = ("idle", "fanout", "smallrooms", "churn", "slow")


# --------------------------------------------------------------------------- helpers
def machine_info() -> dict[str, Any]:
    """What a reader needs to judge the figures: CPU, cores, kernel, runtimes."""
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(argv: list[str]) -> str | None:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    mem = None
    try:
        import psutil

        mem = psutil.virtual_memory().total
    except ImportError:
        pass
    bun = tg.bun_binary()
    git = version(["git", "-C", str(tg.REPO), "rev-parse", "--short", "HEAD"])
    dirty = version(["git", "-C", str(tg.REPO), "status", "--porcelain", "--", "wschat", "gunicorn.conf.py"])
    return {
        "wschat_commit": f"{git}{' + uncommitted changes in wschat/' if dirty else ''}" if git else None,
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "memory_bytes": mem,
        "node": version(["node", "--version"]),
        "bun": version([bun, "--version"]) if bun else None,
        "niceness": os.nice(0),
        "nofile_hard": __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)[1],
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def fit_slope(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares line y = a + b x: returns (b, a, r^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    syy = sum((y - my) ** 2 for y in ys)
    b = sxy / sxx if sxx else 0.0
    a = my - b * mx
    r2 = (sxy * sxy) / (sxx * syy) if sxx and syy else 1.0
    return b, a, r2


def late_growth(series: list[tuple[float, float]], phase_s: float) -> float | None:
    """MiB per minute that ``series`` ((seconds, bytes) points) grew by over the second
    half of a ``phase_s``-second phase (a least-squares slope); None with too few points."""
    late = [(t, v) for t, v in series if phase_s / 2 <= t <= phase_s]
    if len(late) < 4:
        return None
    slope, _, _ = fit_slope([t for t, _ in late], [v for _, v in late])
    return round(slope * 60 / 2**20, 3)


def merge_hists(wires: list[dict[str, Any]]) -> Histogram:
    h = Histogram()
    for w in wires:
        h.merge(Histogram.from_wire(w))
    return h


@dataclass
class Opts:
    """Everything a scenario reads from the command line (see ``loadtest.cli``)."""

    connections: int = 1000
    rooms: int = 10
    publishers_per_room: int = 1
    rates: tuple[float, ...] = (100.0,)
    duration: float = 10.0
    warmup: float = 2.0
    drain: float = 10.0
    size: int = 100
    workers: int = 2
    source_ips: int = 16
    concurrency: int = 64
    connect_timeout: float = 30.0
    heartbeat: float = 30.0
    idle_steps: int = 4
    idle_window: float = 30.0
    settle: float = 3.0
    churn_rate: float = 100.0
    churn_concurrency: int = 200
    slow_share: float = 0.1
    slow_rcvbuf: int = 4096
    stop_p99_ms: float = 2000.0
    quiet_gate: float = 25.0
    quiet_wait: float = 90.0
    client_msg_id: bool = False
    room_sizes: tuple[int, ...] = (2, 3, 4, 5)  # smallrooms: room sizes, in turn
    dm_share: float = 0.2  # smallrooms: share of sends that are DMs
    redis_url: str = tg.DEFAULT_REDIS_URL
    redis_workers: int = 2  # gunicorn workers of wschat-redis
    server_tree: str | None = None  # wschat from another checkout (python -m loadtest.ab)
    url: str | None = None  # an already running server (no start/stop): ws://host:port
    server_pid: int | None = None
    quiet: bool = False


class Context:
    """A started target server plus the generator pool, with meters on both."""

    def __init__(self, target: str, opts: Opts, run_id: str, log: Callable[[str], None]) -> None:
        self.target = target
        self.opts = opts
        self.run_id = run_id
        self.log = log
        self.server: tg.Server | None = None
        self.pool: Pool | None = None
        self.server_meter: TreeMeter | None = None
        self.redis_meter: RedisMeter | None = None
        self.description = target
        self.user_ids: dict[int, str] = {}  # client i -> the user_id its welcome gave

    def __enter__(self) -> "Context":
        o = self.opts
        try:
            if o.url:
                from urllib.parse import urlsplit

                parts = urlsplit(o.url)
                self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
                codec = "socketio" if self.target == "socketio" else "plain"
                self.description = f"{self.target} (external, {o.url})"
                if o.server_pid:
                    self.server_meter = TreeMeter([o.server_pid])
            else:
                self.host, self.port = "127.0.0.1", tg.free_port()
                max_conn = max(10000, int(o.connections * 1.5) + 1000)
                spec = tg.build(self.target, self.port, tg.free_port(), max_connections=max_conn,
                                heartbeat=o.heartbeat, redis_url=o.redis_url,
                                redis_workers=o.redis_workers, server_tree=o.server_tree)
                codec = spec.codec
                self.description = spec.description
                log_path = tg.LOGS / f"{self.run_id}-{self.target}.log"
                self.server = tg.Server(spec, self.port, log_path)
                self.log(f"[{self.target}] starting: {' '.join(spec.argv)}  (log {log_path})")
                self.server.start()
                self.server_meter = TreeMeter([self.server.pid])
                if spec.redis_url:
                    self.redis_meter = RedisMeter(spec.redis_url)
            self.pool = Pool(o.workers, self.host, self.port, codec)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            try:
                self.pool.call("close_all", timeout=30)
            except Exception:
                pass
            self.pool.close()
        if self.server is not None:
            self.exit_code = self.server.stop()

    def sample(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": time.time(), "machine": machine_busy()}
        if self.server_meter is not None:
            out["server"] = self.server_meter.sample()
        if self.pool is not None:
            out["generator"] = self.pool.meter.sample()
        if self.redis_meter is not None:
            try:
                out["redis"] = self.redis_meter.sample()
            except Exception:
                pass
        return out

    def server_alive(self) -> bool:
        return self.server is None or self.server.alive()


def machine_busy() -> dict[str, float]:
    """CPU seconds the whole machine spent busy (all cores, all processes) so far."""
    import psutil

    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    irq = getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    return {"cpu_s": sum(t) - idle - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0),
            "irq_s": irq, "steal_s": getattr(t, "steal", 0.0)}


def wait_quiet(ctx: "Context", label: str) -> dict[str, Any]:
    """Wait until the rest of the machine is quiet before a measured phase.

    The machine is shared (other jobs, test suites): before each measured phase we
    sample one-second windows until the CPU used by everything except this run's
    server and generator is under ``opts.quiet_gate`` percent (of one core), or
    ``opts.quiet_wait`` seconds pass. What we saw is recorded with the phase.
    """
    o = ctx.opts
    if o.quiet_gate <= 0:
        return {"gate_pct": 0}
    t0 = time.monotonic()
    seen = None
    while True:
        a = ctx.sample()
        time.sleep(1.0)
        b = ctx.sample()
        seen = cpu_block(a, b).get("other_cpu_pct")
        waited = time.monotonic() - t0
        if seen is None or seen <= o.quiet_gate or waited >= o.quiet_wait:
            break
    if waited > 2:
        ctx.log(f"[{ctx.target}] {label}: waited {waited:.0f}s for a quiet machine "
                f"(other CPU {seen}% of a core, gate {o.quiet_gate}%)")
    return {"gate_pct": o.quiet_gate, "waited_s": round(waited, 1), "other_cpu_pct_before": seen,
            "quiet": seen is not None and seen <= o.quiet_gate}


def delta(a: dict[str, Any], b: dict[str, Any], who: str, key: str = "cpu_s") -> float | None:
    if who in a and who in b:
        return round(b[who][key] - a[who][key], 3)
    return None


def cpu_block(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """CPU seconds used between two samples by the server, the generator (and Redis)."""
    wall = b["t"] - a["t"]
    out: dict[str, Any] = {"wall_s": round(wall, 3)}
    for who in ("server", "generator", "redis", "machine"):
        d = delta(a, b, who)
        if d is not None:
            out[f"{who}_cpu_s"] = d
            out[f"{who}_cpu_pct"] = round(100.0 * d / wall, 2) if wall > 0 else None
    # Whatever else ran on the machine meanwhile (other jobs, the kernel's softirq work
    # for loopback traffic is mostly charged to the processes themselves): noise indicator.
    if "machine_cpu_s" in out:
        # Steal is no process's: count it apart. (Soft)irq time is reported for information
        # only: this kernel also charges it to the interrupted processes (subtracting it made
        # "other" negative under load), so it stays inside "other" and our own figures.
        irq = delta(a, b, "machine", "irq_s") or 0.0
        steal = delta(a, b, "machine", "steal_s") or 0.0
        other = out["machine_cpu_s"] - steal - sum(
            out.get(f"{w}_cpu_s") or 0.0 for w in ("server", "generator", "redis"))
        out["irq_cpu_pct"] = round(100.0 * irq / wall, 2) if wall > 0 else None
        out["steal_cpu_pct"] = round(100.0 * steal / wall, 2) if wall > 0 else None
        out["other_includes_irq"] = True
        out["other_cpu_s"] = round(other, 3)
        out["other_cpu_pct"] = round(100.0 * other / wall, 2) if wall > 0 else None
    return out


# --------------------------------------------------------------------------- connection plans
def plan(ctx: Context, n: int, rooms: int, prefix: str, *, pubs_per_room: int = 0,
         slow_share: float = 0.0, start: int = 0) -> list[dict[str, Any]]:
    """Connection specs: client ``i`` is member ``i // rooms`` of room ``i % rooms``.

    The first ``pubs_per_room`` members of each room publish; the last
    ``round(slow_share * members)`` non-publishers of each room are the slow ones.
    """
    o = ctx.opts
    members = math.ceil(n / rooms) if rooms else 0
    n_slow = round(slow_share * members)
    specs = []
    for i in range(start, start + n):
        r, m = i % rooms, i // rooms
        pub = m < pubs_per_room
        slow = (not pub) and n_slow > 0 and m >= members - n_slow
        spec = {"i": i, "user": f"{prefix}{i}", "rooms": [f"{ctx.run_id}-r{r}"],
                "ip": f"127.0.0.{2 + i % o.source_ips}", "pub": pub, "slow": slow}
        if slow and o.slow_rcvbuf:
            spec["rcvbuf"] = o.slow_rcvbuf
        specs.append(spec)
    return specs


def open_clients(ctx: Context, specs: list[dict[str, Any]]) -> dict[str, Any]:
    o = ctx.opts
    pool = ctx.pool
    assert pool is not None
    per = [[s for s in specs if s["i"] % len(pool) == w] for w in range(len(pool))]
    t0 = time.monotonic()
    timeout = max(60.0, len(specs) / 50.0 + o.connect_timeout)
    res = _open_call(pool, per, o, timeout)
    failures: dict[str, int] = {}
    for r in res:
        for k, v in r["failures"].items():
            failures[k] = failures.get(k, 0) + v
    ctx.user_ids.update({int(i): u for r in res for i, u in r.get("user_ids", {}).items()})
    out = {
        "requested": len(specs),
        "opened": sum(r["opened"] for r in res),
        "failures": failures,
        "join_retries": sum(r["join_retries"] for r in res),
        "server_errors": _sum_dicts([r["errors"] for r in res]),
        "seconds": round(time.monotonic() - t0, 2),
        "connect_ms": merge_hists([r["connect_hist"] for r in res]).summary_ms(),
        "join_ms": merge_hists([r["join_hist"] for r in res]).summary_ms(),
    }
    ctx.log(f"[{ctx.target}] opened {out['opened']}/{out['requested']} in {out['seconds']}s"
            + (f"; failures: {failures}" if failures else "")
            + (f"; join retries after 'unavailable': {out['join_retries']}" if out["join_retries"] else ""))
    return out


def _sum_dicts(dicts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _open_call(pool: Pool, per: list[list[dict[str, Any]]], o: Opts, timeout: float) -> list[Any]:
    for w, specs in enumerate(per):
        pool.send(w, "open", specs=specs, concurrency=o.concurrency, timeout=o.connect_timeout)
    return pool.gather("open", timeout)


def gather_stats(ctx: Context) -> dict[str, Any]:
    assert ctx.pool is not None
    res = ctx.pool.call("stats", timeout=30)
    out: dict[str, Any] = {"hist": merge_hists([r["hist"] for r in res])}
    for key in ("delivered", "delivered_in_window", "delivered_slow", "delivered_dm", "gaps", "dups",
                "unexpected_closes", "closes_slow", "other_events", "bytes_in", "clients", "alive"):
        out[key] = sum(r[key] for r in res)
    errors: dict[str, int] = {}
    members: dict[str, list[int]] = {}
    for r in res:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
        for room, (h, s) in r["alive_members"].items():
            cur = members.setdefault(room, [0, 0])
            cur[0] += h
            cur[1] += s
    out["errors"] = errors
    out["members"] = members
    return out


# --------------------------------------------------------------------------- publishing phase
def publish_phase(ctx: Context, specs: list[dict[str, Any]], rate: float, *, slow: bool = False,
                  label: str = "", dm_share: float = 0.0) -> dict[str, Any]:
    """One open-loop publishing phase at ``rate`` messages/s (all rooms together), then drain.

    With ``dm_share`` that share of the sends are DMs, each owed to two clients: the
    recipient and the sender (its echo).
    """
    o = ctx.opts
    pool = ctx.pool
    assert pool is not None
    quiet = wait_quiet(ctx, f"rate {rate:g}")
    before = gather_stats(ctx)
    members = before["members"]
    pubs = [[s["i"] for s in specs if s["pub"] and s["i"] % len(pool) == w] for w in range(len(pool))]
    n_pubs = sum(len(p) for p in pubs)
    rate_per_pub = rate / n_pubs
    t0 = time.time_ns() + 300_000_000
    m_from = t0 + int(o.warmup * 1e9)
    end = m_from + int(o.duration * 1e9)
    pool.call("reset", measure_from=m_from, measure_to=end, timeout=10)
    if slow:
        paused = sum(r["paused"] for r in pool.call("slow", timeout=10))
        ctx.log(f"[{ctx.target}] {paused} slow clients stopped reading")
    for w in range(len(pool)):
        pool.send(w, "publish", pubs=pubs[w], t0=t0, end=end, rate_per_pub=rate_per_pub,
                  size=o.size, phase=w / len(pool), client_msg_id=o.client_msg_id,
                  dm_share=dm_share)
    while time.time_ns() < t0:
        time.sleep(0.01)
    s0 = ctx.sample()
    rss_series: list[tuple[float, float]] = []
    redis_rss_series: list[tuple[float, float]] = []
    s_from = s_end = None
    deadline = time.monotonic() + (end - t0) / 1e9 + 60
    while not all(c.poll(0) for c in pool.conns):
        now = time.time_ns()
        if s_from is None and now >= m_from:
            s_from = ctx.sample()
        if time.monotonic() > deadline:
            break
        smp = ctx.sample()
        if "server" in smp:
            rss_series.append((round((now - t0) / 1e9, 2), smp["server"]["rss"]))
        if "redis" in smp:
            redis_rss_series.append((round((now - t0) / 1e9, 2), smp["redis"]["rss"]))
        time.sleep(0.5)
    pub_res = pool.gather("publish", 30)
    s_end = ctx.sample()
    if s_from is None:
        s_from = s0
    sent: dict[str, int] = {}
    for r in pub_res:
        for room, c in r["sent"].items():
            sent[room] = sent.get(room, 0) + c
    total_sent = sum(sent.values())
    dm_sent = sent.pop("dm", 0)
    expected = sum(c * members.get(room, [0, 0])[0] for room, c in sent.items()) + 2 * dm_sent
    expected_slow = sum(c * members.get(room, [0, 0])[1] for room, c in sent.items())
    # Drain: wait until every healthy member got every message, or the drain timeout.
    drain_deadline = time.monotonic() + o.drain
    while True:
        st = gather_stats(ctx)
        if st["delivered"] >= expected or time.monotonic() > drain_deadline or not ctx.server_alive():
            break
        time.sleep(0.25)
    s_drained = ctx.sample()
    lat = st["hist"].summary_ms()
    out: dict[str, Any] = {
        "label": label,
        "offered_msgs_per_s": rate,
        "offered_deliveries_per_s": round(expected / ((end - t0) / 1e9)),
        "publishers": n_pubs,
        "sent": total_sent,
        "skipped_sends": sum(r["skipped"] for r in pub_res),
        "expected_deliveries": expected,
        "delivered": st["delivered"],
        "lost": expected - st["delivered"],
        "delivered_in_window": st["delivered_in_window"],
        "delivered_per_s": round(st["delivered_in_window"] / o.duration),
        "gaps": st["gaps"],
        "dups": st["dups"],
        "errors": st["errors"],
        "unexpected_closes": st["unexpected_closes"],
        "latency_ms": lat,
        "generator_late_max_ms": round(max(r["late_max_ms"] for r in pub_res), 2),
        "drain_s": round(s_drained["t"] - s_end["t"], 2),
        "cpu_window": cpu_block(s_from, s_end),
        "cpu_with_drain": cpu_block(s0, s_drained),
        "server_rss_series": rss_series,
        # Growth over the phase's second half (after the warm-up, history and caches have
        # had half the phase to fill): what a long run at this rate would keep adding.
        "server_rss_mib_per_min_late": late_growth(rss_series, (end - t0) / 1e9),
        "machine_quiet": quiet,
    }
    if redis_rss_series:
        out["redis_rss_series"] = redis_rss_series
        out["redis_rss_mib_per_min_late"] = late_growth(redis_rss_series, (end - t0) / 1e9)
    w = out["cpu_with_drain"]
    if w.get("server_cpu_s"):
        out["deliveries_per_server_cpu_s"] = round(st["delivered"] / w["server_cpu_s"])
        out["published_per_server_cpu_s"] = round(total_sent / w["server_cpu_s"])
        # The whole server's cost: its processes plus Redis (wschat-redis), per published
        # message and per delivery, over the window and the drain.
        whole = w["server_cpu_s"] + (w.get("redis_cpu_s") or 0.0)
        if total_sent:
            out["server_redis_cpu_us_per_msg"] = round(1e6 * whole / total_sent, 1)
        out["deliveries_per_server_redis_cpu_s"] = round(st["delivered"] / whole)
    if dm_share:
        out["dm_sent"] = dm_sent
        out["delivered_dm"] = st["delivered_dm"]
    if slow or expected_slow:
        out["expected_slow"] = expected_slow
        out["delivered_slow"] = st["delivered_slow"]
        out["slow_closed"] = st["closes_slow"]
    out["sustained"] = bool(out["lost"] == 0 and out["delivered_per_s"]
                            >= 0.95 * out["offered_deliveries_per_s"])
    ctx.log(f"[{ctx.target}] {label or 'rate'} {rate:g} msg/s -> delivered {out['delivered_per_s']}/s "
            f"(offered {out['offered_deliveries_per_s']}/s), p50 {lat.get('p50_ms')} p99 {lat.get('p99_ms')} "
            f"p999 {lat.get('p999_ms')} max {lat.get('max_ms')} ms, lost {out['lost']}, "
            f"CPU % server {out['cpu_window'].get('server_cpu_pct')} redis "
            f"{out['cpu_window'].get('redis_cpu_pct')} generator "
            f"{out['cpu_window'].get('generator_cpu_pct')} other {out['cpu_window'].get('other_cpu_pct')}"
            f"; RSS growth in the second half, MiB/min: server "
            f"{out['server_rss_mib_per_min_late']} redis {out.get('redis_rss_mib_per_min_late')}")
    return out


# --------------------------------------------------------------------------- scenarios
def scenario_idle(ctx: Context) -> dict[str, Any]:
    o = ctx.opts
    n = o.connections
    steps = max(1, o.idle_steps)
    points = []

    def rss_point(connections: int) -> None:
        time.sleep(o.settle)
        vals = []
        for _ in range(3):
            vals.append(ctx.sample())
            time.sleep(0.5)
        srv = sorted(v["server"]["rss"] for v in vals if "server" in v)
        gen = sorted(v["generator"]["rss"] for v in vals)
        points.append({"connections": connections, "server_rss": srv[len(srv) // 2] if srv else None,
                       "generator_rss": gen[len(gen) // 2],
                       "redis_rss": vals[-1].get("redis", {}).get("rss")})
        ctx.log(f"[{ctx.target}] {connections} idle connections: server RSS "
                f"{(points[-1]['server_rss'] or 0) / 2**20:.1f} MiB")

    rss_point(0)
    setup = []
    opened = 0
    for k in range(1, steps + 1):
        upto = round(n * k / steps)
        specs = plan(ctx, upto - opened, o.rooms, "idle", start=opened)
        setup.append(open_clients(ctx, specs))
        opened = upto
        rss_point(sum(s["opened"] for s in setup))
    xs = [p["connections"] for p in points]
    ys = [p["server_rss"] for p in points]
    result: dict[str, Any] = {"points": points}
    if None not in ys and len(set(xs)) > 2:
        # Headline: the fit over the points with connections (N/steps .. N). The step from
        # 0 also carries one-off costs of the first connections (lazy imports, JIT, pools),
        # so the fit including 0 is reported beside it, not instead.
        slope, icpt, r2 = fit_slope(xs[1:], ys[1:])
        result["server_bytes_per_connection"] = round(slope)
        result["server_rss_intercept"] = round(icpt)
        result["fit_r2"] = round(r2, 4)
        result["server_bytes_per_connection_incl_0"] = round(fit_slope(xs, ys)[0])
        gslope, _, _ = fit_slope(xs[1:], [p["generator_rss"] for p in points][1:])
        result["generator_bytes_per_connection"] = round(gslope)
        rs = [p["redis_rss"] for p in points]
        if None not in rs:
            result["redis_bytes_per_connection"] = round(fit_slope(xs[1:], rs[1:])[0])
    # CPU of holding N idle connections (server heartbeats included) over a fixed window.
    result["machine_quiet"] = wait_quiet(ctx, "idle window")
    a = ctx.sample()
    time.sleep(o.idle_window)
    b = ctx.sample()
    st = gather_stats(ctx)
    cpu = cpu_block(a, b)
    held = st["alive"]
    result["idle_window"] = cpu
    result["connections_held"] = held
    result["unexpected_closes"] = st["unexpected_closes"]
    result["errors"] = st["errors"]
    if held and cpu.get("server_cpu_s") is not None:
        result["server_cpu_pct_per_1k"] = round(100 * cpu["server_cpu_s"] / cpu["wall_s"] / (held / 1000.0), 4)
    if held:
        result["generator_cpu_pct_per_1k"] = round(100 * cpu["generator_cpu_s"] / cpu["wall_s"] / (held / 1000.0), 4)
    result["setup"] = {
        "opened": sum(s["opened"] for s in setup),
        "requested": n,
        "seconds": round(sum(s["seconds"] for s in setup), 2),
        "failures": {k: v for s in setup for k, v in s["failures"].items()},
        "connect_ms": setup[-1]["connect_ms"],
        "join_ms": setup[-1]["join_ms"],
    }
    ctx.log(f"[{ctx.target}] idle: {result.get('server_bytes_per_connection')} B/conn (r2 {result.get('fit_r2')}), "
            f"server CPU {cpu.get('server_cpu_pct')}% for {held} conns "
            f"({result.get('server_cpu_pct_per_1k')}%/1k)")
    return result


def scenario_fanout(ctx: Context) -> dict[str, Any]:
    o = ctx.opts
    specs = plan(ctx, o.connections, o.rooms, "fan", pubs_per_room=o.publishers_per_room)
    setup = open_clients(ctx, specs)
    levels = []
    for rate in o.rates:
        if not ctx.server_alive():
            break
        lvl = publish_phase(ctx, specs, rate)
        levels.append(lvl)
        p99 = lvl["latency_ms"].get("p99_ms", math.inf)
        if p99 > o.stop_p99_ms or lvl["delivered_per_s"] < 0.5 * lvl["offered_deliveries_per_s"]:
            ctx.log(f"[{ctx.target}] saturated at {rate:g} msg/s; skipping higher rates")
            break
    sustained = [lv for lv in levels if lv["sustained"]]
    best = max(sustained, key=lambda lv: lv["delivered_per_s"]) if sustained else None
    return {"setup": setup, "members_per_room": math.ceil(o.connections / o.rooms), "levels": levels,
            "max_sustained_deliveries_per_s": best["delivered_per_s"] if best else 0,
            "max_sustained_level": best["offered_msgs_per_s"] if best else None}


def plan_small_rooms(ctx: Context, n: int, sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    """``n`` clients in consecutive rooms of ``sizes[0]``, ``sizes[1]``, ... members (in turn;
    the last room takes what is left), every one a publisher."""
    o = ctx.opts
    specs = []
    r = i = 0
    while i < n:
        size = max(1, sizes[r % len(sizes)])
        for _ in range(min(size, n - i)):
            specs.append({"i": i, "user": f"small{i}", "rooms": [f"{ctx.run_id}-s{r}"],
                          "ip": f"127.0.0.{2 + i % o.source_ips}", "pub": True, "slow": False})
            i += 1
        r += 1
    return specs


def scenario_smallrooms(ctx: Context) -> dict[str, Any]:
    """Many small rooms (``--room-sizes``) and DMs, every client publishing.

    Each client's DMs go to the client half the population away (another room, usually
    another generator process), so a DM costs the server a look-up of an online user
    and two deliveries (recipient, sender's echo).
    """
    o = ctx.opts
    specs = plan_small_rooms(ctx, o.connections, o.room_sizes)
    setup = open_clients(ctx, specs)
    assert ctx.pool is not None
    n = len(specs)
    if o.dm_share > 0 and n > 1:
        targets: list[dict[int, str]] = [{} for _ in range(len(ctx.pool))]
        for s in specs:
            to = ctx.user_ids.get((s["i"] + n // 2) % n)
            if s["i"] in ctx.user_ids and to and to != ctx.user_ids[s["i"]]:
                targets[s["i"] % len(ctx.pool)][s["i"]] = to
        for w in range(len(ctx.pool)):
            ctx.pool.send(w, "dm_targets", targets=targets[w])
        ctx.pool.gather("dm_targets", 30)
    levels = []
    for rate in o.rates:
        if not ctx.server_alive():
            break
        lvl = publish_phase(ctx, specs, rate, dm_share=o.dm_share)
        levels.append(lvl)
        p99 = lvl["latency_ms"].get("p99_ms", math.inf)
        if p99 > o.stop_p99_ms or lvl["delivered_per_s"] < 0.5 * lvl["offered_deliveries_per_s"]:
            ctx.log(f"[{ctx.target}] saturated at {rate:g} msg/s; skipping higher rates")
            break
    rooms = len({s["rooms"][0] for s in specs})
    return {"setup": setup, "rooms": rooms, "room_sizes": list(o.room_sizes),
            "members_per_room": round(n / rooms, 2) if rooms else 0, "dm_share": o.dm_share,
            "levels": levels}


def scenario_slow(ctx: Context) -> dict[str, Any]:
    o = ctx.opts
    specs = plan(ctx, o.connections, o.rooms, "slow", pubs_per_room=o.publishers_per_room,
                 slow_share=o.slow_share)
    setup = open_clients(ctx, specs)
    rate = o.rates[0]
    baseline = publish_phase(ctx, specs, rate, label="all reading")
    with_slow = publish_phase(ctx, specs, rate, slow=True, label="slow clients paused")
    settle = ctx.sample()
    # A paused client does not see the server's FIN: read again, then count who was dropped.
    assert ctx.pool is not None
    ctx.pool.call("resume", timeout=10)
    time.sleep(max(2.0, o.settle))
    st = gather_stats(ctx)
    with_slow["slow_closed"] = st["closes_slow"]
    with_slow["healthy_closed_after"] = st["unexpected_closes"]
    ctx.log(f"[{ctx.target}] slow clients dropped by the server: {st['closes_slow']} of "
            f"{sum(1 for s in specs if s['slow'])}")
    return {"setup": setup, "slow_clients": sum(1 for s in specs if s["slow"]),
            "baseline": baseline, "with_slow": with_slow,
            "server_rss_before": baseline["server_rss_series"][0][1] if baseline["server_rss_series"] else None,
            "server_rss_peak": max((v for _, v in with_slow["server_rss_series"]), default=None),
            "server_rss_end": settle.get("server", {}).get("rss")}


def scenario_churn(ctx: Context) -> dict[str, Any]:
    o = ctx.opts
    pool = ctx.pool
    assert pool is not None
    setup = open_clients(ctx, plan(ctx, o.connections, o.rooms, "res")) if o.connections else None
    quiet = wait_quiet(ctx, "churn")
    before = ctx.sample()
    count = max(1, int(o.churn_rate * o.duration))
    specs = [{"i": k, "user": f"churn{k}", "rooms": [f"{ctx.run_id}-r{k % max(1, o.rooms)}"],
              "ip": f"127.0.0.{2 + k % o.source_ips}"} for k in range(count)]
    W = len(pool)
    t0 = time.time_ns() + 300_000_000
    for w in range(W):
        pool.send(w, "churn", specs=specs[w::W], t0=t0 + int(w * 1e9 / o.churn_rate),
                  rate=o.churn_rate / W, concurrency=max(1, o.churn_concurrency // W),
                  timeout=o.connect_timeout)
    res = pool.gather("churn", o.duration + 4 * o.connect_timeout + 60)
    after = ctx.sample()
    time.sleep(o.settle)
    settled = ctx.sample()
    completed = sum(r["completed"] for r in res)
    end = max(r["end"] for r in res)
    failures: dict[str, int] = {}
    for r in res:
        for k, v in r["failures"].items():
            failures[k] = failures.get(k, 0) + v
    hists = {k: merge_hists([r["hists"][k] for r in res]).summary_ms() for k in res[0]["hists"]}
    wall = (end - t0) / 1e9
    cpu = cpu_block(before, after)
    out = {
        "setup": setup,
        "offered_cycles_per_s": o.churn_rate,
        "cycles": count,
        "completed": completed,
        "failures": failures,
        "cycles_per_s": round(completed / wall, 1) if wall > 0 else None,
        "handshake_ms": hists["connect"],
        "welcome_ms": hists["welcome"],
        "join_rtt_ms": hists["join"],
        "leave_rtt_ms": hists["leave"],
        "cycle_ms": hists["cycle"],
        "start_lag_ms": hists["start_lag"],
        "cpu": cpu,
        "server_rss_before": before.get("server", {}).get("rss"),
        "server_rss_after": settled.get("server", {}).get("rss"),
        "machine_quiet": quiet,
    }
    if cpu.get("server_cpu_s") and completed:
        out["server_cpu_ms_per_cycle"] = round(1000 * cpu["server_cpu_s"] / completed, 3)
    ctx.log(f"[{ctx.target}] churn {o.churn_rate:g}/s offered: {out['cycles_per_s']}/s done, "
            f"{sum(failures.values())} failed, handshake p50 {hists['connect'].get('p50_ms')} "
            f"p99 {hists['connect'].get('p99_ms')} ms, cycle p99 {hists['cycle'].get('p99_ms')} ms")
    return out


RUNNERS = {"idle": scenario_idle, "fanout": scenario_fanout, "smallrooms": scenario_smallrooms,
           "churn": scenario_churn, "slow": scenario_slow}


def run(scenario: str, target: str, opts: Opts, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one scenario against one target; always returns a report (``ok`` false on failure)."""
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    report: dict[str, Any] = {
        "scenario": scenario, "target": target, "run_id": run_id,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg_before": loadavg(),
        "params": {k: getattr(opts, k) for k in Opts.__dataclass_fields__},
    }
    t_start = time.monotonic()
    ctx = Context(target, opts, run_id, log if not opts.quiet else (lambda _m: None))
    try:
        with ctx:
            report["target_description"] = ctx.description
            first = ctx.sample()
            try:
                report["result"] = RUNNERS[scenario](ctx)
            finally:
                last = ctx.sample()
                report["server"] = {
                    "cpu_s": delta(first, last, "server"),
                    "rss_start": first.get("server", {}).get("rss"),
                    "rss_end": last.get("server", {}).get("rss"),
                    "processes": last.get("server", {}).get("processes"),
                    "alive_at_end": ctx.server_alive(),
                }
                report["generator"] = {
                    "cpu_s": delta(first, last, "generator"),
                    "rss_end": last.get("generator", {}).get("rss"),
                    "processes": len(ctx.pool) if ctx.pool else 0,
                }
                if "redis" in first and "redis" in last:
                    report["redis"] = {"cpu_s": delta(first, last, "redis"),
                                       "rss_end": last["redis"]["rss"]}
        report["ok"] = True
    except KeyboardInterrupt:
        report["ok"] = False
        report["error"] = "interrupted"
        raise
    except Exception as exc:
        report["ok"] = False
        report["error"] = f"{type(exc).__name__}: {exc}"
        log(f"[{target}] FAILED: {report['error']}")
    finally:
        report["elapsed_s"] = round(time.monotonic() - t_start, 1)
        report["loadavg_after"] = loadavg()
        if ctx.server is not None:
            report.setdefault("server", {})["exit_code"] = getattr(ctx, "exit_code", None)
            report["server"]["log"] = str(ctx.server.log_path)
            report["server"]["log_problems"] = ctx.server.log_problems()
    report["problems"] = problems(report)
    return report


def problems(report: dict[str, Any]) -> list[str]:
    """Plain-language list of what went wrong in a run (empty when nothing did)."""
    out = []
    if report.get("error"):
        out.append(report["error"])
    res = report.get("result") or {}
    setups = [res.get("setup")] if isinstance(res.get("setup"), dict) else []
    for s in setups:
        if s and s.get("failures"):
            out.append(f"connection failures: {s['failures']}")
        if s and s.get("join_retries"):
            out.append(f"{s['join_retries']} joins answered 'unavailable' and were retried")
    levels = list(res.get("levels", [])) + [res[k] for k in ("baseline", "with_slow") if k in res]
    for lv in levels:
        tag = f"{lv.get('label') or 'rate'} {lv['offered_msgs_per_s']:g} msg/s"
        if lv["lost"]:
            out.append(f"{tag}: {lv['lost']} of {lv['expected_deliveries']} deliveries missing after "
                       f"{lv['drain_s']}s drain")
        if lv["gaps"] or lv["dups"]:
            out.append(f"{tag}: sequence gaps {lv['gaps']}, duplicates {lv['dups']}")
        if lv["errors"]:
            out.append(f"{tag}: server errors {lv['errors']}")
        if lv["unexpected_closes"]:
            out.append(f"{tag}: {lv['unexpected_closes']} healthy connections closed")
    if res.get("failures"):
        out.append(f"churn failures: {res['failures']}")
    if res.get("errors"):
        out.append(f"server errors: {res['errors']}")
    if res.get("unexpected_closes"):
        out.append(f"{res['unexpected_closes']} connections closed unexpectedly")
    srv = report.get("server", {})
    if srv.get("alive_at_end") is False:
        out.append("server process died during the run")
    lp = srv.get("log_problems") or {}
    if lp.get("count"):
        out.append(f"server log: {lp['count']} warning/error lines, e.g. {lp['lines'][:3]}")
    return out
