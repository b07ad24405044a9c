"""The conformance harness: real wschat servers and a real Redis, driven over HTTP.

Every client library (JS/TS, Python, Rust) runs the same scenarios against the
real server from its own test runner. This program is what those runners start:
it prints one JSON line, ``{"control": URL, "secret": JWT_SECRET}``, then serves
a small JSON API on 127.0.0.1 to start, stop and kill servers and Redis, and to
sign tokens. It exits when its stdin reaches EOF (so it dies with the runner
that holds the other end of the pipe) or on ``POST /shutdown``, and stops
everything it started. The API and the scenarios are in README.md beside it.

Run it with the Python that has ``wschat[test,redis]`` installed:
``python clients/conformance/harness.py``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import jwt  # noqa: E402 (after the path to tests/services.py)

from services import TIMEOUT, PrivateRedis, Server, wait_until  # noqa: E402
from tls_front import CertificateAuthority, TlsFront, make_ca

DEFAULT_ENV = {"RATE_LIMIT": "1000", "RATE_LIMIT_BURST": "1000", "PRESENCE_TTL": "3",
               "TYPING_TIMEOUT": "1", "GRACEFUL_TIMEOUT": "10"}


class HarnessError(Exception):
    """A request the harness cannot serve; answered with ``status`` and the message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Harness:
    """The servers and the one Redis this harness owns."""

    def __init__(self) -> None:
        self.secret = secrets.token_hex(24)
        self.redis: PrivateRedis | None = None
        self.servers: dict[str, Server] = {}
        self.lock = threading.Lock()
        self.ca: CertificateAuthority | None = None
        self.unknown_ca: CertificateAuthority | None = None  # signs what no client trusts
        self.fronts: dict[str, TlsFront] = {}

    def redis_url(self) -> str:
        if self.redis is None:
            self.redis = PrivateRedis().start()
        return self.redis.url

    def create_server(self, body: dict[str, Any]) -> dict[str, Any]:
        backend = body.get("backend", "memory")
        if backend not in ("memory", "redis"):
            raise HarnessError(400, f"backend must be memory or redis, not {backend!r}")
        env = {**DEFAULT_ENV, "JWT_SECRET": self.secret, **body.get("env", {})}
        if backend == "redis":
            env.setdefault("REDIS_URL", self.redis_url())
        server = Server(env, workers=int(body.get("workers", 1)))
        if backend == "memory":
            server.env.pop("REDIS_URL", None)  # not even one inherited from our environment
        server.start()
        with self.lock:
            server_id = f"s{len(self.servers) + 1}"
            self.servers[server_id] = server
        return self.describe(server_id)

    def describe(self, server_id: str) -> dict[str, Any]:
        server = self.server(server_id)
        return {"id": server_id, "url": server.url, "http": f"http://127.0.0.1:{server.port}",
                "metrics": f"http://127.0.0.1:{server.metrics_port}"}

    def server(self, server_id: str) -> Server:
        try:
            return self.servers[server_id]
        except KeyError:
            raise HarnessError(404, f"no server {server_id!r}") from None

    def stop_server(self, server_id: str, body: dict[str, Any]) -> dict[str, Any]:
        server = self.server(server_id)
        if body.get("signal", "TERM") == "KILL":
            server.kill()
            return {"exit_code": server.proc.returncode if server.proc else None}
        return {"exit_code": server.stop(signal.SIGTERM)}

    def start_server(self, server_id: str) -> dict[str, Any]:
        server = self.server(server_id)
        if server.proc is not None and server.proc.poll() is None:
            raise HarnessError(409, f"server {server_id} is running")
        server.start()
        return self.describe(server_id)

    def kill_worker(self, server_id: str) -> dict[str, Any]:
        server = self.server(server_id)
        before = server.worker_pids()
        if not before:
            raise HarnessError(409, f"server {server_id} has no worker")
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: (len(now := server.worker_pids()) == len(before)
                            and victim not in now), 4 * TIMEOUT, message="a replacement worker")
        server.wait_healthy()
        return {"pid": victim}

    def tls_front(self, server_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """A TLS front (``tls_front.TlsFront``) for the server, its certificate for
        ``hostname`` (default ``localhost``) signed by this harness's CA."""
        server = self.server(server_id)
        hostname = body.get("hostname", "localhost")
        if not isinstance(hostname, str) or not hostname:
            raise HarnessError(400, "hostname must be a non-empty string")
        with self.lock:
            if self.ca is None:
                self.ca = make_ca()
            front_id = f"t{len(self.fronts) + 1}"
            cert, key = self.ca.issue(hostname, f"{server_id}-{front_id}")
            front = TlsFront(cert, key, server.port)
            self.fronts[front_id] = front
        return {"url": f"wss://localhost:{front.port}/ws", "ca": str(self.ca.path),
                "hostname": hostname, "front": front_id}

    def front_certificate(self, front_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """A new certificate for a running front, from its next handshake on: for
        ``hostname`` (default ``localhost``), signed by the harness's CA (``issuer`` ``ca``,
        the default) or by one no client is given (``unknown``); ``drop``: cut the front's
        open connections too."""
        hostname, issuer = body.get("hostname", "localhost"), body.get("issuer", "ca")
        if not isinstance(hostname, str) or not hostname:
            raise HarnessError(400, "hostname must be a non-empty string")
        if issuer not in ("ca", "unknown"):
            raise HarnessError(400, f"issuer must be ca or unknown, not {issuer!r}")
        with self.lock:
            front = self.fronts.get(front_id)
            if front is None or self.ca is None:
                raise HarnessError(404, f"no TLS front {front_id!r}")
            if issuer == "unknown" and self.unknown_ca is None:
                self.unknown_ca = make_ca()
            ca = self.ca if issuer == "ca" else self.unknown_ca
            assert ca is not None
            cert, key = ca.issue(hostname, f"{front_id}-{secrets.token_hex(4)}")
        front.set_certificate(cert, key, drop=bool(body.get("drop", False)))
        return {"front": front_id, "hostname": hostname, "issuer": issuer}

    def token(self, body: dict[str, Any]) -> dict[str, Any]:
        sub = body.get("sub")
        if not isinstance(sub, str) or not sub:
            raise HarnessError(400, "sub (a non-empty string) is required")
        claims: dict[str, Any] = {"sub": sub, "name": body.get("name", sub),
                                  "exp": int(time.time() + float(body.get("ttl", 3600)))}
        for claim in ("rooms", "mod_rooms"):  # room-name patterns, as wschat.access reads them
            if claim in body:
                patterns = body[claim]
                if not (isinstance(patterns, list)
                        and all(isinstance(p, str) for p in patterns)):
                    raise HarnessError(400, f"{claim} must be a list of strings")
                claims[claim] = patterns
        return {"token": jwt.encode(claims, self.secret, algorithm="HS256")}

    def redis_stop(self) -> dict[str, Any]:
        if self.redis is not None:
            self.redis.stop()
        return {}

    def redis_start(self) -> dict[str, Any]:
        if self.redis is None:
            self.redis_url()
        elif self.redis.proc is None or self.redis.proc.poll() is not None:
            self.redis.start()
        return {}

    def close(self) -> None:
        for front in self.fronts.values():
            front.close()
        for ca in (self.ca, self.unknown_ca):
            if ca is not None:
                shutil.rmtree(ca.folder, ignore_errors=True)
        for server in self.servers.values():
            try:
                server.stop()
            except AssertionError:
                pass
            finally:
                server.kill()
                server.log.close()
        if self.redis is not None:
            self.redis.remove()

    def route(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        parts = [p for p in path.split("/") if p]
        if method != "POST":
            raise HarnessError(405, "every call is a POST")
        match parts:
            case ["servers"]:
                return self.create_server(body)
            case ["servers", server_id, "stop"]:
                return self.stop_server(server_id, body)
            case ["servers", server_id, "start"]:
                return self.start_server(server_id)
            case ["servers", server_id, "kill-worker"]:
                return self.kill_worker(server_id)
            case ["servers", server_id, "tls"]:
                return self.tls_front(server_id, body)
            case ["fronts", front_id, "certificate"]:
                return self.front_certificate(front_id, body)
            case ["redis"]:
                return {"url": self.redis_url()}
            case ["redis", "stop"]:
                return self.redis_stop()
            case ["redis", "start"]:
                return self.redis_start()
            case ["token"]:
                return self.token(body)
        raise HarnessError(404, f"no such call: {method} {path}")


def serve(harness: Harness) -> ThreadingHTTPServer:
    done = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise HarnessError(400, "the body must be a JSON object")
                if self.path.rstrip("/") == "/shutdown":
                    reply: dict[str, Any] = {}
                    done.set()
                else:
                    reply = harness.route(self.command, self.path, body)
                status = 200
            except HarnessError as exc:
                status, reply = exc.status, {"error": str(exc)}
            except (ValueError, AssertionError, RuntimeError, OSError) as exc:
                status, reply = 500, {"error": f"{type(exc).__name__}: {exc}"}
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST  # noqa: N815 (answered with 405 by route)

        def log_message(self, format: str, *args: Any) -> None:
            sys.stderr.write(f"harness: {format % args}\n")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    def stdin_closed() -> None:
        # os.read, not sys.stdin's buffered reader: a thread blocked in the reader holds its
        # lock, and an exit by /shutdown or SIGTERM with stdin open then aborted (SIGABRT,
        # "Fatal Python error: _enter_buffered_busy") instead of exiting with status 0.
        while os.read(sys.stdin.fileno(), 65536):
            pass
        done.set()

    threading.Thread(target=stdin_closed, daemon=True).start()
    httpd.done = done  # type: ignore[attr-defined]
    return httpd


def main() -> None:
    harness = Harness()
    httpd = serve(harness)
    print(json.dumps({"control": f"http://127.0.0.1:{httpd.server_address[1]}",
                      "secret": harness.secret}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: httpd.done.set())  # type: ignore[attr-defined]
    try:
        httpd.done.wait()  # type: ignore[attr-defined]
    except KeyboardInterrupt:
        pass
    finally:
        httpd.shutdown()
        harness.close()


if __name__ == "__main__":
    main()
