"""Shared fixtures: real gunicorn servers on free ports, real WebSocket clients, real services.

Every wait has a timeout, scaled by ``WSCHAT_TEST_TIMEOUT_SCALE`` (default 1)
for slow machines. Services: Redis at ``REDIS_URL`` and PostgreSQL at
``DATABASE_URL_TEST`` when given; otherwise the suite starts private instances
of its own (:mod:`services`) the first time a test needs one and removes them at
the end. Where a service cannot be had, its tests skip with the reason outside
CI and fail under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from services import (  # noqa: F401 (re-exported for the test modules)
    ROOT, SCALE, TIMEOUT, PrivatePostgres, PrivateRedis, Server, ServiceMissing, free_port,
    http_get, stopped_together, wait_until,
)

IN_CI = os.environ.get("CI", "").lower() == "true"


def service_unavailable(reason: str) -> NoReturn:
    """A service a test needs cannot be had: fail under CI, skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{reason} (required under CI=true)")
    pytest.skip(reason)


class SharedServices:
    """Redis and PostgreSQL for the whole session: given by URL, or private and started once."""

    def __init__(self) -> None:
        self.redis_url = os.environ.get("REDIS_URL")
        self.postgres_url = os.environ.get("DATABASE_URL_TEST")
        self._started: list[PrivateRedis | PrivatePostgres] = []

    def redis(self) -> str:
        if self.redis_url is None:
            private = self._start(PrivateRedis)
            self.redis_url = private.url.rpartition("/")[0]
        return self.redis_url

    def postgres(self) -> str:
        if self.postgres_url is None:
            private = self._start(PrivatePostgres)
            self.postgres_url = private.url_for("wschat_test")
        return self.postgres_url

    def _start(self, kind: type[PrivateRedis] | type[PrivatePostgres]) -> Any:
        try:
            private = kind()
        except ServiceMissing as exc:
            service_unavailable(str(exc))
        self._started.append(private)
        return private.start()

    def remove(self) -> None:
        for private in self._started:
            private.remove()


SERVICES = SharedServices()


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    SERVICES.remove()


class Client:
    """A real WebSocket client (``websockets`` sync API) with JSON helpers."""

    def __init__(self, url: str, query: str = "", headers: dict[str, str] | None = None,
                 expect_welcome: bool = True, **kwargs: Any) -> None:
        target = url + (("?" + query) if query else "")
        self.ws: ClientConnection = connect(target, additional_headers=headers,
                                            open_timeout=TIMEOUT, max_size=None,
                                            **kwargs).__enter__()
        self.backlog: list[dict[str, Any]] = []
        self.welcome = self.expect("welcome") if expect_welcome else None

    @property
    def user_id(self) -> str:
        assert self.welcome is not None
        return self.welcome["user_id"]

    def send(self, obj: Any) -> None:
        self.ws.send(obj if isinstance(obj, (str, bytes)) else json.dumps(obj))

    def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        if self.backlog:
            return self.backlog.pop(0)
        return json.loads(self.ws.recv(timeout))

    def expect(self, kind: str, timeout: float = TIMEOUT, **match: Any) -> dict[str, Any]:
        """Next event of type ``kind`` (matching ``match``); other events are kept."""
        return self.expect_any((kind, match), timeout=timeout)

    def expect_any(self, *kinds: tuple[str, dict[str, Any]], timeout: float = TIMEOUT
                   ) -> dict[str, Any]:
        """The next event matching one of ``(kind, match)``; other events are kept."""
        def matches(event: dict[str, Any]) -> bool:
            return any(event.get("type") == kind and all(event.get(k) == v for k, v in m.items())
                       for kind, m in kinds)

        for i, event in enumerate(self.backlog):
            if matches(event):
                return self.backlog.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                wanted = " or ".join(f"{kind} {m or ''}" for kind, m in kinds)
                raise AssertionError(f"no {wanted} within {timeout}s; got {self.backlog}")
            try:
                event = json.loads(self.ws.recv(left))
            except TimeoutError:
                continue
            if matches(event):
                return event
            self.backlog.append(event)

    def request(self, obj: dict[str, Any], reply: str, timeout: float = TIMEOUT
                ) -> dict[str, Any]:
        self.send(obj)
        return self.expect(reply, timeout)

    def post_until_taken(self, post: dict[str, Any], timeout: float = 15 * SCALE
                         ) -> dict[str, Any]:
        """Send ``post`` (a message or a DM) until it is taken; its echo. Each refusal
        must be ``unavailable`` (Redis coming back: until every worker caught up)."""
        deadline = time.monotonic() + timeout
        for attempt in itertools.count():
            self.send({**post, "id": f"try-{attempt}"})
            answer = self.expect_any(("error", {"id": f"try-{attempt}"}),
                                     (post["type"], {"text": post["text"]}))
            if answer["type"] != "error":
                return answer
            assert answer["code"] == "unavailable", answer
            assert time.monotonic() < deadline, "the post was never taken"
            time.sleep(0.1)  # a retry's pace, not a wait for an event
        raise AssertionError("unreachable")

    def join(self, room: str, **extra: Any) -> dict[str, Any]:
        return self.request({"type": "join", "room": room, **extra}, "joined")

    def say(self, room: str, text: str, **extra: Any) -> dict[str, Any]:
        """Send a message and return its echo (the acknowledgement)."""
        self.send({"type": "message", "room": room, "text": text, **extra})
        return self.expect("message", text=text)

    def assert_silent(self, kind: str | None = None, within: float = 0.3) -> None:
        """Nothing (of type ``kind``) arrives within ``within`` seconds."""
        try:
            event = self.expect(kind, within) if kind else self.recv(within)
        except (AssertionError, TimeoutError):
            return
        raise AssertionError(f"unexpected event {event}")

    def close_code_when_closed(self, timeout: float = TIMEOUT) -> int | None:
        """Read (and drop) events until the server closes; its close code."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the server did not close within {timeout}s")
                try:
                    self.ws.recv(left)
                except TimeoutError:
                    continue
        except ConnectionClosed:
            return self.ws.close_code

    def close(self) -> None:
        """The close handshake, reading meanwhile what is still unread (kept in the backlog).
        websockets stops reading once ``max_queue`` (16) frames wait unread, so the server's
        close frame behind them came only after ``close_timeout`` (10 s): 50 s of a 52 s
        test whose 30 clients each had their fellows' presence unread."""
        closing = threading.Thread(target=self.ws.close, daemon=True)
        closing.start()
        while closing.is_alive():
            try:
                data = self.ws.recv(0.05)
            except TimeoutError:
                continue
            except ConnectionClosed:
                break
            with contextlib.suppress(ValueError):
                self.backlog.append(json.loads(data))
        closing.join()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def redis_url(db: int) -> str:
    """The session's Redis URL for database ``db`` (a given REDIS_URL keeps its own database)."""
    base = SERVICES.redis()
    return f"{base.rstrip('/')}/{db}" if base.count("/") == 2 else base


