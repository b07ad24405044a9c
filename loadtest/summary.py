"""Human summaries and cross-target comparison tables (text and Markdown) of run reports."""

from __future__ import annotations

from typing import Any

#: (key, label, higher_is_better) of each scenario's headline figures
HEADLINES: dict[str, list[tuple[str, str, bool]]] = {
    "idle": [("connections", "connections held", True),
             ("bytes_per_conn", "server B/conn", False),
             ("cpu_pct_per_1k", "server CPU %/1k idle", False),
             ("gen_cpu_pct_per_1k", "generator CPU %/1k", False)],
    "fanout": [("offered_msgs_per_s", "offered msg/s", True),
               ("delivered_per_s", "delivered/s", True),
               ("p50_ms", "p50 ms", False),
               ("p99_ms", "p99 ms", False),
               ("p999_ms", "p99.9 ms", False),
               ("max_ms", "max ms", False),
               ("lost", "lost", False),
               ("server_cpu_pct", "server CPU %", False),
               ("redis_cpu_pct", "Redis CPU %", False),
               ("gen_cpu_pct", "generator CPU %", False),
               ("other_cpu_pct", "other CPU %", False),
               # CPU the hypervisor gave other guests while this VM wanted it: high steal
               # makes every figure slower (caches are shared too); compare within a run.
               ("steal_cpu_pct", "steal CPU %", False),
               ("rss_late_mib_min", "server RSS MiB/min, 2nd half", False),
               ("redis_rss_late_mib_min", "Redis RSS MiB/min, 2nd half", False),
               ("deliveries_per_cpu_s", "deliveries per server CPU-s", True),
               ("cpu_us_per_msg", "server+Redis CPU us/msg", False)],
    "churn": [("cycles_per_s", "cycles/s", True),
              ("failures", "failed cycles", False),
              ("handshake_p50_ms", "handshake p50 ms", False),
              ("handshake_p99_ms", "handshake p99 ms", False),
              ("cycle_p99_ms", "cycle p99 ms", False),
              ("server_cpu_ms_per_cycle", "server CPU ms/cycle", False),
              ("gen_cpu_pct", "generator CPU %", False)],
    "slow": [("baseline_p99_ms", "healthy p99 ms, all reading", False),
             ("slow_p99_ms", "healthy p99 ms, slow paused", False),
             ("healthy_lost", "healthy lost", False),
             ("slow_closed", "slow clients dropped", True),
             ("rss_growth_mib", "server RSS growth MiB", False),
             ("server_cpu_pct", "server CPU %", False)],
}

