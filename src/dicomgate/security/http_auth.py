"""HTTP authentication and authorization: API keys, bearer JWTs, permissions per path.

A request presents one credential, as ``Authorization: Bearer <credential>``,
``X-API-Key: <key>``, or an API key as the password of ``Authorization: Basic`` (the user
name is not checked), for clients that can only send Basic (Orthanc's DICOMweb client,
OHIF 2's ``requestOptions.auth``). API keys are compared by their SHA-256 (the config holds
only the hash) with a constant-time comparison against every configured key; a bearer
credential that is no API key and looks like a JWT is checked by
:class:`~dicomgate.security.oidc.JwtVerifier` (a Basic password never is).

Answers (docs/security.md): no or bad credential 401 with ``WWW-Authenticate: Bearer``; a
valid credential without the permission the path needs 403; the identity provider's keys
unreachable 503. Bodies are ``{"error": ...}`` without the reason, which is logged
(``auth.denied``) with the client address, never with the credential.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from starlette.types import ASGIApp, Receive, Scope, Send

from dicomgate.security.asgi import client_ip, has_body, header, log_denied, send_json
from dicomgate.security.http_models import ApiKeyConfig, Permission
from dicomgate.security.oidc import JwtVerifier, KeysUnavailable, TokenRejected
from dicomgate.ui.access import is_ui_path, ui_requirement

log = logging.getLogger("dicomgate.security")

API_KEY_PREFIX = "dgk_"
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
METRICS_PATH = "/metrics"
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_MAX_CREDENTIAL = 16 * 1024  # longer values are refused unread (a JWT is ~1-2 KB)


class Access(Enum):
    """A path's need that is not a permission."""

    OPEN = "open"  # no credential needed
    AUTHENTICATED = "authenticated"  # any valid credential, whatever its permissions


Requirement = Permission | Access


def new_api_key() -> str:
    """A new random API key: ``dgk_`` and 43 URL-safe characters (256 bits)."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """The SHA-256 (hex) of a key, as written in ``http.auth.api_keys[].sha256``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def required_access(method: str, path: str, protect_metrics: bool = False) -> Requirement:
    """What a request needs (docs/security.md has the table).

    Health checks are open; ``/metrics`` is open unless protected. DICOMweb and FHIR reads
    need ``read``, anything else under them (STOW-RS) ``write``. ``/api`` and every other
    path (OpenAPI pages, paths added later) need ``admin``: unknown is not open.
    """
    if path in OPEN_PATHS:
        return Access.OPEN
    if path == METRICS_PATH:
        return Access.AUTHENTICATED if protect_metrics else Access.OPEN
    for prefix in ("/dicomweb", "/fhir"):
        if path == prefix or path.startswith(prefix + "/"):
            search = method == "POST" and path == "/fhir/ImagingStudy/_search"  # a FHIR read
            return Permission.READ if method in _READ_METHODS or search else Permission.WRITE
    if is_ui_path(path):  # the web console: docs/security.md
        need = ui_requirement(path)
        return Access.OPEN if need == "open" else Permission(need)
    return Permission.ADMIN


@dataclass(frozen=True)
class Principal:
    """An authenticated client: an API key's name or a token's subject."""

    name: str
    kind: Literal["api_key", "jwt"]
    permissions: frozenset[Permission]


