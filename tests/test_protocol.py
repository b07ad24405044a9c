"""The wire protocol without sockets: text in, commands out; events in, bytes out."""

from __future__ import annotations

import json

import pytest

from wschat.protocol import (
    PING_FRAME, Auth, ErrorCode, History, Join, Leave, Limits, ListUsers, Ping, ProtocolError,
    SendDm, SendMessage, Typing, draft_dm, draft_message, encode_error,
    encode_history, message_id_of, parse_command, stored_id_of, text_frame, valid_username,
)


@pytest.mark.parametrize("raw, command", [
    ('{"type":"join","room":"general"}', Join("general")),
    ('{"type":"join","room":"a.b:c-d_1","since":0,"id":"x"}', Join("a.b:c-d_1", 0, "x")),
    ('{"type":"join","room":"r","since":4,"epoch":"Zm9vYmFy"}', Join("r", 4, None, "Zm9vYmFy")),
    ('{"type":"leave","room":"general","id":3}', Leave("general", 3)),
    ('{"type":"message","room":"r","text":"hi","client_msg_id":"c"}',
     SendMessage("r", "hi", "c")),
    ('{"type":"dm","to":"u1","text":"yo"}', SendDm("u1", "yo")),
    ('{"type":"typing","room":"r","status":false}', Typing("r", False)),
    ('{"type":"list_users","room":"r"}', ListUsers("r")),
    ('{"type":"history","room":"r"}', History("r", 50)),
    ('{"type":"history","room":"r","limit":500,"before":9}', History("r", 100, 9)),
    ('{"type":"ping"}', Ping()),
    ('{"type":"auth","token":"abc"}', Auth("abc")),
])
def test_parse_valid_commands(raw: str, command: object) -> None:
    """Each seed command parses into its typed form (history limit clamped)."""
    assert parse_command(raw) == command


@pytest.mark.parametrize("raw, code, rid", [
    ("{", ErrorCode.INVALID_JSON, None),
    ('"just a string"', ErrorCode.INVALID_MESSAGE, None),
    ('{"type":"nope","id":5}', ErrorCode.UNKNOWN_TYPE, 5),
    ('{"room":"r"}', ErrorCode.INVALID_MESSAGE, None),
    ('{"type":"join","room":"has space","id":"q"}', ErrorCode.INVALID_ROOM, "q"),
    ('{"type":"join","room":"-starts-with-dash"}', ErrorCode.INVALID_ROOM, None),
    ('{"type":"join","room":"' + "a" * 65 + '"}', ErrorCode.INVALID_ROOM, None),
    # "$" would match before the newline: a look-alike no PRIVATE_ROOMS pattern covers
    ('{"type":"join","room":"team-red\\n"}', ErrorCode.INVALID_ROOM, None),
    ('{"type":"join","room":"r","since":-1}', ErrorCode.INVALID_MESSAGE, None),
    ('{"type":"join","room":"r","since":1,"epoch":7,"id":2}', ErrorCode.INVALID_MESSAGE, 2),
    ('{"type":"join","room":"r","since":1,"epoch":""}', ErrorCode.INVALID_MESSAGE, None),
    ('{"type":"join","room":"r","epoch":"' + "e" * 129 + '"}', ErrorCode.INVALID_MESSAGE, None),
    ('{"type":"message","room":"r"}', ErrorCode.INVALID_MESSAGE, None),
    ('{"type":"message","room":"r","text":""}', ErrorCode.INVALID_MESSAGE, None),
    ('{"type":"message","room":"r","text":"x","client_msg_id":""}',
     ErrorCode.INVALID_MESSAGE, None),
    ('{"type":"typing","room":"r","status":1}', ErrorCode.INVALID_MESSAGE, None),
    ('{"type":"history","room":"r","limit":0}', ErrorCode.INVALID_MESSAGE, None),
    ('{"type":"history","room":"r","limit":1.5}', ErrorCode.INVALID_MESSAGE, None),
    ('{"type":"dm","to":"","text":"x"}', ErrorCode.INVALID_MESSAGE, None),
    # Control characters in a client's ids: PostgreSQL refuses NUL in text and SQLite's
    # JSON functions cut a string at it, which broke retries and failed whole batches.
    ('{"type":"message","room":"r","text":"x","client_msg_id":"a\\u0000b","id":1}',
     ErrorCode.INVALID_MESSAGE, 1),
    ('{"type":"message","room":"r","text":"x","client_msg_id":"a\\u001fb"}',
     ErrorCode.INVALID_MESSAGE, None),
    ('{"type":"dm","to":"u","text":"x","client_msg_id":"\\u007f"}',
     ErrorCode.INVALID_MESSAGE, None),
    ('{"type":"dm","to":"a\\u0000b","text":"x"}', ErrorCode.INVALID_MESSAGE, None),
    ('{"type":"ping","id":true}', ErrorCode.INVALID_MESSAGE, None),
    ('{"type":"ping","id":"' + "i" * 65 + '"}', ErrorCode.INVALID_MESSAGE, None),
    ('{"type":"auth","token":""}', ErrorCode.INVALID_MESSAGE, None),
])
def test_parse_rejects_bad_input(raw: str, code: ErrorCode, rid: object) -> None:
    """Malformed frames raise ProtocolError with a stable code and the request id."""
    with pytest.raises(ProtocolError) as info:
        parse_command(raw)
    assert info.value.code is code
    assert info.value.request_id == rid


