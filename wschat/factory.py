"""The application factory: settings -> stores -> chat core -> transport -> Flask routes.

One Flask app serves both listeners gunicorn binds: ``PORT`` (``/ws``,
``/health``, ``/ready``, ``/``) and ``METRICS_PORT`` (``/metrics``,
``/metrics/json``, ``/health``, ``/ready``); a request is routed by the port
it arrived on.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from flask import Flask, Response, g, jsonify, request
from flask_sock import Sock

from .version import __version__
from .admission import ConnectionBudget, remote_address
from .auth import Authenticator, AuthError, Identity
from .chat import Chat
from .config import Settings
from .connection import NoReaderThread, feed_pipelined
from .logs import configure_logging
from .protocol import valid_username
from .ratelimit import MemoryRateLimiter, RateLimiter
from .stores import create_stores
from .telemetry import Metrics
from .transport import Transport

log = logging.getLogger("wschat.app")
_current: Runtime | None = None  # this worker's runtime (one app per gunicorn worker)

WS_PATH = "/ws"
# Test-only: with WSCHAT_ECHO_ENDPOINT=1, /echo echoes every message through the
# same admission and frame handling as /ws (for the Autobahn conformance run).
ECHO_PATH = "/echo"
MAIN_ONLY = {WS_PATH, ECHO_PATH, "/"}
# The browser page's files (wschat/web: the page's script and styles, the JS client
# library's bundle), served on PORT only.
WEB_PREFIX = "/web/"
METRICS_ONLY = {"/metrics", "/metrics/json"}
GAUGE_SAMPLE_SECONDS = 1.0


@dataclass
class Runtime:
    """Everything one worker runs, reachable from gunicorn hooks and tests."""

    settings: Settings
    chat: Chat
    transport: Transport
    authenticator: Authenticator
    metrics: Metrics
    prometheus: Any  # the registry /metrics and /metrics/json read (all workers)
    shutdown: Any = None  # the greenlet closing every connection when the worker stops


def _guest_identity(username: str | None) -> Identity:
    user_id = f"guest-{secrets.token_hex(6)}"
    return Identity(user_id, username or f"guest-{user_id[-6:]}", None)


def _bearer(value: str | None) -> str | None:
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip() or None
    return None


def create_app(settings: Settings | None = None) -> Flask:
    """Build the Flask app (one per worker)."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)

    from .metrics import PrometheusChatMetrics

    metrics = PrometheusChatMetrics()
    stores = create_stores(settings, metrics)
    metrics.started(stores.name, persistence=settings.enable_persistence)
    limiter: RateLimiter = stores.rate_limiter or MemoryRateLimiter(
        settings.rate_limit, settings.rate_limit_burst)
    authenticator = Authenticator(settings)
    chat = Chat(settings, stores, authenticator, limiter, metrics)
    transport = Transport(chat, metrics, ConnectionBudget(settings.max_connections))

    app = Flask(__name__, static_folder="web", static_url_path=WEB_PREFIX.rstrip("/"))
    app.wsgi_app = _known_methods_only(app.wsgi_app)  # type: ignore[method-assign]
    app.config["SOCK_SERVER_OPTIONS"] = {"thread_class": NoReaderThread}
    sock = Sock(app)
    prometheus = _init_prometheus(app)
    runtime = Runtime(settings, chat, transport, authenticator, metrics, prometheus)
    app.extensions["wschat"] = runtime
    global _current
    _current = runtime
    metrics_port = str(settings.metrics_port)
    echo_enabled = os.environ.get("WSCHAT_ECHO_ENDPOINT", "").strip() == "1"
    allowed_origins = frozenset(_normal_origin(o) for o in settings.allowed_origins)

    def on_metrics_port() -> bool:
        return request.environ.get("SERVER_PORT") == metrics_port

    @app.before_request
    def route_by_port() -> Any:
        path = request.path
        if on_metrics_port():
            if path in MAIN_ONLY or path.startswith(WEB_PREFIX):
                return _plain(404, "not found on the metrics port")
        elif path in METRICS_ONLY and request.environ.get("SERVER_PORT"):
            return _plain(404, "metrics are served on METRICS_PORT")
        if path == WS_PATH or (path == ECHO_PATH and echo_enabled):
            return _admit()
        return None

    def _admit() -> Response | None:
        """Checks before the upgrade: each refusal is an HTTP answer, never a half-open socket."""
        environ = request.environ
        if transport.shutting_down:
            metrics.handshake_refused("shutting_down")
            return _plain(503, "server is shutting down")
        if "websocket" not in environ.get("HTTP_UPGRADE", "").lower():
            metrics.handshake_refused("not_websocket")
            return _plain(426, "this endpoint speaks WebSocket only", {"Upgrade": "websocket"})
        problem = _handshake_problem(environ)
        if problem is not None:
            metrics.handshake_refused("bad_handshake")
            return problem
        addr = remote_address(environ, settings.trusted_proxies)
        if not _origin_allowed(environ.get("HTTP_ORIGIN"), allowed_origins):
            metrics.handshake_refused("origin")
            log.info("upgrade refused (403) for %s: origin %r is not in ALLOWED_ORIGINS",
                     addr, environ.get("HTTP_ORIGIN"))
            return _plain(403, "origin not allowed")
        token = request.args.get("token") or _bearer(environ.get("HTTP_AUTHORIZATION"))
        if token:
            try:
                identity = authenticator.verify(token)
            except AuthError as err:
                metrics.auth_failed(err.code.value)
                metrics.handshake_refused("auth")
                log.info("upgrade refused (401) for %s: %s (%s)", addr, err.message,
                         err.code.value)
                return _plain(401, err.message)
            authenticated = True
        else:
            username = request.args.get("username")
            if username is not None and not valid_username(username):
                metrics.handshake_refused("username")
                return _plain(400, "usernames are 1-32 characters: letters, digits, "
                                   "spaces inside, _ . -")
            identity = _guest_identity(username)
            authenticated = False
        if not stores.broker.healthy():
            # The shared store is away: a connection could not be registered (nor its
            # rooms joined); say so in HTTP rather than upgrade and cut it.
            metrics.handshake_refused("unavailable")
            return _plain(503, f"{stores.name} unreachable; retry", {"Retry-After": "2"})
        cap = settings.max_connections_per_user
        if (authenticated and cap
                and len(chat.hub.users.get(identity.user_id, ())) >= cap):
            metrics.handshake_refused("max_connections_per_user")
            return _plain(429, "too many connections for this user (MAX_CONNECTIONS_PER_USER)",
                          {"Retry-After": "5"})
        if not transport.addresses.claim(addr):
            metrics.handshake_refused("max_connections_per_ip")
            return _plain(429, "too many connections from this address "
                               "(MAX_CONNECTIONS_PER_IP)", {"Retry-After": "5"})
        if not transport.budget.try_acquire():
            transport.addresses.release(addr)
            metrics.handshake_refused("max_connections")
            return _plain(503, "server is at MAX_CONNECTIONS", {"Retry-After": "5"})
        # Never negotiate permessage-deflate: it costs ~100 KiB of zlib state per
        # connection and would make shared, encode-once frames impossible.
        environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
        g.wschat_admission = (identity, authenticated, addr)
        return None

    @sock.route(WS_PATH)
    def websocket(ws: Any) -> None:
        identity, authenticated, addr = g.pop("wschat_admission")
        feed_pipelined(ws, request.environ)
        transport.serve(ws, identity, authenticated, addr)

    if echo_enabled:
        log.warning("WSCHAT_ECHO_ENDPOINT=1: %s echoes messages; for conformance tests only",
                    ECHO_PATH)

        @sock.route(ECHO_PATH)
        def echo(ws: Any) -> None:
            identity, authenticated, addr = g.pop("wschat_admission")
            feed_pipelined(ws, request.environ)
            transport.serve(ws, identity, authenticated, addr, echo=True)

    @app.teardown_request
    def release_unserved(exc: BaseException | None) -> None:
        # Admitted, but the handshake failed before serve() took the slot over.
        admission = g.pop("wschat_admission", None)
        if admission is not None:
            transport.budget.release()
            transport.addresses.release(admission[2])

    @app.get("/health")
    def health() -> Response:
        return jsonify(status="ok")

    def unready_because() -> list[str]:
        problems = []
        if transport.shutting_down:
            problems.append("shutting down")
        problems.extend(stores.problems())
        return problems

    @app.get("/ready")
    def ready() -> Response:
        problems = unready_because()
        if problems:
            resp = jsonify(status="unavailable", problems=problems)
            resp.status_code = 503
            return resp
        return jsonify(status="ready", backend=stores.name,
                       persistence=settings.enable_persistence)

    @app.get("/")
    def index() -> Response:
        page = resources.files("wschat").joinpath("web/index.html").read_bytes()
        return Response(page, mimetype="text/html")

    @app.get("/metrics")
    def metrics_text() -> Response:
        from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

        _refresh_gauges(runtime)
        # The classic text format: every Prometheus version reads it.
        return Response(generate_latest(prometheus), content_type=CONTENT_TYPE_PLAIN_0_0_4)

    @app.get("/metrics/json")
    def metrics_json() -> Response:
        from .metrics import Snapshot, server_summary

        _refresh_gauges(runtime)
        # Read back from the same registry as /metrics: both show the same figures.
        snapshot = Snapshot(prometheus)
        body = {
            "connections": int(snapshot.value("wschat_connections_total")),
            "rooms": int(snapshot.value("wschat_rooms_total")),
            "total_memberships": int(snapshot.value("wschat_room_members_total")),
            "timestamp": int(time.time()),
            "version": __version__,
            "backend": stores.name,
            "ready": not unready_because(),
            **server_summary(snapshot),
        }
        return Response(json.dumps(body, indent=2) + "\n", mimetype="application/json")

    from .api import register_api

    register_api(app, chat, settings.metrics_port, time.time)
    log.info("wschat %s ready: backend=%s persistence=%s", __version__, stores.name,
             stores.persistence)
    return app


