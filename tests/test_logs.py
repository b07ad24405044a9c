"""Logs: JSON lines with LOG_FORMAT=json, one open and one close line per connection,
and never a token or a message's text."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import TIMEOUT, Client, Server, wait_until
from wschat.logs import JsonFormatter, TextFormatter, redact

SECRET = "logs-test-secret-0123456789abcdef0123"


def token(sub: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "name": "Logged", "exp": now + 3600, "iat": now}, SECRET,
                      algorithm="HS256")


def json_lines(srv: Server) -> list[dict[str, Any]]:
    """Every line the server wrote, each parsed as one JSON object (fails on any other)."""
    entries = []
    for number, line in enumerate(srv.output().splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {line!r}") from None
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


def connection_line(srv: Server, event: str, user: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((e for e in json_lines(srv)
                     if e.get("event") == event and e.get("user") == user), None)

    return wait_until(find, message=f"the {event} line of {user}")


@pytest.fixture(scope="module")
def json_server() -> Iterator[Server]:
    with Server({"LOG_FORMAT": "json", "LOG_LEVEL": "info", "JWT_SECRET": SECRET}) as srv:
        yield srv


def test_every_line_is_json_including_gunicorns(json_server: Server) -> None:
    """With LOG_FORMAT=json every line, gunicorn's own too, is a JSON object with
    ts, level, logger, pid and msg."""
    with Client(json_server.url) as c:
        c.request({"type": "ping"}, "pong")
    entries = json_lines(json_server)
    assert any(e["logger"].startswith("gunicorn") for e in entries)
    assert any(e["logger"].startswith("wschat") for e in entries)
    for entry in entries:
        assert {"ts", "level", "logger", "pid", "msg"} <= entry.keys(), entry
        assert entry["ts"].endswith("Z") and entry["level"] in {"debug", "info", "warning",
                                                                "error", "critical"}


def test_open_and_close_lines_carry_user_reason_and_duration(json_server: Server) -> None:
    """A connection logs one open line and one close line with user, code, reason and
    a duration no longer than the client saw; a server-side close says why."""
    sub = f"log-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    with Client(json_server.url, "token=" + token(sub)) as c:
        c.request({"type": "ping"}, "pong")
    held = time.monotonic() - started
    opened = connection_line(json_server, "open", sub)
    closed = connection_line(json_server, "close", sub)
    assert opened["conn"] == closed["conn"]
    assert closed["code"] == 1000 and closed["reason"]
    assert 0 <= closed["duration_s"] <= held + 0.5
    entries = json_lines(json_server)
    assert sum(1 for e in entries if e.get("conn") == opened["conn"]) == 2

    with Client(json_server.url) as guest:
        guest.ws.send(b"\x00binary")  # the protocol is text: the server closes with 1003
        with pytest.raises(ConnectionClosed):
            while True:
                guest.ws.recv(TIMEOUT)
    closed = connection_line(json_server, "close", guest.user_id)
    assert closed["code"] == 1003 and "binary" in closed["reason"]


def test_tokens_and_message_text_never_logged(json_server: Server) -> None:
    """Neither a token (valid, invalid, in the query or a header, or in an auth
    message) nor the text of a message or DM appears anywhere in the output."""
    marker = uuid.uuid4().hex
    good = token(f"secretive-{marker[:6]}")
    bad = f"not.a.valid-token-{marker}"
    texts = [f"room text {marker}", f"dm text {marker}"]
    with Client(json_server.url, "token=" + good) as a, Client(
            json_server.url, headers={"Authorization": "Bearer " + good}) as b:
        room = f"room-{marker[:8]}"
        a.join(room)
        b.join(room)
        a.say(room, texts[0])
        b.send({"type": "dm", "to": a.user_id, "text": texts[1]})
        a.expect("dm")
        a.send({"type": "auth", "token": bad})
        assert a.expect("error")["code"] == "auth_failed"
    with pytest.raises(InvalidStatus):
        Client(json_server.url, "token=" + bad)
    connection_line(json_server, "close", a.user_id)
    output = json_server.output()
    for secret in (good, bad, *texts, good.split(".")[2]):
        assert secret not in output, f"{secret[:20]}... was logged"


@pytest.mark.parametrize("env, says, status", [
    ({"PORT": "abc"}, "PORT: expected a number", 1),  # read by the master
    ({"JWT_PUBLIC_KEY": "/nonexistent.pem"}, "JWT_PUBLIC_KEY: neither a PEM value", 3),  # worker
    ({"REDIS_URL": "", "GUNICORN_CMD_ARGS": "--workers 2"}, "2 workers need REDIS_URL", 1),
], ids=["master", "worker", "workers"])
def test_configuration_error_is_a_json_line(env: dict[str, str], says: str, status: int
                                            ) -> None:
    """With LOG_FORMAT=json, the line saying why the server refused to start is a JSON
    log line like every other (level error), and the exit status is kept."""
    srv = Server({"LOG_FORMAT": "json", **env}).start(wait=False)
    try:
        assert srv.proc is not None
        assert srv.proc.wait(6 * TIMEOUT) == status, srv.output()
    finally:
        srv.kill()
    [error] = [e for e in json_lines(srv) if "configuration error" in e["msg"]]
    assert says in error["msg"] and error["level"] == "error", error
    assert error["logger"] == "wschat.config" and {"ts", "pid"} <= error.keys(), error


def test_configuration_error_is_plain_when_log_format_is_not_json() -> None:
    """A bad LOG_FORMAT cannot choose the error's format: the line stays plain text."""
    srv = Server({"LOG_FORMAT": "xml"}).start(wait=False)
    try:
        assert srv.proc is not None
        assert srv.proc.wait(6 * TIMEOUT) == 1, srv.output()
    finally:
        srv.kill()
    assert srv.output().splitlines() == [
        "wschat: configuration error: LOG_FORMAT: expected one of text, json, got 'xml'"]


def test_redact_blanks_credentials_in_any_line() -> None:
    """Query-string tokens and Bearer credentials are blanked, other text kept."""
    line = 'GET /ws?username=bo&token=abc.def-ghi&x=1 "Authorization: Bearer eyJ0.eyJ1.sig"'
    assert redact(line) == ('GET /ws?username=bo&token=[redacted]&x=1 '
                            '"Authorization: Bearer [redacted]"')
    assert redact("nothing secret here") == "nothing secret here"


def test_formatters_keep_extra_fields_and_redact() -> None:
    """The JSON formatter turns extra fields into keys; both formatters redact."""
    record = logging.LogRecord("wschat.test", logging.INFO, __file__, 1,
                               "upgrade %s", ("/ws?token=leaky",), None)
    record.user = "u-1"
    record.duration_s = 1.5
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "upgrade /ws?token=[redacted]"
    assert (entry["user"], entry["duration_s"], entry["level"]) == ("u-1", 1.5, "info")
    assert "leaky" not in TextFormatter().format(record)


def test_text_format_keeps_one_event_on_one_line() -> None:
    """A line break in a logged value (a client's close reason) cannot forge a line."""
    record = logging.LogRecord("wschat.test", logging.INFO, __file__, 1, "close reason=%s",
                               ("bye\n2026-01-01 INFO forged",), None)
    assert "\n" not in TextFormatter().format(record)