def test_text_limit_is_message_too_large() -> None:
    """Text over the limit is message_too_large."""
    with pytest.raises(ProtocolError) as info:
        parse_command('{"type":"message","room":"r","text":"abcdef"}', Limits(max_text_chars=5))
    assert info.value.code is ErrorCode.MESSAGE_TOO_LARGE


def test_error_event_echoes_id_and_extra() -> None:
    """error events carry code, message, the request id and extra fields."""
    event = json.loads(encode_error(ErrorCode.RATE_LIMITED, "slow down", "r1",
                                    retry_after_ms=120))
    assert event == {"type": "error", "code": "rate_limited", "message": "slow down",
                     "id": "r1", "retry_after_ms": 120}


def test_draft_splices_id_into_valid_json() -> None:
    """A message draft becomes the exact event JSON once the store gives it an id."""
    draft = draft_message("r", "al\"ice", "u1", "hi \u2603", 1700000000000, "c1")
    event = draft.with_id(42)
    assert json.loads(event) == {"type": "message", "id": 42, "room": "r", "from": 'al"ice',
                                 "user_id": "u1", "text": "hi \u2603",
                                 "timestamp": 1700000000000, "client_msg_id": "c1"}
    assert message_id_of(event) == 42 == stored_id_of(event)
    dm = draft_dm("u2", "alice", "u1", "psst", 5, None).with_id(7)
    assert json.loads(dm)["to"] == "u2" and stored_id_of(dm) == 7
    assert message_id_of(dm) is None


def test_history_embeds_stored_json() -> None:
    """history replies embed stored message JSON without re-encoding it."""
    stored = draft_message("r", "a", "u", "x", 1, None).with_id(1)
    reply = json.loads(encode_history("r", [stored], "h"))
    assert reply["messages"] == [json.loads(stored)] and reply["id"] == "h"


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 100_000])
def test_text_frame_lengths(size: int) -> None:
    """text_frame uses the RFC 6455 7-, 16- and 64-bit length forms, unmasked."""
    payload = b"x" * size
    frame = text_frame(payload)
    assert frame[0] == 0x81 and not frame[1] & 0x80
    if size < 126:
        assert frame[1] == size and frame[2:] == payload
    elif size < 65536:
        assert frame[1] == 126 and int.from_bytes(frame[2:4], "big") == size
    else:
        assert frame[1] == 127 and int.from_bytes(frame[2:10], "big") == size
    assert frame.endswith(payload)


def test_control_frames() -> None:
    """The shared ping frame is a well-formed control frame."""
    assert PING_FRAME == b"\x89\x00"


@pytest.mark.parametrize("name, ok", [
    ("alice", True), ("Ana María", True), ("a", True), ("x" * 32, True), ("x" * 33, False),
    (" alice", False), ("alice ", False), ("", False), ("<script>", False), ("a\nb", False),
    ("alice\n", False),
])
def test_username_rules(name: str, ok: bool) -> None:
    """Usernames: 1-32 letters/digits/_ . - with inner spaces."""
    assert valid_username(name) is ok
