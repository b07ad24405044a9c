"""wschat-client: an asyncio client for the wschat server that never loses a message.

::

    async with Client("ws://localhost:8080/ws", get_token=fetch_token) as chat:
        chat.on("message", lambda m: print(m.room, m.from_, m.text))
        await chat.join("general")
        await chat.send("general", "Hello!")   # resolves with the stored message

or, as a stream: ``async for event in chat.events(): ...`` (:class:`Event`).

See :class:`Client` for the options, :mod:`wschat_client.events` for the events,
:mod:`wschat_client.errors` for the exceptions and :class:`SyncClient` for use
without asyncio.
"""

from .backoff import Backoff
from .client import Client, ClientOptions
from .errors import ChatError, ClientClosed, Disconnected, OutboxFull, RequestTimeout
from .events import (ConnectionState, DirectMessage, Disconnect, Event, EventName, HistoryPage,
                     Joined, Message, Muted, Payload, Presence, RecoveryFailed, Removed,
                     RoomInfo, RoomPosition, RoomState, RoomStateChange, StateChange,
                     TypingEvent, Unmuted, User, Welcome)
from .outbox import FileOutboxStore, OutboxStore, PendingSend
from .stream import Events, SyncEvents
from .sync import SyncClient

__version__ = "0.1.0"

__all__ = [
    "Backoff", "ChatError", "Client", "ClientClosed", "ClientOptions", "ConnectionState", "DirectMessage",
    "Disconnect", "Disconnected", "Event", "EventName", "Events", "FileOutboxStore",
    "HistoryPage", "Joined", "Message", "Muted", "OutboxFull",
    "OutboxStore", "Payload", "PendingSend", "Presence", "RecoveryFailed", "Removed",
    "RequestTimeout", "RoomInfo", "RoomPosition", "RoomState", "RoomStateChange", "StateChange",
    "SyncClient", "SyncEvents", "TypingEvent", "Unmuted", "User", "Welcome", "__version__",
]
