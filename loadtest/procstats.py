"""Resource use of process trees (server and generator), read with psutil.

CPU seconds are user + system time. A process that exits keeps the last value we
saw for it, so a worker that dies mid-run does not make the total go backwards.
"""

from __future__ import annotations

import psutil


class TreeMeter:
    """Sum RSS and CPU time over a root process and all its descendants."""

    def __init__(self, pids: list[int]) -> None:
        self.roots = [psutil.Process(p) for p in pids]
        self._cpu_seen: dict[int, float] = {}

    def processes(self) -> list[psutil.Process]:
        procs = []
        for root in self.roots:
            try:
                procs.append(root)
                procs.extend(root.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        return procs

    def sample(self) -> dict[str, float]:
        """Current total RSS (bytes), cumulative CPU seconds and process count."""
        rss = 0
        count = 0
        for proc in self.processes():
            try:
                with proc.oneshot():
                    t = proc.cpu_times()
                    rss += proc.memory_info().rss
                self._cpu_seen[proc.pid] = t.user + t.system
                count += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return {"rss": rss, "cpu_s": sum(self._cpu_seen.values()), "processes": count}

    def alive(self) -> bool:
        return all(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in self.roots)


class RedisMeter:
    """CPU seconds and RSS of the Redis server behind ``url`` (its own INFO)."""

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)

    def sample(self) -> dict[str, float]:
        info = self.client.info()
        return {"rss": float(info["used_memory_rss"]),
                "cpu_s": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
                "used_memory": float(info["used_memory"])}
