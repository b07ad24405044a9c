"""Command line: ``python -m loadtest {idle,fanout,smallrooms,churn,slow,setup-peers,plot,report} ...``."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import scenarios as sc
from . import summary
from . import targets as tg


def _rates(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(int(x) for x in text.split(",") if x.strip())
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("room sizes are positive integers, e.g. 2,3,4,5")
    return sizes


def _targets(text: str) -> list[str]:
    names = list(tg.TARGETS) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    for n in names:
        if n not in tg.TARGETS:
            raise argparse.ArgumentTypeError(f"unknown target {n!r}; one of {', '.join(tg.TARGETS)}, all")
    return names


def build_parser() -> argparse.ArgumentParser:
    d = sc.Opts()
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (("idle", "hold N joined connections; memory per connection and idle CPU"),
                           ("fanout", "R rooms x M members, publishers at fixed offered rates"),
                           ("smallrooms", "many rooms of 2-5 members plus DMs, every client publishing "
                                          "at a fixed total rate"),
                           ("churn", "connect/join/leave/disconnect cycles at a fixed rate"),
                           ("slow", "fan-out while a share of clients stops reading")):
        s = sub.add_parser(name, help=helptext, description=helptext)
        s.add_argument("--target", type=_targets, default=["wschat"],
                       help=f"one or more of {', '.join(tg.TARGETS)} (comma-separated) or all [wschat]")
        s.add_argument("--connections", "-n", type=int, default=d.connections,
                       help="connections (fanout/slow/idle: all clients; churn: resident background "
                            f"clients) [{d.connections}]")
        s.add_argument("--rooms", "-r", type=int, default=d.rooms, help=f"rooms [{d.rooms}]")
        s.add_argument("--publishers-per-room", type=int, default=d.publishers_per_room,
                       help=f"members of each room that publish [{d.publishers_per_room}]")
        s.add_argument("--rate", type=_rates, default=d.rates, dest="rates",
                       help="offered messages/s published, all rooms together; comma-separated for a "
                            "sweep (fanout), first value used by slow [100]")
        s.add_argument("--duration", "-d", type=float, default=d.duration,
                       help=f"measured seconds per rate (churn: seconds of cycles) [{d.duration}]")
        s.add_argument("--warmup", type=float, default=d.warmup, help=f"unmeasured seconds before each rate [{d.warmup}]")
        s.add_argument("--drain", type=float, default=d.drain, help=f"max seconds to wait for stragglers [{d.drain}]")
        s.add_argument("--size", type=int, default=d.size, help=f"message text bytes [{d.size}]")
        s.add_argument("--workers", "-w", type=int, default=d.workers,
                       help=f"generator processes (each up to ~19k connections) [{d.workers}]")
        s.add_argument("--source-ips", type=int, default=d.source_ips,
                       help=f"client source addresses 127.0.0.2.. [{d.source_ips}]")
        s.add_argument("--concurrency", type=int, default=d.concurrency,
                       help=f"connection attempts in flight per generator process [{d.concurrency}]")
        s.add_argument("--connect-timeout", type=float, default=d.connect_timeout)
        s.add_argument("--heartbeat", type=float, default=d.heartbeat,
                       help=f"HEARTBEAT_INTERVAL given to every server [{d.heartbeat}]")
        s.add_argument("--idle-steps", type=int, default=d.idle_steps, help=f"idle: RSS samples after 0..N in this many steps [{d.idle_steps}]")
        s.add_argument("--idle-window", type=float, default=d.idle_window, help=f"idle: CPU window seconds [{d.idle_window}]")
        s.add_argument("--settle", type=float, default=d.settle, help=f"seconds to settle before an RSS sample [{d.settle}]")
        s.add_argument("--churn-rate", type=float, default=d.churn_rate, help=f"churn: cycles/s offered [{d.churn_rate}]")
        s.add_argument("--churn-concurrency", type=int, default=d.churn_concurrency,
                       help=f"churn: max cycles in flight [{d.churn_concurrency}]")
        s.add_argument("--slow-share", type=float, default=d.slow_share, help=f"slow: share of each room that stops reading [{d.slow_share}]")
        s.add_argument("--slow-rcvbuf", type=int, default=d.slow_rcvbuf, help=f"slow: SO_RCVBUF of slow clients [{d.slow_rcvbuf}]")
        s.add_argument("--stop-p99-ms", type=float, default=d.stop_p99_ms, help="fanout: stop the sweep once p99 passes this")
        s.add_argument("--quiet-gate", type=float, default=d.quiet_gate,
                       help="before each measured phase wait until other processes use less than this "
                            f"%% of a core (0: don't wait) [{d.quiet_gate}]")
        s.add_argument("--quiet-wait", type=float, default=d.quiet_wait,
                       help=f"longest wait for a quiet machine, seconds [{d.quiet_wait}]")
        s.add_argument("--room-sizes", type=_sizes, default=d.room_sizes,
                       help="smallrooms: room sizes used in turn [" + ",".join(map(str, d.room_sizes)) + "]")
        s.add_argument("--dm-share", type=float, default=d.dm_share,
                       help=f"smallrooms: share of the sends that are DMs (to a client in another room) [{d.dm_share}]")
        s.add_argument("--client-msg-id", action="store_true", help="send a client_msg_id with every message")
        s.add_argument("--redis-url", default=d.redis_url, help="wschat-redis: Redis database (flushed!); without it the run starts a "
                            "private redis-server (free port, no persistence, stopped at exit)")
        s.add_argument("--redis-workers", type=int, default=d.redis_workers,
                       help=f"wschat-redis: gunicorn workers [{d.redis_workers}]")
        s.add_argument("--server-tree", help="wschat targets: run wschat from this checkout (its "
                       "wschat/ and gunicorn.conf.py) instead of this one")
        s.add_argument("--url", help="use an already running server at ws://HOST:PORT (one target, not started)")
        s.add_argument("--server-pid", type=int, help="with --url: the server's PID, for its CPU and RSS")
        s.add_argument("--json", type=Path, help="write the report(s) here")
        s.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    sp = sub.add_parser("setup-peers", help="npm ci in loadtest/peers (ws, bun) and "
                        "peers/node_ws_full (ws, prom-client)")
    sp.add_argument("--check", action="store_true", help="only say what is missing")
    pl = sub.add_parser("plot", help="PNG plots from report JSON files")
    pl.add_argument("files", nargs="+", type=Path)
    pl.add_argument("--out", type=Path, default=tg.HERE / "results")
    rp = sub.add_parser("report", help="Markdown comparison tables from report JSON files")
    rp.add_argument("files", nargs="+", type=Path)
    return p


def load_reports(files: list[Path]) -> list[dict[str, Any]]:
    out = []
    for f in files:
        data = json.loads(f.read_text())
        out.extend(data["runs"] if "runs" in data else [data])
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "setup-peers":
        return setup_peers(args.check)
    if args.command == "plot":
        from .plot import plot_all

        for path in plot_all(load_reports(args.files), args.out):
            print(path)
        return 0
    if args.command == "report":
        reports = load_reports(args.files)
        for scen in sc.SCENARIOS:
            group = [r for r in reports if r["scenario"] == scen]
            if group:
                print(f"### {scen}\n\n{summary.comparison(group, markdown=True)}\n")
        return 0
    fields = sc.Opts.__dataclass_fields__
    opts = sc.Opts(**{k: v for k, v in vars(args).items() if k in fields})
    if args.url and len(args.target) != 1:
        print("--url takes exactly one --target", file=sys.stderr)
        return 2
    command = "python -m loadtest " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    out: dict[str, Any] = {"command": command, "machine": sc.machine_info(), "runs": []}
    print(f"# {command}\n# machine: {out['machine']['nproc']} x {out['machine']['cpu_model']}, "
          f"kernel {out['machine']['kernel']}, Python {out['machine']['python']}; load avg {sc.loadavg()}",
          flush=True)
    for target in args.target:
        report = sc.run(args.command, target, opts, log=lambda m: print(m, flush=True))
        out["runs"].append(report)
        print(summary.text(report), flush=True)
        if args.json:
            write_json(args.json, out)
        if len(args.target) > 1:
            time.sleep(2)  # let the previous server's sockets and CPU settle
    if len(args.target) > 1:
        print("\n" + summary.comparison(out["runs"]))
    if args.json:
        write_json(args.json, out)
        print(f"# report written to {args.json}")
    return 0 if all(r.get("ok") for r in out["runs"]) else 1


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def setup_peers(check: bool) -> int:
    # Two npm projects: peers/ (ws for node_ws, bun) and peers/node_ws_full/ (ws and
    # prom-client), which the test suite installs alone (bun is 100 MB).
    projects = {tg.PEERS: [], tg.NODE_WS_FULL: []}
    if not (tg.PEERS / "node_modules" / "ws").exists():
        projects[tg.PEERS].append("ws")
    if tg.bun_binary() is None:
        projects[tg.PEERS].append("bun")
    projects[tg.NODE_WS_FULL] = tg.node_ws_full_missing()
    missing = [f"{name} ({folder.name})" for folder, names in projects.items() for name in names]
    if check or not missing:
        print("peers: " + ("missing " + ", ".join(missing) if missing
                           else "ws, bun and node_ws_full's ws and prom-client installed"))
        return 1 if missing else 0
    cmd = ["npm", "ci", "--no-audit", "--no-fund"]
    for folder, names in projects.items():
        if names:
            print(f"$ (cd {folder} && {' '.join(cmd)})")
            status = subprocess.call(cmd, cwd=folder)
            if status:
                return status
    return 0
