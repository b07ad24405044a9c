"""JWT verification: a token in, an :class:`Identity` out (or an :class:`AuthError`).

Algorithms are always pinned (``JWT_ALGORITHMS``, or the one family that fits
the configured key), so ``alg: none`` and HS256-signed-with-the-public-key
tokens are refused by construction. ``exp`` and ``sub`` are required; ``nbf``
and ``iat`` are checked when present (all three must be JSON numbers),
``aud``/``iss`` when configured (a token with an ``aud`` is refused when no
``JWT_AUDIENCE`` is set).

Keys come from exactly one place in the configuration: ``JWT_SECRET``,
``JWT_PUBLIC_KEY`` or ``JWT_JWKS_URL``. Header fields that name other keys
(``jku``, ``x5u``, ``jwk``, ``x5c``) are never followed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from .config import ConfigError, Settings
from .errors import WschatError
from .protocol import (
    GUEST_ID_PREFIX,
    MAX_USER_ID_CHARS,
    RESERVED_USER_IDS,
    ErrorCode,
    is_guest_id,
    room_patterns,
    unsafe_id_chars,
)

log = logging.getLogger("wschat.auth")

MAX_USERNAME_CHARS = 64
# The rule a token's sub shares with the ids that name a user to moderate
# (wschat.protocol.valid_user_id): no user may pose as the server API (`system`) or as
# the `by` of its moderation events (`api`).
MAX_SUB_CHARS = MAX_USER_ID_CHARS
RESERVED_SUBS = RESERVED_USER_IDS
JWKS_MIN_INTERVAL = 30.0  # at most one JWKS fetch per this many seconds
JWKS_MAX_AGE = 300.0  # refetch keys this old (key rotation), still at most once per interval
JWKS_FETCH_TIMEOUT = 5.0
JWKS_FAILURE_LOG_INTERVAL = 60.0  # while fetches keep failing, one warning per this many seconds
MIN_HMAC_SECRET_BYTES = 32  # RFC 7518 3.2: a key at least as long as the hash output


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    username: str
    # Unix seconds after which the token is no longer accepted: its ``exp`` plus
    # ``JWT_LEEWAY``, so a live connection ends exactly when a reconnect would fail.
    expires_at: float | None
    # Room-name patterns from the token's ``rooms`` claim (None: no claim) and
    # ``mod_rooms`` claim: see wschat.access.
    rooms: tuple[str, ...] | None = None
    mod_rooms: tuple[str, ...] = ()


class AuthError(WschatError):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _load_public_key(value: str) -> str:
    value = value.strip()
    if value.startswith("-----BEGIN"):
        # A PEM squeezed into one line of a .env file or manifest keeps "\n" escapes.
        return value.replace("\\n", "\n") if "\n" not in value else value
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as fh:
            return fh.read()
    raise ConfigError("JWT_PUBLIC_KEY: neither a PEM value nor a readable file")


def _key_family(pem: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(default algorithms, every algorithm this key can verify) for a PEM public key."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise ConfigError(f"JWT_PUBLIC_KEY: not a PEM public key ({exc})") from None
    if isinstance(key, rsa.RSAPublicKey):
        return ("RS256",), ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    if isinstance(key, ec.EllipticCurvePublicKey):
        # An EC key verifies exactly one ES* algorithm: the one of its curve.
        alg = {"secp256r1": "ES256", "secp384r1": "ES384",
               "secp521r1": "ES512"}.get(key.curve.name)
        if alg is None:
            raise ConfigError(f"JWT_PUBLIC_KEY: unsupported curve {key.curve.name}")
        return (alg,), (alg,)
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return ("EdDSA",), ("EdDSA",)
    raise ConfigError("JWT_PUBLIC_KEY: unsupported key type")


class JwksKeys:
    """Signing keys from the configured ``JWT_JWKS_URL``, cached.

    The endpoint is fetched at most once per ``min_interval``, whatever
    tokens arrive: keys older than ``max_age`` are refetched (rotation), and a
    token naming an unknown ``kid`` triggers a refetch only when the last one
    is at least ``min_interval`` old, so a stream of forged ``kid``s costs the
    identity provider nothing. When a fetch fails the keys already known stay
    in use. The URL is only ever the configured one.

    A run of failed fetches is logged as an operator reads it: the first failure as a
    warning, the repeats at most once per ``JWKS_FAILURE_LOG_INTERVAL`` with their count
    (a worker retrying every few seconds would otherwise write a warning each time),
    and the first success after them once, at info.

    Until a first set is loaded (:meth:`load`, from the worker's start on) no
    token can be verified, and the worker is not ready (:attr:`loaded`).
    """

    def __init__(self, url: str, min_interval: float = JWKS_MIN_INTERVAL,
                 max_age: float = JWKS_MAX_AGE, timeout: float = JWKS_FETCH_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        try:
            # cache_jwk_set=False: this class is the cache (PyJWT's own never
            # forgets a key once its per-kid LRU holds it, even after rotation).
            self._client = jwt.PyJWKClient(url, cache_jwk_set=False, cache_keys=False,
                                           timeout=timeout)
        except jwt.PyJWKClientError as exc:
            raise ConfigError(f"JWT_JWKS_URL: {exc}") from None
        self.url = url
        self.min_interval = min_interval
        self.max_age = max_age
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # last fetch, successful or not
        self._failures = 0  # fetches failed in a row
        self._failing_since = 0.0  # the first of them
        self._failure_logged_at = 0.0  # the last warning about them
        self._lock = threading.Lock()  # gevent-patched in workers: one fetch at a time

    @property
    def loaded(self) -> bool:
        """A key set has been fetched; a later failed refresh keeps it (and this) as it is."""
        return self._fetched_at is not None

    def load(self) -> bool:
        """Fetch the key set now unless one is loaded or a fetch is under way; whether one
        is loaded. For the worker's start and its retries, not for tokens: it does not
        wait for ``min_interval``."""
        if not self.loaded and self._lock.acquire(blocking=False):
            try:
                if not self.loaded:
                    self._fetch(self._clock())
            finally:
                self._lock.release()
        return self.loaded

    def get(self, kid: Any) -> jwt.PyJWK:
        """The key named ``kid``.

        Raises:
            AuthError: ``auth_failed`` when no such key is known (after at most
                one permitted refetch).
        """
        if not isinstance(kid, str) or not kid:
            raise AuthError(ErrorCode.AUTH_FAILED, "invalid token: no 'kid' in its header")
        key = self._keys.get(kid)
        if key is not None:
            # A known key never waits behind a fetch (one a forged kid triggered, to
            # an identity provider that answers slowly): refresh stale keys only if
            # no fetch is under way, else use them as they are.
            if self._fetched_at is not None and self._clock() - self._fetched_at < self.max_age:
                return key
            if not self._lock.acquire(blocking=False):
                return key
            try:
                now = self._clock()
                if self._may_fetch(now):
                    self._fetch(now)  # a key the new set lacks is no longer trusted
                key = self._keys.get(kid)
            finally:
                self._lock.release()
            if key is None:
                raise AuthError(ErrorCode.AUTH_FAILED, "invalid token: unknown signing key")
            return key
        with self._lock:
            now = self._clock()
            stale = self._fetched_at is None or now - self._fetched_at >= self.max_age
            if (stale or kid not in self._keys) and self._may_fetch(now):
                self._fetch(now)
            key = self._keys.get(kid)
        if key is None:
            raise AuthError(ErrorCode.AUTH_FAILED, "invalid token: unknown signing key")
        return key

    def _may_fetch(self, now: float) -> bool:
        return self._attempted_at is None or now - self._attempted_at >= self.min_interval

    def _fetch(self, now: float) -> None:
        self._attempted_at = now
        try:
            keys = self._client.get_signing_keys()
        except (jwt.PyJWTError, ValueError, OSError) as exc:  # down, not JSON, no keys
            self._failed(now, exc)
            return
        self._keys = {k.key_id: k for k in keys if k.key_id}
        self._fetched_at = now
        if self._failures:
            log.info("JWKS fetch from %s succeeded after %d failed attempts in %.0f s "
                     "(%d keys)", self.url, self._failures, now - self._failing_since,
                     len(self._keys))
            self._failures = 0

    def _failed(self, now: float, exc: Exception) -> None:
        self._failures += 1
        if self._failures == 1:
            self._failing_since = self._failure_logged_at = now
            log.warning("JWKS fetch from %s failed (keeping %d known keys): %s",
                        self.url, len(self._keys), exc)
        elif now - self._failure_logged_at >= JWKS_FAILURE_LOG_INTERVAL:
            self._failure_logged_at = now
            log.warning("JWKS fetch from %s still failing: %d failed attempts in %.0f s "
                        "(keeping %d known keys): %s", self.url, self._failures,
                        now - self._failing_since, len(self._keys), exc)
        else:
            log.debug("JWKS fetch from %s failed again: %s", self.url, exc)


class Authenticator:
    """Verifies tokens against the configured secret, public key or JWKS URL."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway
        self.jwks: JwksKeys | None = None
        self._key: Any = None
        usable: tuple[str, ...]
        if settings.jwt_secret:
            self._key = settings.jwt_secret
            default: tuple[str, ...] = ("HS256",)
            usable = ("HS256", "HS384", "HS512")
            if len(settings.jwt_secret.encode()) < MIN_HMAC_SECRET_BYTES:
                log.warning("JWT_SECRET is shorter than %d bytes: easier to brute-force "
                            "offline from any token", MIN_HMAC_SECRET_BYTES)
        elif settings.jwt_public_key:
            self._key = _load_public_key(settings.jwt_public_key)
            default, usable = _key_family(self._key)
        elif settings.jwt_jwks_url:
            self.jwks = JwksKeys(settings.jwt_jwks_url)
            default = ("RS256", "ES256", "EdDSA")
            usable = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                      "ES256", "ES384", "ES512", "EdDSA")
        else:
            default = usable = ()
        self.algorithms = settings.jwt_algorithms or default
        wrong = [a for a in self.algorithms if a not in usable]
        if wrong and settings.jwt_secret:
            raise ConfigError("JWT_ALGORITHMS: JWT_SECRET only verifies HS256/384/512")
        if wrong and self.algorithms:
            raise ConfigError(f"JWT_ALGORITHMS: {', '.join(wrong)} cannot be verified with "
                              f"the configured key (it verifies {', '.join(usable) or 'none'})")

    @property
    def enabled(self) -> bool:
        return bool(self.algorithms)

    def verify(self, token: str) -> Identity:
        """Check signature and claims.

        Raises:
            AuthError: ``auth_failed`` for any invalid token, ``token_expired``
                for a well-signed token past its ``exp``.
        """
        if not self.enabled:
            raise AuthError(ErrorCode.AUTH_FAILED, "this server accepts no tokens")
        if not isinstance(token, str) or not token:
            raise AuthError(ErrorCode.AUTH_FAILED, "invalid token: empty")
        try:
            key = self._key
            if self.jwks is not None:
                # A PyJWK is bound to one algorithm: PyJWT then refuses a token
                # whose header names another, even one in the pinned list.
                key = self.jwks.get(jwt.get_unverified_header(token).get("kid"))
            claims = jwt.decode(
                token, key, algorithms=list(self.algorithms), audience=self._audience,
                issuer=self._issuer, leeway=self._leeway,
                # aud is always verified: a token meant for another audience is
                # refused even when no JWT_AUDIENCE is configured.
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            # Well signed (PyJWT checks the signature before the claims), but an exp of
            # true is no date: PyJWT took it for 1.
            _check_numeric_dates(jwt.decode(token, options={"verify_signature": False}))
            raise AuthError(ErrorCode.TOKEN_EXPIRED, "token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(ErrorCode.AUTH_FAILED, f"invalid token: {exc}") from None
        _check_numeric_dates(claims)
        sub = claims["sub"]
        if not isinstance(sub, str) or not 0 < len(sub) <= MAX_SUB_CHARS:
            raise AuthError(ErrorCode.AUTH_FAILED, "invalid token: bad 'sub'")
        if unsafe_id_chars(sub):
            # A user id travels in keys, payloads and logs: no control characters, and
            # no lone surrogate (JSON's "\ud800"), which has no UTF-8 at all: the
            # welcome could not be encoded (the connection failed with 1011, or an
            # `auth` had already made the session that user when it failed).
            raise AuthError(ErrorCode.AUTH_FAILED,
                            "invalid token: control characters or lone surrogates in 'sub'")
        if sub in RESERVED_SUBS:
            raise AuthError(ErrorCode.AUTH_FAILED, f"invalid token: 'sub' {sub} is reserved")
        if is_guest_id(sub):
            # The server names its guests so, and shows their ids to every room they
            # join: a token with one would make its holder that guest's user (its DMs,
            # its buckets, in its rooms unseen).
            raise AuthError(ErrorCode.AUTH_FAILED,
                            f"invalid token: 'sub' may not begin with {GUEST_ID_PREFIX!r}")
        try:
            # PyJWT took it for an integer; one beyond any float (10**400) is no date
            expires_at = float(claims["exp"]) + self._leeway
        except (OverflowError, TypeError, ValueError):
            raise AuthError(ErrorCode.AUTH_FAILED, "invalid token: 'exp' is out of range"
                            ) from None
        try:
            rooms = room_patterns(claims.get("rooms"))
            mod_rooms = room_patterns(claims.get("mod_rooms")) or ()
        except ValueError as exc:
            raise AuthError(ErrorCode.AUTH_FAILED, f"invalid token: {exc}") from None
        return Identity(sub, _display_name(claims, sub), expires_at, rooms, mod_rooms)


def _check_numeric_dates(claims: dict[str, Any]) -> None:
    """``exp``, ``nbf`` and ``iat``, when present, must be JSON numbers (RFC 7519 2,
    NumericDate): PyJWT takes whatever ``int()`` takes, so "1796279945" passed as a
    date, and true or false as 1 or 0."""
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name)
        if name in claims and (isinstance(value, bool)
                               or not isinstance(value, int | float)):
            raise AuthError(ErrorCode.AUTH_FAILED, f"invalid token: '{name}' is not a number")


def _display_name(claims: dict[str, Any], sub: str) -> str:
    """``name``, else ``preferred_username``, else ``sub``: printable, trimmed, capped."""
    for value in (claims.get("name"), claims.get("preferred_username"), sub):
        if isinstance(value, str):
            name = "".join(ch for ch in value if ch.isprintable()).strip()
            if name:
                return name[:MAX_USERNAME_CHARS]
    # A sub of nothing printable (invisible format characters, separators): escaped.
    return sub.encode("ascii", "backslashreplace").decode()[:MAX_USERNAME_CHARS]


def mint_token(secret: str, sub: str, name: str | None = None, ttl: float = 3600,
               algorithm: str = "HS256", **claims: Any) -> str:
    """A signed development token (``python -m wschat token``)."""
    now = int(time.time())
    payload: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(ttl), **claims}
    if name:
        payload["name"] = name
    return jwt.encode(payload, secret, algorithm=algorithm)
