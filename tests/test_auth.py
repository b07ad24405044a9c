"""Unit tests of JWT verification (wschat.auth) with real keys and real tokens.

Every rejection is checked against a token an attacker could actually send:
unsigned, algorithm-confused, expired, not yet valid, for another audience or
issuer, tampered, or naming a key we do not have. JWKS tests serve real key
sets from a local HTTP server and count its requests.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import ROOT, TIMEOUT
from jwt_support import (
    JwksServer, claims, ec_key, ed25519_key, forge_hs256, forge_none, jwk, public_pem,
    rsa_key, sign, tamper,
)
from wschat.__main__ import main as cli_main
from wschat.auth import Authenticator, AuthError, JwksKeys, mint_token
from wschat.config import ConfigError, Settings
from wschat.protocol import ErrorCode

SECRET = "unit-test-secret-0123456789abcdef0123"
AUDIENCE = "wschat"
ISSUER = "https://id.example.test/"


@pytest.fixture(scope="module")
def rsa() -> object:
    return rsa_key()


def authenticator(**env: str) -> Authenticator:
    return Authenticator(Settings.from_env({"JWT_LEEWAY": "0", **env}))


def rejected(auth: Authenticator, token: str) -> AuthError:
    with pytest.raises(AuthError) as info:
        auth.verify(token)
    return info.value


# -- accepted tokens -------------------------------------------------------------------

def test_hs256_token_gives_identity() -> None:
    """A valid HS256 token yields sub as user_id, name as username, exp plus leeway."""
    auth = authenticator(JWT_SECRET=SECRET, JWT_LEEWAY="7")
    payload = claims("u-1", "Alice")
    identity = auth.verify(sign(payload, SECRET, "HS256"))
    assert (identity.user_id, identity.username) == ("u-1", "Alice")
    assert identity.expires_at == payload["exp"] + 7


@pytest.mark.parametrize("extra, expected", [
    ({"name": None, "preferred_username": "al"}, "al"),
    ({"name": None}, "u-2"),
    ({"name": 42, "preferred_username": "pref"}, "pref"),
    ({"name": "  Al\x00ice\n  "}, "Alice"),
    ({"name": "x" * 300}, "x" * 64),
    ({"name": None, "sub": " al\u202eice\u200b "}, "alice"),  # sub too: printable, trimmed
    ({"name": None, "sub": "\u200b"}, "\\u200b"),  # nothing printable: escaped
])
def test_username_from_claims(extra: dict, expected: str) -> None:
    """username is name, else preferred_username, else sub: printable, trimmed, <= 64 chars."""
    auth = authenticator(JWT_SECRET=SECRET)
    payload = {**claims("u-2", "unused"), **extra}
    payload = {k: v for k, v in payload.items() if v is not None}
    assert auth.verify(sign(payload, SECRET, "HS256")).username == expected


@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_other_hmac_algorithms_when_pinned(algorithm: str) -> None:
    """HS384/HS512 verify when JWT_ALGORITHMS names them."""
    auth = authenticator(JWT_SECRET=SECRET * 2, JWT_ALGORITHMS=algorithm)
    assert auth.verify(sign(claims(), SECRET * 2, algorithm)).user_id == "alice"


def test_rs256_public_key_as_value_and_file(rsa, tmp_path: Path) -> None:
    """JWT_PUBLIC_KEY works as a PEM value, a PEM with \\n escapes, and a file path."""
    pem = public_pem(rsa)
    path = tmp_path / "key.pem"
    path.write_text(pem)
    token = sign(claims(), rsa, "RS256")
    for value in (pem, pem.replace("\n", "\\n"), str(path)):
        assert authenticator(JWT_PUBLIC_KEY=value).verify(token).user_id == "alice"


@pytest.mark.parametrize("make_key, algorithm, pinned", [
    (lambda: ec_key(), "ES256", None),
    (lambda: ec_key(ec.SECP384R1()), "ES384", None),
    (lambda: ed25519_key(), "EdDSA", None),
    (lambda: rsa_key(), "PS256", "PS256"),
])
def test_asymmetric_key_families(make_key, algorithm: str, pinned: str | None) -> None:
    """EC, Ed25519 and RSA-PSS public keys verify their own algorithms."""
    key = make_key()
    env = {"JWT_PUBLIC_KEY": public_pem(key)}
    if pinned:
        env["JWT_ALGORITHMS"] = pinned
    auth = authenticator(**env)
    assert auth.algorithms == (algorithm,)
    assert auth.verify(sign(claims(), key, algorithm)).user_id == "alice"


def test_audience_and_issuer_accepted_when_matching() -> None:
    """A token for our audience (alone or in a list) from our issuer is accepted."""
    auth = authenticator(JWT_SECRET=SECRET, JWT_AUDIENCE=AUDIENCE, JWT_ISSUER=ISSUER)
    for aud in (AUDIENCE, ["other", AUDIENCE]):
        token = sign(claims(aud=aud, iss=ISSUER), SECRET, "HS256")
        assert auth.verify(token).user_id == "alice"


def test_leeway_tolerates_small_clock_skew() -> None:
    """exp 3 s ago and nbf 3 s ahead pass with JWT_LEEWAY=5, and fail with 0."""
    now = int(time.time())
    expired = sign({"sub": "a", "exp": now - 3}, SECRET, "HS256")
    early = sign({"sub": "a", "exp": now + 60, "nbf": now + 3}, SECRET, "HS256")
    lenient = authenticator(JWT_SECRET=SECRET, JWT_LEEWAY="5")
    assert lenient.verify(expired).user_id == lenient.verify(early).user_id == "a"
    strict = authenticator(JWT_SECRET=SECRET)
    assert rejected(strict, expired).code is ErrorCode.TOKEN_EXPIRED
    assert rejected(strict, early).code is ErrorCode.AUTH_FAILED


def test_default_leeway_is_small() -> None:
    """JWT_LEEWAY defaults to 5 seconds (documented in the README)."""
    assert Settings.from_env({}).jwt_leeway == 5.0


# -- rejected tokens -------------------------------------------------------------------

def test_alg_none_refused(rsa) -> None:
    """An unsigned alg:none token is refused by every key configuration."""
    token = forge_none(claims())
    for auth in (authenticator(JWT_SECRET=SECRET),
                 authenticator(JWT_PUBLIC_KEY=public_pem(rsa))):
        assert rejected(auth, token).code is ErrorCode.AUTH_FAILED
    for variant in ("None", "NONE", "nOnE"):
        forged = forge_none(claims()).replace(
            forge_none(claims()).split(".")[0],
            forge_none(claims(), alg=variant).split(".")[0])
        assert rejected(authenticator(JWT_SECRET=SECRET), forged).code is ErrorCode.AUTH_FAILED


def test_hs256_signed_with_the_rsa_public_key_refused(rsa) -> None:
    """HS256 keyed with the server's own RSA public key (PEM or DER bytes) is refused."""
    pem = public_pem(rsa)
    auth = authenticator(JWT_PUBLIC_KEY=pem)
    for secret in (pem.encode(), pem.strip().encode()):
        token = forge_hs256(claims(), secret)
        err = rejected(auth, token)
        assert err.code is ErrorCode.AUTH_FAILED and "alg" in err.message


