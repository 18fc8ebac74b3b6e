"""OAuth2 / OpenID Connect bearer tokens: JWT signature and claim checks (RFC 7519, 7515).

A token is accepted only when, in this order:

1. its header names an algorithm of ``http.auth.jwt.algorithms`` (asymmetric only: ``none``
   and HS256/384/512 are refused before any key is looked at, so a token "signed" with
   our public key as an HMAC secret never verifies);
2. a verification key fits: same ``kid`` (a token without ``kid`` tries every key) and a key
   type that can make that algorithm (RSA for RS*/PS*, the named curve for ES*, Ed25519 or
   Ed448 for EdDSA; a key set entry that names its ``alg`` allows only that one). A ``kid``
   we do not hold makes the key set be fetched again (at most every
   ``jwks_min_refresh_seconds``), which is how key rotation works without a restart;
3. the signature verifies with that key (PyJWT);
4. ``exp`` is present and not passed, ``nbf`` (if present) is reached, ``iss`` equals the
   issuer and ``aud`` contains the audience, all with ``leeway`` seconds of tolerance.

Permissions come from scope/role claims mapped by ``http.auth.jwt.permissions``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from dicomgate.egress.base import read_at_most, tls_verify
from dicomgate.security.http_models import JwtConfig, Permission

log = logging.getLogger("dicomgate.security")

_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_JWKS_MAX_BYTES = 1024 * 1024
_JWKS_TIMEOUT = 5.0


class TokenRejected(Exception):
    """The token is not acceptable; ``reason`` is a category for the log, never sent."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeysUnavailable(Exception):
    """No verification keys could be obtained (the identity provider is unreachable)."""


@dataclass(frozen=True)
class VerificationKey:
    """A public key that may verify tokens signed with one of ``algorithms``."""

    kid: str | None
    key: Any  # a cryptography public key object
    algorithms: frozenset[str]


@dataclass(frozen=True)
class TokenIdentity:
    """Who a verified token speaks for, and what it may do."""

    subject: str
    permissions: frozenset[Permission]


def key_algorithms(public_key: Any, named: str | None = None) -> frozenset[str]:
    """The algorithms a public key can verify (empty: a key type we do not accept)."""
    if isinstance(public_key, rsa.RSAPublicKey):
        fits: frozenset[str] = _RSA_ALGORITHMS
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGORITHMS.get(public_key.curve.name)
        fits = frozenset({alg}) if alg else frozenset()
    elif isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        fits = frozenset({"EdDSA"})
    else:
        fits = frozenset()
    if named is not None:
        return fits & {named}
    return fits


