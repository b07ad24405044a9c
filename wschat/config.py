"""Settings: the one typed object built from the environment at start-up.

Every variable is parsed and validated here, once; a bad value raises
:class:`ConfigError` naming the variable, and the server refuses to start.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from .errors import WschatError
from .logs import JsonFormatter
from .protocol import room_patterns  # the one place room-name patterns are validated


class ConfigError(WschatError, ValueError):
    """A configuration variable has a value the server cannot run with."""


@contextmanager
def exit_on_config_error() -> Iterator[None]:
    """In a gunicorn worker: a :class:`ConfigError` stops the server with one clear line
    and no traceback. Exit status 3 is gunicorn's "worker failed to boot", which stops
    the master instead of respawning the worker forever."""
    try:
        yield
    except ConfigError as exc:
        report_config_error(str(exc))
        raise SystemExit(3) from None


def report_config_error(message: str, environ: Mapping[str, str] | None = None) -> None:
    """Print why the server cannot start, one line on stderr: with ``LOG_FORMAT=json``
    a JSON log line (:class:`wschat.logs.JsonFormatter`'s shape, logger
    ``wschat.config``), as a log pipeline reading JSON lines expects; otherwise, and when
    ``LOG_FORMAT`` itself is unusable, ``wschat: configuration error: <message>``."""
    environ = os.environ if environ is None else environ
    try:
        json_format = _log_format(environ.get("LOG_FORMAT", "text")) == "json"
    except ValueError:
        json_format = False
    if json_format:
        record = logging.LogRecord("wschat.config", logging.ERROR, __file__, 0,
                                   f"configuration error: {message}", None, None)
        line = JsonFormatter().format(record)
    else:
        line = f"wschat: configuration error: {message}"
    print(line, file=sys.stderr, flush=True)


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"expected a number (an integer), got {raw!r}") from None
        if lo is not None and value < lo:
            raise ValueError(f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise ValueError(f"must be <= {hi}, got {value}")
        return value

    return parse


def _float(lo: float | None = None, hi: float | None = None) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number, got {raw!r}")
        if lo is not None and value < lo:
            raise ValueError(f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise ValueError(f"must be <= {hi:g}, got {value:g}")
        return value

    return parse


# A rate's highest value: its tenfold (a guest address's default) stays finite, and so
# does every bucket's refill time (an infinite rate would make take() disagree with
# charge.lua, and Redis refuse a bucket's zero expiry). A billion a second is no limit.
MAX_RATE = 1e9
# A bucket's highest size: its key in Redis expires when the bucket would be full again,
# (burst - tokens) / rate, and SET PX refuses past ~9.2e18 ms. With 10 x this (a guest
# address's default) over the lowest rate (0.001/s) that is 1e16 ms: well inside.
MAX_BURST = 1_000_000_000


# Ten million per server: beyond any one machine's memory at tens of KiB per connection.
MAX_CONNECTIONS_LIMIT = 10_000_000


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {raw!r}")
        return value

    return parse


_log_format = _choice("text", "json")


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _origins(raw: str) -> tuple[str, ...]:
    """Origins as browsers send them: scheme://host[:port] (or the literal ``null``)."""
    origins = _csv(raw)
    for origin in origins:
        if origin == "null":
            continue
        try:
            parts = urlsplit(origin.rstrip("/"))
            parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
        except ValueError:
            parts = None
        if (parts is None or "://" not in origin or not parts.scheme or not parts.hostname
                or parts.path or parts.query or parts.fragment or parts.username):
            hint = "; unset allows any origin" if origin == "*" else ""
            raise ValueError(f"{origin!r} is not an origin: scheme://host[:port], as browsers "
                             f"send it (e.g. https://chat.example){hint}")
    return origins


def _optional_str(raw: str) -> str | None:
    return raw.strip() or None