def _outbound_bytes(runtime: Runtime) -> int:
    return sum(c.outbound_bytes for c in list(runtime.transport.connections))


def _refresh_gauges(runtime: Runtime) -> None:
    """Before an exposition: figures read from the store, and this worker's samples."""
    from .metrics import refresh_scrape_gauges, sample_worker_gauges
    from .stores.base import Unavailable

    rooms: int | None
    memberships: int | None
    try:
        rooms, memberships = runtime.chat.stores.rooms.totals()
    except Unavailable as exc:
        log.warning("room totals unavailable for this scrape: %s", exc)
        rooms = memberships = None
    except Exception:  # a scrape must still answer: the other series matter most now
        log.exception("room totals failed")
        rooms = memberships = None
    refresh_scrape_gauges(rooms, memberships)
    sample_worker_gauges(_outbound_bytes(runtime))


def _sample_worker_gauges(runtime: Runtime) -> None:
    """Every worker refreshes its own share of the sampled gauges, scraped or not
    (a scrape is answered by one worker; the others' values must not go stale)."""
    import gevent

    from .metrics import sample_worker_gauges

    while True:
        try:
            sample_worker_gauges(_outbound_bytes(runtime))
        except Exception:
            log.exception("sampling worker gauges failed")
        gevent.sleep(GAUGE_SAMPLE_SECONDS)


