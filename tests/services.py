"""The processes the tests run for real: wschat servers, private Redis and PostgreSQL.

``Server`` is a real ``gunicorn -c gunicorn.conf.py wschat:app`` on free ports.

The suite needs no service running on the machine. When ``REDIS_URL`` (or
``DATABASE_URL_TEST`` for PostgreSQL) is not given, ``conftest`` starts one
instance of each here, the first time a test asks for it, and removes it when
the session ends. Tests that stop and restart a server (a Redis restart, the
database going away) make one of their own with the same classes.

What a machine needs: the ``redis-server`` binary, and PostgreSQL's server
binaries (``initdb``, ``pg_ctl``, ``postgres``) on PATH or in Debian's
``/usr/lib/postgresql/*/bin``. On Debian: ``apt-get install redis-server
postgresql``. No pytest here, so other programs (the client libraries'
conformance harness, clients/conformance/harness.py) use these classes too.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCALE = float(os.environ.get("WSCHAT_TEST_TIMEOUT_SCALE", "1"))
START_TIMEOUT = 30.0 * SCALE


ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 5.0 * SCALE


class ServiceMissing(RuntimeError):
    """A service's binaries are not installed; the message says what to install."""


def free_port() -> int:
    return free_ports(1)[0]


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Servers get ports below the kernel's ephemeral range: a port picked there (what
# bind(0) hands out) can be taken, before the server binds it, as the source port of
# any outgoing connection the tests make meanwhile.
PORT_RANGE = (max(1024, _ephemeral_start() - 12000), _ephemeral_start())
_pick = random.Random(os.getpid() ^ time.time_ns())


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports below the ephemeral range, each found free by binding
    it; all stay bound until the last is found (so none is handed out twice)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(1000):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", _pick.randrange(*PORT_RANGE)))
            except OSError:
                s.close()
                continue
            sockets.append(s)
            if len(sockets) == count:
                return [s.getsockname()[1] for s in sockets]
        raise RuntimeError(f"no {count} free ports in {PORT_RANGE}")
    finally:
        for s in sockets:
            s.close()


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class PrivateRedis:
    """A throwaway ``redis-server`` on a free port, without persistence.

    ``stop()`` and ``start()`` may be called again and again (a Redis restart:
    the same port, the data gone); ``remove()`` ends it for good.
    """

    def __init__(self, extra_args: tuple[str, ...] = ()) -> None:
        """``extra_args``: more redis-server options (a TLS port, say)."""
        binary = shutil.which("redis-server") or shutil.which("/usr/bin/redis-server")
        if binary is None:
            raise ServiceMissing("redis-server is not installed "
                                 "(Debian: apt-get install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="wschat-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_args = extra_args

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--databases", "32",
             *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers_ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start "
                                   f"(exit {self.proc.poll()})")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(START_TIMEOUT)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _postgres_bin_dir() -> Path:
    on_path = shutil.which("pg_ctl")
    candidates = ([Path(on_path).resolve().parent] if on_path else []) + [
        Path(p).parent for p in sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                                       key=lambda p: int(Path(p).parts[-3]))[::-1]]
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "postgres").exists():
            return directory
    raise ServiceMissing("PostgreSQL's server binaries (initdb, pg_ctl) are not installed "
                         "(Debian: apt-get install postgresql)")


class PrivatePostgres:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl), trust auth, on a free port.

    Its Unix socket lives in the cluster's own directory, so it never meets a
    machine-wide server. As root, the cluster is owned by the ``postgres`` user
    (``initdb`` refuses to run as root) or, failing that, ``nobody``.
    """

    def __init__(self) -> None:
        self.bin = _postgres_bin_dir()
        self.dir = Path(tempfile.mkdtemp(prefix="wschat-pg-"))
        self.port = free_port()
        self._as_owner: list[str] = []
        if os.geteuid() == 0:
            owner = "postgres"
            try:
                pwd.getpwnam(owner)
            except KeyError:
                owner = "nobody"
            shutil.chown(self.dir, owner)
            self._as_owner = ["runuser", "-u", owner, "--"]
        self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8", "--locale", "C")

    def url_for(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self._as_owner, str(self.bin / tool), *args],
                              capture_output=True, timeout=60 * SCALE)
        if done.returncode:
            raise RuntimeError(f"{tool} failed ({done.returncode}): "
                               f"{(done.stderr or done.stdout).decode(errors='replace')}")

    def start(self) -> PrivatePostgres:
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w",
                  "-t", str(int(START_TIMEOUT)), "-o", options, "start")
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop()
        except RuntimeError:
            pass  # already stopped
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_until(predicate: Any, timeout: float = TIMEOUT, interval: float = 0.02,
               message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {message}")
        time.sleep(interval)


def http_get(url: str, timeout: float = TIMEOUT, headers: dict[str, str] | None = None
             ) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


class Server:
    """A real ``gunicorn -c gunicorn.conf.py wschat:app`` on free ports."""

    def __init__(self, env: dict[str, str] | None = None, workers: int = 1,
                 config: Path = ROOT / "gunicorn.conf.py") -> None:
        self.config = config
        # Two distinct ports: PORT == METRICS_PORT is a configuration error the server refuses.
        self.port, self.metrics_port = free_ports(2)
        self.env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "METRICS_PORT": str(self.metrics_port),
            "WEB_CONCURRENCY": str(workers),
            "GRACEFUL_TIMEOUT": "10",
            **(env or {}),
        }
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.log = tempfile.NamedTemporaryFile(prefix="wschat-server-", suffix=".log",
                                               delete=False)
        # Kept while the run lasts (a failing test quotes it), removed when it ends.
        atexit.register(Path(self.log.name).unlink, missing_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self._terminated = False  # SIGTERM sent by terminate(), not yet waited for

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def http(self, path: str, metrics: bool = False) -> tuple[int, bytes]:
        port = self.metrics_port if metrics else self.port
        return http_get(f"http://127.0.0.1:{port}{path}")

    def start(self, wait: bool = True) -> Server:
        self._terminated = False
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(self.config), "wschat:app"],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 20 * SCALE) -> None:
        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n"
                                     f"{self.output()}")
            try:
                return (self.http("/health")[0] == 200
                        and self.http("/health", metrics=True)[0] == 200)
            except OSError:
                return False

        wait_until(up, timeout, 0.05, "the server's /health")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                             text=True).stdout
        return [int(p) for p in out.split()]

    def terminate(self) -> None:
        """SIGTERM without waiting: the next :meth:`stop` waits for it (see
        :func:`stopped_together`)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20 * SCALE) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        if not (sig == signal.SIGTERM and self._terminated):
            self.proc.send_signal(sig)
        self._terminated = False
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
            raise AssertionError(f"server did not stop within {timeout}s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for pid in self.worker_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
            self.proc.wait(TIMEOUT)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        try:
            self.stop()
        finally:
            self.kill()
            self.log.close()


@contextlib.contextmanager
def stopped_together(*servers: Server) -> Iterator[None]:
    """On leaving the block, SIGTERM to each of ``servers`` at once; their own ``with``
    (:meth:`Server.stop`) then waits for each. A server's stop takes a few tenths of a
    second (its drain, the master reaping its workers): stopped together, they overlap."""
    try:
        yield
    finally:
        for server in servers:
            server.terminate()