def test_rs256_token_refused_by_hmac_server(rsa) -> None:
    """A server configured with JWT_SECRET refuses an RS256 token, however well signed."""
    token = sign(claims(), rsa, "RS256")
    assert rejected(authenticator(JWT_SECRET=SECRET), token).code is ErrorCode.AUTH_FAILED


def test_wrong_key_refused(rsa) -> None:
    """A token signed by another RSA key, or another secret, is refused."""
    assert rejected(authenticator(JWT_PUBLIC_KEY=public_pem(rsa)),
                    sign(claims(), rsa_key(), "RS256")).code is ErrorCode.AUTH_FAILED
    assert rejected(authenticator(JWT_SECRET=SECRET),
                    sign(claims(), SECRET + "x", "HS256")).code is ErrorCode.AUTH_FAILED


def test_expired_token_is_token_expired() -> None:
    """An expired, well-signed token is refused with token_expired (not auth_failed)."""
    token = sign(claims(ttl=-10), SECRET, "HS256")
    err = rejected(authenticator(JWT_SECRET=SECRET), token)
    assert err.code is ErrorCode.TOKEN_EXPIRED


def test_expired_token_with_bad_signature_is_auth_failed() -> None:
    """An expired token signed with the wrong key says auth_failed: no claim is trusted unsigned."""
    token = sign(claims(ttl=-10), "not-the-secret-0123456789abcdef01", "HS256")
    assert rejected(authenticator(JWT_SECRET=SECRET), token).code is ErrorCode.AUTH_FAILED


