"""What a new user meets first: the terminal client, --help, start-up lines and errors."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, TIMEOUT, Server, wait_until

SECRET = "first-run-secret-0123456789abcdef0123"


def wschat_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wschat", *args], input=stdin, text=True,
                          capture_output=True, timeout=6 * TIMEOUT, cwd=ROOT)


@pytest.fixture(scope="module")
def server() -> Server:
    with Server({"JWT_SECRET": SECRET, "ALLOWED_ORIGINS": "https://chat.example"}) as srv:
        yield srv


def readme_terminal_example() -> tuple[str, list[str], list[str]]:
    """The README's first terminal example: its URL, the lines typed, and the lines it prints."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", readme, re.DOTALL | re.MULTILINE)
    typed = next(b for b in blocks if b.startswith("python -m wschat connect ")).splitlines()
    printed = blocks[blocks.index("\n".join(typed) + "\n") + 1].splitlines()
    return shlex.split(typed[0])[-1], typed[1:], printed


# What differs from run to run (and the README shows one run of).
VARYING = ("user_id", "epoch", "timestamp")


def _shape(event: Any) -> Any:
    if isinstance(event, dict):
        return {k: "<varies>" if k in VARYING else _shape(v) for k, v in event.items()}
    if isinstance(event, list):
        return [_shape(v) for v in event]
    return event


def test_terminal_client_speaks_the_protocol(server: Server) -> None:
    """The README's terminal example, as written: JSON lines in, one event per line out, then a
    clean close; and it prints what the README says, field for field (ids, epochs and times
    aside). The README's sample once lacked `epoch` and `guest`, which the server sends."""
    url, typed, printed = readme_terminal_example()
    assert url == "ws://localhost:8080/ws?username=alice", url
    done = wschat_cli("connect", f"{server.url}?username=alice", stdin="\n".join(typed) + "\n")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["type"] for e in events] == ["welcome", "joined", "message"], events
    assert [_shape(e) for e in events] == [_shape(json.loads(line)) for line in printed]
    assert done.stderr == ""


def test_terminal_client_with_a_token(server: Server) -> None:
    """A minted token signs the user in; a bad one is refused before the upgrade, and logged."""
    token = wschat_cli("token", "--sub", "alice", "--name", "Alice", "--secret", SECRET)
    assert token.returncode == 0
    done = wschat_cli("connect", f"{server.url}?token={token.stdout.strip()}")
    assert '"user_id":"alice"' in done.stdout and '"authenticated":true' in done.stdout
    refused = wschat_cli("connect", f"{server.url}?token=not-a-jwt")
    assert refused.returncode == 1
    assert "upgrade refused: HTTP 401" in refused.stderr
    wait_until(lambda: "upgrade refused (401) for 127.0.0.1" in server.output(),
               message="the refusal in the server's log")


def test_refused_origin_is_logged(server: Server) -> None:
    """A 403 for an Origin outside ALLOWED_ORIGINS names the origin in the server's log."""
    import websockets.sync.client as ws_client
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus):
        ws_client.connect(server.url, origin="https://evil.example", open_timeout=TIMEOUT)
    wait_until(lambda: "upgrade refused (403) for 127.0.0.1: origin 'https://evil.example'"
               in server.output(), message="the refusal in the server's log")


def test_help_is_plain_text() -> None:
    """--help reads as text: no reST markup, and both commands are listed."""
    for args in (["--help"], ["connect", "--help"], ["token", "--help"]):
        done = wschat_cli(*args)
        assert done.returncode == 0 and "``" not in done.stdout and ":class:" not in done.stdout
    assert "connect" in wschat_cli("--help").stdout and "token" in wschat_cli("--help").stdout


