"""Paired A/B runs of one scenario: is a change to wschat cheaper per message?

``python -m loadtest.ab [--baseline REV] [--candidate DIR] [--pairs N] [--json FILE]
-- SCENARIO [ARGS...]``

runs ``python -m loadtest SCENARIO ARGS`` against two wschat checkouts in turn: A, the
baseline (``git archive REV``, default HEAD), and B, this working tree (or
``--candidate DIR``). The order alternates (A B, B A, A B, ...), so that the drift of a
shared, noisy machine falls on both sides alike. Each run's figure is the server's CPU
per published message, Redis's included for ``wschat-redis``, over the phase and its
drain. The verdict, per offered rate, is the mean of the pairs' log ratios B/A with a 95%
confidence interval (Student's t): a difference is resolved when the interval excludes
no change. Single runs on this kind of machine spread +-10%; a few pairs resolve a few
per cent.

Example: ``python -m loadtest.ab --pairs 6 -- smallrooms -n 2000 --rate 2000 -d 8``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .targets import REPO, tree_pythonpath

#: two-sided 95% Student's t by degrees of freedom (1.96 beyond the table)
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26,
        10: 2.23, 12: 2.18, 15: 2.13, 20: 2.09, 30: 2.04}


def t95(df: int) -> float:
    return next((_T95[k] for k in sorted(_T95) if k >= df), 1.96)


def us_per_message(report: dict[str, Any]) -> dict[float, float]:
    """Offered rate -> server (+ Redis) CPU microseconds per published message."""
    out = {}
    for level in report["result"]["levels"]:
        cpu = level["cpu_with_drain"]
        used = (cpu["server_cpu_s"] or 0.0) + (cpu.get("redis_cpu_s") or 0.0)
        if level["sent"]:
            out[level["offered_msgs_per_s"]] = used / level["sent"] * 1e6
    return out


def verdict(ratios: list[float]) -> dict[str, Any]:
    """The mean ratio B/A of paired runs (geometric) and its 95% interval."""
    logs = [math.log(r) for r in ratios]
    n = len(logs)
    mean = sum(logs) / n
    out: dict[str, Any] = {"pairs": n, "ratio": math.exp(mean), "low": None, "high": None}
    if n > 1:
        sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
        half = t95(n - 1) * sd / math.sqrt(n)
        out["low"], out["high"] = math.exp(mean - half), math.exp(mean + half)
    return out


def describe(v: dict[str, Any]) -> str:
    change = f"B/A {v['ratio']:.3f} ({(v['ratio'] - 1) * 100:+.1f}%)"
    if v["low"] is None:
        return f"{change}; one pair: no interval"
    interval = f"95% CI {(v['low'] - 1) * 100:+.1f}% to {(v['high'] - 1) * 100:+.1f}%"
    if v["high"] < 1:
        return f"{change}, {interval}: B is cheaper"
    if v["low"] > 1:
        return f"{change}, {interval}: B costs more"
    return f"{change}, {interval}: no difference resolved"


def baseline_tree(rev: str, tree: Path) -> Path:
    """``git archive REV`` of this repository, unpacked into ``tree``."""
    tree.mkdir()
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", rev], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True)
    assert archive.stdout is not None
    archive.stdout.close()
    if archive.wait() != 0:
        raise SystemExit(f"git archive {rev} failed")
    return tree


def imported_from(tree: Path) -> Path:
    """Where a server started for ``tree`` imports wschat from (it must be ``tree``)."""
    env = dict(os.environ, PYTHONPATH=tree_pythonpath(tree, os.environ.get("PYTHONPATH")))
    # cwd=tree: where the server is started (gunicorn puts its cwd first on sys.path)
    out = subprocess.run([sys.executable, "-c", "import wschat; print(wschat.__file__)"],
                         env=env, cwd=str(tree), capture_output=True, text=True,
                         check=True)
    return Path(out.stdout.strip()).resolve().parent.parent


def run_once(tree: Path, scenario: list[str], out: Path) -> dict[float, float]:
    cmd = [sys.executable, "-m", "loadtest", *scenario, "--server-tree", str(tree),
           "--json", str(out), "-q"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if not out.exists():
        raise RuntimeError(f"{' '.join(cmd)} wrote no report:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    [report] = json.loads(out.read_text())["runs"]
    if not report.get("ok"):
        raise RuntimeError(f"run against {tree} failed: {report.get('problems') or report.get('error')}")
    keep = os.environ.get("AB_KEEP")  # (worktree aid) keep every run's report
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / f"{out.stem}-{tree.name}.json").write_text(out.read_text())
    for level in report["result"]["levels"]:
        cpu = level["cpu_with_drain"]
        print(f"  run {tree.name}: {level['offered_msgs_per_s']:g} msg/s lost {level.get('lost')} "
              f"gaps {level.get('gaps')} dups {level.get('dups')} p99 "
              f"{level['latency_ms'].get('p99_ms')} ms; CPU % server {cpu['server_cpu_pct']} "
              f"redis {cpu.get('redis_cpu_pct')} generator {cpu['generator_cpu_pct']} "
              f"other {cpu['other_cpu_pct']}", flush=True)
    return us_per_message(report)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="HEAD", help="A: this git revision [HEAD]")
    p.add_argument("--candidate", type=Path, default=REPO,
                   help="B: this checkout [the working tree]")
    p.add_argument("--pairs", type=int, default=4, help="pairs of runs [4]")
    p.add_argument("--json", type=Path, help="write every run's figures here")
    p.add_argument("scenario", nargs=argparse.REMAINDER,
                   help="-- then the scenario and its options, as for python -m loadtest")
    args = p.parse_args(argv)
    scenario = args.scenario[1:] if args.scenario[:1] == ["--"] else args.scenario
    if not scenario or scenario[0] not in ("fanout", "smallrooms", "churn", "slow"):
        p.error("give a scenario after --, e.g. -- smallrooms -n 2000 --rate 2000 -d 8")
    if "--url" in scenario or "--server-tree" in scenario:
        p.error("the scenario's server is started here: no --url or --server-tree")
    target = scenario[scenario.index("--target") + 1] if "--target" in scenario else "wschat"
    if target not in ("wschat", "wschat-redis"):
        p.error("--target: wschat or wschat-redis (one)")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="loadtest-ab-") as tmp:
        trees = {"A": baseline_tree(args.baseline, Path(tmp) / "baseline"),
                 "B": args.candidate.resolve()}
        for side, tree in trees.items():
            if (found := imported_from(tree)) != tree:
                raise SystemExit(f"{side}: a server for {tree} would import wschat from {found}")
        print(f"# A: {args.baseline}; B: {trees['B']}; {args.pairs} pairs of "
              f"python -m loadtest {' '.join(scenario)}", flush=True)
        for i in range(args.pairs):
            order = ("A", "B") if i % 2 == 0 else ("B", "A")
            pair: dict[str, Any] = {"order": "".join(order)}
            for side in order:
                pair[side] = run_once(trees[side], scenario, Path(tmp) / f"{i}-{side}.json")
            runs.append(pair)
            for rate in sorted(pair["A"]):
                a, b = pair["A"][rate], pair["B"].get(rate)
                if b is None:
                    continue
                ratio = f"B/A {b / a:.3f}" if a > 0 and b > 0 else (
                    "no CPU measured on one side (a run too short for the CPU clock's "
                    "ticks): pair left out")
                print(f"pair {i + 1} ({pair['order']}), {rate:g} msg/s: A {a:.1f} us/msg, "
                      f"B {b:.1f} us/msg, {ratio}", flush=True)
    summary = {}
    for rate in sorted(runs[0]["A"]):
        ratios = [r["B"][rate] / r["A"][rate] for r in runs
                  if r["A"].get(rate, 0) > 0 and r["B"].get(rate, 0) > 0]
        if not ratios:
            raise SystemExit(f"{rate:g} msg/s: no pair measured CPU on both sides; "
                             "run longer or at a higher rate")
        summary[rate] = v = verdict(ratios)
        print(f"{rate:g} msg/s, {v['pairs']} pairs: {describe(v)}")
    if args.json:
        args.json.write_text(json.dumps({"baseline": args.baseline, "candidate": str(args.candidate),
                                         "scenario": scenario, "runs": runs,
                                         "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
