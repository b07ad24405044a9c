"""The app factory with Flask's test client: probes, admission before the upgrade, the
monitoring and API guards, and what building versus starting the app does.

No gunicorn here: ``create_app(Settings(...))`` builds the app in this process and
``app.test_client()`` speaks WSGI to it. Real sockets, real handshakes and the
port each route is served on under gunicorn are tested in test_server.py and
test_edge.py; a request here names its port through ``base_url``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import jwt
import pytest
from flask import Flask
from flask.testing import FlaskClient

from conftest import redis_url_or_skip
from services import free_port
from wschat import runtime
from wschat.config import ConfigError, Settings
from wschat.factory import EXIT_SECONDS, attach_worker, create_app, finish_worker

SECRET = "test-secret-0123456789abcdef0123456789"
ORIGIN = "https://chat.example.com"
MAIN = "http://localhost:8080"  # PORT
METRICS = "http://localhost:8081"  # METRICS_PORT

MakeApp = Callable[..., Flask]


@pytest.fixture
def make_app() -> Iterator[MakeApp]:
    """Build apps from settings (not started); those a test started are stopped after it."""
    apps: list[Flask] = []

    def make(**settings: Any) -> Flask:
        app = create_app(Settings(**settings))
        apps.append(app)
        return app

    yield make
    for app in apps:
        if runtime.of(app).started:
            runtime.of(app).stop(timeout=0)


@pytest.fixture
def client(make_app: MakeApp) -> FlaskClient:
    """A started memory-backend app with JWT and an origin allow-list."""
    app = make_app(jwt_secret=SECRET, allowed_origins=(ORIGIN,))
    runtime.of(app).start()
    return app.test_client()


def upgrade(**headers: str | None) -> dict[str, str]:
    """The headers of a valid WebSocket upgrade, with ``headers`` changed (None: left out)."""
    base = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}
    base.update({k.replace("_", "-"): v for k, v in headers.items()})
    return {k: v for k, v in base.items() if v is not None}


def good_token(sub: str = "alice") -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


def refusals(client: FlaskClient) -> dict[str, int]:
    body = client.get("/metrics/json", base_url=METRICS).get_json()
    return body["handshakes_refused"]


# -- probes ----------------------------------------------------------------------------

def test_health_on_both_ports(client: FlaskClient) -> None:
    """/health answers 200 {"status": "ok"} on PORT and on METRICS_PORT."""
    for port in (MAIN, METRICS):
        resp = client.get("/health", base_url=port)
        assert (resp.status_code, resp.get_json()) == (200, {"status": "ok"})


def test_ready_only_once_started_and_until_shutdown(make_app: MakeApp) -> None:
    """/ready is 503 "starting" for a built app, 200 once started, 503 "shutting down" after."""
    app = make_app()
    client = app.test_client()
    resp = client.get("/ready")
    assert resp.status_code == 503
    assert resp.get_json() == {"status": "unavailable", "problems": ["starting"]}
    runtime.of(app).start()
    resp = client.get("/ready", base_url=METRICS)
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ready", "backend": "memory", "persistence": False}
    runtime.of(app).stop(timeout=0)
    resp = client.get("/ready")
    assert (resp.status_code, resp.get_json()["problems"]) == (503, ["shutting down"])


def test_ready_names_an_unreachable_store_and_upgrades_get_503(make_app: MakeApp) -> None:
    """With Redis away, /ready is 503 naming it and upgrades are refused 503 with Retry-After."""
    app = make_app(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    runtime.of(app).start()  # Redis unreachable at start: the worker still starts
    client = app.test_client()
    resp = client.get("/ready")
    assert (resp.status_code, resp.get_json()["problems"]) == (503, ["redis unreachable"])
    resp = client.get("/ws", headers=upgrade())
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "2"
    assert resp.text == "redis unreachable; retry\n"
    assert refusals(client)["unavailable"] >= 1


# -- building versus starting ----------------------------------------------------------

def test_building_opens_nothing_starting_connects(make_app: MakeApp) -> None:
    """create_app opens no Redis connection; start() subscribes (one named connection at least)."""
    import redis

    name = f"wschat-factory-{uuid.uuid4().hex[:8]}"
    url = redis_url_or_skip(12)
    checker = redis.Redis.from_url(url)

    def ours() -> int:
        return sum(1 for c in checker.client_list() if c.get("name") == name)

    try:
        app = make_app(redis_url=f"{url}?client_name={name}")
        assert ours() == 0 and not runtime.of(app).started
        runtime.of(app).start()
        assert ours() >= 1
        assert app.test_client().get("/ready").status_code == 200
    finally:
        checker.close()


def test_building_leaves_the_database_alone(make_app: MakeApp, tmp_path: Path) -> None:
    """With persistence, create_app does not touch the SQLite file; start() creates and
    migrates it, and /ready names the database."""
    db = tmp_path / "chat.db"
    app = make_app(enable_persistence=True, database_url=f"sqlite:///{db}")
    client = app.test_client()
    assert not db.exists()
    assert client.get("/ready").get_json()["problems"] == ["starting", "database unreachable"]
    runtime.of(app).start()
    assert db.exists()
    resp = client.get("/ready")
    assert resp.status_code == 200 and resp.get_json()["persistence"] is True


def test_unusable_sqlite_file_is_a_configuration_error_at_start(make_app: MakeApp) -> None:
    """A DATABASE_URL that cannot be opened is found by start(), not by building the app."""
    app = make_app(enable_persistence=True, database_url="sqlite:////nonexistent/dir/x.db")
    with pytest.raises(ConfigError, match="DATABASE_URL: cannot use"):
        runtime.of(app).start()
    assert not runtime.of(app).started


def test_start_logs_the_ready_line_once(make_app: MakeApp) -> None:
    """The start-up line names backend and persistence; a second start() does nothing."""
    app = make_app()  # configure_logging: the wschat loggers do not propagate to pytest's
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("wschat.app")
    logger.addHandler(handler)
    try:
        runtime.of(app).start()
        runtime.of(app).start()
    finally:
        logger.removeHandler(handler)
    ready = [line for line in lines if " ready: " in line]
    assert len(ready) == 1 and ready[0].endswith("ready: backend=memory persistence=off")


class FakeWorker:
    """What attach_worker and finish_worker use of a gunicorn worker."""

    class Tmp:
        def notify(self) -> None:
            pass

        def close(self) -> None:
            pass

    def __init__(self) -> None:
        self.alive = True
        self.pid = os.getpid()
        self.tmp: Any = self.Tmp()


def test_hung_drain_ends_within_graceful_timeout_of_the_signal(
        make_app: MakeApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a drain that hangs (a store that never answers), finish_worker (gunicorn's
    worker_exit) returns before GRACEFUL_TIMEOUT has passed since the worker was told to
    stop, though the worker's loop calls it later (once the requests under way are served,
    here 0.9 s after the signal): the worker exits by
    itself before the master's SIGKILL, due GRACEFUL_TIMEOUT after its SIGTERM."""
    graceful = 2.0
    app = make_app(graceful_timeout=graceful)
    rt = runtime.of(app)
    released = gevent.event.Event()
    monkeypatch.setattr(rt, "stop", lambda timeout: released.wait(60))
    worker = FakeWorker()
    attach_worker(app, worker, [0], 0)
    assert rt.shutdown is not None
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("wschat.app")  # configure_logging: no propagation to pytest
    logger.addHandler(handler)
    try:
        signalled = time.monotonic()
        worker.alive = False  # what gunicorn's SIGTERM handler does
        # The worker's loop calls worker_exit after the look that finds it false and the
        # requests under way are served (wschat.worker.Worker._serve): later than the signal.
        gevent.sleep(0.9)
        finish_worker(app, worker)
        took = time.monotonic() - signalled
        assert not rt.shutdown.ready(), "the drain was to hang: the limit must end the wait"
        assert took <= graceful - EXIT_SECONDS + 0.2, took
        assert took >= graceful - EXIT_SECONDS - 0.3, f"gave up on the drain early: {took}"
        assert any("shutdown not done" in line for line in warnings), warnings
    finally:
        logger.removeHandler(handler)
        released.set()
        rt.shutdown.join(timeout=5)


