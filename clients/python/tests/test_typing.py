"""The package ships ``py.typed``: apps type-check against its annotations. ``mypy --strict``
passes on the package and on an app's fitting handlers (``typecheck/app_ok.py``), and reports
each handler that does not fit its event (``typecheck/app_wrong.py``: the lines whose comment
starts with "error", and no other): ``on()`` holds a handler to its event's payload, for
every event name.

mypy runs in-process (``mypy.api.run``), with no config file and a cache of this session's
own, so the check does not depend on where pytest runs from."""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args, get_overloads, get_type_hints

import pytest
import wschat_client
from conftest import IN_CI
from wschat_client import (
    ChatError,
    Client,
    DirectMessage,
    Disconnect,
    EventName,
    Joined,
    Message,
    Muted,
    Presence,
    RecoveryFailed,
    Removed,
    RoomStateChange,
    StateChange,
    SyncClient,
    TypingEvent,
    Unmuted,
    Welcome,
)
from wschat_client.client import EVENTS, ClientOptions

# The README's table of events: each name's payload.
PAYLOADS: dict[str, Any] = {
    "state": StateChange, "connected": Welcome, "user_changed": Welcome,
    "disconnected": Disconnect, "message": Message, "dm": DirectMessage, "presence": Presence,
    "typing": TypingEvent, "joined": Joined, "recovery_failed": RecoveryFailed,
    "room_state": RoomStateChange, "removed": Removed, "muted": Muted, "unmuted": Unmuted,
    "ack": Message | DirectMessage, "error": ChatError}

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "src" / "wschat_client"
SNIPPETS = HERE / "typecheck"


@pytest.fixture(scope="module")
def mypy(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[str, int]]:
    try:
        import mypy.api as mypy_api
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("mypy is missing (the test extra: pip install -e 'clients/python[test]')")
    cache = tmp_path_factory.mktemp("mypy-cache")

    def run(*files: Path) -> tuple[str, int]:
        # The package by its path: its folder (src) goes first on mypy's search path, so the
        # snippets import this tree's package, not an installed one.
        out, err, status = mypy_api.run(["--strict", "--config-file=", "--cache-dir",
                                         str(cache), "--no-color-output", "--no-pretty",
                                         str(PACKAGE), *map(str, files)])
        return out + err, status
    return run


def test_package_type_checks_strict(mypy: Callable[..., tuple[str, int]]) -> None:
    out, status = mypy()
    assert status == 0, out


def test_app_with_fitting_handlers_type_checks(mypy: Callable[..., tuple[str, int]]) -> None:
    out, status = mypy(SNIPPETS / "app_ok.py")
    assert status == 0, out


def test_app_with_wrong_handlers_is_reported(mypy: Callable[..., tuple[str, int]]) -> None:
    snippet = SNIPPETS / "app_wrong.py"
    marked = {number for number, line in enumerate(snippet.read_text().splitlines(), 1)
              if re.search(r"\S\s+#\s*error\b", line)}  # code, then the comment
    out, status = mypy(snippet)
    assert status == 1, out
    reported = {int(m[1]) for m in
                re.finditer(r"^.*app_wrong\.py:(\d+): error:", out, re.MULTILINE)}
    assert reported == marked, out
    # nothing in the package, nor anywhere else
    assert not re.search(r"^(?!.*app_wrong\.py).*: error:", out, re.MULTILINE), out


def test_sync_client_options_are_the_clients() -> None:
    """``SyncClient(url, **options)`` is typed by ``ClientOptions``: the keyword options of
    ``Client``, each with its type, named by the package (an app's options dict)."""
    assert wschat_client.ClientOptions is ClientOptions
    params = inspect.signature(Client.__init__).parameters
    keywords = {name for name, p in params.items() if p.kind is p.KEYWORD_ONLY}
    hints = get_type_hints(Client.__init__)
    assert get_type_hints(ClientOptions) == {name: hints[name] for name in keywords}
    assert not ClientOptions.__required_keys__  # each has its default


@pytest.mark.parametrize("cls", [Client, SyncClient])
def test_every_event_name_has_its_overload(cls: type[Any]) -> None:
    """Each name ``on()`` takes (``EventName``, the client's ``EVENTS``) is named by an
    overload of its own, besides the last one (any ``EventName``, any payload)."""
    assert set(get_args(EventName)) == EVENTS
    overloads = get_overloads(cls.on)
    assert overloads, "on() has no overloads"
    named: dict[str, Any] = {}
    for fn in overloads[:-1]:
        hints = get_type_hints(fn)
        assert typing.get_origin(hints["event"]) is typing.Literal
        (payload, _result) = get_args(hints["handler"])
        for name in get_args(hints["event"]):
            assert name not in named, f"{name} in two overloads"
            named[name] = payload[0]
    assert named == PAYLOADS
    assert get_type_hints(overloads[-1])["event"] == EventName
