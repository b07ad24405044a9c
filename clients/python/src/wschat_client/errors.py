"""One exception tree; every error carries a ``code``.

::

    ChatError                 the server's ``error`` reply (``code`` as on the wire), or a local one:
    ├── RequestTimeout        no reply within the timeout (also a TimeoutError)   code "timeout"
    ├── Disconnected          the connection closed before the reply came           code "disconnected"
    ├── ClientClosed          the client was closed, or the server closed it for good
    │                         (a terminal close code: ``close_code``)               code "closed"
    └── OutboxFull            the outbox holds ``max_outbox`` unacknowledged sends  code "outbox_full"

A send is never failed by a disconnection: it stays in the outbox and goes out
again after the reconnect. Only the server's refusal (``invalid_room``,
``message_too_large``, ...), leaving the room or being removed from it, or closing
the client end it.
"""

from __future__ import annotations

from typing import Any


class ChatError(Exception):
    """An error reply from the server, or a request the client could not complete.

    Attributes:
        code: the server's error code (``not_in_room``, ``rate_limited``, ...) or
            one of the local codes above.
        message: human-readable text.
        retry_after_ms: for ``rate_limited``, how long the server asked to wait (whole
            ms, at most a day; None when the server's value was not a finite number
            >= 0: ``client._retry_after_ms``).
        details: the server's whole ``error`` event (``room``, ``until`` for
            ``forbidden``/``muted``, ...); empty for local errors.
    """

    def __init__(self, code: str, message: str = "", retry_after_ms: int | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.details = details or {}


class RequestTimeout(ChatError, TimeoutError):
    """No reply arrived in time."""

    def __init__(self, message: str = "no reply in time") -> None:
        super().__init__("timeout", message)


class Disconnected(ChatError):
    """The connection closed while a request (not a send) waited for its reply."""

    def __init__(self, message: str = "connection closed before the reply") -> None:
        super().__init__("disconnected", message)


class ClientClosed(ChatError):
    """The client is closed: by the app, or by a close code that must not be retried.

    Attributes:
        close_code: the WebSocket close code, or the HTTP status of a refused
            handshake (401, 403, ...), or 1015 when the server's TLS certificate failed
            verification before the first ``welcome`` since ``connect()`` (the message says
            why; once connected it is retried, told by ``error`` events with code
            ``tls_certificate``), or None when the app closed the client.
    """

    def __init__(self, message: str = "client closed", close_code: int | None = None) -> None:
        super().__init__("closed", message)
        self.close_code = close_code


class OutboxFull(ChatError):
    """The outbox is at its bound; nothing was queued."""

    def __init__(self, limit: int) -> None:
        super().__init__("outbox_full", f"{limit} sends are waiting for their acknowledgement")


# Server error codes after which the same request can succeed if sent again later.
RETRYABLE_CODES = frozenset({"rate_limited", "unavailable", "internal_error"})