# smallrooms: fanout's figures plus what one published message costs
HEADLINES["smallrooms"] = HEADLINES["fanout"][:-1] + [
    ("published_per_cpu_s", "published msgs per server CPU-s", True), HEADLINES["fanout"][-1]]


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Headline figures of one report: one row (idle, churn, slow) or one per rate (fanout)."""
    res = report.get("result") or {}
    sc = report["scenario"]
    base = {"target": report["target"]}
    if not res:
        return [dict(base, error=report.get("error", "no result"))]
    if sc == "idle":
        return [dict(base, connections=res.get("connections_held"),
                     bytes_per_conn=res.get("server_bytes_per_connection"),
                     cpu_pct_per_1k=res.get("server_cpu_pct_per_1k"),
                     gen_cpu_pct_per_1k=res.get("generator_cpu_pct_per_1k"))]
    if sc in ("fanout", "smallrooms"):
        out = []
        for lv in res.get("levels", []):
            lat = lv["latency_ms"]
            cpu = lv["cpu_window"]
            out.append(dict(base, offered_msgs_per_s=lv["offered_msgs_per_s"],
                            offered_deliveries_per_s=lv["offered_deliveries_per_s"],
                            delivered_per_s=lv["delivered_per_s"], p50_ms=lat.get("p50_ms"),
                            p99_ms=lat.get("p99_ms"), p999_ms=lat.get("p999_ms"), max_ms=lat.get("max_ms"),
                            lost=lv["lost"], server_cpu_pct=cpu.get("server_cpu_pct"),
                            redis_cpu_pct=cpu.get("redis_cpu_pct"),
                            gen_cpu_pct=cpu.get("generator_cpu_pct"),
                            cpu_us_per_msg=lv.get("server_redis_cpu_us_per_msg"),
                            other_cpu_pct=cpu.get("other_cpu_pct"),
                            steal_cpu_pct=cpu.get("steal_cpu_pct"),
                            rss_late_mib_min=lv.get("server_rss_mib_per_min_late"),
                            redis_rss_late_mib_min=lv.get("redis_rss_mib_per_min_late"),
                            deliveries_per_cpu_s=lv.get("deliveries_per_server_cpu_s"),
                            published_per_cpu_s=lv.get("published_per_server_cpu_s"),
                            sustained=lv["sustained"]))
        return out or [dict(base, error="no level ran")]
    if sc == "churn":
        return [dict(base, cycles_per_s=res.get("cycles_per_s"),
                     failures=sum((res.get("failures") or {}).values()),
                     handshake_p50_ms=res["handshake_ms"].get("p50_ms"),
                     handshake_p99_ms=res["handshake_ms"].get("p99_ms"),
                     cycle_p99_ms=res["cycle_ms"].get("p99_ms"),
                     server_cpu_ms_per_cycle=res.get("server_cpu_ms_per_cycle"),
                     gen_cpu_pct=res["cpu"].get("generator_cpu_pct"))]
    if sc == "slow":
        b, w = res["baseline"], res["with_slow"]
        before, peak = res.get("server_rss_before"), res.get("server_rss_peak")
        return [dict(base, baseline_p99_ms=b["latency_ms"].get("p99_ms"),
                     slow_p99_ms=w["latency_ms"].get("p99_ms"), healthy_lost=b["lost"] + w["lost"],
                     slow_closed=w.get("slow_closed"),
                     rss_growth_mib=round((peak - before) / 2**20, 1) if peak and before else None,
                     server_cpu_pct=w["cpu_window"].get("server_cpu_pct"))]
    return [base]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def comparison(reports: list[dict[str, Any]], markdown: bool = False) -> str:
    """A table of every report's headline figures, with ratios against wschat's.

    A ratio is ``peer / wschat`` for the figure named in the last columns (fanout:
    at the same offered rate): above 1 means the peer has more of it.
    """
    if not reports:
        return ""
    sc = reports[0]["scenario"]
    cols = HEADLINES[sc]
    all_rows = [r for rep in reports for r in rows(rep)]
    ref = {}
    for r in all_rows:
        if r["target"] == "wschat":
            ref[r.get("offered_msgs_per_s")] = r
    ratio_cols = {"idle": ["bytes_per_conn", "cpu_pct_per_1k"],
                  "fanout": ["p99_ms", "deliveries_per_cpu_s"],
                  "smallrooms": ["p99_ms", "published_per_cpu_s"],
                  "churn": ["cycles_per_s", "server_cpu_ms_per_cycle"],
                  "slow": ["slow_p99_ms", "rss_growth_mib"]}[sc]
    header = ["target"] + [label for _, label, _ in cols] + [f"{k} vs wschat" for k in ratio_cols]
    lines = []
    for r in all_rows:
        cells = [r["target"]]
        if "error" in r:
            cells += [f"ERROR: {r['error']}"] + [""] * (len(header) - 2)
            lines.append(cells)
            continue
        cells += [_fmt(r.get(k)) for k, _, _ in cols]
        w = ref.get(r.get("offered_msgs_per_s"))
        for k in ratio_cols:
            a, b = r.get(k), (w or {}).get(k)
            cells.append(f"{a / b:.2f}x" if a is not None and b else "-")
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(c) + " |" for c in lines]
        return "\n".join(out)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*c) for c in lines])


def text(report: dict[str, Any]) -> str:
    """A short human summary of one report."""
    sc, tgt = report["scenario"], report["target"]
    srv, gen = report.get("server", {}), report.get("generator", {})
    head = (f"== {sc} on {tgt} ({report.get('target_description', '')}) "
            f"in {report.get('elapsed_s')}s, load avg before {report.get('loadavg_before')}")
    lines = [head]
    if not report.get("ok"):
        lines.append(f"   FAILED: {report.get('error')}")
    lines.append(f"   CPU seconds over the run: server {srv.get('cpu_s')}  generator {gen.get('cpu_s')}"
                 + (f"  redis {report['redis']['cpu_s']}" if "redis" in report else "")
                 + f"; server RSS {_mib(srv.get('rss_start'))} -> {_mib(srv.get('rss_end'))} MiB")
    res = report.get("result") or {}
    if sc == "idle" and res:
        lines.append(f"   {res.get('connections_held')} idle connections: {res.get('server_bytes_per_connection')} "
                     f"B/connection server RSS slope (r2 {res.get('fit_r2')}), server CPU "
                     f"{res['idle_window'].get('server_cpu_pct')}% = {res.get('server_cpu_pct_per_1k')}%/1k conns "
                     f"over {res['idle_window']['wall_s']}s; generator {res.get('generator_bytes_per_connection')} "
                     f"B/conn, {res['idle_window'].get('generator_cpu_pct')}% CPU")
        for p in res["points"]:
            lines.append(f"     N={p['connections']:>6}  server RSS {_mib(p['server_rss'])} MiB")
    elif sc == "fanout" and res:
        lines.append(f"   {res['setup']['opened']} connections, {res['members_per_room']} per room; "
                     f"setup {res['setup']['seconds']}s")
    elif sc == "smallrooms" and res:
        lines.append(f"   {res['setup']['opened']} connections in {res['rooms']} rooms of {res['room_sizes']} "
                     f"members, {res['dm_share']:.0%} of sends DMs; setup {res['setup']['seconds']}s")
    elif sc == "churn" and res:
        lines.append(f"   offered {res['offered_cycles_per_s']} cycles/s: completed {res['completed']}/{res['cycles']} "
                     f"({res['cycles_per_s']}/s); handshake {res['handshake_ms']}; cycle {res['cycle_ms']}; "
                     f"server {res['cpu'].get('server_cpu_pct')}% CPU, generator {res['cpu'].get('generator_cpu_pct')}%")
    elif sc == "slow" and res:
        lines.append(f"   {res['slow_clients']} slow clients; server RSS before {_mib(res.get('server_rss_before'))} "
                     f"peak {_mib(res.get('server_rss_peak'))} end {_mib(res.get('server_rss_end'))} MiB; "
                     f"slow clients dropped by the server: {res['with_slow'].get('slow_closed')}")
    if res and sc in ("fanout", "smallrooms", "slow"):
        lines.append(comparison([report]))
    for p in report.get("problems", []):
        lines.append(f"   PROBLEM: {p}")
    return "\n".join(lines)


def _mib(v: Any) -> str:
    return "-" if v is None else f"{v / 2**20:.1f}"
