"""Test signing keys, JWTs (good and forged) and a local JWKS server for the auth tests."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ISSUER = "https://idp.test/realms/hospital"
AUDIENCE = "dicomgate"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class SigningKey:
    """A private key with a kid; its public half as a JWK and as PEM."""

    kid: str
    private: Any
    alg: str = "RS256"

    @classmethod
    def rsa(cls, kid: str) -> SigningKey:
        return cls(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def ec(cls, kid: str) -> SigningKey:
        return cls(kid, ec.generate_private_key(ec.SECP256R1()), alg="ES256")

    @property
    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def jwk(self) -> dict[str, Any]:
        algorithm = (
            jwt.algorithms.RSAAlgorithm if self.alg == "RS256" else jwt.algorithms.ECAlgorithm
        )
        doc: dict[str, Any] = json.loads(algorithm.to_jwk(self.private.public_key()))
        doc.update(kid=self.kid, use="sig")
        return doc

    def token(self, alg: str | None = None, kid: str | None = "", **claims: Any) -> str:
        """A token signed by this key; ``kid=""`` uses the key's kid, None leaves it out."""
        headers = {} if kid is None else {"kid": kid or self.kid}
        return jwt.encode(
            good_claims(**claims), self.private, algorithm=alg or self.alg, headers=headers
        )


def good_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-42",
        "iat": now,
        "nbf": now - 5,
        "exp": now + 300,
        "scope": "openid read",
    }
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def unsigned_token(**claims: Any) -> str:
    """``alg: none``: no signature at all."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(good_claims(**claims)).encode())}."


def hs256_with_public_key(key: SigningKey, **claims: Any) -> str:
    """The classic confusion attack: HMAC-SHA256 keyed with the server's *public* key PEM."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
    payload = _b64(json.dumps(good_claims(**claims)).encode())
    mac = hmac.new(key.public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(mac)}"


@dataclass
class JwksServer:
    """Serves ``{"keys": [...]}`` of ``keys`` on a free 127.0.0.1 port; counts fetches."""

    keys: list[SigningKey]
    port: int = 0
    fetches: int = 0
    down: bool = False  # answer 503, as a provider in trouble does
    garbage: bytes | None = None  # answer 200 with this body instead of the key set
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    def document(self) -> bytes:
        with self._lock:
            self.fetches += 1
            return json.dumps({"keys": [k.jwk() for k in self.keys]}).encode()


@contextmanager
def jwks_server(keys: list[SigningKey]) -> Iterator[JwksServer]:
    state = JwksServer(list(keys))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = state.document()
            if state.down:
                body = b"unavailable"
            elif state.garbage is not None:
                body = state.garbage
            self.send_response(503 if state.down else 200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
