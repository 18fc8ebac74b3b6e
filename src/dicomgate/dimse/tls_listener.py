"""The DICOM TLS listener (PS3.15 B.1): accepts TCP connections and does the handshake itself.

Why not ``asyncio.start_server(ssl=...)``: that binds one :class:`ssl.SSLContext` for the
listener's life, and a failed handshake never reaches our code (asyncio logs it at debug
level only). Here each accepted socket is wrapped with the context of the moment
(``context()``, which a certificate reload replaces, so a CA removed from the bundle is no
longer trusted), and a refused handshake is reported to ``on_refused`` with the peer's
address. Upgrading a plain stream with ``start_tls`` instead is racy under uvloop: the
ClientHello may already sit in the plain reader's buffer.

A connection closed before its first byte (a load balancer's TCP health check, a port
scan) is not a handshake: it goes to ``on_probe``, not ``on_refused``. We wait for the
first byte (or the end) with the socket still ours and peek at it, so the TLS layer then
reads the ClientHello from the kernel as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable

log = logging.getLogger("dicomgate.dimse")

_READ_LIMIT = 1 << 20

Connected = Callable[[asyncio.StreamReader, asyncio.StreamWriter, str], None]


def handshake_reason(exc: BaseException) -> str:
    """A short, stable reason for a failed handshake (audit ``detail.tls_error``, no PHI)."""
    if isinstance(exc, TimeoutError | ConnectionAbortedError) and "taking longer" in str(exc):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = (exc.verify_message or "").lower()
        if "expired" in message:
            return "certificate_expired"
        if "not yet valid" in message:
            return "certificate_not_yet_valid"
        if "issuer" in message or "self-signed" in message or "signature" in message:
            return "unknown_ca"
        return "certificate_rejected"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").lower()
        if "peer_did_not_return_a_certificate" in reason or "certificate required" in reason:
            return "no_client_certificate"
        if "alert" in reason and ("ca" in reason or "certificate" in reason):
            return "client_refused_our_certificate"  # the client does not trust dimse.tls.cert
        if "version" in reason or "protocol" in reason:
            return "protocol_version"
        if "cipher" in reason:
            return "no_shared_cipher"
        return reason[:48] or "ssl_error"
    if isinstance(exc, ConnectionError | OSError):
        return "connection_lost"
    return type(exc).__name__[:48]


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class TlsListener:
    """Listening sockets on ``host:port`` whose connections are wrapped in TLS one by one."""

    def __init__(
        self,
        host: str,
        port: int,
        context: Callable[[], ssl.SSLContext],
        *,
        handshake_timeout: float,
        allows: Callable[[str], bool],
        on_connected: Connected,
        on_refused: Callable[[str, BaseException], None],
        on_probe: Callable[[str], None] | None = None,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.context = context
        self.handshake_timeout = handshake_timeout
        self.allows = allows
        self.on_connected = on_connected
        self.on_refused = on_refused
        self.on_probe = on_probe
        self._sockets: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._handshakes: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        return int(self._sockets[0].getsockname()[1]) if self._sockets else 0

    @property
    def serving(self) -> bool:
        return bool(self._accepting) and not any(t.done() for t in self._accepting)

    async def start(self) -> None:
        """Bind every address of ``host`` (as asyncio does); raises :class:`OSError`."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self.host or None,
            self.requested_port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
        port = self.requested_port
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], port, *address[2:]))
                port = sock.getsockname()[1]  # port 0: the same free port on every address
                sock.listen(128)
                sock.setblocking(False)
        except OSError:
            self.close()
            raise
        self._accepting = [
            loop.create_task(self._accept(sock), name="dimse-tls-accept") for sock in self._sockets
        ]

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(listening)
            except OSError as exc:  # EMFILE and friends: wait instead of spinning
                log.warning(
                    "cannot accept a DICOM TLS connection: %s",
                    exc,
                    extra={"event": "dimse.accept_failed"},
                )
                await asyncio.sleep(0.1)
                continue
            peer_ip = str(address[0])
            if not self.allows(peer_ip):
                conn.close()
                continue
            task = loop.create_task(self._handshake(conn, peer_ip))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket, peer_ip: str) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_READ_LIMIT)
        protocol = asyncio.StreamReaderProtocol(reader)
        started = time.monotonic()
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not await self._first_byte(conn):
                conn.close()
                if self.on_probe is not None:
                    self.on_probe(peer_ip)
                return
            left = self.handshake_timeout - (time.monotonic() - started)
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=self.context(),
                ssl_handshake_timeout=max(left, 0.001),
            )
        except (OSError, ConnectionError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            conn.close()
            self.on_refused(peer_ip, exc)
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        self.on_connected(reader, writer, peer_ip)

    async def _first_byte(self, conn: socket.socket) -> bool:
        """Wait for the client's first byte: True when one came (left unread), False when
        the connection ended without any. TimeoutError (taking longer than the handshake
        timeout) when neither happened."""
        loop = asyncio.get_running_loop()
        fd = conn.fileno()
        try:
            async with asyncio.timeout(self.handshake_timeout):
                while True:
                    readable: asyncio.Future[None] = loop.create_future()
                    loop.add_reader(fd, _set_done, readable)
                    try:
                        await readable
                    finally:
                        loop.remove_reader(fd)
                    try:
                        return conn.recv(1, socket.MSG_PEEK) != b""
                    except BlockingIOError:
                        continue
                    except ConnectionError:  # a reset before any byte: a probe as well
                        return False
        except TimeoutError:
            raise TimeoutError("the TLS handshake is taking longer than allowed") from None

    def close(self) -> None:
        """Stop accepting (connections already handed over are not touched)."""
        for task in (*self._accepting, *self._handshakes):
            task.cancel()
        self._accepting = []
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self._sockets = []


__all__ = ["TlsListener", "handshake_reason"]
