"""Small ASGI helpers shared by the HTTP security middleware: JSON refusals and their log.

Every refusal is a JSON body ``{"error": "..."}`` that says what kind of refusal it is and
nothing more (no reason an attacker could learn from); the log line says why, for the
operator and the audit trail, with a stable event name and never a credential.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.types import Scope, Send

log = logging.getLogger("dicomgate.security")

AUTH_DENIED = "auth.denied"


def client_ip(scope: Scope) -> str:
    """The client's address as the app sees it ("" when unknown, e.g. a Unix socket)."""
    client = scope.get("client")
    return str(client[0]) if client else ""


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of request header ``name`` (lower case), decoded as latin-1."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def content_length(scope: Scope) -> int | None:
    """The declared Content-Length, or None when absent or not a number."""
    value = header(scope, b"content-length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def has_body(scope: Scope) -> bool:
    """Whether the request announces a body (Content-Length > 0 or Transfer-Encoding)."""
    length = content_length(scope)
    return bool(length) or header(scope, b"transfer-encoding") is not None


def area(path: str) -> str:
    """The first path segment (``dicomweb``, ``api`` ...): where a request went, without the
    rest of the path, which may hold UIDs (DESIGN rule 5)."""
    return path.lstrip("/").split("/", 1)[0][:32] or "/"


async def send_json(
    send: Send,
    status: int,
    message: str,
    headers: list[tuple[bytes, bytes]] | None = None,
    close: bool = False,
) -> None:
    """Answer ``{"error": message}`` with ``status``; ``close`` ends the connection after
    it (the request body, if any, is left unread)."""
    body = json.dumps({"error": message}).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(headers or []),
    ]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def log_denied(scope: Scope, status: int, reason: str, **fields: Any) -> None:
    """One ``auth.denied`` line: the reason category, the client, where it went.

    The log line has the first path segment only (``area``); the audit row gets the whole
    path as ``audit_path`` (never printed, :mod:`dicomgate.observability.logging`), without
    the query string, which may hold patient names or IDs.
    """
    log.warning(
        "HTTP request denied: %s",
        reason,
        extra={
            "event": AUTH_DENIED,
            "kind": "http",
            "status": status,
            "reason": reason,
            "client_ip": client_ip(scope),
            "method": scope.get("method", ""),
            "area": area(str(scope.get("path", ""))),
            "audit_path": str(scope.get("path", ""))[:1024],  # ASGI: path has no query
            **fields,
        },
    )
