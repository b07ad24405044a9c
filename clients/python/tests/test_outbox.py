"""The outbox: bound, order, same-id sends, persistence."""

from __future__ import annotations

from pathlib import Path

import pytest

from wschat_client import FileOutboxStore, OutboxFull, PendingSend
from wschat_client.outbox import Outbox


def send(cmid: str, text: str = "hi") -> PendingSend:
    return PendingSend("message", "general", text, cmid)


def test_bound_refuses_past_the_limit() -> None:
    """At the limit a new send raises OutboxFull and nothing is queued."""
    box = Outbox(limit=2)
    box.add(send("a"))
    box.add(send("b"))
    with pytest.raises(OutboxFull) as err:
        box.add(send("c"))
    assert err.value.code == "outbox_full"
    assert [e.client_msg_id for e in box] == ["a", "b"]


def test_same_client_msg_id_is_one_send() -> None:
    """A second send with a queued client_msg_id returns the queued one, even when full."""
    box = Outbox(limit=1)
    first = box.add(send("a"))
    assert box.add(send("a", "other text")) is first
    assert len(box) == 1


def test_order_is_kept_and_removal_frees_room() -> None:
    """Entries stay in send order; removing one makes room for another."""
    box = Outbox(limit=3)
    entries = [box.add(send(c)) for c in "abc"]
    box.remove(entries[1])
    box.add(send("d"))
    assert [e.client_msg_id for e in box] == ["a", "c", "d"]


def test_file_store_survives_a_restart(tmp_path: Path) -> None:
    """What one run queued, the next run restores, in order, without runtime state."""
    path = tmp_path / "outbox.json"
    box = Outbox(store=FileOutboxStore(path))
    box.add(send("a", "one"))
    box.add(PendingSend("dm", "user-2", "two", "b"))
    box.remove(box.add(send("c", "acknowledged")))
    again = Outbox(store=FileOutboxStore(path))
    restored = again.restore()
    assert [(e.kind, e.target, e.text, e.client_msg_id) for e in restored] == [
        ("message", "general", "one", "a"), ("dm", "user-2", "two", "b")]
    assert all(e.future is None and e.wire_generation is None for e in restored)


def test_file_store_ignores_garbage(tmp_path: Path) -> None:
    """A missing, foreign or damaged file restores nothing rather than failing."""
    path = tmp_path / "outbox.json"
    assert Outbox(store=FileOutboxStore(path)).restore() == []
    path.write_text('{"not": "a list"}')
    assert Outbox(store=FileOutboxStore(path)).restore() == []
    path.write_text('[{"kind": "message"}, 3, {"kind": "message", "target": "r", '
                    '"text": "t", "client_msg_id": "x"}]')
    assert [e.client_msg_id for e in Outbox(store=FileOutboxStore(path)).restore()] == ["x"]
