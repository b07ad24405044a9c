"""The client libraries' conformance harness (clients/conformance/harness.py) does what it says."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from conftest import ROOT, TIMEOUT, Client, http_get, wait_until

Call = Any


@pytest.fixture(scope="module")
def harness() -> Iterator[tuple[Call, str]]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "clients/conformance/harness.py")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    info = json.loads(proc.stdout.readline())

    def call(path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(info["control"] + path, method="POST",
                                         data=json.dumps(body or {}).encode())
        try:
            with urllib.request.urlopen(request, timeout=12 * TIMEOUT) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    try:
        yield call, info["secret"]
    finally:
        proc.stdin.close()  # the harness exits when its stdin closes
        assert proc.wait(12 * TIMEOUT) == 0


def test_servers_tokens_and_redis_on_demand(harness: tuple[Call, str]) -> None:
    """A Redis-backed server starts; its tokens verify; it stops with 1001 and starts again."""
    call, secret = harness
    status, server = call("/servers", {"backend": "redis", "workers": 1})
    assert status == 200 and server["url"].startswith("ws://127.0.0.1:")
    status, reply = call("/token", {"sub": "alice", "name": "Alice", "ttl": 60})
    assert jwt.decode(reply["token"], secret, algorithms=["HS256"])["sub"] == "alice"
    with Client(server["url"], f"token={reply['token']}") as c:
        assert c.welcome is not None and c.welcome["user_id"] == "alice"
        assert call(f"/servers/{server['id']}/stop")[1] == {"exit_code": 0}
        assert c.close_code_when_closed() == 1001
    assert call(f"/servers/{server['id']}/start")[1]["url"] == server["url"]
    with Client(server["url"]) as c:
        assert c.request({"type": "ping"}, "pong")


def test_worker_killed_and_replaced(harness: tuple[Call, str]) -> None:
    """kill-worker answers once a new worker serves; Redis stops and starts on its port."""
    call, _ = harness
    _, server = call("/servers", {"backend": "redis", "workers": 2})
    status, killed = call(f"/servers/{server['id']}/kill-worker")
    assert status == 200 and killed["pid"] > 0
    redis_url = call("/redis")[1]["url"]
    assert call("/redis/stop") == (200, {}) and call("/redis/start") == (200, {})
    assert call("/redis")[1]["url"] == redis_url
    # Until its workers are back on Redis the server answers upgrades 503 (Retry-After)
    ready = server["url"].replace("ws://", "http://").replace("/ws", "/ready")
    wait_until(lambda: http_get(ready)[0] == 200, 4 * TIMEOUT, 0.1, "the server ready again")
    with Client(server["url"]) as c:
        c.join("harness")


def test_a_tls_front_serves_wss_with_a_certificate_of_its_ca(harness: tuple[Call, str]) -> None:
    """``/servers/<id>/tls``: wss:// verified with the harness's CA; the system's CAs, or a
    certificate made for another host name, fail verification."""
    call, _ = harness
    status, server = call("/servers", {"backend": "memory"})
    assert status == 200
    status, front = call(f"/servers/{server['id']}/tls")
    assert status == 200 and front["url"].startswith("wss://localhost:"), front
    trusted = ssl.create_default_context(cafile=front["ca"])
    with connect(front["url"] + "?username=ann", ssl=trusted, open_timeout=TIMEOUT) as ws:
        assert json.loads(ws.recv(TIMEOUT))["type"] == "welcome"
    with pytest.raises(ssl.SSLCertVerificationError, match="local issuer"):
        connect(front["url"], open_timeout=TIMEOUT)
    status, other = call(f"/servers/{server['id']}/tls", {"hostname": "other.invalid"})
    assert status == 200 and other["hostname"] == "other.invalid"
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        connect(other["url"], ssl=trusted, open_timeout=TIMEOUT)


def test_a_tls_fronts_certificate_is_swapped_on_its_port(harness: tuple[Call, str]) -> None:
    """``/fronts/<front>/certificate``: the next handshake on the same port gets the new
    certificate (one of a CA no client has: it fails verification; then the harness's CA's
    again: it passes); ``drop`` cuts the connections open at the swap."""
    call, _ = harness
    _, server = call("/servers", {"backend": "memory"})
    _, front = call(f"/servers/{server['id']}/tls")
    trusted = ssl.create_default_context(cafile=front["ca"])
    with connect(front["url"] + "?username=ann", ssl=trusted, open_timeout=TIMEOUT) as ws:
        assert json.loads(ws.recv(TIMEOUT))["type"] == "welcome"
        status, reply = call(f"/fronts/{front['front']}/certificate",
                             {"issuer": "unknown", "drop": True})
        assert status == 200 and reply["issuer"] == "unknown", reply
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(TIMEOUT)
    with pytest.raises(ssl.SSLCertVerificationError, match="local issuer"):
        connect(front["url"], ssl=trusted, open_timeout=TIMEOUT)
    assert call(f"/fronts/{front['front']}/certificate", {"hostname": "other.invalid"})[0] == 200
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        connect(front["url"], ssl=trusted, open_timeout=TIMEOUT)
    assert call(f"/fronts/{front['front']}/certificate")[0] == 200
    with connect(front["url"] + "?username=ann", ssl=trusted, open_timeout=TIMEOUT) as ws:
        assert json.loads(ws.recv(TIMEOUT))["type"] == "welcome"
    assert call("/fronts/t99/certificate")[0] == 404
    assert call(f"/fronts/{front['front']}/certificate", {"issuer": "self"})[0] == 400


def test_bad_calls_are_refused(harness: tuple[Call, str]) -> None:
    """Unknown calls, servers and backends get 4xx with an error message."""
    call, _ = harness
    assert call("/nope")[0] == 404
    assert call("/servers/s99/stop")[0] == 404
    status, reply = call("/servers", {"backend": "cassandra"})
    assert status == 400 and "backend" in reply["error"]


def test_tokens_carry_room_grants(harness: tuple[Call, str]) -> None:
    """``rooms`` / ``mod_rooms`` in /token become the token's grants; a bad list is a 400."""
    call, secret = harness
    _, server = call("/servers", {"backend": "memory"})
    _, reply = call("/token", {"sub": "bob", "rooms": ["team-*"], "mod_rooms": ["team-a"]})
    assert jwt.decode(reply["token"], secret, algorithms=["HS256"])["mod_rooms"] == ["team-a"]
    with Client(server["url"], f"token={reply['token']}") as c:
        assert c.join("team-a")["room"] == "team-a"
        c.send({"type": "join", "room": "lobby"})
        assert c.expect("error", code="forbidden")["room"] == "lobby"
    assert call("/token", {"sub": "bob", "rooms": "team-*"})[0] == 400


