"""Connection-level protection of the HTTP listener (slow-loris and connection floods).

uvicorn (0.54) has a keep-alive timeout between requests but no limit on how long a client
may take to send its request head, nor on how big the head may grow, nor on connections per
client. A client that opens connections and sends headers a byte at a time would hold them
forever. :func:`guarded_http_protocol` subclasses uvicorn's httptools protocol to add:

- a head timeout: from the connection's start (after the TLS handshake, which asyncio
  limits to 60 s) or the end of the previous response, the request line and headers must be
  complete within ``header_timeout`` seconds, else the connection is closed;
- a head size limit: more than ``max_header_bytes`` before the headers end gets 431 and the
  connection is closed;
- connections per client IP address (the TCP peer): one more than
  ``max_connections_per_client`` is closed at once.

A stalled request *body* is the business of :class:`~dicomgate.security.limits.BodyLimitMiddleware`
(``body_timeout``); idle keep-alive connections are closed by uvicorn (``timeout_keep_alive``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("dicomgate.security")

_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b'content-length: 35\r\nconnection: close\r\n\r\n{"error": "request head too large"}'
)
_LOG_EVERY = 10.0


@dataclass
class ConnectionGuard:
    """Limits shared by every connection of one listener."""

    header_timeout: float
    max_header_bytes: int
    max_connections_per_client: int  # 0: no limit
    open_per_client: dict[str, int] = field(default_factory=dict)
    _logged: dict[str, float] = field(default_factory=dict)

    def admit(self, client: str) -> bool:
        """Count a new connection from ``client``; False when it is one too many."""
        count = self.open_per_client.get(client, 0)
        if self.max_connections_per_client and count >= self.max_connections_per_client:
            self.log_throttled(client, "http.connection_refused", "too many connections")
            return False
        self.open_per_client[client] = count + 1
        return True

    def release(self, client: str) -> None:
        count = self.open_per_client.get(client, 0) - 1
        if count > 0:
            self.open_per_client[client] = count
        else:
            self.open_per_client.pop(client, None)

    def log_throttled(self, client: str, event: str, message: str) -> None:
        """A warning at most every 10 s per client and event (floods do not flood the log)."""
        key = f"{event}:{client}"
        now = time.monotonic()
        if now - self._logged.get(key, float("-inf")) < _LOG_EVERY:
            return
        if len(self._logged) > 10_000:
            self._logged.clear()
        self._logged[key] = now
        log.warning(message, extra={"event": event, "client_ip": client})


def guarded_http_protocol(guard: ConnectionGuard) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the limits of ``guard`` (pass as ``http=``)."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_timer: asyncio.TimerHandle | None = None
            self._head_bytes = 0
            self._reading_head = True
            self._counted_client: str | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            peer = self.client[0] if self.client else None
            if peer is not None:
                if not guard.admit(peer):
                    transport.close()
                    return
                self._counted_client = peer
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            if self._counted_client is not None:
                guard.release(self._counted_client)
                self._counted_client = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self._reading_head:
                super().data_received(data)
                return
            self._head_bytes += len(data)
            super().data_received(data)  # may complete the head (body bytes follow it)
            if (
                self._reading_head
                and self._head_bytes > guard.max_header_bytes
                and not self.transport.is_closing()
            ):
                self._cancel_head_timer()
                if self.client:
                    guard.log_throttled(
                        self.client[0], "http.head_too_large", "request head too large"
                    )
                self.transport.write(_HEAD_TOO_LARGE)
                self.transport.close()

        def on_headers_complete(self) -> None:
            self._reading_head = False
            self._head_bytes = 0
            self._cancel_head_timer()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # A pipelined request may already be running (its head is complete): only an
            # idle connection waits for a new head.
            if not self.transport.is_closing() and (
                self.cycle is None or self.cycle.response_complete
            ):
                self._reading_head = True
                self._head_bytes = 0
                self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(guard.header_timeout, self._head_timeout)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            busy = self.cycle is not None and not self.cycle.response_complete
            if self._reading_head and not busy and not self.transport.is_closing():
                if self._head_bytes and self.client:  # idle keep-alive closes are normal
                    guard.log_throttled(
                        self.client[0], "http.header_timeout", "request head not completed"
                    )
                self.transport.close()

    return GuardedHttpToolsProtocol