@pytest.mark.parametrize("changes, why", [
    ({"nbf": int(time.time()) + 600}, "not yet valid (nbf)"),
    ({"iat": int(time.time()) + 600}, "issued in the future (iat)"),
    ({"aud": "someone-else"}, "wrong audience"),
    ({"aud": None}, "no audience when one is required"),
    ({"iss": "https://evil.example/"}, "wrong issuer"),
    ({"iss": None}, "no issuer when one is required"),
    ({"exp": None}, "no exp"),
    ({"sub": None}, "no sub"),
    ({"sub": ""}, "empty sub"),
    ({"sub": 12345}, "non-string sub"),
    ({"sub": "x" * 129}, "sub too long"),
    ({"exp": "tomorrow"}, "non-numeric exp"),
    ({"exp": 10**400}, "exp beyond any date"),
    # RFC 7519 2: a NumericDate is a JSON number. PyJWT takes what int() takes: a string
    # of digits passed as a date, and true as 1 (an exp of true was token_expired).
    ({"exp": str(int(time.time()) + 600)}, "exp as a string of digits"),
    ({"exp": True}, "exp as a boolean"),
    ({"exp": [int(time.time()) + 600]}, "exp as a list"),
    ({"nbf": "0"}, "nbf as a string"),
    ({"nbf": True}, "nbf as a boolean"),
    ({"iat": str(int(time.time()))}, "iat as a string"),
    ({"iat": False}, "iat as a boolean"),
])
def test_bad_claims_refused(changes: dict, why: str) -> None:
    """Tokens with a missing or wrong registered claim are refused with auth_failed."""
    auth = authenticator(JWT_SECRET=SECRET, JWT_AUDIENCE=AUDIENCE, JWT_ISSUER=ISSUER)
    payload = {**claims(aud=AUDIENCE, iss=ISSUER), **changes}
    payload = {k: v for k, v in payload.items() if v is not None}
    assert rejected(auth, sign(payload, SECRET, "HS256")).code is ErrorCode.AUTH_FAILED, why


def test_audience_in_token_refused_when_none_configured() -> None:
    """A token scoped to some audience is not accepted by a server that has none configured."""
    token = sign(claims(aud="another-service"), SECRET, "HS256")
    assert rejected(authenticator(JWT_SECRET=SECRET), token).code is ErrorCode.AUTH_FAILED


def test_tampered_payload_refused(rsa) -> None:
    """Changing sub (or extending exp) under the original signature is refused."""
    for key, algorithm, env in ((SECRET, "HS256", {"JWT_SECRET": SECRET}),
                                (rsa, "RS256", {"JWT_PUBLIC_KEY": public_pem(rsa)})):
        token = sign(claims("mallory"), key, algorithm)
        auth = authenticator(**env)
        assert auth.verify(token).user_id == "mallory"
        for changes in ({"sub": "admin"}, {"exp": int(time.time()) + 10**8}):
            assert rejected(auth, tamper(token, **changes)).code is ErrorCode.AUTH_FAILED


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "a.b", "..", "e30.e30.", "x" * 5000])
def test_malformed_tokens_refused(garbage: str) -> None:
    """Strings that are not JWTs are refused with auth_failed, never an exception."""
    assert rejected(authenticator(JWT_SECRET=SECRET), garbage).code is ErrorCode.AUTH_FAILED


def test_no_key_configured_refuses_everything() -> None:
    """Without any JWT setting, every token is refused (guests only)."""
    auth = authenticator()
    assert not auth.enabled
    assert rejected(auth, sign(claims(), SECRET, "HS256")).code is ErrorCode.AUTH_FAILED


# -- configuration ---------------------------------------------------------------------

@pytest.mark.parametrize("env_of_key, algorithms", [
    (lambda rsa: {"JWT_SECRET": SECRET}, "RS256"),
    (lambda rsa: {"JWT_PUBLIC_KEY": public_pem(rsa)}, "HS256"),
    (lambda rsa: {"JWT_PUBLIC_KEY": public_pem(rsa)}, "ES256"),
    (lambda rsa: {"JWT_PUBLIC_KEY": public_pem(ec_key())}, "ES384"),
    (lambda rsa: {"JWT_PUBLIC_KEY": public_pem(ed25519_key())}, "RS256"),
    (lambda rsa: {"JWT_JWKS_URL": "https://id.example.test/jwks"}, "HS256"),
])
def test_algorithms_that_do_not_fit_the_key_refuse_to_start(rsa, env_of_key, algorithms: str
                                                            ) -> None:
    """JWT_ALGORITHMS naming an algorithm the key cannot verify is a start-up error."""
    with pytest.raises(ConfigError, match="JWT_ALGORITHMS"):
        authenticator(JWT_ALGORITHMS=algorithms, **env_of_key(rsa))