@pytest.mark.parametrize("how", ["POST /shutdown", "SIGTERM"])
def test_shutdown_with_stdin_open_exits_cleanly(how: str) -> None:
    """POST /shutdown (the README's other way out) and SIGTERM end the harness with status 0,
    its servers stopped, while its stdin is still open: its thread waiting for stdin's EOF held
    the buffered reader's lock, and the interpreter's exit aborted on it (`Fatal Python error:
    _enter_buffered_busy`, SIGABRT)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "clients/conformance/harness.py")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        control = json.loads(proc.stdout.readline())["control"]
        request = urllib.request.Request(f"{control}/servers", method="POST", data=b"{}")
        with urllib.request.urlopen(request, timeout=12 * TIMEOUT) as resp:
            health = json.loads(resp.read())["http"] + "/health"
        assert http_get(health)[0] == 200
        if how == "SIGTERM":
            proc.terminate()
        else:
            request = urllib.request.Request(f"{control}/shutdown", method="POST", data=b"{}")
            with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
                assert json.loads(resp.read()) == {}
        status = proc.wait(12 * TIMEOUT)  # stdin left open (communicate() would close it)
        err = proc.stderr.read()  # type: ignore[union-attr]
        assert status == 0 and b"Fatal Python error" not in err, (status, err.decode()[-2000:])
        with pytest.raises(OSError):
            http_get(health, timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
