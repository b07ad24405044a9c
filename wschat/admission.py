"""Admission limits and the client's address, checked before the upgrade.

:class:`ConnectionBudget` is ``MAX_CONNECTIONS`` for the whole server,
:class:`AddressLimit` ``MAX_CONNECTIONS_PER_IP`` for this worker, and
:func:`remote_address` says whose connection it is (``TRUSTED_PROXIES``).
"""

from __future__ import annotations

from typing import Any


class ConnectionBudget:
    """``MAX_CONNECTIONS`` for the whole server: one counter slot per gunicorn worker.

    The slots live in shared memory the gunicorn master creates before forking
    (see ``gunicorn.conf.py``); without gunicorn, a local counter is used.
    Admission reads the sum without a lock, so concurrent workers may overshoot
    the limit by at most (workers - 1) connections.
    """

    def __init__(self, limit: int, slots: Any = None, slot: int = 0) -> None:
        self.limit = limit
        self._slots = slots if slots is not None else [0]
        self._slot = slot if slots is not None else 0

    def attach(self, slots: Any, slot: int) -> None:
        local = self._slots[self._slot]
        self._slots, self._slot = slots, slot
        self._slots[slot] = local

    def try_acquire(self) -> bool:
        if sum(self._slots) >= self.limit:
            return False
        self._slots[self._slot] += 1
        return True

    def release(self) -> None:
        self._slots[self._slot] = max(0, self._slots[self._slot] - 1)


class AddressLimit:
    """``MAX_CONNECTIONS_PER_IP`` for this worker: connections (and admissions under way)
    per address; 0 means no limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}

    def claim(self, addr: str) -> bool:
        """Count one more connection from ``addr``; False (nothing counted) at the limit.
        Released when the connection ends (or when the handshake fails before it began)."""
        held = self.counts.get(addr, 0)
        if self.limit and held >= self.limit:
            return False
        self.counts[addr] = held + 1
        return True

    def release(self, addr: str) -> None:
        held = self.counts.get(addr, 0)
        if held <= 1:
            self.counts.pop(addr, None)
        else:
            self.counts[addr] = held - 1


def remote_address(environ: dict[str, Any], trusted_proxies: int = 0) -> str:
    """The client's address: the peer, or with ``trusted_proxies`` N > 0 the address the
    Nth proxy from us recorded in ``X-Forwarded-For`` (entries further left are the
    client's own claims and are never trusted)."""
    peer = str(environ.get("REMOTE_ADDR") or "")
    if trusted_proxies <= 0:
        return peer
    hops = [h.strip() for h in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
    # Fewer entries than proxies: the request did not come through them all (or the
    # header is the client's own invention): only the TCP peer is known for sure.
    return hops[-trusted_proxies] if len(hops) >= trusted_proxies else peer