def test_apps_do_not_share_state(make_app: MakeApp) -> None:
    """Each app holds its own runtime in app.extensions; nothing is kept at module level."""
    first, second = make_app(), make_app()
    assert runtime.of(first) is not runtime.of(second)
    runtime.of(first).start()
    assert first.test_client().get("/ready").status_code == 200
    assert second.test_client().get("/ready").status_code == 503


# -- admission: refusals before the upgrade --------------------------------------------

def test_plain_http_to_ws_is_refused(client: FlaskClient) -> None:
    """A non-upgrade GET /ws gets 426 naming websocket, not a crash."""
    resp = client.get("/ws")
    assert resp.status_code == 426 and resp.headers["Upgrade"] == "websocket"


def test_handshake_field_checks(client: FlaskClient) -> None:
    """Wrong version is 426 (naming 13), a bad key 400, no Connection: Upgrade 400, a POST
    405: all before any upgrade, counted as bad_handshake."""
    before = refusals(client).get("bad_handshake", 0)
    resp = client.get("/ws", headers=upgrade(Sec_WebSocket_Version="8"))
    assert resp.status_code == 426 and resp.headers["Sec-WebSocket-Version"] == "13"
    assert client.get("/ws", headers=upgrade(Sec_WebSocket_Key="short")).status_code == 400
    assert client.get("/ws", headers=upgrade(Connection="keep-alive")).status_code == 400
    resp = client.post("/ws", headers=upgrade())
    assert resp.status_code == 405 and resp.headers["Allow"] == "GET"
    assert refusals(client)["bad_handshake"] == before + 4


