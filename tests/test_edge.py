"""The hardened edge end to end: JWT authentication, admission and RFC 6455 frame handling.

Real gunicorn servers, real keys and tokens (including forged ones), real
sockets: the ``websockets`` client where a well-behaved client suffices, raw
TCP where the test must send what no library would (unmasked frames, invalid
UTF-8, nothing at all).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import SCALE, TIMEOUT, Client, Server, redis_url_or_skip, wait_until
from jwt_support import (
    JwksServer, claims, forge_hs256, forge_none, jwk, public_pem, rsa_key, sign, tamper,
)

AUDIENCE = "wschat-edge"
ISSUER = "https://id.example.test/"
ORIGIN = "https://chat.example.com"
AUTH_TIMEOUT = 1.0 * SCALE
KEY = rsa_key()
OTHER_KEY = rsa_key()


def good_claims(sub: str = "alice", ttl: float = 3600, **extra: Any) -> dict[str, Any]:
    return claims(sub, sub.title(), ttl, aud=AUDIENCE, iss=ISSUER, **extra)


def good_token(sub: str = "alice", ttl: float = 3600) -> str:
    return sign(good_claims(sub, ttl), KEY, "RS256")


# Each forged or wrong token, and the error code an `auth` message gets for it.
BAD_TOKENS: dict[str, tuple[Callable[[], str], str]] = {
    "alg_none": (lambda: forge_none(good_claims()), "auth_failed"),
    "hs256_with_rsa_public_key": (
        lambda: forge_hs256(good_claims(), public_pem(KEY).encode()), "auth_failed"),
    "expired": (lambda: sign(good_claims(ttl=-30), KEY, "RS256"), "token_expired"),
    "not_yet_valid": (lambda: sign(good_claims(nbf=int(time.time()) + 600), KEY, "RS256"),
                      "auth_failed"),
    "wrong_audience": (lambda: sign({**good_claims(), "aud": "other-app"}, KEY, "RS256"),
                       "auth_failed"),
    "wrong_issuer": (lambda: sign({**good_claims(), "iss": "https://evil.example/"}, KEY,
                                  "RS256"), "auth_failed"),
    "tampered_payload": (lambda: tamper(good_token("mallory"), sub="admin"), "auth_failed"),
    "signed_by_another_key": (lambda: sign(good_claims(), OTHER_KEY, "RS256"), "auth_failed"),
    "no_exp": (lambda: sign({k: v for k, v in good_claims().items() if k != "exp"}, KEY,
                            "RS256"), "auth_failed"),
    "exp_beyond_any_date": (lambda: sign({**good_claims(), "exp": 10**400}, KEY, "RS256"),
                            "auth_failed"),
    # A lone surrogate (JSON "\ud800"): no UTF-8, so no event, key or log line can hold it.
    "sub_lone_surrogate": (lambda: sign(good_claims("\ud800x"), KEY, "RS256"),
                           "auth_failed"),
}


def close_code_of(client: Client, timeout: float = TIMEOUT) -> int | None:
    """Read until the server closes; its close code."""
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed):
        while time.monotonic() < deadline:
            client.recv(max(0.01, deadline - time.monotonic()))
    return client.ws.close_code


# -- raw WebSocket over TCP ------------------------------------------------------------

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def encode_frame(opcode: int, payload: bytes = b"", fin: bool = True, mask: bool = True,
                 rsv: int = 0, length: int | None = None) -> bytes:
    """One frame as a client would send it (masked unless told otherwise)."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


class RawSocket:
    """A TCP connection speaking hand-made HTTP and WebSocket frames."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT,
                                             source_address=(source, 0))
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_response(self) -> tuple[int, dict[str, str], bytes]:
        """The HTTP response head: status, headers (lower-case names), and what follows."""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed during the response: {self.buffer!r}")
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = dict((k.strip().lower(), v.strip()) for k, v in
                       (line.split(":", 1) for line in lines[1:] if ":" in line))
        return int(lines[0].split()[1]), headers, self.buffer

    def upgrade(self, path: str = "/ws", extra: str = "") -> tuple[int, dict[str, str]]:
        key = base64.b64encode(os.urandom(16)).decode()
        self.send((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                   f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode())
        status, headers, _ = self.read_response()
        return status, headers

    def _fill(self, n: int) -> None:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk

    def _take(self, n: int) -> bytes:
        self._fill(n)
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def read_frame(self) -> tuple[bool, int, bytes]:
        """(fin, opcode, payload) of the next server frame (server frames are unmasked)."""
        b0, b1 = self._take(2)
        assert not b1 & 0x80, "a server frame must not be masked"
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._take(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._take(8))
        return bool(b0 & 0x80), b0 & 0x0F, self._take(n)

    def read_until_close(self) -> tuple[int | None, bytes]:
        """Skip data frames until the server's close frame: (code, reason)."""
        while True:
            _, opcode, payload = self.read_frame()
            if opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                return code, payload[2:]

    def wait_eof(self, timeout: float = TIMEOUT) -> float:
        """Seconds until the server closes the TCP connection (data received is discarded)."""
        started = time.monotonic()
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return time.monotonic() - started

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(server: Server) -> Iterator[Callable[[], RawSocket]]:
    sockets: list[RawSocket] = []

    def make() -> RawSocket:
        s = RawSocket(server.port)
        sockets.append(s)
        return s

    yield make
    for s in sockets:
        s.close()