def _init_prometheus(app: Flask) -> Any:
    """Attach prometheus-flask-exporter (HTTP request series); return the registry
    scrapes read. WebSocket routes are excluded from the HTTP series: each
    connection would be recorded as one hour-long "request"."""
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_flask_exporter import PrometheusMetrics

    from .metrics import MULTIPROCESS

    # /echo: the test-only echo WebSocket (WSCHAT_ECHO_ENDPOINT).
    options: dict[str, Any] = {"excluded_paths": [f"^{WS_PATH}$", "^/echo$", "^/metrics"],
                               "group_by": "endpoint", "defaults_prefix": "wschat"}
    if not MULTIPROCESS:  # outside gunicorn: one process, the default registry
        PrometheusMetrics(app, path=None, **options)
        return REGISTRY
    # Every metric object writes to this worker's sample files, and scrapes read all
    # workers' files through a MultiProcessCollector. That registry must hold nothing
    # else: a metric registered there too would be exposed twice (the exporter's
    # multiprocess classes do register theirs there), so the exporter gets its own.
    PrometheusMetrics(app, path=None, registry=CollectorRegistry(), **options)
    scrape_registry = CollectorRegistry()
    MultiProcessCollector(scrape_registry)
    return scrape_registry


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH",
                          "TRACE", "CONNECT"})


