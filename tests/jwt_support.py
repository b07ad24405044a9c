"""Real keys, real (and forged) tokens, and a real JWKS endpoint for the auth tests.

Keys are generated with ``cryptography``; forged tokens are built by hand
(PyJWT refuses to produce them), so every rejection is tested against the bytes
an attacker would actually send.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def ed25519_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def public_pem(private_key: Any) -> str:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def claims(sub: str = "alice", name: str | None = "Alice", ttl: float = 3600,
           **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(ttl)}
    if name is not None:
        out["name"] = name
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def sign(payload: dict[str, Any], key: Any, algorithm: str, **headers: Any) -> str:
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers or None)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(obj: dict[str, Any]) -> str:
    return _b64(json.dumps(obj, separators=(",", ":")).encode())


def forge_none(payload: dict[str, Any], **headers: Any) -> str:
    """An unsigned token: ``alg: none`` and an empty signature."""
    return f"{_segment({'alg': 'none', 'typ': 'JWT', **headers})}.{_segment(payload)}."


def forge_hs256(payload: dict[str, Any], secret: bytes, **headers: Any) -> str:
    """HS256 with any bytes as the secret: the public-key-as-HMAC-secret attack."""
    signing_input = f"{_segment({'alg': 'HS256', 'typ': 'JWT', **headers})}.{_segment(payload)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def tamper(token: str, **changes: Any) -> str:
    """The same header and signature over a payload with ``changes`` applied."""
    header, payload, signature = token.split(".")
    padded = payload + "=" * (-len(payload) % 4)
    body = json.loads(base64.urlsafe_b64decode(padded))
    body.update(changes)
    return f"{header}.{_segment(body)}.{signature}"


def jwk(private_key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    """The public JWK of ``private_key`` with ``kid``."""
    algorithm: Any
    if isinstance(private_key, rsa.RSAPrivateKey):
        algorithm = jwt.algorithms.RSAAlgorithm
    elif isinstance(private_key, ec.EllipticCurvePrivateKey):
        algorithm = jwt.algorithms.ECAlgorithm
    else:
        algorithm = jwt.algorithms.OKPAlgorithm
    data = json.loads(algorithm.to_jwk(private_key.public_key()))
    data.update(kid=kid, use="sig", **extra)
    return data


class JwksServer:
    """A tiny HTTP server on 127.0.0.1 serving JWKS documents and counting requests.

    ``documents`` maps a path to the JSON served there (or an int: that HTTP
    status); ``hits`` counts requests per path, so a test can prove a URL was
    fetched once, or never.
    """

    def __init__(self) -> None:
        self.documents: dict[str, Any] = {}
        self.hits: Counter[str] = Counter()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                owner.hits[self.path] += 1
                doc = owner.documents.get(self.path, 404)
                if isinstance(doc, int):
                    self.send_response(doc)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # A short poll interval: shutdown() waits for it, once per test.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,),
                                        daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def serve_keys(self, path: str, *keys: dict[str, Any]) -> str:
        self.documents[path] = {"keys": list(keys)}
        return self.url(path)

    def __enter__(self) -> JwksServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
