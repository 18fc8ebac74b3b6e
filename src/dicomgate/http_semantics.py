"""ASGI middleware for HTTP semantics every route shares (RFC 9110).

- :class:`HeadAsGet`: HEAD on every GET resource (RFC 9110 9.1: a general-purpose server
  MUST support GET and HEAD; 9.3.2: HEAD is GET without the content).
- :class:`VaryOnAccept`: ``Vary: Accept`` on DICOMweb and WADO-URI answers, whose
  representation is chosen by the Accept header (RFC 9110 12.5.5).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["HeadAsGet", "VaryOnAccept"]


class HeadAsGet:
    """Answers HEAD as the app answers GET: the same status and headers (Content-Length
    included when the GET has one), no content.

    Installed outside everything else, so authentication, rate limits, CORS, audit and
    metrics see the request as the GET it is answered as. The answer ends with its
    headers: a streamed body (WADO-RS reading files) then finds the client gone, as ASGI
    says ``receive()`` reports once the response is complete, and stops after at most
    the chunk it was reading instead of reading every file for nothing.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            await self.app(scope, receive, send)
            return
        finished = False

        async def headers_only(message: Message) -> None:
            nonlocal finished
            if finished:
                return  # the content of the GET, or what follows it
            if message["type"] == "http.response.start":
                await send(message)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                finished = True

        # A copy: the server keeps its own scope saying HEAD, and frames the answer so.
        await self.app({**scope, "method": "GET"}, receive, headers_only)


class VaryOnAccept:
    """Adds ``Accept`` to the ``Vary`` header of every answer under ``prefixes``, so a
    cache does not hand a JSON answer to a client that asked for multipart (RFC 9110
    12.5.5). A ``Vary`` already there (CORS adds ``Origin``) is extended, not replaced."""

    def __init__(self, app: ASGIApp, prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or not any(
            path == prefix or path.startswith(prefix + "/") for prefix in self.prefixes
        ):
            await self.app(scope, receive, send)
            return

        async def with_vary(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": _vary_accept(list(message.get("headers", [])))}
            await send(message)

        await self.app(scope, receive, with_vary)


def _vary_accept(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` with one ``Vary`` naming Accept and whatever the others named."""
    named: list[str] = []
    others = []
    for name, value in headers:
        if name.lower() == b"vary":
            named += [v.strip() for v in value.decode("latin-1").split(",") if v.strip()]
        else:
            others.append((name, value))
    if not any(v == "*" or v.lower() == "accept" for v in named):
        named.append("Accept")
    return [*others, (b"vary", ", ".join(named).encode("latin-1"))]
