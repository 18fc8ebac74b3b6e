"""Network access control for DIMSE: who may connect, and from where an AE title may call.

Two checks, both before any DICOM is read from or written to the peer:

* ``dimse.allowed_ips``: the TCP peer must be inside one of these networks; otherwise the
  connection is closed at once (no A-ASSOCIATE-RJ: nothing is read from an address we do
  not serve, and it learns nothing about us).
* ``dimse.ae_hosts``: an AE title is not a credential (PS3.15 has no notion of AE title
  authentication), so a calling AE listed there is accepted only from its addresses. From
  anywhere else the A-ASSOCIATE-RQ gets A-ASSOCIATE-RJ (permanent, service-user, reason 3
  "calling AE title not recognized", PS3.8 9.3.4).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable, Mapping

from dicomgate.security.ip_filter import IpAllowList

log = logging.getLogger("dicomgate.security")

_RESOLVE_TIMEOUT = 5.0


def is_network(entry: str) -> bool:
    """Whether ``entry`` is an address or CIDR block (else it is taken as a host name)."""
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True


class AeHostBinding:
    """For each bound calling AE title: the networks and host names it may call from."""

    def __init__(self, bindings: Mapping[str, Iterable[str]]) -> None:
        self._networks: dict[str, IpAllowList] = {}
        self._hosts: dict[str, tuple[str, ...]] = {}
        for ae, entries in bindings.items():
            entries = list(entries)
            self._networks[ae] = IpAllowList(e for e in entries if is_network(e))
            self._hosts[ae] = tuple(e for e in entries if not is_network(e))

    def __bool__(self) -> bool:
        return bool(self._networks)

    async def allows(self, calling_ae: str, address: str) -> bool:
        """True when ``calling_ae`` is not bound, or ``address`` is one of its addresses.

        Host names are resolved at each association (the system resolver caches); a name
        that does not resolve within 5 s matches nothing.
        """
        networks = self._networks.get(calling_ae)
        if networks is None:
            return True
        if networks.allows(address):
            return True
        for host in self._hosts[calling_ae]:
            if address in await _addresses(host):
                return True
        return False


async def _addresses(host: str) -> set[str]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(_RESOLVE_TIMEOUT):
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as exc:
        log.warning(
            "dimse.ae_hosts: cannot resolve %s: %s",
            host,
            exc,
            extra={"event": "dimse.resolve_failed", "host": host},
        )
        return set()
    found: set[str] = set()
    for info in infos:
        address = str(info[4][0])
        found.add(address)
        if ":" not in address:
            found.add(f"::ffff:{address}")  # as a dual-stack listener reports IPv4 peers
    return found
