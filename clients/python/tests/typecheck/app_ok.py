"""An app's handlers, as ``test_typing.py`` type-checks them (``mypy --strict``): no error.

Every event with a handler of its payload (a lambda's parameter is that payload: each lambda
reads its attributes), a coroutine handler, wider handlers, a name in a variable, and
``SyncClient`` (its handlers and its options).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import assert_type

from wschat_client import (
    Backoff,
    ChatError,
    Client,
    DirectMessage,
    EventName,
    Message,
    Payload,
    SyncClient,
    Welcome,
)


def on_message(message: Message) -> None:
    print(message.room, message.from_, message.text)


async def on_dm(dm: DirectMessage) -> None:  # a coroutine handler
    print(dm.from_, dm.to, dm.text)


def on_welcome(welcome: Welcome) -> None:
    print(welcome.user_id, welcome.heartbeat_interval)


def on_sent(sent: Message | DirectMessage) -> None:
    print(sent.id, sent.client_msg_id)


def on_error(error: ChatError) -> None:
    print(error.code)


def on_any(payload: Payload) -> str:  # a wider parameter takes every event; any result
    return repr(payload)


def on_object(payload: object) -> None:
    print(payload)


def handlers(chat: Client) -> None:
    remove = chat.on("message", on_message)
    assert_type(remove, Callable[[], None])
    remove()
    chat.on("message", lambda m: print(m.room, m.from_, m.text, m.timestamp + 1))
    chat.on("dm", on_dm)
    chat.on("dm", lambda d: d.to.upper())
    chat.on("state", lambda s: s.new.value)
    chat.on("connected", on_welcome)
    chat.on("user_changed", lambda w: w.username.upper())
    chat.on("disconnected", lambda d: d.code + 1 if d.reconnect_in is None else d.reconnect_in)
    chat.on("presence", lambda p: p.user_id.upper())
    chat.on("typing", lambda t: not t.status)
    chat.on("joined", lambda j: [user.username for user in j.users])
    chat.on("recovery_failed", lambda r: r.since + r.last_id)
    chat.on("room_state", lambda r: r.room.upper())
    chat.on("removed", lambda r: r.reason.upper())
    chat.on("muted", lambda m: m.until)
    chat.on("unmuted", lambda u: u.room)
    chat.on("ack", on_sent)
    chat.on("ack", lambda a: a.text.upper())
    chat.on("error", on_error)
    chat.on("error", lambda e: e.code.upper())
    chat.on("message", on_any)
    chat.on("error", on_object)


def by_name(chat: Client, names: list[EventName]) -> None:
    for name in names:  # a name held in a variable: a handler of every payload
        chat.on(name, on_any)


def sync_client() -> SyncClient:  # the options of Client
    return SyncClient("ws://localhost:8080/ws", username="alice", send_timeout=None,
                      backoff=Backoff(max_delay=5.0), websocket_options={"max_queue": 64})


def sync_handlers(chat: SyncClient) -> None:
    remove = chat.on("message", on_message)
    remove()
    chat.on("dm", lambda d: print(d.to, d.text))
    chat.on("ack", on_any)