class ApiKeyStore:
    """The configured API keys, by SHA-256."""

    def __init__(self, keys: list[ApiKeyConfig]) -> None:
        self._keys = [
            (bytes.fromhex(key.sha256), Principal(key.name, "api_key", frozenset(key.scopes)))
            for key in keys
        ]

    def lookup(self, presented: str) -> Principal | None:
        """The key's principal, or None. Compares with every key, in constant time each."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for key_digest, principal in self._keys:
            if hmac.compare_digest(digest, key_digest):
                found = principal
        return found


@dataclass(frozen=True)
class Presented:
    """The credential a request carries: ``value`` is ``""`` when it cannot be used."""

    value: str
    scheme: Literal["bearer", "basic", "x-api-key", "other"]

    @property
    def unusable_reason(self) -> str:
        """The ``auth.denied`` reason for an empty ``value``."""
        return "malformed_basic" if self.scheme == "basic" else "unsupported_scheme"


def presented_credential(scope: Scope) -> Presented | None:
    """The credential of a request: a Bearer token, a Basic password, else an X-API-Key value.

    An Authorization header of another scheme (Digest ...), or a Basic value that is not
    base64 of UTF-8 ``user:password``, gives an empty value, which is refused.
    """
    authorization = header(scope, b"authorization")
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            return Presented(value.strip(), "bearer")
        if scheme == "basic":
            return Presented(_basic_password(value.strip()), "basic")
        return Presented("", "other")
    api_key = header(scope, b"x-api-key")
    return Presented(api_key.strip(), "x-api-key") if api_key is not None else None


def _basic_password(value: str) -> str:
    """The password of an RFC 7617 ``user-id:password`` token68, or ``""``."""
    try:
        decoded = binascii.a2b_base64(value.encode("ascii"), strict_mode=True).decode("utf-8")
    except (UnicodeError, binascii.Error):
        return ""
    _, colon, password = decoded.partition(":")
    return password if colon else ""


def _looks_like_jwt(credential: str) -> bool:
    return credential.count(".") == 2 and not credential.startswith(API_KEY_PREFIX)


_CHALLENGE = b'Bearer realm="dicomgate"'


class AuthMiddleware:
    """Authenticates every request that needs it and checks its permission.

    The principal's name is left in ``scope["state"]["principal"]`` (``request.state``) for
    the handlers and the audit trail.
    """

    def __init__(
        self,
        app: ASGIApp,
        api_keys: ApiKeyStore,
        jwt_verifier: JwtVerifier | None = None,
        protect_metrics: bool = False,
    ) -> None:
        self.app = app
        self.api_keys = api_keys
        self.jwt = jwt_verifier
        self.protect_metrics = protect_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        need = required_access(scope["method"], scope["path"], self.protect_metrics)
        if need is Access.OPEN:
            await self.app(scope, receive, send)
            return
        presented = presented_credential(scope)
        if presented is None:
            await self._unauthorized(scope, send, "missing_credentials", presented=False)
            return
        credential = presented.value
        if not credential:
            # RFC 6750 3.1: a scheme we do not support (Digest, Negotiate ...) is no bearer
            # token at all, so its challenge carries no error code.
            supported = presented.scheme != "other"
            await self._unauthorized(scope, send, presented.unusable_reason, presented=supported)
            return
        if len(credential) > _MAX_CREDENTIAL:
            await self._unauthorized(scope, send, "credential_too_long", presented=True)
            return
        principal = self.api_keys.lookup(credential)
        if (
            principal is None
            and self.jwt is not None
            and presented.scheme != "basic"
            and _looks_like_jwt(credential)
        ):
            try:
                identity = await self.jwt.verify(credential)
            except TokenRejected as exc:
                await self._unauthorized(scope, send, f"token_{exc.reason}", presented=True)
                return
            except KeysUnavailable:
                log_denied(scope, 503, "keys_unavailable")
                await send_json(
                    send,
                    503,
                    "authentication is unavailable, try again later",
                    [(b"retry-after", b"10")],
                    close=has_body(scope),
                )
                return
            principal = Principal(identity.subject, "jwt", identity.permissions)
        if principal is None:
            await self._unauthorized(scope, send, "invalid_api_key", presented=True)
            return
        if isinstance(need, Permission) and need not in principal.permissions:
            log_denied(
                scope,
                403,
                "permission_missing",
                actor=principal.name,
                actor_kind=principal.kind,
                permission=need.value,
            )
            await send_json(
                send,
                403,
                "forbidden",
                [(b"www-authenticate", _CHALLENGE + b', error="insufficient_scope"')],
                close=has_body(scope),
            )
            return
        scope.setdefault("state", {})["principal"] = principal.name
        log.debug(
            "HTTP request authenticated",
            extra={
                "event": "auth.ok",
                "actor": principal.name,
                "actor_kind": principal.kind,
                "client_ip": client_ip(scope),
            },
        )
        await self.app(scope, receive, send)

    @staticmethod
    async def _unauthorized(scope: Scope, send: Send, reason: str, presented: bool) -> None:
        log_denied(scope, 401, reason)
        challenge = _CHALLENGE + (b', error="invalid_token"' if presented else b"")
        await send_json(
            send,
            401,
            "authentication required",
            [(b"www-authenticate", challenge)],
            close=has_body(scope),
        )
