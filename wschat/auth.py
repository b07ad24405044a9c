"""JWT verification: a token in, an :class:`Identity` out (or an :class:`AuthError`).

Algorithms are always pinned (``JWT_ALGORITHMS``, or the one family that fits
the configured key), so ``alg: none`` and HS256-signed-with-the-public-key
tokens are refused by construction. ``exp`` is required.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from .config import ConfigError, Settings
from .protocol import ErrorCode

MAX_USERNAME_CHARS = 64


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    username: str
    expires_at: float | None  # Unix seconds


class AuthError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _load_public_key(value: str) -> str:
    value = value.strip()
    if value.startswith("-----BEGIN"):
        return value
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as fh:
            return fh.read()
    raise ConfigError("JWT_PUBLIC_KEY: neither a PEM value nor a readable file")


def _key_family(pem: str) -> tuple[str, ...]:
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise ConfigError(f"JWT_PUBLIC_KEY: not a PEM public key ({exc})") from None
    if isinstance(key, rsa.RSAPublicKey):
        return ("RS256",)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return ({"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
                .get(key.curve.name, "ES256"),)
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return ("EdDSA",)
    raise ConfigError("JWT_PUBLIC_KEY: unsupported key type")


class Authenticator:
    """Verifies tokens against the configured secret, public key or JWKS URL."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway
        self._jwks: jwt.PyJWKClient | None = None
        self._key: Any = None
        if settings.jwt_secret:
            self._key = settings.jwt_secret
            default: tuple[str, ...] = ("HS256",)
        elif settings.jwt_public_key:
            self._key = _load_public_key(settings.jwt_public_key)
            default = _key_family(self._key)
        elif settings.jwt_jwks_url:
            # Keys cached; the URL is ours, never one named by a token.
            self._jwks = jwt.PyJWKClient(settings.jwt_jwks_url, cache_keys=True,
                                         lifespan=300, timeout=5)
            default = ("RS256", "ES256", "EdDSA")
        else:
            default = ()
        self.algorithms = settings.jwt_algorithms or default
        if self._key is not None and settings.jwt_secret:
            if any(not a.startswith("HS") for a in self.algorithms):
                raise ConfigError("JWT_ALGORITHMS: JWT_SECRET only signs HS256/384/512")
        elif (self._key is not None or self._jwks) and any(
                a.startswith("HS") for a in self.algorithms):
            raise ConfigError("JWT_ALGORITHMS: HS* needs JWT_SECRET, not a public key")

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
        try:
            key = self._key
            if self._jwks is not None:
                key = self._jwks.get_signing_key_from_jwt(token).key
            claims = jwt.decode(
                token, key, algorithms=list(self.algorithms), audience=self._audience,
                issuer=self._issuer, leeway=self._leeway,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(ErrorCode.TOKEN_EXPIRED, "token has expired") from None
        except jwt.PyJWKClientError as exc:
            raise AuthError(ErrorCode.AUTH_FAILED, f"no usable signing key: {exc}") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(ErrorCode.AUTH_FAILED, f"invalid token: {exc}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not 0 < len(sub) <= 128:
            raise AuthError(ErrorCode.AUTH_FAILED, "invalid token: bad 'sub'")
        name = claims.get("name") or claims.get("preferred_username") or sub
        if not isinstance(name, str):
            name = sub
        name = "".join(ch for ch in name if ch.isprintable())[:MAX_USERNAME_CHARS] or sub
        exp = claims.get("exp")
        return Identity(sub, name, float(exp) if exp is not None else None)


def mint_token(secret: str, sub: str, name: str | None = None, ttl: float = 3600,
               algorithm: str = "HS256", **claims: Any) -> str:
    """A signed development token (``python -m wschat token``)."""
    now = int(time.time())
    payload: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(ttl), **claims}
    if name:
        payload["name"] = name
    return jwt.encode(payload, secret, algorithm=algorithm)
