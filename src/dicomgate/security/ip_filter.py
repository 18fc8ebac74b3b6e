"""Network access control for HTTP: an allow-list of client addresses (CIDR blocks).

The address is the TCP peer, or the forwarded client when the peer is one of
``http.trusted_proxies`` (:mod:`dicomgate.security.forwarded` runs before this one).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from dicomgate.security.asgi import client_ip, has_body, log_denied, send_json

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


class LocalAdminMiddleware:
    """Without ``http.auth``: ``/api`` (queue operations, the audit trail with its PHI)
    answers 127.0.0.1 and ::1 only, others get 403 naming the fix (docs/security.md)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = str(scope.get("path", ""))
            admin = path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")
            if admin and not is_local_host(client_ip(scope)):
                log_denied(scope, 403, "admin_needs_auth")
                await send_json(send, 403, LOCAL_ADMIN_ONLY, close=has_body(scope))
                return
        await self.app(scope, receive, send)