@pytest.mark.parametrize("env, variable", [
    ({"JWT_PUBLIC_KEY": "/no/such/file.pem"}, "JWT_PUBLIC_KEY"),
    ({"JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"},
     "JWT_PUBLIC_KEY"),
    ({"JWT_JWKS_URL": "file:///etc/passwd"}, "JWT_JWKS_URL"),
    ({"JWT_ALGORITHMS": "none"}, "JWT_ALGORITHMS"),
    # Two sources of keys: one would be ignored in silence (JWT_SECRET won, a JWKS was
    # never asked, and a development secret left in the environment signed tokens).
    ({"JWT_SECRET": SECRET, "JWT_JWKS_URL": "https://id.example.test/jwks"}, "JWT_JWKS_URL"),
    ({"JWT_SECRET": SECRET, "JWT_PUBLIC_KEY": "/no/such/file.pem"}, "JWT_PUBLIC_KEY"),
    ({"JWT_PUBLIC_KEY": "/no/such/file.pem", "JWT_JWKS_URL": "https://id.example.test/jwks"},
     "JWT_JWKS_URL"),
])
def test_bad_key_settings_name_the_variable(env: dict, variable: str) -> None:
    """A bad key setting stops start-up with a message naming the variable."""
    with pytest.raises(ConfigError, match=variable):
        authenticator(**env)


# -- JWKS ------------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def jwks_server():
    with JwksServer() as server:
        yield server


def test_jwks_key_by_kid(jwks_server: JwksServer, rsa) -> None:
    """A token is verified with the JWKS key its kid names; other kids are refused."""
    other = ec_key()
    url = jwks_server.serve_keys("/jwks", jwk(rsa, "rsa-1"), jwk(other, "ec-1"))
    auth = authenticator(JWT_JWKS_URL=url)
    assert auth.verify(sign(claims("r"), rsa, "RS256", kid="rsa-1")).user_id == "r"
    assert auth.verify(sign(claims("e"), other, "ES256", kid="ec-1")).user_id == "e"
    assert rejected(auth, sign(claims(), rsa, "RS256", kid="nope")).code is ErrorCode.AUTH_FAILED
    assert rejected(auth, sign(claims(), rsa, "RS256")).code is ErrorCode.AUTH_FAILED  # no kid
    assert jwks_server.hits["/jwks"] == 1


def test_jwks_key_bound_to_its_algorithm(jwks_server: JwksServer, rsa) -> None:
    """A kid's key verifies only its own algorithm: HS256 keyed with its modulus, or RS512 where
    the JWK says RS256, are refused."""
    url = jwks_server.serve_keys("/jwks", jwk(rsa, "k", alg="RS256"))
    auth = authenticator(JWT_JWKS_URL=url, JWT_ALGORITHMS="RS256,RS512")
    assert rejected(auth, sign(claims(), rsa, "RS512", kid="k")).code is ErrorCode.AUTH_FAILED
    assert rejected(auth, forge_hs256(claims(), public_pem(rsa).encode(), kid="k")
                    ).code is ErrorCode.AUTH_FAILED
    assert rejected(auth, forge_none(claims(), kid="k")).code is ErrorCode.AUTH_FAILED


def test_jwks_fetched_at_most_once_per_interval(jwks_server: JwksServer, rsa) -> None:
    """A flood of unknown kids costs one fetch per interval, and a rotated key is found after it."""
    url = jwks_server.serve_keys("/jwks", jwk(rsa, "k1"))
    clock = FakeClock()
    auth = authenticator(JWT_JWKS_URL=url)
    auth.jwks = JwksKeys(url, min_interval=30, max_age=300, clock=clock)
    assert auth.verify(sign(claims(), rsa, "RS256", kid="k1")).user_id == "alice"
    for i in range(50):
        rejected(auth, sign(claims(), rsa, "RS256", kid=f"forged-{i}"))
    assert jwks_server.hits["/jwks"] == 1

    rotated = rsa_key()
    jwks_server.serve_keys("/jwks", jwk(rsa, "k1"), jwk(rotated, "k2"))
    token = sign(claims("new"), rotated, "RS256", kid="k2")
    clock.now += 29
    rejected(auth, token)  # still inside the interval: not refetched
    assert jwks_server.hits["/jwks"] == 1
    clock.now += 1
    assert auth.verify(token).user_id == "new"  # one refetch finds the new key
    rejected(auth, sign(claims(), rsa, "RS256", kid="forged-again"))
    assert jwks_server.hits["/jwks"] == 2


