"""The application factory: settings -> stores -> chat core -> transport -> Flask routes.

One Flask app serves both listeners gunicorn binds: ``PORT`` (``/ws``,
``/health``, ``/ready``, ``/``) and ``METRICS_PORT`` (``/metrics``,
``/metrics/json``, ``/api/``, ``/health``, ``/ready``); a request is routed by
the port it arrived on (:mod:`wschat.routes`).

Building the app (:func:`create_app`) wires every part and registers the routes
but opens no connection and starts no greenlet: gunicorn's ``post_worker_init``
hook calls :func:`attach_worker`, which starts it (:meth:`Runtime.start`), and
``worker_exit`` calls :func:`finish_worker`. The worker's state lives only in
``app.extensions["wschat"]`` (:class:`~wschat.runtime.Runtime`).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import glob
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import gevent
from flask import Flask
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_flask_exporter import PrometheusMetrics

from . import routes
from .admission import Admission, ConnectionBudget
from .api import is_api_path, not_implemented, register_api
from .auth import Authenticator
from .chat import Chat
from .config import Settings, exit_on_config_error
from .connection import NoReaderThread
from .fold_lock import FOLD_LOCK, flock_within
from .logs import configure_logging
from .metrics import MULTIPROCESS, PrometheusChatMetrics, worker_restarted
from .ratelimit import MemoryRateLimiter, RateLimiter
from .runtime import Runtime, of
from .stores import create_stores
from .transport import Transport
from .worker import Worker

log = logging.getLogger("wschat.app")


def create_app(settings: Settings | None = None) -> Flask:
    """Build this worker's Flask app; call :meth:`Runtime.start` (``runtime.of(app).start()``)
    before it serves WebSockets. Without ``settings``, they are read from the environment.

    Raises:
        ConfigError: a setting cannot be used (a bad JWT key, a bad ``DATABASE_URL``).
    """
    settings = settings or Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)

    metrics = PrometheusChatMetrics()
    stores = create_stores(settings, metrics)
    limiter: RateLimiter = stores.rate_limiter or MemoryRateLimiter(
        settings.rate_limit, settings.rate_limit_burst)
    authenticator = Authenticator(settings)
    chat = Chat(settings, stores, authenticator, limiter, metrics, start=False)
    transport = Transport(chat, metrics, ConnectionBudget(settings.max_connections))
    admission = Admission(settings, authenticator, chat, transport, metrics)
    echo = os.environ.get("WSCHAT_ECHO_ENDPOINT", "").strip() == "1"

    app = Flask(__name__, static_folder=None)
    app.wsgi_app = _known_methods_only(app.wsgi_app)  # type: ignore[method-assign]
    app.config["SOCK_SERVER_OPTIONS"] = {"thread_class": NoReaderThread}
    prometheus = _init_prometheus(app)
    app.extensions["wschat"] = Runtime(settings, stores, chat, transport, admission, metrics,
                                       prometheus, echo=echo)
    app.before_request(routes.route_by_port)  # first: before admission and the API's guard
    for blueprint in (routes.probes, routes.monitoring, routes.websocket, routes.page):
        app.register_blueprint(blueprint)
    if echo:
        log.warning("WSCHAT_ECHO_ENDPOINT=1: %s echoes messages; for conformance tests only",
                    routes.ECHO_PATH)
        app.register_blueprint(routes.echo)
    register_api(app, chat, settings.metrics_port, time.time)
    return app


def _init_prometheus(app: Flask) -> Any:
    """Attach prometheus-flask-exporter (HTTP request series); return the registry
    scrapes read. WebSocket routes are excluded from the HTTP series: each
    connection would be recorded as one hour-long "request"."""
    # /echo: the test-only echo WebSocket (WSCHAT_ECHO_ENDPOINT).
    options: dict[str, Any] = {
        "excluded_paths": [f"^{routes.WS_PATH}$", f"^{routes.ECHO_PATH}$", "^/metrics"],
        "group_by": routes.endpoint, "defaults_prefix": "wschat"}
    if not MULTIPROCESS:  # outside gunicorn: one process, the default registry
        PrometheusMetrics(app, path=None, **options)
        return REGISTRY
    # Every metric object writes to this worker's sample files, and scrapes read all
    # workers' files through a MultiProcessCollector. That registry must hold nothing
    # else: a metric registered there too would be exposed twice (the exporter's
    # multiprocess classes do register theirs there), so the exporter gets its own.
    PrometheusMetrics(app, path=None, registry=CollectorRegistry(), **options)
    scrape_registry = CollectorRegistry()
    SampleFilesCollector(scrape_registry)
    return scrape_registry


FOLD_LOCK_WAIT = 2.0  # seconds a scrape waits for a fold before it reads anyway


class SampleFilesCollector(MultiProcessCollector):
    """All workers' sample files, listed again if one vanished while being read: when the
    master reaps a worker it deletes that worker's gauge files and, once folded into
    ``<type>_dead.db``, its counter and histogram files (gunicorn.conf.py). A scrape that
    listed them just before would otherwise fail with FileNotFoundError (500).

    The files are read under ``FOLD_LOCK`` (shared), which the master holds while it
    swaps a dead worker's counts into ``<type>_dead.db`` and deletes its file: read
    between the two, that worker's counts were in the totals twice."""

    def collect(self) -> Any:
        with _shared_fold_lock(self._path):
            for attempt in range(3):
                files = glob.glob(os.path.join(self._path, "*.db"))
                try:
                    return self.merge(files, accumulate=True)
                except FileNotFoundError:
                    if attempt == 2:
                        raise
        return None  # not reached