def opened(raw: Callable[[], RawSocket]) -> RawSocket:
    """A raw socket past the upgrade, with the welcome read."""
    s = raw()
    status, _ = s.upgrade()
    assert status == 101
    fin, opcode, payload = s.read_frame()
    assert opcode == OP_TEXT and b'"welcome"' in payload
    return s


# -- servers ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def auth_server() -> Iterator[Server]:
    """AUTH_REQUIRED with an RS256 public key, audience, issuer, origin allow-list, no leeway."""
    with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as pem:
        pem.write(public_pem(KEY))
    env = {"JWT_PUBLIC_KEY": pem.name, "JWT_AUDIENCE": AUDIENCE, "JWT_ISSUER": ISSUER,
           "JWT_LEEWAY": "0", "AUTH_REQUIRED": "true", "AUTH_TIMEOUT": str(AUTH_TIMEOUT),
           "ALLOWED_ORIGINS": f"{ORIGIN}, https://Other.Example.com/",
           "TYPING_TIMEOUT": "0.4"}  # the timer then runs every 0.1 s
    try:
        with Server(env) as srv:
            yield srv
    finally:
        os.unlink(pem.name)


@pytest.fixture(scope="module")
def jwks() -> Iterator[JwksServer]:
    with JwksServer() as server:
        yield server


@pytest.fixture(scope="module")
def jwks_server(jwks: JwksServer) -> Iterator[Server]:
    """Keys from a JWKS endpoint (served by this test process)."""
    url = jwks.serve_keys("/jwks", jwk(KEY, "key-1"))
    jwks.serve_keys("/evil", jwk(OTHER_KEY, "key-1"))
    with Server({"JWT_JWKS_URL": url, "JWT_AUDIENCE": AUDIENCE, "JWT_ISSUER": ISSUER}) as srv:
        yield srv


# -- authentication: the three ways ----------------------------------------------------

def test_valid_token_in_query(auth_server: Server) -> None:
    """?token= on the upgrade authenticates: welcome carries the token's sub and name."""
    with Client(auth_server.url, f"token={good_token('alice')}") as c:
        assert c.welcome["user_id"] == "alice" and c.welcome["username"] == "Alice"
        assert c.welcome["authenticated"] is True
        assert c.join("edge-room")["room"] == "edge-room"


def test_valid_token_in_bearer_header(auth_server: Server) -> None:
    """Authorization: Bearer on the upgrade authenticates."""
    with Client(auth_server.url, headers={"Authorization": f"Bearer {good_token('bob')}"}
                ) as c:
        assert (c.welcome["user_id"], c.welcome["authenticated"]) == ("bob", True)


def test_valid_token_in_auth_message(auth_server: Server) -> None:
    """An auth message authenticates a connection that opened without a token."""
    with Client(auth_server.url) as c:
        assert c.welcome["authenticated"] is False and c.welcome["auth_required"] is True
        c.send({"type": "auth", "token": good_token("carol"), "id": "a1"})
        welcome = c.expect("welcome")
        assert (welcome["id"], welcome["user_id"], welcome["authenticated"]) == (
            "a1", "carol", True)
        assert c.join("edge-room")["users"]


# -- authentication: every rejection path ----------------------------------------------

@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
def test_bad_token_in_query_is_401(auth_server: Server, kind: str) -> None:
    """A bad ?token= is refused with HTTP 401 before the upgrade."""
    with pytest.raises(InvalidStatus) as info:
        Client(auth_server.url, f"token={BAD_TOKENS[kind][0]()}")
    assert info.value.response.status_code == 401


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
def test_bad_token_in_bearer_is_401(auth_server: Server, kind: str) -> None:
    """A bad Authorization: Bearer token is refused with HTTP 401 before the upgrade."""
    with pytest.raises(InvalidStatus) as info:
        Client(auth_server.url, headers={"Authorization": f"Bearer {BAD_TOKENS[kind][0]()}"})
    assert info.value.response.status_code == 401


def test_bad_tokens_in_auth_message_are_errors(auth_server: Server) -> None:
    """Each bad token in an auth message gets its error code; the connection stays gated."""
    with Client(auth_server.url) as c:
        for kind, (make, code) in sorted(BAD_TOKENS.items()):
            c.send({"type": "auth", "token": make(), "id": kind})
            err = c.expect("error", id=kind)
            assert err["code"] == code, kind
        c.send({"type": "join", "room": "edge-room", "id": "j"})
        assert c.expect("error", id="j")["code"] == "auth_required"