def _redis_url(raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    return value


DEFAULT_DATABASE_URL = "sqlite:///wschat.db"  # relative: in the server's working directory


def _database_url(raw: str) -> str:
    value = raw.strip()
    if not value:
        return DEFAULT_DATABASE_URL
    if value.startswith("sqlite:"):
        if not value.startswith("sqlite:///") or len(value) == len("sqlite:///"):
            raise ValueError("expected sqlite:///PATH (relative to the working directory) or "
                             "sqlite:////ABSOLUTE/PATH")
        return value
    if not value.startswith(("postgres://", "postgresql://")):
        raise ValueError("expected sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
    try:
        urlsplit(value).port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError as exc:
        raise ValueError(f"expected postgresql://USER@HOST:PORT/DB ({exc})") from None
    return value


_JWT_ALGORITHMS = {
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA",
}


def _algorithms(raw: str) -> tuple[str, ...]:
    algorithms = _csv(raw)
    unknown = [a for a in algorithms if a not in _JWT_ALGORITHMS]
    if unknown or not algorithms:
        raise ValueError(f"unsupported algorithm(s) {unknown or raw!r}; "
                         f"choose from {', '.join(sorted(_JWT_ALGORITHMS))}")
    return algorithms


def _room_patterns(raw: str) -> tuple[str, ...]:

    return room_patterns(list(_csv(raw))) or ()


MIN_API_KEY_CHARS = 16


def _api_key(raw: str) -> str | None:
    value = raw.strip()
    if any(not " " <= ch <= "~" for ch in value):
        # It travels in an HTTP header, read as Latin-1: a non-ASCII key matches only for
        # clients that send Latin-1 (Python), never for those that send UTF-8 (curl).
        raise ValueError("must be printable ASCII (it travels in an HTTP header)")
    if value and len(value) < MIN_API_KEY_CHARS:
        raise ValueError(f"must be at least {MIN_API_KEY_CHARS} characters (a random token, "
                         "e.g. python -c \"import secrets; print(secrets.token_urlsafe(32))\")")
    return value or None


def _var(name: str, parse: Callable[[str], Any], default: Any) -> Any:
    return field(default=default, metadata={"env": name, "parse": parse})


@dataclass(frozen=True)
class Settings:
    """Server configuration, one field per environment variable (see README)."""

    host: str = _var("HOST", str.strip, "0.0.0.0")
    port: int = _var("PORT", _int(0, 65535), 8080)
    # Never 0 (some free port): /metrics and /api answer only on the port named here.
    metrics_port: int = _var("METRICS_PORT", _int(1, 65535), 8081)
    web_concurrency: int = _var("WEB_CONCURRENCY", _int(1, 256), 1)
    # Bounded: gunicorn's worker_connections (this + 100) sizes a gevent semaphore, a C long.
    max_connections: int = _var("MAX_CONNECTIONS", _int(1, MAX_CONNECTIONS_LIMIT), 10000)
    # Per worker (each worker counts its own); 0: no cap.
    max_connections_per_ip: int = _var("MAX_CONNECTIONS_PER_IP", _int(0), 1000)
    max_connections_per_user: int = _var("MAX_CONNECTIONS_PER_USER", _int(0), 50)
    # Sockets from one address waiting for their request, per worker (wschat.worker); 0: no cap.
    max_handshakes_per_ip: int = _var("MAX_HANDSHAKES_PER_IP", _int(0), 100)
    rate_limit: float = _var("RATE_LIMIT", _float(0.001, MAX_RATE), 10.0)
    rate_limit_burst: int = _var("RATE_LIMIT_BURST", _int(1, MAX_BURST), 20)
    # Guests from one address together (unset: 10 users' worth, for NATs and offices).
    rate_limit_guest_ip: float | None = _var("RATE_LIMIT_GUEST_IP", _float(0.001, MAX_RATE), None)
    rate_limit_guest_ip_burst: int | None = _var("RATE_LIMIT_GUEST_IP_BURST", _int(1, MAX_BURST),
                                                 None)
    # Every other command (join, leave, list_users, history, auth, ping); unset:
    # RATE_LIMIT per second and 5 x RATE_LIMIT_BURST at once.
    rate_limit_requests: float | None = _var("RATE_LIMIT_REQUESTS", _float(0.001, MAX_RATE), None)
    rate_limit_requests_burst: int | None = _var("RATE_LIMIT_REQUESTS_BURST", _int(1, MAX_BURST),
                                                 None)
    heartbeat_interval: float = _var("HEARTBEAT_INTERVAL", _float(0.05), 30.0)
    enable_persistence: bool = _var("ENABLE_PERSISTENCE", _bool, False)
    database_url: str = _var("DATABASE_URL", _database_url, DEFAULT_DATABASE_URL)
    redis_url: str | None = _var("REDIS_URL", _redis_url, None)
    history_size: int = _var("HISTORY_SIZE", _int(1, 100_000), 100)
    # The memory backend's history, all rooms together, per worker.
    memory_history_bytes: int = _var("MEMORY_HISTORY_BYTES", _int(1024 * 1024),
                                     128 * 1024 * 1024)
    max_message_bytes: int = _var("MAX_MESSAGE_BYTES", _int(256, 16 * 1024 * 1024), 65536)
    # What all of a worker's unfinished incoming messages may hold together.
    max_inbound_buffer_bytes: int = _var("MAX_INBOUND_BUFFER_BYTES", _int(256),
                                         128 * 1024 * 1024)
    max_text_chars: int = _var("MAX_TEXT_CHARS", _int(1), 4000)
    max_outbound_bytes: int = _var("MAX_OUTBOUND_BYTES", _int(4096), 1024 * 1024)
    # The kernel's share of a stalled client's backlog (Linux doubles it); 0: autotuned.
    socket_send_buffer: int = _var("SOCKET_SEND_BUFFER", _int(0, 64 * 1024 * 1024), 262144)
    max_rooms_per_connection: int = _var("MAX_ROOMS_PER_CONNECTION", _int(1), 100)
    presence_ttl: float = _var("PRESENCE_TTL", _float(1.0), 30.0)
    # At most ~31 years: Redis's EXPIRE refuses what overflows its milliseconds.
    room_ttl: float = _var("ROOM_TTL", _float(1.0, 1e9), 3600.0)
    # How long an empty room's last id outlives its history (at least ROOM_TTL is used).
    room_numbering_ttl: float = _var("ROOM_NUMBERING_TTL", _float(1.0, 1e9),
                                     7 * 24 * 3600.0)
    typing_timeout: float = _var("TYPING_TIMEOUT", _float(0.05), 5.0)
    allowed_origins: tuple[str, ...] = _var("ALLOWED_ORIGINS", _origins, ())
    trusted_proxies: int = _var("TRUSTED_PROXIES", _int(0, 10), 0)
    log_format: str = _var("LOG_FORMAT", _log_format, "text")
    log_level: str = _var("LOG_LEVEL", _choice("debug", "info", "warning", "error"), "info")
    graceful_timeout: float = _var("GRACEFUL_TIMEOUT", _float(1.0), 25.0)
    auth_required: bool = _var("AUTH_REQUIRED", _bool, False)
    auth_timeout: float = _var("AUTH_TIMEOUT", _float(0.1), 5.0)
    jwt_secret: str | None = _var("JWT_SECRET", _optional_str, None)
    jwt_public_key: str | None = _var("JWT_PUBLIC_KEY", _optional_str, None)
    jwt_jwks_url: str | None = _var("JWT_JWKS_URL", _optional_str, None)
    jwt_algorithms: tuple[str, ...] | None = _var("JWT_ALGORITHMS", _algorithms, None)
    jwt_audience: str | None = _var("JWT_AUDIENCE", _optional_str, None)
    jwt_issuer: str | None = _var("JWT_ISSUER", _optional_str, None)
    jwt_leeway: float = _var("JWT_LEEWAY", _float(0.0), 5.0)
    # Room access and the server API (wschat.access, wschat.api).
    guest_rooms: tuple[str, ...] = _var("GUEST_ROOMS", _room_patterns, ("*",))
    private_rooms: tuple[str, ...] = _var("PRIVATE_ROOMS", _room_patterns, ())
    api_key: str | None = _var("API_KEY", _api_key, None)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``).

        Raises:
            ConfigError: a variable is malformed or the combination is unusable;
                the message names the variable.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.metadata["env"]
            raw = environ.get(name)
            if raw is None:
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
        settings = cls(**values)
        settings._check()
        return settings

    def _check(self) -> None:
        if self.web_concurrency > 1 and not self.redis_url:
            raise ConfigError(
                f"WEB_CONCURRENCY: {self.web_concurrency} workers need REDIS_URL; without it "
                "each worker would hold its own rooms and users would silently not see each "
                "other. Set REDIS_URL or use WEB_CONCURRENCY=1."
            )
        if self.port and self.port == self.metrics_port:
            raise ConfigError("METRICS_PORT: must differ from PORT")
        sources = [name for name, value in (("JWT_SECRET", self.jwt_secret),
                                            ("JWT_PUBLIC_KEY", self.jwt_public_key),
                                            ("JWT_JWKS_URL", self.jwt_jwks_url)) if value]
        if len(sources) > 1:
            raise ConfigError(
                f"{' and '.join(sources)}: set only one of them (tokens are verified with "
                "keys from exactly one source; the others would be ignored)"
            )
        if self.max_inbound_buffer_bytes < self.max_message_bytes:
            raise ConfigError(
                f"MAX_INBOUND_BUFFER_BYTES: {self.max_inbound_buffer_bytes} is less than "
                f"MAX_MESSAGE_BYTES ({self.max_message_bytes}): a message that size could "
                "never arrive in more than one read"
            )
        if self.auth_required and not self.jwt_configured:
            raise ConfigError(
                "AUTH_REQUIRED: true needs JWT_SECRET, JWT_PUBLIC_KEY or JWT_JWKS_URL"
            )

    @property
    def guest_ip_rate(self) -> float:
        """Messages per second all guests of one IP address may send together."""
        return self.rate_limit_guest_ip or 10 * self.rate_limit

    @property
    def guest_ip_burst(self) -> int:
        return self.rate_limit_guest_ip_burst or 10 * self.rate_limit_burst

    @property
    def request_rate(self) -> float:
        """Request tokens per second of a user's bucket for non-message commands."""
        return self.rate_limit_requests or self.rate_limit

    @property
    def request_burst(self) -> int:
        return self.rate_limit_requests_burst or 5 * self.rate_limit_burst

    @property
    def jwt_configured(self) -> bool:
        return bool(self.jwt_secret or self.jwt_public_key or self.jwt_jwks_url)

