"""Forwarded headers, believed only from ``http.trusted_proxies``.

A reverse proxy says who the client is (``X-Forwarded-For``), which scheme it used
(``X-Forwarded-Proto``) and which host it asked for (``X-Forwarded-Host``). Anyone else can
send the same headers, so they count only when the TCP peer is a listed proxy; from any
other peer they are removed before the app sees them, so no code further in can believe
them by mistake (RFC 7239 8.1: a forwarded header is only as trustworthy as its sender).

From a trusted proxy, all three are applied to the request in one place: the client
address (for ``allowed_ips``, rate limits, routing on ``source_ip``, logs and audit), the
scheme and the Host header (for the URLs answers carry: RetrieveURL, BulkDataURI, FHIR
endpoints). This replaces uvicorn's proxy-headers middleware, which applies the first two
and leaves ``X-Forwarded-Host`` to whoever reads it.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Receive, Scope, Send

from dicomgate.security.asgi import client_ip
from dicomgate.security.ip_filter import IpAllowList

__all__ = ["FORWARDED_HEADERS", "ForwardedHeaders"]

FORWARDED_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")
_NAMES = frozenset(name.encode("ascii") for name in FORWARDED_HEADERS)
# RFC 9110 7.2 Host: uri-host [":" port], uri-host an IP literal or a registered name.
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]+)(:[0-9]{1,5})?")


class ForwardedHeaders:
    """Applies the forwarded headers of a trusted proxy, and drops everyone else's."""

    def __init__(self, app: ASGIApp, trusted: IpAllowList) -> None:
        self.app = app
        self.trusted = trusted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = list(scope.get("headers", ()))
        if not any(name in _NAMES for name, _ in headers):
            await self.app(scope, receive, send)
            return
        if not self.trusted.allows(client_ip(scope)):
            kept = [(name, value) for name, value in headers if name not in _NAMES]
            await self.app({**scope, "headers": kept}, receive, send)
            return
        await self.app(self._forwarded(scope, headers), receive, send)

    def _forwarded(self, scope: Scope, headers: list[tuple[bytes, bytes]]) -> Scope:
        """``scope`` as the proxy's client sent the request."""
        scope = dict(scope)
        hops = [hop.strip() for value in _values(headers, b"x-forwarded-for") for hop in value]
        if hops:
            # The nearest hop not a trusted proxy is the client; each proxy appends the
            # address it got the request from, so what a client wrote is on the left.
            client = next((hop for hop in reversed(hops) if not self.trusted.allows(hop)), hops[0])
            if client:
                scope["client"] = (client, 0)
        proto = _nearest(headers, b"x-forwarded-proto").lower()
        if proto in ("http", "https"):
            scope["scheme"] = proto
        host = _nearest(headers, b"x-forwarded-host")
        if host and _HOST.fullmatch(host):
            scope["headers"] = [(b"host", host.encode("latin-1"))] + [
                (name, value) for name, value in headers if name != b"host"
            ]
        return scope


def _values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[list[str]]:
    """The comma-separated entries of every ``name`` header, in order."""
    return [value.decode("latin-1").split(",") for key, value in headers if key == name]


def _nearest(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    """The last entry of header ``name`` ("" when absent): the one the trusted proxy that
    sent us the request wrote. Entries on its left came from further away, perhaps from
    the client itself (a proxy that appends instead of replacing passes them on)."""
    entries = [entry for values in _values(headers, name) for entry in values]
    return entries[-1].strip() if entries else ""