@pytest.mark.parametrize("env, says", [
    ({"ENABLE_PERSISTENCE": "true", "DATABASE_URL": "sqlite:////nonexistent/dir/x.db"},
     "DATABASE_URL: cannot use sqlite:////nonexistent/dir/x.db"),
    ({"ENABLE_PERSISTENCE": "true", "DATABASE_URL": "postgresql://u@h:notaport/db"},
     "DATABASE_URL: expected postgresql://USER@HOST:PORT/DB"),
    ({"JWT_PUBLIC_KEY": "/nonexistent.pem"}, "JWT_PUBLIC_KEY: neither a PEM value"),
    ({"PORT": "eighty"}, "PORT: expected a number"),
    # Port 0 would bind some free port, and /metrics and /api, served only on the port
    # METRICS_PORT names, would then answer 404 on every port.
    ({"METRICS_PORT": "0"}, "METRICS_PORT: must be >= 1"),
    # gunicorn's worker_connections (MAX_CONNECTIONS + 100) sizes a C semaphore: a value
    # past a C long made every worker die at boot and be respawned forever.
    ({"MAX_CONNECTIONS": "10000000000000000000000"}, "MAX_CONNECTIONS: must be <= 10000000"),
    # Redis's EXPIRE refuses such a TTL: the leave script that empties a room failed at
    # its EXPIRE ("value is not an integer or out of range"), leaving the room's
    # sequence and history without any expiry.
    ({"ROOM_TTL": "1e300"}, "ROOM_TTL: must be <= 1e+09"),
    # A bucket's key expires when it would be full again, (burst - tokens) / rate: past
    # what Redis's SET PX takes, every command of every user got internal_error.
    ({"RATE_LIMIT_BURST": "100000000000000000"}, "RATE_LIMIT_BURST: must be <= 1000000000"),
    ({"RATE_LIMIT_GUEST_IP_BURST": "100000000000000000000000"},
     "RATE_LIMIT_GUEST_IP_BURST: must be <= 1000000000"),
    # Browsers send scheme://host[:port]: an entry without a scheme, or a CORS-style "*",
    # matched no Origin at all, and every browser got 403 from a server that started fine.
    ({"ALLOWED_ORIGINS": "*"}, "ALLOWED_ORIGINS: '*' is not an origin"),
    ({"ALLOWED_ORIGINS": "https://chat.example, chat.example"},
     "ALLOWED_ORIGINS: 'chat.example' is not an origin"),
])
def test_configuration_errors_are_one_clear_line(env: dict[str, str], says: str) -> None:
    """A bad setting stops the server with one line naming the variable, no traceback."""
    server = Server(env).start(wait=False)
    try:
        assert server.proc is not None
        assert server.proc.wait(6 * TIMEOUT) != 0
    finally:
        server.kill()
    output = server.output()
    assert says in output and "Traceback" not in output, output


def test_start_up_line_names_backend_and_persistence(tmp_path: Path) -> None:
    """The ready line says which backend and which database are really in use."""
    with Server({"ENABLE_PERSISTENCE": "true",
                 "DATABASE_URL": f"sqlite:///{tmp_path}/chat.db"}) as srv:
        wait_until(lambda: f"backend=memory persistence=sqlite:///{tmp_path}/chat.db"
                   in srv.output(), message="the ready line")
    with Server() as srv:
        wait_until(lambda: "backend=memory persistence=off" in srv.output(),
                   message="the ready line")


def test_readme_rust_example_is_the_crates_doc_tested_one() -> None:
    """The README's Rust example is the Rust client README's first, which `cargo test` builds
    (a doc-test): it was a fragment, without its `use` of `StreamExt`, no compiler saw."""
    def rust_blocks(readme: Path) -> list[str]:
        return re.findall(r"^```rust[a-z_,]*\n(.*?)^```", readme.read_text(),
                          re.DOTALL | re.MULTILINE)
    [shown] = rust_blocks(ROOT / "README.md")
    assert shown == rust_blocks(ROOT / "clients" / "rust" / "README.md")[0]


def test_readme_token_example_mints_the_payload_it_shows() -> None:
    """The README's room-access example: the command, run as written (with a secret), mints a
    token whose payload has the claims the README's comment shows (the comment lacked `iat`)."""
    import jwt

    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"^```bash\n(.*?)^```", readme, re.DOTALL | re.MULTILINE)
                 if "--mod-rooms" in b)
    command, *comment = block.splitlines()
    shown = json.loads(" ".join(line.lstrip("# ").removeprefix("payload: ") for line in comment)
                       .replace("...", "null"))
    done = wschat_cli(*shlex.split(command)[3:], "--secret", SECRET)
    assert done.returncode == 0, done.stderr
    payload = jwt.decode(done.stdout.strip(), SECRET, algorithms=["HS256"])
    assert payload.keys() == shown.keys()
    assert {k: v for k, v in payload.items() if shown[k] is not None} == \
        {k: v for k, v in shown.items() if v is not None}
