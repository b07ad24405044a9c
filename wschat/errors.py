"""The root of every error wschat raises on purpose.

Protocol (:class:`wschat.protocol.ProtocolError`), auth
(:class:`wschat.auth.AuthError`), store (:class:`wschat.stores.base.Unavailable`,
:class:`~wschat.stores.base.InboxFull`, the database's
:class:`~wschat.persistence.SchemaTooNew`), configuration
(:class:`wschat.config.ConfigError`), HTTP API (:class:`wschat.api.ApiError`) and
terminal-client (:class:`wschat.terminal.ConnectFailed`) errors all derive from
:class:`WschatError`, so a caller can tell "wschat refused" from a bug with one
``except``.
"""

from __future__ import annotations


class WschatError(Exception):
    """An error wschat raises on purpose (see the module's docstring)."""
