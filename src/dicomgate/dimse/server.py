"""Event-driven DIMSE acceptor: C-ECHO, C-STORE, and the Query/Retrieve services.

Why not pynetdicom's SCP: its reactor threads poll with 1 ms sleeps (pynetdicom #650,
#917), capping one association near 330-450 instances/s here, below Orthanc. This acceptor
runs on asyncio, wakes on socket readiness, and writes P-DATA fragments of a data set
straight to the spool file as they arrive (DESIGN rule 2), so memory stays flat whatever
the instance size. pynetdicom stays our SCU (``scu.py``). See DESIGN.md "DIMSE".

State machine: PS3.8 9.2, acceptor side (Sta2 -> Sta3 -> Sta6 -> Sta13).

C-FIND, C-MOVE and C-GET (``qr.py``) run as tasks beside the read loop, which keeps reading
so that it sees a C-CANCEL-RQ and, for C-GET, the C-STORE-RSPs of the sub-operations. While
an operation runs, every message is written under the association's write lock, so the
fragments of two messages never interleave; C-STORE and C-ECHO take no lock otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomgate import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomgate.bridge.dimse_scp import build_bridges
from dicomgate.bridge.models import QueryConfig
from dicomgate.config import DimseConfig
from dicomgate.dimse import pdu
from dicomgate.dimse.commands import (
    Command,
    CommandError,
    CommandField,
    Status,
    decode_command,
    encode_response,
)
from dicomgate.dimse.negotiation import (
    QR_SOP_CLASSES,
    VERIFICATION,
    QRService,
    ae_matches,
    negotiate,
    negotiate_extended,
    negotiate_roles,
)
from dicomgate.dimse.qr import QueryRetrieve, Request, move_targets
from dicomgate.dimse.tls_listener import TlsListener, handshake_reason
from dicomgate.errors import (
    DicomgateError,
    DuplicateRejected,
    IndexUnavailable,
    InvalidInstance,
    StoreError,
)
from dicomgate.ingest import IngestJob, Ingestor, InstanceMismatch
from dicomgate.observability.logging import uid_hash
from dicomgate.security.dimse_access import AeHostBinding
from dicomgate.security.ip_filter import IpAllowList
from dicomgate.security.tls import ServerTls
from dicomgate.store.filestore import SpoolFile
from dicomgate.store.part10 import arrival_json, encode_file_meta

log = logging.getLogger("dicomgate.dimse")

_MAX_RQ_LENGTH = 1 << 20  # an A-ASSOCIATE-RQ larger than 1 MiB is not a real one
_MAX_COMMAND_LENGTH = 1 << 16
_READ_CHUNK = 1 << 20
_WHOLE_PDU = 1 << 20  # P-DATA-TF PDUs up to this size are read in one call
_DRAIN_ABOVE = 1 << 18
_MAX_IDENTIFIER = 1 << 20  # a C-FIND/C-MOVE/C-GET identifier larger than this is refused
_QR_SERVICES = {
    CommandField.C_FIND_RQ: QRService.FIND,
    CommandField.C_MOVE_RQ: QRService.MOVE,
    CommandField.C_GET_RQ: QRService.GET,
}


class NotAuthorized(DicomgateError):
    """The calling AE may not use this service (``dimse.allow``)."""


class _PduBody:
    """The body of one P-DATA-TF PDU: read whole when small, else from the socket."""

    def __init__(self, data: bytes | None) -> None:
        self.view = memoryview(data) if data is not None else None
        self.pos = 0

    def take(self, n: int) -> memoryview:
        assert self.view is not None
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out


class _Abort(Exception):
    """Abort the association with an A-ABORT carrying ``reason``."""

    def __init__(self, message: str, reason: pdu.AbortReason) -> None:
        super().__init__(message)
        self.reason = reason


class _PeerGone(Exception):
    """The peer closed, aborted or timed out; nothing more to send."""


def _reject_code(source: int, reason: int) -> str:
    """A short, stable ``reason`` for the ``association.rejected`` event (audit, metrics)."""
    if source == pdu.RejectSource.SERVICE_PROVIDER_PRESENTATION:
        return "limit"
    if source == pdu.RejectSource.SERVICE_USER:
        if reason == pdu.RejectReason.CALLED_AE_NOT_RECOGNIZED:
            return "called_ae"
        if reason == pdu.RejectReason.CALLING_AE_NOT_RECOGNIZED:
            return "calling_ae"
        if reason == pdu.RejectReason.APPLICATION_CONTEXT_NOT_SUPPORTED:
            return "application_context"
    return "protocol_version"


def status_for(error: DicomgateError) -> int:
    """Map an ingest error to a C-STORE failure status (PS3.4 B.2.3)."""
    if isinstance(error, NotAuthorized):
        return Status.NOT_AUTHORIZED
    if isinstance(error, InstanceMismatch):
        return Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(error, InvalidInstance):
        return Status.CANNOT_UNDERSTAND
    if isinstance(error, DuplicateRejected):
        return Status.DUPLICATE_SOP_INSTANCE
    if isinstance(error, StoreError | IndexUnavailable):
        return Status.OUT_OF_RESOURCES
    return Status.PROCESSING_FAILURE


@dataclass
class _Incoming:
    """A C-STORE whose data set is being received."""

    context_id: int
    command: Command
    spool: SpoolFile | None  # None: refused up front, the data set is read and dropped
    data_offset: int = 0
    error: DicomgateError | None = None
    fragments: int = 0
    identifier: bytearray | None = None  # C-FIND/C-MOVE/C-GET: the identifier, collected


@dataclass
class _Association:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer_ip: str
    calling_ae: str = ""
    called_ae: str = ""
    peer_max_pdu: int = 0
    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (sop, ts)
    stored: int = 0
    failed: int = 0
    may_store: bool = True  # dimse.allow.store, decided once per association
    scp_role_classes: set[str] = field(default_factory=set)  # requestor took the SCP role
    fuzzy_contexts: set[int] = field(default_factory=set)  # C-FIND: fuzzy PN negotiated
    # Q/R operations running, by Message ID; C-STORE-RSPs awaited by C-GET sub-operations.
    operations: dict[int, tuple[Request, asyncio.Task[None]]] = field(default_factory=dict)
    store_waiters: dict[int, asyncio.Future[Command]] = field(default_factory=dict)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_operation_end: float = 0.0
    message_id: int = 0  # of the sub-operations we request (C-GET)


class _Channel:
    """The :class:`dicomgate.dimse.qr.Channel` of one association."""

    def __init__(self, server: DimseServer, assoc: _Association) -> None:
        self.server = server
        self.assoc = assoc
        self.peer_max_pdu = assoc.peer_max_pdu

    async def send(self, context_id: int, command: bytes, dataset: bytes | None = None) -> None:
        limit = self.assoc.peer_max_pdu
        data = pdu.encode_p_data(context_id, command, command=True, max_pdu_length=limit)
        if dataset is not None:
            data += pdu.encode_p_data(context_id, dataset, command=False, max_pdu_length=limit)
        async with self.assoc.write_lock:
            await self.server._send(self.assoc, data)

    def storage_contexts(self, sop_class_uid: str) -> list[tuple[int, str]]:
        if sop_class_uid not in self.assoc.scp_role_classes:
            return []
        return [(cid, ts) for cid, (sop, ts) in self.assoc.contexts.items() if sop == sop_class_uid]

    def next_message_id(self) -> int:
        self.assoc.message_id = self.assoc.message_id % 0xFFFF + 1
        return self.assoc.message_id

    async def store(
        self,
        context_id: int,
        command: bytes,
        message_id: int,
        dataset: bytes | tuple[Path, int],
        timeout: float,
    ) -> Command:
        assoc = self.assoc
        future: asyncio.Future[Command] = asyncio.get_running_loop().create_future()
        assoc.store_waiters[message_id] = future
        try:
            async with assoc.write_lock:
                await self._write_store(context_id, command, dataset)
            async with asyncio.timeout(timeout):
                return await future
        finally:
            assoc.store_waiters.pop(message_id, None)

    async def _write_store(
        self, context_id: int, command: bytes, dataset: bytes | tuple[Path, int]
    ) -> None:
        send, assoc = self.server._send, self.assoc
        limit = assoc.peer_max_pdu
        await send(
            assoc, pdu.encode_p_data(context_id, command, command=True, max_pdu_length=limit)
        )
        if isinstance(dataset, bytes):
            await send(
                assoc, pdu.encode_p_data(context_id, dataset, command=False, max_pdu_length=limit)
            )
            return
        # Stream the stored file: 1 MiB reads, PDUs no larger than the peer accepts.
        path, offset = dataset
        fragment = min((limit or _READ_CHUNK) - 6, _READ_CHUNK - 6)
        block_size = _READ_CHUNK - _READ_CHUNK % fragment  # whole fragments per read
        with path.open("rb") as fh:
            left = await asyncio.to_thread(lambda: fh.seek(0, 2) - offset)
            fh.seek(offset)
            if left <= 0:
                await send(assoc, pdu.encode_pdv_pdu(context_id, b"", command=False, last=True))
                return
            while left > 0:
                block = await asyncio.to_thread(fh.read, min(left, block_size))
                if not block:
                    raise OSError("stored file shorter than its size")
                left -= len(block)
                view = memoryview(block)
                out = []
                for start in range(0, len(view), fragment):
                    chunk = view[start : start + fragment]
                    last = left == 0 and start + fragment >= len(view)
                    out.append(pdu.encode_pdv_pdu(context_id, chunk, command=False, last=last))
                await send(assoc, b"".join(out))


class DimseServer:
    """Accepts associations; serves C-ECHO and C-STORE into an :class:`Ingestor`, and
    C-FIND, C-MOVE and C-GET from its index and store (``qr.py``).

    ``destinations`` (the gateway's ``destinations``) adds the ``dimse`` ones as move
    destinations, beside ``dimse.move_destinations``.
    """

    def __init__(
        self,
        config: DimseConfig,
        ingestor: Ingestor,
        destinations: Mapping[str, Any] | None = None,
        query: QueryConfig | None = None,
    ) -> None:
        self.config = config
        self.ingestor = ingestor
        # query: where C-FIND/C-MOVE/C-GET go, by called AE title (``bridge/``).
        bridges, default_bridge = build_bridges(
            query or QueryConfig(),
            destinations or {},
            our_ae=config.ae_title,
            spool_dir=ingestor.store.spool_dir,
        )
        self.virtual_aes = frozenset(bridges)  # accepted even with check_called_ae
        self.qr = QueryRetrieve(
            config,
            ingestor.index,
            ingestor.store,
            move_targets(config, destinations),
            bridges,
            default_bridge,
        )
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._per_ae: Counter[str] = Counter()
        self._active = 0
        self.port = config.port
        # DICOM TLS (PS3.15 B.1): its own listener; the context is loaded in start().
        self.tls: ServerTls | None = None
        self.tls_port = config.tls.port if config.tls is not None else 0
        self._tls_listener: TlsListener | None = None
        self._tls_watch: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._allowed_ips = IpAllowList(config.allowed_ips) if config.allowed_ips else None
        self._ae_hosts = AeHostBinding(config.ae_hosts)

    @property
    def listening(self) -> bool:
        serving = [s.is_serving() for s in (self._server,) if s is not None]
        if self._tls_listener is not None:
            serving.append(self._tls_listener.serving)
        return bool(serving) and all(serving)

    async def start(self) -> None:
        """Listen on ``dimse.port`` (unless ``tls.plain`` is false) and ``dimse.tls.port``.

        Raises :class:`DicomgateError` naming ``dimse.tls`` when the certificate, key or CA
        do not load or the TLS port cannot be bound; :class:`OSError` for the plain port.
        """
        cfg = self.config
        if cfg.tls is not None:
            # Each handshake (tls_listener.py, bounded by acse_timeout) takes the context of
            # the moment; a reload builds a fresh one and swaps it in, so a CA removed from
            # the bundle is no longer trusted (loading into a context only adds CAs).
            self.tls = ServerTls(cfg.tls, section="dimse.tls", swap=True)
            self.tls.load()
        if cfg.tls is None or cfg.tls.plain:
            self._server = await self._listen(cfg.port, secure=False)
            self.port = self._server.sockets[0].getsockname()[1]
            log.info(
                "listening on %s:%d as %s",
                cfg.host,
                self.port,
                cfg.ae_title,
                extra={"event": "dimse.listening"},
            )
        if cfg.tls is not None and self.tls is not None:
            tls = self.tls
            self._tls_listener = TlsListener(
                cfg.host,
                cfg.tls.port,
                lambda: tls.context,
                handshake_timeout=cfg.acse_timeout,
                allows=lambda peer_ip: not self._ip_refused(peer_ip),
                on_connected=lambda r, w, peer_ip: self._on_connection(r, w, secure=True),
                on_refused=self._handshake_failed,
                on_probe=self._probed,
            )
            try:
                await self._tls_listener.start()
            except OSError as exc:
                raise DicomgateError(
                    f"dimse.tls.port: cannot listen on {cfg.host}:{cfg.tls.port}:"
                    f" {exc.strerror or exc}"
                ) from exc
            self.tls_port = self._tls_listener.port
            log.info(
                "listening for DICOM TLS on %s:%d as %s",
                cfg.host,
                self.tls_port,
                cfg.ae_title,
                extra={"event": "dimse.listening", "tls": True},
            )
            if cfg.tls.check_interval > 0:
                self._tls_watch = asyncio.get_running_loop().create_task(
                    self.tls.watch(self._stopping), name="dimse-tls-watch"
                )

    async def _listen(self, port: int, *, secure: bool) -> asyncio.Server:
        def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._on_connection(reader, writer, secure=secure)

        return await asyncio.start_server(
            on_connection,
            self.config.host,
            port,
            limit=_READ_CHUNK,
            reuse_address=True,
            backlog=128,
        )

    def reload_tls(self, why: str = "sighup") -> None:
        """Load the DICOM TLS certificate, key and CA again, for new associations."""
        if self.tls is not None:
            self.tls.reload(why)

    async def stop(self, grace: float) -> None:
        """Stop accepting; give open associations ``grace`` seconds, then abort them."""
        self._stopping.set()
        if self._tls_watch is not None:
            self._tls_watch.cancel()
        if self._tls_listener is not None:
            self._tls_listener.close()
        if self._server is not None:
            self._server.close()
        if self._tasks:
            log.info(
                "waiting up to %.0f s for %d associations",
                grace,
                len(self._tasks),
                extra={"event": "dimse.draining"},
            )
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        log.info("stopped", extra={"event": "dimse.stopped"})

    # -- connection handling ------------------------------------------------------------

    def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, secure: bool
    ) -> None:
        """A new connection (on the TLS port: after the handshake, ``secure``)."""
        peer = writer.get_extra_info("peername")
        peer_ip = str(peer[0]) if peer else "?"
        if not secure and self._ip_refused(peer_ip):  # TLS: checked before the handshake
            writer.transport.abort()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Without it every PDU may wait ~40 ms for a delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.get_running_loop().create_task(
            self._serve(_Association(reader, writer, peer_ip))
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ip_refused(self, peer_ip: str) -> bool:
        """dimse.allowed_ips: a refused peer is closed before anything is read or sent
        (docs/security.md)."""
        if self._allowed_ips is None or self._allowed_ips.allows(peer_ip):
            return False
        log.warning(
            "connection refused: %s is not in dimse.allowed_ips",
            peer_ip,
            extra={"event": "association.rejected", "reason": "ip_not_allowed", "peer": peer_ip},
        )
        return True

    def _probed(self, peer_ip: str) -> None:
        """A TCP connection closed before any byte: a load balancer's health check, most
        likely. Not a refused handshake (no audit row, no warning): DEBUG, and counted
        (``dicomgate_dimse_tls_probes_total``) by the events handler, which is handed the
        record even below the logger's level."""
        record = log.makeRecord(
            log.name,
            logging.DEBUG,
            __file__,
            0,
            "connection to the DICOM TLS port closed before any byte (a health check?)",
            (),
            None,
            extra={"event": "dimse.tls_probe", "peer": peer_ip},
        )
        log.handle(record)

    def _handshake_failed(self, peer_ip: str, exc: BaseException) -> None:
        log.warning(
            "DICOM TLS handshake failed: %s",
            exc,
            extra={
                "event": "association.rejected",
                "reason": "tls_handshake_failed",
                "tls_error": handshake_reason(exc),
                "peer": peer_ip,
            },
        )

    async def _serve(self, assoc: _Association) -> None:
        counted = False
        try:
            counted = await self._establish(assoc)
            if counted:
                await self._data_transfer(assoc)
        except _Abort as exc:
            log.warning(
                "association aborted: %s",
                exc,
                extra={
                    "event": "association.aborted",
                    "calling_ae": assoc.calling_ae,
                    "peer": assoc.peer_ip,
                },
            )
            await self._send(assoc, pdu.encode_abort(exc.reason))
        except _PeerGone as exc:
            log.info(
                "association ended: %s",
                exc,
                extra={
                    "event": "association.lost",
                    "calling_ae": assoc.calling_ae,
                    "peer": assoc.peer_ip,
                },
            )
        except asyncio.CancelledError:
            log.warning(
                "association aborted at shutdown",
                extra={"event": "association.aborted", "calling_ae": assoc.calling_ae},
            )
            await self._send(assoc, pdu.encode_abort(pdu.AbortReason.NOT_SPECIFIED))
        except Exception:
            log.exception("association failed", extra={"event": "association.internal_error"})
            await self._send(assoc, pdu.encode_abort(pdu.AbortReason.NOT_SPECIFIED))
        finally:
            if counted:
                self._active -= 1
                self._per_ae[assoc.calling_ae] -= 1
                if self._per_ae[assoc.calling_ae] <= 0:
                    del self._per_ae[assoc.calling_ae]
            assoc.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(assoc.writer.wait_closed(), 2)

    async def _send(self, assoc: _Association, data: bytes) -> None:
        try:
            assoc.writer.write(data)
            # Waiting for drain costs a scheduling round per response; only wait when the
            # peer is not reading (flow control), which is what drain is for.
            if assoc.writer.transport.get_write_buffer_size() > _DRAIN_ABOVE:
                async with asyncio.timeout(self.config.network_timeout):
                    await assoc.writer.drain()
        except (OSError, TimeoutError, ConnectionError) as exc:
            raise _PeerGone(f"cannot send: {exc}") from None

    async def _read(self, assoc: _Association, n: int, timeout: float) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await assoc.reader.readexactly(n)
        except TimeoutError:
            raise _Abort(f"no data for {timeout:.0f} s", pdu.AbortReason.NOT_SPECIFIED) from None
        except asyncio.IncompleteReadError:
            raise _PeerGone("peer closed the connection") from None
        except (OSError, ConnectionError) as exc:
            raise _PeerGone(f"connection error: {exc}") from None

    async def _establish(self, assoc: _Association) -> bool:
        """Sta2 -> Sta6. Returns True when the association was accepted (and counted)."""
        cfg = self.config
        head = await self._read(assoc, 6, cfg.acse_timeout)
        pdu_type, length = head[0], struct.unpack(">I", head[2:6])[0]
        if pdu_type != pdu.PduType.ASSOCIATE_RQ:
            raise _Abort(
                f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}",
                pdu.AbortReason.UNEXPECTED_PDU
                if pdu_type in pdu.PduType._value2member_map_
                else pdu.AbortReason.UNRECOGNIZED_PDU,
            )
        if length > _MAX_RQ_LENGTH or length < 68:
            raise _Abort(
                f"A-ASSOCIATE-RQ with absurd length {length}",
                pdu.AbortReason.INVALID_PDU_PARAMETER_VALUE,
            )
        body = await self._read(assoc, length, cfg.acse_timeout)
        try:
            rq = pdu.parse_associate_rq(body)
        except pdu.PduError as exc:
            raise _Abort(f"malformed A-ASSOCIATE-RQ: {exc}", exc.reason) from None
        assoc.calling_ae, assoc.called_ae = rq.calling_ae, rq.called_ae
        rejection = self._rejection(rq)
        code = _reject_code(*rejection[1:3]) if rejection is not None else ""
        if rejection is None and not await self._ae_hosts.allows(rq.calling_ae, assoc.peer_ip):
            # dimse.ae_hosts: an AE title is not a credential; PS3.8 9.3.4 reason 3.
            rejection = (
                pdu.RejectResult.PERMANENT,
                pdu.RejectSource.SERVICE_USER,
                pdu.RejectReason.CALLING_AE_NOT_RECOGNIZED,
                f"calling AE title {rq.calling_ae!r} may not call from {assoc.peer_ip}",
            )
            code = "ae_host"
        if rejection is not None:
            result, source, reason, why = rejection
            log.warning(
                "association rejected: %s",
                why,
                extra={
                    "event": "association.rejected",
                    "reason": code,
                    "calling_ae": rq.calling_ae,
                    "called_ae": rq.called_ae,
                    "peer": assoc.peer_ip,
                },
            )
            await self._send(assoc, pdu.encode_associate_rj(result, source, reason))
            return False
        answers = negotiate(rq.contexts)
        for ctx, answer in zip(rq.contexts, answers, strict=True):
            if answer.result == pdu.ContextResult.ACCEPTANCE:
                assoc.contexts[ctx.context_id] = (ctx.abstract_syntax, answer.transfer_syntax)
        assoc.peer_max_pdu = rq.max_pdu_length
        accepted = {sop for sop, _ in assoc.contexts.values()}
        # SCP/SCU role selection (PS3.7 D.3.3.4): a C-GET requestor takes the SCP role of the
        # storage classes it wants to receive; extended negotiation: C-FIND options.
        roles = negotiate_roles(rq.roles, accepted)
        assoc.scp_role_classes = {r.sop_class_uid for r in roles if r.scp_role}
        extended = negotiate_extended(rq.extended, accepted)
        fuzzy = {e.sop_class_uid for e in extended if len(e.info) > 2 and e.info[2]}
        assoc.fuzzy_contexts = {cid for cid, (sop, _) in assoc.contexts.items() if sop in fuzzy}
        assoc.may_store = ae_matches(rq.calling_ae, cfg.allow.store)
        self._active += 1
        self._per_ae[rq.calling_ae] += 1
        await self._send(
            assoc,
            pdu.encode_associate_ac(
                rq,
                answers,
                max_pdu_length=cfg.max_pdu_size,
                implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                implementation_version_name=IMPLEMENTATION_VERSION_NAME,
                roles=roles,
                extended=extended,
            ),
        )
        log.info(
            "association accepted",
            extra={
                "event": "association.accepted",
                "calling_ae": rq.calling_ae,
                "peer": assoc.peer_ip,
                "contexts": f"{len(assoc.contexts)}/{len(rq.contexts)}",
                "tls": assoc.writer.get_extra_info("ssl_object") is not None,
            },
        )
        return True

    def _rejection(
        self, rq: pdu.AssociateRQ
    ) -> tuple[pdu.RejectResult, pdu.RejectSource, int, str] | None:
        cfg = self.config
        perm, trans = pdu.RejectResult.PERMANENT, pdu.RejectResult.TRANSIENT
        user = pdu.RejectSource.SERVICE_USER
        if not rq.protocol_version & 1:
            return perm, pdu.RejectSource.SERVICE_PROVIDER_ACSE, 2, "protocol version unsupported"
        if rq.application_context != pdu.APPLICATION_CONTEXT:
            return (
                perm,
                user,
                pdu.RejectReason.APPLICATION_CONTEXT_NOT_SUPPORTED,
                ("application context not supported"),
            )
        if (
            cfg.check_called_ae
            and rq.called_ae != cfg.ae_title
            and rq.called_ae not in self.virtual_aes
        ):
            return (
                perm,
                user,
                pdu.RejectReason.CALLED_AE_NOT_RECOGNIZED,
                (f"called AE title {rq.called_ae!r} is not {cfg.ae_title!r}"),
            )
        if not ae_matches(rq.calling_ae, cfg.allowed_calling_aets):
            return (
                perm,
                user,
                pdu.RejectReason.CALLING_AE_NOT_RECOGNIZED,
                (f"calling AE title {rq.calling_ae!r} is not allowed"),
            )
        if self._active >= cfg.max_associations:
            return (
                trans,
                pdu.RejectSource.SERVICE_PROVIDER_PRESENTATION,
                2,
                (f"limit of {cfg.max_associations} associations reached"),
            )
        if self._per_ae[rq.calling_ae] >= cfg.max_associations_per_ae:
            return (
                trans,
                pdu.RejectSource.SERVICE_PROVIDER_PRESENTATION,
                2,
                (f"limit of {cfg.max_associations_per_ae} associations per calling AE reached"),
            )
        return None

    # -- Sta6: data transfer ------------------------------------------------------------

    async def _data_transfer(self, assoc: _Association) -> None:
        cfg = self.config
        command_buf = bytearray()
        command_ctx = 0
        incoming: _Incoming | None = None
        try:
            while True:
                timeout = cfg.dimse_timeout if (incoming or command_buf) else cfg.network_timeout
                try:
                    head = await self._read(assoc, 6, timeout)
                except _Abort:
                    # An operation of ours (a long C-MOVE) keeps the association busy.
                    if assoc.operations or (time.monotonic() - assoc.last_operation_end < timeout):
                        continue
                    raise
                pdu_type, length = head[0], struct.unpack(">I", head[2:6])[0]
                if pdu_type == pdu.PduType.RELEASE_RQ:
                    if length != 4:  # PS3.8 9.3.6: four reserved bytes
                        raise _Abort(
                            f"A-RELEASE-RQ of length {length}",
                            pdu.AbortReason.INVALID_PDU_PARAMETER_VALUE,
                        )
                    await self._read(assoc, length, cfg.acse_timeout)
                    if incoming is not None and incoming.spool is not None:
                        incoming.spool.discard()
                    await self._end_operations(assoc)
                    await self._send(assoc, pdu.encode_release_rp())
                    log.info(
                        "association released",
                        extra={
                            "event": "association.released",
                            "calling_ae": assoc.calling_ae,
                            "stored": assoc.stored,
                            "failed": assoc.failed,
                        },
                    )
                    return
                if pdu_type == pdu.PduType.ABORT:
                    if incoming is not None and incoming.spool is not None:
                        incoming.spool.discard()
                    raise _PeerGone("peer sent A-ABORT")
                if pdu_type != pdu.PduType.P_DATA_TF:
                    if incoming is not None and incoming.spool is not None:
                        incoming.spool.discard()
                    known = pdu_type in pdu.PduType._value2member_map_
                    raise _Abort(
                        f"unexpected PDU type 0x{pdu_type:02X} during data transfer",
                        pdu.AbortReason.UNEXPECTED_PDU
                        if known
                        else pdu.AbortReason.UNRECOGNIZED_PDU,
                    )
                if cfg.max_pdu_size and length > cfg.max_pdu_size:
                    # PS3.8 D.1: the sender must respect the maximum we announced; a
                    # longer PDU is a broken or hostile peer, refused before its body.
                    if incoming is not None and incoming.spool is not None:
                        incoming.spool.discard()
                    raise _Abort(
                        f"P-DATA-TF of {length} bytes, above the {cfg.max_pdu_size} announced",
                        pdu.AbortReason.INVALID_PDU_PARAMETER_VALUE,
                    )
                remaining = length
                whole = length <= _WHOLE_PDU
                body = _PduBody(
                    await self._read(assoc, length, cfg.dimse_timeout) if whole else None
                )
                while remaining > 0:
                    if remaining < 6:
                        raise _Abort(
                            "P-DATA-TF with a truncated PDV item",
                            pdu.AbortReason.INVALID_PDU_PARAMETER_VALUE,
                        )
                    item = (
                        body.take(6)
                        if body.view is not None
                        else await self._read(assoc, 6, cfg.dimse_timeout)
                    )
                    item_length, context_id, control = struct.unpack(">IBB", item)
                    data_length = item_length - 2
                    if item_length < 2 or data_length + 6 > remaining:
                        raise _Abort(
                            f"PDV item length {item_length} does not fit its PDU",
                            pdu.AbortReason.INVALID_PDU_PARAMETER_VALUE,
                        )
                    remaining -= 6 + data_length
                    if context_id not in assoc.contexts:
                        raise _Abort(
                            f"PDV on presentation context {context_id}, not accepted",
                            pdu.AbortReason.INVALID_PDU_PARAMETER_VALUE,
                        )
                    is_command, last = bool(control & 1), bool(control & 2)
                    if is_command:
                        if incoming is not None:
                            raise _Abort(
                                "command fragment while a data set is arriving",
                                pdu.AbortReason.UNEXPECTED_PDU_PARAMETER,
                            )
                        if command_buf and context_id != command_ctx:
                            raise _Abort(
                                "command fragments on different contexts",
                                pdu.AbortReason.INVALID_PDU_PARAMETER_VALUE,
                            )
                        command_ctx = context_id
                        command_buf += (
                            body.take(data_length)
                            if body.view is not None
                            else await self._read(assoc, data_length, cfg.dimse_timeout)
                        )
                        if len(command_buf) > _MAX_COMMAND_LENGTH:
                            raise _Abort(
                                "command set larger than 64 KiB",
                                pdu.AbortReason.INVALID_PDU_PARAMETER_VALUE,
                            )
                        if last:
                            raw = bytes(command_buf)
                            command_buf.clear()
                            incoming = await self._on_command(assoc, context_id, raw)
                    else:
                        if incoming is None or context_id != incoming.context_id:
                            raise _Abort(
                                "data set fragment without a command on its context",
                                pdu.AbortReason.UNEXPECTED_PDU_PARAMETER,
                            )
                        if body.view is not None:
                            self._write_fragment(incoming, body.take(data_length))
                        else:
                            await self._receive_fragment(assoc, incoming, data_length)
                        if last:
                            done, incoming = incoming, None
                            await self._finish_store(assoc, done)
        except BaseException:
            # Whatever ends the association mid-instance (timeout, abort, bug), the half
            # data set must not stay in the spool.
            if incoming is not None and incoming.spool is not None:
                incoming.spool.discard()
            for _, task in assoc.operations.values():
                task.cancel()
            raise

    async def _receive_fragment(self, assoc: _Association, incoming: _Incoming, n: int) -> None:
        """Copy ``n`` bytes of data set from the socket to the spool file, in chunks."""
        while n > 0:
            chunk = await self._read(assoc, min(n, _READ_CHUNK), self.config.dimse_timeout)
            n -= len(chunk)
            self._write_fragment(incoming, chunk)

    @staticmethod
    def _write_fragment(incoming: _Incoming, data: bytes | memoryview) -> None:
        incoming.fragments += 1
        if incoming.spool is None:
            if incoming.identifier is not None:
                if len(incoming.identifier) + len(data) > _MAX_IDENTIFIER:
                    incoming.identifier = None
                    incoming.error = InvalidInstance("identifier larger than 1 MiB")
                else:
                    incoming.identifier += data
            return
        try:
            incoming.spool.write(data)
        except StoreError as exc:
            incoming.spool.discard()
            incoming.spool = None
            incoming.error = exc

    async def _on_command(
        self, assoc: _Association, context_id: int, raw: bytes
    ) -> _Incoming | None:
        try:
            command = decode_command(raw)
        except CommandError as exc:
            raise _Abort(
                f"undecodable command set: {exc}", pdu.AbortReason.INVALID_PDU_PARAMETER_VALUE
            ) from None
        sop_class, transfer_syntax = assoc.contexts[context_id]
        field_ = command.command_field
        if field_ == CommandField.C_ECHO_RQ:
            await self._respond(
                assoc,
                context_id,
                encode_response(
                    CommandField.C_ECHO_RSP,
                    command.message_id,
                    Status.SUCCESS,
                    sop_class_uid=VERIFICATION,
                ),
            )
            log.debug("echo", extra={"event": "echo.answered", "calling_ae": assoc.calling_ae})
            if command.has_dataset:
                return _Incoming(context_id, command, None)
            return None
        if field_ == CommandField.C_STORE_RQ and command.has_dataset:
            incoming = _Incoming(context_id, command, None)
            if not assoc.may_store:
                incoming.error = NotAuthorized(f"{assoc.calling_ae!r} may not store here")
                return incoming
            if command.affected_sop_class_uid != sop_class:
                incoming.error = InstanceMismatch(
                    "Affected SOP Class UID differs from the presentation context's"
                )
                return incoming
            try:
                self.ingestor.store.check_space()
                spool = self.ingestor.store.new_spool()
                header = encode_file_meta(
                    sop_class,
                    command.affected_sop_instance_uid,
                    transfer_syntax,
                    assoc.calling_ae,
                    arrival_json(assoc.calling_ae, assoc.called_ae, assoc.peer_ip, "dimse"),
                )
                spool.write(header)
            except StoreError as exc:
                incoming.error = exc
                return incoming
            incoming.spool = spool
            incoming.data_offset = len(header)
            return incoming
        if field_ in _QR_SERVICES:
            incoming = _Incoming(context_id, command, None, identifier=bytearray())
            if command.has_dataset:
                return incoming
            await self._start_operation(assoc, incoming)
            return None
        if field_ == CommandField.C_STORE_RSP and command.message_id_responded_to is not None:
            waiter = assoc.store_waiters.pop(command.message_id_responded_to, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(command)
                return None
        if field_ == CommandField.C_CANCEL_RQ:
            # PS3.7 9.3.2.3: no response; the operation ends with status Cancel (0xFE00).
            running = assoc.operations.get(command.message_id_responded_to or 0)
            if running is not None:
                running[0].cancelled = True
            log.info(
                "cancel requested",
                extra={"event": "dimse.cancel", "calling_ae": assoc.calling_ae},
            )
            return None
        # Anything else: PS3.7 C.4.2 "unrecognized operation", data set (if any) dropped.
        log.warning(
            "unsupported command 0x%04X",
            field_,
            extra={"event": "dimse.unsupported_command", "calling_ae": assoc.calling_ae},
        )
        incoming = _Incoming(context_id, command, None)
        incoming.error = DicomgateError("unrecognized operation")
        if command.has_dataset:
            return incoming
        await self._reply_unsupported(assoc, incoming)
        return None

    async def _reply_unsupported(self, assoc: _Association, incoming: _Incoming) -> None:
        command = incoming.command
        await self._respond(
            assoc,
            incoming.context_id,
            encode_response(
                command.command_field | 0x8000,
                command.message_id,
                Status.UNRECOGNIZED_OPERATION,
                sop_class_uid=command.affected_sop_class_uid,
            ),
        )

    async def _finish_store(self, assoc: _Association, incoming: _Incoming) -> None:
        command = incoming.command
        if command.command_field == CommandField.C_ECHO_RQ:
            return
        if command.command_field != CommandField.C_STORE_RQ:
            if command.command_field in _QR_SERVICES:
                await self._start_operation(assoc, incoming)
                return
            await self._reply_unsupported(assoc, incoming)
            return
        error = incoming.error
        if error is None and incoming.spool is not None:
            sop_class, transfer_syntax = assoc.contexts[incoming.context_id]
            loop = asyncio.get_running_loop()
            job = IngestJob(
                spool=incoming.spool,
                data_offset=incoming.data_offset,
                transfer_syntax=transfer_syntax,
                sop_class_uid=sop_class,
                sop_instance_uid=command.affected_sop_instance_uid,
                calling_ae=assoc.calling_ae,
                called_ae=assoc.called_ae,
                source_ip=assoc.peer_ip,
                received_via="dimse",
                loop=loop,
                future=loop.create_future(),
            )
            incoming.spool = None  # owned by the ingestor from here on
            error = await self.ingestor.ingest(job)
        if error is None:
            assoc.stored += 1
            status, comment = int(Status.SUCCESS), ""
        else:
            assoc.failed += 1
            status = status_for(error)
            comment = str(error)
            if incoming.error is not None:  # refused before the ingestor saw it
                log.warning(
                    "instance refused: %s",
                    error,
                    extra={
                        "event": "instance.refused",
                        "reason": (
                            "not_authorized"
                            if isinstance(error, NotAuthorized)
                            else type(error).__name__
                        ),
                        "status": f"0x{status:04X}",
                        "calling_ae": assoc.calling_ae,
                        "peer": assoc.peer_ip,
                        "sop": uid_hash(command.affected_sop_instance_uid),
                    },
                )
        await self._respond(
            assoc,
            incoming.context_id,
            encode_response(
                CommandField.C_STORE_RSP,
                command.message_id,
                status,
                sop_class_uid=command.affected_sop_class_uid,
                sop_instance_uid=command.affected_sop_instance_uid,
                error_comment=comment,
            ),
        )

    async def _respond(self, assoc: _Association, context_id: int, command: bytes) -> None:
        data = pdu.encode_p_data(
            context_id, command, command=True, max_pdu_length=assoc.peer_max_pdu
        )
        if assoc.operations:  # an operation may be half-way through writing a message
            async with assoc.write_lock:
                await self._send(assoc, data)
        else:
            await self._send(assoc, data)

    # -- Query/Retrieve -----------------------------------------------------------------

    async def _start_operation(self, assoc: _Association, incoming: _Incoming) -> None:
        """Check a C-FIND/C-MOVE/C-GET request, then serve it as a task (``qr.py``)."""
        command, context_id = incoming.command, incoming.context_id
        service = _QR_SERVICES[CommandField(command.command_field)]
        sop_class, transfer_syntax = assoc.contexts[context_id]
        known = QR_SOP_CLASSES.get(sop_class)
        status, comment = 0, ""
        if known is None or known[1] is not service:
            status, comment = Status.SOP_CLASS_NOT_SUPPORTED, "not this context's service"
        elif command.affected_sop_class_uid != sop_class:
            status, comment = Status.SOP_CLASS_NOT_SUPPORTED, "SOP class differs from context's"
        elif command.message_id in assoc.operations:
            status, comment = Status.DUPLICATE_INVOCATION, "Message ID already in use"
        elif not ae_matches(assoc.calling_ae, getattr(self.config.allow, service.value)):
            status, comment = Status.NOT_AUTHORIZED, f"{assoc.calling_ae} may not {service.value}"
        elif incoming.error is not None:
            status, comment = Status.UNABLE_TO_PROCESS, str(incoming.error)
        if status:
            log.warning(
                "%s refused: %s",
                service.value,
                comment,
                extra={
                    "event": f"{service.value}.refused",
                    "calling_ae": assoc.calling_ae,
                    "status": f"0x{status:04X}",
                },
            )
            await self._respond(
                assoc,
                context_id,
                encode_response(
                    command.command_field | 0x8000,
                    command.message_id,
                    status,
                    sop_class_uid=command.affected_sop_class_uid,
                    error_comment=comment,
                ),
            )
            return
        assert known is not None
        request = Request(
            context_id=context_id,
            command=command,
            identifier=bytes(incoming.identifier or b""),
            transfer_syntax=transfer_syntax,
            model=known[0],
            service=service,
            calling_ae=assoc.calling_ae,
            called_ae=assoc.called_ae,
            fuzzy=context_id in assoc.fuzzy_contexts,
        )
        task = asyncio.get_running_loop().create_task(self._run_operation(assoc, request))
        assoc.operations[command.message_id] = (request, task)

    async def _run_operation(self, assoc: _Association, request: Request) -> None:
        try:
            await self.qr.serve(request, _Channel(self, assoc))
        except _PeerGone:
            assoc.writer.transport.abort()  # the reader ends the association
        except TimeoutError:
            log.warning(
                "no C-STORE response from the C-GET requestor in time",
                extra={"event": "association.aborted", "calling_ae": assoc.calling_ae},
            )
            with contextlib.suppress(_PeerGone):
                await self._send(assoc, pdu.encode_abort(pdu.AbortReason.NOT_SPECIFIED))
            assoc.writer.transport.abort()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "%s failed",
                request.service.value,
                extra={"event": "association.internal_error", "calling_ae": assoc.calling_ae},
            )
            with contextlib.suppress(_PeerGone):
                await self._send(assoc, pdu.encode_abort(pdu.AbortReason.NOT_SPECIFIED))
            assoc.writer.transport.abort()
        finally:
            assoc.operations.pop(request.command.message_id, None)
            assoc.last_operation_end = time.monotonic()

    @staticmethod
    async def _end_operations(assoc: _Association) -> None:
        """Cancel what is still running (a release during an operation) and wait for it."""
        tasks = [task for _, task in assoc.operations.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
