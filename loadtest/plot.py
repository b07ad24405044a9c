"""PNG plots of run reports: latency vs delivered load (fanout) and server memory vs connections (idle)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"wschat": "#d62728", "wschat-redis": "#ff7f0e", "socketio": "#9467bd", "websockets": "#2ca02c",
          "node-ws": "#1f77b4", "node-ws-full": "#17becf", "bun": "#7f7f7f"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(reports: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write every plot the reports allow into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fan = [r for r in reports if r["scenario"] == "fanout" and r.get("result", {}).get("levels")]
    groups: dict[int, list[dict[str, Any]]] = {}
    for r in fan:
        groups.setdefault(r["result"]["members_per_room"], []).append(r)
    for members, group in sorted(groups.items()):
        paths.append(plot_latency(group, out / f"fanout-latency-{members}-members.png", members))
    idle = [r for r in reports if r["scenario"] == "idle" and r.get("result", {}).get("points")]
    if idle:
        paths.append(plot_memory(idle, out / "idle-memory.png"))
    return paths


def plot_latency(reports: list[dict[str, Any]], path: Path, members: int) -> Path:
    plt = _plt()
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for r in reports:
        levels = r["result"]["levels"]
        xs = [lv["delivered_per_s"] for lv in levels]
        color = COLORS.get(r["target"])
        for ax, key in zip(axes, ("p50_ms", "p99_ms")):
            ys = [lv["latency_ms"].get(key) for lv in levels]
            ax.plot(xs, ys, marker="o", label=r["target"], color=color)
            for x, y, lv in zip(xs, ys, levels):
                if lv["lost"]:
                    ax.annotate("loss", (x, y), fontsize=7, color=color)
    for ax, key, target in zip(axes, ("p50", "p99"), (10, 50)):
        ax.axhline(target, color="black", linestyle="--", linewidth=0.8)
        ax.text(0.01, target, f" seed target {key} < {target} ms", va="bottom", fontsize=8,
                transform=ax.get_yaxis_transform())
        ax.axvline(100_000, color="black", linestyle=":", linewidth=0.8)
        ax.text(100_000, 0.98, " seed 100k msg/s", va="top", fontsize=8, transform=ax.get_xaxis_transform())
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("delivered messages/s (all members)")
        ax.set_ylabel(f"{key} latency, ms (from intended send time)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    n_rooms = reports[0]["params"]["rooms"]
    fig.suptitle(f"fanout: {n_rooms} rooms x {members} members, open-loop offered rates")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_memory(reports: list[dict[str, Any]], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in reports:
        pts = r["result"]["points"]
        xs = [p["connections"] for p in pts]
        ys = [(p["server_rss"] or 0) / 2**20 for p in pts]
        slope = r["result"].get("server_bytes_per_connection")
        ax.plot(xs, ys, marker="o", color=COLORS.get(r["target"]),
                label=f"{r['target']} ({slope / 1024:.1f} KiB/conn)" if slope is not None else r["target"])
    ax.set_xlabel("idle connections (joined, heartbeats on)")
    ax.set_ylabel("server RSS, MiB (all processes)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("idle: server memory vs connections (seed target < 1 KB/conn)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
