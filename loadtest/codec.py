"""Wire adapters: how the generator's JSON commands and events travel to each target.

wschat and the plain peers carry one JSON object per text frame. The socket.io peer
carries the same objects as the payload of the socket.io event ``msg`` over the
engine.io WebSocket transport, so the adapter adds and strips that envelope and
answers engine.io's own open/ping packets.
"""

from __future__ import annotations

from typing import Callable
from urllib.parse import quote


class PlainCodec:
    """One JSON object per WebSocket text frame (wschat, websockets, node-ws, bun)."""

    name = "plain"

    def url(self, host: str, port: int, username: str) -> str:
        return f"ws://{host}:{port}/ws?username={quote(username)}"

    @staticmethod
    def encode(obj: bytes) -> bytes:
        return obj

    @staticmethod
    def decode(payload: bytes, reply: Callable[[bytes], None]) -> bytes | None:
        return payload


class SocketIOCodec:
    """socket.io v5 / engine.io v4 over a WebSocket, events named ``msg``."""

    name = "socketio"
    _PREFIX = b'42["msg",'

    def url(self, host: str, port: int, username: str) -> str:
        return (f"ws://{host}:{port}/socket.io/?EIO=4&transport=websocket"
                f"&username={quote(username)}")

    @classmethod
    def encode(cls, obj: bytes) -> bytes:
        return cls._PREFIX + obj + b"]"

    @classmethod
    def decode(cls, payload: bytes, reply: Callable[[bytes], None]) -> bytes | None:
        if payload.startswith(cls._PREFIX):
            return payload[len(cls._PREFIX):-1]
        if payload == b"2":  # engine.io ping from the server
            reply(b"3")
        elif payload[:1] == b"0":  # engine.io open: connect to the default namespace
            reply(b"40")
        return None


def make_codec(name: str) -> PlainCodec | SocketIOCodec:
    return SocketIOCodec() if name == "socketio" else PlainCodec()