def test_jwks_refreshed_after_max_age_and_removed_keys_stop_working(
        jwks_server: JwksServer, rsa) -> None:
    """After max_age the set is refetched; a key removed from it is no longer trusted."""
    url = jwks_server.serve_keys("/jwks", jwk(rsa, "old"))
    clock = FakeClock()
    auth = authenticator(JWT_JWKS_URL=url)
    auth.jwks = JwksKeys(url, min_interval=30, max_age=300, clock=clock)
    token = sign(claims(), rsa, "RS256", kid="old")
    assert auth.verify(token).user_id == "alice"
    jwks_server.serve_keys("/jwks", jwk(rsa_key(), "new"))
    clock.now += 299
    assert auth.verify(token).user_id == "alice"  # cached
    clock.now += 1
    assert rejected(auth, token).code is ErrorCode.AUTH_FAILED
    assert jwks_server.hits["/jwks"] == 2


def test_jwks_outage_keeps_known_keys(jwks_server: JwksServer, rsa) -> None:
    """When the JWKS endpoint fails, keys already fetched keep working, with no retry storm."""
    url = jwks_server.serve_keys("/jwks", jwk(rsa, "k"))
    clock = FakeClock()
    auth = authenticator(JWT_JWKS_URL=url)
    auth.jwks = JwksKeys(url, min_interval=30, max_age=60, clock=clock)
    token = sign(claims(), rsa, "RS256", kid="k")
    assert auth.verify(token).user_id == "alice"
    jwks_server.documents["/jwks"] = 500
    clock.now += 61
    for _ in range(10):
        assert auth.verify(token).user_id == "alice"
    assert jwks_server.hits["/jwks"] == 2  # the initial fetch and one failed refresh


def test_jwks_loaded_at_start_and_kept_through_a_failed_refresh(jwks_server: JwksServer,
                                                                rsa) -> None:
    """load() fetches until a key set is loaded (the worker is not ready before); once one
    is, a refresh that fails keeps it in use and loaded (an outage of the identity
    provider does not take every ready worker out), and load() fetches no more."""
    jwks_server.documents["/jwks"] = 503
    url = jwks_server.url("/jwks")
    clock = FakeClock()
    keys = JwksKeys(url, min_interval=30, max_age=60, clock=clock)
    assert (keys.load(), keys.loaded) == (False, False)
    assert keys.load() is False  # a retry: the worker paces them, not min_interval
    assert jwks_server.hits["/jwks"] == 2
    jwks_server.serve_keys("/jwks", jwk(rsa, "k"))
    assert (keys.load(), keys.loaded) == (True, True)
    jwks_server.documents["/jwks"] = 503
    clock.now += 61
    auth = authenticator(JWT_JWKS_URL=url)
    auth.jwks = keys
    assert auth.verify(sign(claims(), rsa, "RS256", kid="k")).user_id == "alice"
    assert jwks_server.hits["/jwks"] == 4  # the refresh was tried, and failed
    assert (keys.load(), keys.loaded) == (True, True)
    assert jwks_server.hits["/jwks"] == 4