@contextlib.contextmanager
def _shared_fold_lock(directory: str) -> Iterator[None]:
    """The master's fold lock, shared; waited for cooperatively (the master holds it for
    a rename and an unlink), at most FOLD_LOCK_WAIT s: a scrape is never refused for it."""
    try:
        fd = os.open(os.path.join(directory, FOLD_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:  # a read-only directory: read without it
        yield
        return
    try:
        flock_within(fd, fcntl.LOCK_SH, FOLD_LOCK_WAIT, gevent.sleep)
        yield
    finally:
        os.close(fd)


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH",
                          "TRACE", "CONNECT"})


def _known_methods_only(wsgi_app: Any) -> Any:
    """Answer 501 to methods HTTP does not define, before Flask sees them: the
    exporter labels every request with its method, and a client inventing
    methods would otherwise add series to ``/metrics`` without end. Under ``/api``
    the answer is the API's JSON error (``not_implemented``), elsewhere plain text."""

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD") not in HTTP_METHODS:
            if is_api_path(environ.get("PATH_INFO", "")):
                return not_implemented()(environ, start_response)
            body = b"method not implemented\n"
            start_response("501 Not Implemented", [("Content-Type", "text/plain"),
                                                   ("Content-Length", str(len(body)))])
            return [body]
        return wsgi_app(environ, start_response)

    return app


# -- gunicorn's worker hooks (gunicorn.conf.py) ----------------------------------------

def attach_worker(app: Flask, worker: Any, slots: Any, slot: int,
                  replacement: bool = False) -> None:
    """Called by gunicorn's ``post_worker_init`` with the app it loaded: share the
    connection budget, start the app, and close every WebSocket with 1001 as soon as
    the worker is told to stop.

    ``replacement``: this worker took the slot of one that exited (counted in
    ``wschat_worker_restarts_total``). A configuration error found while starting
    (an SQLite file that cannot be opened) stops the server with one line."""
    runtime = of(app)
    runtime.transport.budget.attach(slots, slot)
    # wschat.worker.Worker counts the sockets it closes while they wait for a request.
    worker.wschat_waiting_closed = runtime.metrics.waiting_closed
    if not isinstance(worker, Worker):
        # `-k gevent` (or GUNICORN_CMD_ARGS, an old Dockerfile's command) overrides
        # gunicorn.conf.py's worker_class: it runs, but a few addresses dripping their
        # upgrade requests can then fill the pool, and nobody would know why.
        log.warning("gunicorn worker class %s.%s is not wschat.worker.Worker (a -k or "
                    "--worker-class option overrides gunicorn.conf.py): sockets waiting for "
                    "their request are not bounded (MAX_HANDSHAKES_PER_IP); drop the option",
                    type(worker).__module__, type(worker).__qualname__)
    worker.tmp = _HeartbeatKeptOpen(worker.tmp)
    if replacement:
        worker_restarted()
    with exit_on_config_error():
        runtime.start()

    def watch_for_shutdown() -> None:
        while worker.alive:
            gevent.sleep(WATCH_SECONDS)
        # gunicorn's SIGTERM handler cleared worker.alive at most one look ago: the
        # master's graceful timeout runs from then (finish_worker's limit too).
        runtime.stopping_since = time.monotonic() - WATCH_SECONDS
        log.info("worker %s stopping: closing %d connections", worker.pid,
                 len(runtime.transport.connections))
        runtime.stop(timeout=max(1.0, runtime.settings.graceful_timeout - 3))

    runtime.shutdown = gevent.spawn(watch_for_shutdown)


