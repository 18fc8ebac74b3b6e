"""Checking what an operator types into the console's sign-in form.

The form takes an API key or a bearer JWT from the site's identity provider (for a site that
uses OIDC only). Both are checked by the code that checks them on the API
(:class:`~dicomgate.security.http_auth.ApiKeyStore`,
:class:`~dicomgate.security.oidc.JwtVerifier`, the very verifier of the HTTP stack, sharing
its key cache), so the form accepts exactly what ``Authorization: Bearer`` accepts. Why a
token was refused is logged (``auth.denied``), not shown, as on the API.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt
from starlette.types import Scope

from dicomgate.security.asgi import log_denied
from dicomgate.security.http_auth import _MAX_CREDENTIAL, ApiKeyStore, _looks_like_jwt
from dicomgate.security.oidc import JwtVerifier, KeysUnavailable, TokenRejected

# What the sign-in page may say, by code: (message, HTTP status of the page). The page
# shows only these fixed texts, never text from the request (``/ui/login?error=...`` with
# words of an attacker's choosing would be phishing on our own page).
SIGN_IN_ERRORS: dict[str, tuple[str, int]] = {
    "invalid_api_key": ("This API key is not valid.", 401),
    "token_not_configured": ("Access tokens are not configured here (http.auth.jwt).", 401),
    "invalid_token": ("This access token is not valid or has expired.", 401),
    "keys_unavailable": ("Tokens cannot be checked right now; try again later.", 503),
    "no_sign_in": ("No sign-in is configured.", 401),
}


@dataclass(frozen=True)
class SignIn:
    """The verdict on one credential."""

    accepted: bool
    error: str = ""  # a key of SIGN_IN_ERRORS when not accepted
    max_age: int | None = None  # seconds the session cookie may live (a token's validity)


async def check_sign_in(
    scope: Scope, credential: str, keys: ApiKeyStore, verifier: JwtVerifier | None
) -> SignIn:
    """Accept a configured API key, or a JWT the API would accept (refusals logged)."""
    if not credential or len(credential) > _MAX_CREDENTIAL:
        log_denied(scope, 401, "invalid_api_key")
        return SignIn(False, "invalid_api_key")
    if keys.lookup(credential) is not None:
        return SignIn(True)
    if not _looks_like_jwt(credential):
        log_denied(scope, 401, "invalid_api_key")
        return SignIn(False, "invalid_api_key")
    if verifier is None:
        log_denied(scope, 401, "token_not_configured")
        return SignIn(False, "token_not_configured")
    try:
        await verifier.verify(credential)
    except TokenRejected as exc:
        log_denied(scope, 401, f"token_{exc.reason}")
        return SignIn(False, "invalid_token")
    except KeysUnavailable:
        log_denied(scope, 503, "keys_unavailable")
        return SignIn(False, "keys_unavailable")
    # Verified above; only the expiry is read here, so that the browser drops the cookie
    # when the token expires and the next page asks for a new one.
    claims = jwt.decode(credential, options={"verify_signature": False})
    expires = claims.get("exp")
    max_age = int(expires - time.time()) if isinstance(expires, int | float) else None
    return SignIn(True, max_age=max(max_age, 1) if max_age is not None else None)
