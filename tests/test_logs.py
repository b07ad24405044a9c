"""Logs: JSON lines with LOG_FORMAT=json, one open and one close line per connection,
and never a token or a message's text."""

from __future__ import annotations

import json
import logging
import sys
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


# --------------------------------------------------------------------------
# A flood of bad input: lines a client causes are few and short
# --------------------------------------------------------------------------

FLOOD = 200
UPGRADE = ("GET /ws{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           "Sec-WebSocket-Version: 13\r\n{headers}\r\n")


def exchange(port: int, request: str) -> bytes:
    """One request on its own TCP connection; the answer, read until the server closes."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request.encode("latin-1"))
        sock.shutdown(socket.SHUT_WR)  # a refused upgrade is kept alive: end it ourselves
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_flood_of_bad_requests_writes_few_short_lines() -> None:
    """Each malformed request (gunicorn's "Invalid request from ...") and each refused
    upgrade (a foreign Origin, a bad token) was one line, the client's text in it
    unbounded but for the header limit (8 KB): a flood of them wrote as fast as it came.
    Now each kind is written a burst of lines at most, then one every few seconds
    saying how many were left out, each line cut short."""
    from wschat.logs import CLIENT_LINES_BURST, MAX_CLIENT_TEXT

    kinds = {
        "Invalid request from": "GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
                                + "q" * 8000 + "\r\n\r\n",
        "upgrade refused (403)": UPGRADE.format(
            query="", headers="Origin: https://" + "e" * 8000 + ".example\r\n"),
        "upgrade refused (401)": UPGRADE.format(query="?token=" + "t" * 3000, headers=""),
    }
    with Server({"JWT_SECRET": SECRET, "ALLOWED_ORIGINS": "https://chat.example"}) as srv:
        for request in kinds.values():
            for _ in range(FLOOD):
                answer = exchange(srv.port, request)
                assert answer.startswith((b"HTTP/1.1 4", b"HTTP/1.1 5")), answer[:40]
        output = srv.output().splitlines()
        for kind, request in kinds.items():
            lines = [line for line in output if kind in line]
            # The burst, and what refilled while the flood ran (a line every few seconds).
            assert CLIENT_LINES_BURST <= len(lines) <= CLIENT_LINES_BURST + 5, (kind, len(lines))
            for line in lines:
                assert len(line) < MAX_CLIENT_TEXT + 200, (kind, len(line))

            def left_out_told(kind: str = kind, request: str = request) -> bool:
                exchange(srv.port, request)  # one more, until the bucket lets a line out
                return any(kind in line and "left out" in line
                           for line in srv.output().splitlines())

            wait_until(left_out_told, 6 * TIMEOUT, 0.2, f"a {kind} line telling the count")


def test_a_flood_that_stops_is_told_its_count_too() -> None:
    """The count of lines left out went out with the next line of their kind only: a
    flood that stopped never had its last ones counted (here: all but the burst). Once
    the kind may write again, the worker's timer writes the count by itself."""
    from wschat.logs import CLIENT_LINES_BURST, CLIENT_LINES_EVERY

    request = UPGRADE.format(query="", headers="Origin: https://elsewhere.example\r\n")
    with Server({"ALLOWED_ORIGINS": "https://chat.example"}) as srv:
        for _ in range(CLIENT_LINES_BURST + 30):
            assert exchange(srv.port, request).startswith(b"HTTP/1.1 403")
        ended = time.monotonic()

        def told() -> list[str]:
            return [line for line in srv.output().splitlines()
                    if "upgrade refused (403)" in line and "left out" in line]

        wait_until(lambda: bool(told()), CLIENT_LINES_EVERY + 2 * TIMEOUT, 0.2,
                   "the count of the lines the flood's end left out")
        assert time.monotonic() - ended < CLIENT_LINES_EVERY + 2 * TIMEOUT
        [line] = told()
        counted = int(line.rpartition("(")[2].split()[0])
        assert 0 < counted <= 30, line


def test_client_line_throttle_counts_what_it_left_out() -> None:
    """Per prefix: the burst, then one line per interval, the first after a gap saying how
    many were left out; other lines pass untouched; a long message is cut."""
    from wschat.logs import ClientLineThrottle

    now = [100.0]
    throttle = ClientLineThrottle(("bad thing",), burst=2, every=10.0, max_text=40,
                                  clock=lambda: now[0])

    def record(msg: str, *args: Any) -> logging.LogRecord:
        return logging.LogRecord("x", logging.WARNING, __file__, 1, msg, args, None)

    passed = [throttle.filter(record("bad thing %d", i)) for i in range(5)]
    assert passed == [True, True, False, False, False]
    assert all(throttle.filter(record("other %d", i)) for i in range(5))
    now[0] += 10.0
    line = record("bad thing %s", "x" * 100)
    assert throttle.filter(line)
    assert line.getMessage() == ("bad thing " + "x" * 30 + "... (70 characters cut)"
                                 " (3 more like this left out)")
    assert not throttle.filter(record("bad thing again"))
    now[0] += 1000.0  # refilled to the burst, no more
    assert [throttle.filter(record("bad thing")) for _ in range(3)] == [True, True, False]
    kept = record("bad thing %s", "short")
    now[0] += 10.0
    assert throttle.filter(kept) and kept.getMessage() == (
        "bad thing short (1 more like this left out)")
    now[0] += 10.0
    assert throttle.filter(record("bad thing %d", "not a number"))  # passed on, not raised


def test_client_line_throttle_flush_tells_a_count_no_line_told() -> None:
    """flush() writes `<prefix> ... (N more like this left out)` once the prefix may write
    again, at the level of the lines left out; nothing when none were, or too early."""
    from wschat.logs import ClientLineThrottle

    now = [0.0]
    throttle = ClientLineThrottle(("bad thing",), burst=1, every=10.0, clock=lambda: now[0])
    logger = logging.getLogger(f"test.throttle.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addFilter(throttle)
    lines: list[tuple[int, str]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append((record.levelno, record.getMessage()))

    logger.addHandler(Keep())
    throttle.flush(logger)
    for i in range(4):
        logger.warning("bad thing %d", i)
    assert lines == [(logging.WARNING, "bad thing 0")]
    now[0] += 5.0
    throttle.flush(logger)  # no line may go out yet
    assert len(lines) == 1
    now[0] += 5.0
    throttle.flush(logger)
    assert lines[1:] == [(logging.WARNING, "bad thing ... (3 more like this left out)")]
    now[0] += 100.0
    throttle.flush(logger)  # told already
    assert len(lines) == 2


def test_gunicorns_own_lines_are_redacted_in_text_format_too() -> None:
    """With LOG_FORMAT=text gunicorn's lines keep gunicorn's format, which never passed
    through wschat's formatters: a malformed request whose line carried ?token= was
    logged with the token ("Invalid HTTP request line: 'GET /ws?token=...'")."""
    marker = uuid.uuid4().hex
    with Server({"LOG_FORMAT": "text"}) as srv:
        answer = exchange(srv.port, f"GET /ws?token=tok-{marker}\x01 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400")
        wait_until(lambda: "Invalid request from" in srv.output(), message="gunicorn's line")
        output = srv.output()
    assert marker not in output
    assert "token=[redacted]" in output


def test_redact_filter_blanks_credentials_and_passes_everything() -> None:
    """The filter on gunicorn's logger rewrites a message with a credential, leaves the
    rest as they are (arguments unformatted), and never drops or breaks a record."""
    from wschat.logs import RedactFilter

    leaky = logging.LogRecord("gunicorn.error", logging.ERROR, __file__, 1,
                              "Error handling request %s %s", ("GET", "/ws?token=abc"), None)
    plain = logging.LogRecord("gunicorn.error", logging.INFO, __file__, 1, "Booting %s",
                              (42,), None)
    broken = logging.LogRecord("gunicorn.error", logging.INFO, __file__, 1, "%d", ("x",), None)
    assert all(RedactFilter().filter(r) for r in (leaky, plain, broken))
    assert leaky.getMessage() == "Error handling request GET /ws?token=[redacted]"
    assert (plain.msg, plain.args) == ("Booting %s", (42,))


def test_redact_filter_blanks_credentials_in_a_traceback_too() -> None:
    """gunicorn's "Error handling request" carries the exception's traceback, whose
    message may quote the request (an invalid header, a URL): it was written as raised,
    token and all, with LOG_FORMAT=text. The filter writes it redacted, as the handler's
    formatter would have written it."""
    from wschat.logs import RedactFilter

    try:
        raise ValueError("bad request line 'GET /ws?token=secret-abc HTTP/1.1'")
    except ValueError:
        record = logging.LogRecord("gunicorn.error", logging.ERROR, __file__, 1,
                                   "Error handling request %s", ("/ws",), sys.exc_info())
    assert RedactFilter().filter(record)
    line = logging.Formatter("%(message)s").format(record)
    assert "secret-abc" not in line
    assert "token=[redacted]" in line and "Traceback (most recent call last)" in line
    assert line.startswith("Error handling request /ws\n")
