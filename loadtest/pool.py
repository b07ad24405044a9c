"""The orchestrator's side of the generator processes (see ``loadtest.worker``)."""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

from .procstats import TreeMeter
from .worker import worker_main


class WorkerError(RuntimeError):
    """A generator process failed a command or died."""


class Pool:
    """Several generator processes, each with a pipe; commands go to all and replies come back."""

    def __init__(self, n: int, host: str, port: int, codec: str) -> None:
        ctx = mp.get_context("spawn")
        self.conns = []
        self.procs = []
        for i in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, i, {"host": host, "port": port, "codec": codec}),
                               name=f"loadtest-worker-{i}", daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self.meter = TreeMeter([p.pid for p in self.procs])

    def __len__(self) -> int:
        return len(self.procs)

    def send(self, i: int, cmd: str, **args: Any) -> None:
        self.conns[i].send((cmd, args))

    def recv(self, i: int, timeout: float) -> Any:
        conn = self.conns[i]
        if not conn.poll(timeout):
            raise WorkerError(f"generator process {i} did not answer within {timeout:.0f}s")
        try:
            status, value = conn.recv()
        except EOFError as exc:
            raise WorkerError(f"generator process {i} died (exit code {self.procs[i].exitcode})") from exc
        if status != "ok":
            raise WorkerError(f"generator process {i}: {value}")
        return value

    def call(self, cmd: str, per_worker: list[dict[str, Any]] | None = None, timeout: float = 120.0,
             **common: Any) -> list[Any]:
        """Send ``cmd`` to every process (args: ``common`` merged with ``per_worker[i]``) and wait for all."""
        for i in range(len(self.procs)):
            args = dict(common)
            if per_worker is not None:
                args.update(per_worker[i])
            self.send(i, cmd, **args)
        return self.gather(cmd, timeout)

    def gather(self, cmd: str, timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        return [self.recv(i, max(0.1, deadline - time.monotonic())) for i in range(len(self.procs))]

    def close(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.is_alive():
                try:
                    self.send(i, "exit")
                except (BrokenPipeError, OSError):
                    pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
