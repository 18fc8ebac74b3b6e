"""Connection-level protection of the HTTP listener (slow-loris and connection floods).

uvicorn (0.54) has a keep-alive timeout between requests but no limit on how long a client
may take to send its request head, nor on how big the head may grow, nor on connections per
client. A client that opens connections and sends headers a byte at a time would hold them
forever. :func:`guarded_http_protocol` subclasses uvicorn's httptools protocol to add:

- a head timeout: from the connection's start (after the TLS handshake, which must itself
  end within ``header_timeout``) or the end of the previous response, the request line and
  headers must be complete within ``header_timeout`` seconds, else the connection is closed;
- a head size limit: more than ``max_header_bytes`` before the headers end gets 431 and the
  connection is closed;
- connections per client IP address (the TCP peer): one more than
  ``max_connections_per_client`` is closed at once; on HTTPS counted from the accept,
  before the TLS handshake (:func:`guarded_http_protocol` does TLS itself for that).

A stalled request *body* is the business of :class:`~dicomgate.security.limits.BodyLimitMiddleware`
(``body_timeout``); idle keep-alive connections are closed by uvicorn (``timeout_keep_alive``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from asyncio import sslproto
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

if TYPE_CHECKING:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

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


def _head_end(data: bytes) -> int:
    """The offset just past the blank line that ends a request head in ``data``, or -1."""
    ends = [i + len(mark) for mark in (b"\r\n\r\n", b"\n\n") if (i := data.find(mark)) >= 0]
    return min(ends) if ends else -1


def guarded_http_protocol(
    guard: ConnectionGuard, tls: Callable[[], ssl.SSLContext] | None = None
) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the limits of ``guard`` (pass as ``http=``).

    With ``tls`` (the server context of the moment; then uvicorn gets no ``ssl`` of its
    own), TLS is done here, in front of the HTTP protocol: the connection counts against
    ``max_connections_per_client`` from its accept and the handshake must end within
    ``header_timeout``. Left to the event loop (uvicorn's ``create_server(ssl=...)`` sets no
    ``ssl_handshake_timeout``), connections still in the handshake were counted nowhere and
    lived 60 s, so one address could hold any number of them silently.
    """

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        counts_connections = True  # False behind GuardedTlsProtocol, which counts them

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_timer: asyncio.TimerHandle | None = None
            self._head_bytes = 0
            self._head_tail = b""  # the last bytes of the head so far (a CRLF CRLF split)
            self._reading_head = True
            self._counted_client: str | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            peer = self.client[0] if self.client else None
            if peer is not None and self.counts_connections:
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
            # Measured before the parser sees the bytes: a head that arrives whole in one
            # read would otherwise be complete (and served) before it was counted.
            window = self._head_tail + data
            end = _head_end(window)
            in_head = len(data) if end < 0 else max(0, end - len(self._head_tail))
            self._head_bytes += in_head
            if self._head_bytes > guard.max_header_bytes:
                if not self.transport.is_closing():
                    self._cancel_head_timer()
                    if self.client:
                        guard.log_throttled(
                            self.client[0], "http.head_too_large", "request head too large"
                        )
                    self.transport.write(_HEAD_TOO_LARGE)
                    self.transport.close()
                return
            self._head_tail = window[-3:] if end < 0 else b""
            super().data_received(data)  # may complete the head (body bytes follow it)

        def on_headers_complete(self) -> None:
            self._reading_head = False
            self._head_bytes = 0
            self._head_tail = b""
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
                self._head_tail = b""
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

    if tls is None:
        return GuardedHttpToolsProtocol
    context_of = tls

    class CountedOutside(GuardedHttpToolsProtocol):
        counts_connections = False

    class GuardedTlsProtocol(sslproto.SSLProtocol):
        """asyncio's TLS layer (what ``create_server(ssl=...)`` puts in front of a protocol)
        made by uvicorn's protocol factory: counted per client at accept, the handshake
        bounded by ``header_timeout``, the HTTP protocol behind it as usual."""

        def __init__(
            self,
            config: Config,
            server_state: ServerState,
            app_state: dict[str, Any],
            _loop: asyncio.AbstractEventLoop | None = None,
        ) -> None:
            http = CountedOutside(
                config=config, server_state=server_state, app_state=app_state, _loop=_loop
            )
            super().__init__(
                _loop or asyncio.get_running_loop(),
                http,
                context_of(),
                None,  # type: ignore[arg-type]  # no waiter: nothing awaits the handshake
                server_side=True,
                ssl_handshake_timeout=cast(int, guard.header_timeout),  # any number of seconds
            )
            self._counted_client: str | None = None
            self._refused = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            peer = transport.get_extra_info("peername")
            client = str(peer[0]) if isinstance(peer, tuple) and peer else None
            if client is not None:
                if not guard.admit(client):
                    self._refused = True
                    transport.close()
                    return
                self._counted_client = client
            super().connection_made(transport)

        def connection_lost(self, exc: BaseException | None) -> None:
            if self._counted_client is not None:
                guard.release(self._counted_client)
                self._counted_client = None
            if not self._refused:
                super().connection_lost(exc)

    # A BufferedProtocol, which uvicorn's factory returns to the loop as it is.
    return cast("type[asyncio.Protocol]", GuardedTlsProtocol)