def _known_methods_only(wsgi_app: Any) -> Any:
    """Answer 501 to methods HTTP does not define, before Flask sees them: the
    exporter labels every request with its method, and a client inventing
    methods would otherwise add series to ``/metrics`` without end."""

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD") not in HTTP_METHODS:
            body = b"method not implemented\n"
            start_response("501 Not Implemented", [("Content-Type", "text/plain"),
                                                   ("Content-Length", str(len(body)))])
            return [body]
        return wsgi_app(environ, start_response)

    return app


def _normal_origin(origin: str) -> str:
    # Scheme and host are case-insensitive (RFC 6454); browsers never send a
    # trailing slash, configuration files sometimes do.
    return origin.strip().rstrip("/").lower()


def _origin_allowed(origin: str | None, allowed: frozenset[str]) -> bool:
    """Cross-site WebSocket hijacking guard.

    Browsers always send ``Origin`` on a WebSocket upgrade, so a request
    without one is not a browser being abused from another site (and a
    non-browser client could send any value anyway): it is allowed.
    """
    if not allowed or origin is None:
        return True
    return _normal_origin(origin) in allowed


def _handshake_problem(environ: dict[str, Any]) -> Response | None:
    """RFC 6455 4.2.1 checks, answered in HTTP before any upgrade."""
    if environ.get("REQUEST_METHOD") != "GET":
        return _plain(405, "a WebSocket upgrade is a GET", {"Allow": "GET"})
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
        return _plain(426, "only WebSocket version 13 is supported",
                      {"Sec-WebSocket-Version": "13", "Upgrade": "websocket"})
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid_key = False
    if not valid_key:
        return _plain(400, "Sec-WebSocket-Key must be 16 bytes in base64")
    if "upgrade" not in environ.get("HTTP_CONNECTION", "").lower():
        return _plain(400, "Connection: Upgrade is required")
    return None


def _plain(status: int, text: str, headers: dict[str, str] | None = None) -> Response:
    return Response(text + "\n", status=status, mimetype="text/plain", headers=headers)


def attach_worker(worker: Any, slots: Any, slot: int, replacement: bool = False) -> None:
    """Called by gunicorn's ``post_worker_init``: share the connection budget, and
    close every WebSocket with 1001 as soon as the worker is told to stop.

    ``replacement``: this worker took the slot of one that exited (counted in
    ``wschat_worker_restarts_total``)."""
    import gevent

    from .metrics import worker_restarted

    runtime = _current
    if runtime is None:  # the app is built lazily on first access by gunicorn
        import wschat

        runtime = wschat.app.extensions["wschat"]
    runtime.transport.budget.attach(slots, slot)
    if replacement:
        worker_restarted()
    runtime.transport.start()
    gevent.spawn(_sample_worker_gauges, runtime)

    def watch_for_shutdown() -> None:
        while worker.alive:
            gevent.sleep(0.1)
        log.info("worker %s stopping: closing %d connections", worker.pid,
                 len(runtime.transport.connections))
        runtime.transport.shutdown(timeout=max(1.0, runtime.settings.graceful_timeout - 3))
        runtime.chat.stores.close()

    runtime.shutdown = gevent.spawn(watch_for_shutdown)


def finish_worker(worker: Any) -> None:
    """Called by gunicorn's ``worker_exit``: WebSockets run outside gunicorn's request
    pool, so the worker must not exit before their close handshakes are done."""
    runtime = _current
    if runtime is None or runtime.shutdown is None:
        return
    worker.alive = False
    runtime.shutdown.join(timeout=runtime.settings.graceful_timeout)
