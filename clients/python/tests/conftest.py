"""Fixtures: coroutine tests without plugins, the shared conformance harness, a recorder.

``async def`` tests run in a fresh event loop each, bounded by ``TEST_DEADLINE``.
The harness (``clients/conformance/harness.py``) starts with ``sys.executable``:
the Python where ``wschat[test,redis]`` is installed. Outside CI a missing server
skips the conformance tests with the reason; under ``CI=true`` it fails them.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wschat_client import Client, Message

REPO = Path(__file__).resolve().parents[3]
HARNESS = REPO / "clients" / "conformance" / "harness.py"
SCALE = float(os.environ.get("WSCHAT_TEST_TIMEOUT_SCALE", "1"))
TIMEOUT = 10.0 * SCALE
TEST_DEADLINE = 120.0 * SCALE
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests with ``asyncio.run``, within ``TEST_DEADLINE``."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}

    async def bounded() -> None:
        await asyncio.wait_for(pyfuncitem.obj(**kwargs), TEST_DEADLINE)

    asyncio.run(bounded())
    return True


class Harness:
    """The conformance harness process and its HTTP control API."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HARNESS)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=REPO)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"the harness exited with {self.proc.wait()}")
        hello = json.loads(line)
        self.control, self.secret = hello["control"], hello["secret"]

    def call_sync(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        request = urllib.request.Request(self.control + path, json.dumps(body or {}).encode(),
                                         {"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=12 * TIMEOUT) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"harness {path}: {exc.code} {exc.read()!r}") from None

    async def call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """A harness call from a coroutine (in a thread: the loop keeps serving clients)."""
        return await asyncio.to_thread(self.call_sync, path, body)

    async def server(self, backend: str = "memory", **body: Any) -> dict[str, Any]:
        return await self.call("/servers", {"backend": backend, **body})

    async def token(self, sub: str, ttl: float = 3600, rooms: list[str] | None = None) -> str:
        """A token of ``sub`` (named ``sub.title()``); ``rooms``: its rooms claim."""
        body: dict[str, Any] = {"sub": sub, "name": sub.title(), "ttl": ttl}
        if rooms is not None:
            body["rooms"] = rooms
        return (await self.call("/token", body))["token"]

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(timeout=6 * TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        finally:
            # Its end of the pipe too: a run with -W error failed at exit on the
            # ResourceWarning of the unclosed file, whatever the tests did.
            self.proc.stdout.close()  # type: ignore[union-attr]


@pytest.fixture(scope="session")
def harness() -> Iterator[Harness]:
    try:
        import wschat  # noqa: F401 (the server must be importable by the harness)
    except ImportError as exc:
        reason = f"the wschat server is not installed here ({exc}): pip install -e '.[test,redis]'"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    h = Harness()
    yield h
    h.close()


class Recorder:
    """What one client's app saw: room messages in order, DMs, joins, disconnects."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.messages: dict[str, list[Message]] = defaultdict(list)
        self.events: list[tuple[str, Any]] = []
        self._changed = asyncio.Event()
        for name in ("message", "dm", "joined", "recovery_failed", "disconnected", "connected",
                     "state", "room_state", "ack", "error"):
            client.on(name, self._record(name))

    def _record(self, name: str) -> Any:
        def handler(payload: Any) -> None:
            if name == "message":
                self.messages[payload.room].append(payload)
            self.events.append((name, payload))
            self._changed.set()
        return handler

    def of(self, name: str) -> list[Any]:
        return [payload for kind, payload in self.events if kind == name]

    def ids(self, room: str) -> list[int]:
        return [m.id for m in self.messages[room]]

    async def wait_for(self, predicate: Any, timeout: float = TIMEOUT, what: str = "") -> None:
        """Wait until ``predicate()`` is true (checked after every event)."""
        async def loop() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()
        try:
            await asyncio.wait_for(loop(), timeout)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what or predicate}") from None


def delivered(recorder: Recorder, room: str) -> set[tuple[int, str]]:
    return {(m.id, m.text) for m in recorder.messages[room]}


def assert_exactly_once_in_order(recorder: Recorder, room: str, sent: list[Message]) -> None:
    """Every sent message delivered (same id, same text), and no id twice or out of order."""
    ids = recorder.ids(room)
    assert ids == sorted(set(ids)), f"doubled or out of order in {room}: {ids}"
    missing = {(m.id, m.text) for m in sent} - delivered(recorder, room)
    assert not missing, f"lost in {room}: {sorted(missing)}"
