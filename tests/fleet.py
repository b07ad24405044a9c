"""Many chat clients in one asyncio loop that keep the delivery promise's client side.

Each :class:`Member` joins one room, records every message id it receives, and
when its connection ends (1001 deploy, a killed worker, a refused upgrade)
reconnects to the next server in its list and joins again with ``since`` = the
last id it saw, which is all a client must do (docs/delivery.md). A
:class:`Sender` is a member that also writes: every message carries a
``client_msg_id`` and is resent after a reconnect (or an ``unavailable``) until
its echo, the acknowledgement, arrives.

:func:`check` then asserts, from the clients' side, that every member got every
id after its first ``joined`` exactly once and in order, and that every
acknowledged message is among them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import Callable, Sequence
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake, InvalidStatus, WebSocketException

from conftest import TIMEOUT

Urls = Callable[[int], str]  # attempt number -> the server URL to (re)connect to


class Member:
    def __init__(self, name: str, room: str, urls: Urls, query: str = "") -> None:
        self.name = name
        self.room = room
        self.urls = urls
        self.query = query
        self.ids: list[int] = []  # every message id received, across connections
        self.first_last_id: int | None = None  # `last_id` of the first `joined`
        self.unrecovered = 0  # `joined` with recovered: false
        self.connections = 0
        self.join_errors: list[dict[str, Any]] = []
        self.joined = asyncio.Event()  # set on each `joined`, cleared on disconnect
        self.ws: Any = None

    @property
    def last_seen(self) -> int | None:
        return self.ids[-1] if self.ids else self.first_last_id

    def join_command(self) -> dict[str, Any]:
        command: dict[str, Any] = {"type": "join", "room": self.room}
        if self.last_seen is not None:
            command["since"] = self.last_seen
        return command

    async def run(self, stop: asyncio.Event) -> None:
        for attempt in itertools.count():
            if stop.is_set():
                return
            url = self.urls(attempt) + (f"?{self.query}" if self.query else "")
            try:
                async with connect(url, open_timeout=2 * TIMEOUT, max_size=None,
                                   ping_interval=None, close_timeout=1) as ws:
                    self.ws = ws
                    self.connections += 1
                    await self._session(ws, stop)
            except (OSError, TimeoutError, InvalidHandshake, InvalidStatus,
                    WebSocketException):
                pass
            finally:
                self.ws = None
                self.joined.clear()
            if not stop.is_set():
                await asyncio.sleep(0.05 + random.random() * 0.2)

    async def _session(self, ws: Any, stop: asyncio.Event) -> None:
        await ws.send(json.dumps(self.join_command()))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while True:
                receive = asyncio.ensure_future(ws.recv())
                done, _ = await asyncio.wait({receive, stopper},
                                             return_when=asyncio.FIRST_COMPLETED)
                if receive not in done:
                    receive.cancel()
                    return
                await self.on_event(ws, json.loads(receive.result()))
        finally:
            stopper.cancel()

    async def on_event(self, ws: Any, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message" and event.get("room") == self.room:
            self.ids.append(event["id"])
        elif kind == "joined":
            if self.first_last_id is None:
                self.first_last_id = event["last_id"]
            if event.get("recovered") is False:
                self.unrecovered += 1
            self.joined.set()
            await self.on_joined(ws)
        elif kind == "error" and not self.joined.is_set():
            # a join refused (the store briefly away): ask again shortly
            self.join_errors.append(event)
            await asyncio.sleep(0.2)
            await ws.send(json.dumps(self.join_command()))

    async def on_joined(self, ws: Any) -> None:
        pass


class Sender(Member):
    """A member that writes ``count`` messages at ``rate`` per second, each until acknowledged."""

    def __init__(self, *args: Any, count: int, rate: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.count = count
        self.rate = rate
        self.sent: list[str] = []  # client_msg_ids in the order first sent
        self.acked: dict[str, int] = {}  # client_msg_id -> message id
        self.errors: dict[str, int] = {}  # error code -> how many (refused sends)

    def unacked(self) -> list[str]:
        return [c for c in self.sent if c not in self.acked]

    async def on_event(self, ws: Any, event: dict[str, Any]) -> None:
        if event.get("type") == "message" and event.get("client_msg_id", "").startswith(
                self.name + "-"):
            self.acked.setdefault(event["client_msg_id"], event["id"])
        elif event.get("type") == "error" and self.joined.is_set():
            self.errors[event.get("code", "")] = self.errors.get(event.get("code", ""), 0) + 1
            if event.get("code") in ("unavailable", "rate_limited"):
                asyncio.ensure_future(self._resend_later(ws, event.get("id")))
            return
        await super().on_event(ws, event)

    async def on_joined(self, ws: Any) -> None:
        for cid in self.unacked():  # the client's half of the promise: resend, same id
            await self._send(ws, cid)

    async def _resend_later(self, ws: Any, cid: Any) -> None:
        await asyncio.sleep(0.3)
        if isinstance(cid, str) and cid not in self.acked and self.ws is ws:
            try:
                await self._send(ws, cid)
            except WebSocketException:
                pass

    async def _send(self, ws: Any, cid: str) -> None:
        await ws.send(json.dumps({"type": "message", "room": self.room, "text": cid,
                                  "client_msg_id": cid, "id": cid}))

    async def write(self) -> None:
        """Send the messages, paced; each new one goes out only on a joined connection."""
        for i in range(self.count):
            cid = f"{self.name}-{i}"
            while True:
                ws = self.ws
                if ws is not None and self.joined.is_set():
                    try:
                        self.sent.append(cid)
                        await self._send(ws, cid)
                        break
                    except WebSocketException:
                        pass  # sent on reconnect: it is in self.sent
                        break
                await asyncio.sleep(0.02)
            await asyncio.sleep(1 / self.rate)


async def settle(members: Sequence[Member], senders: Sequence[Sender],
                 timeout: float) -> None:
    """Wait until every message is acknowledged and every member has the last id."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if all(not s.unacked() and len(s.sent) == s.count for s in senders):
            last = max((m.ids[-1] for m in members if m.ids), default=0)
            if all(m.ids and m.ids[-1] == last for m in members):
                return
        await asyncio.sleep(0.05)


