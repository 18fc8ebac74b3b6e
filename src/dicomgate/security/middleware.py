"""The HTTP security stack, installed on the app from ``http`` of the config.

Order, outermost first: IP allow-list (403) -> rate limit (429) -> authentication and
permissions (401/403), or without ``http.auth`` the local-only admin API (403) -> body
limits (413/408) -> the app. A refused client costs a lookup, not a credential check; an
unauthenticated upload is refused before its body is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicomgate.security.http_auth import ApiKeyStore, AuthMiddleware
from dicomgate.security.ip_filter import IpAllowList, IpFilterMiddleware, LocalAdminMiddleware
from dicomgate.security.limits import BodyLimitMiddleware, RateLimitMiddleware, TokenBuckets
from dicomgate.security.oidc import JwtVerifier
from dicomgate.ui.access import UiSessionMiddleware

if TYPE_CHECKING:
    from fastapi import FastAPI

    from dicomgate.config import HttpConfig


def install_http_security(app: FastAPI, http: HttpConfig) -> JwtVerifier | None:
    """Add the middleware ``http`` asks for (Starlette runs the last added first); returns
    the JWT verifier, for the console's sign-in form to share.

    Raises ``ValueError`` for static JWT keys that cannot be read.
    """
    verifier: JwtVerifier | None = None
    limits = http.limits
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=limits.max_body_bytes,
        max_stow_bytes=limits.max_stow_bytes,
        body_timeout=limits.body_timeout,
    )
    if http.auth is not None:
        jwt_config = http.auth.jwt
        verifier = JwtVerifier(jwt_config) if jwt_config is not None else None
        app.add_middleware(
            AuthMiddleware,
            api_keys=ApiKeyStore(http.auth.api_keys),
            jwt_verifier=verifier,
            protect_metrics=http.auth.protect_metrics,
        )
        app.add_middleware(UiSessionMiddleware)  # console cookie -> Bearer, before auth
    else:
        app.add_middleware(LocalAdminMiddleware)  # /api: loopback clients only
    if limits.requests_per_second > 0:
        app.add_middleware(
            RateLimitMiddleware,
            buckets=TokenBuckets(limits.requests_per_second, limits.request_burst),
        )
    if http.allowed_ips:
        app.add_middleware(IpFilterMiddleware, allowed=IpAllowList(http.allowed_ips))
    if http.tls is not None and http.tls.hsts_max_age > 0:
        app.add_middleware(HstsMiddleware, max_age=http.tls.hsts_max_age)  # refusals too
    return verifier


class HstsMiddleware:
    """Adds ``Strict-Transport-Security`` (RFC 6797) to every answer of an HTTPS listener."""

    def __init__(self, app: ASGIApp, max_age: int) -> None:
        self.app = app
        self.header = (b"strict-transport-security", f"max-age={max_age}".encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_hsts(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_hsts)