def test_invalid_username_refused_before_upgrade(client: FlaskClient) -> None:
    """An invalid ?username= is refused with 400 before the handshake."""
    resp = client.get("/ws?username=" + "x" * 80, headers=upgrade())
    assert resp.status_code == 400 and resp.text.startswith("usernames are 1-32 characters")


@pytest.mark.parametrize("where", ["query", "bearer"])
def test_bad_token_is_401(client: FlaskClient, where: str) -> None:
    """A token that does not verify, in ?token= or Authorization: Bearer, is 401 and counted."""
    bad = jwt.encode({"sub": "mallory", "exp": int(time.time()) + 600}, "another-secret-" * 3,
                     algorithm="HS256")
    before = refusals(client).get("auth", 0)
    if where == "query":
        resp = client.get(f"/ws?token={bad}", headers=upgrade())
    else:
        resp = client.get("/ws", headers=upgrade(Authorization=f"Bearer {bad}"))
    assert resp.status_code == 401
    assert refusals(client)["auth"] == before + 1


@pytest.mark.parametrize("origin", ["https://evil.example", "null",
                                    "https://chat.example.com.evil.io", "http://chat.example.com"])
def test_foreign_origin_is_403(client: FlaskClient, origin: str) -> None:
    """An Origin outside ALLOWED_ORIGINS is refused with 403 before the upgrade."""
    resp = client.get(f"/ws?token={good_token()}", headers=upgrade(Origin=origin))
    assert (resp.status_code, resp.text) == (403, "origin not allowed\n")


def test_refusals_while_shutting_down(make_app: MakeApp) -> None:
    """Once the worker is stopping, an upgrade is 503 before anything else is checked."""
    app = make_app()
    runtime.of(app).start()
    runtime.of(app).stop(timeout=0)
    resp = app.test_client().get("/ws")  # not even an upgrade: shutting down comes first
    assert (resp.status_code, resp.text) == (503, "server is shutting down\n")


