"""The servers under test: how to start each one on a free port, wait for it, and stop it.

Each target is started by the runner itself, in its own process group, with its
output in ``results/logs/``; ``stop()`` sends SIGTERM, waits, then SIGKILLs that group
(only processes this runner started). wschat runs with the benchmark settings every
run uses (rate limit out of the way, ``MAX_CONNECTIONS`` above N, warnings-only logs).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS = HERE / "peers"
NODE_WS_FULL = PEERS / "node_ws_full"  # an npm project of its own (ws, prom-client)
LOGS = HERE / "results" / "logs"

TARGETS = ("wschat", "wschat-redis", "socketio", "websockets", "gevent-bare", "gevent-bare-redis",
           "node-ws", "node-ws-full", "bun")
#: the Redis database wschat-redis runs use; flushed before each such run. Empty: a
#: private redis-server started for the run (free port, no persistence, stopped at exit)
DEFAULT_REDIS_URL = ""


def node_ws_full_missing() -> list[str]:
    """The packages of ``peers/node_ws_full/package.json`` not installed there."""
    return [name for name in ("ws", "prom-client")
            if not (NODE_WS_FULL / "node_modules" / name / "package.json").exists()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TargetSpec:
    name: str
    codec: str  # "plain" or "socketio"
    argv: list[str]
    env: dict[str, str]
    health: str  # "http" (GET /health) or "tcp"
    description: str
    redis_url: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    # The server's working directory. gunicorn puts its working directory first on
    # sys.path before it reads its config (which imports wschat), ahead of PYTHONPATH:
    # a wschat started in REPO imports REPO's wschat whatever --server-tree says.
    cwd: str | None = None


def bun_binary() -> str | None:
    local = PEERS / "node_modules" / ".bin" / "bun"
    if local.exists():
        return str(local)
    return shutil.which("bun")


def tree_pythonpath(tree: Path, current: str | None) -> str:
    """PYTHONPATH that imports wschat from ``tree``, ahead of the installed (editable) one."""
    return os.pathsep.join(filter(None, [str(tree), current]))


def build(name: str, port: int, metrics_port: int, *, max_connections: int, heartbeat: float,
          redis_url: str = DEFAULT_REDIS_URL, redis_workers: int = 2,
          server_tree: str | None = None,
          env_overrides: dict[str, str] | None = None) -> TargetSpec:
    """The command line and environment that start target ``name`` on ``port``
    (``wschat-redis``: ``redis_workers`` gunicorn workers; ``server_tree``: wschat and
    its gunicorn.conf.py from that checkout instead of this one)."""
    env = dict(os.environ)
    env.update({"HOST": "127.0.0.1", "PORT": str(port), "HEARTBEAT_INTERVAL": str(heartbeat),
                "PYTHONUNBUFFERED": "1"})
    py = sys.executable
    if name in ("wschat", "wschat-redis"):
        env.update({
            "METRICS_PORT": str(metrics_port),
            "MAX_CONNECTIONS": str(max_connections),
            "RATE_LIMIT": "1000000",
            "RATE_LIMIT_BURST": "1000000",
            "MAX_CONNECTIONS_PER_IP": "0",  # the load comes from a few loopback addresses
            "MAX_HANDSHAKES_PER_IP": "0",  # and opens connections by the thousand
            "LOG_LEVEL": "warning",
            "GRACEFUL_TIMEOUT": "5",
            "WEB_CONCURRENCY": "1",
        })
        env.pop("REDIS_URL", None)
        redis = None
        if name == "wschat-redis":
            redis_url = redis_url or private_redis_url()
            env.update({"REDIS_URL": redis_url, "WEB_CONCURRENCY": str(redis_workers)})
            redis = redis_url
        tree = Path(server_tree).resolve() if server_tree else REPO
        if server_tree:
            env["PYTHONPATH"] = tree_pythonpath(tree, env.get("PYTHONPATH"))
        gunicorn = str(Path(py).with_name("gunicorn"))
        argv = [gunicorn if os.path.exists(gunicorn) else "gunicorn", "-c", str(tree / "gunicorn.conf.py"),
                "wschat:app"]
        desc = ("wschat, gunicorn + 1 gevent worker, memory backend" if redis is None else
                f"wschat, gunicorn + {redis_workers} gevent worker{'s' * (redis_workers > 1)}, "
                "Redis backend")
        if env_overrides:
            env.update(env_overrides)
        return TargetSpec(name, "plain", argv, env, "http", desc, redis_url=redis, cwd=str(tree))
    if name == "socketio":
        argv = [py, str(PEERS / "socketio_gevent.py"), "--port", str(port)]
        return TargetSpec(name, "socketio", argv, env, "tcp", "python-socketio 5 on gevent pywsgi")
    if name == "websockets":
        argv = [py, str(PEERS / "websockets_server.py"), "--port", str(port)]
        return TargetSpec(name, "plain", argv, env, "tcp", "websockets (asyncio + uvloop)")
    if name == "gevent-bare":
        argv = [py, str(PEERS / "gevent_bare.py"), "--port", str(port)]
        return TargetSpec(name, "plain", argv, env, "tcp",
                          "gevent + orjson, no framework: the floor of wschat's stack")
    if name == "gevent-bare-redis":
        redis_url = redis_url or private_redis_url()
        argv = [py, str(PEERS / "gevent_bare_redis.py"), "--port", str(port),
                "--workers", str(redis_workers), "--redis-url", redis_url]
        return TargetSpec(name, "plain", argv, env, "tcp",
                          f"gevent-bare across {redis_workers} processes through Redis, "
                          "redis-py used plainly (no pipelining)", redis_url=redis_url)
    if name == "node-ws":
        argv = ["node", str(PEERS / "node_ws" / "server.js"), "--port", str(port)]
        return TargetSpec(name, "plain", argv, env, "tcp", "Node.js + ws 8")
    if name == "node-ws-full":
        # wschat's per-message work in Node, with the settings wschat runs under here
        # (the rate limit out of the way, as in the wschat branch above).
        env.update({"RATE_LIMIT": "1000000", "RATE_LIMIT_BURST": "1000000"})
        if node_ws_full_missing():
            raise RuntimeError("node-ws-full needs its packages: "
                               "run `python -m loadtest setup-peers`")
        argv = ["node", str(NODE_WS_FULL / "server.js"), "--port", str(port)]
        return TargetSpec(name, "plain", argv, env, "http",
                          "Node.js + ws 8 doing wschat's per-message work (validation, rate "
                          "limits, history, dedupe, prom-client metrics)")
    if name == "bun":
        bun = bun_binary()
        if bun is None:
            raise RuntimeError("bun is not installed: run `python -m loadtest setup-peers`")
        argv = [bun, str(PEERS / "bun_server.ts"), "--port", str(port)]
        return TargetSpec(name, "plain", argv, env, "tcp", "Bun Bun.serve pub/sub (uWebSockets)")
    raise ValueError(f"unknown target {name!r}; one of {', '.join(TARGETS)}")


class Server:
    """A running target: its process (group), log file and ports."""

    def __init__(self, spec: TargetSpec, port: int, log_path: Path) -> None:
        self.spec = spec
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout: float = 30.0) -> None:
        if self.spec.redis_url:
            _flush_redis(self.spec.redis_url)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.spec.argv, env=self.spec.env, cwd=self.spec.cwd or str(REPO), stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode} at start; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            if self._ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.spec.name} not ready after {timeout:.0f}s; log {self.log_path}:\n"
                           f"{self.log_tail()}")

    def _ready(self) -> bool:
        if self.spec.health == "http":
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 8.0) -> int | None:
        """SIGTERM, wait ``grace`` seconds, then SIGKILL the server's own process group."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group we created: stragglers only
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_problems(self, limit: int = 12) -> dict[str, object]:
        """Lines of the server log that look like trouble (errors, tracebacks, warnings)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return {"count": 0, "lines": []}
        bad = [ln for ln in text.splitlines()
               if re.search(r"Traceback|ERROR|CRITICAL|Exception|WARNING|Error:|error:", ln)]
        return {"count": len(bad), "lines": bad[:limit]}


_private_redis: subprocess.Popen | None = None
_private_redis_url = ""


def private_redis_url() -> str:
    """A redis-server of this run's own (started once, on a free port of 127.0.0.1, no
    RDB/AOF, its files in a temporary directory; stopped when the process exits)."""
    global _private_redis, _private_redis_url
    if _private_redis is not None and _private_redis.poll() is None:
        return _private_redis_url
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("wschat-redis needs redis-server on PATH, or --redis-url")
    import tempfile

    port, workdir = free_port(), tempfile.mkdtemp(prefix="loadtest-redis-")
    _private_redis = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir, "--maxclients", "10000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        start_new_session=True)
    atexit.register(_stop_private_redis, workdir)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if _private_redis.poll() is not None:
                raise RuntimeError(f"redis-server exited with {_private_redis.returncode}")
            time.sleep(0.05)
    _private_redis_url = f"redis://127.0.0.1:{port}/14"
    return _private_redis_url


def _stop_private_redis(workdir: str) -> None:
    proc = _private_redis
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
    shutil.rmtree(workdir, ignore_errors=True)


def _flush_redis(url: str) -> None:
    try:
        import redis
    except ImportError as exc:
        raise RuntimeError("wschat-redis needs the redis package (pip install redis)") from exc
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
