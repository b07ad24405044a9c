"""The server's moderation as the client sees it, against the real server (HTTP API)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import pytest

from conftest import TIMEOUT, Harness, Recorder
from wschat_client import ChatError, Client, Removed

API_KEY = "conformance-api-key-0123456789"


def api(server: dict[str, Any], path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{server['metrics']}/api/{path}", json.dumps(body).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as reply:
        return json.loads(reply.read())


async def test_kick_removes_the_room_and_api_posts_arrive_once(harness: Harness) -> None:
    """An API kick surfaces as removed (the room is not re-joined); API posts are messages."""
    server = await harness.server("memory", env={"API_KEY": API_KEY})
    client = Client(server["url"], token=await harness.token("kim"), request_timeout=TIMEOUT)
    rec = Recorder(client)
    removed: list[Removed] = []
    client.on("removed", removed.append)
    await client.connect()
    await client.join("hall")
    posted = await asyncio.to_thread(api, server, "publish", {"room": "hall", "text": "notice",
                                                              "client_msg_id": "n-1"})
    again = await asyncio.to_thread(api, server, "publish", {"room": "hall", "text": "notice",
                                                             "client_msg_id": "n-1"})
    assert again["duplicate"] and again["id"] == posted["id"]
    await rec.wait_for(lambda: rec.ids("hall") == [posted["id"]], what="the API post")
    await asyncio.to_thread(api, server, "kick", {"room": "hall", "user_id": "kim"})
    await rec.wait_for(lambda: bool(removed), what="the kick")
    assert (removed[0].room, removed[0].reason, removed[0].by) == ("hall", "kicked", "api")
    assert "hall" not in client.rooms
    with pytest.raises(ChatError) as err:
        await client.send("hall", "still here?")
    assert err.value.code == "not_in_room"
    assert [m.text for m in rec.messages["hall"]] == ["notice"]
    await client.close()


async def test_a_rejoin_refused_after_a_ban_is_a_removed_event(harness: Harness) -> None:
    """Banned while away: the reconnect's rejoin (with since) is refused with forbidden, and
    the client drops the room with an error event and then removed (reason forbidden), as
    the JS client does; it was an error event alone."""
    server = await harness.server("memory", env={"API_KEY": API_KEY})
    reconnect = asyncio.Event()
    reconnect.set()

    async def url() -> str:
        await reconnect.wait()  # held while the test bans
        return str(server["url"])

    client = Client(url, token=await harness.token("bob"), request_timeout=TIMEOUT)
    rec = Recorder(client)
    removed: list[Removed] = []
    client.on("removed", removed.append)
    await client.connect()
    await client.join("hall")
    posted = await asyncio.to_thread(api, server, "publish", {"room": "hall", "text": "hi"})
    await rec.wait_for(lambda: rec.ids("hall") == [posted["id"]], what="the API post")
    reconnect.clear()
    assert client._ws is not None
    client._ws.transport.abort()  # the connection drops, without a close frame
    await rec.wait_for(lambda: bool(rec.of("disconnected")), what="the drop")
    await asyncio.to_thread(api, server, "ban", {"room": "hall", "user_id": "bob"})
    reconnect.set()
    await rec.wait_for(lambda: bool(removed), what="the refused rejoin")
    assert removed == [Removed("hall", "banned", None, None)]  # as a ban while connected
    [err] = rec.of("error")
    assert (err.code, err.details.get("reason")) == ("forbidden", "banned")
    assert [j.rejoin for j in rec.of("joined")] == [False]
    assert "hall" not in client.rooms
    await client.close()