@pytest.fixture
def auth_log() -> Iterator[list[logging.LogRecord]]:
    """The records of wschat.auth, caught on the logger itself: once an app is built in
    this process (configure_logging), wschat's loggers no longer propagate to pytest's."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("wschat.auth")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_jwks_outage_logged_once_then_backed_off_and_recovery_once(
        jwks_server: JwksServer, rsa, auth_log: list[logging.LogRecord]) -> None:
    """A worker retrying an unreachable JWKS every 5 s for two minutes logs the first
    failure as a warning and then at most one warning a minute, with the count; the
    success that ends the outage is logged once, at info; a later outage warns again."""
    jwks_server.documents["/jwks"] = 503
    url = jwks_server.url("/jwks")
    clock = FakeClock()
    keys = JwksKeys(url, min_interval=30, max_age=60, clock=clock)

    def lines(level: int) -> list[str]:
        return [r.getMessage() for r in auth_log if r.levelno == level]

    for _ in range(25):  # t = 0, 5, ..., 120 (the worker's retries)
        assert keys.load() is False
        clock.now += 5
    assert jwks_server.hits["/jwks"] == 25
    warnings = lines(logging.WARNING)
    assert len(warnings) == 3, warnings  # t = 0, 60, 120
    assert "failed (keeping 0 known keys)" in warnings[0]
    assert "13 failed attempts in 60 s" in warnings[1]
    assert "25 failed attempts in 120 s" in warnings[2]
    assert lines(logging.INFO) == []

    jwks_server.serve_keys("/jwks", jwk(rsa, "k"))
    assert keys.load() is True
    assert keys.load() is True
    infos = lines(logging.INFO)
    assert len(infos) == 1, infos
    assert "succeeded after 25 failed attempts in 125 s (1 keys)" in infos[0]
    assert len(lines(logging.WARNING)) == 3

    # Loaded, then a refresh fails: a new outage, warned about at once.
    jwks_server.documents["/jwks"] = 503
    clock.now += 61
    auth = authenticator(JWT_JWKS_URL=url)
    auth.jwks = keys
    assert auth.verify(sign(claims(), rsa, "RS256", kid="k")).user_id == "alice"
    warnings = lines(logging.WARNING)
    assert len(warnings) == 4 and "failed (keeping 1 known keys)" in warnings[3], warnings


@pytest.mark.parametrize("header", ["jku", "x5u"])
def test_key_urls_in_token_headers_are_never_fetched(jwks_server: JwksServer, rsa,
                                                     header: str) -> None:
    """A token naming its own key set (jku/x5u) signed by that key is refused, URL untouched."""
    url = jwks_server.serve_keys("/jwks", jwk(rsa, "k"))
    attacker = rsa_key()
    evil = jwks_server.serve_keys("/evil", jwk(attacker, "k"))
    auth = authenticator(JWT_JWKS_URL=url)
    token = sign(claims("admin"), attacker, "RS256", kid="k", **{header: evil})
    assert rejected(auth, token).code is ErrorCode.AUTH_FAILED
    assert jwks_server.hits["/evil"] == 0


def test_embedded_jwk_header_is_ignored(jwks_server: JwksServer, rsa) -> None:
    """A token carrying its own public key in the jwk header is verified with ours, and refused."""
    url = jwks_server.serve_keys("/jwks", jwk(rsa, "k"))
    attacker = rsa_key()
    token = sign(claims("admin"), attacker, "RS256", kid="k", jwk=jwk(attacker, "k"))
    assert rejected(authenticator(JWT_JWKS_URL=url), token).code is ErrorCode.AUTH_FAILED


# -- the development token CLI ---------------------------------------------------------

def test_mint_token_verifies() -> None:
    """mint_token produces a token the server's Authenticator accepts."""
    token = mint_token(SECRET, "bob", "Bob", ttl=60, aud=AUDIENCE)
    identity = authenticator(JWT_SECRET=SECRET, JWT_AUDIENCE=AUDIENCE).verify(token)
    assert (identity.user_id, identity.username) == ("bob", "Bob")


def test_cli_prints_a_valid_token(capsys) -> None:
    """`python -m wschat token` prints a token for --sub/--name signed with --secret."""
    assert cli_main(["token", "--sub", "alice", "--name", "Alice", "--secret", SECRET,
                     "--ttl", "120"]) == 0
    token = capsys.readouterr().out.strip()
    identity = authenticator(JWT_SECRET=SECRET).verify(token)
    assert (identity.user_id, identity.username) == ("alice", "Alice")
    assert 100 < identity.expires_at - time.time() <= 120


def test_cli_as_a_program_uses_jwt_secret() -> None:
    """The real `python -m wschat token` reads JWT_SECRET and refuses to run without one."""
    run = subprocess.run([sys.executable, "-m", "wschat", "token", "--sub", "alice"],
                         cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT * 4,
                         env={"PATH": "/usr/bin:/bin", "JWT_SECRET": SECRET})
    assert run.returncode == 0, run.stderr
    assert jwt.decode(run.stdout.strip(), SECRET, algorithms=["HS256"])["sub"] == "alice"
    run = subprocess.run([sys.executable, "-m", "wschat", "token", "--sub", "alice"],
                         cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT * 4,
                         env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 2 and "JWT_SECRET" in run.stderr