def metric(server: Server, series: str) -> float:
    """The value of one series (name and labels exactly as exposed) on /metrics."""
    status, body = server.http("/metrics", metrics=True)
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def test_auth_failures_are_counted(auth_server: Server) -> None:
    """A refused token on the upgrade counts as a refused handshake and an auth failure."""
    refused = 'wschat_handshakes_refused_total{reason="auth"}'
    failed = 'wschat_auth_failures_total{reason="auth_failed"}'
    before = metric(auth_server, refused), metric(auth_server, failed)
    with pytest.raises(InvalidStatus):
        Client(auth_server.url, f"token={forge_none(good_claims())}")
    assert metric(auth_server, refused) == before[0] + 1
    assert metric(auth_server, failed) >= before[1] + 1


# -- AUTH_REQUIRED gating and deadlines ------------------------------------------------

def test_only_auth_and_ping_before_authenticating(auth_server: Server) -> None:
    """Before auth only ping (pong) and auth work; anything else is auth_required."""
    with Client(auth_server.url) as c:
        for i, request in enumerate([{"type": "join", "room": "r"}, {"type": "list_users",
                                     "room": "r"}, {"type": "dm", "to": "x", "text": "hi"}]):
            c.send({**request, "id": i})
            assert c.expect("error", id=i)["code"] == "auth_required"
        assert c.request({"type": "ping", "id": "p"}, "pong")["id"] == "p"


def test_unauthenticated_connection_closed_4001(auth_server: Server) -> None:
    """A connection that does not authenticate within AUTH_TIMEOUT is closed with 4001."""
    started = time.monotonic()
    with Client(auth_server.url) as c:
        assert close_code_of(c, AUTH_TIMEOUT + TIMEOUT) == 4001
    assert time.monotonic() - started >= AUTH_TIMEOUT - 0.1


def test_authenticated_connection_outlives_auth_timeout(auth_server: Server) -> None:
    """A connection that authenticated in time is not closed by the auth deadline."""
    with Client(auth_server.url) as c:
        c.request({"type": "auth", "token": good_token("dave")}, "welcome")
        with pytest.raises(TimeoutError):
            c.recv(AUTH_TIMEOUT + 0.5)
        assert c.request({"type": "ping"}, "pong")["type"] == "pong"


def test_token_expiry_sends_token_expired_then_closes_4002(auth_server: Server) -> None:
    """When the connection's token expires: error token_expired, then close 4002."""
    exp = int(time.time()) + 2
    token = sign({**good_claims("erin"), "exp": exp}, KEY, "RS256")
    with Client(auth_server.url, f"token={token}") as c:
        err = c.expect("error", timeout=TIMEOUT + 2)
        assert err["code"] == "token_expired"
        assert time.time() >= exp - 0.05
        assert close_code_of(c) == 4002


def test_fresh_auth_before_expiry_keeps_connection(auth_server: Server) -> None:
    """A fresh auth before exp replaces the deadline: the connection outlives the first token."""
    exp = int(time.time()) + 2
    token = sign({**good_claims("frank"), "exp": exp}, KEY, "RS256")
    with Client(auth_server.url, f"token={token}") as c:
        c.request({"type": "auth", "token": good_token("frank")}, "welcome")
        with pytest.raises(TimeoutError):
            c.recv(max(0.1, exp - time.time()) + 0.5)
        assert c.request({"type": "ping", "id": 1}, "pong")["id"] == 1


# -- JWKS ------------------------------------------------------------------------------

def test_jwks_token_accepted_and_fetched_once(jwks_server: Server, jwks: JwksServer) -> None:
    """Tokens with a known kid are accepted in all three ways; the JWKS is fetched once."""
    token = sign(good_claims("gina"), KEY, "RS256", kid="key-1")
    clients = [Client(jwks_server.url, f"token={token}"),
               Client(jwks_server.url, headers={"Authorization": f"Bearer {token}"}),
               Client(jwks_server.url)]
    clients[2].send({"type": "auth", "token": token})
    welcomes = [c.welcome for c in clients[:2]] + [clients[2].expect("welcome")]
    assert [(w["user_id"], w["authenticated"]) for w in welcomes] == [("gina", True)] * 3
    assert jwks.hits["/jwks"] == 1
    for c in clients:
        c.close()


def test_unknown_kid_refused(jwks_server: Server, jwks: JwksServer) -> None:
    """A token naming a kid the JWKS does not have is refused (401, and auth_failed)."""
    token = sign(good_claims(), KEY, "RS256", kid="no-such-key")
    with pytest.raises(InvalidStatus) as info:
        Client(jwks_server.url, f"token={token}")
    assert info.value.response.status_code == 401
    with Client(jwks_server.url) as c:
        c.send({"type": "auth", "token": token})
        assert c.expect("error")["code"] == "auth_failed"


