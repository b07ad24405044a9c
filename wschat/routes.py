"""wschat's HTTP routes, one blueprint per concern.

==============  ===========================================  ============
blueprint       routes                                       served on
==============  ===========================================  ============
``probes``      ``/health``, ``/ready``                      both ports
``monitoring``  ``/metrics``, ``/metrics/json``              METRICS_PORT
``websocket``   ``/ws``, after :mod:`wschat.admission`       PORT
``echo``        ``/echo`` (``WSCHAT_ECHO_ENDPOINT=1`` only)  PORT
``page``        ``/`` and ``/web/<file>``: the browser page  PORT
==============  ===========================================  ============

The server API (``/api/``) is :mod:`wschat.api`'s blueprint. Every view reads
the worker's state from the app (:func:`wschat.runtime.current`), so the
blueprints hold no state and any number of apps can register them (tests).

:func:`route_by_port` and the admission hook run for the whole app, before
routing is consulted: a plain GET or a POST to ``/ws`` must get its 426 or 405
from admission, which a blueprint's own hooks (run only once a route matched
a WebSocket request) would never see.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from importlib import resources
from typing import Any

from flask import Blueprint, Request, Response, g, jsonify, request
from flask_sock import Sock
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from wsproto.utilities import RemoteProtocolError as HandshakeRefused

from .admission import Admitted, Refusal
from .connection import feed_pipelined
from .metrics import Snapshot, server_summary
from .runtime import current
from .version import __version__

log = logging.getLogger("wschat.transport")

WS_PATH = "/ws"
# Test-only: with WSCHAT_ECHO_ENDPOINT=1, /echo echoes every message through the
# same admission and frame handling as /ws (for the Autobahn conformance run).
ECHO_PATH = "/echo"
MAIN_ONLY = {WS_PATH, ECHO_PATH, "/"}
# The browser page's files (wschat/web: the page's script and styles, the JS client
# library's bundle), served on PORT only.
WEB_PREFIX = "/web/"
METRICS_ONLY = {"/metrics", "/metrics/json"}

probes = Blueprint("probes", __name__)
monitoring = Blueprint("monitoring", __name__)
websocket = Blueprint("websocket", __name__)
echo = Blueprint("echo", __name__)
page = Blueprint("page", __name__, static_folder="web", static_url_path=WEB_PREFIX.rstrip("/"))
_sock = Sock()  # only its route decorator: the handshake runs in simple-websocket


def plain(status: int, text: str, headers: dict[str, str] | None = None) -> Response:
    return Response(text + "\n", status=status, mimetype="text/plain", headers=headers)


def route_by_port() -> Response | None:
    """A request is routed by the port it arrived on (registered for the whole app)."""
    path = request.path
    port = request.environ.get("SERVER_PORT")
    if port == str(current().settings.metrics_port):
        if path in MAIN_ONLY or path.startswith(WEB_PREFIX):
            return plain(404, "not found on the metrics port")
    elif path in METRICS_ONLY and port:
        return plain(404, "metrics are served on METRICS_PORT")
    return None


UNMATCHED_ENDPOINT = "unmatched"


def endpoint(req: Request) -> str:
    """The ``endpoint`` label of the HTTP request series: the view's name without the
    prefix of these blueprints (``health``, as before they existed); the API's keep
    theirs (``api.publish``); ``unmatched`` for a request no route took (404, 405), one
    value whatever the path (a path is the client's, and would grow the series)."""
    name = req.endpoint
    if name is None:
        return UNMATCHED_ENDPOINT
    blueprint, _, view = name.rpartition(".")
    return view if blueprint in _UNPREFIXED else name


# -- probes ----------------------------------------------------------------------------

@probes.get("/health")
def health() -> Response:
    return jsonify(status="ok")


@probes.get("/ready")
def ready() -> Response:
    runtime = current()
    problems = runtime.problems()
    if problems:
        resp = jsonify(status="unavailable", problems=problems)
        resp.status_code = 503
        return resp
    return jsonify(status="ready", backend=runtime.stores.name,
                   persistence=runtime.settings.enable_persistence)


# -- monitoring ------------------------------------------------------------------------

@monitoring.get("/metrics")
def metrics_text() -> Response:
    runtime = current()
    runtime.refresh_gauges()
    # The classic text format: every Prometheus version reads it.
    return Response(generate_latest(runtime.prometheus), content_type=CONTENT_TYPE_PLAIN_0_0_4)


@monitoring.get("/metrics/json")
def metrics_json() -> Response:
    runtime = current()
    runtime.refresh_gauges()
    # Read back from the same registry as /metrics: both show the same figures.
    snapshot = Snapshot(runtime.prometheus)
    body = {
        "connections": int(snapshot.value("wschat_connections_total")),
        "rooms": int(snapshot.value("wschat_rooms_total")),
        "total_memberships": int(snapshot.value("wschat_room_members_total")),
        "timestamp": int(time.time()),
        "version": __version__,
        "backend": runtime.stores.name,
        "ready": not runtime.problems(),
        **server_summary(snapshot),
    }
    return Response(json.dumps(body, indent=2) + "\n", mimetype="application/json")


# -- the WebSocket endpoints -----------------------------------------------------------

@websocket.before_app_request
def admit() -> Response | None:
    """The checks before the upgrade (:class:`wschat.admission.Admission`)."""
    path = request.path
    if path != WS_PATH and path != ECHO_PATH:
        return None
    runtime = current()
    if path == ECHO_PATH and not runtime.echo:
        return None
    verdict = runtime.admission.check(request.environ, request.args)
    if isinstance(verdict, Refusal):
        return plain(verdict.status, verdict.text, verdict.headers)
    g.wschat_admission = verdict
    return None


@websocket.teardown_app_request
def release_unserved(exc: BaseException | None) -> None:
    # Admitted, but the handshake or serve() failed before a connection took the slot.
    admitted: Admitted | None = g.pop("wschat_admission", None)
    if admitted is not None:
        current().admission.release(admitted)


@websocket.errorhandler(ConnectionError)
@echo.errorhandler(ConnectionError)
def upgrade_abandoned(exc: ConnectionError) -> Response:
    """The client reset or closed its connection while the handshake answered it (the
    101's write failed in simple-websocket): a client gone, as gunicorn takes one, worth a
    debug line. Unhandled, Flask logged an ERROR with a traceback for each, which anyone
    could repeat at will. The admission's slots go back as ever (release_unserved)."""
    log.debug("upgrade from %s abandoned by the client: %s", request.remote_addr, exc)
    return plain(400, "connection lost during the handshake")


# What wsproto raises for a handshake it refuses or cannot read: its own protocol error,
# and UnicodeError for a field it decodes (Host as IDNA: "xn--zz", "\x80"; comma lists as
# ASCII). Only the handshake runs in these views before Transport.serve, which handles
# its own failures.
@websocket.errorhandler(HandshakeRefused)
@echo.errorhandler(HandshakeRefused)
@websocket.errorhandler(UnicodeError)
@echo.errorhandler(UnicodeError)
def handshake_refused(exc: Exception) -> Response:
    """wsproto refused a handshake the admission's checks passed (they check the fields it
    checks: this is what they miss, such as a Host that is no IDNA name): the client's
    error, 400 and counted as bad_handshake, not a 500 and an ERROR line with a
    traceback."""
    current().metrics.handshake_refused("bad_handshake")
    log.debug("upgrade from %s refused by wsproto: %s", request.remote_addr, exc)
    return plain(400, "bad WebSocket handshake")


@_sock.route(WS_PATH, bp=websocket)
def websocket_route(ws: Any) -> None:
    _serve(ws)


@_sock.route(ECHO_PATH, bp=echo)
def echo_route(ws: Any) -> None:
    _serve(ws, echo=True)


def _serve(ws: Any, echo: bool = False) -> None:
    """Hand the accepted WebSocket to the transport. The admission's slots pass to the
    connection only once it exists; if serving fails (a worker out of descriptors),
    release_unserved gives them back, and the client gets a close frame (1013, try
    again), not an HTTP error after its 101."""
    admitted: Admitted = g.wschat_admission
    try:
        feed_pipelined(ws, request.environ)
        current().transport.serve(ws, *admitted, echo=echo)
    except Exception:
        log.exception("could not serve an accepted WebSocket; closing it with 1013")
        if ws.connected:
            with contextlib.suppress(Exception):  # the socket may be gone already
                ws.close(1013, "temporarily unavailable; retry")
        return
    del g.wschat_admission  # the connection releases them when it ends


# -- the browser page ------------------------------------------------------------------

@page.get("/")
def index() -> Response:
    html = resources.files("wschat").joinpath("web/index.html").read_bytes()
    return Response(html, mimetype="text/html")


_HOST = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


@page.after_request
def page_headers(response: Response) -> Response:
    """The page and its files run only their own script, talk only to this server, and
    are never framed by another site (clickjacking); nothing is sniffed or referred."""
    # The WebSocket is same-origin, as ws:// or wss:// (which not every browser's 'self'
    # covers); a Host header that is no host name adds nothing to the policy.
    host = request.host if _HOST.fullmatch(request.host) else ""
    sockets = f" ws://{host} wss://{host}" if host else ""
    response.headers["Content-Security-Policy"] = (
        f"default-src 'self'; connect-src 'self'{sockets}; "
        "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'")
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


_UNPREFIXED = {bp.name for bp in (probes, monitoring, websocket, echo, page)}
