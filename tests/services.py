"""Private Redis and PostgreSQL servers for the tests: free ports, temporary directories.

The suite needs no service running on the machine. When ``REDIS_URL`` (or
``DATABASE_URL_TEST`` for PostgreSQL) is not given, ``conftest`` starts one
instance of each here, the first time a test asks for it, and removes it when
the session ends. Tests that stop and restart a server (a Redis restart, the
database going away) make one of their own with the same classes.

What a machine needs: the ``redis-server`` binary, and PostgreSQL's server
binaries (``initdb``, ``pg_ctl``, ``postgres``) on PATH or in Debian's
``/usr/lib/postgresql/*/bin``. On Debian: ``apt-get install redis-server
postgresql``. No pytest here, so other programs (the client libraries'
conformance harness) can use these classes too.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SCALE = float(os.environ.get("WSCHAT_TEST_TIMEOUT_SCALE", "1"))
START_TIMEOUT = 30.0 * SCALE


class ServiceMissing(RuntimeError):
    """A service's binaries are not installed; the message says what to install."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    def __init__(self) -> None:
        binary = shutil.which("redis-server") or shutil.which("/usr/bin/redis-server")
        if binary is None:
            raise ServiceMissing("redis-server is not installed "
                                 "(Debian: apt-get install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="wschat-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--databases", "32"],
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