def freeze_startup_heap(worker: Any) -> None:
    """Called by gunicorn's ``post_worker_init`` after :func:`attach_worker`: what the
    worker was built from (modules, the app, its stores and metrics: ~56,000 objects)
    lives as long as the worker, so it is collected once and frozen (``gc.freeze``).
    Full collections then scan only what came later: while 10,000 connections open,
    their pauses went from 19-60 ms to 4-36 ms (loadtest/RESULTS.md)."""
    gc.collect()
    gc.freeze()
    log.info("worker %s: %d objects from start-up frozen out of garbage collection",
             worker.pid, gc.get_freeze_count())


def finish_worker(app: Any, worker: Any) -> None:
    """Called by gunicorn's ``worker_exit`` with the app it loaded (if it got that far):
    WebSockets run outside gunicorn's request pool, so the worker must not exit
    before their close handshakes are done. It beats gunicorn's heartbeat meanwhile
    (:class:`_HeartbeatKeptOpen`).

    The wait ends ``EXIT_SECONDS`` before ``GRACEFUL_TIMEOUT`` counted from the moment
    the worker was told to stop (SIGTERM), not from this call: the worker's loop
    notices the signal later (:meth:`wschat.worker.Worker._serve`: within
    ``LOOK_SECONDS``) and only then calls ``worker_exit``,
    while the master's SIGKILL is due ``graceful_timeout`` after its SIGTERM. A drain
    that hangs (a store that does not answer) thus ends with the worker exiting by
    itself, its clients' sockets closed, rather than with the master's SIGKILL."""
    runtime = getattr(app, "extensions", {}).get("wschat")
    if runtime is None or runtime.shutdown is None:
        return
    worker.alive = False
    since = runtime.stopping_since if runtime.stopping_since is not None else time.monotonic()
    left = since + runtime.settings.graceful_timeout - EXIT_SECONDS - time.monotonic()
    heartbeat = gevent.spawn(_beat, worker.tmp)
    try:
        runtime.shutdown.join(timeout=max(0.0, left))
        if not runtime.shutdown.ready():
            log.warning("worker %s: shutdown not done %.1f s after the signal (GRACEFUL_TIMEOUT "
                        "%g s); exiting with %d connections open", worker.pid,
                        time.monotonic() - since, runtime.settings.graceful_timeout,
                        len(runtime.transport.connections))
    finally:
        heartbeat.kill(block=False)


HEARTBEAT_SECONDS = 1.0  # as often as gunicorn's gevent worker beats in its own loop
WATCH_SECONDS = 0.1  # how often the shutdown watcher looks at worker.alive
EXIT_SECONDS = 0.5  # of GRACEFUL_TIMEOUT, left for the worker process to exit


class _HeartbeatKeptOpen:
    """gunicorn's heartbeat file (``worker.tmp``), left open when gunicorn closes it.

    The master aborts a worker whose heartbeat is older than gunicorn's ``timeout``
    (SIGABRT, "WORKER TIMEOUT"). gunicorn's worker beats only in its own loop, and
    closes the file before ``worker_exit``, where this worker still closes its
    WebSockets and stores: a drain longer than ``timeout`` (a hung store) would be
    aborted whenever the master's loop runs meanwhile (SIGTTOU, a reload's old workers
    once it stops waiting for them). :func:`finish_worker` beats on until the drain is
    done; a hub blocked for ``timeout`` still misses its beats. The file closes when
    the process exits.
    """

    def __init__(self, tmp: Any) -> None:
        self._tmp = tmp

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tmp, name)

    def close(self) -> None:
        pass


def _beat(tmp: Any) -> None:
    while True:
        tmp.notify()
        gevent.sleep(HEARTBEAT_SECONDS)