def test_limits_per_address_and_per_server(make_app: MakeApp) -> None:
    """At MAX_CONNECTIONS_PER_IP an upgrade is 429, at MAX_CONNECTIONS 503, both with
    Retry-After, and a refused upgrade holds no slot."""
    app = make_app(max_connections=1, max_connections_per_ip=1)
    runtime.of(app).start()
    transport = runtime.of(app).transport
    client = app.test_client()
    assert transport.addresses.claim("127.0.0.1")  # the test client's address
    resp = client.get("/ws", headers=upgrade())
    assert (resp.status_code, resp.headers["Retry-After"]) == (429, "5")
    transport.addresses.release("127.0.0.1")
    assert transport.budget.try_acquire()  # the server's only connection
    resp = client.get("/ws", headers=upgrade())
    assert (resp.status_code, resp.text) == (503, "server is at MAX_CONNECTIONS\n")
    assert transport.addresses.counts == {}


def test_admitted_upgrade_whose_handshake_fails_gives_its_slots_back(
        make_app: MakeApp) -> None:
    """Admitted, but the handshake cannot happen (the test client has no socket): the
    connection budget and the address are released when the request ends."""
    app = make_app(max_connections=1)
    runtime.of(app).start()
    transport = runtime.of(app).transport
    logging.getLogger(app.name).disabled = True  # Flask's traceback of the failed handshake
    try:
        resp = app.test_client().get("/ws", headers=upgrade())
    finally:
        logging.getLogger(app.name).disabled = False
    assert resp.status_code == 500
    assert transport.addresses.counts == {}
    assert transport.budget.try_acquire()  # the one slot is free again


# -- routing by port, monitoring, the API guard ----------------------------------------

def test_routes_by_port(client: FlaskClient) -> None:
    """The page and /ws are not on METRICS_PORT; the metrics are not on PORT."""
    for path in ("/", "/ws", "/web/app.js"):
        resp = client.get(path, base_url=METRICS)
        assert (resp.status_code, resp.text) == (404, "not found on the metrics port\n")
    for path in ("/metrics", "/metrics/json"):
        resp = client.get(path, base_url=MAIN)
        assert (resp.status_code, resp.text) == (404, "metrics are served on METRICS_PORT\n")
    assert client.get("/", base_url=MAIN).status_code == 200
    assert client.get("/web/app.js", base_url=MAIN).status_code == 200
    assert client.get("/echo", base_url=MAIN).status_code == 404  # WSCHAT_ECHO_ENDPOINT unset


def test_metrics_json_and_text(client: FlaskClient) -> None:
    """/metrics/json has the documented figures and the refusals /metrics counts too."""
    client.get("/ws", headers=upgrade(Origin="https://evil.example"))
    resp = client.get("/metrics/json", base_url=METRICS)
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    body = json.loads(resp.data)
    assert {"connections", "rooms", "total_memberships", "timestamp", "version", "backend",
            "ready", "workers", "uptime_seconds", "messages", "handshakes_refused",
            "fanout_ms_since_start", "store_ms_since_start"} <= body.keys()
    assert body["backend"] == "memory" and body["ready"] is True
    text = client.get("/metrics", base_url=METRICS)
    assert text.status_code == 200 and text.mimetype == "text/plain"
    sample = f'wschat_handshakes_refused_total{{reason="origin"}} ' \
             f'{float(body["handshakes_refused"]["origin"])}'
    assert sample in text.text


def test_no_api_key_refuses_every_call(make_app: MakeApp) -> None:
    """Without API_KEY every /api call is 403, whatever the Authorization header."""
    client = make_app().test_client()
    for path in ("/api/info", "/api/openapi.json", "/api/unknown"):
        resp = client.get(path, base_url=METRICS, headers={"Authorization": "Bearer x" * 4})
        assert (resp.status_code, resp.get_json()["error"]["code"]) == (403, "api_disabled")
    resp = client.post("/api/publish", base_url=METRICS, json={"room": "r", "text": "x"})
    assert resp.status_code == 403
