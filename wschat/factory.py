"""The application factory: settings -> stores -> chat core -> transport -> Flask routes.

One Flask app serves both listeners gunicorn binds: ``PORT`` (``/ws``,
``/health``, ``/ready``, ``/``) and ``METRICS_PORT`` (``/metrics``,
``/metrics/json``, ``/health``, ``/ready``); a request is routed by the port
it arrived on.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from flask import Flask, Response, g, jsonify, request
from flask_sock import Sock

from . import __version__
from .auth import Authenticator, AuthError, Identity
from .chat import Chat
from .config import Settings
from .logs import configure_logging
from .protocol import valid_username
from .ratelimit import MemoryRateLimiter, RateLimiter
from .stores import create_stores
from .transport import ConnectionBudget, NoReaderThread, Transport, remote_address

log = logging.getLogger("wschat.app")
_current: Runtime | None = None  # this worker's runtime (one app per gunicorn worker)

WS_PATH = "/ws"
MAIN_ONLY = {WS_PATH, "/"}
METRICS_ONLY = {"/metrics", "/metrics/json"}


@dataclass
class Runtime:
    """Everything one worker runs, reachable from gunicorn hooks and tests."""

    settings: Settings
    chat: Chat
    transport: Transport
    authenticator: Authenticator
    metrics: Any
    prometheus: Any
    started_at: float


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
    limiter: RateLimiter = stores.rate_limiter or MemoryRateLimiter(
        settings.rate_limit, settings.rate_limit_burst)
    authenticator = Authenticator(settings)
    chat = Chat(settings, stores, authenticator, limiter, metrics)
    transport = Transport(chat, metrics, ConnectionBudget(settings.max_connections))

    app = Flask(__name__)
    app.config["SOCK_SERVER_OPTIONS"] = {"thread_class": NoReaderThread}
    sock = Sock(app)
    prometheus = _init_prometheus(app)
    runtime = Runtime(settings, chat, transport, authenticator, metrics, prometheus, time.time())
    app.extensions["wschat"] = runtime
    global _current
    _current = runtime
    metrics_port = str(settings.metrics_port)

    def on_metrics_port() -> bool:
        return request.environ.get("SERVER_PORT") == metrics_port

    @app.before_request
    def route_by_port() -> Any:
        path = request.path
        if on_metrics_port():
            if path in MAIN_ONLY:
                return _plain(404, "not found on the metrics port")
        elif path in METRICS_ONLY and request.environ.get("SERVER_PORT"):
            return _plain(404, "metrics are served on METRICS_PORT")
        if path == WS_PATH:
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
        origin = environ.get("HTTP_ORIGIN")
        if settings.allowed_origins and origin not in settings.allowed_origins:
            metrics.handshake_refused("origin")
            return _plain(403, "origin not allowed")
        token = request.args.get("token") or _bearer(environ.get("HTTP_AUTHORIZATION"))
        if token:
            try:
                identity = authenticator.verify(token)
            except AuthError as err:
                metrics.auth_failed(err.code.value)
                metrics.handshake_refused("auth")
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
        if not transport.budget.try_acquire():
            metrics.handshake_refused("max_connections")
            return _plain(503, "server is at MAX_CONNECTIONS", {"Retry-After": "5"})
        # Never negotiate permessage-deflate: it costs ~100 KiB of zlib state per
        # connection and would make shared, encode-once frames impossible.
        environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
        g.wschat_admission = (identity, authenticated)
        return None

    @sock.route(WS_PATH)
    def websocket(ws: Any) -> None:
        identity, authenticated = g.pop("wschat_admission")
        transport.serve(ws, identity, authenticated, remote_address(request.environ))

    @app.teardown_request
    def release_unserved(exc: BaseException | None) -> None:
        # Admitted, but the handshake failed before serve() took the slot over.
        if g.pop("wschat_admission", None) is not None:
            transport.budget.release()

    @app.get("/health")
    def health() -> Response:
        return jsonify(status="ok")

    @app.get("/ready")
    def ready() -> Response:
        problems = []
        if transport.shutting_down:
            problems.append("shutting down")
        if not stores.healthy():
            problems.append(f"{stores.name} unreachable")
        if problems:
            resp = jsonify(status="unavailable", problems=problems)
            resp.status_code = 503
            return resp
        return jsonify(status="ready", backend=stores.name)

    @app.get("/")
    def index() -> Response:
        page = resources.files("wschat").joinpath("web/index.html").read_bytes()
        return Response(page, mimetype="text/html")

    @app.get("/metrics")
    def metrics_text() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        _refresh_gauges(runtime)
        return Response(generate_latest(prometheus.registry), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/metrics/json")
    def metrics_json() -> Response:
        rooms, memberships = _refresh_gauges(runtime)
        return jsonify(connections=_server_connections(runtime), rooms=rooms,
                       total_memberships=memberships, timestamp=int(time.time()),
                       uptime_seconds=round(time.time() - runtime.started_at, 1),
                       backend=stores.name, version=__version__,
                       worker_connections=len(transport.connections),
                       workers=settings.web_concurrency)

    log.info("wschat %s ready: backend=%s", __version__, stores.name)
    return app


def _server_connections(runtime: Runtime) -> int:
    return runtime.transport.budget.in_use


def _refresh_gauges(runtime: Runtime) -> tuple[int, int]:
    from .metrics import refresh_scrape_gauges

    rooms, memberships = runtime.chat.stores.rooms.totals()
    refresh_scrape_gauges(rooms, memberships,
                          sum(c.outbound_bytes for c in runtime.transport.connections))
    return rooms, memberships


def _init_prometheus(app: Flask) -> Any:
    """prometheus-flask-exporter for HTTP request series; /ws is excluded on purpose
    (a WebSocket would be recorded as one hour-long request)."""
    from prometheus_flask_exporter import PrometheusMetrics

    from .metrics import MULTIPROCESS

    options: dict[str, Any] = {"excluded_paths": ["^/ws$", "^/metrics"],
                               "group_by": "endpoint", "defaults_prefix": "wschat"}
    if MULTIPROCESS:
        # Registry over every worker's sample files; we serve it on our own /metrics.
        from prometheus_flask_exporter.multiprocess import GunicornPrometheusMetrics

        return GunicornPrometheusMetrics(app, **options)
    return PrometheusMetrics(app, path=None, **options)


def _plain(status: int, text: str, headers: dict[str, str] | None = None) -> Response:
    return Response(text + "\n", status=status, mimetype="text/plain", headers=headers)


def attach_worker(worker: Any, slots: Any, slot: int) -> None:
    """Called by gunicorn's ``post_worker_init``: share the connection budget, and
    close every WebSocket with 1001 as soon as the worker is told to stop."""
    import gevent

    runtime = _current
    if runtime is None:  # the app is built lazily on first access by gunicorn
        import wschat

        runtime = wschat.app.extensions["wschat"]
    runtime.transport.budget.attach(slots, slot)
    runtime.transport.start()

    def watch_for_shutdown() -> None:
        while worker.alive:
            gevent.sleep(0.1)
        log.info("worker %s stopping: closing %d connections", worker.pid,
                 len(runtime.transport.connections))
        runtime.transport.shutdown(timeout=max(1.0, runtime.settings.graceful_timeout - 3))
        runtime.chat.stores.close()

    gevent.spawn(watch_for_shutdown)