def parse_jwks(document: Any) -> list[VerificationKey]:
    """The usable signing keys of a JWKS document; other entries (symmetric ``oct`` keys,
    encryption keys, types we do not know) are skipped."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JSON Web Key Set (no 'keys' list)")
    keys: list[VerificationKey] = []
    for entry in document["keys"]:
        if not isinstance(entry, Mapping) or entry.get("kty") not in ("RSA", "EC", "OKP"):
            continue  # never an "oct" (shared secret) key
        if entry.get("use", "sig") != "sig":
            continue
        try:
            public_key = jwt.PyJWK(dict(entry)).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        named = entry.get("alg") if isinstance(entry.get("alg"), str) else None
        algorithms = key_algorithms(public_key, named)
        if algorithms:
            kid = entry.get("kid")
            kid = str(kid) if kid is not None else None
            keys.append(VerificationKey(kid, public_key, algorithms))
    return keys


def load_pem_keys(paths: Iterable[Path]) -> list[VerificationKey]:
    """Static keys from PEM files (a public key or a certificate); raises ValueError."""
    keys: list[VerificationKey] = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            if b"-----BEGIN CERTIFICATE-----" in data:
                public_key: Any = x509.load_pem_x509_certificate(data).public_key()
            else:
                public_key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise ValueError(f"{path} holds no PEM public key or certificate") from exc
        algorithms = key_algorithms(public_key)
        if not algorithms:
            raise ValueError(f"{path}: the key type cannot verify any accepted algorithm")
        keys.append(VerificationKey(None, public_key, algorithms))
    return keys


Fetch = Callable[[], Awaitable[Any]]


class JwksCache:
    """The identity provider's key set, fetched when needed and kept ``ttl`` seconds.

    A fetch that fails keeps the previous keys (a provider outage does not lock everyone
    out while the cached keys are still good); with no keys at all it raises
    :class:`KeysUnavailable`. Concurrent requests share one fetch.
    """

    def __init__(
        self,
        fetch: Fetch,
        ttl: float,
        min_refresh: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._min_refresh = min_refresh
        self._clock = clock
        self._keys: list[VerificationKey] | None = None
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        self._lock = asyncio.Lock()

    async def keys(self) -> list[VerificationKey]:
        """The current keys, fetched first when none are held or they are older than ttl."""
        if self._keys is None or self._clock() - self._fetched_at >= self._ttl:
            await self._refresh(min_gap=0.0 if self._keys is None else self._min_refresh)
        if self._keys is None:
            raise KeysUnavailable("the JWKS could not be fetched")
        return self._keys

    async def refresh_for_unknown_key(self) -> list[VerificationKey]:
        """Fetch again because a token named a key we do not hold (rate-limited)."""
        await self._refresh(min_gap=self._min_refresh)
        if self._keys is None:
            raise KeysUnavailable("the JWKS could not be fetched")
        return self._keys

    async def _refresh(self, min_gap: float) -> None:
        async with self._lock:
            if self._clock() - self._attempted_at < min_gap:
                return  # fetched (or tried) a moment ago, maybe by a concurrent request
            self._attempted_at = self._clock()
            try:
                keys = parse_jwks(await self._fetch())
            except (httpx.HTTPError, ValueError) as exc:
                log.warning(
                    "cannot fetch the JWKS: %s",
                    type(exc).__name__,
                    extra={"event": "auth.jwks_unavailable", "kept_keys": len(self._keys or [])},
                )
                return
            self._keys = keys
            self._fetched_at = self._clock()
            log.info(
                "JWKS fetched: %d signing keys",
                len(keys),
                extra={"event": "auth.jwks_fetched", "kids": ",".join(k.kid or "-" for k in keys)},
            )


def http_fetch(url: str, verify: bool | Path) -> Fetch:
    """A fetch of the JSON document at ``url`` with httpx (TLS per ``verify``)."""

    async def fetch() -> Any:
        async with httpx.AsyncClient(
            verify=tls_verify(verify), timeout=_JWKS_TIMEOUT, follow_redirects=False
        ) as client:
            async with client.stream(
                "GET", url, headers={"accept": "application/json"}
            ) as response:
                response.raise_for_status()
                content = await read_at_most(response, _JWKS_MAX_BYTES)
            if content is None:
                raise ValueError("JWKS document too large")
            try:
                return json.loads(content)
            except RecursionError:  # nested too deep for the parser
                raise ValueError("JWKS document nested too deep") from None

    return fetch


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def granted_scopes(claims: Mapping[str, Any], claim_names: Iterable[str]) -> set[str]:
    """Scope and role values from the named claims (space-separated strings or lists)."""
    values: set[str] = set()
    for name in claim_names:
        value = _claim(claims, name)
        if isinstance(value, str):
            values.update(value.split())
        elif isinstance(value, list):
            values.update(item for item in value if isinstance(item, str))
    return values


class JwtVerifier:
    """Checks bearer JWTs against ``http.auth.jwt``; see the module docstring."""

    def __init__(
        self,
        config: JwtConfig,
        fetch: Fetch | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.static_keys = load_pem_keys(config.public_keys)
        self.jwks: JwksCache | None = None
        if config.jwks_url is not None:
            self.jwks = JwksCache(
                fetch or http_fetch(config.jwks_url, config.jwks_verify),
                ttl=config.jwks_cache_seconds,
                min_refresh=config.jwks_min_refresh_seconds,
                clock=clock,
            )
        self.algorithms = frozenset(config.algorithms)
        self._audience = (
            [config.audience] if isinstance(config.audience, str) else list(config.audience)
        )

    async def verify(self, token: str) -> TokenIdentity:
        """The token's identity; raises :class:`TokenRejected` or :class:`KeysUnavailable`."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRejected("malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise TokenRejected("algorithm_not_allowed")
        kid = header.get("kid")
        kid = kid if isinstance(kid, str) else None
        candidates = self._candidates(await self._keys(), kid, alg)
        if not candidates and kid is not None and self.jwks is not None:
            candidates = self._candidates(
                self.static_keys + await self.jwks.refresh_for_unknown_key(), kid, alg
            )
        if not candidates:
            raise TokenRejected("unknown_key")
        claims = self._decode(token, alg, candidates)
        subject = claims.get("sub") or claims.get("azp") or claims.get("client_id") or "unknown"
        values = granted_scopes(claims, self.config.scope_claims)
        permissions = frozenset(
            permission
            for permission, names in self.config.permissions.items()
            if values.intersection(names)
        )
        return TokenIdentity(str(subject)[:128], permissions)

    async def _keys(self) -> list[VerificationKey]:
        if self.jwks is None:
            return self.static_keys
        try:
            return self.static_keys + await self.jwks.keys()
        except KeysUnavailable:
            if self.static_keys:
                return self.static_keys
            raise

    @staticmethod
    def _candidates(
        keys: list[VerificationKey], kid: str | None, alg: str
    ) -> list[VerificationKey]:
        return [
            key
            for key in keys
            if alg in key.algorithms and (kid is None or key.kid is None or key.kid == kid)
        ]

    def _decode(self, token: str, alg: str, candidates: list[VerificationKey]) -> dict[str, Any]:
        for key in candidates:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key=key.key,
                    algorithms=[alg],
                    audience=self._audience,
                    issuer=self.config.issuer,
                    leeway=self.config.leeway,
                    options={"require": ["exp", "iss", "aud"], "verify_iat": False},
                )
            except jwt.InvalidSignatureError:
                continue  # another key with no kid may fit
            except jwt.ExpiredSignatureError:
                raise TokenRejected("expired") from None
            except jwt.ImmatureSignatureError:
                raise TokenRejected("not_yet_valid") from None
            except jwt.InvalidAudienceError:
                raise TokenRejected("wrong_audience") from None
            except jwt.InvalidIssuerError:
                raise TokenRejected("wrong_issuer") from None
            except jwt.MissingRequiredClaimError:
                raise TokenRejected("missing_claim") from None
            except (jwt.PyJWTError, ValueError, TypeError):
                raise TokenRejected("invalid") from None
            return claims
        raise TokenRejected("bad_signature")