def redis_url_or_skip(db: int) -> str:
    """A Redis URL for database ``db`` that answers PING, flushed; skip outside CI."""
    import redis

    url = redis_url(db)
    try:
        client = redis.Redis.from_url(url, socket_timeout=2)
        client.ping()
        client.flushdb()
        client.close()
    except redis.RedisError as exc:
        service_unavailable(f"Redis not reachable at {url}: {exc}")
    return url


def first_start(client: Any) -> None:
    """What a worker's first start does on an empty Redis: name the data's epoch, which
    opens the post scripts' gate (wschat.stores.redis.epoch). For stores a test builds
    by hand."""
    from wschat.stores.redis.epoch import Epoch

    Epoch(client, "test-node", 30).begin()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """One memory-backend server for a test module, with fast timers."""
    with Server({"HEARTBEAT_INTERVAL": "30", "TYPING_TIMEOUT": "0.5", "RATE_LIMIT": "1000",
                 "RATE_LIMIT_BURST": "1000", "JWT_SECRET": "test-secret-0123456789abcdef0123456789"}
                ) as srv:
        yield srv


@pytest.fixture
def client_factory(server: Server) -> Iterator[Any]:
    clients: list[Client] = []

    def make(query: str = "", **kwargs: Any) -> Client:
        client = Client(server.url, query, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        try:
            client.close()
        except Exception:
            pass


@contextlib.contextmanager
def listening(url: str, *user_ids: str) -> Iterator[None]:
    """A worker's pub/sub connection, as far as a store's DM is concerned: subscribed
    (and confirmed) to these users' channels. A DM nobody is subscribed for is refused
    (post_dm.lua), as nobody would ever get it."""
    import redis

    from wschat.stores.redis.keys import user_channel

    client = redis.Redis.from_url(url)
    pubsub = client.pubsub()
    try:
        pubsub.subscribe(*(user_channel(u) for u in user_ids))
        confirmed = 0
        deadline = time.monotonic() + TIMEOUT
        while confirmed < len(user_ids):
            assert time.monotonic() < deadline, "the subscriptions were not confirmed"
            reply = pubsub.get_message(timeout=TIMEOUT)
            confirmed += reply is not None and reply["type"] == "subscribe"
        yield
    finally:
        pubsub.close()
        client.close()


@contextlib.contextmanager
def own_redis(*extra_args: str) -> Iterator[PrivateRedis]:
    """A Redis of the test's own (to stop and restart; ``extra_args``: more
    redis-server options), removed afterwards; skip (fail under CI) when
    redis-server is not installed."""
    try:
        redis = PrivateRedis(extra_args)
    except ServiceMissing as exc:
        service_unavailable(str(exc))
    redis.start()
    try:
        yield redis
    finally:
        redis.remove()
