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
