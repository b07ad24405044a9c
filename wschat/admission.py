"""Admission: what an upgrade to ``/ws`` must pass before the handshake.

:class:`Admission` runs the checks in order and answers :class:`Admitted` or a
:class:`Refusal` (an HTTP status and text; the routes turn it into a response).
:class:`ConnectionBudget` is ``MAX_CONNECTIONS`` for the whole server,
:class:`AddressLimit` ``MAX_CONNECTIONS_PER_IP`` for this worker, and
:func:`remote_address` says whose connection it is (``TRUSTED_PROXIES``).
No Flask here: the checks read the WSGI environ and the query string.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from .auth import Authenticator, AuthError, Identity
from .config import Settings
from .hub import Tally
from .protocol import valid_username
from .ratelimit import address_key
from .stores.base import Unavailable
from .telemetry import Metrics

if TYPE_CHECKING:
    from .chat import Chat
    from .transport import Transport

# The name these lines have always been logged under (operators may filter on it).
log = logging.getLogger("wschat.app")


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
    per client address (:func:`~wschat.ratelimit.address_key`: an IPv6 /64 is one);
    0 means no limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts = Tally()

    def claim(self, addr: str) -> bool:
        """Count one more connection from ``addr``; False (nothing counted) at the limit.
        Released when the connection ends (or when the handshake fails before it began)."""
        key = address_key(addr)
        held = self.counts.get(key, 0)
        if self.limit and held >= self.limit:
            return False
        self.counts.add(key)
        return True

    def release(self, addr: str) -> None:
        self.counts.remove(address_key(addr))


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


# -- the checks before the upgrade -------------------------------------------------------

class Refusal(NamedTuple):
    """An upgrade answered in HTTP instead: each refusal is an answer, never a half-open socket."""

    status: int
    text: str
    reason: str  # the label of wschat_handshakes_refused_total
    headers: dict[str, str] | None = None


class Admitted(NamedTuple):
    identity: Identity
    authenticated: bool
    addr: str
    conn_id: str  # the connection's id from here (its place among its user's: claim())


TOO_MANY_FOR_USER = Refusal(429, "too many connections for this user (MAX_CONNECTIONS_PER_USER)",
                            "max_connections_per_user", {"Retry-After": "5"})


class Admission:
    """Every check an upgrade to ``/ws`` passes before the handshake, in order: shutting
    down, a WebSocket request at all (RFC 6455 4.2.1), ``ALLOWED_ORIGINS``, the token or
    guest name, the shared store, and the limits (per user, per address, per server).

    An admitted upgrade holds a slot of the budget and of its address until
    :meth:`release` or the connection's end (:meth:`Transport.forget`)."""

    def __init__(self, settings: Settings, authenticator: Authenticator, chat: Chat,
                 transport: Transport, metrics: Metrics) -> None:
        self.settings = settings
        self.authenticator = authenticator
        self.chat = chat
        self.transport = transport
        self.metrics = metrics
        self.allowed_origins = frozenset(_normal_origin(o) for o in settings.allowed_origins)

    def check(self, environ: dict[str, Any], query: Mapping[str, str]) -> Admitted | Refusal:
        verdict = self._verdict(environ, query)
        if isinstance(verdict, Refusal):
            self.metrics.handshake_refused(verdict.reason)
        return verdict

    def _verdict(self, environ: dict[str, Any], query: Mapping[str, str]) -> Admitted | Refusal:
        if self.transport.shutting_down:
            return Refusal(503, "server is shutting down", "shutting_down")
        if "websocket" not in environ.get("HTTP_UPGRADE", "").lower():
            return Refusal(426, "this endpoint speaks WebSocket only", "not_websocket",
                           {"Upgrade": "websocket"})
        problem = _handshake_problem(environ)
        if problem is not None:
            return problem
        addr = remote_address(environ, self.settings.trusted_proxies)
        if not _origin_allowed(environ.get("HTTP_ORIGIN"), self.allowed_origins):
            log.info("upgrade refused (403) for %s: origin %r is not in ALLOWED_ORIGINS",
                     addr, environ.get("HTTP_ORIGIN"))
            return Refusal(403, "origin not allowed", "origin")
        token = query.get("token") or _bearer(environ.get("HTTP_AUTHORIZATION"))
        if token:
            try:
                identity = self.authenticator.verify(token)
            except AuthError as err:
                self.metrics.auth_failed(err.code.value)
                log.info("upgrade refused (401) for %s: %s (%s)", addr, err.message,
                         err.code.value)
                return Refusal(401, err.message, "auth")
            authenticated = True
        else:
            username = query.get("username")
            if username is not None and not valid_username(username):
                return Refusal(400, "usernames are 1-32 characters: letters, digits, "
                                    "spaces inside, _ . -", "username")
            identity = _guest_identity(username)
            authenticated = False
        if not self.chat.stores.broker.healthy():
            # The shared store is away: a connection could not be registered (nor its
            # rooms joined); say so in HTTP rather than upgrade and cut it.
            return self._store_away()
        cap = self.settings.max_connections_per_user if authenticated else 0
        # Counted from its admission (hub.arriving below), not only once the chat has
        # registered it: a burst of upgrades, all checked first, would each see none.
        if cap and self.chat.hub.connections_of(identity.user_id) >= cap:
            return TOO_MANY_FOR_USER
        if not self.transport.addresses.claim(addr):
            return Refusal(429, "too many connections from this address "
                                "(MAX_CONNECTIONS_PER_IP)", "max_connections_per_ip",
                           {"Retry-After": "5"})
        if not self.transport.budget.try_acquire():
            self.transport.addresses.release(addr)
            return Refusal(503, "server is at MAX_CONNECTIONS", "max_connections",
                           {"Retry-After": "5"})
        conn_id = self.transport.new_conn_id()
        if cap:  # the user's connections on the other workers and pods too (with Redis)
            refusal = self._claim(conn_id, identity.user_id, cap)
            if refusal is not None:
                self.transport.budget.release()
                self.transport.addresses.release(addr)
                return refusal
        # Never negotiate permessage-deflate: it costs ~100 KiB of zlib state per
        # connection and would make shared, encode-once frames impossible.
        environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
        if authenticated:
            self.chat.hub.arriving.add(identity.user_id)
        return Admitted(identity, authenticated, addr, conn_id)

    def _store_away(self) -> Refusal:
        return Refusal(503, f"{self.chat.stores.name} unreachable; retry", "unavailable",
                       {"Retry-After": "2"})

    def _claim(self, conn_id: str, user_id: str, cap: int) -> Refusal | None:
        """A place among the user's connections in the shared store (every worker and pod
        with Redis), held until the connection is registered: concurrent upgrades on
        several workers cannot pass the cap together."""
        try:
            if self.chat.stores.presence.claim(conn_id, user_id, cap):
                return None
        except Unavailable as exc:
            log.warning("upgrade refused (503): the user's connections not counted: %s", exc)
            return self._store_away()
        return TOO_MANY_FOR_USER

    def release(self, admitted: Admitted) -> None:
        """Admitted, but the handshake failed before :meth:`Transport.serve` took the slot over."""
        self.transport.budget.release()
        self.transport.addresses.release(admitted.addr)
        if admitted.authenticated:
            self.chat.hub.arriving.remove(admitted.identity.user_id)
            self.chat.stores.presence.release_claim(admitted.conn_id, admitted.identity.user_id)


