"""An app's handlers that do not fit their events: ``test_typing.py`` expects ``mypy
--strict`` to report an error on each line whose comment starts with "error", on no other."""

from __future__ import annotations

from wschat_client import Client, DirectMessage, Message, Presence, SyncClient


def on_message(message: Message) -> None:
    print(message.text)


async def on_dm(dm: DirectMessage) -> None:
    print(dm.to)


def handlers(chat: Client, sync: SyncClient, name: str) -> None:
    chat.on("message", on_message)  # fits: no error
    chat.on("message", on_dm)  # error: a DM handler for room messages
    chat.on("message", lambda m: m.to)  # error: a Message has no "to"
    chat.on("presence", lambda p: p.text)  # error: a Presence has no "text"
    chat.on("ack", on_message)  # error: an ack may be a DirectMessage
    chat.on("error", lambda e: e.close_code)  # error: only ClientClosed has it
    chat.on("joined", on_presence)  # error
    chat.on("mesage", on_message)  # error: no such event
    chat.on(name, on_message)  # error: any str, not an EventName
    sync.on("message", on_dm)  # error: SyncClient.on is typed as Client.on
    sync.on("dm", lambda d: d.room)  # error: a DirectMessage has no "room"


def sync_clients() -> list[SyncClient]:
    return [SyncClient("ws://localhost:8080/ws", usernme="alice"),  # error: no such option
            SyncClient("ws://localhost:8080/ws", max_outbox="10")]  # error: not an int


def on_presence(presence: Presence) -> None:
    print(presence.user)
