"""Network access control for HTTP: an allow-list of client addresses (CIDR blocks).

The address is the TCP peer, or the forwarded client when the peer is one of
``http.trusted_proxies`` (:mod:`dicomgate.security.forwarded` runs before this one).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from dicomgate.security.asgi import client_ip, has_body, log_denied, send_json
from dicomgate.ui.access import is_ui_path, ui_requirement

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class IpAllowList:
    """Whether an address is inside one of the allowed networks."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in cidrs
        )

    def allows(self, address: str) -> bool:
        """True for an address in a listed network; an unparsable address is refused."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d
        return any(ip.version == net.version and ip in net for net in self.networks)


class IpFilterMiddleware:
    """Answers 403 to clients outside ``allowed`` (every path, health checks included)."""

    def __init__(self, app: ASGIApp, allowed: IpAllowList) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.allowed.allows(client_ip(scope)):
            log_denied(scope, 403, "ip_not_allowed")
            await send_json(send, 403, "forbidden", close=has_body(scope))
            return
        await self.app(scope, receive, send)


_LOCAL_HOST = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


def is_local_host(address: str) -> bool:
    """Whether ``address`` is this host's own 127.0.0.1 or ::1 (IPv4-mapped included).

    Deliberately not all of 127.0.0.0/8: other loopback addresses are often given to
    containers or tunnels that forward remote clients.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip in _LOCAL_HOST


ADMIN_PREFIX = "/api"
LOCAL_ADMIN_ONLY = (
    "the admin API (/api) answers only local clients while HTTP authentication is off:"
    " configure http.auth with an admin API key or token (docs/security.md)"
)
_CONSOLE_LOCAL_ONLY = (
    b"<!doctype html><html lang=en><head><meta charset=utf-8><title>Forbidden - dicomgate"
    b"</title></head><body><main><h1>Forbidden</h1><p>The console's Queue and Audit pages"
    b" answer only this host (127.0.0.1, ::1) while HTTP authentication is off: configure"
    b" <code>http.auth</code> and sign in with an admin key or token"
    b" (docs/security.md).</p><p><a href=/ui>Overview</a></p></main></body></html>"
)


def needs_local_admin(path: str) -> bool:
    """Whether ``path`` administers the gateway: the admin API ``/api`` and the console's
    admin pages (queue re-drive and purge, job details, the audit trail), which do with a
    form what ``/api`` does with JSON."""
    if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
        return True
    return is_ui_path(path) and ui_requirement(path) == "admin"


class LocalAdminMiddleware:
    """Without ``http.auth``: ``/api`` and the console's admin pages (queue operations, the
    audit trail with its PHI) answer 127.0.0.1 and ::1 only; others get 403 naming the fix
    (docs/security.md). The rest of the console and DICOMweb stay open."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = str(scope.get("path", ""))
            if needs_local_admin(path) and not is_local_host(client_ip(scope)):
                log_denied(scope, 403, "admin_needs_auth")
                if is_ui_path(path):
                    await _send_console_refusal(send, close=has_body(scope))
                else:
                    await send_json(send, 403, LOCAL_ADMIN_ONLY, close=has_body(scope))
                return
        await self.app(scope, receive, send)


async def _send_console_refusal(send: Send, close: bool) -> None:
    """A 403 page for a browser (the console's own headers: no script, not framed)."""
    headers = [
        (b"content-type", b"text/html; charset=utf-8"),
        (b"content-length", str(len(_CONSOLE_LOCAL_ONLY)).encode()),
        (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'"),
        (b"x-content-type-options", b"nosniff"),
        (b"cache-control", b"no-store"),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 403, "headers": headers})
    await send({"type": "http.response.body", "body": _CONSOLE_LOCAL_ONLY, "more_body": False})