def test_jku_header_never_followed(jwks_server: Server, jwks: JwksServer) -> None:
    """A token pointing (jku/x5u) at an attacker's key set is refused; that URL is never fetched."""
    for header in ("jku", "x5u"):
        token = sign(good_claims("admin"), OTHER_KEY, "RS256", kid="key-1",
                     **{header: jwks.url("/evil")})
        with pytest.raises(InvalidStatus) as info:
            Client(jwks_server.url, f"token={token}")
        assert info.value.response.status_code == 401
    assert jwks.hits["/evil"] == 0


def test_not_ready_until_a_jwks_key_set_is_loaded(jwks: JwksServer) -> None:
    """A worker whose JWKS cannot be fetched refuses every token: /ready says so (503,
    "jwks unreachable") until a key set is loaded, then turns 200 and tokens work."""
    jwks.documents["/later"] = 503
    token = sign(good_claims("hana"), KEY, "RS256", kid="key-1")
    with Server({"JWT_JWKS_URL": jwks.url("/later"), "JWT_AUDIENCE": AUDIENCE,
                 "JWT_ISSUER": ISSUER}) as srv:
        with pytest.raises(InvalidStatus) as info:
            Client(srv.url, f"token={token}")
        assert info.value.response.status_code == 401  # the worker authenticates nobody
        for metrics in (False, True):
            status, body = srv.http("/ready", metrics=metrics)
            assert status == 503, body
            assert json.loads(body)["problems"] == ["jwks unreachable"]
        jwks.serve_keys("/later", jwk(KEY, "key-1"))
        wait_until(lambda: srv.http("/ready")[0] == 200, 4 * TIMEOUT,
                   message="/ready once the JWKS answers")
        with Client(srv.url, f"token={token}") as c:
            assert c.welcome["user_id"] == "hana"


# -- Origin allow-list -----------------------------------------------------------------

# Foreign origins are refused with 403: tests/test_factory.py (no socket needed).
@pytest.mark.parametrize("origin", [ORIGIN, "HTTPS://CHAT.EXAMPLE.COM",
                                    "https://other.example.com", None])
def test_allowed_or_absent_origin_accepted(auth_server: Server, origin: str | None) -> None:
    """Listed origins (compared case-insensitively) and non-browser clients without one connect."""
    with Client(auth_server.url, f"token={good_token()}", origin=origin) as c:
        assert c.welcome["authenticated"] is True


# -- handshake checks, header limits and the handshake deadline ------------------------

# The handshake's field checks (426, 400, 405 before any upgrade): tests/test_factory.py.
def test_header_limits(raw) -> None:
    """Too many headers or one too large is 431; an overlong request line is 414."""
    many = "".join(f"X-Filler-{i}: y\r\n" for i in range(60))
    assert raw().upgrade(extra=many)[0] == 431
    assert raw().upgrade(extra=f"X-Big: {'a' * 9000}\r\n")[0] == 431
    assert raw().upgrade(path="/ws?username=" + "a" * 5000)[0] == 414


@pytest.mark.parametrize("changed", [
    {"Host": None},  # RFC 6455 4.2.1 requires it: it was a 500 and an ERROR from h11
    {"Connection": "notupgrade"},  # "upgrade" in it, but not the token wsproto wants
    {"Upgrade": "h2c, websocket"},  # wsproto wants websocket alone
    # what wsproto fails to decode (host names as IDNA, lists as ASCII): each was a 500
    # and an ERROR with a traceback
    {"Host": "xn--zz"}, {"Host": "\x80"}, {"Connection": "Upgrade, \x80"},
    {"Sec-WebSocket-Protocol": "chat, \xe9"},
])
def test_a_malformed_upgrade_request_is_400(server: Server, changed: dict[str, str | None]
                                            ) -> None:
    """An upgrade request without Host, or with a field wsproto refuses or cannot decode
    after the admission's checks passed it, is 400, counted as bad_handshake, and logs no
    error: a client could write an ERROR line with a traceback (and get a 500) for each
    one it sent."""
    fields = {"Host": "127.0.0.1", "Upgrade": "websocket", "Connection": "Upgrade",
              "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
              "Sec-WebSocket-Version": "13", **changed}
    logged = len(server.output())
    refused = 'wschat_handshakes_refused_total{reason="bad_handshake"}'
    before = metric(server, refused)
    s = RawSocket(server.port)
    try:
        s.send(("GET /ws HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()
                                                if v is not None) + "\r\n").encode("latin-1"))
        assert s.read_response()[0] == 400
    finally:
        s.close()
    assert metric(server, refused) == before + 1
    output = server.output()[logged:]
    assert " ERROR " not in output and "Traceback" not in output, output


