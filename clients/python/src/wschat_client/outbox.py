"""The outbox: sends kept until the server's echo acknowledges them.

Bounded (``OutboxFull`` past ``limit``), in send order, and optionally persisted
through an :class:`OutboxStore` so a restart of the app does not lose a send: on
start the stored sends are queued again with their ``client_msg_id``, which the
server uses to drop the copy it may already have (and answer with the original).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from .errors import ChatError, OutboxFull

Kind = Literal["message", "dm"]


@dataclass(slots=True, eq=False)
class PendingSend:
    """One unacknowledged ``message`` (``target`` = room) or ``dm`` (``target`` = user_id)."""

    kind: Kind
    target: str
    text: str
    client_msg_id: str
    # Runtime state, never persisted:
    future: asyncio.Future[Any] | None = field(default=None, repr=False)
    wire_generation: int | None = None  # the connection it was last written to
    request_id: str | None = None
    sent_at: float = 0.0  # loop time it was last written
    not_before: float = 0.0  # loop time before which it is not (re)sent
    failures: int = 0  # retryable refusals in a row (for the backoff)
    # Its room was left or removed while it was on the wire (with that error): its echo or
    # the server's refusal settles it; never written again.
    left: ChatError | None = None
    restored: bool = False  # from the store: written (if ever) by an earlier run, as whoever

    @property
    def key(self) -> str:
        """What the order is kept per: the room, or the DM's recipient."""
        return f"{self.kind}:{self.target}"

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "target": self.target, "text": self.text,
                "client_msg_id": self.client_msg_id}

    def frame(self, request_id: str) -> dict[str, Any]:
        key = "room" if self.kind == "message" else "to"
        return {"type": self.kind, key: self.target, "text": self.text,
                "client_msg_id": self.client_msg_id, "id": request_id}


class OutboxStore(Protocol):
    """Where the outbox is kept between runs of the app (called on the event loop:
    keep it quick, or buffer and write elsewhere)."""

    def load(self) -> list[dict[str, str]]:
        """The sends saved by the previous run (``PendingSend.to_json()`` dicts), oldest first."""
        ...

    def save(self, entries: list[dict[str, str]]) -> None:
        """Replace what is stored with ``entries`` (oldest first)."""
        ...


class FileOutboxStore:
    """An :class:`OutboxStore` in a JSON file, replaced atomically on every change."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> list[dict[str, str]]:
        try:
            data = json.loads(self.path.read_text("utf-8"))
        except FileNotFoundError:
            return []
        return [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []

    def save(self, entries: list[dict[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(entries, out)
        os.replace(tmp, self.path)


class Outbox:
    """Unacknowledged sends in order, at most ``limit``, mirrored to ``store`` if given.

    A store that raises (a full disk) is reported to ``on_store_error`` and the outbox
    goes on in memory, as the JS client's: the failure never cuts an acknowledgement or a
    send short halfway (an echo not handed on, a send never resolved).
    """

    def __init__(self, limit: int = 1000, store: OutboxStore | None = None,
                 on_store_error: Callable[[Exception], None] | None = None) -> None:
        if limit < 1:
            raise ValueError("the outbox limit must be at least 1")
        self.limit = limit
        self.store = store
        self.on_store_error = on_store_error
        self._entries: dict[str, PendingSend] = {}  # by client_msg_id, in insertion order

    def restore(self) -> list[PendingSend]:
        """Queue the sends the store kept from a previous run (no futures: nobody awaits them)."""
        restored = []
        try:
            loaded = self.store.load() if self.store else []
        except Exception as exc:
            self._store_failed(exc)
            loaded = []
        for obj in loaded:
            kind, target = obj.get("kind"), obj.get("target")
            text, cmid = obj.get("text"), obj.get("client_msg_id")
            if (kind in ("message", "dm") and isinstance(target, str) and isinstance(text, str)
                    and isinstance(cmid, str) and cmid not in self._entries
                    and len(self._entries) < self.limit):
                entry = PendingSend(kind, target, text, cmid,  # type: ignore[arg-type]
                                    restored=True)
                self._entries[cmid] = entry
                restored.append(entry)
        return restored

    def add(self, entry: PendingSend) -> PendingSend:
        """Queue ``entry``; a send with a ``client_msg_id`` already queued returns that one.

        Raises:
            OutboxFull: ``limit`` sends are already waiting.
        """
        existing = self._entries.get(entry.client_msg_id)
        if existing is not None:
            return existing
        if len(self._entries) >= self.limit:
            raise OutboxFull(self.limit)
        self._entries[entry.client_msg_id] = entry
        self._save()
        return entry

    def get(self, client_msg_id: str | None) -> PendingSend | None:
        return self._entries.get(client_msg_id) if client_msg_id is not None else None

    def remove(self, entry: PendingSend) -> None:
        if self._entries.get(entry.client_msg_id) is entry:
            del self._entries[entry.client_msg_id]
            self._save()

    def __iter__(self) -> Iterator[PendingSend]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def _save(self) -> None:
        if self.store is not None:
            try:
                self.store.save([e.to_json() for e in self._entries.values()])
            except Exception as exc:
                self._store_failed(exc)

    def _store_failed(self, exc: Exception) -> None:
        if self.on_store_error is None:
            raise exc
        self.on_store_error(exc)
