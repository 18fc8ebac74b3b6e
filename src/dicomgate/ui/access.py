"""Who may open which console page, the login cookie, and the CSRF token of its forms.

With ``http.auth`` configured, a browser signs in on ``/ui/login`` with an API key or a
bearer JWT of the identity provider (:mod:`dicomgate.ui.signin`); it is kept in an HttpOnly,
``SameSite=Strict`` cookie scoped to ``/ui`` (``Secure`` over TLS; a token's cookie expires
with the token), and :class:`UiSessionMiddleware` presents it as ``Authorization: Bearer`` to
the authentication middleware, so the console is checked exactly like the API: ``admin`` for
the Queue and Audit pages, ``read`` for the rest. Every POST carries a form token (HMAC of
the cookie under a per-process secret) that a page of another site cannot read.

Without ``http.auth`` there is no sign-in: the Queue and Audit pages (``admin`` here)
answer only 127.0.0.1 and ::1, like ``/api``
(:class:`~dicomgate.security.ip_filter.LocalAdminMiddleware`); the rest stays open.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal
from urllib.parse import quote

from starlette.types import ASGIApp, Receive, Scope, Send

UI_PREFIX = "/ui"
SESSION_COOKIE = "dicomgate_session"
UiNeed = Literal["open", "read", "admin"]
_OPEN = ("/ui/login", "/ui/logout")
_ADMIN_PREFIXES = ("/ui/queue", "/ui/audit")


def is_ui_path(path: str) -> bool:
    return path == UI_PREFIX or path.startswith(UI_PREFIX + "/")


def ui_requirement(path: str) -> UiNeed:
    """What a console path needs: the login page and static files are open."""
    if path in _OPEN or path.startswith("/ui/static/"):
        return "open"
    if any(path == p or path.startswith(p + "/") for p in _ADMIN_PREFIXES):
        return "admin"
    return "read"


def cookie_value(scope: Scope, name: str = SESSION_COOKIE) -> str | None:
    """The value of cookie ``name`` in the request, or None."""
    for key, value in scope.get("headers", []):
        if key != b"cookie":
            continue
        text: str = value.decode("latin-1")
        for part in text.split(";"):
            k, sep, v = part.strip().partition("=")
            if sep and k == name and v:
                return v
    return None


def csrf_token(secret: bytes, session: str | None) -> str:
    """The form token of a session ("" session: not signed in / no auth configured)."""
    return hmac.new(secret, (session or "").encode(), hashlib.sha256).hexdigest()[:40]


def csrf_ok(secret: bytes, session: str | None, presented: str) -> bool:
    return hmac.compare_digest(csrf_token(secret, session), presented)


class UiSessionMiddleware:
    """For ``/ui`` requests: the session cookie becomes an ``Authorization: Bearer`` header
    (an API key or a JWT, as the API takes them); a browser's
    page request without any credential is sent to the login page instead of a 401 (other
    clients, e.g. ``dicomgate status``, get the API's 401)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_ui_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = list(scope.get("headers", []))
        has_credential = any(k in (b"authorization", b"x-api-key") for k, _ in headers)
        session = cookie_value(scope)
        if not has_credential and session is not None:
            scope = dict(scope)
            bearer = b"Bearer " + session.encode("latin-1")
            scope["headers"] = [*headers, (b"authorization", bearer)]
        elif (
            not has_credential
            and scope["method"] == "GET"
            and ui_requirement(scope["path"]) != "open"
            and any(k == b"accept" and b"text/html" in v for k, v in headers)  # a browser
        ):
            target = quote(scope["path"], safe="/")
            await send(
                {
                    "type": "http.response.start",
                    "status": 303,
                    "headers": [
                        (b"location", f"/ui/login?next={target}".encode()),
                        (b"content-length", b"0"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)