@pytest.mark.parametrize("request_bytes, status, code", [
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"<b>" * 3000 + b"\r\n\r\n", 431,
     "headers_too_large"),
    (b"BLAH <script>" + b"x" * 900 + b"\r\n\r\n", 400, "bad_request"),
    (b"POST /api/rooms HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: zip\r\n\r\n", 501,
     "not_implemented"),
])
def test_a_request_gunicorn_refuses_is_answered_in_json(
        server: Server, request_bytes: bytes, status: int, code: str) -> None:
    """A request gunicorn refuses before the app sees it (a request line over its limit, a
    malformed line, headers too large, an unknown transfer coding) is answered as wschat's
    other errors are, ``{"error": {"code", "message"}}``, the client's bytes in the message
    cut short: it was gunicorn's HTML page, the client's text in it."""
    from wschat.logs import MAX_CLIENT_TEXT

    s = RawSocket(server.port)
    try:
        s.send(request_bytes)
        got, headers, body = s.read_response()
        while len(body) < int(headers["content-length"]):
            body += s.sock.recv(65536)
    finally:
        s.close()
    assert got == status
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["code"] == code, error
    assert 0 < len(error["message"]) <= MAX_CLIENT_TEXT, error


def test_silent_and_slow_sockets_closed_by_handshake_deadline(raw) -> None:
    """A socket that sends nothing, or drips its request, is closed within 5 s (keepalive)."""
    silent, slow = raw(), raw()
    slow.send(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    for i in range(3):  # a slowloris drip: one header at a time
        slow.send(f"X-Drip-{i}: y\r\n".encode())
    assert silent.wait_eof(10) < 6.0
    assert slow.wait_eof(10) < 6.0
    assert time.monotonic() - started >= 4.5


# A small pool: gunicorn's worker_connections is MAX_CONNECTIONS + 100 = 110 sockets a worker.
SMALL_POOL = {"MAX_CONNECTIONS": "10"}
# The request line and one header of an upgrade, the rest never sent: each such socket waits
# for its request until gunicorn's handshake deadline (keepalive, 5 s).
DRIP = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def dripping(port: int, sources: list[str]) -> list[socket.socket]:
    """One socket from each of ``sources`` that sends the start of its request, no more."""
    socks = []
    for source in sources:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        socks.append(s)
        s.settimeout(TIMEOUT)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(DRIP)
    return socks


def still_open(socks: list[socket.socket]) -> int:
    """How many of ``socks`` the server has not closed (nor reset)."""
    count = 0
    for s in socks:
        s.setblocking(False)  # with a timeout, recv would wait for bytes first
        try:
            count += s.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            count += 1
        except OSError:
            pass
    return count


def welcomed_within(port: int, seconds: float, source: str = "127.0.0.1") -> None:
    """A client from ``source`` gets its 101 and its welcome within ``seconds``."""
    started = time.monotonic()
    s = RawSocket(port, source)
    try:
        s.sock.settimeout(seconds)
        try:
            status, _ = s.upgrade()
            _, opcode, payload = s.read_frame()
        except TimeoutError:
            raise AssertionError(f"no welcome within {seconds} s: the worker did not "
                                 "accept or answer the client") from None
        assert status == 101 and opcode == OP_TEXT and b'"welcome"' in payload
        assert time.monotonic() - started < seconds
    finally:
        s.close()


# Handshakes are not scaled with SCALE: the dripping sockets hold the pool for the fixed
# 5 s of gunicorn's keepalive, and a client accepted only once they time out takes as long.
WELCOME_WITHIN = 3.0


def test_dripping_handshakes_from_few_addresses_cannot_fill_the_pool() -> None:
    """Three addresses open 180 sockets, more than the worker's pool of 110, and drip their
    upgrade requests: each address keeps at most MAX_HANDSHAKES_PER_IP of them (the oldest
    are closed), and a client from another address is accepted and welcomed at once (it
    used to wait in the listen queue until the dripping sockets' 5 s deadline), as is one
    from a dripping address (its request comes before 8 newer sockets of its address)."""
    with Server({**SMALL_POOL, "MAX_HANDSHAKES_PER_IP": "8"}) as srv:
        socks = dripping(srv.port, [f"127.0.0.{2 + i % 3}" for i in range(180)])
        try:
            welcomed_within(srv.port, WELCOME_WITHIN)
            welcomed_within(srv.port, WELCOME_WITHIN, source="127.0.0.2")
            # Each address's 8 newest wait on; the rest were closed as newer ones came.
            wait_until(lambda: still_open(socks) <= 3 * 8, TIMEOUT,
                       message="the excess dripping sockets closed")
            assert still_open(socks[-3:]) == 3
            closed = 'wschat_waiting_sockets_closed_total{reason="max_handshakes_per_ip"}'
            # The client from 127.0.0.2 made one more of its address's dripping sockets go.
            assert metric(srv, closed) == 180 + 1 - 3 * 8
            # Each went as a client that hung up goes (gunicorn: a debug line), no traceback.
            assert "Traceback" not in srv.output()
        finally:
            for s in socks:
                s.close()


def test_dripping_handshakes_from_many_addresses_leave_room() -> None:
    """150 addresses, each under MAX_HANDSHAKES_PER_IP, open one dripping socket each,
    more than the pool of 110: past the budget of sockets waiting for their request (half
    the pool here) the oldest waiting one is closed for each new one, so the worker keeps
    accepting and a client is welcomed at once."""
    with Server(SMALL_POOL) as srv:
        socks = dripping(srv.port, [f"127.0.1.{1 + i}" for i in range(150)])
        try:
            welcomed_within(srv.port, WELCOME_WITHIN)
            wait_until(lambda: still_open(socks) <= 55, TIMEOUT,
                       message="the oldest dripping sockets closed")
            # The client's own socket waited too (until its request came): 150 + 1 - 55.
            closed = 'wschat_waiting_sockets_closed_total{reason="pool"}'
            assert metric(srv, closed) >= 150 - 55
            assert "Traceback" not in srv.output()
        finally:
            for s in socks:
                s.close()


def not_reading(port: int, source: str, count: int, path: str = "/web/app.js"
                ) -> list[socket.socket]:
    """``count`` sockets from ``source`` that each ask for ``path`` 30 times over
    (pipelined) with a tiny receive window, and never read: once the kernel's buffers are
    full, the server's write of the responses waits for them."""
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        socks.append(s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # before connect: the window
        s.settimeout(TIMEOUT)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() * 30)
    return socks


TCP_ESTABLISHED = 1  # tcpi_state, the first byte of Linux's struct tcp_info


def established(socks: list[socket.socket]) -> int:
    """How many of ``socks`` are still connected as their kernel sees it: neither reset nor
    ended by the server (its end of stream may sit behind data that the client has not
    read: still_open's peek would count that one)."""
    return sum(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_ESTABLISHED
               for s in socks)


def test_clients_that_never_read_their_responses_cannot_fill_the_pool() -> None:
    """One address asks for the page's script on 120 sockets, more than the worker's pool
    of 110, and reads none of it: each response's write waits for good once the kernel's
    buffers are full. Those sockets count as waiting, as a slow request does (their
    greenlets hold the pool the same way): the oldest past MAX_HANDSHAKES_PER_IP are reset
    (the kernel drops what it still held for them), and a client from another address is
    welcomed at once. Before, a socket left the count once its request had come: these
    held the whole pool, for as long as they liked, and the worker accepted no one else."""
    with Server({**SMALL_POOL, "MAX_HANDSHAKES_PER_IP": "8"}) as srv:
        socks = not_reading(srv.port, "127.0.0.2", 120)
        try:
            welcomed_within(srv.port, WELCOME_WITHIN, source="127.0.0.3")
            wait_until(lambda: established(socks) <= 8, TIMEOUT,
                       message="the excess non-reading sockets reset")
            # The address's 8 newest wait on (a socket is newest again each time one of its
            # pipelined requests is answered, so not always the last 8 opened).
            assert established(socks) == 8
            closed = 'wschat_waiting_sockets_closed_total{reason="max_handshakes_per_ip"}'
            assert metric(srv, closed) == 120 - 8
            assert "Traceback" not in srv.output()
        finally:
            for s in socks:
                s.close()


def test_idle_kept_alive_connections_count_as_waiting() -> None:
    """A kept-alive HTTP connection waits for its next request like a new socket for its
    first: past MAX_HANDSHAKES_PER_IP the oldest idle one of the address is closed, long
    before the 5 s keepalive (one fast request each, then idling, fills no pool either)."""
    with Server({"MAX_HANDSHAKES_PER_IP": "2"}) as srv:
        socks = []
        try:
            for _ in range(3):
                s = RawSocket(srv.port, "127.0.0.2")
                socks.append(s)
                s.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert s.read_response()[0] == 200
            assert socks[0].wait_eof(3.0) < 3.0
            assert still_open([s.sock for s in socks]) == 2
        finally:
            for s in socks:
                s.close()


def test_a_worker_class_given_on_the_command_line_is_warned_of() -> None:
    """gunicorn's ``-k gevent`` (here through GUNICORN_CMD_ARGS, as an old Dockerfile's
    command would give it) overrides gunicorn.conf.py's worker class: the server runs, but
    without the bound on sockets dripping their upgrade requests, so each worker says so
    (before: silently, and MAX_HANDSHAKES_PER_IP did nothing)."""
    with Server({"GUNICORN_CMD_ARGS": "--worker-class gevent"}) as srv:
        welcomed_within(srv.port, WELCOME_WITHIN)
        wait_until(lambda: "is not wschat.worker.Worker" in srv.output(), TIMEOUT,
                   message="the worker class warning")
        assert "gevent.GeventWorker is not wschat.worker.Worker" in srv.output()
    with Server() as srv:
        welcomed_within(srv.port, WELCOME_WITHIN)
        assert "is not wschat.worker.Worker" not in srv.output()


class Pair:
    """A connected pair of sockets: ``sock`` as a worker holds it, ``peer`` the client's."""

    def __init__(self) -> None:
        self.sock, self.peer = socket.socketpair()

    @property
    def shut(self) -> bool:
        return still_open([self.peer]) == 0


def test_waiting_sockets_close_oldest_per_address_and_in_all() -> None:
    """Past MAX_HANDSHAKES_PER_IP the oldest socket of that address is closed (an IPv6 /64
    and an IPv4-mapped address count as one), past the budget the oldest of all; a socket
    whose request is being served no longer counts."""
    from wschat.ratelimit import address_key
    from wschat.worker import Waiting, peer_key, waiting_budget

    # The worker's quick key groups peers as address_key does.
    same = [("2001:db8::1", "2001:db8::ffff:1"), ("::ffff:10.0.0.1", "10.0.0.1"),
            ("fe80::1%lo", "fe80::2%lo")]
    for x, y in same:
        assert peer_key(x) == (peer_key(y) if ":" in y else y)
        assert address_key(x) == address_key(y)
    assert peer_key("2001:db8::1") != peer_key("2001:db8:0:1::1")

    assert waiting_budget(10_100) == 10_000 and waiting_budget(110) == 55
    reasons: list[str] = []
    waiting = Waiting(per_address=2, budget=4, on_close=reasons.append)
    a, b, c = Pair(), Pair(), Pair()
    waiting.arrive(a.sock, ("2001:db8::1", 1, 0, 0))
    waiting.arrive(b.sock, ("2001:db8::ffff", 2, 0, 0))  # the same /64
    waiting.arrive(c.sock, ("2001:db8:0:0:1::2", 3, 0, 0))
    assert (a.shut, b.shut, c.shut) == (True, False, False)
    waiting.leave(b.sock)  # its request arrived: served, no longer waiting
    d, e = Pair(), Pair()
    waiting.arrive(d.sock, ("::ffff:10.0.0.1", 4, 0, 0))
    waiting.arrive(e.sock, ("10.0.0.1", 5))  # d's address too: two of it now
    assert not any(s.shut for s in (b, c, d, e))
    others = [Pair() for _ in range(3)]
    for i, s in enumerate(others):
        waiting.arrive(s.sock, (f"10.0.1.{i}", 6))
    # Four may wait in all: c and d, the oldest, made room for the last two.
    assert [s.shut for s in (c, d, e, *others)] == [True, True, False, False, False, False]
    assert len(waiting.sockets) == 4 and waiting.closed == 3
    assert reasons == ["max_handshakes_per_ip", "pool", "pool"]
    for s in (e, *others):
        waiting.leave(s.sock)
    assert not waiting.sockets and not waiting.by_address
    # One shut down for a limit never counts again (a pipelined request it had read is
    # still answered), until its greenlet is done with it.
    waiting.arrive(a.sock, ("2001:db8::1", 1, 0, 0), responding=True)
    assert not waiting.sockets and a.sock in waiting.shut
    for s in (a, b, c, d):
        waiting.forget(s.sock)
    assert not waiting.shut
    # A response being written counts (responding); once written, the socket waits for its
    # next request in the same place, and counted once.
    f, g = Pair(), Pair()
    waiting.arrive(f.sock, ("10.0.2.1", 7), responding=True)
    waiting.arrive(g.sock, ("10.0.2.1", 8))
    waiting.arrive(f.sock, ("10.0.2.1", 7))
    assert list(waiting.sockets) == [f.sock, g.sock] and not waiting.responding
    for s in (f, g):
        waiting.leave(s.sock)
        s.sock.close()
        s.peer.close()
    assert not waiting.sockets and not waiting.by_address
    for s in (a, b, c, d, e, *others):
        s.sock.close()
        s.peer.close()


def test_one_waiting_socket_per_address_keeps_its_cap_and_leaves_cleanly() -> None:
    """MAX_HANDSHAKES_PER_IP=1: each new socket of the address closes the one before it,
    and each leaves without a trace (before: closing the only one deleted the address's
    entry while the newcomer was filed in it, so the next went uncapped and the newcomer's
    leave raised KeyError in gunicorn's handler)."""
    from wschat.worker import Waiting

    waiting = Waiting(per_address=1, budget=10)
    pairs = [Pair() for _ in range(3)]
    try:
        for i, p in enumerate(pairs):
            waiting.arrive(p.sock, ("10.0.0.9", i))
        assert [p.shut for p in pairs] == [True, True, False]
        assert waiting.closed == 2 and list(waiting.by_address) == ["10.0.0.9"]
        for p in pairs:
            waiting.leave(p.sock)
        assert not waiting.sockets and not waiting.by_address
    finally:
        for p in pairs:
            p.sock.close()
            p.peer.close()


# -- frame-level RFC 6455 behaviour ----------------------------------------------------

def test_invalid_utf8_closes_1007(raw) -> None:
    """A text frame with invalid UTF-8 is answered with close 1007 and the socket is closed."""
    s = opened(raw)
    s.send(encode_frame(OP_TEXT, b'{"type": "ping", "x": "\xff\xfe"}'))
    assert s.read_until_close()[0] == 1007
    s.wait_eof()


def test_invalid_utf8_fails_fast_inside_fragmented_message(raw) -> None:
    """Invalid UTF-8 in the first fragment closes 1007 before the message is finished."""
    s = opened(raw)
    s.send(encode_frame(OP_TEXT, b"ok \xc0\xaf", fin=False))
    assert s.read_until_close()[0] == 1007


def test_unmasked_client_frame_closes_1002(raw) -> None:
    """An unmasked client frame is a protocol error: close 1002."""
    s = opened(raw)
    s.send(encode_frame(OP_TEXT, b'{"type": "ping"}', mask=False))
    assert s.read_until_close()[0] == 1002
    s.wait_eof()


@pytest.mark.parametrize("frame", [
    encode_frame(OP_TEXT, b"{}", rsv=4),  # RSV1 without an extension
    encode_frame(OP_PING, b"x" * 126),  # control frame over 125 bytes
    encode_frame(OP_PING, b"", fin=False),  # fragmented control frame
    encode_frame(OP_CONT, b"orphan"),  # continuation with nothing to continue
    encode_frame(0x3, b""),  # reserved opcode
    encode_frame(OP_CLOSE, struct.pack("!H", 999)),  # close code outside the RFC's ranges
    encode_frame(OP_CLOSE, struct.pack("!H", 1005)),  # a code only endpoints may use locally
    encode_frame(OP_CLOSE, b"\x03"),  # one-byte close payload
], ids=["rsv1", "long_control", "fragmented_control", "orphan_continuation",
        "reserved_opcode", "close_999", "close_1005", "close_one_byte"])
def test_protocol_violations_close_1002(raw, frame: bytes) -> None:
    """Each frame-level protocol violation is answered with close 1002."""
    s = opened(raw)
    s.send(frame)
    assert s.read_until_close()[0] == 1002


def test_binary_frame_closes_1003_raw(raw) -> None:
    """A binary frame on the chat endpoint is answered with close 1003."""
    s = opened(raw)
    s.send(encode_frame(OP_BINARY, b"\x00\x01\x02"))
    assert s.read_until_close()[0] == 1003


def test_oversized_frame_closes_1009_before_it_is_all_sent(raw) -> None:
    """A frame announcing 1 MiB is cut off with 1009 once MAX_MESSAGE_BYTES is passed."""
    s = opened(raw)
    chunk = b"a" * (80 * 1024)
    s.send(encode_frame(OP_TEXT, chunk, length=1024 * 1024)[:-1])  # header + ~80 KiB
    assert s.read_until_close()[0] == 1009
    s.wait_eof()


def test_oversized_fragmented_message_closes_1009(raw) -> None:
    """Fragments that together pass MAX_MESSAGE_BYTES close with 1009."""
    s = opened(raw)
    piece = b"b" * 30_000
    s.send(encode_frame(OP_TEXT, piece, fin=False))
    s.send(encode_frame(OP_CONT, piece, fin=False))
    s.send(encode_frame(OP_CONT, piece, fin=False))
    assert s.read_until_close()[0] == 1009


@pytest.mark.parametrize("code", [1000, 1001, 3000, 4321])
def test_close_handshake_echoes_the_client_code(raw, code: int) -> None:
    """The server answers a client's close with the same code, then closes the TCP connection."""
    s = opened(raw)
    s.send(encode_frame(OP_CLOSE, struct.pack("!H", code) + b"bye"))
    assert s.read_until_close()[0] == code
    s.wait_eof()


def test_empty_close_answered_with_empty_close(raw) -> None:
    """A close frame without a code (1005) is answered with a close frame without a code."""
    s = opened(raw)
    s.send(encode_frame(OP_CLOSE))
    assert s.read_until_close() == (None, b"")


def test_ping_answered_with_same_payload_and_fragments_joined(raw) -> None:
    """A ping between fragments gets a pong with its payload; the fragments form one message."""
    s = opened(raw)
    s.send(encode_frame(OP_TEXT, b'{"type": "pi', fin=False))
    s.send(encode_frame(OP_PING, b"are you there"))
    s.send(encode_frame(OP_CONT, b'ng", "id": "frag"}'))
    assert s.read_frame() == (True, OP_PONG, b"are you there")
    fin, opcode, payload = s.read_frame()
    assert opcode == OP_TEXT and b'"pong"' in payload and b'"frag"' in payload


# -- MAX_CONNECTIONS across workers ----------------------------------------------------

def test_max_connections_across_two_workers_is_503() -> None:
    """With 2 workers, the MAX_CONNECTIONS+1st upgrade gets 503 (counted); a freed slot admits."""
    url = redis_url_or_skip(11)
    with Server({"MAX_CONNECTIONS": "3", "REDIS_URL": url}, workers=2) as srv:
        clients = [Client(srv.url) for _ in range(3)]
        with pytest.raises(InvalidStatus) as info:
            Client(srv.url)
        assert info.value.response.status_code == 503
        assert info.value.response.headers.get("Retry-After")
        assert metric(srv, 'wschat_handshakes_refused_total{reason="max_connections"}') == 1
        clients.pop().close()

        def admitted() -> Client | None:
            try:
                return Client(srv.url)
            except InvalidStatus:
                return None

        clients.append(wait_until(admitted, message="a freed connection slot"))
        for c in clients:
            c.close()