def _guest_identity(username: str | None) -> Identity:
    user_id = f"guest-{secrets.token_hex(6)}"
    return Identity(user_id, username or f"guest-{user_id[-6:]}", None)


def _bearer(value: str | None) -> str | None:
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip() or None
    return None


def _normal_origin(origin: str) -> str:
    # Scheme and host are case-insensitive (RFC 6454); browsers never send a
    # trailing slash, configuration files sometimes do.
    return origin.strip().rstrip("/").lower()


def _origin_allowed(origin: str | None, allowed: frozenset[str]) -> bool:
    """Cross-site WebSocket hijacking guard.

    Browsers always send ``Origin`` on a WebSocket upgrade, so a request
    without one is not a browser being abused from another site (and a
    non-browser client could send any value anyway): it is allowed.
    """
    if not allowed or origin is None:
        return True
    return _normal_origin(origin) in allowed


def _handshake_problem(environ: dict[str, Any]) -> Refusal | None:
    """RFC 6455 4.2.1 checks, answered in HTTP before any upgrade."""
    if environ.get("REQUEST_METHOD") != "GET":
        return Refusal(405, "a WebSocket upgrade is a GET", "bad_handshake", {"Allow": "GET"})
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
        return Refusal(426, "only WebSocket version 13 is supported", "bad_handshake",
                       {"Sec-WebSocket-Version": "13", "Upgrade": "websocket"})
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid_key = False
    if not valid_key:
        return Refusal(400, "Sec-WebSocket-Key must be 16 bytes in base64", "bad_handshake")
    # Tokens, not substrings, as wsproto checks them after us: "Connection: notupgrade"
    # passed here and was refused there, uncounted.
    if "upgrade" not in _tokens(environ.get("HTTP_CONNECTION", "")):
        return Refusal(400, "Connection: Upgrade is required", "bad_handshake")
    if environ.get("HTTP_UPGRADE", "").strip().lower() != "websocket":
        return Refusal(400, "Upgrade: websocket is required (alone)", "bad_handshake")
    if not environ.get("HTTP_HOST", "").strip():
        # RFC 6455 4.2.1; h11 refused it in the handshake, unhandled: a 500 and an ERROR
        # line with a traceback for every such request.
        return Refusal(400, "Host is required", "bad_handshake")
    return None


def _tokens(value: str) -> list[str]:
    """A comma-separated header's tokens, lower-cased."""
    return [token.strip().lower() for token in value.split(",")]
