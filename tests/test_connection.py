"""One connection's I/O over ``socket.socketpair()``: no server, no HTTP.

The server end is a real :class:`~wschat.connection.WebSocketConnection` (or the
echo endpoint's :class:`~wschat.connection.EchoConnection`) served by a real
:class:`~wschat.transport.Transport` and chat core on memory stores; the client
end is wsproto on the other socket (as websockets tests its sync layer).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.socket
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection, BytesMessage, CloseConnection, Message, Ping, Pong, Request, TextMessage,
)

from conftest import TIMEOUT
from wschat.admission import ConnectionBudget
from wschat.auth import Authenticator, Identity
from wschat.chat import Chat
from wschat.config import Settings
from wschat.connection import ConnState, EchoConnection, WebSocketConnection
from wschat.protocol import CloseCode
from wschat.ratelimit import MemoryRateLimiter
from wschat.stores.memory import create_memory_stores
from wschat.telemetry import NoMetrics
from wschat.transport import Transport


class Peer:
    """The client end: wsproto over the other socket of the pair."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[Any] = []
        self.parts: list[Any] = []

    def send(self, event: Any) -> None:
        self.sock.sendall(self.ws.send(event))

    def next_event(self, timeout: float = TIMEOUT) -> Any:
        """The next whole event from the server (messages reassembled)."""
        with gevent.Timeout(timeout, AssertionError("no event from the server")):
            while True:
                while self.pending:
                    event = self.pending.pop(0)
                    if isinstance(event, Message):
                        self.parts.append(event.data)
                        if not event.message_finished:
                            continue
                        data = type(event.data)().join(self.parts)  # type: ignore[call-arg]
                        self.parts = []
                        return type(event)(data=data)
                    return event
                data = self.sock.recv(65536)
                if not data:
                    raise AssertionError("the server closed the socket")
                self.ws.receive_data(data)
                self.pending.extend(self.ws.events())

    def next_text(self) -> dict[str, Any]:
        event = self.next_event()
        assert isinstance(event, TextMessage), event
        return dict(json.loads(event.data))


def handshake(server_sock: Any, client_sock: Any) -> tuple[WSConnection, Peer]:
    """RFC 6455 handshake between the two ends, done before the connection takes over
    (flask-sock's part in the server)."""
    server = WSConnection(ConnectionType.SERVER)
    peer = Peer(client_sock)
    server.receive_data(peer.ws.send(Request(host="localhost", target="/ws")))
    assert any(isinstance(e, Request) for e in server.events())
    peer.ws.receive_data(server.send(AcceptConnection()))
    assert any(isinstance(e, AcceptConnection) for e in peer.ws.events())
    return server, peer


@pytest.fixture
def transport() -> Iterator[Transport]:
    settings = Settings.from_env({"MAX_OUTBOUND_BYTES": "65536", "HEARTBEAT_INTERVAL": "5"})
    chat = Chat(settings, create_memory_stores(settings.history_size, settings.room_ttl),
                Authenticator(settings),
                MemoryRateLimiter(settings.rate_limit, settings.rate_limit_burst))
    transport = Transport(chat, NoMetrics(), ConnectionBudget(10))
    yield transport
    for conn in list(transport.connections):
        conn.abort("test over")


def serve(transport: Transport, kind: type[WebSocketConnection] = WebSocketConnection,
          user: str = "u-ada", pending: bytes = b"") -> tuple[WebSocketConnection, Peer]:
    server_sock, client_sock = gevent.socket.socketpair()
    wsconn, peer = handshake(server_sock, client_sock)
    conn = kind(transport, server_sock, transport.new_conn_id(),
                Identity(user, user.removeprefix("u-"), None), True, "127.0.0.1", pending)
    transport.connections.add(conn)
    conn.start()
    return conn, peer


def test_chat_connection_is_welcomed_and_answers_commands(transport: Transport) -> None:
    """The chat connection greets its user and hands text frames to the chat core."""
    conn, peer = serve(transport)
    welcome = peer.next_text()
    assert welcome["type"] == "welcome" and welcome["user_id"] == "u-ada"
    peer.send(TextMessage(data=json.dumps({"type": "ping", "id": "p1"})))
    assert peer.next_text() == {"type": "pong", "id": "p1"}
    peer.send(BytesMessage(data=b"\x00\x01"))
    closed = peer.next_event()
    assert isinstance(closed, CloseConnection) and closed.code == CloseCode.UNSUPPORTED_DATA


def test_echo_connection_echoes_text_and_binary_without_the_chat(transport: Transport) -> None:
    """The /echo variant: no welcome, every message (fragmented too) comes back as sent."""
    conn, peer = serve(transport, EchoConnection)
    peer.send(TextMessage(data="héllo", message_finished=False))
    peer.send(TextMessage(data=" wörld", message_finished=True))
    assert peer.next_event() == TextMessage(data="héllo wörld")
    peer.send(BytesMessage(data=b"\x00\xff"))
    assert peer.next_event() == BytesMessage(data=b"\x00\xff")
    peer.send(Ping(payload=b"hi"))
    assert peer.next_event() == Pong(payload=b"hi")
    assert not transport.chat.hub.users, "an echo connection never reaches the chat"


def test_peer_close_is_answered_and_the_connection_forgotten(transport: Transport) -> None:
    conn, peer = serve(transport, EchoConnection)
    peer.send(CloseConnection(code=1000, reason="bye"))
    answer = peer.next_event()
    assert isinstance(answer, CloseConnection) and answer.code == 1000
    with gevent.Timeout(TIMEOUT):
        while conn in transport.connections:
            gevent.sleep(0.01)
    assert conn.state is ConnState.CLOSED and conn.close_code == 1000


def test_heartbeat_pings_and_closes_a_silent_peer(transport: Transport) -> None:
    """The transport's heartbeat writes the shared ping frame when a connection's turn
    comes, and closes one silent for two intervals (4100)."""
    conn, peer = serve(transport, EchoConnection)
    transport.heartbeat(conn.next_ping)
    assert isinstance(peer.next_event(), Ping)
    transport.heartbeat(conn.last_seen + 2 * transport.heartbeat_interval + 1)
    closed = peer.next_event()
    assert isinstance(closed, CloseConnection) and closed.code == CloseCode.HEARTBEAT_TIMEOUT


def test_backlog_over_the_limit_drops_a_slow_consumer(transport: Transport) -> None:
    """A client that reads nothing: once more than MAX_OUTBOUND_BYTES wait for it, the
    backlog goes and the connection closes with 4101 (the close frame follows a whole
    frame, so the client can still read it)."""
    conn, peer = serve(transport, EchoConnection)
    frame = b"\x81\x7e" + (60000).to_bytes(2, "big") + b"x" * 60000  # a whole text frame
    with gevent.Timeout(TIMEOUT):
        while conn.state is ConnState.OPEN:
            conn.send_frame(frame)
            gevent.sleep(0)
    assert conn.close_code == CloseCode.SLOW_CONSUMER
    while True:  # what the kernel took before the drop, then the close frame
        event = peer.next_event()
        if isinstance(event, CloseConnection):
            break
        assert event == TextMessage(data="x" * 60000)
    assert event.code == CloseCode.SLOW_CONSUMER