def check(members: Sequence[Member], senders: Sequence[Sender] = ()) -> dict[str, int]:
    """Zero lost, zero doubled, in order: every member holds exactly the ids after its
    first ``joined`` up to the room's last, once each; every acknowledgement among them."""
    problems: list[str] = []
    for s in senders:
        if s.unacked() or len(s.sent) != s.count:
            problems.append(f"{s.name}: {len(s.unacked())} of {len(s.sent)} sent "
                            f"never acknowledged ({s.count} to send; errors {s.errors})")
    rooms: dict[str, list[Member]] = {}
    for m in members:
        rooms.setdefault(m.room, []).append(m)
    for room, group in rooms.items():
        last = max((m.ids[-1] for m in group if m.ids), default=0)
        acked = {i for s in senders if s.room == room for i in s.acked.values()}
        for m in group:
            if m.first_last_id is None:
                problems.append(f"{m.name}: never joined {room} ({m.join_errors[-1:]})")
                continue
            expected = list(range(m.first_last_id + 1, last + 1))
            if m.ids != expected:
                doubled = sorted({i for i in m.ids if m.ids.count(i) > 1})
                lost = sorted(set(expected) - set(m.ids))
                problems.append(f"{m.name} in {room}: doubled {doubled[:10]}, lost "
                                f"{lost[:10]} ({len(lost)}), out of order "
                                f"{m.ids != sorted(m.ids)}; got ...{m.ids[-30:]}")
            missing_acks = sorted(i for i in acked if i > m.first_last_id
                                  and i not in set(m.ids))
            if missing_acks:
                problems.append(f"{m.name}: acknowledged ids never received {missing_acks[:10]}")
            if m.unrecovered:
                problems.append(f"{m.name}: {m.unrecovered} joins with recovered: false")
    assert not problems, "\n".join(problems[:20])
    return {"members": len(members), "messages": sum(len(m.ids) for m in members)}
